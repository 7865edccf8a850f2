// The agent's attachment side (Nova's block-device side, docs/design/storage.md "Attachments on the server's node"):
// for every Server bound to this node whose guest exists, the volumes QEMU should have (the attachments of Volumes in
// the server's namespace to this server on this node, attaching or attached) against the volumes it has
// (driver.volumes(), read back from QEMU), reconciled by decideAttachments():
//   - attach what is desired and missing, once its connection is ready (a local volume held here: the local backend's
//     connection(); a local volume held on another node: the NBD export its volume host lists for this server; rbd:
//     the rbd backend of the volume type); no connection yet is a wait, not an error;
//   - detach what is attached and no longer desired (attachment detaching or gone); never the boot volume of a guest
//     (it goes with the guest);
//   - extend: the size QEMU sees is below the size the volume is extended to (local: spec.size while the volume is
//     extending, the agent's QEMU grows the qcow2 with block_resize; rbd: host.size once the backend grew the image);
//   - QoS from the volume type (setVolumeQos when it changes).
// What the guest has is reported in status.compute.volumes (the only status key this controller writes: an
// RV-guarded merge patch under the agent's field manager, as compute.ts writes the rest of the report). The state
// always comes from the driver, so an agent restart reads the attachments back and never attaches twice; failures
// are reported (state error, fault) and retried with backoff.
import type { KubernetesObject } from '@kubernetes/client-node';
import {
  NODE_LEASE_NAMESPACE,
  parseBytes,
  SERVER_NODE_LABEL,
  type Server,
  ServerKind,
  sameJSON,
  type Volume,
  VolumeKind,
  type VolumeType,
  VolumeTypeKind,
} from '../../../operator/src/api/index.ts';
import {
  type Controller,
  defaultControllerRateLimiter,
  type GVR,
  type Informer,
  isNotFound,
  type KubeClient,
  type Logger,
  type Manager,
  type ReconcileContext,
  type ReconcileResult,
  type Request,
  silentLogger,
  updateStatus,
} from '../../../operator/src/runtime/index.ts';
import type { AttachedVolume, HypervisorDriver, VolumeAttachmentSpec, VolumeConnection, VolumeQos } from '../driver.ts';
import { volumeSerial } from '../driver.ts';
import { agentFieldManager } from '../fieldmanager.ts';
import type { VolumeBackend, VolumeRef } from './backend.ts';

const SERVERS: GVR = { group: ServerKind.group, version: ServerKind.version, plural: ServerKind.plural };
export const VOLUMES: GVR = { group: VolumeKind.group, version: VolumeKind.version, plural: VolumeKind.plural };
export const VOLUME_TYPES: GVR = {
  group: VolumeTypeKind.group,
  version: VolumeTypeKind.version,
  plural: VolumeTypeKind.plural,
};
const SECRETS: GVR = { group: '', version: 'v1', plural: 'secrets' };

/** The Secret the operator creates with the NBD TLS-PSK credentials (keys identity and key). */
export const NBD_SECRET = 'stratus-volume-nbd';
/** Volume index: the uids of the servers the volume has an attachment to. */
const BY_SERVER = 'attach/serverUID';
/** Volume index: the volume's uid. */
const BY_UID = 'attach/uid';
/** Retry delays after a failed attach/detach/extend: doubling from the base up to the cap. */
const RETRY_BASE_MS = 1000;
const RETRY_MAX_MS = 60_000;
/** A connection that is not ready yet: the Volume's next change requeues the server; this is the safety net. */
const WAIT_MS = 15_000;

type Bus = 'virtio' | 'scsi';
type VolumeObject = KubernetesObject & Volume;
type ServerObject = KubernetesObject & { spec?: unknown; status?: Record<string, unknown> };
type Status = Record<string, unknown>;

/** An NBD export of a local volume held on another node, as its volume host lists it in status.host.exports. */
export interface NbdExportRef {
  host: string;
  port: number;
  name: string;
}

/** The NBD client credentials (Secret stratus-volume-nbd). */
export interface NbdPsk {
  identity: string;
  /** 64 hex characters. */
  key: string;
}

