// The `local` volume backend (Cinder's volume driver for node-local qcow2 files; storage.md §8.2). The default.
//
//   <stateDir>/volumes/<uid>.qcow2               a volume        local://<node>/<uid>
//   <stateDir>/volumes/snapshots/<snapuid>.qcow2 a snapshot      local://<node>/snapshots/<snapuid>
//   <stateDir>/volumes/snapshots/.<snapuid>.deleted   a deleted snapshot whose file still backs an in-use file
//
// Every backing reference is an absolute path (a file moved from volumes/ to snapshots/ keeps a valid backing file).
// A volume from an image is a qcow2 overlay on the image cache's file (storage.md §1.7); from a snapshot, an overlay on
// the snapshot's file; a clone is a full independent copy (`qemu-img convert`). A snapshot of a detached volume is a
// backing-chain point: the volume's file becomes the (read-only) snapshot and the volume a new overlay on it.
// Nothing here touches a file QEMU has open: qemu-img without -U fails on QEMU's write lock (storage.md §1.6), and that
// failure is turned into VolumeInUseError; only inspect() reads with -U. docs/design/storage.md "Backend: local".
import { chmod, chown, link, mkdir, readdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import type { VolumeConnection } from '../driver.ts';
import { volumeSerial } from '../driver.ts';
import { untraversable } from '../drivers/qemu/user.ts';
import { formatBytes } from '../images/cache.ts';
import {
  createAtomically,
  createBlankDisk,
  createRootDisk,
  DiskConflictError,
  growDisk,
  tempPathFor,
} from '../images/disks.ts';
import {
  backingFileOf,
  QemuImgError,
  type QemuImgInfo,
  qemuImg,
  qemuImgChain,
  qemuImgInfo,
} from '../images/qemuimg.ts';
import type {
  BackendProbe,
  ProvisionedSnapshot,
  ProvisionedVolume,
  SnapshotRef,
  VolumeBackend,
  VolumeRef,
  VolumeSourceSpec,
} from './backend.ts';

// --- locations (pure) ---

export type LocalLocation = { node: string; kind: 'volume' | 'snapshot'; id: string };

/** A Kubernetes node name (DNS subdomain). */
const NODE = /^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$/;
/** A uid as a file name: no dots, no slashes. */
const ID = /^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$/;

export function formatLocalLocation(l: LocalLocation): string {
  if (!NODE.test(l.node)) throw new Error(`local volume location: invalid node name ${JSON.stringify(l.node)}`);
  if (!ID.test(l.id)) throw new Error(`local volume location: invalid id ${JSON.stringify(l.id)}`);
  return l.kind === 'volume' ? `local://${l.node}/${l.id}` : `local://${l.node}/snapshots/${l.id}`;
}

/** Parses `local://<node>/<uid>` or `local://<node>/snapshots/<snapuid>`; anything else is an Error. */
export function parseLocalLocation(location: string): LocalLocation {
  const m = /^local:\/\/([^/]+)\/(?:(snapshots)\/)?([^/]+)$/.exec(location);
  if (!m || !NODE.test(m[1] ?? '') || !ID.test(m[3] ?? '')) {
    throw new Error(
      `${JSON.stringify(location)} is not a local volume location (local://<node>/<uid> or local://<node>/snapshots/<uid>)`,
    );
  }
  return { node: m[1] as string, kind: m[2] ? 'snapshot' : 'volume', id: m[3] as string };
}

// --- chain planning (pure) ---

/** A backing file below a volume, as `qemu-img info --backing-chain` lists it (youngest first). */
export interface ChainLink {
  path: string;
  format: string;
  /** A snapshot file of this backend (counts towards the depth); else an image cache file (the base). */
  snapshot: boolean;
}

/**
 * Bounds a volume's chain before a snapshot is added: `chain` is the volume's backing files, youngest first. After
 * the snapshot the volume's chain holds one more snapshot; when that would exceed `max`, the volume is rebased
 * (safe rebase: the data of the snapshots it skips is copied into the volume file) onto the backing file returned,
 * which keeps the oldest max-1 snapshots in its chain (null: no backing file at all). undefined: nothing to do.
 * Snapshot files are never rewritten for this, so every snapshot keeps its data and its own chain.
 */
export function planDepth(
  chain: readonly ChainLink[],
  max: number,
): { path: string; format: string } | null | undefined {
  if (!Number.isInteger(max) || max < 1)
    throw new RangeError(`maxSnapshotDepth must be a positive integer, got ${max}`);
  const k = chain.findIndex((l) => !l.snapshot);
  const snapshots = k === -1 ? chain.length : k;
  if (chain.slice(snapshots).some((l) => l.snapshot)) {
    throw new Error(`backing chain has a snapshot below a non-snapshot file: ${chain.map((l) => l.path).join(' → ')}`);
  }
  if (snapshots <= max - 1) return undefined;
  const to = chain[snapshots - max + 1];
  return to ? { path: to.path, format: to.format } : null;
}

// --- the backend ---

/** The volume is open in a QEMU (it holds the image's write lock, storage.md §1.6): the operation needs it detached. */
export class VolumeInUseError extends Error {
  override readonly name = 'VolumeInUseError';
}

/** The steps of createSnapshot, for tests that stop between them (as a killed agent would). */
export type SnapshotStep = 'rebased' | 'linked' | 'overlay-created' | 'renamed';

export interface LocalBackendOptions {
  /** The agent's state directory; volumes live in <stateDir>/volumes. */
  stateDir: string;
  /** This node's name (locations name it). */
  node: string;
  /** Most snapshots in a volume's backing chain (VolumeType local.maxSnapshotDepth; Cinder's rbd_max_clone_depth). */
  maxSnapshotDepth?: number;
  /** QEMU's user (--qemu-user): volume and snapshot files belong to it; directories let it through (o+x). */
  owner?: { uid: number; gid: number };
  /** Tests only: called after each step of createSnapshot; throwing there stops it as a kill would. */
  onSnapshotStep?: (step: SnapshotStep) => void | Promise<void>;
}

const isLocked = (err: unknown) => err instanceof QemuImgError && /Failed to get .*lock/i.test(err.stderr);
const sectors = (n: number) => Math.ceil(n / 512) * 512;

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    (err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return false;
      throw err;
    },
  );
}

