import { type ChildProcessWithoutNullStreams, execFile, spawn } from 'node:child_process';
import { chmod, mkdtemp, readdir, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { requireTools } from '../../../e2e/testing/tools.ts';
import type { CachedImage } from '../../src/images/cache.ts';
import { DiskConflictError, diskInfo } from '../../src/images/disks.ts';
import { qemuImgChain } from '../../src/images/qemuimg.ts';
import type { VolumeRef } from '../../src/volumes/backend.ts';
import { LocalBackend, type SnapshotStep, VolumeInUseError } from '../../src/volumes/local.ts';

// The local volume backend with the real qemu-img: files, chains and data (written and checked with qemu-io).
requireTools('qemu-img', 'qemu-io');
const run = promisify(execFile);
const MiB = 1024 * 1024;
const NODE = 'node-a';

let root: string;
let image: CachedImage;
let seq = 0;

/** A fresh state directory and backend per test. */
function setup(o: Partial<ConstructorParameters<typeof LocalBackend>[0]> = {}) {
  const stateDir = path.join(root, `state-${++seq}`);
  const b = new LocalBackend({ stateDir, node: NODE, ...o });
  return { stateDir, b };
}
const vol = (n: number | string): VolumeRef => ({
  id: `00000000-0000-4000-8000-${String(n).padStart(12, '0')}`,
  name: `v${n}`,
  namespace: 'ns',
});
const snap = (n: number | string) => ({ ...vol(`5${n}`), name: `s${n}` });
const loc = (id: string) => `local://${NODE}/${id}`;

async function write(file: string, pattern: number, off: string, len: string): Promise<void> {
  await run('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x${pattern.toString(16)} ${off} ${len}`, file]);
}
/** Whether the disk at `file` holds `pattern` at off..off+len (qemu-io's pattern check). */
async function holds(file: string, pattern: number, off: string, len: string): Promise<boolean> {
  // qemu-io exits 1 when the pattern differs
  const { stdout } = await run('qemu-io', [
    '-f',
    'qcow2',
    '-r',
    '-U',
    '-c',
    `read -P 0x${pattern.toString(16)} ${off} ${len}`,
    file,
  ]).catch((err: { stdout?: string }) => ({ stdout: err.stdout ?? String(err) }));
  if (!/^read \d+\/\d+ bytes/m.test(stdout)) throw new Error(`qemu-io read failed: ${stdout}`);
  return !/Pattern verification failed/.test(stdout);
}
const chainOf = async (file: string) =>
  (await qemuImgChain(file, { format: 'qcow2', forceShare: true })).slice(1).map((i) => i.filename);
const leftovers = async (dir: string) => (await readdir(dir)).filter((n) => n.includes('.tmp-'));

/** A QEMU-like holder of a disk's write lock: qemu-io interactive, until stop(). */
const holders: ChildProcessWithoutNullStreams[] = [];
async function holdLock(file: string): Promise<() => Promise<void>> {
  const p = spawn('qemu-io', ['-f', 'qcow2', file]);
  holders.push(p);
  let out = '';
  await new Promise<void>((resolve, reject) => {
    p.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (/read 512\/512 bytes/.test(out)) resolve();
    });
    p.on('exit', (code) => reject(new Error(`qemu-io exited ${code}: ${out}`)));
    p.stdin.write('read 0 512\n'); // answered once the image is open (and locked)
  });
  return async () => {
    const exited = new Promise((r) => p.once('exit', r));
    p.stdin.end('quit\n');
    await exited;
  };
}

beforeAll(async () => {
  root = await mkdtemp(path.join(os.tmpdir(), 'stratus-volumes-local-'));
  const base = path.join(root, 'image.qcow2');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '64M']);
  await write(base, 0x11, '0', '1M');
  image = { key: 'k', path: base, format: 'qcow2', virtualSize: 64 * MiB, size: 0, sha256: '' };
});

afterEach(async () => {
  for (const p of holders.splice(0)) p.kill('SIGKILL');
});

afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('LocalBackend create', () => {
  it('creates a blank qcow2 at <stateDir>/volumes/<uid>.qcow2; a repeat returns it; another one is a conflict', async () => {
    const { stateDir, b } = setup();
    const v = vol(1);
    const got = await b.create(v, 32 * MiB, { kind: 'blank' });
    const file = path.join(stateDir, 'volumes', `${v.id}.qcow2`);
    expect(got).toMatchObject({ location: loc(v.id), sizeBytes: 32 * MiB });
    expect(got.allocatedBytes).toBeGreaterThan(0);
    expect(await diskInfo(file)).toMatchObject({ format: 'qcow2', virtualSize: 32 * MiB });
    expect((await diskInfo(file)).backingFile).toBeUndefined();
    await write(file, 0x42, '0', '64k');
    expect(await b.create(v, 32 * MiB, { kind: 'blank' })).toMatchObject({ location: loc(v.id), sizeBytes: 32 * MiB });
    expect(await holds(file, 0x42, '0', '64k')).toBe(true); // the repeat kept the data
    await expect(b.create(v, 64 * MiB, { kind: 'blank' })).rejects.toBeInstanceOf(DiskConflictError);
    const fromImage = vol(8);
    await b.create(fromImage, 64 * MiB, { kind: 'image', image });
    await expect(b.create(fromImage, 64 * MiB, { kind: 'blank' })).rejects.toThrow(
      `exists on base ${image.path}, not made from blank; leaving it alone`,
    );
    expect(await leftovers(path.join(stateDir, 'volumes'))).toEqual([]);
  });

  it('from an image: a qcow2 overlay on the cached file; smaller than the image is refused, nothing made', async () => {
    const { stateDir, b } = setup();
    const v = vol(2);
    const got = await b.create(v, 128 * MiB, { kind: 'image', image });
    const file = path.join(stateDir, 'volumes', `${v.id}.qcow2`);
    expect(got.sizeBytes).toBe(128 * MiB);
    expect(await diskInfo(file)).toMatchObject({ backingFile: image.path, backingFormat: 'qcow2' });
    expect(await holds(file, 0x11, '0', '1M')).toBe(true);
    expect(await b.create(v, 128 * MiB, { kind: 'image', image })).toEqual(got);
    await expect(b.create(vol(3), 32 * MiB, { kind: 'image', image })).rejects.toThrow(
      /size 32\.0 MiB \(33554432 bytes\) is smaller than its source image's 64\.0 MiB/,
    );
    expect(await b.inspect(loc(vol(3).id))).toBeUndefined();
    expect(await leftovers(path.join(stateDir, 'volumes'))).toEqual([]);
  });

  it('clone: a full independent copy of a detached volume, grown to the size asked; an in-use source is refused', async () => {
    const { stateDir, b } = setup();
    const src = vol(4);
    const srcFile = path.join(stateDir, 'volumes', `${src.id}.qcow2`);
    await b.create(src, 64 * MiB, { kind: 'image', image });
    await write(srcFile, 0x22, '2M', '64k');
    const c = vol(5);
    const got = await b.create(c, 96 * MiB, { kind: 'volume', location: loc(src.id) });
    const cFile = path.join(stateDir, 'volumes', `${c.id}.qcow2`);
    expect(got.sizeBytes).toBe(96 * MiB);
    expect((await diskInfo(cFile)).backingFile).toBeUndefined(); // independent of the image too
    expect(await holds(cFile, 0x11, '0', '1M')).toBe(true);
    expect(await holds(cFile, 0x22, '2M', '64k')).toBe(true);
    await write(cFile, 0x33, '2M', '64k');
    expect(await holds(srcFile, 0x22, '2M', '64k')).toBe(true); // the clone's writes stay in the clone
    expect(await b.create(c, 96 * MiB, { kind: 'volume', location: loc(src.id) })).toMatchObject({
      sizeBytes: 96 * MiB,
    });

    const release = await holdLock(srcFile);
    const err = await b.create(vol(6), 64 * MiB, { kind: 'volume', location: loc(src.id) }).catch((e: unknown) => e);
    await release();
    expect(err).toBeInstanceOf(VolumeInUseError);
    expect((err as Error).message).toMatch(/is in use: a QEMU holds its write lock/);
    expect(await b.inspect(loc(vol(6).id))).toBeUndefined();
    expect(await leftovers(path.join(stateDir, 'volumes'))).toEqual([]);
  });

  it('refuses a location of another node and an unknown source', async () => {
    const { b } = setup();
    await expect(b.create(vol(7), MiB, { kind: 'volume', location: `local://node-b/${vol(1).id}` })).rejects.toThrow(
      /is held by node node-b, not by this node \(node-a\)/,
    );
    await expect(
      b.create(vol(7), MiB, { kind: 'snapshot', location: `local://${NODE}/snapshots/${snap(1).id}` }),
    ).rejects.toThrow(/source snapshot .* does not exist/);
  });
});

