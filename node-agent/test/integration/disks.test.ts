import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { requireTools } from '../../../e2e/testing/tools.ts';
import type { CachedImage } from '../../src/images/cache.ts';
import { createBlankDisk, createRootDisk, DiskConflictError, diskInfo } from '../../src/images/disks.ts';
import { ImageError } from '../../src/images/errors.ts';

// Root and blank disks made with the real qemu-img.
requireTools('qemu-img', 'qemu-io');
const run = promisify(execFile);
const MiB = 1024 * 1024;
const fileSha = async (p: string) =>
  createHash('sha256')
    .update(await readFile(p))
    .digest('hex');

let dir: string;
let qcowBase: CachedImage;
let rawBase: CachedImage;

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'stratus-disks-'));
  const q = path.join(dir, 'base.qcow2');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', q, '64M']);
  await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 64k', q]);
  const r = path.join(dir, 'base.raw');
  await writeFile(r, Buffer.alloc(8 * MiB, 0x22));
  const common = { size: 0, sha256: '', sourceFormat: '' };
  qcowBase = { key: 'q', path: q, format: 'qcow2', virtualSize: 64 * MiB, ...common };
  rawBase = { key: 'r', path: r, format: 'raw', virtualSize: 8 * MiB, ...common };
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('createRootDisk', () => {
  it('creates a qcow2 overlay on the base with the requested virtual size', async () => {
    const disk = path.join(dir, 'vm1', 'root.qcow2');
    await createRootDisk({ base: qcowBase, path: disk, sizeBytes: 1024 * MiB });
    expect(await diskInfo(disk)).toMatchObject({
      format: 'qcow2',
      virtualSize: 1024 * MiB,
      backingFile: qcowBase.path,
      backingFormat: 'qcow2',
    });
    const { stdout } = await run('qemu-io', ['-f', 'qcow2', '-r', '-c', 'read -P 0x11 0 64k', disk]);
    expect(stdout).toMatch(/read 65536\/65536/);
    expect((await readdir(path.dirname(disk))).filter((n) => n.startsWith('.'))).toEqual([]);
  });

  it('uses the image virtual size for sizeBytes 0, and raw bases (-F raw)', async () => {
    const a = path.join(dir, 'vm2', 'root.qcow2');
    await createRootDisk({ base: qcowBase, path: a, sizeBytes: 0 });
    expect((await diskInfo(a)).virtualSize).toBe(64 * MiB);
    const b = path.join(dir, 'vm3', 'root.qcow2');
    await createRootDisk({ base: rawBase, path: b, sizeBytes: 8 * MiB });
    expect(await diskInfo(b)).toMatchObject({ virtualSize: 8 * MiB, backingFile: rawBase.path, backingFormat: 'raw' });
  });

  it('refuses an image bigger than the disk (TooBig) and creates nothing', async () => {
    const disk = path.join(dir, 'vm4', 'root.qcow2');
    const err = await createRootDisk({ base: qcowBase, path: disk, sizeBytes: 32 * MiB }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ImageError);
    expect(err).toMatchObject({
      reason: 'TooBig',
      message: `the image's virtual size 64.0 MiB (${64 * MiB} bytes) is larger than the root disk of 32.0 MiB (${32 * MiB} bytes)`,
    });
    await expect(stat(disk)).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('is idempotent: re-creating keeps the existing disk and its data; a different disk is a conflict', async () => {
    const disk = path.join(dir, 'vm5', 'root.qcow2');
    await createRootDisk({ base: qcowBase, path: disk, sizeBytes: 128 * MiB });
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x77 4M 64k', disk]); // the guest writes
    const before = { ino: (await stat(disk)).ino, sha: await fileSha(disk) };
    await createRootDisk({ base: qcowBase, path: disk, sizeBytes: 128 * MiB });
    expect({ ino: (await stat(disk)).ino, sha: await fileSha(disk) }).toEqual(before);
    await expect(createRootDisk({ base: qcowBase, path: disk, sizeBytes: 256 * MiB })).rejects.toThrow(
      DiskConflictError,
    );
    await expect(createRootDisk({ base: rawBase, path: disk, sizeBytes: 128 * MiB })).rejects.toThrow(
      /exists with backing file .*base\.qcow2, not .*base\.raw; leaving it alone/,
    );
    expect(await fileSha(disk)).toBe(before.sha);
    const { stdout } = await run('qemu-io', ['-f', 'qcow2', '-r', '-c', 'read -P 0x77 4M 64k', disk]);
    expect(stdout).toMatch(/read 65536\/65536/);
  });
});

describe('createBlankDisk', () => {
  it('creates a blank qcow2, idempotently', async () => {
    const disk = path.join(dir, 'vm6', 'swap.qcow2');
    await createBlankDisk({ path: disk, sizeBytes: 512 * MiB });
    const info = await diskInfo(disk);
    expect(info).toMatchObject({ format: 'qcow2', virtualSize: 512 * MiB });
    expect(info.backingFile).toBeUndefined();
    const ino = (await stat(disk)).ino;
    await createBlankDisk({ path: disk, sizeBytes: 512 * MiB });
    expect((await stat(disk)).ino).toBe(ino);
    await expect(createBlankDisk({ path: disk, sizeBytes: 1024 * MiB })).rejects.toThrow(DiskConflictError);
    await expect(createBlankDisk({ path: path.join(dir, 'x.qcow2'), sizeBytes: 0 })).rejects.toThrow(RangeError);
  });
});

describe('diskInfo', () => {
  it('reports the allocation, and fails clearly for a missing file', async () => {
    const disk = path.join(dir, 'vm7', 'root.qcow2');
    await createRootDisk({ base: qcowBase, path: disk, sizeBytes: 0 });
    const info = await diskInfo(disk, { format: 'qcow2' });
    expect(info.actualSize).toBeGreaterThan(0);
    await expect(diskInfo(path.join(dir, 'missing.qcow2'))).rejects.toThrow(/qemu-img info: .*missing\.qcow2/);
  });
});
