// The node agent's volume host (Cinder's cinder-volume): reconciles the Volumes and VolumeSnapshots whose
// status.node is this node, through the node's volume backends (volumes/backend.ts), and reports what the backend
// holds in status.host, its only field (RV-guarded merge patch of that one key, field manager stratus-agent/<node>;
// docs/design/status-ownership.md). The operator derives the Cinder status from that report. docs/design/storage.md.
//
//  - decideVolume()/decideSnapshot() (pure) say what to do from the object alone; the reconcile does it and reports.
//  - Every backend operation is idempotent by uid, so an agent killed at any line converges when it runs the same
//    step again: a volume created but not reported is returned by the next create(); a delete whose location was
//    never reported finds it in backend.list() by uid.
//  - Failures: a failed create or delete reports state error with the fault; a failed extend keeps the last good
//    state (the volume is intact) and sets the fault. Both are retried with the controller's per-key backoff; the
//    host's own writes do not requeue (volumeChanged), so a failure does not loop on its own report.
//  - Exports: a local volume attached (attaching|attached) on another node is exported over NBD as vol-<uid>;
//    exports no attachment needs are removed.
//  - Orphan sweep (at start and periodically): local volumes and snapshots whose object (by uid, any namespace) no
//    longer exists are deleted. rbd pools are shared (other nodes, other clusters, even OpenStack's own Cinder, which
//    names images volume-<id> too) and are never swept by list(); an rbd volume deleted before its create was
//    reported is found by uid in the deletion path instead.
import type { KubernetesObject } from '@kubernetes/client-node';
import {
  BUILTIN_VOLUME_TYPE,
  parseBytes,
  type Volume,
  type VolumeAttachment,
  type VolumeHostReport,
  VolumeKind,
  type VolumeSnapshot,
  VolumeSnapshotKind,
  type VolumeType,
  VolumeTypeKind,
} from '../../../operator/src/api/index.ts';
import {
  type Clock,
  type Controller,
  crashPoint,
  defaultControllerRateLimiter,
  type GVR,
  type Informer,
  isNotFound,
  type KubeClient,
  type Logger,
  type Manager,
  objectKey,
  type ReconcileResult,
  type Request,
  silentLogger,
  systemClock,
  type TimerHandle,
  updateStatus,
} from '../../../operator/src/runtime/index.ts';
import { agentFieldManager } from '../fieldmanager.ts';
import type { CachedImage, ImageSource } from '../images/cache.ts';
import { imageSourceOf } from '../images/source.ts';
import type { VolumeBackend, VolumeRef, VolumeSourceSpec } from './backend.ts';

export const VOLUMES: GVR = { group: VolumeKind.group, version: VolumeKind.version, plural: VolumeKind.plural };
export const VOLUME_SNAPSHOTS: GVR = {
  group: VolumeSnapshotKind.group,
  version: VolumeSnapshotKind.version,
  plural: VolumeSnapshotKind.plural,
};
export const VOLUME_TYPES: GVR = {
  group: VolumeTypeKind.group,
  version: VolumeTypeKind.version,
  plural: VolumeTypeKind.plural,
};

/** A Volume or VolumeSnapshot as the informer holds it (raw JSON; parsed where read). */
export type StorageObject = KubernetesObject & { spec?: unknown; status?: Record<string, unknown> };

/** The fault of a forced snapshot of an attached local volume (contract: not in this round). */
export const ATTACHED_LOCAL_SNAPSHOT_FAULT =
  'snapshot of an attached local volume is not supported yet: detach it first';

/** Attachment states in which a guest's QEMU may have the volume open: the host leaves a local qcow2 alone. */
const IN_USE: ReadonlySet<string> = new Set(['attaching', 'attached', 'detaching']);
/**
 * Attachment states that need the volume reachable from the server's node (an NBD export for another node):
 * attaching and attached, and detaching, whose guest may still have the export open until its agent detached it.
 */