/**
 * How this node reaches volumes (injected; the lead wires the real LocalBackend, RbdBackend and NBD client in
 * agent.ts): the backends by name, the rbd backend of a volume type, and the NBD client connection.
 */
export interface VolumeConnectors {
  /** Backends by VolumeType spec.backend name ('local'). */
  backends: ReadonlyMap<string, VolumeBackend>;
  /** The rbd backend for a volume type's options (monitors, pool, user, secret). */
  rbd?: (type: VolumeType) => VolumeBackend | Promise<VolumeBackend>;
  /**
   * How this node's QEMU opens a local volume another node exports (volumes/nbd-export.ts nbdConnection): the client
   * side of the export, with the PSK credentials from the Secret stratus-volume-nbd.
   */
  nbd?: (vol: VolumeRef, exp: NbdExportRef, psk: NbdPsk) => VolumeConnection | Promise<VolumeConnection>;
}

/** A volume the guest should have: an attachment of its server on this node, attaching or attached. */
export interface DesiredVolume {
  volume: string;
  volumeUID: string;
  bus: Bus;
  bootIndex?: number;
  /** The server's spec.bootVolume: given at spawn (GuestSpec.rootVolume), never hot-plugged nor unplugged. */
  boot: boolean;
  /** Throttle limits of the volume type (normalized: no zero or absent values). */
  qos: VolumeQos;
  /** The size QEMU should see while the volume is being extended, in bytes. */
  extendTo?: number;
}

export type AttachAction =
  | { kind: 'attach'; volume: DesiredVolume }
  | { kind: 'detach'; volumeId: string }
  | { kind: 'extend'; volumeId: string; sizeBytes: number }
  | { kind: 'qos'; volumeId: string; qos: VolumeQos }
  /** Attached and no longer desired, but kept (the boot volume: it goes with the guest). */
  | { kind: 'keep'; volumeId: string; reason: string };

export interface DecideOptions {
  /** Volume uid of the server's boot volume, if it boots from one. */
  bootVolumeUID?: string;
  /** The canonical JSON of the QoS last applied per volume (unknown after a restart: applied again). */
  appliedQos: ReadonlyMap<string, string>;
  /** The server is being deleted: nothing new is attached. */
  deleting?: boolean;
}

/** Volume QoS without zero or absent limits (0 is unlimited), keys sorted: comparable as JSON. */
export function normalizeQos(q: Readonly<Record<string, number | undefined>> | undefined): VolumeQos {
  const out: Record<string, number> = {};
  for (const k of Object.keys(q ?? {}).sort()) {
    const v = q?.[k];
    if (typeof v === 'number' && v > 0) out[k] = v;
  }
  return out as VolumeQos;
}

export const qosKey = (q: VolumeQos): string => JSON.stringify(normalizeQos(q as Record<string, number>));

/**
 * What to do on a guest, given the volumes it should have and those it has (pure). Detaches come first (they free
 * device slots), then attaches, extends and QoS changes. The boot volume is never hot-plugged (it is the root disk
 * given at spawn) nor unplugged (it goes with the guest).
 */
export function decideAttachments(
  desired: readonly DesiredVolume[],
  observed: readonly AttachedVolume[],
  o: DecideOptions,
): AttachAction[] {
  const want = new Map(desired.map((d) => [d.volumeUID, d]));
  const have = new Map(observed.map((v) => [v.volumeId, v]));
  const out: AttachAction[] = [];
  for (const v of observed) {
    if (want.has(v.volumeId)) continue;
    if (v.volumeId === o.bootVolumeUID) {
      out.push({ kind: 'keep', volumeId: v.volumeId, reason: 'the boot volume goes with the guest' });
    } else {
      out.push({ kind: 'detach', volumeId: v.volumeId });
    }
  }
  for (const d of desired) {
    if (have.has(d.volumeUID) || d.boot || o.deleting) continue;
    out.push({ kind: 'attach', volume: d });
  }
  for (const d of desired) {
    const v = have.get(d.volumeUID);
    if (!v) continue;
    if (d.extendTo !== undefined && v.sizeBytes !== undefined && d.extendTo > v.sizeBytes) {
      out.push({ kind: 'extend', volumeId: d.volumeUID, sizeBytes: d.extendTo });
    }
    if (o.appliedQos.get(d.volumeUID) !== qosKey(d.qos)) {
      out.push({ kind: 'qos', volumeId: d.volumeUID, qos: normalizeQos(d.qos as Record<string, number>) });
    }
  }
  return out;
}

