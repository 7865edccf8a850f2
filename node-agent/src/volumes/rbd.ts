// The rbd volume backend: volumes, snapshots and clones as Ceph RBD images, snapshots and copy-on-write clones, with
// the semantics of Cinder's RBD driver (storage.md §4.2, §8.4; docs/design/storage.md "Backend: rbd (Ceph)").
//
//  - Volume `volume-<uid>` in the VolumeType's pool, snapshot `snapshot-<snapuid>` (created, then protected);
//    location `rbd://<fsid>/<pool>/volume-<uid>[@snapshot-<snapuid>]`.
//  - Creation is atomic: the image is built as `volume-<uid>.creating` and renamed when complete; a retry removes a
//    leftover `.creating` image first.
//  - From an image: the cached file is converted to raw straight into the RBD image (qemu-img convert -n
//    --target-is-zero: sparse). From a snapshot: a clone of the protected snapshot. From a volume: Cinder's way, a
//    snapshot `volume-<new>.clone_snap` of the source and a clone of it. A clone whose chain would exceed
//    maxCloneDepth (rbd_max_clone_depth, 5) is flattened before it is published (and its clone_snap removed).
//  - Delete: an image whose snapshots still have clones (or user snapshots) is renamed `volume-<uid>.deleted`
//    (Cinder) and removed when its last snapshot goes; removing a clone removes its parent's `.clone_snap` and a
//    `.deleted` parent left without snapshots.
//  - deleteSnapshot of a snapshot with clones flattens the clones first (they become independent images).
//
// Every call is the `rbd`/`ceph`/`qemu-img` CLI with an argument array and `--format json`. The monitors and the user
// go as arguments; the key only in a keyring file (mode 0600, in a private temporary directory), never on a command
// line or in a log.
import { execFile } from 'node:child_process';
import { access, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import type { VolumeConnection } from '../driver.ts';
import { volumeSerial } from '../driver.ts';
import type {
  BackendProbe,
  ProvisionedSnapshot,
  ProvisionedVolume,
  SnapshotRef,
  VolumeBackend,
  VolumeRef,
  VolumeSourceSpec,
} from './backend.ts';

export interface ExecResult {
  stdout: string;
  stderr: string;
}
/** Runs a program with an argument array; rejects with an error carrying `stderr` and `code` on failure. */
export type RbdExec = (file: string, args: readonly string[], opts?: { timeoutMs?: number }) => Promise<ExecResult>;

/** Directories QEMU loads its block modules from (block-rbd.so comes with qemu-block-extra). */
export function rbdModuleDirs(): string[] {
  return [
    ...(process.env.QEMU_MODULE_DIR ? [process.env.QEMU_MODULE_DIR] : []),
    '/usr/lib/x86_64-linux-gnu/qemu',
    '/usr/lib/aarch64-linux-gnu/qemu',
    '/usr/lib64/qemu',
    '/usr/lib/qemu',
  ];
}

export interface RbdBackendOptions {
  pool: string;
  user: string;
  /** base64 cephx key of client.<user>. */
  key: string;
  /** "host:port" of each monitor. */
  monitors: string[];
  /** Cluster fsid; discovered with `ceph fsid` when absent. */
  fsid?: string;
  /** Nested clones before a flatten (Cinder rbd_max_clone_depth); 0 disables cloning (full copies). Default 5. */
  maxCloneDepth?: number;
  exec?: RbdExec;
  /** Where the private keyring directory is made (default os.tmpdir()). */
  tmpDir?: string;
  /** Directories QEMU loads block modules from (probe looks for block-rbd.so). */
  qemuModuleDirs?: string[];
}

export interface RbdLocation {
  fsid: string;
  pool: string;
  image: string;
  snapshot?: string;
}

const NAME = /^[A-Za-z0-9_.-]+$/;

/** Parses `rbd://<fsid>/<pool>/<image>[@<snapshot>]`; throws on anything else. */
export function parseRbdLocation(location: string): RbdLocation {
  const m = /^rbd:\/\/([0-9a-fA-F-]+)\/([^/@]+)\/([^/@]+)(?:@([^/@]+))?$/.exec(location);
  if (!m) throw new Error(`not an rbd location: ${location}`);
  const [, fsid, pool, image, snapshot] = m as unknown as [string, string, string, string, string | undefined];
  for (const n of [pool, image, ...(snapshot ? [snapshot] : [])])
    if (!NAME.test(n)) throw new Error(`not an rbd location: ${location}`);
  return snapshot ? { fsid, pool, image, snapshot } : { fsid, pool, image };
}

export function formatRbdLocation(l: RbdLocation): string {
  return `rbd://${l.fsid}/${l.pool}/${l.image}${l.snapshot ? `@${l.snapshot}` : ''}`;
}

export const volumeImage = (uid: string) => `volume-${uid}`;
export const snapshotName = (uid: string) => `snapshot-${uid}`;
const CREATING = '.creating';
const DELETED = '.deleted';
const CLONE_SNAP = '.clone_snap';

/**
 * Whether a new clone of an image whose own clone chain is `parentDepth` deep must be flattened: the clone would be
 * parentDepth + 1 deep, more than maxCloneDepth (Cinder: depth == rbd_max_clone_depth → flatten). 0 disables cloning.
 */
export function mustFlatten(parentDepth: number, maxCloneDepth: number): boolean {
  return maxCloneDepth <= 0 || parentDepth + 1 > maxCloneDepth;
}

/** `host:port` (IPv6 as `[addr]:port`) → QEMU's InetSocketAddressBase (port is a string in the QAPI schema). */
export function monitorAddress(mon: string): { host: string; port: string } {
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(mon) ?? /^([^:]+):(\d+)$/.exec(mon);
  if (m) return { host: m[1] as string, port: m[2] as string };
  if (/^[^:]+$/.test(mon)) return { host: mon, port: '3300' };
  throw new Error(`monitor address ${mon}: expected host:port`);
}

/** The bytes rbd --size is given: MiB, rounded up. */
export function sizeArg(bytes: number): string {
  return `${Math.ceil(bytes / 1048576)}M`;
}

interface RbdInfo {
  name: string;
  size: number;
  parent?: { pool: string; image: string; snapshot: string };
}
interface RbdSnap {
  name: string;
  size: number;
  protected: string;
}
interface RbdChild {
  pool: string;
  image: string;
}

function isNotFound(e: unknown): boolean {
  const err = e as { code?: unknown; stderr?: string; message?: string };
  return /\(2\) No such file or directory/.test(`${err.stderr ?? ''}\n${err.message ?? ''}`);
}

const defaultExec: RbdExec = (file, args, opts = {}) =>
  new Promise((resolve, reject) => {
    execFile(
      file,
      args,
      { encoding: 'utf8', timeout: opts.timeoutMs ?? 600_000, maxBuffer: 64 << 20 },
      (err, stdout, stderr) => {
        if (err) {
          const last = (stderr || '').trim().split('\n').slice(-3).join('; ');
          // The command without the connection arguments (short, and no paths of key files).
          const k = args.indexOf('--keyring');
          const cmd = (k >= 0 ? args.slice(k + 2) : args)
            .filter((a) => !a.includes('key'))
            .slice(0, 4)
            .join(' ');
          const e = new Error(`${path.basename(file)} ${cmd}: ${last || err.message}`);
          Object.assign(e, { stderr, code: (err as { code?: unknown }).code });
          reject(e);
        } else resolve({ stdout, stderr });
      },
    );
  });

export class RbdBackend implements VolumeBackend {
  readonly name = 'rbd';
  readonly pool: string;
  readonly user: string;
  readonly monitors: string[];
  readonly maxCloneDepth: number;
  private readonly key: string;
  private readonly exec: RbdExec;
  private readonly tmpBase: string;
  private readonly moduleDirs: string[];
  private fsid: string | undefined;
  private keyDir: Promise<string> | undefined;

  constructor(opts: RbdBackendOptions) {
    if (!NAME.test(opts.pool)) throw new Error(`rbd pool name ${opts.pool} is not valid`);
    if (!NAME.test(opts.user)) throw new Error(`rbd user ${opts.user} is not valid`);
    if (opts.monitors.length === 0) throw new Error('rbd: no monitors');
    for (const m of opts.monitors) monitorAddress(m);
    this.pool = opts.pool;
    this.user = opts.user;
    this.key = opts.key;
    this.monitors = opts.monitors;
    this.fsid = opts.fsid;
    this.maxCloneDepth = opts.maxCloneDepth ?? 5;
    this.exec = opts.exec ?? defaultExec;
    this.tmpBase = opts.tmpDir ?? tmpdir();
    this.moduleDirs = opts.qemuModuleDirs ?? rbdModuleDirs();
  }

  /** The private directory with `keyring` (for rbd/ceph) and `key` (for qemu-img's secret object), mode 0600. */
  private keyFiles(): Promise<string> {
    this.keyDir ??= (async () => {
      const dir = await mkdtemp(path.join(this.tmpBase, 'stratus-rbd-'));
      await writeFile(path.join(dir, 'keyring'), `[client.${this.user}]\n\tkey = ${this.key}\n`, { mode: 0o600 });
      await writeFile(path.join(dir, 'key'), this.key, { mode: 0o600 });
      return dir;
    })();
    return this.keyDir;
  }

  /** Removes the key files (the backend makes them again when used). */
  async close(): Promise<void> {
    const dir = this.keyDir;
    this.keyDir = undefined;
    if (dir) await rm(await dir, { recursive: true, force: true });
  }

  /**
   * The connection arguments every rbd/ceph call starts with (no key: a keyring file). An unreachable cluster fails
   * the call after mountTimeoutS instead of hanging.
   */
  async clientArgs(mountTimeoutS = 30): Promise<string[]> {
    const dir = await this.keyFiles();
    return [
      '--conf',
      '/dev/null',
      '-m',
      this.monitors.join(','),
      '--id',
      this.user,
      '--keyring',
      path.join(dir, 'keyring'),
      '--client-mount-timeout',
      String(mountTimeoutS),
    ];
  }

  private async rbd(args: readonly string[], timeoutMs?: number): Promise<string> {
    return (await this.exec('rbd', [...(await this.clientArgs()), ...args], { timeoutMs })).stdout;
  }

  private async rbdJson<T>(args: readonly string[]): Promise<T> {
    return JSON.parse(await this.rbd([...args, '--format', 'json'])) as T;
  }

  async getFsid(): Promise<string> {
    if (!this.fsid) {
      const out = await this.exec('ceph', [...(await this.clientArgs()), 'fsid', '--format', 'json']);
      this.fsid = (JSON.parse(out.stdout) as { fsid: string }).fsid;
    }
    return this.fsid;
  }

  private spec(pool: string, image: string, snap?: string): string {
    return `${pool}/${image}${snap ? `@${snap}` : ''}`;
  }

  private async info(pool: string, image: string): Promise<RbdInfo | undefined> {
    try {
      return await this.rbdJson<RbdInfo>(['info', this.spec(pool, image)]);
    } catch (e) {
      if (isNotFound(e)) return undefined;
      throw e;
    }
  }

  private async snaps(pool: string, image: string): Promise<RbdSnap[]> {
    return this.rbdJson<RbdSnap[]>(['snap', 'ls', this.spec(pool, image)]);
  }

  private async children(pool: string, image: string, snap: string): Promise<RbdChild[]> {
    return this.rbdJson<RbdChild[]>(['children', this.spec(pool, image, snap)]);
  }

  /** Number of parents above an image (0: not a clone). */
  async cloneDepth(pool: string, image: string): Promise<number> {
    let depth = 0;
    let cur = await this.info(pool, image);
    while (cur?.parent) {
      depth++;
      if (depth > 64) throw new Error(`rbd: clone chain of ${pool}/${image} too deep`);
      cur = await this.info(cur.parent.pool, cur.parent.image);
    }
    return depth;
  }

  /** The image a location names, or its `.deleted` rename when only that exists. */
  private async resolveImage(l: RbdLocation): Promise<{ image: string; info: RbdInfo } | undefined> {
    for (const image of [l.image, `${l.image}${DELETED}`]) {
      const info = await this.info(l.pool, image);
      if (info) return { image, info };
    }
    return undefined;
  }

  private async checkFsid(l: RbdLocation): Promise<void> {
    const fsid = await this.getFsid();
    if (l.fsid !== fsid) throw new Error(`rbd location ${formatRbdLocation(l)} is in another Ceph cluster (${fsid})`);
  }

  private async provisioned(pool: string, image: string, info: RbdInfo): Promise<ProvisionedVolume> {
    const location = formatRbdLocation({ fsid: await this.getFsid(), pool, image });
    let allocatedBytes: number | undefined;
    try {
      const du = await this.rbdJson<{ images?: { name: string; used_size: number; snapshot?: string }[] }>([
        'du',
        this.spec(pool, image),
      ]);
      const row = du.images?.find((i) => i.name === image && !i.snapshot);
      allocatedBytes = row?.used_size;
    } catch {
      allocatedBytes = undefined;
    }
    return { location, sizeBytes: info.size, ...(allocatedBytes !== undefined ? { allocatedBytes } : {}) };
  }

  async probe(): Promise<BackendProbe> {
    const mons = this.monitors.join(',');
    try {
      await this.exec(
        'rbd',
        [
          ...(await this.clientArgs(10)),
          '--rados-mon-op-timeout',
          '10',
          '--rados-osd-op-timeout',
          '10',
          'ls',
          this.pool,
          '--format',
          'json',
        ],
        { timeoutMs: 30_000 },
      );
    } catch (e) {
      const err = e as { code?: unknown; message?: string };
      if (err.code === 'ENOENT') return { ok: false, reason: 'the rbd CLI is not installed: install ceph-common' };
      return {
        ok: false,
        reason: `Ceph cluster at ${mons} does not answer for client.${this.user} on pool ${this.pool}: ${err.message ?? String(e)}`,
      };
    }
    let module = false;
    for (const dir of this.moduleDirs) {
      try {
        await access(path.join(dir, 'block-rbd.so'));
        module = true;
        break;
      } catch {
        // not there
      }
    }
    if (!module) return { ok: false, reason: 'QEMU has no rbd block driver (block-rbd.so): install qemu-block-extra' };
    return { ok: true };
  }

  /** Removes an image and its snapshots that have no clones (used for `.creating` leftovers). */
  private async removeScratch(pool: string, image: string): Promise<void> {
    if (!(await this.info(pool, image))) return;
    for (const s of await this.snaps(pool, image)) {
      if (s.protected === 'true') await this.rbd(['snap', 'unprotect', this.spec(pool, image, s.name)]);
      await this.rbd(['snap', 'rm', this.spec(pool, image, s.name)]);
    }
    await this.rbd(['rm', this.spec(pool, image)]);
  }

  async create(vol: VolumeRef, sizeBytes: number, source: VolumeSourceSpec): Promise<ProvisionedVolume> {
    const pool = this.pool;
    const name = volumeImage(vol.id);
    const have = await this.info(pool, name);
    if (have) return this.provisioned(pool, name, have);
    const tmp = `${name}${CREATING}`;
    await this.removeScratch(pool, tmp);
    switch (source.kind) {
      case 'blank':
        await this.rbd(['create', '--size', sizeArg(sizeBytes), this.spec(pool, tmp)]);
        break;
      case 'image': {
        const img = source.image;
        await this.rbd(['create', '--size', sizeArg(Math.max(sizeBytes, img.virtualSize)), this.spec(pool, tmp)]);
        const dir = await this.keyFiles();
        await this.exec('qemu-img', qemuImgImportArgs(img.path, img.format, this.target(pool, tmp), dir), {
          timeoutMs: 3_600_000,
        });
        break;
      }
      case 'snapshot': {
        const l = parseRbdLocation(source.location);
        if (!l.snapshot) throw new Error(`${source.location} is not a snapshot location`);
        await this.checkFsid(l);
        const src = await this.resolveImage(l);
        if (!src) throw new Error(`rbd snapshot ${source.location} does not exist`);
        await this.cloneInto(l.pool, src.image, l.snapshot, pool, tmp, sizeBytes);
        break;
      }
      case 'volume': {
        const l = parseRbdLocation(source.location);
        await this.checkFsid(l);
        const src = await this.info(l.pool, l.image);
        if (!src) throw new Error(`rbd volume ${source.location} does not exist`);
        // Cinder create_cloned_volume: a snapshot of the source named after the new volume, and a clone of it.
        const snap = `${name}${CLONE_SNAP}`;
        const existing = (await this.snaps(l.pool, l.image)).find((s) => s.name === snap);
        if (!existing) await this.rbd(['snap', 'create', this.spec(l.pool, l.image, snap)]);
        if (existing?.protected !== 'true') await this.rbd(['snap', 'protect', this.spec(l.pool, l.image, snap)]);
        const flattened = await this.cloneInto(l.pool, l.image, snap, pool, tmp, sizeBytes);
        if (flattened) await this.removeSnapIfUnused(l.pool, l.image, snap);
        break;
      }
    }
    await this.rbd(['rename', this.spec(pool, tmp), this.spec(pool, name)]);
    const info = await this.info(pool, name);
    if (!info) throw new Error(`rbd: ${pool}/${name} vanished after its creation`);
    return this.provisioned(pool, name, info);
  }

  /** Clones pool/image@snap into destPool/dest, grows it to sizeBytes, flattens past maxCloneDepth. */
  private async cloneInto(
    pool: string,
    image: string,
    snap: string,
    destPool: string,
    dest: string,
    sizeBytes: number,
  ): Promise<boolean> {
    const depth = await this.cloneDepth(pool, image);
    await this.rbd(['clone', this.spec(pool, image, snap), this.spec(destPool, dest)]);
    const info = await this.info(destPool, dest);
    if (info && info.size < sizeBytes)
      await this.rbd(['resize', '--size', sizeArg(sizeBytes), this.spec(destPool, dest)]);
    if (mustFlatten(depth, this.maxCloneDepth)) {
      await this.rbd(['flatten', '--no-progress', this.spec(destPool, dest)], 3_600_000);
      return true;
    }
    return false;
  }

  /** qemu-img's --target-image-opts for an RBD image (key through the secret object `s0`). */
  private target(pool: string, image: string): string {
    const opts = [
      'driver=raw',
      'file.driver=rbd',
      `file.pool=${pool}`,
      `file.image=${image}`,
      `file.user=${this.user}`,
      'file.key-secret=s0',
    ];
    this.monitors.forEach((m, i) => {
      const a = monitorAddress(m);
      opts.push(`file.server.${i}.host=${a.host}`, `file.server.${i}.port=${a.port}`);
    });
    return opts.join(',');
  }

  async inspect(location: string): Promise<ProvisionedVolume | undefined> {
    const l = parseRbdLocation(location);
    const info = await this.info(l.pool, l.image);
    return info ? this.provisioned(l.pool, l.image, info) : undefined;
  }

  async extend(location: string, sizeBytes: number): Promise<ProvisionedVolume> {
    const l = parseRbdLocation(location);
    const info = await this.info(l.pool, l.image);
    if (!info) throw new Error(`rbd volume ${location} does not exist`);
    if (sizeBytes < info.size)
      throw new RangeError(`Invalid input: New size must be greater than current size (${info.size} bytes)`);
    if (sizeBytes > info.size) await this.rbd(['resize', '--size', sizeArg(sizeBytes), this.spec(l.pool, l.image)]);
    const now = await this.info(l.pool, l.image);
    return this.provisioned(l.pool, l.image, now ?? info);
  }

  async delete(location: string): Promise<void> {
    const l = parseRbdLocation(location);
    await this.removeScratch(l.pool, `${l.image}${CREATING}`);
    const info = await this.info(l.pool, l.image);
    if (!info) return;
    // Snapshots nobody needs go; user snapshots and snapshots with clones keep the image (renamed .deleted).
    let keep = false;
    for (const s of await this.snaps(l.pool, l.image)) {
      const children = await this.children(l.pool, l.image, s.name);
      if (children.length > 0 || !s.name.endsWith(CLONE_SNAP)) {
        keep = true;
        continue;
      }
      if (s.protected === 'true') await this.rbd(['snap', 'unprotect', this.spec(l.pool, l.image, s.name)]);
      await this.rbd(['snap', 'rm', this.spec(l.pool, l.image, s.name)]);
    }
    if (keep) {
      await this.rbd(['rename', this.spec(l.pool, l.image), this.spec(l.pool, `${l.image}${DELETED}`)]);
      return;
    }
    await this.rbd(['rm', '--no-progress', this.spec(l.pool, l.image)], 3_600_000);
    await this.releaseParent(info.parent);
  }

  /** After a clone went: drops its parent's `.clone_snap` and a `.deleted` parent left without snapshots. */
  private async releaseParent(parent: RbdInfo['parent']): Promise<void> {
    if (!parent) return;
    if (parent.snapshot.endsWith(CLONE_SNAP)) await this.removeSnapIfUnused(parent.pool, parent.image, parent.snapshot);
    await this.removeDeletedIfEmpty(parent.pool, parent.image);
  }

  private async removeSnapIfUnused(pool: string, image: string, snap: string): Promise<void> {
    const s = (await this.snaps(pool, image)).find((x) => x.name === snap);
    if (!s || (await this.children(pool, image, snap)).length > 0) return;
    if (s.protected === 'true') await this.rbd(['snap', 'unprotect', this.spec(pool, image, snap)]);
    await this.rbd(['snap', 'rm', this.spec(pool, image, snap)]);
  }

  private async removeDeletedIfEmpty(pool: string, image: string): Promise<void> {
    if (!image.endsWith(DELETED)) return;
    const info = await this.info(pool, image);
    if (!info || (await this.snaps(pool, image)).length > 0) return;
    await this.rbd(['rm', '--no-progress', this.spec(pool, image)], 3_600_000);
    await this.releaseParent(info.parent);
  }

  async createSnapshot(location: string, snap: SnapshotRef): Promise<ProvisionedSnapshot> {
    const l = parseRbdLocation(location);
    const info = await this.info(l.pool, l.image);
    if (!info) throw new Error(`rbd volume ${location} does not exist`);
    const name = snapshotName(snap.id);
    const existing = (await this.snaps(l.pool, l.image)).find((s) => s.name === name);
    if (!existing) await this.rbd(['snap', 'create', this.spec(l.pool, l.image, name)]);
    if (existing?.protected !== 'true') await this.rbd(['snap', 'protect', this.spec(l.pool, l.image, name)]);
    const s = (await this.snaps(l.pool, l.image)).find((x) => x.name === name);
    return {
      location: formatRbdLocation({ fsid: await this.getFsid(), pool: l.pool, image: l.image, snapshot: name }),
      sizeBytes: s?.size ?? info.size,
    };
  }

  async deleteSnapshot(location: string): Promise<void> {
    const l = parseRbdLocation(location);
    if (!l.snapshot) throw new Error(`${location} is not a snapshot location`);
    const src = await this.resolveImage(l);
    if (!src) return;
    const s = (await this.snaps(l.pool, src.image)).find((x) => x.name === l.snapshot);
    if (s) {
      // Clones of the snapshot become independent images first (storage.md §4.2: Cinder would refuse instead).
      for (const c of await this.children(l.pool, src.image, l.snapshot))
        await this.rbd(['flatten', '--no-progress', this.spec(c.pool, c.image)], 3_600_000);
      if (s.protected === 'true') await this.rbd(['snap', 'unprotect', this.spec(l.pool, src.image, l.snapshot)]);
      await this.rbd(['snap', 'rm', '--no-progress', this.spec(l.pool, src.image, l.snapshot)]);
    }
    await this.removeDeletedIfEmpty(l.pool, src.image);
  }

  async list(): Promise<{ volumes: string[]; snapshots: string[] }> {
    const fsid = await this.getFsid();
    const rows = await this.rbdJson<{ image: string; snapshot?: string }[]>(['ls', '-l', this.pool]);
    return listLocations(fsid, this.pool, rows);
  }

  async connection(vol: VolumeRef, location: string): Promise<VolumeConnection> {
    const l = parseRbdLocation(location);
    return rbdConnection(vol.id, l, this.user, this.monitors, this.key);
  }
}

/** Volume and snapshot locations from `rbd ls -l --format json` rows (scratch images left out). */
export function listLocations(
  fsid: string,
  pool: string,
  rows: readonly { image: string; snapshot?: string }[],
): { volumes: string[]; snapshots: string[] } {
  const vol = /^volume-[0-9a-fA-F-]+$/;
  const volumes: string[] = [];
  const snapshots: string[] = [];
  for (const r of rows) {
    if (r.snapshot === undefined) {
      if (vol.test(r.image)) volumes.push(formatRbdLocation({ fsid, pool, image: r.image }));
      continue;
    }
    if (!r.snapshot.startsWith('snapshot-')) continue;
    // A snapshot of a volume deleted meanwhile still answers to its original location.
    const image = r.image.endsWith(DELETED) ? r.image.slice(0, -DELETED.length) : r.image;
    if (vol.test(image)) snapshots.push(formatRbdLocation({ fsid, pool, image, snapshot: r.snapshot }));
  }
  return { volumes, snapshots };
}

/** qemu-img convert arguments writing a cached image file into an existing (zero) RBD image, sparse. */
export function qemuImgImportArgs(file: string, format: string, target: string, keyDir: string): string[] {
  return [
    'convert',
    '-f',
    format,
    '-n',
    '--target-is-zero',
    '--object',
    `secret,id=s0,file=${path.join(keyDir, 'key')},format=base64`,
    '--target-image-opts',
    file,
    target,
  ];
}

/** What QEMU opens (blockdev-add) for an RBD volume: raw over the rbd protocol, the key in a secret object. */
export function rbdConnection(
  volumeId: string,
  l: RbdLocation,
  user: string,
  monitors: readonly string[],
  key: string,
): VolumeConnection {
  const serial = volumeSerial(volumeId);
  const secret = `sec${serial}`;
  return {
    volumeId,
    serial,
    blockdev: {
      driver: 'raw',
      file: {
        driver: 'rbd',
        pool: l.pool,
        image: l.image,
        ...(l.snapshot ? { snapshot: l.snapshot } : {}),
        user,
        server: monitors.map(monitorAddress),
        'key-secret': secret,
        'auth-client-required': ['cephx'],
      },
    },
    objects: [{ 'qom-type': 'secret', id: secret, data: key, format: 'base64' }],
    ...(l.snapshot ? { readOnly: true } : {}),
  };
}
