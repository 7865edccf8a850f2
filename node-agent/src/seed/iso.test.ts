import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { seedDigest, writeIso } from './iso.ts';

// Building and reading back real images needs genisoimage/isoinfo: node-agent/test/integration/iso.test.ts.

describe('seedDigest', () => {
  it('depends on names and contents, not on insertion order', () => {
    const a = seedDigest({ 'meta-data': 'x', 'user-data': 'y' });
    expect(seedDigest({ 'user-data': 'y', 'meta-data': 'x' })).toBe(a);
    expect(seedDigest({ 'meta-data': 'x', 'user-data': 'z' })).not.toBe(a);
    expect(seedDigest({ 'meta-datax': '', 'user-data': 'y' })).not.toBe(
      seedDigest({ 'meta-data': 'x', 'user-data': 'y' }),
    );
  });
});

describe('writeIso', () => {
  it('rejects unsafe paths and labels before writing anything', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'stratus-seed-'));
    try {
      const iso = join(dir, 'seed.iso');
      await writeFile(iso, 'old');
      await expect(writeIso({ '../x': '1' }, iso, { volid: 'cidata' })).rejects.toThrow('invalid path');
      await expect(writeIso({ '/x': '1' }, iso, { volid: 'cidata' })).rejects.toThrow('invalid path');
      await expect(writeIso({ 'a//b': '1' }, iso, { volid: 'cidata' })).rejects.toThrow('invalid path');
      await expect(writeIso({ a: '1' }, iso, { volid: 'bad label' })).rejects.toThrow('invalid volume id');
      expect(await readFile(iso, 'utf8')).toBe('old');
      expect(await readdir(dir)).toEqual(['seed.iso']);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