/** Bytes as a Kubernetes quantity, exact (1Gi, 1536Mi, 1000). */
export function bytesQuantity(n: number): string {
  for (const [suffix, unit] of [
    ['Ti', 2 ** 40],
    ['Gi', 2 ** 30],
    ['Mi', 2 ** 20],
    ['Ki', 2 ** 10],
  ] as const) {
    if (n >= unit && n % unit === 0) return `${n / unit}${suffix}`;
  }
  return String(n);
}

/** One entry of status.compute.volumes. */
export interface VolumeReportEntry {
  volume: string;
  volumeUID: string;
  serial?: string;
  bus?: Bus;
  device?: string;
  state: 'attached' | 'error';
  fault?: string;
  size?: string;
}

/** The last failure of an operation on one volume of a guest. */
export interface VolumeFault {
  op: 'attach' | 'detach' | 'extend' | 'qos' | 'connection';
  message: string;
}

/**
 * status.compute.volumes (pure): every volume the guest has (attached; a failed detach: error), plus desired volumes
 * whose attach failed (error), with the fault of the last failure; sorted by volume name.
 */
export function volumeReport(
  desired: readonly DesiredVolume[],
  observed: readonly AttachedVolume[],
  faults: ReadonlyMap<string, VolumeFault>,
  nameOf: (uid: string) => string,
): VolumeReportEntry[] {
  const out: VolumeReportEntry[] = [];
  const seen = new Set<string>();
  for (const v of observed) {
    seen.add(v.volumeId);
    const f = faults.get(v.volumeId);
    out.push({
      volume: nameOf(v.volumeId),
      volumeUID: v.volumeId,
      serial: v.serial,
      bus: v.bus,
      device: v.device,
      state: f?.op === 'detach' ? 'error' : 'attached',
      ...(f ? { fault: f.message.slice(0, 4096) } : {}),
      ...(v.sizeBytes !== undefined ? { size: bytesQuantity(v.sizeBytes) } : {}),
    });
  }
  for (const d of desired) {
    const f = faults.get(d.volumeUID);
    if (seen.has(d.volumeUID) || !f || (f.op !== 'attach' && f.op !== 'connection')) continue;
    out.push({
      volume: d.volume,
      volumeUID: d.volumeUID,
      serial: volumeSerial(d.volumeUID),
      bus: d.bus,
      state: 'error',
      fault: f.message.slice(0, 4096),
    });
  }
  return out.sort((a, b) => a.volume.localeCompare(b.volume) || a.volumeUID.localeCompare(b.volumeUID));
}

/**
 * Update predicate: any change of a Server but this controller's own report (status.compute.volumes), so a failed
 * operation is retried on the backoff and not at once through the write of its fault.
 */
export function serverChangedForVolumes(a: ServerObject, b: ServerObject): boolean {
  if (a === b) return true;
  const strip = (o: ServerObject) => {
    const { resourceVersion: _rv, managedFields: _mf, ...metadata } = o.metadata ?? {};
    const compute = { ...((o.status?.compute as Status | undefined) ?? {}) };
    delete compute.volumes;
    return JSON.stringify({ ...o, metadata, status: { ...(o.status ?? {}), compute } });
  };
  return strip(a) !== strip(b);
}

/** What compute.ts needs at spawn: the boot volume and the volumes ready at first boot. */
export type BlockDevices =
  | { ready: true; rootVolume?: VolumeAttachmentSpec; volumes: VolumeAttachmentSpec[] }
  | { ready: false; reason: string };

export interface VolumeAttacherOptions {
  manager: Manager;
  nodeName: string;
  driver: HypervisorDriver;
  /** The compute controller's informer of the Servers bound to this node (shared). */
  servers: Informer<ServerObject>;
  connectors: VolumeConnectors;
  /** Namespace of the Secret stratus-volume-nbd (the operator's; default NODE_LEASE_NAMESPACE). */
  secretNamespace?: string;
  concurrency?: number;
  logger?: Logger;
}

