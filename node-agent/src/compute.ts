// The per-node Server reconciler (nova-compute's instance lifecycle). It watches the Servers bound to its node
// (label compute.stratus.io/node=<node>), decides the next step with lifecycle.decide() from the Server and the
// guest the driver reports, and executes it, looping until nothing is left to do. Level-triggered and idempotent:
// the guest's state always comes from the driver, so an agent restart adopts running guests, and a Server never
// gets a second guest (spawn happens only when the driver has none for its uid).
//
// Every status write is updateStatus (resourceVersion-guarded merge patch of the agent's own fields, field manager
// stratus-agent/<node>; who owns which field: docs/design/status-ownership.md). The agent never writes the
// user-facing state fields (vmState, taskState, status, powerState, fault, actions: the operator's): it works on a
// view of the Server whose state fields are its own report status.compute, or the operator's request it has not
// taken up yet (server-state.ts stateView), and each write stores the view's state in status.compute (withReport),
// from which the operator derives the user-facing fields. A write that
// starts a step re-checks the decision against the object it is about to patch, so a stale cache or a concurrent
// writer makes the step re-decide instead of acting twice. The agent's own status writes do not requeue the
// Server (see serverChanged); operator writes that matter (binding, NOSTATE on node loss) do.
//
// A server with spec.networks gets its guest (first spawn, hard-reboot re-creation, rebuild, resize/migrate) only
// once the node's network service reports its ports usable and wired here; the NICs go into GuestSpec.nics.
// Meanwhile the server shows taskState networking (while building) and Ready False WaitingForNetwork.
//
// A guest whose Server left this node's informer is destroyed only when the Server is deleted or the operator
// recorded a move away (placement.ts guestVerdict), checked on a live read when the Server's key is reconciled and
// by the orphan sweep (on start and periodically, after a grace period) for guests no Server bound here owns. A
// changed node label alone (a kubectl label edit, a bad patch) keeps the guest running, and its ports wired
// (retainedServers), with an Event and the condition Placement False NodeLabelMismatch.
import type { KubernetesObject } from '@kubernetes/client-node';
import {
  GUEST_FINALIZER,
  type KeyPair,
  KeyPairKind,
  SERVER_NODE_LABEL,
  type Server,
  ServerKind,
  stateView,
  toGiB,
  toMiB,
  withReport,
} from '../../operator/src/api/index.ts';
import {
  addFinalizer,
  type Clock,
  type Controller,
  defaultControllerRateLimiter,
  type EventRecorder,
  type GVR,
  hasFinalizer,
  Informer,
  isNotFound,
  type KubeClient,
  type Logger,
  type Manager,
  objectKey,
  type ReconcileContext,
  type ReconcileResult,
  type Request,
  removeFinalizer,
  setCondition,
  silentLogger,
  systemClock,
  type TimerHandle,
  updateStatus,
} from '../../operator/src/runtime/index.ts';
import type {
  DiskExport,
  GuestExit,
  GuestNetworkInterface,
  GuestSpec,
  GuestState,
  HypervisorDriver,
  VolumeAttachmentSpec,
} from './driver.ts';
import { agentFieldManager } from './fieldmanager.ts';
import { ImageError, type ImageErrorReason } from './images/cache.ts';
import { imageSourceOf } from './images/source.ts';
import {
  AGENT_TASKS,
  type AgentAction,
  appendAction,
  type ConditionUpdate,
  type Decision,
  decide,
  desiredVmState,
  finishAction,
  interruptActions,
  NOT_REFUSED,
  recordTriggers,
  refusalIsStale,
  setConditions,
  setStates,
  startAction,
  TRANSITIONS,
  TRIGGERS,
  type Trigger,
} from './lifecycle.ts';
import { NetworkNotReadyError, type ServerNetworkService } from './network/controller.ts';
import { guestVerdict, NODE_LABEL_MISMATCH, PLACEMENT_CONDITION } from './placement.ts';
import type { BlockDevices } from './volumes/attach.ts';

export const SERVERS: GVR = { group: ServerKind.group, version: ServerKind.version, plural: ServerKind.plural };
const KEYPAIRS: GVR = { group: KeyPairKind.group, version: KeyPairKind.version, plural: KeyPairKind.plural };
const SECRETS: GVR = { group: '', version: 'v1', plural: 'secrets' };

/** A Server as the informer holds it (raw JSON; parsed with ServerKind.schema where read). */
export type ServerObject = KubernetesObject & { spec?: unknown; status?: Record<string, unknown> };
type Status = Record<string, unknown>;

/** Tokens already in the spec when a guest is first created are recorded, not run. */
const INITIAL_TRIGGERS: readonly Trigger[] = [...TRIGGERS, 'rebuild'];
/** Steps one reconcile may take before requeueing itself (a full cycle needs at most about five). */
const MAX_STEPS = 12;
/** Requeue delays while a server waits for its network: doubling from the base up to the cap. */
const NETWORK_WAIT_BASE_MS = 1000;
const NETWORK_WAIT_MAX_MS = 30_000;

/** The volumes a guest is created with (boot volume, volumes ready at first boot). */
interface GuestVolumes {
  rootVolume?: VolumeAttachmentSpec;
  volumes: VolumeAttachmentSpec[];
}

/** A step that must wait: the reconcile ends and the server comes back after this delay (or on a wake-up). */
interface Requeue {
  requeueAfterMs: number;
}

export interface ComputeOptions {
  manager: Manager;
  nodeName: string;
  driver: HypervisorDriver;
  events: EventRecorder;
  /** The node's Hypervisor reporter: the accelerator guests get, and a nudge when usage changed. */
  hypervisor: { accelerator(): 'kvm' | 'tcg' | undefined; poke(): void };
  /**
   * The node's network service: a server with spec.networks gets its guest only once plug() returns its NICs
   * (meanwhile taskState networking while building, and Ready False WaitingForNetwork). Without it, guests get no
   * NICs.
   */
  network?: ServerNetworkService;
  /**
   * The node's volume attacher (volumes/attach.ts): the boot volume and the volumes attached at first boot. A server
   * with spec.bootVolume gets its guest only once its attachment is ready (meanwhile taskState block_device_mapping
   * while building, and Ready False WaitingForVolume). Without it, guests get no volumes at spawn.
   */
  volumes?: { blockDevices(server: Server): Promise<BlockDevices> };
  /**
   * Address this node serves a moving guest's disks on (NBD, cold migration source; the node's --host-ip, reachable
   * from the other nodes). Default 127.0.0.1 (several agents on one host).
   */
  hostIP?: string;
  /** Parallel Server reconciles (default 4). */
  concurrency?: number;
  /** Grace of a graceful power off before it is forced (default 60 s, Nova's shutdown_timeout). */
  powerOffTimeoutMs?: number;
  /** A guest no Server owns is destroyed after this long (default 60 s). */
  orphanGraceMs?: number;
  /** Orphan sweep period (default 60 s). */
  orphanSweepMs?: number;
  /** Every Server is reconciled this often even without events, re-syncing power states (default 60 s). */
  resyncMs?: number;
  logger?: Logger;
  clock?: Clock;
}

/**
 * Update predicate: spec and metadata changes, the operator's status fields (binding, flavor, allocation, image),
 * the operator's tasks and a NOSTATE set on node loss. The agent's own status writes are ignored, so a failing step
 * retries on the controller's backoff instead of requeueing itself through its own write.
 */
export function serverChanged(a: ServerObject, b: ServerObject): boolean {
  if (a === b) return true;
  const m = a.metadata ?? {};
  const n = b.metadata ?? {};
  const s = a.status ?? {};
  const t = b.status ?? {};
  const json = (v: unknown) => JSON.stringify(v ?? null);
  const agentTask = (x: unknown) => x === undefined || AGENT_TASKS.has(x as never);
  return (
    m.generation !== n.generation ||
    String(m.deletionTimestamp ?? '') !== String(n.deletionTimestamp ?? '') ||
    json(m.finalizers) !== json(n.finalizers) ||
    json(m.labels) !== json(n.labels) ||
    json(m.annotations) !== json(n.annotations) ||
    s.node !== t.node ||
    json(s.flavor) !== json(t.flavor) ||
    json(s.allocation) !== json(t.allocation) ||
    s.image !== t.image ||
    (s.taskState !== t.taskState && !(agentTask(s.taskState) && agentTask(t.taskState))) ||
    json(s.migration) !== json(t.migration) ||
    json(s.migrationSource) !== json(t.migrationSource) ||
    (t.powerState === 'NOSTATE' && s.powerState !== 'NOSTATE')
  );
}

