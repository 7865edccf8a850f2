// Seed images built with the real genisoimage and read back with isoinfo (the pure checks are unit tests in
// node-agent/src/seed/iso.test.ts).
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { requireTools } from '../../../e2e/testing/tools.ts';
import { writeConfigDriveIso } from '../../src/seed/configdrive.ts';
import { writeIso } from '../../src/seed/iso.ts';
import { writeNoCloudIso } from '../../src/seed/nocloud.ts';

const run = promisify(execFile);
requireTools('genisoimage', 'isoinfo');

/** Read one file back from an ISO with isoinfo (Rock Ridge names). */
async function isoCat(iso: string, path: string): Promise<string> {
  return (await run('isoinfo', ['-i', iso, '-R', '-x', path])).stdout;
}
async function isoVolid(iso: string): Promise<string> {
  const { stdout } = await run('isoinfo', ['-d', '-i', iso]);
  return /^Volume id: (.*)$/m.exec(stdout)?.[1] ?? '';
}
async function isoFiles(iso: string): Promise<string[]> {
  const { stdout } = await run('isoinfo', ['-i', iso, '-R', '-f']);
  return stdout.trim().split('\n').sort();
}

describe('ISO images (genisoimage + isoinfo)', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'stratus-seed-'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('NoCloud seed: label cidata, files read back, Joliet names too', async () => {
    const iso = join(dir, 'seed.iso');
    const files = await writeNoCloudIso(
      {
        instanceId: 'uid-1',
        hostname: 'vm1',
        keyPair: { name: 'k', publicKey: 'ssh-ed25519 AAAA k' },
        nics: [{ mac: 'fa:16:3e:00:00:01', addresses: ['192.168.100.11/24'], gateway: '192.168.100.1' }],
      },
      iso,
    );
    expect(await isoVolid(iso)).toBe('cidata');
    expect(await isoFiles(iso)).toEqual(['/meta-data', '/network-config', '/user-data']);
    for (const [name, content] of Object.entries(files)) expect(await isoCat(iso, `/${name}`)).toBe(content);
    const joliet = (await run('isoinfo', ['-i', iso, '-J', '-f'])).stdout.trim().split('\n').sort();
    expect(joliet).toEqual(['/meta-data', '/network-config', '/user-data']);
    // file dates are the fixed SEED_MTIME; no staging leftovers next to the image
    const listing = (await run('isoinfo', ['-i', iso, '-R', '-l'])).stdout;
    expect(listing).toMatch(/-r--r--r--|-rw-r--r--/);
    expect(listing).toContain('Jan  1 2020');
    expect(await readdir(dir)).toEqual(['seed.iso']);
  });

  it('config drive: label config-2, nested openstack/ tree', async () => {
    const iso = join(dir, 'config.iso');
    const files = await writeConfigDriveIso(
      {
        uuid: 'uid-2',
        name: 'vm2',
        hostname: 'vm2',
        userData: '#!/bin/sh\ntrue\n',
        nics: [{ mac: 'fa:16:3e:00:00:02' }],
      },
      iso,
    );
    expect(await isoVolid(iso)).toBe('config-2');
    expect(await isoFiles(iso)).toEqual([
      '/openstack',
      '/openstack/2018-08-27',
      '/openstack/2018-08-27/meta_data.json',
      '/openstack/2018-08-27/network_data.json',
      '/openstack/2018-08-27/user_data',
      '/openstack/latest',
      '/openstack/latest/meta_data.json',
      '/openstack/latest/network_data.json',
      '/openstack/latest/user_data',
    ]);
    for (const [name, content] of Object.entries(files)) expect(await isoCat(iso, `/${name}`)).toBe(content);
    expect(JSON.parse(await isoCat(iso, '/openstack/latest/meta_data.json')).uuid).toBe('uid-2');
  });

  it('replaces an existing image; a failed genisoimage leaves the old one', async () => {
    const iso = join(dir, 'replace.iso');
    await writeFile(iso, 'old');
    await writeIso({ a: '1' }, iso, { volid: 'cidata' });
    expect(await isoCat(iso, '/a')).toBe('1');
    await expect(
      writeIso({ a: '1' }, iso, { volid: 'cidata', genisoimage: '/nonexistent/genisoimage' }),
    ).rejects.toThrow();
    expect(await isoCat(iso, '/a')).toBe('1'); // failed writes leave the old image
    expect((await readdir(dir)).filter((f) => f.startsWith('.'))).toEqual([]);
  });
});