function errorMessage(err: unknown): string {
  return (err instanceof Error ? err.message : String(err)).slice(0, 4096);
}

function addIndexOnce<T extends KubernetesObject>(inf: Informer<T>, name: string, fn: (o: T) => string[]): void {
  try {
    inf.addIndex(name, fn);
  } catch (err) {
    if (!(err instanceof Error) || !err.message.includes('already exists')) throw err;
  }
}

/** The Nova block-device side of one node: attaches, detaches, extends and throttles the volumes of its guests. */
export class VolumeAttacher {
  readonly nodeName: string;
  readonly controller: Controller;
  readonly volumes: Informer<VolumeObject>;
  readonly volumeTypes: Informer<KubernetesObject & VolumeType>;
  readonly #o: VolumeAttacherOptions;
  readonly #client: KubeClient;
  readonly #driver: HypervisorDriver;
  readonly #log: Logger;
  /** QoS last applied, by `<server uid>/<volume uid>`. */
  readonly #qos = new Map<string, string>();
  /** Last failure, by server uid then volume uid (cleared by a success). */
  readonly #faults = new Map<string, Map<string, VolumeFault>>();
  /** Consecutive failed reconciles per server uid (retry backoff). */
  readonly #retries = new Map<string, number>();

  constructor(o: VolumeAttacherOptions) {
    this.#o = o;
    this.nodeName = o.nodeName;
    this.#client = o.manager.client;
    this.#driver = o.driver;
    this.#log = (o.logger ?? o.manager.logger ?? silentLogger()).child({ node: o.nodeName, component: 'volumes' });
    this.volumes = o.manager.informer<VolumeObject>(VOLUMES);
    this.volumeTypes = o.manager.informer<KubernetesObject & VolumeType>(VOLUME_TYPES);
    addIndexOnce(this.volumes, BY_SERVER, (v) => [
      ...new Set((v.status?.attachments ?? []).flatMap((a) => (a.serverUID ? [a.serverUID] : []))),
    ]);
    addIndexOnce(this.volumes, BY_UID, (v) => (v.metadata?.uid ? [v.metadata.uid] : []));
    this.controller = o.manager.addController({
      name: `volume-attach/${o.nodeName}`,
      reconcile: (req, ctx) => this.reconcile(req, ctx),
      maxConcurrentReconciles: o.concurrency ?? 4,
      rateLimiter: defaultControllerRateLimiter({ baseDelayMs: 1000, maxDelayMs: 300_000 }),
      logger: this.#log,
    });
    this.controller.for(o.servers, { updatePredicate: serverChangedForVolumes });
    // An attachment that appears, changes state or goes, an export listed, an extend: the server's key.
    this.controller.watches(this.volumes, (v) => this.serverKeysOf(v));
    // QoS of a type changed: every server here with a volume of that type.
    this.controller.watches(this.volumeTypes, (t) => {
      const out: Request[] = [];
      for (const v of this.volumes.list()) {
        if (v.status?.volumeType !== t.metadata?.name) continue;
        for (const a of v.status?.attachments ?? []) {
          if (a.node === this.nodeName) out.push({ namespace: v.metadata?.namespace ?? '', name: a.server });
        }
      }
      return out;
    });
  }

  /** The servers on this node a Volume has an attachment to (the keys its changes requeue). */
  serverKeysOf(v: VolumeObject): Request[] {
    return (v.status?.attachments ?? [])
      .filter((a) => a.node === this.nodeName)
      .map((a) => ({ namespace: v.metadata?.namespace ?? '', name: a.server }));
  }