async function statIfAny(path: string) {
  return stat(path).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return undefined;
    throw err;
  });
}

function checkSize(sizeBytes: number, what: string): void {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) {
    throw new RangeError(`${what}: size must be a positive integer of bytes, got ${sizeBytes}`);
  }
}

const FILE = /^([A-Za-z0-9][A-Za-z0-9_-]*)\.qcow2$/;
const HIDDEN = /^\.([A-Za-z0-9][A-Za-z0-9_-]*)\.deleted$/;

export class LocalBackend implements VolumeBackend {
  readonly name = 'local';
  readonly dir: string;
  readonly snapshotsDir: string;
  readonly #o: LocalBackendOptions;
  readonly #max: number;
  #ready: Promise<void> | undefined;
  /** Serialises every change: chain surgery (snapshots, rebases) must not interleave with creates from snapshots. */
  #queue: Promise<unknown> = Promise.resolve();

  constructor(o: LocalBackendOptions) {
    this.#o = o;
    this.#max = o.maxSnapshotDepth ?? 5;
    if (!Number.isInteger(this.#max) || this.#max < 1) {
      throw new RangeError(`maxSnapshotDepth must be a positive integer, got ${this.#max}`);
    }
    if (!NODE.test(o.node)) throw new Error(`local volume backend: invalid node name ${JSON.stringify(o.node)}`);
    this.dir = join(resolve(o.stateDir), 'volumes');
    this.snapshotsDir = join(this.dir, 'snapshots');
  }

  volumePath(id: string): string {
    return join(this.dir, `${id}.qcow2`);
  }

  snapshotPath(id: string): string {
    return join(this.snapshotsDir, `${id}.qcow2`);
  }

  #hiddenMarker(id: string): string {
    return join(this.snapshotsDir, `.${id}.deleted`);
  }