describe('LocalBackend snapshots', () => {
  it('a snapshot keeps the data of its time; later writes reach neither it nor a volume made from it', async () => {
    const { stateDir, b } = setup({ owner: { uid: 65534, gid: 65534 } });
    const v = vol(10);
    await expect(b.create(v, 64 * MiB, { kind: 'blank' })).rejects.toThrow(
      `QEMU user (uid 65534) cannot reach ${stateDir}/volumes/snapshots: ${root} is mode 0700; let it in (chmod o+x ${root})`,
    );
    await chmod(root, 0o711);
    const file = path.join(stateDir, 'volumes', `${v.id}.qcow2`);
    await b.create(v, 64 * MiB, { kind: 'image', image });
    await write(file, 0xaa, '4M', '1M');
    const s = await b.createSnapshot(loc(v.id), snap(1));
    const sFile = path.join(stateDir, 'volumes', 'snapshots', `${snap(1).id}.qcow2`);
    expect(s).toEqual({ location: `local://${NODE}/snapshots/${snap(1).id}`, sizeBytes: 64 * MiB });
    expect(await chainOf(file)).toEqual([sFile, image.path]);
    expect(await b.createSnapshot(loc(v.id), snap(1))).toEqual(s); // a repeat

    await write(file, 0xbb, '4M', '1M');
    expect(await holds(file, 0xbb, '4M', '1M')).toBe(true);
    expect(await holds(sFile, 0xaa, '4M', '1M')).toBe(true);
    const w = vol(11);
    await b.create(w, 64 * MiB, { kind: 'snapshot', location: s.location });
    const wFile = path.join(stateDir, 'volumes', `${w.id}.qcow2`);
    expect(await holds(wFile, 0xaa, '4M', '1M')).toBe(true);
    expect(await holds(wFile, 0x11, '0', '1M')).toBe(true);
    await write(wFile, 0xcc, '4M', '1M');
    expect(await holds(sFile, 0xaa, '4M', '1M')).toBe(true);
    expect(await holds(file, 0xbb, '4M', '1M')).toBe(true);

    // QEMU's user opens the volume through the blockdev tree connection() hands out (and its chain), and writes to it;
    // the snapshot file is read-only even for that user.
    const asQemu = { uid: 65534, gid: 65534 };
    const { blockdev } = await b.connection(v, loc(v.id));
    const file2 = (blockdev as { file: { filename: string; aio: string } }).file;
    const opts = `driver=${blockdev.driver},file.driver=file,file.filename=${file2.filename},file.aio=${file2.aio}`;
    const io = await run(
      'qemu-io',
      ['--image-opts', '-c', 'read -P 0xbb 4M 1M', '-c', 'write -P 0xbb 5M 4k', opts],
      asQemu,
    );
    expect(io.stdout).toMatch(/read 1048576\/1048576 bytes[\s\S]*wrote 4096\/4096 bytes/);
    expect(io.stdout).not.toMatch(/Pattern verification failed/);
    await expect(run('qemu-io', ['-f', 'qcow2', '-c', 'write 0 4k', sFile], asQemu)).rejects.toMatchObject({
      stderr: expect.stringMatching(/Permission denied/),
    });
    // Files belong to QEMU's user: the volume read-write, the snapshot read-only; directories let it through.
    expect(await stat(file)).toMatchObject({ uid: 65534, gid: 65534 });
    expect((await stat(file)).mode & 0o777).toBe(0o600);
    expect(await stat(sFile)).toMatchObject({ uid: 65534, gid: 65534 });
    expect((await stat(sFile)).mode & 0o777).toBe(0o400);
    expect((await stat(path.join(stateDir, 'volumes'))).mode & 0o777).toBe(0o711);
    expect((await stat(path.join(stateDir, 'volumes', 'snapshots'))).mode & 0o777).toBe(0o711);
    expect(await b.list()).toEqual({
      volumes: [loc(v.id), loc(w.id)].sort(),
      snapshots: [s.location],
    });
  });

  it('bounds the chain at maxSnapshotDepth and every snapshot keeps its data', async () => {
    const { stateDir, b } = setup({ maxSnapshotDepth: 2 });
    const v = vol(20);
    const file = path.join(stateDir, 'volumes', `${v.id}.qcow2`);
    await b.create(v, 64 * MiB, { kind: 'image', image });
    const snaps: string[] = [];
    for (let i = 1; i <= 5; i++) {
      await write(file, 0x20 + i, '8M', '1M'); // the same range each time
      await write(file, 0x40 + i, `${8 + i}M`, '64k'); // and a range of its own
      const s = await b.createSnapshot(loc(v.id), snap(i));
      snaps.push(path.join(stateDir, 'volumes', 'snapshots', `${snap(i).id}.qcow2`));
      const chain = await chainOf(file);
      expect(chain.filter((f) => f?.includes('/snapshots/')).length).toBeLessThanOrEqual(2);
      expect(chain.at(-1)).toBe(image.path);
      expect(s.location).toBe(`local://${NODE}/snapshots/${snap(i).id}`);
    }
    await write(file, 0x99, '8M', '1M');
    for (let i = 1; i <= 5; i++) {
      const f = snaps[i - 1] as string;
      expect(await holds(f, 0x20 + i, '8M', '1M')).toBe(true);
      for (let j = 1; j <= 5; j++) expect(await holds(f, 0x40 + j, `${8 + j}M`, '64k')).toBe(j <= i);
      expect(await holds(f, 0x11, '0', '1M')).toBe(true);
      expect(await chainOf(f).then((c) => c.filter((x) => x?.includes('/snapshots/')).length)).toBeLessThanOrEqual(1);
    }
    expect(await holds(file, 0x99, '8M', '1M')).toBe(true);
    for (let j = 1; j <= 5; j++) expect(await holds(file, 0x40 + j, `${8 + j}M`, '64k')).toBe(true);
  });

  it('deleteSnapshot keeps the data of the volume, later snapshots and volumes made from it', async () => {
    const { stateDir, b } = setup();
    const v = vol(30);
    const file = path.join(stateDir, 'volumes', `${v.id}.qcow2`);
    const sdir = path.join(stateDir, 'volumes', 'snapshots');
    await b.create(v, 64 * MiB, { kind: 'blank' });
    await write(file, 0x01, '0', '1M');
    const s1 = await b.createSnapshot(loc(v.id), snap(1));
    await write(file, 0x02, '1M', '1M');
    const s2 = await b.createSnapshot(loc(v.id), snap(2));
    await write(file, 0x03, '2M', '1M');
    const w = vol(31);
    await b.create(w, 64 * MiB, { kind: 'snapshot', location: s1.location });
    const wFile = path.join(stateDir, 'volumes', `${w.id}.qcow2`);

    await b.deleteSnapshot(s1.location); // backs s2 (and through it the volume) and w
    await expect(stat(path.join(sdir, `${snap(1).id}.qcow2`))).rejects.toMatchObject({ code: 'ENOENT' });
    const s2File = path.join(sdir, `${snap(2).id}.qcow2`);
    expect(await holds(s2File, 0x01, '0', '1M')).toBe(true);
    expect(await holds(s2File, 0x02, '1M', '1M')).toBe(true);
    expect(await holds(wFile, 0x01, '0', '1M')).toBe(true);
    expect(await holds(wFile, 0x00, '1M', '1M')).toBe(true);
    expect(await chainOf(wFile)).toEqual([]);

    await b.deleteSnapshot(s2.location); // the volume's own backing file
    expect(await chainOf(file)).toEqual([]);
    for (const [p, off] of [
      [0x01, '0'],
      [0x02, '1M'],
      [0x03, '2M'],
    ] as const) {
      expect(await holds(file, p, off, '1M')).toBe(true);
    }
    await b.deleteSnapshot(s2.location); // a repeat
    expect(await readdir(sdir)).toEqual([]);
    expect(await b.list()).toEqual({ volumes: [loc(v.id), loc(w.id)].sort(), snapshots: [] });
  });

  it('deleteSnapshot killed after rebasing one dependent converges when called again', async () => {
    const { stateDir, b } = setup();
    const v = vol(35);
    const sdir = path.join(stateDir, 'volumes', 'snapshots');
    await b.create(v, 64 * MiB, { kind: 'image', image });
    await write(b.volumePath(v.id), 0x35, '1M', '1M');
    const s = await b.createSnapshot(loc(v.id), snap(1));
    const w = vol(36);
    await b.create(w, 64 * MiB, { kind: 'snapshot', location: s.location });
    // What the killed call left: its marker, and the volume rebased off the snapshot (w not yet).
    await writeFile(path.join(sdir, `.${snap(1).id}.deleted`), '');
    await run('qemu-img', ['rebase', '-q', '-f', 'qcow2', '-b', image.path, '-F', 'qcow2', b.volumePath(v.id)]);
    expect(await b.list()).toEqual({ volumes: [loc(v.id), loc(w.id)].sort(), snapshots: [] }); // finishes it
    expect(await readdir(sdir)).toEqual([]);
    await b.deleteSnapshot(s.location); // and so does a repeat of the delete
    expect(await readdir(sdir)).toEqual([]);
    for (const id of [v.id, w.id]) {
      expect(await chainOf(b.volumePath(id))).toEqual([image.path]);
      expect(await holds(b.volumePath(id), 0x35, '1M', '1M')).toBe(true);
      expect(await holds(b.volumePath(id), 0x11, '0', '1M')).toBe(true);
    }
  });

  it('a snapshot an in-use volume is made from is hidden, and removed once that volume is detached', async () => {
    const { stateDir, b } = setup();
    const v = vol(40);
    const sdir = path.join(stateDir, 'volumes', 'snapshots');
    await b.create(v, 16 * MiB, { kind: 'blank' });
    await write(b.volumePath(v.id), 0x07, '0', '1M');
    const s = await b.createSnapshot(loc(v.id), snap(1));
    const w = vol(41);
    await b.create(w, 16 * MiB, { kind: 'snapshot', location: s.location });
    await b.delete(loc(v.id));
    const release = await holdLock(b.volumePath(w.id));
    await b.deleteSnapshot(s.location);
    expect(await b.list()).toEqual({ volumes: [loc(w.id)], snapshots: [] });
    expect(await b.inspect(s.location)).toBeUndefined();
    expect(await readdir(sdir)).toContain(`${snap(1).id}.qcow2`); // still w's backing file
    await expect(b.create(vol(42), 16 * MiB, { kind: 'snapshot', location: s.location })).rejects.toThrow(/is deleted/);
    // a repeat of the create that made w still returns w
    expect(await b.create(w, 16 * MiB, { kind: 'snapshot', location: s.location })).toMatchObject({
      location: loc(w.id),
    });
    await release();
    expect(await b.list()).toEqual({ volumes: [loc(w.id)], snapshots: [] });
    expect(await readdir(sdir)).toEqual([]);
    expect(await holds(b.volumePath(w.id), 0x07, '0', '1M')).toBe(true);
  });

  it('refuses to snapshot an in-use volume', async () => {
    const { b } = setup();
    const v = vol(50);
    await b.create(v, 16 * MiB, { kind: 'blank' });
    const release = await holdLock(b.volumePath(v.id));
    const err = await b.createSnapshot(loc(v.id), snap(1)).catch((e: unknown) => e);
    await release();
    expect(err).toBeInstanceOf(VolumeInUseError);
    expect(await b.list()).toEqual({ volumes: [loc(v.id)], snapshots: [] });
  });

  const steps: SnapshotStep[] = ['rebased', 'linked', 'overlay-created', 'renamed'];
  it.each(steps)('an agent killed after step %s converges on one snapshot and a volume with all data', async (at) => {
    const { stateDir, b } = setup({ maxSnapshotDepth: 1 });
    const v = vol(60);
    const file = b.volumePath(v.id);
    const sdir = path.join(stateDir, 'volumes', 'snapshots');
    await b.create(v, 64 * MiB, { kind: 'image', image });
    await write(file, 0x61, '1M', '1M');
    await b.createSnapshot(loc(v.id), snap(0)); // depth 1: the next snapshot rebases the volume first
    await write(file, 0x62, '2M', '1M');

    const killed = new LocalBackend({
      stateDir,
      node: NODE,
      maxSnapshotDepth: 1,
      onSnapshotStep: (s) => {
        if (s === at) throw new Error(`killed after ${s}`);
      },
    });
    await expect(killed.createSnapshot(loc(v.id), snap(1))).rejects.toThrow(`killed after ${at}`);
    // What a kill in the middle of step 3 leaves: a temporary file (the throw above cleaned its own up).
    await writeFile(path.join(stateDir, 'volumes', `.${v.id}.qcow2.tmp-deadbeef`), 'partial');

    const restarted = new LocalBackend({ stateDir, node: NODE, maxSnapshotDepth: 1 });
    const s = await restarted.createSnapshot(loc(v.id), snap(1));
    expect(s.location).toBe(`local://${NODE}/snapshots/${snap(1).id}`);
    const sFile = path.join(sdir, `${snap(1).id}.qcow2`);
    expect((await readdir(sdir)).sort()).toEqual([`${snap(0).id}.qcow2`, `${snap(1).id}.qcow2`].sort());
    expect(await chainOf(file)).toEqual([sFile, image.path]);
    expect((await stat(sFile)).ino).not.toBe((await stat(file)).ino);
    expect((await stat(sFile)).mode & 0o777).toBe(0o400);
    expect(await leftovers(path.join(stateDir, 'volumes'))).toEqual([]);
    for (const f of [file, sFile]) {
      expect(await holds(f, 0x11, '0', '1M')).toBe(true);
      expect(await holds(f, 0x61, '1M', '1M')).toBe(true);
      expect(await holds(f, 0x62, '2M', '1M')).toBe(true);
    }
    await write(file, 0x63, '2M', '1M');
    expect(await holds(sFile, 0x62, '2M', '1M')).toBe(true);
    expect(await holds(path.join(sdir, `${snap(0).id}.qcow2`), 0x00, '2M', '1M')).toBe(true);
  });
});