  async reconcile(req: Request, ctx: ReconcileContext): Promise<ReconcileResult> {
    const cached = this.#o.servers.get(req.name, req.namespace);
    if (!cached || cached.metadata?.labels?.[SERVER_NODE_LABEL] !== this.nodeName) return undefined;
    const server = ServerKind.schema.safeParse(cached);
    if (!server.success) return undefined;
    const s = server.data;
    const uid = s.metadata.uid;
    if (!uid || s.status?.node !== this.nodeName) return undefined;
    const guest = await this.#driver.state(uid);
    const observed = guest ? await this.#driver.volumes(uid) : [];
    const desired = guest ? this.desired(s) : [];
    const faults = this.#faultsOf(uid);
    const actions = decideAttachments(desired, observed, {
      ...(s.spec.bootVolume ? { bootVolumeUID: this.#volume(s, s.spec.bootVolume)?.metadata?.uid } : {}),
      appliedQos: this.#appliedQos(uid),
      deleting: !!s.metadata.deletionTimestamp,
    });
    let failed = false;
    let waiting = false;
    for (const a of actions) {
      const volumeId = a.kind === 'attach' ? a.volume.volumeUID : a.volumeId;
      let op: VolumeFault['op'] = a.kind === 'attach' ? 'connection' : (a.kind as VolumeFault['op']);
      try {
        switch (a.kind) {
          case 'keep':
            continue;
          case 'attach': {
            const spec = await this.attachmentSpec(s, a.volume);
            if (!spec) {
              waiting = true;
              faults.delete(volumeId);
              continue;
            }
            op = 'attach';
            await this.#driver.attachVolume(uid, spec);
            this.#qos.set(`${uid}/${volumeId}`, qosKey(a.volume.qos));
            ctx.log.info({ volume: a.volume.volume, bus: spec.bus }, 'volume attached');
            break;
          }
          case 'detach':
            await this.#driver.detachVolume(uid, volumeId);
            this.#qos.delete(`${uid}/${volumeId}`);
            ctx.log.info({ volumeUID: volumeId }, 'volume detached');
            break;
          case 'extend':
            await this.#driver.extendVolume(uid, volumeId, a.sizeBytes);
            ctx.log.info({ volumeUID: volumeId, bytes: a.sizeBytes }, 'volume extended');
            break;
          case 'qos':
            await this.#driver.setVolumeQos(uid, volumeId, a.qos);
            this.#qos.set(`${uid}/${volumeId}`, qosKey(a.qos));
            ctx.log.info({ volumeUID: volumeId, qos: a.qos }, 'volume qos set');
            break;
        }
        faults.delete(volumeId);
      } catch (err) {
        failed = true;
        faults.set(volumeId, { op, message: `${op} failed: ${errorMessage(err)}` });
        ctx.log.warn({ err, action: a.kind, volumeUID: volumeId }, 'volume operation failed');
      }
    }
    // Faults of volumes neither desired nor attached any more are moot.
    const live = new Set([...desired.map((d) => d.volumeUID), ...observed.map((v) => v.volumeId)]);
    for (const id of faults.keys()) if (!live.has(id)) faults.delete(id);
    for (const k of this.#qos.keys()) {
      const [u, v] = k.split('/');
      if (u === uid && !live.has(v!)) this.#qos.delete(k);
    }
    const after =
      guest && actions.some((a) => a.kind !== 'keep' && a.kind !== 'qos') ? await this.#driver.volumes(uid) : observed;
    await this.#report(
      cached,
      uid,
      volumeReport(desired, after, faults, (id) => this.#nameOf(s, id, desired)),
    );
    if (failed) {
      const n = this.#retries.get(uid) ?? 0;
      this.#retries.set(uid, n + 1);
      return { requeueAfter: Math.min(RETRY_BASE_MS * 2 ** n, RETRY_MAX_MS) };
    }
    this.#retries.delete(uid);
    if (faults.size === 0) this.#faults.delete(uid);
    return waiting ? { requeueAfter: WAIT_MS } : undefined;
  }

  /**
   * The volumes the server's guest should have: attachments to this server (by uid) on this node, attaching or
   * attached, of Volumes in its namespace.
   */
  desired(server: Server): DesiredVolume[] {
    const uid = server.metadata.uid ?? '';
    const ns = server.metadata.namespace ?? '';
    const out: DesiredVolume[] = [];
    for (const v of this.volumes.byIndex(BY_SERVER, uid)) {
      if ((v.metadata?.namespace ?? '') !== ns || !v.metadata?.uid) continue;
      const att = (v.status?.attachments ?? []).find(
        (a) => a.serverUID === uid && a.node === this.nodeName && (a.state === 'attaching' || a.state === 'attached'),
      );
      if (!att) continue;
      const name = v.metadata.name ?? '';
      const boot = server.spec.bootVolume === name;
      const entry = server.spec.volumes?.find((e) => e.volume === name);
      const bootIndex = boot ? 0 : (entry?.bootIndex ?? att.bootIndex);
      const extendTo = this.#extendTo(v);
      out.push({
        volume: name,
        volumeUID: v.metadata.uid,
        bus: entry?.bus ?? att.bus ?? 'virtio',
        ...(bootIndex !== undefined ? { bootIndex } : {}),
        boot,
        qos: normalizeQos(this.#type(v)?.spec.qos as Record<string, number> | undefined),
        ...(extendTo !== undefined ? { extendTo } : {}),
      });
    }
    return out.sort((a, b) => a.volume.localeCompare(b.volume));
  }

  /**
   * For compute.ts at spawn: the boot volume (bootIndex 0), which must be attaching or attached with its connection
   * ready, else not ready (the spawn waits); and the other volumes whose connection is ready (the rest is hot-plugged
   * later).
   */
  async blockDevices(server: Server): Promise<BlockDevices> {
    const desired = this.desired(server);
    let rootVolume: VolumeAttachmentSpec | undefined;
    if (server.spec.bootVolume) {
      const d = desired.find((x) => x.boot);
      if (!d) {
        return {
          ready: false,
          reason: `boot volume ${server.spec.bootVolume} is not attaching to this server on ${this.nodeName} yet`,
        };
      }
      try {
        rootVolume = await this.attachmentSpec(server, d);
      } catch (err) {
        // shown on the server while the spawn waits (e.g. no backend for it on this node), retried with backoff
        return { ready: false, reason: `boot volume ${server.spec.bootVolume}: ${errorMessage(err)}` };
      }
      if (!rootVolume) {
        return {
          ready: false,
          reason: `boot volume ${server.spec.bootVolume}: no connection from ${this.nodeName} yet`,
        };
      }
      rootVolume = { ...rootVolume, bootIndex: 0 };
    }
    const volumes: VolumeAttachmentSpec[] = [];
    for (const d of desired) {
      if (d.boot) continue;
      const spec = await this.attachmentSpec(server, d).catch((err: unknown) => {
        this.#log.warn({ err, volume: d.volume }, 'no connection at spawn; attached later');
        return undefined;
      });
      if (spec) volumes.push(spec);
    }
    return { ready: true, ...(rootVolume ? { rootVolume } : {}), volumes };
  }

  /** The driver's attachment of a desired volume, or undefined while its connection is not ready. */
  async attachmentSpec(server: Server, d: DesiredVolume): Promise<VolumeAttachmentSpec | undefined> {
    const vol = this.volumes.byIndex(BY_UID, d.volumeUID)[0];
    if (!vol) return undefined;
    const connection = await this.connection(server, vol);
    if (!connection) return undefined;
    const qos = normalizeQos(d.qos as Record<string, number>);
    return {
      connection,
      bus: d.bus,
      ...(d.bootIndex !== undefined ? { bootIndex: d.bootIndex } : {}),
      ...(Object.keys(qos).length > 0 ? { qos } : {}),
    };
  }

  /**
   * How this node's QEMU opens the volume: a local volume held here through the local backend, one held on another
   * node through the NBD export its volume host lists for this server, an rbd volume through the rbd backend of its
   * type. Undefined while that is not ready (no location yet, no export yet, no NBD credentials yet).
   */
  async connection(server: Server, vol: VolumeObject): Promise<VolumeConnection | undefined> {
    const st = vol.status ?? {};
    const host = st.host;
    if (!host?.location || (host.state !== 'available' && host.state !== 'extending')) return undefined;
    const ref: VolumeRef = { id: vol.metadata!.uid!, name: vol.metadata!.name!, namespace: vol.metadata!.namespace! };
    const backend = st.backend ?? 'local';
    const c = this.#o.connectors;
    if (backend === 'rbd') {
      const type = this.#type(vol);
      if (!type) throw new Error(`volume type ${st.volumeType} not found`);
      if (!c.rbd) throw new Error(`no rbd backend on ${this.nodeName}`);
      return (await c.rbd(type)).connection(ref, host.location);
    }
    if (backend !== 'local') throw new Error(`unknown volume backend ${backend}`);
    if ((st.node ?? host.node) === this.nodeName) {
      const local = c.backends.get('local');
      if (!local) throw new Error(`no local volume backend on ${this.nodeName}`);
      return local.connection(ref, host.location);
    }
    const exp = (host.exports ?? []).find((e) => e.server === server.metadata.name && e.node === this.nodeName);
    if (!exp) return undefined;
    if (!c.nbd) throw new Error(`no NBD client on ${this.nodeName}`);
    const psk = await this.#nbdPsk();
    if (!psk) return undefined;
    return c.nbd(ref, { host: exp.host, port: exp.port, name: exp.name }, psk);
  }

  /** The NBD credentials the operator distributes (Secret stratus-volume-nbd), or undefined while it is missing. */
  async #nbdPsk(): Promise<NbdPsk | undefined> {
    let secret: KubernetesObject & { data?: Record<string, string> };
    try {
      secret = await this.#client.get(SECRETS, NBD_SECRET, this.#o.secretNamespace ?? NODE_LEASE_NAMESPACE);
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
    const dec = (k: string) => (secret.data?.[k] ? Buffer.from(secret.data[k], 'base64').toString('utf8').trim() : '');
    const identity = dec('identity') || 'stratus';
    const key = dec('key');
    return key ? { identity, key } : undefined;
  }

  /**
   * The size QEMU should see: a local volume being extended grows to spec.size through the guest's QEMU
   * (block_resize; the volume host must not touch an in-use qcow2); an rbd image to what the backend holds.
   */
  #extendTo(v: VolumeObject): number | undefined {
    const st = v.status ?? {};
    if ((st.backend ?? 'local') === 'local') {
      return st.status === 'extending' ? Number(parseBytes(v.spec.size)) : undefined;
    }
    return st.host?.size ? Number(parseBytes(st.host.size)) : undefined;
  }

  #type(v: VolumeObject): (KubernetesObject & VolumeType) | undefined {
    const name = v.status?.volumeType ?? v.spec.volumeType;
    return name ? this.volumeTypes.get(name) : undefined;
  }

  #volume(server: Server, name: string): VolumeObject | undefined {
    return this.volumes.get(name, server.metadata.namespace);
  }

