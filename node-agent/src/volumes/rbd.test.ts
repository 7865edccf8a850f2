// Unit tests of the rbd backend: locations, argv, clone-depth decisions and Cinder's delete semantics, against an
// in-memory model of the `rbd` CLI (injected exec; no binaries). The real cluster is exercised by
// e2e/tests/volume-rbd.test.ts.
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  formatRbdLocation,
  listLocations,
  monitorAddress,
  mustFlatten,
  parseRbdLocation,
  qemuImgImportArgs,
  RbdBackend,
  type RbdExec,
  rbdConnection,
  sizeArg,
} from './rbd.ts';

const GiB = 2 ** 30;
const FSID = '35e95e96-b269-4e8b-af98-1b9aca7d5c48';
const KEY = 'AQAM/BFrTelIDxAAmC1rL/0ir+bown5Wgc2E4g==';
const UID = '0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0';
const ref = (id: string) => ({ id, name: 'v', namespace: 'ns' });

interface Img {
  size: number;
  parent?: { pool: string; image: string; snapshot: string };
  snaps: Map<string, { size: number; protected: boolean }>;
}

/** A model of the rbd CLI subcommands the backend uses (one pool namespace per pool). */
function fakeRbd() {
  const images = new Map<string, Img>();
  const calls: string[][] = [];
  const notFound = (what: string) =>
    Object.assign(new Error(`rbd: error opening image ${what}: (2) No such file or directory`), {
      stderr: `rbd: error opening image ${what}: (2) No such file or directory`,
    });
  const split = (spec: string) => {
    const [pi, snap] = spec.split('@') as [string, string | undefined];
    return { key: pi, snap };
  };
  const children = (key: string, snap: string) =>
    [...images].filter(
      ([, i]) => i.parent && `${i.parent.pool}/${i.parent.image}` === key && i.parent.snapshot === snap,
    );
  const exec: RbdExec = async (file, argv) => {
    calls.push([file, ...argv]);
    const i = argv.indexOf('--keyring');
    const args = argv.slice(i + 2).filter((a) => a !== '--no-progress');
    while (args[0]?.startsWith('--') && args[0].endsWith('timeout')) args.splice(0, 2);
    const fmt = args.indexOf('--format');
    if (fmt >= 0) args.splice(fmt, 2);
    const out = (v: unknown) => ({ stdout: JSON.stringify(v), stderr: '' });
    if (file === 'ceph') return out({ fsid: FSID });
    if (file === 'qemu-img') return out({});
    const [cmd, ...rest] = args;
    const get = (spec: string) => {
      const img = images.get(split(spec).key);
      if (!img) throw notFound(spec);
      return img;
    };
    const bytes = (s: string) => Number.parseInt(s, 10) * 1048576;
    switch (cmd) {
      case 'info': {
        const img = get(rest[0]!);
        return out({
          name: split(rest[0]!).key.split('/')[1],
          size: img.size,
          ...(img.parent ? { parent: img.parent } : {}),
        });
      }
      case 'du': {
        const img = get(rest[0]!);
        return out({ images: [{ name: split(rest[0]!).key.split('/')[1], used_size: img.size / 2 }] });
      }
      case 'create':
        images.set(rest[2]!, { size: bytes(rest[1]!), snaps: new Map() });
        return out({});
      case 'resize':
        get(rest[2]!).size = bytes(rest[1]!);
        return out({});
      case 'clone': {
        const { key, snap } = split(rest[0]!);
        const s = get(key).snaps.get(snap!);
        if (!s?.protected) throw new Error('clone of an unprotected snapshot');
        const [pool, image] = key.split('/') as [string, string];
        images.set(rest[1]!, { size: s.size, parent: { pool, image, snapshot: snap! }, snaps: new Map() });
        return out({});
      }
      case 'flatten':
        delete get(rest[0]!).parent;
        return out({});
      case 'rename': {
        const img = get(rest[0]!);
        images.delete(rest[0]!);
        images.set(rest[1]!, img);
        for (const c of images.values())
          if (c.parent && `${c.parent.pool}/${c.parent.image}` === rest[0]) c.parent.image = rest[1]!.split('/')[1]!;
        return out({});
      }
      case 'rm': {
        const img = get(rest[0]!);
        if (img.snaps.size > 0) throw new Error('rbd: image has snapshots');
        images.delete(rest[0]!);
        return out({});
      }
      case 'children': {
        const { key, snap } = split(rest[0]!);
        return out(children(key, snap!).map(([k]) => ({ pool: k.split('/')[0], image: k.split('/')[1] })));
      }
      case 'ls': {
        const pool = rest[rest.length - 1]!;
        const rows: unknown[] = [];
        for (const [k, img] of images) {
          if (!k.startsWith(`${pool}/`)) continue;
          const image = k.slice(pool.length + 1);
          rows.push({ image, size: img.size });
          for (const s of img.snaps.keys()) rows.push({ image, snapshot: s, size: img.size });
        }
        return out(rows);
      }
      case 'snap': {
        const [sub, spec] = rest as [string, string];
        const { key, snap } = split(spec);
        const img = get(key);
        if (sub === 'ls')
          return out([...img.snaps].map(([name, s]) => ({ name, size: s.size, protected: String(s.protected) })));
        const s = img.snaps.get(snap!);
        if (sub === 'create') img.snaps.set(snap!, { size: img.size, protected: false });
        else if (sub === 'protect') s!.protected = true;
        else if (sub === 'unprotect') {
          if (children(key, snap!).length > 0) throw new Error('snapshot has children');
          s!.protected = false;
        } else if (sub === 'rm') {
          if (s?.protected) throw new Error('snapshot is protected');
          img.snaps.delete(snap!);
        }
        return out({});
      }
    }
    throw new Error(`fake rbd: unexpected ${args.join(' ')}`);
  };
  return { images, calls, exec };
}