export function parseServer(obj: unknown): Server | undefined {
  const r = ServerKind.schema.safeParse(obj);
  return r.success ? r.data : undefined;
}

function nowIso(clock: Clock): string {
  return new Date(clock.now()).toISOString().replace(/\.\d+Z$/, 'Z');
}

function errorMessage(err: unknown): string {
  return (err instanceof Error ? err.message : String(err)).slice(0, 1024);
}

const IMAGE_REASONS: Record<ImageErrorReason, string> = {
  DownloadFailed: 'download failed',
  ChecksumMismatch: 'checksum mismatch',
  FormatMismatch: 'disk format mismatch',
  NotADiskImage: 'not a disk image',
  NoSpace: 'not enough space in the node image cache',
  TooBig: 'image too big for the root disk of the flavor',
};

/** Why a spawn failed, for the fault and the SpawnFailed condition: image refusals name the image and the reason. */
export function spawnFailureMessage(err: unknown, image: string | undefined): string {
  if (err instanceof ImageError) {
    return `image ${image ?? '(unknown)'} unusable: ${IMAGE_REASONS[err.reason] ?? err.reason}: ${err.message}`.slice(
      0,
      1024,
    );
  }
  return errorMessage(err);
}

/** The Server's compute lifecycle on one node. */
export class ComputeService {
  readonly nodeName: string;
  readonly servers: Informer<ServerObject>;
  readonly controller: Controller;
  readonly #o: ComputeOptions;
  readonly #client: KubeClient;
  readonly #driver: HypervisorDriver;
  readonly #events: EventRecorder;
  readonly #log: Logger;
  readonly #clock: Clock;
  readonly #orphanSince = new Map<string, number>();
  /** Unexpected exits reported by the driver, by guest id, until recorded on the Server. */
  readonly #exits = new Map<string, GuestExit>();
  /** Consecutive network waits per server key (requeue backoff). */
  readonly #networkWaits = new Map<string, number>();
  /** The last Server object of every guest this agent runs, by guest id (uid), until the guest is destroyed. */
  readonly #hosted = new Map<string, ServerObject>();
  /** Guests kept although their Server is not bound here: the reason last reported, by guest id. */
  readonly #mismatch = new Map<string, string>();
  /** The stored object behind each Server view this agent works on (the base of its status patches). */
  readonly #stored = new WeakMap<Server, ServerObject>();
  #unsubscribe: (() => void) | undefined;
  #sweepTimer: TimerHandle | undefined;
  #stopped = false;
  /** Called when the set of retained servers changed (the network service rebuilds its plan). */
  onRetainedChanged: (() => void) | undefined;