  #nameOf(server: Server, uid: string, desired: readonly DesiredVolume[]): string {
    const d = desired.find((x) => x.volumeUID === uid);
    if (d) return d.volume;
    const v = this.volumes.byIndex(BY_UID, uid)[0];
    if (v?.metadata?.name) return v.metadata.name;
    const prev = (server.status?.compute?.volumes ?? []).find((x) => x.volumeUID === uid);
    return prev?.volume ?? uid;
  }

  #faultsOf(uid: string): Map<string, VolumeFault> {
    let m = this.#faults.get(uid);
    if (!m) {
      m = new Map();
      this.#faults.set(uid, m);
    }
    return m;
  }

  #appliedQos(uid: string): Map<string, string> {
    const out = new Map<string, string>();
    for (const [k, v] of this.#qos) {
      const [u, id] = k.split('/');
      if (u === uid) out.set(id!, v);
    }
    return out;
  }

  /**
   * Writes status.compute.volumes (only that key of the report; RV-guarded merge patch, the agent's field manager).
   * A report of another node is left to that node's compute controller: this node writes once its own report is
   * there (or there is none yet).
   */
  async #report(obj: ServerObject, uid: string, entries: VolumeReportEntry[]): Promise<void> {
    try {
      await updateStatus(
        this.#client,
        SERVERS,
        obj,
        (st, cur) => {
          if (cur.metadata?.uid !== uid) return undefined;
          const compute = st.compute as Status | undefined;
          if (compute && compute.node !== this.nodeName) return undefined;
          const prev = (compute?.volumes as unknown[] | undefined) ?? [];
          if (sameJSON(prev, entries)) return undefined;
          st.compute = { ...(compute ?? { node: this.nodeName }), volumes: entries.length > 0 ? entries : null };
          return st;
        },
        { fieldManager: agentFieldManager(this.nodeName) },
      );
    } catch (err) {
      if (isNotFound(err)) return;
      throw err;
    }
  }
}