let dirs: string[] = [];
afterEach(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
  dirs = [];
});

function backend(maxCloneDepth?: number) {
  const fake = fakeRbd();
  const tmpDir = mkdtempSync(path.join(tmpdir(), 'rbd-unit-'));
  dirs.push(tmpDir);
  const b = new RbdBackend({
    pool: 'volumes',
    user: 'stratus',
    key: KEY,
    monitors: ['10.0.0.1:3300', '[fd00::1]:6789'],
    exec: fake.exec,
    tmpDir,
    maxCloneDepth,
  });
  return { b, fake, tmpDir };
}

describe('rbd locations', () => {
  it('parses and formats volume and snapshot locations', () => {
    const v = `rbd://${FSID}/volumes/volume-${UID}`;
    expect(parseRbdLocation(v)).toEqual({ fsid: FSID, pool: 'volumes', image: `volume-${UID}` });
    const s = `${v}@snapshot-${UID}`;
    expect(parseRbdLocation(s).snapshot).toBe(`snapshot-${UID}`);
    expect(formatRbdLocation(parseRbdLocation(s))).toBe(s);
  });
  it('refuses other schemes, missing parts and odd names', () => {
    for (const bad of [
      `local://n1/${UID}`,
      `rbd://${FSID}/volumes`,
      `rbd://${FSID}/vol umes/x`,
      `rbd://${FSID}/volumes/x@a@b`,
      `rbd://${FSID}/volumes/x;rm`,
    ])
      expect(() => parseRbdLocation(bad), bad).toThrow(/not an rbd location/);
  });
  it('lists volumes and user snapshots, not scratch images or clone snapshots', () => {
    const rows = [
      { image: `volume-${UID}` },
      { image: `volume-${UID}`, snapshot: 'snapshot-a1' },
      { image: `volume-${UID}`, snapshot: 'volume-b2.clone_snap' },
      { image: 'volume-b2.creating' },
      { image: 'volume-c3.deleted' },
      { image: 'volume-c3.deleted', snapshot: 'snapshot-d4' },
      { image: 'unrelated' },
    ];
    expect(listLocations(FSID, 'volumes', rows)).toEqual({
      volumes: [`rbd://${FSID}/volumes/volume-${UID}`],
      snapshots: [`rbd://${FSID}/volumes/volume-${UID}@snapshot-a1`, `rbd://${FSID}/volumes/volume-c3@snapshot-d4`],
    });
  });
});