  constructor(o: ComputeOptions) {
    this.#o = o;
    this.nodeName = o.nodeName;
    this.#client = o.manager.client;
    this.#driver = o.driver;
    this.#events = o.events;
    this.#clock = o.clock ?? systemClock;
    this.#log = (o.logger ?? o.manager.logger ?? silentLogger()).child({ node: o.nodeName });
    const labelSelector = `${SERVER_NODE_LABEL}=${o.nodeName}`;
    this.servers = o.manager.addInformer(
      `servers|${labelSelector}`,
      Informer.forResource<ServerObject>(this.#client, SERVERS, {
        labelSelector,
        resyncPeriodMs: o.resyncMs ?? 60_000,
        logger: this.#log,
        clock: this.#clock,
      }),
    );
    this.servers.addIndex('uid', (s) => (s.metadata?.uid ? [s.metadata.uid] : []));
    this.controller = o.manager.addController({
      name: `compute/${o.nodeName}`,
      reconcile: (req, ctx) => this.reconcile(req, ctx),
      maxConcurrentReconciles: o.concurrency ?? 4,
      rateLimiter: defaultControllerRateLimiter({ baseDelayMs: 1000, maxDelayMs: 300_000 }),
      logger: this.#log,
    });
    this.controller.for(this.servers, { updatePredicate: serverChanged });
  }

  /** Subscribes to guest exits and starts the orphan sweep (call once the manager has started). */
  start(): void {
    this.#unsubscribe = this.#driver.onGuestExit((e) => this.#onExit(e));
    const sweep = () => {
      if (this.#stopped) return;
      void this.sweepOrphans()
        .catch((err: unknown) => this.#log.warn({ err }, 'orphan sweep failed'))
        .finally(() => {
          if (!this.#stopped) this.#sweepTimer = this.#clock.setTimer(sweep, this.#o.orphanSweepMs ?? 60_000);
        });
    };
    sweep();
  }

  stop(): void {
    this.#stopped = true;
    this.#unsubscribe?.();
    this.#sweepTimer?.cancel();
  }

  /**
   * Destroys guests that no Server bound here owns and that have been orphaned for the grace period (a live read
   * confirms before anything is destroyed). Returns the number destroyed.
   */
  async sweepOrphans(): Promise<number> {
    if (!this.servers.hasSynced()) return 0;
    const now = this.#clock.now();
    const grace = this.#o.orphanGraceMs ?? 60_000;
    const guests = await this.#driver.list();
    const listed = new Set(guests.map((g) => g.id));
    for (const id of this.#orphanSince.keys()) if (!listed.has(id)) this.#orphanSince.delete(id);
    for (const id of this.#exits.keys()) if (!listed.has(id)) this.#exits.delete(id);
    let destroyed = 0;
    for (const g of guests) {
      if (this.servers.byIndex('uid', g.id).length > 0) {
        this.#orphanSince.delete(g.id);
        continue;
      }
      const since = this.#orphanSince.get(g.id) ?? now;
      this.#orphanSince.set(g.id, since);
      const source = await this.#readLive(g.namespace, g.name);
      if (source?.metadata?.uid === g.id && this.#isMoveSource(source)) {
        // The source of a move (e.g. after a restart of this agent): served by the server's reconcile, never swept.
        this.#orphanSince.delete(g.id);
        this.controller.enqueue(objectKey(source));
        continue;
      }
      if (now - since < grace) continue;
      const live = await this.#readLive(g.namespace, g.name);
      const verdict = guestVerdict(live, g.id, this.nodeName);
      if (!verdict.destroy) {
        if (!verdict.boundHere && live) await this.#keep(live, g.id, verdict.reason);
        continue;
      }
      this.#log.warn(
        { guest: g.id, server: `${g.namespace}/${g.name}`, reason: verdict.reason },
        'destroying an orphaned guest',
      );
      await this.#driver.destroy(g.id);
      this.#orphanSince.delete(g.id);
      this.#exits.delete(g.id);
      this.#released(g.id);
      await this.#finishDeletion(live, g.id);
      destroyed++;
    }
    if (destroyed > 0) this.#o.hypervisor.poke();
    return destroyed;
  }

  /**
   * Servers whose guest still runs here although they are not bound here (they left this node's informer after a
   * changed node label, or their status.node names another node): the network service keeps their ports wired.
   * Each is returned with status.node set to this node.
   */
  retainedServers(): ServerObject[] {
    const out: ServerObject[] = [];
    for (const [uid, s] of this.#hosted) {
      const cached = this.servers.byIndex('uid', uid)[0];
      if (cached?.status?.node === this.nodeName) continue;
      const cur = cached ?? s;
      out.push({ ...cur, status: { ...(cur.status ?? {}), node: this.nodeName } });
    }
    return out;
  }

  /** The guest of `uid` is gone: stop retaining its server. */
  #released(uid: string): void {
    this.#mismatch.delete(uid);
    if (this.#hosted.delete(uid)) this.onRetainedChanged?.();
  }

  /**
   * Keeps the guest of a Server that is not bound here (placement.ts): remembers the Server so its ports stay wired,
   * and reports it once per reason with a Warning Event and the condition Placement False NodeLabelMismatch.
   */
  async #keep(live: ServerObject, uid: string, reason: string): Promise<void> {
    const known = this.#hosted.has(uid);
    this.#hosted.set(uid, live);
    if (!known) this.onRetainedChanged?.();
    const cond = (live.status?.conditions as { type: string; status: string; message?: string }[] | undefined)?.find(
      (c) => c.type === PLACEMENT_CONDITION,
    );
    if (this.#mismatch.get(uid) === reason && cond?.status === 'False' && cond.message === reason) return;
    const server = `${live.metadata?.namespace}/${live.metadata?.name}`;
    this.#log.warn({ guest: uid, server, reason }, 'kept a guest whose server is not bound here');
    if (this.#mismatch.get(uid) !== reason) {
      this.#events.warning(
        { ...live, apiVersion: ServerKind.apiVersion, kind: ServerKind.kind },
        NODE_LABEL_MISMATCH,
        'KeepGuest',
        `guest kept on ${this.nodeName}: ${reason}`,
      );
    }
    this.#mismatch.set(uid, reason);
    await this.#setPlacement(live, { status: 'False', reason: NODE_LABEL_MISMATCH, message: reason });
  }

  /** Writes the Placement condition (only when it differs). */
  async #setPlacement(
    server: ServerObject,
    c: { status: 'True' | 'False'; reason: string; message: string },
  ): Promise<void> {
    try {
      await updateStatus(
        this.#client,
        SERVERS,
        server,
        (st, obj) => {
          const cur = (
            st.conditions as { type: string; status: string; reason?: string; message?: string }[] | undefined
          )?.find((x) => x.type === PLACEMENT_CONDITION);
          if (cur?.status === c.status && cur.reason === c.reason && cur.message === c.message) return undefined;
          if (obj.metadata?.uid !== server.metadata?.uid) return undefined;
          st.conditions = setCondition(
            st.conditions as never,
            { type: PLACEMENT_CONDITION, ...c },
            obj.metadata?.generation,
            new Date(this.#clock.now()),
          );
          return st;
        },
        { fieldManager: agentFieldManager(this.nodeName) },
      );
    } catch (err) {
      if (!isNotFound(err)) this.#log.warn({ err, server: objectKey(server) }, 'cannot write the Placement condition');
    }
  }

  async reconcile(req: Request, ctx: ReconcileContext): Promise<ReconcileResult> {
    const cached = this.servers.get(req.name, req.namespace);
    if (!cached || cached.metadata?.labels?.[SERVER_NODE_LABEL] !== this.nodeName) {
      const key = objectKey(cached ?? { metadata: { name: req.name, namespace: req.namespace } });
      this.#networkWaits.delete(key);
      this.#networkWaits.delete(`bdm|${key}`);
      return this.#gone(req, ctx);
    }
    let server = this.#view(cached);
    if (!server) {
      ctx.log.warn('server does not parse; ignored until it changes');
      return undefined;
    }
    await this.#boundAgain(cached);
    for (let step = 0; step < MAX_STEPS; step++) {
      const uid = server.metadata.uid;
      if (!uid) return undefined;
      const guest = await this.#driver.state(uid);
      if (guest) this.#hosted.set(uid, cached);
      else this.#released(uid);
      const d = decide(server, guest, this.nodeName);
      ctx.log.debug({ decision: d, guest: guest?.powerState }, 'step');
      const next = await this.#step(server, guest, d, ctx);
      if (!next) return undefined;
      if ('requeueAfterMs' in next) return { requeueAfter: next.requeueAfterMs };
      server = next;
    }
    return { requeue: true };
  }

  // ---- steps ----

  /** Executes one decision; returns the Server to continue with, or undefined when done. */
  async #step(
    server: Server,
    guest: GuestState | undefined,
    d: Decision,
    ctx: ReconcileContext,
  ): Promise<Server | Requeue | undefined> {
    const now = nowIso(this.#clock);
    const date = new Date(this.#clock.now());
    const uid = server.metadata.uid!;
    switch (d.kind) {
      case 'wait':
        return undefined;

      case 'steady': {
        const r = await this.#write(server, guest, d, (st, s) => {
          st.powerState = d.powerState;
          const updates: ConditionUpdate[] = [{ type: 'Ready', ...d.ready }];
          if (refusalIsStale(st.conditions as never, s.metadata.generation)) updates.push(NOT_REFUSED);
          setConditions(st, updates, s.metadata.generation, date);
        });
        return r.applied ? undefined : r.server;
      }

      case 'refuse': {
        const message = `${d.action}: ${d.reason}`;
        const previous = server.status?.conditions?.find((c) => c.type === 'ActionRefused');
        const r = await this.#write(server, guest, d, (st, s) => {
          if (d.trigger) recordTriggers(st, s, [d.trigger]);
          if (guest) st.powerState = guest.powerState;
          setConditions(
            st,
            [
              { type: 'ActionRefused', status: 'True', reason: 'Refused', message },
              { type: 'Ready', status: 'False', reason: 'ActionRefused', message: d.reason },
            ],
            s.metadata.generation,
            date,
          );
        });
        if (!r.applied) return r.server;
        if (d.trigger || previous?.status !== 'True' || previous.message !== message) {
          this.#events.warning(ref(r.server), 'ActionRefused', verbOf(d.action), message);
        }
        ctx.log.info({ action: d.action, reason: d.reason }, 'action refused');
        return d.trigger ? r.server : undefined;
      }

      case 'destroy': {
        const r = await this.#write(
          server,
          guest,
          d,
          (st) => {
            setStates(st, undefined, 'deleting');
            st.actions = startAction(st.actions as never, 'delete', now);
          },
          true,
        );
        if (!r.applied) return r.server;
        try {
          await this.#driver.destroy(uid);
        } catch (err) {
          await this.#write(r.server, undefined, undefined, (st) => {
            setStates(st, undefined, undefined);
            st.actions = finishAction(st.actions as never, 'delete', 'Error', now, errorMessage(err));
          });
          this.#events.warning(ref(r.server), 'DeleteFailed', 'Delete', errorMessage(err));
          throw err;
        }
        this.#exits.delete(uid);
        this.#o.hypervisor.poke();
        const done = await this.#write(r.server, undefined, undefined, (st, s) => {
          setStates(st, 'deleted', undefined);
          st.powerState = 'NOSTATE';
          // The guest took its volumes with it: the report says so, and the operator drops the attachments.
          if (st.compute) st.compute = { ...(st.compute as Status), volumes: null };
          st.actions = finishAction(st.actions as never, 'delete', 'Success', now);
          setConditions(
            st,
            [{ type: 'Ready', status: 'False', reason: 'Deleted', message: 'guest destroyed' }],
            s.metadata.generation,
            date,
          );
        });
        this.#events.normal(ref(done.server), 'Deleted', 'Delete', `guest destroyed on ${this.nodeName}`);
        ctx.log.info('guest destroyed');
        return done.server;
      }

      case 'releaseFinalizer': {
        await removeFinalizer(
          this.#client,
          SERVERS,
          server.metadata.name!,
          server.metadata.namespace,
          GUEST_FINALIZER,
          {
            current: server as unknown as KubernetesObject,
          },
        );
        ctx.log.info('guest finalizer released');
        return undefined;
      }

      case 'spawn':
      case 'adopt': {
        if (!hasFinalizer(server as unknown as KubernetesObject, GUEST_FINALIZER)) {
          // Before a guest exists: the Server cannot disappear without the agent destroying it.
          const obj = await addFinalizer(
            this.#client,
            SERVERS,
            server.metadata.name!,
            server.metadata.namespace,
            GUEST_FINALIZER,
            { current: this.#stored.get(server) ?? (server as unknown as KubernetesObject) },
          );
          return this.#view(obj as ServerObject);
        }
        if (d.kind === 'adopt') return this.#adopt(server, guest!, d.vmState, ctx);
        const net = await this.#plug(server, guest, d, ctx);
        if ('wait' in net) return net.wait;
        const bdm = await this.#blockDevices(server, guest, d, ctx);
        return 'wait' in bdm ? bdm.wait : this.#spawn(server, d.trigger, ctx, net.nics, bdm.volumes);
      }

      case 'recover': {
        const r = await this.#write(server, guest, d, (st) => {
          setStates(st, undefined, undefined);
          st.actions = interruptActions(st.actions as never, now);
        });
        if (r.applied) ctx.log.warn({ task: d.task }, 'cleared a task left by an interrupted agent');
        return r.server;
      }

      case 'exited': {
        const exit = this.#exits.get(uid);
        const running = server.spec.powerState === 'Running';
        const why = exit?.reason ?? guest?.fault;
        const crashed = d.powerState === 'CRASHED';
        const message = crashed
          ? `guest crashed${why ? `: ${why}` : ''}`
          : `guest exited on its own (${d.powerState}${why ? `: ${why}` : ''})`;
        const r = await this.#write(server, guest, d, (st, s) => {
          setStates(st, 'stopped', undefined);
          st.powerState = d.powerState;
          // Nova keeps a fault on the instance; ours says what the hypervisor reported (e.g. a KVM internal error).
          if (crashed) st.fault = { code: 500, message: message.slice(0, 4096), time: now };
          st.actions = appendAction(st.actions as never, {
            action: 'exit',
            startTime: exit?.at.replace(/\.\d+Z$/, 'Z') ?? now,
            finishTime: now,
            result: d.powerState === 'CRASHED' ? 'Error' : 'Success',
            message,
          });
          setConditions(
            st,
            [{ type: 'Ready', status: 'False', reason: crashed ? 'GuestCrashed' : 'GuestExited', message }],
            s.metadata.generation,
            date,
          );
        });
        if (!r.applied) return r.server;
        this.#exits.delete(uid);
        this.#events.warning(
          ref(r.server),
          crashed ? 'GuestCrashed' : 'GuestExited',
          'Exit',
          running ? `${message}; starting it again (spec.powerState is Running)` : message,
        );
        ctx.log.warn({ powerState: d.powerState, reason: exit?.reason }, 'guest exited unexpectedly');
        return r.server;
      }

      case 'sync': {
        const from = server.status?.vmState;
        const r = await this.#write(server, guest, d, (st) => {
          setStates(st, d.vmState, undefined);
          st.powerState = d.powerState;
        });
        if (!r.applied) return r.server;
        const note = `the guest is ${d.powerState}: vm_state ${from} -> ${d.vmState}`;
        this.#events.warning(ref(r.server), 'StateChanged', 'Sync', note);
        ctx.log.warn({ from, to: d.vmState }, 'guest changed state outside the agent');
        return r.server;
      }

      case 'missing': {
        const wasMissing = server.status?.conditions?.some((c) => c.type === 'Ready' && c.reason === 'GuestMissing');
        const message = `no guest for this server on ${this.nodeName}; a hard reboot recreates it`;
        const r = await this.#write(server, guest, d, (st, s) => {
          st.powerState = 'NOSTATE';
          setConditions(
            st,
            [{ type: 'Ready', status: 'False', reason: 'GuestMissing', message }],
            s.metadata.generation,
            date,
          );
        });
        if (!r.applied) return r.server;
        if (!wasMissing) this.#events.warning(ref(r.server), 'GuestMissing', 'Sync', message);
        return undefined;
      }

      case 'transition':
        return this.#transition(server, guest, d, ctx);

      case 'finishResize': {
        const net = await this.#plug(server, guest, d, ctx);
        if ('wait' in net) return net.wait;
        const bdm = await this.#blockDevices(server, guest, d, ctx);
        return 'wait' in bdm ? bdm.wait : this.#finishResize(server, guest, d, ctx, net.nics, bdm.volumes);
      }

      case 'confirmResize': {
        await this.#driver.confirmResize(uid);
        const after = await this.#driver.state(uid);
        const r = await this.#write(server, guest, d, (st, s) => {
          setStates(st, after?.powerState === 'RUNNING' ? 'active' : 'stopped', undefined);
          st.powerState = after?.powerState ?? 'NOSTATE';
          st.actions = finishAction(st.actions as never, 'confirmResize', 'Success', now);
          setConditions(
            st,
            [{ type: 'Ready', status: 'True', reason: s.spec.powerState, message: 'resize confirmed' }],
            s.metadata.generation,
            date,
          );
        });
        if (r.applied) this.#events.normal(ref(r.server), 'ResizeConfirmed', 'ConfirmResize', `on ${this.nodeName}`);
        return r.server;
      }

      case 'revertResize':
        return this.#revertResize(server, guest, d, ctx);

      case 'rebuild': {
        const net = await this.#plug(server, guest, d, ctx);
        return 'wait' in net ? net.wait : this.#rebuild(server, guest, ctx, net.nics);
      }
    }
  }

  /**
   * The volumes a guest is (re)created with (Nova's block device mapping): the boot volume and the volumes whose
   * connection is ready (the volume attacher hot-plugs the others later). While a boot volume is not attaching to
   * this server on this node with its connection ready, the server shows it (taskState block_device_mapping while
   * building, Ready False WaitingForVolume, an Event when the message changes) and the reconcile ends with a
   * backoff requeue; a change of the Volume wakes it earlier (the attacher's watch requeues the server here too).
   */
  async #blockDevices(
    server: Server,
    guest: GuestState | undefined,
    d: Decision,
    ctx: ReconcileContext,
  ): Promise<{ volumes: GuestVolumes } | { wait: Server | Requeue }> {
    const attacher = this.#o.volumes;
    let bdm: BlockDevices;
    if (attacher) bdm = await attacher.blockDevices(server);
    else if (server.spec.bootVolume) bdm = { ready: false, reason: `no volume attacher on ${this.nodeName}` };
    else bdm = { ready: true, volumes: [] };
    const key = `bdm|${objectKey(server as unknown as KubernetesObject)}`;
    if (bdm.ready) {
      this.#networkWaits.delete(key);
      return { volumes: { ...(bdm.rootVolume ? { rootVolume: bdm.rootVolume } : {}), volumes: bdm.volumes } };
    }
    const message = `waiting for the boot volume: ${bdm.reason}`.slice(0, 1024);
    const previous = server.status?.conditions?.find((c) => c.type === 'Ready');
    const r = await this.#write(server, guest, d, (st, s) => {
      if (s.status?.vmState === 'building') setStates(st, undefined, 'block_device_mapping');
      setConditions(
        st,
        [{ type: 'Ready', status: 'False', reason: 'WaitingForVolume', message }],
        s.metadata.generation,
        new Date(this.#clock.now()),
      );
    });
    if (!r.applied) return { wait: r.server };
    if (previous?.reason !== 'WaitingForVolume' || previous.message !== message) {
      this.#events.normal(ref(r.server), 'WaitingForVolume', 'BlockDeviceMapping', message);
      ctx.log.info({ reason: bdm.reason }, 'waiting for the boot volume');
    }
    const n = this.#networkWaits.get(key) ?? 0;
    this.#networkWaits.set(key, n + 1);
    return { wait: { requeueAfterMs: Math.min(NETWORK_WAIT_BASE_MS * 2 ** n, NETWORK_WAIT_MAX_MS) } };
  }

  /**
   * The server's NICs from the network service before a guest is (re)created. While its ports are not usable and
   * wired here, the server shows it (taskState networking while building, Ready False WaitingForNetwork, an Event
   * when the reason changes) and the reconcile ends with a backoff requeue; the network service wakes it earlier.
   */
  async #plug(
    server: Server,
    guest: GuestState | undefined,
    d: Decision,
    ctx: ReconcileContext,
  ): Promise<{ nics: GuestNetworkInterface[] | undefined } | { wait: Server | Requeue }> {
    const network = this.#o.network;
    const key = objectKey(server as unknown as KubernetesObject);
    if (!network || !server.spec.networks?.length) return { nics: undefined };
    try {
      const nics = await network.plug(server as never);
      this.#networkWaits.delete(key);
      return { nics };
    } catch (err) {
      if (!(err instanceof NetworkNotReadyError)) throw err;
      const message = `waiting for the network: ${err.message}`.slice(0, 1024);
      const previous = server.status?.conditions?.find((c) => c.type === 'Ready');
      const r = await this.#write(server, guest, d, (st, s) => {
        if (s.status?.vmState === 'building') setStates(st, undefined, 'networking');
        setConditions(
          st,
          [{ type: 'Ready', status: 'False', reason: 'WaitingForNetwork', message }],
          s.metadata.generation,
          new Date(this.#clock.now()),
        );
      });
      if (!r.applied) return { wait: r.server };
      if (previous?.reason !== 'WaitingForNetwork' || previous.message !== message) {
        this.#events.normal(ref(r.server), 'WaitingForNetwork', 'Networking', message);
        ctx.log.info({ waiting: err.waiting }, 'waiting for the network');
      }
      const n = this.#networkWaits.get(key) ?? 0;
      this.#networkWaits.set(key, n + 1);
      return { wait: { requeueAfterMs: Math.min(NETWORK_WAIT_BASE_MS * 2 ** n, NETWORK_WAIT_MAX_MS) } };
    }
  }

  /**
   * Nova's rebuild: the guest and its disks are destroyed and the server is spawned again from spec.image
   * (same uid, flavor and node), keeping its power state (a stopped server comes back stopped).
   */
  async #rebuild(
    server: Server,
    guest: GuestState | undefined,
    ctx: ReconcileContext,
    nics: GuestNetworkInterface[] | undefined,
  ): Promise<Server | undefined> {
    const image = server.spec.image;
    const now = nowIso(this.#clock);
    const started = await this.#write(server, guest, { kind: 'rebuild' }, (st, s) => {
      setStates(st, undefined, 'rebuilding');
      st.actions = startAction(st.actions as never, 'rebuild', now);
      setConditions(st, [inProgress('rebuild')], s.metadata.generation, new Date(this.#clock.now()));
    });
    if (!started.applied) return started.server;
    // The guest is built from spec.image; status.image follows once that worked.
    const target = { ...started.server, status: { ...started.server.status, ...(image ? { image } : {}) } } as Server;
    return this.#recreate(started.server, guest, 'rebuild', false, ctx, {
      nics,
      specFrom: target,
      extra: (st, s) => {
        recordTriggers(st, s, ['rebuild']);
        if (st.vmState !== 'error' && image) st.image = image;
      },
    });
  }

  /**
   * Finishes a resize or cold migration the operator placed on this node (the guest is spawned with the flavor
   * now in status). Safe to repeat after a crash: a guest that already has the new size is kept.
   */
  async #finishResize(
    server: Server,
    guest: GuestState | undefined,
    d: Extract<Decision, { kind: 'finishResize' }>,
    ctx: ReconcileContext,
    nics: GuestNetworkInterface[] | undefined,
    volumes: GuestVolumes,
  ): Promise<Server | undefined> {
    return this.#recreate(server, guest, d.action, true, ctx, {
      nics,
      volumes,
      ...(d.importFrom ? { importFrom: d.importFrom } : {}),
    });
  }

  /**
   * revertResize on the node the server goes back to: the driver restores the guest's previous definition and disks
   * (same node; a guest left on the source of a move already has them), the guest gets its previous power state, and
   * this node's disk export (if it was the source) and status.migrationSource go.
   */
  async #revertResize(
    server: Server,
    guest: GuestState | undefined,
    d: Decision,
    ctx: ReconcileContext,
  ): Promise<Server | undefined> {
    const uid = server.metadata.uid!;
    const old = server.status?.resize?.oldVmState ?? 'active';
    let failure: string | undefined;
    let after: GuestState | undefined;
    try {
      if (!guest) throw new Error(`no guest for this server on ${this.nodeName}: nothing to revert to`);
      await this.#driver.unexportDisks(uid);
      await this.#driver.revertResize(uid, { graceful: true, timeoutMs: this.#o.powerOffTimeoutMs ?? 60_000 });
      after = await this.#driver.state(uid);
      if (old === 'active' && after?.powerState !== 'RUNNING') await this.#driver.powerOn(uid);
      if (old === 'stopped' && after?.powerState === 'RUNNING') {
        await this.#driver.powerOff(uid, { graceful: true, timeoutMs: this.#o.powerOffTimeoutMs ?? 60_000 });
      }
      after = await this.#driver.state(uid);
    } catch (err) {
      failure = errorMessage(err);
    }
    this.#o.hypervisor.poke();
    const r = await this.#write(server, guest, d, (st, s) => {
      const t = nowIso(this.#clock);
      const date = new Date(this.#clock.now());
      if ((st.migrationSource as { node?: string } | undefined)?.node === this.nodeName) delete st.migrationSource;
      if (failure !== undefined) {
        setStates(st, 'error', undefined);
        st.fault = { code: 500, message: failure.slice(0, 4096), time: t };
        st.actions = finishAction(st.actions as never, 'revertResize', 'Error', t, failure);
        setConditions(
          st,
          [{ type: 'Ready', status: 'False', reason: 'RevertResizeFailed', message: failure }],
          s.metadata.generation,
          date,
        );
        return;
      }
      setStates(st, old, undefined);
      st.powerState = after?.powerState ?? 'NOSTATE';
      delete st.fault;
      st.actions = finishAction(st.actions as never, 'revertResize', 'Success', t);
      setConditions(
        st,
        [{ type: 'Ready', status: 'True', reason: s.spec.powerState, message: `reverted on ${this.nodeName}` }],
        s.metadata.generation,
        date,
      );
    });
    if (!r.applied) return r.server;
    if (failure !== undefined) {
      this.#events.warning(ref(r.server), 'RevertResizeFailed', 'RevertResize', failure);
      ctx.log.warn({ failure }, 'revert failed');
    } else {
      this.#events.normal(ref(r.server), 'ResizeReverted', 'RevertResize', `reverted on ${this.nodeName}`);
      ctx.log.info('resize reverted');
    }
    return r.server;
  }

  /**
   * Re-creates a server's guest (resize, migrate, rebuild): a guest of another size (or any guest, unless
   * keepIfSized) is destroyed, the guest is spawned from the server's status, a stopped server is powered off
   * again; then the status (vmState back to active/stopped, or ERROR with a fault), the action and an Event.
   */
  async #recreate(
    server: Server,
    guest: GuestState | undefined,
    action: 'resize' | 'migrate' | 'rebuild',
    keepIfSized: boolean,
    ctx: ReconcileContext,
    o: {
      specFrom?: Server;
      extra?: (st: Status, s: Server) => void;
      nics?: GuestNetworkInterface[] | undefined;
      /** Boot volume and volumes (connections built by this node). */
      volumes?: GuestVolumes;
      /** Moved here: the guest is created from the disks its source serves. */
      importFrom?: DiskExport;
    } = {},
  ): Promise<Server | undefined> {
    const uid = server.metadata.uid!;
    const stopped = server.status?.vmState === 'stopped';
    const verb = action === 'migrate' ? 'Migrate' : action === 'rebuild' ? 'Rebuild' : 'Resize';
    let state = guest;
    let failure: string | undefined;
    try {
      const spec = await this.#guestSpec(o.specFrom ?? server, o.nics, o.volumes);
      const info = guest && keepIfSized ? (await this.#driver.list()).find((g) => g.id === uid) : undefined;
      const sized =
        info !== undefined &&
        info.vcpus === spec.vcpus &&
        info.ramMiB === spec.ramMiB &&
        info.diskGiB === spec.disk.rootGiB + spec.disk.ephemeralGiB + Math.ceil(spec.disk.swapMiB / 1024);
      if (guest && keepIfSized && !sized) {
        // Resize on this node keeps the disks (grown, never shrunk); the driver leaves the guest stopped.
        await this.#driver.resize(uid, spec, { graceful: true, timeoutMs: this.#o.powerOffTimeoutMs ?? 60_000 });
        state = await this.#driver.state(uid);
      } else if (guest && !keepIfSized) {
        await this.#driver.destroy(uid); // rebuild: a new root disk from the image
        state = undefined;
      }
      state ??= o.importFrom ? await this.#driver.importDisks(spec, o.importFrom) : await this.#driver.spawn(spec);
      if (stopped && state.powerState !== 'SHUTDOWN') {
        await this.#driver.powerOff(uid, { graceful: false, timeoutMs: 0 });
        state = (await this.#driver.state(uid)) ?? state;
      } else if (!stopped && (state.powerState === 'SHUTDOWN' || state.powerState === 'CRASHED')) {
        await this.#driver.powerOn(uid);
        state = (await this.#driver.state(uid)) ?? state;
      }
    } catch (err) {
      failure = spawnFailureMessage(err, server.status?.image ?? server.spec.image);
      if (guest && keepIfSized) {
        // Never destroy a guest with data for a failed resize: back to its previous size and disks (stopped).
        await this.#driver
          .revertResize(uid, { graceful: false, timeoutMs: 0 })
          .catch((e: unknown) => ctx.log.warn({ err: e }, 'reverting a failed resize failed'));
        state = undefined;
      } else {
        await this.#driver.destroy(uid).catch(() => {}); // leave no half-built guest behind
      }
    }
    this.#o.hypervisor.poke();
    const final = state;
    const done = await this.#write(server, undefined, undefined, (st, s) => {
      const t = nowIso(this.#clock);
      const date = new Date(this.#clock.now());
      if (failure !== undefined || !final) {
        const message = failure ?? 'the guest was not created';
        setStates(st, 'error', undefined);
        st.powerState = 'NOSTATE';
        st.fault = { code: 500, message: message.slice(0, 4096), time: t };
        st.actions = finishAction(st.actions as never, action, 'Error', t, message);
        setConditions(
          st,
          [{ type: 'Ready', status: 'False', reason: `${verb}Failed`, message }],
          s.metadata.generation,
          date,
        );
      } else {
        // A resize or migration waits in VERIFY_RESIZE for confirm or revert (Nova's vm_state resized).
        const verify = action !== 'rebuild';
        setStates(st, verify ? 'resized' : stopped ? 'stopped' : 'active', undefined);
        st.powerState = final.powerState;
        delete st.fault;
        st.actions = finishAction(st.actions as never, action, 'Success', t);
        const message = verify
          ? `${action} finished on ${this.nodeName}: confirm or revert (spec.triggers.confirmResize or revertResize)`
          : `${action} finished on ${this.nodeName}`;
        setConditions(
          st,
          [{ type: 'Ready', status: 'True', reason: verify ? 'VerifyResize' : s.spec.powerState, message }],
          s.metadata.generation,
          date,
        );
      }
      o.extra?.(st, s);
    });
    if (failure !== undefined) {
      this.#events.warning(ref(done.server), `${verb}Failed`, verb, failure);
      ctx.log.warn({ action, failure }, 'guest re-creation failed');
    } else {
      const past = action === 'migrate' ? 'Migrated' : action === 'rebuild' ? 'Rebuilt' : 'Resized';
      this.#events.normal(ref(done.server), past, verb, `${action} finished on ${this.nodeName}`);
      ctx.log.info({ action }, 'guest re-created');
    }
    return done.server;
  }

  async #transition(
    server: Server,
    guest: GuestState | undefined,
    d: Extract<Decision, { kind: 'transition' }>,
    ctx: ReconcileContext,
  ): Promise<Server | undefined> {
    const info = TRANSITIONS[d.action];
    const uid = server.metadata.uid!;
    const now = nowIso(this.#clock);
    const date = new Date(this.#clock.now());
    const started = await this.#write(
      server,
      guest,
      d,
      (st, s) => {
        setStates(st, undefined, info.task);
        st.actions = startAction(st.actions as never, d.action, now);
        setConditions(st, [inProgress(d.action)], s.metadata.generation, date);
      },
      true,
    );
    if (!started.applied) return started.server;
    try {
      await this.#run(d.action, uid);
    } catch (err) {
      const message = errorMessage(err);
      const after = await this.#driver.state(uid).catch(() => undefined);
      const failed = await this.#write(started.server, undefined, undefined, (st, s) => {
        setStates(st, undefined, undefined);
        if (after) st.powerState = after.powerState;
        st.actions = finishAction(st.actions as never, d.action, 'Error', nowIso(this.#clock), message);
        if (d.trigger) recordTriggers(st, s, [d.trigger]);
        setConditions(
          st,
          [{ type: 'Ready', status: 'False', reason: `${info.verb}Failed`, message }],
          s.metadata.generation,
          date,
        );
      });
      this.#events.warning(ref(failed.server), `${info.verb}Failed`, info.verb, `${d.action} failed: ${message}`);
      ctx.log.warn({ err, action: d.action }, 'guest action failed');
      if (d.trigger) return failed.server; // one-shot: consumed, not retried
      throw err; // desired state: retried with backoff
    }
    const after = await this.#driver.state(uid);
    const done = await this.#write(started.server, undefined, undefined, (st, s) => {
      setStates(st, info.target, undefined);
      st.powerState = after?.powerState ?? 'NOSTATE';
      st.actions = finishAction(st.actions as never, d.action, 'Success', nowIso(this.#clock));
      if (d.trigger) recordTriggers(st, s, [d.trigger]);
      const updates: ConditionUpdate[] = [NOT_REFUSED];
      if (desiredVmState(s.spec.powerState) === info.target && after) {
        updates.push({
          type: 'Ready',
          status: 'True',
          reason: s.spec.powerState,
          message: `guest is ${after.powerState}`,
        });
      }
      setConditions(st, updates, s.metadata.generation, date);
    });
    this.#events.normal(ref(done.server), info.done, info.verb, `${d.action} done on ${this.nodeName}`);
    ctx.log.info({ action: d.action, powerState: after?.powerState }, 'guest action done');
    return done.server;
  }

  async #spawn(
    server: Server,
    trigger: 'hardReboot' | undefined,
    ctx: ReconcileContext,
    nics: GuestNetworkInterface[] | undefined,
    volumes: GuestVolumes,
  ): Promise<Server | undefined> {
    const uid = server.metadata.uid!;
    const action = trigger ?? 'create';
    const now = nowIso(this.#clock);
    const decision: Decision = trigger ? { kind: 'spawn', trigger } : { kind: 'spawn' };
    const started = await this.#write(
      server,
      undefined,
      decision,
      (st, s) => {
        setStates(st, undefined, trigger ? 'rebooting_hard' : 'spawning');
        st.actions = startAction(st.actions as never, action, now);
        setConditions(st, [inProgress(action)], s.metadata.generation, new Date(this.#clock.now()));
      },
      true,
    );
    if (!started.applied) return started.server;
    let state: GuestState;
    try {
      const spec = await this.#guestSpec(started.server, nics, volumes);
      state = await this.#driver.spawn(spec);
    } catch (err) {
      const message = spawnFailureMessage(err, started.server.status?.image ?? started.server.spec.image);
      await this.#driver.destroy(uid).catch(() => {}); // leave no half-built guest behind
      const failed = await this.#write(started.server, undefined, undefined, (st, s) => {
        const t = nowIso(this.#clock);
        setStates(st, 'error', undefined);
        st.powerState = 'NOSTATE';
        st.fault = { code: 500, message: message.slice(0, 4096), time: t };
        st.actions = finishAction(st.actions as never, action, 'Error', t, message);
        recordTriggers(st, s, trigger ? [trigger] : INITIAL_TRIGGERS);
        setConditions(
          st,
          [{ type: 'Ready', status: 'False', reason: 'SpawnFailed', message }],
          s.metadata.generation,
          new Date(this.#clock.now()),
        );
      });
      this.#events.warning(ref(failed.server), 'SpawnFailed', 'Spawn', message);
      ctx.log.warn({ err }, 'spawn failed');
      return undefined; // ERROR until a hard reboot (or delete)
    }
    this.#o.hypervisor.poke();
    const done = await this.#write(started.server, undefined, undefined, (st, s) => {
      this.#launched(st, s, state, action, trigger ? [trigger] : INITIAL_TRIGGERS);
    });
    this.#events.normal(
      ref(done.server),
      trigger ? 'Rebooted' : 'Spawned',
      'Spawn',
      `guest ${trigger ? 're-created' : 'spawned'} on ${this.nodeName}${state.pid ? ` (pid ${state.pid})` : ''}`,
    );
    ctx.log.info({ pid: state.pid }, 'guest spawned');
    return done.server;
  }

  async #adopt(
    server: Server,
    guest: GuestState,
    vmState: NonNullable<Server['status']>['vmState'],
    ctx: ReconcileContext,
  ): Promise<Server | undefined> {
    const r = await this.#write(server, guest, { kind: 'adopt', vmState: vmState! }, (st, s) => {
      this.#launched(st, s, guest, 'create', INITIAL_TRIGGERS, vmState);
    });
    if (!r.applied) return r.server;
    this.#events.normal(ref(r.server), 'GuestAdopted', 'Spawn', `adopted the existing guest (${guest.powerState})`);
    ctx.log.info({ powerState: guest.powerState }, 'adopted an existing guest');
    this.#o.hypervisor.poke();
    return r.server;
  }

  /** Status after a successful spawn or adoption. */
  #launched(
    st: Status,
    s: Server,
    state: GuestState,
    action: string,
    triggers: readonly Trigger[],
    vmState: NonNullable<Server['status']>['vmState'] = 'active',
  ): void {
    const now = nowIso(this.#clock);
    setStates(st, vmState, undefined);
    st.powerState = state.powerState;
    st.launchedAt ??= state.startedAt?.replace(/\.\d+Z$/, 'Z') ?? now;
    const accel = state.accelerator ?? this.#o.hypervisor.accelerator();
    if (accel) st.accelerator = accel;
    delete st.fault;
    st.actions = finishAction(st.actions as never, action, 'Success', now);
    recordTriggers(st, s, triggers);
    const updates: ConditionUpdate[] = [NOT_REFUSED];
    if (desiredVmState(s.spec.powerState) === vmState) {
      updates.push({
        type: 'Ready',
        status: 'True',
        reason: s.spec.powerState,
        message: `guest is ${state.powerState}`,
      });
    }
    setConditions(st, updates, s.metadata.generation, new Date(this.#clock.now()));
  }

  async #run(action: AgentAction, id: string): Promise<void> {
    const d = this.#driver;
    switch (action) {
      case 'start':
        return d.powerOn(id);
      case 'stop':
        return d.powerOff(id, { graceful: true, timeoutMs: this.#o.powerOffTimeoutMs ?? 60_000 });
      case 'pause':
        return d.pause(id);
      case 'unpause':
        return d.unpause(id);
      case 'suspend':
        return d.suspend(id);
      case 'resume':
        return d.resume(id);
      case 'softReboot':
        return d.reboot(id, { hard: false });
      case 'hardReboot':
        return d.reboot(id, { hard: true });
    }
  }

  /**
   * What the driver needs to boot the server: sizes from the bound flavor snapshot, the key pair resolved, the NICs
   * the network service wired.
   */
  async #guestSpec(
    server: Server,
    nics: GuestNetworkInterface[] | undefined,
    volumes?: GuestVolumes,
  ): Promise<GuestSpec> {
    const st = server.status ?? {};
    const f = st.flavor;
    if (!f) throw new Error('status.flavor is not set');
    const ephemeralGiB = toGiB(f.ephemeral ?? '0');
    const swapMiB = toMiB(f.swap ?? '0');
    let rootGiB = toGiB(f.disk);
    // A flavor with disk 0 sizes the root disk to the image; the scheduler's claim says how much that is.
    if (rootGiB === 0 && st.allocation) {
      rootGiB = Math.max(0, st.allocation.diskGiB - ephemeralGiB - Math.ceil(swapMiB / 1024));
    }
    let keyPair: GuestSpec['keyPair'];
    const keyName = server.spec.keyPair;
    if (keyName) {
      try {
        const kp = await this.#client.get<KeyPair & KubernetesObject>(KEYPAIRS, keyName, server.metadata.namespace);
        keyPair = { name: keyName, publicKey: kp.spec.publicKey };
      } catch (err) {
        if (isNotFound(err)) throw new Error(`key pair ${keyName} not found`);
        throw err;
      }
    }
    const namespace = server.metadata.namespace ?? '';
    const image = st.image ?? server.spec.image;
    const imageSource = image ? await this.#imageSource(image, namespace) : undefined;
    const userData = server.spec.userData ?? (await this.#userDataFromSecret(server));
    const accelerator = this.#o.hypervisor.accelerator();
    return {
      id: server.metadata.uid!,
      name: server.metadata.name!,
      namespace,
      vcpus: f.vcpus,
      ramMiB: toMiB(f.ram),
      disk: { rootGiB, ephemeralGiB, swapMiB },
      ...(image ? { image } : {}),
      ...(imageSource ? { imageSource } : {}),
      ...(userData !== undefined ? { userData } : {}),
      ...(keyPair ? { keyPair } : {}),
      hostname: server.spec.hostname ?? server.metadata.name!,
      configDrive: server.spec.configDrive,
      ...(server.spec.metadata ? { metadata: { ...server.spec.metadata } } : {}),
      ...(accelerator ? { accelerator } : {}),
      ...(nics?.length ? { nics } : {}),
      ...(volumes?.rootVolume ? { rootVolume: volumes.rootVolume } : {}),
      ...(volumes?.volumes.length ? { volumes: volumes.volumes } : {}),
      annotations: { ...(server.metadata.annotations ?? {}) },
    };
  }

  /** The Image in the server's namespace as the node's image cache needs it; undefined when it does not exist. */
  async #imageSource(name: string, namespace: string): Promise<GuestSpec['imageSource']> {
    // Drivers that need the image fail the spawn, naming it.
    return imageSourceOf(this.#client, name, namespace);
  }

  /** spec.userDataSecretRef: the key of a Secret in the server's namespace, as text. */
  async #userDataFromSecret(server: Server): Promise<string | undefined> {
    const ref = server.spec.userDataSecretRef;
    if (!ref) return undefined;
    let secret: KubernetesObject & { data?: Record<string, string>; stringData?: Record<string, string> };
    try {
      secret = await this.#client.get(SECRETS, ref.name, server.metadata.namespace);
    } catch (err) {
      if (isNotFound(err)) throw new Error(`user data secret ${ref.name} not found`);
      throw err;
    }
    const b64 = secret.data?.[ref.key];
    if (b64 === undefined) throw new Error(`user data secret ${ref.name} has no key ${ref.key}`);
    return Buffer.from(b64, 'base64').toString('utf8');
  }

  /**
   * updateStatus with the agent's conventions: `mutate` edits the current status; with `check`, the write happens
   * only if decide() still returns that decision for the object being patched (else nothing is written and the
   * caller re-decides from the returned object). With `confirm` (steps about to act on the guest), a check that
   * needed no write (e.g. a retried spawn whose task is already set) is confirmed against a live read, since only a
   * real write proves through its resourceVersion that the object was current.
   */
  async #write(
    server: Server,
    guest: GuestState | undefined,
    check: Decision | undefined,
    mutate: (st: Status, s: Server) => void,
    confirm = false,
  ): Promise<{ server: Server; applied: boolean }> {
    let applied = false;
    const want = check && JSON.stringify(check);
    const fn = (st: Status, obj: ServerObject): Status | undefined => {
      applied = false;
      const fresh = this.#view(obj);
      if (!fresh) return undefined;
      if (want !== undefined && JSON.stringify(decide(fresh, guest, this.nodeName)) !== want) return undefined;
      applied = true;
      const view = this.#stateOf(st);
      mutate(view, fresh);
      return withReport(st, view, this.nodeName);
    };
    const passed = this.#stored.get(server) ?? (server as unknown as ServerObject);
    const opts = { fieldManager: agentFieldManager(this.nodeName) };
    let raw = await updateStatus(this.#client, SERVERS, passed, fn, opts);
    if (confirm && applied && raw === passed) {
      const live = await this.#client.get<ServerObject>(SERVERS, server.metadata.name!, server.metadata.namespace);
      if (live.metadata?.resourceVersion !== passed.metadata?.resourceVersion) {
        raw = await updateStatus(this.#client, SERVERS, live, fn, opts);
      }
    }
    return { server: this.#view(raw) ?? server, applied };
  }

  /**
   * The Server as this agent works on it: the stored object with its state fields replaced by the agent's view
   * (its report, or the operator's request it has not taken up: stateView). Remembers the stored object behind it.
   */
  #view(raw: ServerObject): Server | undefined {
    const server = parseServer({ ...raw, status: this.#stateOf(structuredClone(raw.status ?? {})) });
    if (server) this.#stored.set(server, raw);
    return server;
  }

  /** A copy of status `st` with the state fields of this agent's view. */
  #stateOf(st: Status): Status {
    const view: Status = { ...st };
    for (const [k, v] of Object.entries(stateView(st, this.nodeName))) {
      if (v === undefined) delete view[k];
      else view[k] = v;
    }
    return view;
  }

  /**
   * The Server behind this key is no longer bound here (or gone): destroy its guests on this node when the Server is
   * deleted or moved away (placement.ts guestVerdict); otherwise keep them running and report the mismatch.
   */
  async #gone(req: Request, ctx: ReconcileContext): Promise<ReconcileResult> {
    const namespace = req.namespace ?? '';
    const guests = (await this.#driver.list()).filter((g) => g.namespace === namespace && g.name === req.name);
    for (const [uid, s] of this.#hosted) {
      const same = (s.metadata?.namespace ?? '') === namespace && s.metadata?.name === req.name;
      if (same && !guests.some((g) => g.id === uid)) this.#released(uid);
    }
    if (guests.length === 0) return undefined;
    const live = await this.#readLive(namespace, req.name);
    let destroyed = false;
    for (const g of guests) {
      const ours = live?.metadata?.uid === g.id;
      if (ours && !live!.metadata!.deletionTimestamp && this.#isMoveSource(live!)) {
        return this.#serveMove(live!, g, ctx); // moved away: the guest and its disks stay until the move is confirmed
      }
      const verdict = guestVerdict(live, g.id, this.nodeName);
      if (!verdict.destroy) {
        if (verdict.boundHere) return { requeueAfter: 2000 }; // the cache is behind
        if (live) await this.#keep(live, g.id, verdict.reason);
        continue;
      }
      if (ours && (live!.status?.migrationSource as { node?: string } | undefined)?.node === this.nodeName) {
        // The move away from here is confirmed: this node's record of it goes with its copy of the guest.
        await updateStatus(
          this.#client,
          SERVERS,
          live!,
          (st) => {
            if ((st.migrationSource as { node?: string } | undefined)?.node !== this.nodeName) return undefined;
            delete st.migrationSource;
            return st;
          },
          { fieldManager: agentFieldManager(this.nodeName) },
        );
      }
      await this.#driver.destroy(g.id);
      this.#exits.delete(g.id);
      this.#released(g.id);
      await this.#finishDeletion(live, g.id);
      destroyed = true;
      const movedTo = live?.metadata?.labels?.[SERVER_NODE_LABEL];
      ctx.log.info(
        { guest: g.id, movedTo, reason: verdict.reason },
        'destroyed the guest of a server no longer bound here',
      );
      if (live && live.metadata?.uid === g.id) {
        this.#events.normal(
          { ...live, apiVersion: ServerKind.apiVersion, kind: ServerKind.kind },
          'GuestRemoved',
          'Destroy',
          `guest removed from ${this.nodeName}: ${verdict.reason}`,
        );
      }
    }
    if (destroyed) this.#o.hypervisor.poke();
    return undefined;
  }

  /**
   * After destroying the guest of a Server being deleted that is not bound here (its label was changed), releases
   * the guest finalizer: no other agent may own it (a label naming a node without the guest, or no node). Safe
   * when another node does run a guest of this uid: its orphan sweep destroys it once the Server is gone.
   */
  async #finishDeletion(live: ServerObject | undefined, uid: string): Promise<void> {
    if (!live?.metadata?.deletionTimestamp || live.metadata.uid !== uid) return;
    if (!hasFinalizer(live, GUEST_FINALIZER)) return;
    try {
      await removeFinalizer(this.#client, SERVERS, live.metadata.name!, live.metadata.namespace, GUEST_FINALIZER, {
        current: live,
      });
    } catch (err) {
      if (!isNotFound(err)) this.#log.warn({ err, server: objectKey(live) }, 'cannot release the guest finalizer');
    }
  }

  /** A Server bound here again after a reported mismatch: the Placement condition says so. */
  async #boundAgain(server: ServerObject): Promise<void> {
    const uid = server.metadata?.uid ?? '';
    const cond = (server.status?.conditions as { type: string; status: string }[] | undefined)?.find(
      (c) => c.type === PLACEMENT_CONDITION,
    );
    if (!this.#mismatch.has(uid) && cond?.status !== 'False') return;
    this.#mismatch.delete(uid);
    await this.#setPlacement(server, { status: 'True', reason: 'BoundHere', message: `bound to ${this.nodeName}` });
  }

  /** Whether this node is the source of the server's move (resize or migration to another node) in progress. */
  #isMoveSource(live: ServerObject): boolean {
    const mig = (live.status as Status | undefined)?.migration as { source?: string } | undefined;
    return mig?.source === this.nodeName;
  }

  /**
   * The source side of a move: while the target copies (taskState resize_migrated), the guest is stopped here, its
   * disks are served read-only (driver exportDisks on --host-ip) and status.migrationSource says so (this agent is
   * its only writer); afterwards the export ends. The guest and its disks stay until the move is confirmed (the
   * operator drops status.migration, and this node then destroys its copy) or reverted (the server comes back here).
   */
  async #serveMove(live: ServerObject, g: GuestState, ctx: ReconcileContext): Promise<ReconcileResult> {
    const parsed = parseServer(live);
    if (!parsed) return { requeueAfter: 5000 };
    const st = parsed.status ?? {};
    const copying = st.taskState === 'resize_migrated';
    let want: Record<string, unknown> | undefined;
    if (copying) {
      if (g.powerState !== 'SHUTDOWN' && g.powerState !== 'CRASHED') {
        await this.#driver.powerOff(g.id, { graceful: true, timeoutMs: this.#o.powerOffTimeoutMs ?? 60_000 });
        ctx.log.info({ guest: g.id }, 'move source: guest stopped');
      }
      const stopped = await this.#driver.state(g.id);
      if (stopped?.powerState !== 'SHUTDOWN' && stopped?.powerState !== 'CRASHED') return { requeueAfter: 2000 };
      const exp = await this.#driver.exportDisks(g.id, this.#o.hostIP ?? '127.0.0.1');
      const prev = st.migrationSource?.node === this.nodeName ? st.migrationSource : undefined;
      want = { node: this.nodeName, guestStoppedAt: prev?.guestStoppedAt ?? nowIso(this.#clock), export: exp };
    } else {
      await this.#driver.unexportDisks(g.id);
      const prev = st.migrationSource?.node === this.nodeName ? st.migrationSource : undefined;
      want = prev ? { node: prev.node, guestStoppedAt: prev.guestStoppedAt } : undefined;
    }
    if (JSON.stringify(want ?? null) !== JSON.stringify(st.migrationSource ?? null) && want) {
      await updateStatus(
        this.#client,
        SERVERS,
        live,
        (s) => {
          if (!this.#isMoveSource({ ...live, status: s })) return undefined;
          // A merge patch of the top-level field: a key that goes must be sent as null.
          s.migrationSource = want.export ? want : { ...want, export: null };
          return s;
        },
        { fieldManager: agentFieldManager(this.nodeName) },
      );
      ctx.log.info({ migrationSource: want }, 'move source: status.migrationSource written');
    }
    return { requeueAfter: copying ? 2000 : 5000 };
  }

  async #readLive(namespace: string, name: string): Promise<ServerObject | undefined> {
    try {
      return await this.#client.get<ServerObject>(SERVERS, name, namespace || undefined);
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
  }

  #onExit(e: GuestExit): void {
    const owners = this.servers.byIndex('uid', e.id);
    if (owners.length === 0) return; // an orphan: the sweep handles it
    this.#exits.set(e.id, e);
    for (const s of owners) this.controller.enqueue(objectKey(s));
  }
}

/** The object an Event is about (informer items and patch results both carry metadata; kind is set here). */
function ref(server: Server): KubernetesObject {
  return {
    apiVersion: ServerKind.apiVersion,
    kind: ServerKind.kind,
    metadata: {
      name: server.metadata.name,
      namespace: server.metadata.namespace,
      uid: server.metadata.uid,
      resourceVersion: server.metadata.resourceVersion,
    },
  };
}

/** Ready while a transition runs: the guest does not match the desired state yet. */
function inProgress(action: string): ConditionUpdate {
  return { type: 'Ready', status: 'False', reason: 'TaskInProgress', message: `${action} in progress` };
}

function verbOf(action: string): string {
  return TRANSITIONS[action as AgentAction]?.verb ?? action.charAt(0).toUpperCase() + action.slice(1);
}