  /** Parses a location of this node, of the given kind, into its file path. */
  #resolve(location: string, kind: 'volume' | 'snapshot'): { id: string; path: string } {
    const l = parseLocalLocation(location);
    if (l.node !== this.#o.node) {
      throw new Error(`${location} is held by node ${l.node}, not by this node (${this.#o.node})`);
    }
    if (l.kind !== kind) throw new Error(`${location} is a ${l.kind}, not a ${kind}`);
    return { id: l.id, path: kind === 'volume' ? this.volumePath(l.id) : this.snapshotPath(l.id) };
  }

  #location(kind: 'volume' | 'snapshot', id: string): string {
    return formatLocalLocation({ node: this.#o.node, kind, id });
  }

  #serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#queue.then(async () => {
      await this.#init();
      return fn();
    });
    this.#queue = run.catch(() => undefined);
    return run;
  }

  /** Creates the directories and removes the temporary files a killed agent left (once per instance). */
  #init(): Promise<void> {
    this.#ready ??= (async () => {
      await mkdir(this.snapshotsDir, { recursive: true, mode: 0o700 });
      const u = this.#o.owner;
      if (u) {
        // QEMU, once it is the user, opens the files by path: it may enter these directories (o+x), not list them.
        const stateDir = resolve(this.#o.stateDir);
        await chmod(stateDir, ((await stat(stateDir)).mode & 0o777) | 0o001);
        await chmod(this.dir, 0o711);
        await chmod(this.snapshotsDir, 0o711);
        const blocked = await untraversable(this.snapshotsDir, u);
        if (blocked) {
          throw new Error(
            `QEMU user (uid ${u.uid}) cannot reach ${this.snapshotsDir}: ${blocked.path} is mode 0${blocked.mode.toString(8)}; let it in (chmod o+x ${blocked.path}) or choose another --state-dir`,
          );
        }
      }
      for (const d of [this.dir, this.snapshotsDir]) {
        for (const name of await readdir(d)) {
          if (name.startsWith('.') && name.includes('.tmp-')) await rm(join(d, name), { force: true });
        }
      }
    })();
    this.#ready.catch(() => {
      this.#ready = undefined;
    });
    return this.#ready;
  }

  /** Gives a file to QEMU's user: volumes read-write (0600), snapshots read-only (0400). */
  async #own(path: string, mode: number): Promise<void> {
    const u = this.#o.owner;
    if (u) await chown(path, u.uid, u.gid);
    await chmod(path, mode);
  }

  async #provisioned(location: string, path: string): Promise<ProvisionedVolume> {
    const info = await qemuImgInfo(path, { format: 'qcow2', forceShare: true });
    return { location, sizeBytes: info['virtual-size'], allocatedBytes: info['actual-size'] ?? 0 };
  }

  /** The backing files below `path`, youngest first (the file itself excluded). */
  async #chain(path: string): Promise<ChainLink[]> {
    const infos = await qemuImgChain(path, { format: 'qcow2', forceShare: true });
    return infos.slice(1).map((i: QemuImgInfo) => {
      const p = i.filename ?? '';
      return { path: p, format: i.format, snapshot: p.startsWith(`${this.snapshotsDir}/`) };
    });
  }

  /** Fails with VolumeInUseError when a QEMU holds the file's write lock (qemu-img info without -U). */
  async #checkDetached(path: string, what: string): Promise<void> {
    await qemuImgInfo(path, { format: 'qcow2' }).catch((err: unknown) => {
      throw this.#inUse(err, what);
    });
  }

  #inUse(err: unknown, what: string): unknown {
    if (!isLocked(err)) return err;
    return new VolumeInUseError(
      `${what} is in use: a QEMU holds its write lock (${(err as QemuImgError).stderr}); it must be detached first`,
      { cause: err },
    );
  }

  async probe(): Promise<BackendProbe> {
    try {
      await qemuImg(['--version']);
      return { ok: true };
    } catch (err) {
      return { ok: false, reason: `qemu-img does not run (install qemu-utils): ${(err as Error).message}` };
    }
  }

  async create(vol: VolumeRef, sizeBytes: number, source: VolumeSourceSpec): Promise<ProvisionedVolume> {
    const what = `volume ${vol.namespace}/${vol.name} (${vol.id})`;
    checkSize(sizeBytes, what);
    if (!ID.test(vol.id)) throw new Error(`${what}: invalid volume id`);
    const path = this.volumePath(vol.id);
    const location = this.#location('volume', vol.id);
    const size = sectors(sizeBytes);
    return this.#serial(async () => {
      // What the source is: its file (for the conflict check and the copy) and its virtual size.
      let src: { path: string; format: 'qcow2' | 'raw'; virtualSize: number } | undefined;
      if (source.kind === 'image') src = source.image;
      else if (source.kind === 'snapshot' || source.kind === 'volume') {
        const r = this.#resolve(source.location, source.kind);
        const deleted = source.kind === 'snapshot' && (await exists(this.#hiddenMarker(r.id)));
        if (deleted && !(await exists(path))) {
          throw new Error(`${what}: source snapshot ${source.location} is deleted`);
        }
        if (!deleted && (await exists(r.path))) {
          const info = await qemuImgInfo(r.path, { format: 'qcow2', forceShare: true });
          src = { path: r.path, format: 'qcow2', virtualSize: info['virtual-size'] };
        } else if (!(await exists(path))) {
          throw new Error(`${what}: source ${source.kind} ${source.location} does not exist`);
        }
      }
      if (await exists(path)) {
        await this.#checkExisting(path, what, size, source, src);
        await this.#own(path, 0o600);
        return this.#provisioned(location, path);
      }
      if (src && src.virtualSize > size) {
        throw new RangeError(
          `${what}: size ${formatBytes(size)} (${size} bytes) is smaller than its source ${source.kind}'s ` +
            `${formatBytes(src.virtualSize)} (${src.virtualSize} bytes)`,
        );
      }
      if (source.kind === 'blank') {
        await createBlankDisk({ path, sizeBytes: size });
      } else if (source.kind === 'image' || source.kind === 'snapshot') {
        await createRootDisk({ base: src!, path, sizeBytes: size });
      } else {
        // A clone: a full, independent copy of a detached volume. Never -U: a copy of a disk a guest writes to is
        // not a point in time.
        const from = src!;
        await createAtomically(
          path,
          (tmp) => ['convert', '-q', '-f', 'qcow2', '-O', 'qcow2', from.path, tmp],
          async (tmp) => {
            if (size > from.virtualSize) await qemuImg(['resize', '-q', '-f', 'qcow2', tmp, String(size)]);
          },
        ).catch((err: unknown) => {
          throw this.#inUse(err, `${what}: source volume ${source.location}`);
        });
      }
      await this.#own(path, 0o600);
      return this.#provisioned(location, path);
    });
  }

  /**
   * An existing file for a create: it is this volume (the name is its uid) unless it is visibly something else —
   * smaller than asked, or on a base that is not its source's (an image, a snapshot's base). It may since have
   * been extended, snapshotted (its chain has more snapshots) or flattened (no base).
   */
  async #checkExisting(
    path: string,
    what: string,
    size: number,
    source: VolumeSourceSpec,
    src: { path: string } | undefined,
  ): Promise<void> {
    const info = await qemuImgInfo(path, { format: 'qcow2', forceShare: true }).catch((err: unknown) => {
      throw new DiskConflictError(`${what}: ${path} exists but is not a readable qcow2 image: ${String(err)}`);
    });
    if (info['virtual-size'] < size) {
      throw new DiskConflictError(
        `${what}: ${path} exists with virtual size ${info['virtual-size']}, less than ${size}; leaving it alone`,
      );
    }
    const bases = (await this.#chain(path)).filter((l) => !l.snapshot).map((l) => l.path);
    let allowed: string[] = [];
    if (source.kind === 'image') allowed = [source.image.path];
    else if (source.kind === 'snapshot') {
      if (!src) return; // the snapshot is gone: nothing to compare with
      allowed = (await this.#chain(src.path)).filter((l) => !l.snapshot).map((l) => l.path);
    }
    const foreign = bases.filter((b) => !allowed.includes(b));
    if (foreign.length > 0) {
      throw new DiskConflictError(
        `${what}: ${path} exists on base ${foreign.join(', ')}, not made from ${source.kind}; leaving it alone`,
      );
    }
  }

  async inspect(location: string): Promise<ProvisionedVolume | undefined> {
    const l = parseLocalLocation(location);
    const { path, id } = this.#resolve(location, l.kind);
    if (l.kind === 'snapshot' && (await exists(this.#hiddenMarker(id)))) return undefined;
    if (!(await exists(path))) return undefined;
    return this.#provisioned(location, path);
  }

  async extend(location: string, sizeBytes: number): Promise<ProvisionedVolume> {
    const { path } = this.#resolve(location, 'volume');
    checkSize(sizeBytes, `volume ${location}`);
    return this.#serial(async () => {
      if (!(await exists(path))) throw new Error(`volume ${location} does not exist`);
      await growDisk({ path, sizeBytes }).catch((err: unknown) => {
        throw this.#inUse(err, `volume ${location}`);
      });
      return this.#provisioned(location, path);
    });
  }

  async delete(location: string): Promise<void> {
    const { path } = this.#resolve(location, 'volume');
    return this.#serial(async () => {
      await rm(path, { force: true });
      await this.#collectHidden().catch(() => undefined); // best effort: list() and later calls retry
    });
  }

  /**
   * Snapshot of a detached volume V (file P) as S (file Q), crash-safe: an agent killed between any two lines and
   * calling again converges on one snapshot file holding the data at the first call and P, an overlay on Q, that
   * holds all of V's data.
   *  0. Q exists and is not P's inode: done (only the modes are set again).
   *  1. P's chain would exceed maxSnapshotDepth: safe rebase of P onto an older backing file (planDepth). Killed
   *     mid-way: P still shows the same data (a safe rebase only copies what P already shows); a repeat redoes it.
   *  2. link(P, Q): Q is a second name of P's inode (atomic). From here a repeat sees Q == P and goes on at 3.
   *  3. A new overlay on Q of P's size under a temporary name (a leftover is removed by the next #init).
   *  4. rename(temp, P): P is now the overlay, Q the only name of the old data; a repeat stops at 0.
   *  5. Q read-only (0400), P QEMU's (0600); repeated at 0.
   * V is written by no one in between (detached; the volume host serialises its work on V).
   */
  async createSnapshot(location: string, snap: SnapshotRef): Promise<ProvisionedSnapshot> {
    const { path } = this.#resolve(location, 'volume');
    if (!ID.test(snap.id)) throw new Error(`snapshot ${snap.namespace}/${snap.name}: invalid id ${snap.id}`);
    const q = this.snapshotPath(snap.id);
    const snapLocation = this.#location('snapshot', snap.id);
    const what = `volume ${location}`;
    const step = async (s: SnapshotStep) => this.#o.onSnapshotStep?.(s);
    return this.#serial(async () => {
      const [qStat, pStat] = await Promise.all([statIfAny(q), statIfAny(path)]);
      const linked = qStat && pStat && qStat.ino === pStat.ino && qStat.dev === pStat.dev;
      if (qStat && !linked) {
        if (pStat) await this.#own(path, 0o600);
        await this.#own(q, 0o400);
        return {
          location: snapLocation,
          sizeBytes: (await qemuImgInfo(q, { format: 'qcow2', forceShare: true }))['virtual-size'],
        };
      }
      if (!pStat) throw new Error(`cannot snapshot ${what}: it does not exist`);
      await this.#checkDetached(path, `cannot snapshot ${what}:`);
      const size = (await qemuImgInfo(path, { format: 'qcow2', forceShare: true }))['virtual-size'];
      if (!linked) {
        const to = planDepth(await this.#chain(path), this.#max);
        if (to !== undefined) {
          await qemuImg(
            to === null
              ? ['rebase', '-q', '-f', 'qcow2', '-b', '', path]
              : ['rebase', '-q', '-f', 'qcow2', '-b', to.path, '-F', to.format, path],
          );
        }
        await step('rebased');
        await link(path, q);
        await step('linked');
      }
      const tmp = tempPathFor(path);
      try {
        await qemuImg(['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', q, tmp, String(size)]);
        await step('overlay-created');
        await rename(tmp, path);
      } finally {
        await rm(tmp, { force: true });
      }
      await step('renamed');
      await this.#own(path, 0o600);
      await this.#own(q, 0o400);
      return { location: snapLocation, sizeBytes: size };
    });
  }

  /**
   * Removes a snapshot. The files that use it as their backing file (the volume, a volume made from it, a later
   * snapshot) are first rebased onto its own backing file (safe rebase: its data they still show is copied into
   * them). A dependent QEMU has open cannot be rebased (its lock): the snapshot is then hidden (a `.deleted` marker:
   * gone from list() and inspect()) and removed by a later delete/deleteSnapshot/list once nothing in use needs it.
   */
  async deleteSnapshot(location: string): Promise<void> {
    const { id } = this.#resolve(location, 'snapshot');
    return this.#serial(async () => {
      if (!(await exists(this.snapshotPath(id)))) {
        await rm(this.#hiddenMarker(id), { force: true });
        return;
      }
      await writeFile(this.#hiddenMarker(id), '');
      await this.#removeSnapshotFile(id);
    });
  }

  /** Rebases the dependents of snapshot `id` off it and removes it; false when an in-use dependent blocks that. */
  async #removeSnapshotFile(id: string): Promise<boolean> {
    const q = this.snapshotPath(id);
    const chain = await this.#chain(q);
    const below = chain[0];
    for (const child of await this.#files()) {
      if (child === q) continue;
      let info: QemuImgInfo;
      try {
        info = await qemuImgInfo(child, { format: 'qcow2', forceShare: true });
      } catch (err) {
        if (!(await exists(child))) continue;
        throw err;
      }
      if (backingFileOf(info) !== q) continue;
      const isSnapshot = child.startsWith(`${this.snapshotsDir}/`);
      if (isSnapshot) await chmod(child, 0o600);
      try {
        await qemuImg(
          below
            ? ['rebase', '-q', '-f', 'qcow2', '-b', below.path, '-F', below.format, child]
            : ['rebase', '-q', '-f', 'qcow2', '-b', '', child],
        );
      } catch (err) {
        if (isLocked(err)) return false;
        throw err;
      } finally {
        if (isSnapshot) await chmod(child, 0o400);
      }
    }
    await rm(q, { force: true });
    await rm(this.#hiddenMarker(id), { force: true });
    return true;
  }

  /** Retries the removal of hidden (deleted, still needed) snapshots; one that is still needed stays. */
  async #collectHidden(): Promise<void> {
    for (const name of await readdir(this.snapshotsDir)) {
      const m = HIDDEN.exec(name);
      if (!m) continue;
      const id = m[1] as string;
      if (!(await exists(this.snapshotPath(id)))) await rm(join(this.snapshotsDir, name), { force: true });
      else await this.#removeSnapshotFile(id);
    }
  }

  /**
   * Paths of the image cache files that volumes and snapshots (deleted ones still needed included) are built on:
   * ImageCache.evict must count them in use (`inUse` takes paths), or evicting one destroys those volumes.
   */
  async imagesInUse(): Promise<Set<string>> {
    return this.#serial(async () => {
      const out = new Set<string>();
      for (const f of await this.#files()) {
        const chain = await this.#chain(f).catch(async (err: unknown) => {
          if (!(await exists(f))) return [];
          throw err;
        });
        for (const l of chain) if (!l.snapshot) out.add(l.path);
      }
      return out;
    });
  }

  /** Every volume and snapshot file (hidden snapshots included), by path. */
  async #files(): Promise<string[]> {
    const out: string[] = [];
    for (const d of [this.dir, this.snapshotsDir]) {
      for (const name of await readdir(d)) if (FILE.test(name)) out.push(join(d, name));
    }
    return out;
  }

  async list(): Promise<{ volumes: string[]; snapshots: string[] }> {
    return this.#serial(async () => {
      await this.#collectHidden().catch(() => undefined); // best effort: retried at every list()
      const volumes = (await readdir(this.dir))
        .map((n) => FILE.exec(n)?.[1])
        .filter((id): id is string => id !== undefined)
        .map((id) => this.#location('volume', id));
      const names = await readdir(this.snapshotsDir);
      const snapshots = names
        .map((n) => FILE.exec(n)?.[1])
        .filter((id): id is string => id !== undefined && !names.includes(`.${id}.deleted`))
        .map((id) => this.#location('snapshot', id));
      return { volumes: volumes.sort(), snapshots: snapshots.sort() };
    });
  }

  /**
   * Makes a volume independent of its image and snapshots (flatten on request): a full copy (`qemu-img convert`)
   * under a temporary name renamed over it. A detached volume only (the copy needs the write lock).
   */
  async flatten(location: string): Promise<ProvisionedVolume> {
    const { path } = this.#resolve(location, 'volume');
    return this.#serial(async () => {
      if (!(await exists(path))) throw new Error(`volume ${location} does not exist`);
      const info = await qemuImgInfo(path, { format: 'qcow2', forceShare: true });
      if (backingFileOf(info) !== undefined) {
        await this.#checkDetached(path, `cannot flatten volume ${location}:`);
        await createAtomically(path, (tmp) => ['convert', '-q', '-f', 'qcow2', '-O', 'qcow2', path, tmp]).catch(
          (err: unknown) => {
            throw this.#inUse(err, `cannot flatten volume ${location}:`);
          },
        );
      }
      await this.#own(path, 0o600);
      return this.#provisioned(location, path);
    });
  }

  async connection(vol: VolumeRef, location: string): Promise<VolumeConnection> {
    const { path, id } = this.#resolve(location, 'volume');
    if (id !== vol.id) throw new Error(`${location} is not the location of volume ${vol.id}`);
    if (!(await exists(path))) throw new Error(`volume ${location} does not exist`);
    return {
      volumeId: vol.id,
      serial: volumeSerial(vol.id),
      blockdev: { driver: 'qcow2', file: { driver: 'file', filename: path, aio: 'threads' } },
    };
  }
}