describe('rbd decisions and argv', () => {
  it('flattens a clone that would be deeper than maxCloneDepth (Cinder rbd_max_clone_depth)', () => {
    expect(mustFlatten(0, 5)).toBe(false);
    expect(mustFlatten(4, 5)).toBe(false);
    expect(mustFlatten(5, 5)).toBe(true);
    expect(mustFlatten(0, 0)).toBe(true);
  });
  it('parses monitor addresses into QAPI InetSocketAddressBase (port as a string)', () => {
    expect(monitorAddress('10.0.0.1:3300')).toEqual({ host: '10.0.0.1', port: '3300' });
    expect(monitorAddress('[fd00::1]:6789')).toEqual({ host: 'fd00::1', port: '6789' });
    expect(monitorAddress('mon1')).toEqual({ host: 'mon1', port: '3300' });
    expect(() => monitorAddress('a:b:c')).toThrow(/host:port/);
  });
  it('rounds sizes up to MiB', () => {
    expect(sizeArg(GiB)).toBe('1024M');
    expect(sizeArg(1)).toBe('1M');
  });
  it('converts an image sparsely into an existing RBD image, the key through a secret file', () => {
    const args = qemuImgImportArgs('/cache/img', 'qcow2', 'driver=raw,file.driver=rbd', '/tmp/k');
    expect(args).toEqual([
      'convert',
      '-f',
      'qcow2',
      '-n',
      '--target-is-zero',
      '--object',
      'secret,id=s0,file=/tmp/k/key,format=base64',
      '--target-image-opts',
      '/cache/img',
      'driver=raw,file.driver=rbd',
    ]);
  });
  it('builds the QEMU connection with the secret object named after the serial', () => {
    const c = rbdConnection(
      UID,
      parseRbdLocation(`rbd://${FSID}/volumes/volume-${UID}`),
      'stratus',
      ['10.0.0.1:3300'],
      KEY,
    );
    expect(c).toEqual({
      volumeId: UID,
      serial: '0f1e2d3c4b5a69788796',
      blockdev: {
        driver: 'raw',
        file: {
          driver: 'rbd',
          pool: 'volumes',
          image: `volume-${UID}`,
          user: 'stratus',
          server: [{ host: '10.0.0.1', port: '3300' }],
          'key-secret': 'sec0f1e2d3c4b5a69788796',
          'auth-client-required': ['cephx'],
        },
      },
      objects: [{ 'qom-type': 'secret', id: 'sec0f1e2d3c4b5a69788796', data: KEY, format: 'base64' }],
    });
  });
});