describe('LocalBackend extend, delete, flatten, inspect, connection, probe', () => {
  it('extend grows a detached volume, repeats do nothing, never shrinks, and an in-use one is refused', async () => {
    const { b } = setup();
    await b.create(vol(71), 64 * MiB, { kind: 'image', image });
    const l = loc(vol(71).id);
    expect(await b.extend(l, 96 * MiB)).toMatchObject({ location: l, sizeBytes: 96 * MiB });
    expect(await b.extend(l, 96 * MiB)).toMatchObject({ sizeBytes: 96 * MiB });
    await expect(b.extend(l, 32 * MiB)).rejects.toBeInstanceOf(RangeError);
    expect(await holds(b.volumePath(vol(71).id), 0x11, '0', '1M')).toBe(true);
    const release = await holdLock(b.volumePath(vol(71).id));
    const err = await b.extend(l, 128 * MiB).catch((e: unknown) => e);
    await release();
    expect(err).toBeInstanceOf(VolumeInUseError);
    expect((await b.inspect(l))?.sizeBytes).toBe(96 * MiB);
    await expect(b.extend(loc(vol(79).id), 128 * MiB)).rejects.toThrow(/does not exist/);
  });

  it('delete removes the volume file only (its snapshots stay); unknown volumes succeed', async () => {
    const { stateDir, b } = setup();
    const v = vol(80);
    await b.create(v, 16 * MiB, { kind: 'blank' });
    const s = await b.createSnapshot(loc(v.id), snap(1));
    await b.delete(loc(v.id));
    await b.delete(loc(v.id));
    await b.delete(loc(vol(89).id));
    expect(await b.list()).toEqual({ volumes: [], snapshots: [s.location] });
    expect(await b.inspect(loc(v.id))).toBeUndefined();
    expect(await b.inspect(s.location)).toMatchObject({ sizeBytes: 16 * MiB });
    expect(await readdir(path.join(stateDir, 'volumes'))).toEqual(['snapshots']);
  });

  it('flatten makes a volume from an image independent, with the same data', async () => {
    const { b } = setup();
    const v = vol(90);
    const l = loc(v.id);
    await b.create(v, 64 * MiB, { kind: 'image', image });
    await write(b.volumePath(v.id), 0x91, '3M', '64k');
    expect((await b.flatten(l)).sizeBytes).toBe(64 * MiB);
    expect(await chainOf(b.volumePath(v.id))).toEqual([]);
    expect(await holds(b.volumePath(v.id), 0x11, '0', '1M')).toBe(true);
    expect(await holds(b.volumePath(v.id), 0x91, '3M', '64k')).toBe(true);
    await b.flatten(l); // nothing left to do
    expect(await leftovers(path.dirname(b.volumePath(v.id)))).toEqual([]);
  });

  it('connection: a qcow2 file blockdev, the volume serial; probe is ok', async () => {
    const { b } = setup();
    const v = vol(100);
    await b.create(v, MiB, { kind: 'blank' });
    expect(await b.connection(v, loc(v.id))).toEqual({
      volumeId: v.id,
      serial: v.id.replaceAll('-', '').slice(0, 20),
      blockdev: { driver: 'qcow2', file: { driver: 'file', filename: b.volumePath(v.id), aio: 'threads' } },
    });
    await expect(b.connection(vol(101), loc(vol(101).id))).rejects.toThrow(/does not exist/);
    expect(await b.probe()).toEqual({ ok: true });
  });

  it('imagesInUse: the image files volumes and snapshots are built on (for image cache eviction)', async () => {
    const { b } = setup();
    const other = path.join(root, 'other.raw');
    await writeFile(other, Buffer.alloc(MiB));
    const otherImage: CachedImage = { ...image, key: 'o', path: other, format: 'raw', virtualSize: MiB };
    expect(await b.imagesInUse()).toEqual(new Set());
    await b.create(vol(120), 64 * MiB, { kind: 'blank' });
    await b.create(vol(121), 64 * MiB, { kind: 'image', image });
    const s = await b.createSnapshot(loc(vol(121).id), snap(1));
    await b.delete(loc(vol(121).id)); // the snapshot still needs the image
    await b.create(vol(122), MiB, { kind: 'image', image: otherImage });
    expect(await b.imagesInUse()).toEqual(new Set([image.path, other]));
    await b.deleteSnapshot(s.location);
    await b.flatten(loc(vol(122).id));
    expect(await b.imagesInUse()).toEqual(new Set());
  });

  it('a restarted backend removes the temporary files a killed one left', async () => {
    const { stateDir, b } = setup();
    await b.create(vol(110), MiB, { kind: 'blank' });
    const stale = [
      path.join(stateDir, 'volumes', `.${vol(111).id}.qcow2.tmp-0badf00d`),
      path.join(stateDir, 'volumes', 'snapshots', `.${snap(1).id}.qcow2.tmp-0badf00d`),
    ];
    for (const f of stale) await writeFile(f, 'x');
    const again = new LocalBackend({ stateDir, node: NODE });
    expect(await again.list()).toEqual({ volumes: [loc(vol(110).id)], snapshots: [] });
    expect(await leftovers(path.join(stateDir, 'volumes'))).toEqual([]);
    expect(await leftovers(path.join(stateDir, 'volumes', 'snapshots'))).toEqual([]);
  });
});