const NEEDS_EXPORT: ReadonlySet<string> = new Set(['attaching', 'attached', 'detaching']);
/** While an attached local volume waits for the server's agent to grow it, its size is read back this often. */
const REFRESH_SIZE_MS = 2000;
const UUID_AT_END = /([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$/;

/** NBD export name of a volume (contract). */
export function exportName(volumeId: string): string {
  return `vol-${volumeId}`;
}

// ---------------------------------------------------------------------------------------------------------------
// Pure decisions
// ---------------------------------------------------------------------------------------------------------------

export type VolumeAction =
  /** Nothing to do with the backend (exports are still kept in line). */
  | { kind: 'none' }
  /** Create the volume (or find the one a previous run created) and report it available. */
  | { kind: 'create' }
  /** Grow the volume through the backend (detached, or rbd attached: the server's agent then resizes the disk). */
  | { kind: 'extend'; sizeBytes: number }
  /** Attached local volume: the server's agent grows it through QEMU; read the size back from the backend. */
  | { kind: 'refresh-size'; sizeBytes: number }
  /** Remove exports and the volume, report deleted. */
  | { kind: 'delete' }
  /** Deletion asked while attachments remain: the operator detaches first. */
  | { kind: 'wait'; reason: string };

/** This node's report in a Volume or VolumeSnapshot status (a report about another node is not ours). */
function ownReport<R extends { node: string }>(report: R | undefined, node: string): R | undefined {
  return report?.node === node ? report : undefined;
}

function bytes(q: string | undefined): number {
  if (!q) return 0;
  try {
    return Number(parseBytes(q));
  } catch {
    return 0;
  }
}

/** Whether a guest's QEMU may hold the volume open (an attachment attaching, attached or detaching). */
export function inUse(attachments: readonly VolumeAttachment[] | undefined): boolean {
  return (attachments ?? []).some((a) => IN_USE.has(a.state));
}

/** What the volume host of `node` does next for `vol` (pure: everything comes from the object). */
export function decideVolume(vol: Volume, node: string): VolumeAction {
  const st = vol.status ?? {};
  if (st.node !== node) return { kind: 'none' };
  const report = ownReport(st.host, node);
  if (vol.metadata.deletionTimestamp) {
    if (report?.state === 'deleted') return { kind: 'none' };
    const n = st.attachments?.length ?? 0;
    if (n > 0) return { kind: 'wait', reason: `deletion waits for ${n} attachment(s) to be removed` };
    // The operator says when (status deleting): it holds a volume while snapshots of it exist (DependentSnapshots).
    if (st.status !== 'deleting' && st.status !== 'error_deleting' && report?.state !== 'deleting') {
      return { kind: 'wait', reason: 'deletion waits for the operator (status deleting)' };
    }
    return { kind: 'delete' };
  }
  if (!report || report.state === 'creating' || (report.state === 'error' && !report.location)) {
    return { kind: 'create' };
  }
  if (report.state === 'deleting' || report.state === 'deleted') return { kind: 'none' };
  const want = bytes(vol.spec.size);
  if (want <= bytes(report.size)) return { kind: 'none' };
  if (inUse(st.attachments) && (st.backend ?? 'local') === 'local') return { kind: 'refresh-size', sizeBytes: want };
  return { kind: 'extend', sizeBytes: want };
}

/** The attachments of `vol` that need an NBD export from `node`: local backend, on another node, not just reserved. */
export function remoteAttachments(vol: Volume, node: string): VolumeAttachment[] {
  const st = vol.status ?? {};
  if ((st.backend ?? 'local') !== 'local' || vol.metadata.deletionTimestamp) return [];
  return (st.attachments ?? []).filter((a) => NEEDS_EXPORT.has(a.state) && a.node !== undefined && a.node !== node);
}

export type SnapshotAction =
  | { kind: 'none' }
  | { kind: 'create' }
  | { kind: 'delete' }
  /** The snapshot cannot be taken here; report error with this fault. */
  | { kind: 'refuse'; fault: string }
  /** The source volume is not ready (no location yet, or missing): try again later. */
  | { kind: 'wait'; reason: string };

/** What the volume host of `node` does next for `snap`, given its source volume (undefined: not found). */
export function decideSnapshot(snap: VolumeSnapshot, volume: Volume | undefined, node: string): SnapshotAction {
  const st = snap.status ?? {};
  if (st.node !== node) return { kind: 'none' };
  const report = ownReport(st.host, node);
  if (snap.metadata.deletionTimestamp) return report?.state === 'deleted' ? { kind: 'none' } : { kind: 'delete' };
  if (report && report.state !== 'creating' && report.state !== 'error') return { kind: 'none' };
  const vr = volume?.status?.host;
  if (!volume || !vr?.location || vr.state !== 'available') {
    return { kind: 'wait', reason: `volume ${snap.spec.volume} has no backend location yet` };
  }
  if ((volume.status?.backend ?? 'local') === 'local' && inUse(volume.status?.attachments)) {
    return { kind: 'refuse', fault: ATTACHED_LOCAL_SNAPSHOT_FAULT };
  }
  return { kind: 'create' };
}

/**
 * Update predicate: every change but the host's own report (status.host), so a failing step retries on the
 * controller's backoff instead of requeueing itself through its own write.
 */
export function changedBesidesHost(a: StorageObject, b: StorageObject): boolean {
  if (a === b) return true;
  const strip = (o: StorageObject) => {
    const { resourceVersion: _rv, managedFields: _mf, ...meta } = o.metadata ?? {};
    const { host: _h, ...status } = o.status ?? {};
    return JSON.stringify({ meta, spec: o.spec ?? null, status });
  };
  return strip(a) !== strip(b);
}

/** The uid a backend location ends with (local://<node>/<uid>, rbd://…/volume-<uid>@snapshot-<snapuid>). */
export function uidOfLocation(location: string): string | undefined {
  return UUID_AT_END.exec(location)?.[1];
}

/** A quantity for a byte count: the largest binary unit that divides it exactly. */
export function byteQuantity(n: number): string {
  for (const [unit, size] of [
    ['Ti', 1024 ** 4],
    ['Gi', 1024 ** 3],
    ['Mi', 1024 ** 2],
    ['Ki', 1024],
  ] as const) {
    if (n > 0 && n % size === 0) return `${n / size}${unit}`;
  }
  return String(n);
}

function errorMessage(err: unknown): string {
  return (err instanceof Error ? err.message : String(err)).slice(0, 4000);
}

// ---------------------------------------------------------------------------------------------------------------
// The controller
// ---------------------------------------------------------------------------------------------------------------

/** An NBD export as the node's exporter serves it (volumes/nbd-export.ts). */
export interface NbdExportInfo {
  name: string;
  /** Address and port other nodes reach the export on. */
  host: string;
  port: number;
}

export interface NbdExportRequest {
  name: string;
  volumeId: string;
  /** The volume's blockdev tree as the backend's connection() gives it. */
  blockdev: Record<string, unknown>;
  writable: boolean;
}

/** How a failed NBD export starts its fault (cleared by the next export that works). */
const EXPORT_FAULT = 'NBD export';

/** The node's NBD exporter (one qemu-storage-daemon per node), as the volume host uses it. */
export interface VolumeExporter {
  /** Exports (or finds the export of) a volume; idempotent by name. */
  ensureExport(req: NbdExportRequest): Promise<NbdExportInfo>;
  /** Removes an export; an unknown name succeeds. */
  removeExport(name: string): Promise<void>;
  /** Names of the exports the daemon serves. */
  exports(): Promise<string[]>;
}

/** The node's image cache, as the volume host uses it (images/cache.ts ImageCache). */
export interface VolumeImageCache {
  ensure(src: ImageSource, opts?: { signal?: AbortSignal }): Promise<CachedImage>;
}

export interface VolumeHostOptions {
  manager: Manager;
  nodeName: string;
  /** Backends by name (VolumeType spec.backend) that need no per-type options: local. */
  backends: ReadonlyMap<string, VolumeBackend>;
  /** The rbd backend of a VolumeType (its pool, user, monitors, key): volumes/index.ts createBackends. */
  rbdBackend?: (type: VolumeType) => Promise<VolumeBackend>;
  /** The node's NBD exporter (local volumes attached on other nodes). */
  exporter?: VolumeExporter;
  /** The node's image cache (volumes made from an image). */
  images?: VolumeImageCache;
  /** Orphan sweep period (default 60 s). */
  orphanSweepMs?: number;
  /** Parallel reconciles per kind (default 2). */
  concurrency?: number;
  logger?: Logger;
  clock?: Clock;
}

/** cinder-volume on one node. */
export class VolumeHost {
  readonly nodeName: string;
  readonly volumes: Informer<StorageObject>;
  readonly snapshots: Informer<StorageObject>;
  readonly volumeController: Controller;
  readonly snapshotController: Controller;
  readonly #o: VolumeHostOptions;
  readonly #client: KubeClient;
  readonly #log: Logger;
  readonly #clock: Clock;
  readonly #fieldManager: string;
  #sweepTimer: TimerHandle | undefined;
  #stopped = false;

  constructor(o: VolumeHostOptions) {
    this.#o = o;
    this.nodeName = o.nodeName;
    this.#client = o.manager.client;
    this.#clock = o.clock ?? systemClock;
    this.#log = (o.logger ?? o.manager.logger ?? silentLogger()).child({ node: o.nodeName, component: 'volume-host' });
    this.#fieldManager = agentFieldManager(o.nodeName);
    // Shared, cluster-wide informers: status.node is not a selectable field, and the orphan sweep needs every uid.
    this.volumes = o.manager.informer<StorageObject>(VOLUMES);
    this.snapshots = o.manager.informer<StorageObject>(VOLUME_SNAPSHOTS);
    addUidIndex(this.volumes);
    addUidIndex(this.snapshots);
    addVolumeIndex(this.snapshots);
    const rateLimiter = () => defaultControllerRateLimiter({ baseDelayMs: 1000, maxDelayMs: 300_000 });
    this.volumeController = o.manager.addController({
      name: `volume-host/${o.nodeName}`,
      reconcile: (req, ctx) => this.reconcileVolume(req, ctx.signal),
      maxConcurrentReconciles: o.concurrency ?? 2,
      rateLimiter: rateLimiter(),
      logger: this.#log,
    });
    forMine(this.volumes, this.volumeController, this.nodeName);
    this.snapshotController = o.manager.addController({
      name: `volume-snapshot-host/${o.nodeName}`,
      reconcile: (req) => this.reconcileSnapshot(req),
      maxConcurrentReconciles: o.concurrency ?? 2,
      rateLimiter: rateLimiter(),
      logger: this.#log,
    });
    forMine(this.snapshots, this.snapshotController, this.nodeName);
    // A volume that detaches (or gets its location) lets its waiting or refused snapshots go on.
    this.snapshotController.watches(this.volumes, (v) =>
      this.snapshots
        .byIndex('volume', `${v.metadata?.namespace ?? ''}/${v.metadata?.name ?? ''}`)
        .filter((s) => s.status?.node === this.nodeName)
        .map((s) => objectKey(s)),
    );
  }

  /** Starts the orphan sweep: now, then every orphanSweepMs (call once the manager has started). */
  start(): void {
    const sweep = () => {
      if (this.#stopped) return;
      void this.sweepOrphans()
        .catch((err: unknown) => this.#log.warn({ err }, 'volume orphan sweep failed'))
        .finally(() => {
          if (!this.#stopped) this.#sweepTimer = this.#clock.setTimer(sweep, this.#o.orphanSweepMs ?? 60_000);
        });
    };
    sweep();
  }

  stop(): void {
    this.#stopped = true;
    this.#sweepTimer?.cancel();
  }

  /** Backend probes, for the Hypervisor's status.volumeBackends. */
  async probe(): Promise<{ name: string; ok: boolean; reason?: string }[]> {
    const out: { name: string; ok: boolean; reason?: string }[] = [];
    for (const [name, b] of this.#o.backends) {
      try {
        const p = await b.probe();
        out.push({ name, ok: p.ok, ...(p.reason ? { reason: p.reason.slice(0, 1024) } : {}) });
      } catch (err) {
        out.push({ name, ok: false, reason: errorMessage(err).slice(0, 1024) });
      }
    }
    return out;
  }

  // -------------------------------------------------------------------------------------------------------------
  // Volumes
  // -------------------------------------------------------------------------------------------------------------

  async reconcileVolume(req: Request, signal?: AbortSignal): Promise<ReconcileResult> {
    const obj = this.volumes.get(req.name, req.namespace);
    if (!obj) return undefined; // gone: a file it left is the orphan sweep's
    const vol = parseVolume(obj);
    if (!vol || vol.status?.node !== this.nodeName) return undefined;
    const action = decideVolume(vol, this.nodeName);
    const log = this.#log.child({ volume: objectKey(obj), uid: vol.metadata.uid });
    switch (action.kind) {
      case 'wait':
        log.debug({ reason: action.reason }, 'volume waits');
        return undefined;
      case 'delete':
        await this.#deleteVolume(obj, vol, log);
        return undefined;
      case 'create': {
        const created = await this.#createVolume(obj, vol, log, signal);
        if (!created) return { requeue: true };
        await this.#syncExports(created.obj, created.vol);
        // A size asked meanwhile is the next step.
        return decideVolume(created.vol, this.nodeName).kind === 'none' ? undefined : { requeue: true };
      }
      case 'extend': {
        const extended = await this.#extendVolume(obj, vol, action.sizeBytes, log);
        if (!extended) return { requeue: true };
        await this.#syncExports(extended.obj, extended.vol);
        return undefined;
      }
      case 'refresh-size': {
        const refreshed = await this.#refreshSize(obj, vol);
        await this.#syncExports(refreshed.obj, refreshed.vol);
        const still = decideVolume(refreshed.vol, this.nodeName).kind === 'refresh-size';
        return still ? { requeueAfter: REFRESH_SIZE_MS } : undefined;
      }
      case 'none':
        await this.#syncExports(obj, vol);
        return undefined;
    }
  }

  /** Whether decideVolume still gives a step of `kind` for the stored object (guard of a step's first write). */
  #still(kind: VolumeAction['kind']): (fresh: StorageObject) => boolean {
    return (fresh) => {
      const v = parseVolume(fresh);
      return v !== undefined && decideVolume(v, this.nodeName).kind === kind;
    };
  }

  async #createVolume(
    obj: StorageObject,
    vol: Volume,
    log: Logger,
    signal?: AbortSignal,
  ): Promise<{ obj: StorageObject; vol: Volume } | undefined> {
    // 1. Report creating (the operator shows creating/downloading), unless already reported.
    let cur = obj;
    if (ownReport(vol.status?.host, this.nodeName)?.state !== 'creating') {
      const begun = await this.#begin(VOLUMES, cur, this.#still('create'), () => ({
        node: this.nodeName,
        state: 'creating',
      }));
      if (!begun) return undefined;
      cur = begun;
    }
    let backend: VolumeBackend;
    let source: VolumeSourceSpec;
    let provisioned: Awaited<ReturnType<VolumeBackend['create']>>;
    try {
      backend = await this.#backendOf(vol);
      source = await this.#sourceOf(vol, signal);
      // 2. Create (idempotent by uid: a volume a killed run created is returned as it is).
      provisioned = await backend.create(refOf(vol), bytes(vol.spec.size), source);
      crashPoint('volume-host:after-create');
    } catch (err) {
      // Stopping (the manager aborted the reconcile): not the backend's fault; the next run goes on.
      if (signal?.aborted) throw err;
      if (err instanceof WaitError) {
        log.info({ reason: err.message }, 'volume source not ready');
        throw err;
      }
      log.warn({ err }, 'volume create failed');
      await this.#reportVolume(cur, () => ({
        node: this.nodeName,
        state: 'error',
        fault: `create failed: ${errorMessage(err)}`,
      }));
      throw err;
    }
    // 3. Report available.
    log.info({ location: provisioned.location, size: provisioned.sizeBytes }, 'volume created');
    cur = await this.#reportVolume(cur, (r) => ({
      node: this.nodeName,
      state: 'available',
      location: provisioned.location,
      size: byteQuantity(provisioned.sizeBytes),
      ...(provisioned.allocatedBytes !== undefined ? { allocated: byteQuantity(provisioned.allocatedBytes) } : {}),
      ...(r?.exports ? { exports: r.exports } : {}),
    }));
    return { obj: cur, vol: parseVolume(cur) ?? vol };
  }

  async #extendVolume(
    obj: StorageObject,
    vol: Volume,
    sizeBytes: number,
    log: Logger,
  ): Promise<{ obj: StorageObject; vol: Volume } | undefined> {
    const before = ownReport(vol.status?.host, this.nodeName)!;
    const location = before.location!;
    const begun = await this.#begin(VOLUMES, obj, this.#still('extend'), (r) => ({
      ...(r ?? before),
      state: 'extending',
    }));
    if (!begun) return undefined;
    let cur = begun;
    try {
      const backend = await this.#backendOf(vol);
      const grown = await backend.extend(location, sizeBytes);
      log.info({ size: grown.sizeBytes }, 'volume extended');
      cur = await this.#reportVolume(cur, (r) => {
        const { fault: _f, ...rest } = r ?? before;
        return {
          ...rest,
          state: 'available',
          size: byteQuantity(grown.sizeBytes),
          ...(grown.allocatedBytes !== undefined ? { allocated: byteQuantity(grown.allocatedBytes) } : {}),
        };
      });
    } catch (err) {
      // The volume is intact at its old size: keep the last good state, say why in fault.
      log.warn({ err }, 'volume extend failed');
      await this.#reportVolume(cur, (r) => ({
        ...(r ?? before),
        state: 'available',
        fault: `extend to ${byteQuantity(sizeBytes)} failed: ${errorMessage(err)}`,
      }));
      throw err;
    }
    return { obj: cur, vol: parseVolume(cur) ?? vol };
  }

  /** Attached local volume: the server's agent grows it through QEMU; report the size the backend now holds. */
  async #refreshSize(obj: StorageObject, vol: Volume): Promise<{ obj: StorageObject; vol: Volume }> {
    const report = ownReport(vol.status?.host, this.nodeName)!;
    const backend = await this.#backendOf(vol);
    const seen = await backend.inspect(report.location!);
    if (!seen || seen.sizeBytes <= bytes(report.size)) return { obj, vol };
    const cur = await this.#reportVolume(obj, (r) => ({
      ...(r ?? report),
      size: byteQuantity(seen.sizeBytes),
      ...(seen.allocatedBytes !== undefined ? { allocated: byteQuantity(seen.allocatedBytes) } : {}),
    }));
    return { obj: cur, vol: parseVolume(cur) ?? vol };
  }

  async #deleteVolume(obj: StorageObject, vol: Volume, log: Logger): Promise<void> {
    const report = ownReport(vol.status?.host, this.nodeName);
    let cur = obj;
    if (report?.state !== 'deleting') {
      const begun = await this.#begin(VOLUMES, cur, this.#still('delete'), (r) => ({
        ...(r ?? { node: this.nodeName }),
        state: 'deleting',
      }));
      if (!begun) return;
      cur = begun;
    }
    try {
      if (this.#o.exporter) await this.#o.exporter.removeExport(exportName(vol.metadata.uid!));
      const backend = await this.#backendOf(vol);
      // A volume created by a run killed before its report: found by uid.
      const location = report?.location ?? (await findByUid(backend, 'volumes', vol.metadata.uid!));
      if (location) await backend.delete(location);
      log.info({ location }, 'volume deleted');
    } catch (err) {
      log.warn({ err }, 'volume delete failed');
      await this.#reportVolume(cur, (r) => {
        const { exports: _e, ...rest } = r ?? { node: this.nodeName };
        return { ...rest, state: 'error', fault: `delete failed: ${errorMessage(err)}` };
      });
      throw err;
    }
    await this.#reportVolume(cur, () => ({ node: this.nodeName, state: 'deleted' }));
  }

  /** Exports for the attachments on other nodes (local backend); exports no attachment needs are removed. */
  async #syncExports(obj: StorageObject, vol: Volume): Promise<void> {
    const report = ownReport(vol.status?.host, this.nodeName);
    if (!report?.location || report.state === 'deleted' || report.state === 'deleting') return;
    if ((vol.status?.backend ?? 'local') !== 'local') return;
    const wanted = remoteAttachments(vol, this.nodeName);
    const name = exportName(vol.metadata.uid!);
    const exporter = this.#o.exporter;
    let exports: NonNullable<VolumeHostReport['exports']> = [];
    if (wanted.length > 0) {
      if (!exporter) {
        await this.#reportVolume(obj, (r) => ({
          ...(r ?? report),
          fault: 'this node cannot export volumes over NBD (no exporter)',
        }));
        throw new Error(`volume ${vol.metadata.name}: attached on another node but this node has no NBD exporter`);
      }
      const backend = await this.#backendOf(vol);
      const conn = await backend.connection(refOf(vol), report.location);
      let info: NbdExportInfo;
      try {
        info = await exporter.ensureExport({
          name,
          volumeId: vol.metadata.uid!,
          blockdev: conn.blockdev,
          writable: true,
        });
      } catch (err) {
        // Shown on the Volume (the attachment waits for it), not only in this agent's log.
        const fault = `${EXPORT_FAULT} for ${wanted.map((a) => a.server).join(', ')} failed: ${errorMessage(err)}`;
        if (report.fault !== fault) await this.#reportVolume(obj, (r) => ({ ...(r ?? report), fault }));
        throw err;
      }
      exports = wanted.map((a) => ({
        server: a.server,
        node: a.node!,
        host: info.host,
        port: info.port,
        name: info.name,
      }));
    } else if (exporter && (await exporter.exports()).includes(name)) {
      await exporter.removeExport(name);
    }
    const next = exports.length > 0 ? exports : undefined;
    const staleFault = report.fault?.startsWith(EXPORT_FAULT) === true;
    if (JSON.stringify(report.exports) === JSON.stringify(next) && !staleFault) return;
    await this.#reportVolume(obj, (r) => {
      const { exports: _e, ...rest } = r ?? report;
      if (staleFault && rest.fault?.startsWith(EXPORT_FAULT)) delete rest.fault;
      return { ...rest, ...(next ? { exports: next } : {}) };
    });
  }

  /** What the volume starts with, resolved on this node (an image is pulled into the node's image cache). */
  async #sourceOf(vol: Volume, signal?: AbortSignal): Promise<VolumeSourceSpec> {
    const src = vol.spec.source;
    const ns = vol.metadata.namespace ?? '';
    if (src?.image) {
      const image = await imageSourceOf(this.#client, src.image, ns);
      if (!image) throw new Error(`image ${src.image} not found`);
      if (!this.#o.images) throw new Error('this node has no image cache');
      return { kind: 'image', image: await this.#o.images.ensure(image, signal ? { signal } : {}) };
    }
    if (src?.snapshot) {
      const snap = await this.#read<VolumeSnapshot>(VOLUME_SNAPSHOTS, src.snapshot, ns);
      const r = snap?.status?.host;
      if (!snap) throw new Error(`snapshot ${src.snapshot} not found`);
      if (r?.state !== 'available' || !r.location) throw new WaitError(`snapshot ${src.snapshot} is not available yet`);
      return { kind: 'snapshot', location: r.location };
    }
    if (src?.volume) {
      const other = await this.#read<Volume>(VOLUMES, src.volume, ns);
      const r = other?.status?.host;
      if (!other) throw new Error(`volume ${src.volume} not found`);
      if (!r?.location || (r.state !== 'available' && r.state !== 'extending')) {
        throw new WaitError(`volume ${src.volume} is not available yet`);
      }
      return { kind: 'volume', location: r.location };
    }
    return { kind: 'blank' };
  }

  /** The backend of a volume: its status.backend, rbd per VolumeType (status.volumeType). */
  async #backendOf(vol: Volume): Promise<VolumeBackend> {
    const name = vol.status?.backend ?? 'local';
    if (name === 'rbd') {
      const typeName = vol.status?.volumeType ?? vol.spec.volumeType ?? BUILTIN_VOLUME_TYPE;
      if (!this.#o.rbdBackend) throw new Error('this node has no rbd volume backend');
      const type = await this.#read<VolumeType>(VOLUME_TYPES, typeName);
      if (!type) throw new Error(`volume type ${typeName} not found`);
      return this.#o.rbdBackend(type);
    }
    const b = this.#o.backends.get(name);
    if (!b) throw new Error(`this node has no ${name} volume backend`);
    return b;
  }

  /** RV-guarded merge patch of status.host alone, only while the volume's status.node is still this node. */
  #reportVolume(
    obj: StorageObject,
    next: (report: VolumeHostReport | undefined) => VolumeHostReport,
  ): Promise<StorageObject> {
    return this.#report(VOLUMES, obj, next as never);
  }

  async #report(
    gvr: GVR,
    obj: StorageObject,
    next: (report: Record<string, unknown> | undefined) => Record<string, unknown>,
  ): Promise<StorageObject> {
    return (await this.#patch(gvr, obj, next)).obj;
  }

  /**
   * The first write of a step: made only if `still` holds for the object being patched (the stored one after a
   * conflict), so a step decided on a stale cache (e.g. before this host's own last report arrived) re-decides
   * instead of turning the report back. Undefined when it does not hold.
   */
  async #begin(
    gvr: GVR,
    obj: StorageObject,
    still: (fresh: StorageObject) => boolean,
    next: (report: Record<string, unknown> | undefined) => Record<string, unknown>,
  ): Promise<StorageObject | undefined> {
    const r = await this.#patch(gvr, obj, next, still);
    return r.applied ? r.obj : undefined;
  }

  async #patch(
    gvr: GVR,
    obj: StorageObject,
    next: (report: Record<string, unknown> | undefined) => Record<string, unknown>,
    still?: (fresh: StorageObject) => boolean,
  ): Promise<{ obj: StorageObject; applied: boolean }> {
    let applied = false;
    const out = await updateStatus(
      this.#client,
      gvr,
      obj,
      (st, fresh) => {
        applied = false;
        if (st.node !== this.nodeName) return undefined;
        if (still && !still(fresh)) return undefined;
        applied = true;
        const prev = (st.host ?? {}) as Record<string, unknown>;
        const host: Record<string, unknown> = { ...next(prev.node === this.nodeName ? prev : undefined) };
        // A merge patch merges objects: a sub-field that goes is sent as null.
        for (const k of Object.keys(prev)) if (host[k] === undefined) host[k] = null;
        st.host = host;
        return st;
      },
      { fieldManager: this.#fieldManager },
    );
    return { obj: out, applied };
  }

  async #read<T>(gvr: GVR, name: string, namespace?: string): Promise<(T & KubernetesObject) | undefined> {
    try {
      return await this.#client.get<T & KubernetesObject>(gvr, name, namespace || undefined);
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
  }

  // -------------------------------------------------------------------------------------------------------------
  // Snapshots
  // -------------------------------------------------------------------------------------------------------------

  async reconcileSnapshot(req: Request): Promise<ReconcileResult> {
    const obj = this.snapshots.get(req.name, req.namespace);
    if (!obj) return undefined;
    const snap = parseSnapshot(obj);
    if (!snap || snap.status?.node !== this.nodeName) return undefined;
    const ns = snap.metadata.namespace ?? '';
    const volume = await this.#read<Volume>(VOLUMES, snap.spec.volume, ns);
    const vol = volume ? parseVolume(volume) : undefined;
    const action = decideSnapshot(snap, vol, this.nodeName);
    const log = this.#log.child({ snapshot: objectKey(obj), uid: snap.metadata.uid });
    const report = ownReport(snap.status?.host, this.nodeName);
    switch (action.kind) {
      case 'none':
        return undefined;
      case 'wait':
        log.debug({ reason: action.reason }, 'snapshot waits');
        if (report?.state !== 'creating') {
          await this.#report(VOLUME_SNAPSHOTS, obj, () => ({ node: this.nodeName, state: 'creating' }));
        }
        return { requeueAfter: 5000 };
      case 'refuse':
        if (report?.state !== 'error' || report.fault !== action.fault) {
          await this.#report(VOLUME_SNAPSHOTS, obj, () => ({
            node: this.nodeName,
            state: 'error',
            fault: action.fault,
          }));
        }
        return undefined;
      case 'create': {
        let cur = obj;
        if (report?.state !== 'creating') {
          // Not over a report that a stale cache did not show yet (available, or deletion under way).
          const begun = await this.#begin(
            VOLUME_SNAPSHOTS,
            cur,
            (fresh) => snapshotPending(fresh, this.nodeName),
            () => ({
              node: this.nodeName,
              state: 'creating',
            }),
          );
          if (!begun) return { requeue: true };
          cur = begun;
        }
        try {
          const backend = await this.#backendOf(vol!);
          const taken = await backend.createSnapshot(vol!.status!.host!.location!, refOf(snap));
          log.info({ location: taken.location }, 'snapshot created');
          await this.#report(VOLUME_SNAPSHOTS, cur, () => ({
            node: this.nodeName,
            state: 'available',
            location: taken.location,
          }));
        } catch (err) {
          log.warn({ err }, 'snapshot create failed');
          await this.#report(VOLUME_SNAPSHOTS, cur, () => ({
            node: this.nodeName,
            state: 'error',
            fault: `snapshot failed: ${errorMessage(err)}`,
          }));
          throw err;
        }
        return undefined;
      }
      case 'delete': {
        let cur = obj;
        if (report?.state !== 'deleting') {
          cur = await this.#report(VOLUME_SNAPSHOTS, cur, (r) => ({
            ...(r ?? { node: this.nodeName }),
            state: 'deleting',
          }));
        }
        try {
          const backend = await this.#snapshotBackend(report?.location, vol);
          const location = report?.location ?? (await findByUid(backend, 'snapshots', snap.metadata.uid!));
          if (location) await backend.deleteSnapshot(location);
          log.info({ location }, 'snapshot deleted');
        } catch (err) {
          log.warn({ err }, 'snapshot delete failed');
          await this.#report(VOLUME_SNAPSHOTS, cur, (r) => ({
            ...(r ?? { node: this.nodeName }),
            state: 'error',
            fault: `delete failed: ${errorMessage(err)}`,
          }));
          throw err;
        }
        await this.#report(VOLUME_SNAPSHOTS, cur, () => ({ node: this.nodeName, state: 'deleted' }));
        return undefined;
      }
    }
  }

  /** A snapshot's backend: its volume's, else (volume gone) the local one for a local:// location. */
  async #snapshotBackend(location: string | undefined, vol: Volume | undefined): Promise<VolumeBackend> {
    if (vol) return this.#backendOf(vol);
    const local = this.#o.backends.get('local');
    if (local && (!location || location.startsWith('local://'))) return local;
    throw new Error('the source volume is gone: cannot tell which backend holds the snapshot');
  }

  // -------------------------------------------------------------------------------------------------------------
  // Orphan sweep
  // -------------------------------------------------------------------------------------------------------------

  /**
   * Deletes local volumes and snapshots whose Volume / VolumeSnapshot (by uid, any namespace) no longer exists,
   * confirmed by a live list. Returns the locations deleted.
   */
  async sweepOrphans(): Promise<string[]> {
    const local = this.#o.backends.get('local');
    if (!local || !this.volumes.hasSynced() || !this.snapshots.hasSynced()) return [];
    const held = await local.list();
    const unknown = (inf: Informer<StorageObject>, locs: string[]) =>
      locs.filter((l) => {
        const uid = uidOfLocation(l);
        return uid !== undefined && inf.byIndex('uid', uid).length === 0;
      });
    const volumes = unknown(this.volumes, held.volumes);
    const snapshots = unknown(this.snapshots, held.snapshots);
    if (volumes.length === 0 && snapshots.length === 0) return [];
    const liveUids = async (gvr: GVR) =>
      new Set((await this.#client.listAll<StorageObject>(gvr)).items.map((o) => o.metadata?.uid));
    const deleted: string[] = [];
    if (snapshots.length > 0) {
      const live = await liveUids(VOLUME_SNAPSHOTS);
      for (const l of snapshots) {
        if (live.has(uidOfLocation(l))) continue;
        this.#log.warn({ location: l }, 'deleting an orphaned volume snapshot');
        await local.deleteSnapshot(l);
        deleted.push(l);
      }
    }
    if (volumes.length > 0) {
      const live = await liveUids(VOLUMES);
      for (const l of volumes) {
        const uid = uidOfLocation(l)!;
        if (live.has(uid)) continue;
        this.#log.warn({ location: l }, 'deleting an orphaned volume');
        if (this.#o.exporter) await this.#o.exporter.removeExport(exportName(uid));
        await local.delete(l);
        deleted.push(l);
      }
    }
    return deleted;
  }
}

/** A source that is not ready yet (a snapshot or volume still being made): retried, not reported as an error. */
class WaitError extends Error {
  override name = 'WaitError';
}

/** A snapshot not yet taken (no report, creating, or error) and not being deleted. */
function snapshotPending(obj: StorageObject, node: string): boolean {
  const snap = parseSnapshot(obj);
  if (!snap || snap.metadata.deletionTimestamp) return false;
  const state = ownReport(snap.status?.host, node)?.state;
  return state === undefined || state === 'creating' || state === 'error';
}

function refOf(o: { metadata: { uid?: string; name?: string; namespace?: string } }): VolumeRef {
  return { id: o.metadata.uid ?? '', name: o.metadata.name ?? '', namespace: o.metadata.namespace ?? '' };
}

async function findByUid(
  backend: VolumeBackend,
  kind: 'volumes' | 'snapshots',
  uid: string,
): Promise<string | undefined> {
  return (await backend.list())[kind].find((l) => uidOfLocation(l) === uid);
}

export function parseVolume(obj: unknown): Volume | undefined {
  const r = VolumeKind.schema.safeParse(obj);
  return r.success ? r.data : undefined;
}

export function parseSnapshot(obj: unknown): VolumeSnapshot | undefined {
  const r = VolumeSnapshotKind.schema.safeParse(obj);
  return r.success ? r.data : undefined;
}

function addUidIndex(inf: Informer<StorageObject>): void {
  try {
    inf.addIndex('uid', (o) => (o.metadata?.uid ? [o.metadata.uid] : []));
  } catch {
    // already added by another volume host on the same manager (simulated nodes)
  }
}

function addVolumeIndex(inf: Informer<StorageObject>): void {
  try {
    inf.addIndex('volume', (o) => {
      const v = (o.spec as { volume?: string } | undefined)?.volume;
      return v ? [`${o.metadata?.namespace ?? ''}/${v}`] : [];
    });
  } catch {
    // already added
  }
}

/**
 * Enqueues the objects whose status.node is `node` (before or after the change), except for changes of status.host
 * alone (the host's own writes: a failure retries on the backoff, not through its own report). Resyncs pass.
 */
function forMine(inf: Informer<StorageObject>, c: Controller, node: string): void {
  const mine = (o: StorageObject) => o.status?.node === node;
  inf.addEventHandler({
    onAdd: (o) => {
      if (mine(o)) c.enqueue(objectKey(o));
    },
    onUpdate: (a, b) => {
      if ((mine(a) || mine(b)) && changedBesidesHost(a, b)) c.enqueue(objectKey(b));
    },
    onDelete: (o) => {
      if (mine(o)) c.enqueue(objectKey(o));
    },
  });
}