describe('RbdBackend against a model of the rbd CLI', () => {
  it('passes monitors and user as arguments and the key only in a 0600 keyring file', async () => {
    const { b, fake, tmpDir } = backend();
    await b.create(ref(UID), GiB, { kind: 'blank' });
    for (const c of fake.calls) expect(c.join(' ')).not.toContain(KEY);
    const first = fake.calls.find((c) => c[0] === 'rbd')!;
    expect(first.slice(1, 7)).toEqual(['--conf', '/dev/null', '-m', '10.0.0.1:3300,[fd00::1]:6789', '--id', 'stratus']);
    expect(first.slice(9, 11)).toEqual(['--client-mount-timeout', '30']);
    const [kd] = readdirSync(tmpDir);
    const keyring = path.join(tmpDir, kd!, 'keyring');
    expect(readFileSync(keyring, 'utf8')).toContain(`key = ${KEY}`);
    expect(statSync(keyring).mode & 0o777).toBe(0o600);
    await b.close();
    expect(readdirSync(tmpDir)).toEqual([]);
  });

  it('creates a blank volume under a scratch name and renames it; a repeat changes nothing', async () => {
    const { b, fake } = backend();
    const v = await b.create(ref(UID), GiB, { kind: 'blank' });
    expect(v).toEqual({ location: `rbd://${FSID}/volumes/volume-${UID}`, sizeBytes: GiB, allocatedBytes: GiB / 2 });
    const cmds = fake.calls.map((c) => c.slice(c.indexOf('--client-mount-timeout') + 2).join(' '));
    expect(cmds).toContain(`create --size 1024M volumes/volume-${UID}.creating`);
    expect(cmds).toContain(`rename volumes/volume-${UID}.creating volumes/volume-${UID}`);
    const n = fake.calls.length;
    expect(await b.create(ref(UID), GiB, { kind: 'blank' })).toEqual(v);
    expect(fake.calls.slice(n).some((c) => c.includes('create'))).toBe(false);
    expect([...fake.images.keys()]).toEqual([`volumes/volume-${UID}`]);
  });

  it('removes a scratch image left by a killed create before starting again', async () => {
    const { b, fake } = backend();
    fake.images.set(`volumes/volume-${UID}.creating`, { size: 5, snaps: new Map() });
    await b.create(ref(UID), GiB, { kind: 'blank' });
    expect([...fake.images.keys()]).toEqual([`volumes/volume-${UID}`]);
    expect(fake.images.get(`volumes/volume-${UID}`)!.size).toBe(GiB);
  });

  it('clones from a protected snapshot and flattens past maxCloneDepth', async () => {
    const { b, fake } = backend(2);
    let src = (await b.create(ref('a0'), GiB, { kind: 'blank' })).location;
    const depths: boolean[] = [];
    for (let i = 1; i <= 4; i++) {
      const s = await b.createSnapshot(src, ref(`s${i}`));
      expect(fake.images.get(`volumes/volume-${i === 1 ? 'a0' : `a${i - 1}`}`)!.snaps.get(`snapshot-s${i}`)).toEqual({
        size: i === 1 ? GiB : 2 * GiB,
        protected: true,
      });
      src = (await b.create(ref(`a${i}`), 2 * GiB, { kind: 'snapshot', location: s.location })).location;
      depths.push(fake.images.get(`volumes/volume-a${i}`)!.parent !== undefined);
      expect(fake.images.get(`volumes/volume-a${i}`)!.size).toBe(2 * GiB);
    }
    // a1 (depth 1), a2 (depth 2) stay clones; a3 would be 3 > 2: flattened; a4 clones the flat a3 again.
    expect(depths).toEqual([true, true, false, true]);
  });

  it('clones a volume Cinder-style and cleans the clone snapshot when the clone goes', async () => {
    const { b, fake } = backend();
    const a = await b.create(ref('a0'), GiB, { kind: 'blank' });
    const c = await b.create(ref('c0'), GiB, { kind: 'volume', location: a.location });
    expect([...fake.images.get('volumes/volume-a0')!.snaps.keys()]).toEqual(['volume-c0.clone_snap']);
    expect(fake.images.get('volumes/volume-c0')!.parent).toEqual({
      pool: 'volumes',
      image: 'volume-a0',
      snapshot: 'volume-c0.clone_snap',
    });
    // The source is deleted while the clone lives: renamed .deleted, out of list(), removed with the clone.
    await b.delete(a.location);
    expect([...fake.images.keys()].sort()).toEqual(['volumes/volume-a0.deleted', 'volumes/volume-c0']);
    expect((await b.list()).volumes).toEqual([c.location]);
    await b.delete(c.location);
    expect([...fake.images.keys()]).toEqual([]);
    await b.delete(c.location); // idempotent
  });

  it('a full copy when cloning is disabled (maxCloneDepth 0) leaves no snapshot on the source', async () => {
    const { b, fake } = backend(0);
    const a = await b.create(ref('a0'), GiB, { kind: 'blank' });
    await b.create(ref('c0'), GiB, { kind: 'volume', location: a.location });
    expect(fake.images.get('volumes/volume-a0')!.snaps.size).toBe(0);
    expect(fake.images.get('volumes/volume-c0')!.parent).toBeUndefined();
  });

  it('deleting a snapshot flattens its clones first; a .deleted volume goes with its last snapshot', async () => {
    const { b, fake } = backend();
    const a = await b.create(ref('a0'), GiB, { kind: 'blank' });
    const s = await b.createSnapshot(a.location, ref('s1'));
    expect(await b.createSnapshot(a.location, ref('s1'))).toEqual(s); // idempotent
    await b.create(ref('c0'), GiB, { kind: 'snapshot', location: s.location });
    await b.delete(a.location);
    expect(fake.images.has('volumes/volume-a0.deleted')).toBe(true);
    expect((await b.list()).snapshots).toEqual([s.location]);
    await b.deleteSnapshot(s.location);
    expect(fake.images.get('volumes/volume-c0')!.parent).toBeUndefined();
    expect([...fake.images.keys()]).toEqual(['volumes/volume-c0']);
    await b.deleteSnapshot(s.location); // idempotent
  });

  it('extends, never shrinks', async () => {
    const { b } = backend();
    const a = await b.create(ref('a0'), GiB, { kind: 'blank' });
    expect((await b.extend(a.location, 2 * GiB)).sizeBytes).toBe(2 * GiB);
    expect((await b.extend(a.location, 2 * GiB)).sizeBytes).toBe(2 * GiB);
    await expect(b.extend(a.location, GiB)).rejects.toThrow(RangeError);
    expect(await b.inspect(`rbd://${FSID}/volumes/volume-nope`)).toBeUndefined();
  });

  it('refuses a source in another cluster', async () => {
    const { b } = backend();
    const other = `rbd://00000000-0000-0000-0000-000000000000/volumes/volume-x@snapshot-y`;
    await expect(b.create(ref('a0'), GiB, { kind: 'snapshot', location: other })).rejects.toThrow(/another Ceph/);
  });

  it('imports an image through qemu-img into the scratch image, at least the image size', async () => {
    const { b, fake } = backend();
    const image = { key: 'k', path: '/cache/k', format: 'qcow2' as const, virtualSize: 2 * GiB, size: 1, sha256: 'x' };
    await b.create(ref('a0'), GiB, { kind: 'image', image });
    const q = fake.calls.find((c) => c[0] === 'qemu-img')!;
    expect(q.at(-2)).toBe('/cache/k');
    expect(q.at(-1)).toBe(
      'driver=raw,file.driver=rbd,file.pool=volumes,file.image=volume-a0.creating,file.user=stratus,file.key-secret=s0,file.server.0.host=10.0.0.1,file.server.0.port=3300,file.server.1.host=fd00::1,file.server.1.port=6789',
    );
    expect(fake.images.get('volumes/volume-a0')!.size).toBe(2 * GiB);
  });

  it('probe names the missing rbd CLI and the unreachable cluster', async () => {
    const enoent: RbdExec = async () => {
      throw Object.assign(new Error('spawn rbd ENOENT'), { code: 'ENOENT' });
    };
    const tmpDir = mkdtempSync(path.join(tmpdir(), 'rbd-unit-'));
    dirs.push(tmpDir);
    const opts = { pool: 'volumes', user: 'stratus', key: KEY, monitors: ['10.0.0.1:3300'], tmpDir };
    expect(await new RbdBackend({ ...opts, exec: enoent }).probe()).toEqual({
      ok: false,
      reason: 'the rbd CLI is not installed: install ceph-common',
    });
    const timeout: RbdExec = async () => {
      throw new Error('rbd ls: (110) Connection timed out');
    };
    const p = await new RbdBackend({ ...opts, exec: timeout }).probe();
    expect(p.reason).toMatch(/Ceph cluster at 10.0.0.1:3300 does not answer for client.stratus on pool volumes/);
    const ok = fakeRbd();
    const noModule = await new RbdBackend({ ...opts, exec: ok.exec, qemuModuleDirs: [tmpDir] }).probe();
    expect(noModule).toEqual({
      ok: false,
      reason: 'QEMU has no rbd block driver (block-rbd.so): install qemu-block-extra',
    });
  });
});
