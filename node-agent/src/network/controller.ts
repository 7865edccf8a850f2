// The node's network service (Neutron's L2 agent, the API side). It watches Networks, Ports, SecurityGroups and
// Hypervisors cluster-wide (shared informers: simulated nodes on one Manager share them) and the Servers bound to
// this node (the compute service's informer), builds the node's plan (plan.ts) and hands it to the backend:
//  - any relevant change schedules a debounced rebuild; applies are serialized (one at a time, re-run when changes
//    arrived meanwhile) and the backend is called only when the plan changed, plus a periodic forced apply that
//    repairs drift;
//  - after an apply, the Ports wired here are bound (status.bindingHost, vifType, ACTIVE, condition Bound) and ports
//    still bound here that the plan lost are unbound (only while their binding still names this node);
//  - the compute service asks plug(server) for a server's NICs before it spawns a guest: the NICs once every port
//    is usable and wired, else NetworkNotReadyError; a server that had to wait is woken (onWake) once it can go on.
import type { KubernetesObject } from '@kubernetes/client-node';
import { Counter, Histogram, type Registry } from 'prom-client';
import {
  HypervisorKind,
  NetworkKind,
  PortKind,
  SERVER_NODE_LABEL,
  SecurityGroupKind,
} from '../../../operator/src/api/index.ts';
import {
  type Clock,
  type GVR,
  type Informer,
  isNotFound,
  type KubeClient,
  type Logger,
  type Manager,
  objectKey,
  setCondition,
  silentLogger,
  systemClock,
  type TimerHandle,
  updateStatus,
} from '../../../operator/src/runtime/index.ts';
import type { GuestNetworkInterface } from '../driver.ts';
import { agentFieldManager } from '../fieldmanager.ts';
import type { NetworkBackend, NodeNetworkPlan, PortResult } from './backend.ts';
import {
  type BindingChange,
  bindingChanges,
  bindingStatus,
  buildPlan,
  type HypervisorObj,
  type NetworkObj,
  type PlanResult,
  type PortObj,
  portFingerprint,
  type SecurityGroupObj,
  type ServerObj,
  serverNics,
} from './plan.ts';

const gvr = (k: { group: string; version: string; plural: string }): GVR => ({
  group: k.group,
  version: k.version,
  plural: k.plural,
});
export const NETWORKS = gvr(NetworkKind);
export const PORTS = gvr(PortKind);
export const SECURITY_GROUPS = gvr(SecurityGroupKind);
const HYPERVISORS_GVR = gvr(HypervisorKind);

/** A server's ports are not all usable and wired on this node yet; `waiting` says what each one waits for. */
export class NetworkNotReadyError extends Error {
  override name = 'NetworkNotReadyError';
  readonly waiting: string[];

  constructor(waiting: string[]) {
    super(waiting.join('; '));
    this.waiting = waiting;
  }
}

/** What the compute service needs from the network service. */
export interface ServerNetworkService {
  /**
   * The server's NICs in spec.networks order (empty without networks) once every port is usable and wired on this
   * node; throws NetworkNotReadyError otherwise (the server is then woken through onWake when that changes).
   */
  plug(server: ServerObj): Promise<GuestNetworkInterface[]>;
}

export interface NetworkControllerOptions {
  manager: Manager;
  nodeName: string;
  /** This node's underlay address (default: its Hypervisor's status.hostIP). */
  hostIP?: string;
  backend: NetworkBackend;
  /** The Servers bound to this node (the compute service's informer). */
  servers: Pick<Informer<KubernetesObject>, 'list' | 'hasSynced' | 'addEventHandler'>;
  /**
   * Servers no longer in that informer whose guest still runs here (a changed node label): their ports stay wired
   * until the guest is gone (call refresh() when this set changes).
   */
  retained?: () => readonly KubernetesObject[];
  /** Delay between a change and the rebuild it triggers, coalescing bursts (default 50 ms). */
  debounceMs?: number;
  /** Forced apply period, repairing drift (default 30 s; 0: never). */
  resyncMs?: number;
  /** Delay before retrying a failed apply or status write (default 5 s). */
  retryMs?: number;
  logger?: Logger;
  clock?: Clock;
}

interface Wired extends PortResult {
  fingerprint: string | undefined;
}

interface ApplyMetrics {
  duration: Histogram<'backend'>;
  errors: Counter<'backend'>;
}

const metricsByRegistry = new WeakMap<Registry, ApplyMetrics>();

function applyMetrics(registry: Registry): ApplyMetrics {
  let m = metricsByRegistry.get(registry);
  if (!m) {
    m = {
      duration: new Histogram({
        name: 'stratus_agent_network_apply_duration_seconds',
        help: 'Duration of network backend applies (the node plan made real).',
        labelNames: ['backend'],
        buckets: [0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
        registers: [registry],
      }),
      errors: new Counter({
        name: 'stratus_agent_network_apply_errors_total',
        help: 'Network backend applies that failed.',
        labelNames: ['backend'],
        registers: [registry],
      }),
    };
    metricsByRegistry.set(registry, m);
  }
  return m;
}

const json = (v: unknown) => JSON.stringify(v ?? null);

/** The per-node network service. */
export class NetworkController implements ServerNetworkService {
  readonly nodeName: string;
  readonly backend: NetworkBackend;
  readonly networks: Informer<NetworkObj>;
  readonly ports: Informer<PortObj>;
  readonly securityGroups: Informer<SecurityGroupObj>;
  readonly hypervisors: Informer<HypervisorObj>;
  /** Called with a server key (`namespace/name`) when a server that waited in plug() may go on. */
  onWake: ((serverKey: string) => void) | undefined;
  /** Backend applies (tests). */
  applies = 0;
  /** Plan rebuilds, whether or not the backend was called (tests). */
  rebuilds = 0;
  readonly #o: NetworkControllerOptions;
  readonly #client: KubeClient;
  readonly #log: Logger;
  readonly #clock: Clock;
  readonly #metrics: ApplyMetrics;
  readonly #unsubscribe: (() => void)[] = [];
  readonly #waiting = new Set<string>();
  #wired = new Map<string, Wired>();
  /** Ports whose wiring is unknown because the apply failed before this process saw them wired. */
  #unverified = new Set<string>();
  #last: PlanResult | undefined;
  /** What the backend found wired when this process started (until the first plan exists). */
  #observed: Map<string, { vni: number; mtu: number }> | undefined;
  #lastPlan: string | undefined;
  #lastProblems = '';
  /** Nothing local and nothing bound here: events of other nodes' objects need no rebuild. */
  #idle = false;
  #timer: TimerHandle | undefined;
  #resyncTimer: TimerHandle | undefined;
  #running: Promise<void> | undefined;
  #again = false;
  #force = false;
  #started = false;
  #stopped = false;

  constructor(o: NetworkControllerOptions) {
    this.#o = o;
    this.nodeName = o.nodeName;
    this.backend = o.backend;
    this.#client = o.manager.client;
    this.#clock = o.clock ?? systemClock;
    // The agent's logger already names the node.
    this.#log = o.logger
      ? o.logger.child({ component: 'network' })
      : (o.manager.logger ?? silentLogger()).child({ node: o.nodeName, component: 'network' });
    this.#metrics = applyMetrics(o.manager.registry);
    this.networks = o.manager.informer<NetworkObj>(NETWORKS);
    this.ports = o.manager.informer<PortObj>(PORTS);
    this.securityGroups = o.manager.informer<SecurityGroupObj>(SECURITY_GROUPS);
    this.hypervisors = o.manager.informer<HypervisorObj>(HYPERVISORS_GVR);
    const on = <T>(inf: { addEventHandler(h: object): () => void }, changed: (a: T, b: T) => boolean) =>
      this.#unsubscribe.push(
        inf.addEventHandler({
          onAdd: (x: T) => this.#changed(x, undefined),
          onUpdate: (a: T, b: T) => a !== b && changed(a, b) && this.#changed(b, a),
          onDelete: (x: T) => this.#changed(x, undefined),
        }),
      );
    on<NetworkObj>(this.networks, (a, b) => json(a.spec) !== json(b.spec) || json(netStatus(a)) !== json(netStatus(b)));
    on<PortObj>(this.ports, (a, b) => json(portView(a)) !== json(portView(b)));
    on<SecurityGroupObj>(this.securityGroups, (a, b) => json(a.spec) !== json(b.spec));
    on<HypervisorObj>(this.hypervisors, (a, b) => a.status?.hostIP !== b.status?.hostIP);
    on<ServerObj>(o.servers, (a, b) => json(serverView(a)) !== json(serverView(b)));
  }

  /** Prepares the backend (before the manager starts). */
  async init(): Promise<void> {
    await this.backend.init();
  }

  /** Applies once the caches are synced, then on changes and every resyncMs. */
  start(): void {
    if (this.#started || this.#stopped) return;
    this.#started = true;
    this.#schedule(0);
    const period = this.#o.resyncMs ?? 30_000;
    if (period > 0) {
      const tick = () => {
        if (this.#stopped) return;
        this.#force = true;
        this.#schedule(0);
        this.#resyncTimer = this.#clock.setTimer(tick, period);
      };
      this.#resyncTimer = this.#clock.setTimer(tick, period);
    }
  }

  /** Stops applying and closes the backend (what it wired stays: guests keep their network). */
  async stop(): Promise<void> {
    this.#stopped = true;
    this.#timer?.cancel();
    this.#resyncTimer?.cancel();
    for (const u of this.#unsubscribe.splice(0)) u();
    await this.#running;
    await this.backend.close();
  }

  /** Schedules a rebuild (an input outside the informers changed, e.g. the retained servers). */
  refresh(): void {
    if (this.#started) this.#schedule(this.#o.debounceMs ?? 50);
  }

  /** The plan last built (tests, debugging). */
  get lastPlan(): NodeNetworkPlan | undefined {
    return this.#last?.plan;
  }

  #synced(): boolean {
    return [this.networks, this.ports, this.securityGroups, this.hypervisors, this.#o.servers].every((i) =>
      i.hasSynced(),
    );
  }

  async plug(server: ServerObj): Promise<GuestNetworkInterface[]> {
    if (!server.spec?.networks?.length) return [];
    const key = objectKey(server);
    if (!this.#synced()) {
      this.#waiting.add(key);
      throw new NetworkNotReadyError(['network caches are not synced yet']);
    }
    const r = buildPlan({ ...this.#input(), servers: [{ ...server, status: { node: this.nodeName } }] });
    const s = r.servers.get(key);
    if (!s) throw new NetworkNotReadyError(['the server has no networks']);
    const out = serverNics(s, (id) => {
      const w = this.#wired.get(id);
      if (!w) return undefined;
      if (w.fingerprint !== portFingerprint(r.plan, id))
        return { ready: false, message: 'its wiring is being updated' };
      return w;
    });
    if ('nics' in out) {
      this.#waiting.delete(key);
      return out.nics;
    }
    this.#waiting.add(key);
    this.#schedule(this.#o.debounceMs ?? 50);
    throw new NetworkNotReadyError(out.waiting);
  }

  #input() {
    return {
      nodeName: this.nodeName,
      ...(this.#o.hostIP ? { hostIP: this.#o.hostIP } : {}),
      servers: [...this.#o.servers.list(), ...(this.#o.retained?.() ?? [])] as unknown as ServerObj[],
      networks: this.networks.list(),
      ports: this.ports.list(),
      securityGroups: this.securityGroups.list(),
      hypervisors: this.hypervisors.list(),
      // the last good network values this node wired: a transient status never unwires running guests
      ...(this.#last ? { previous: this.#last.plan } : {}),
      ...(this.#observed ? { observed: this.#observed } : {}),
    };
  }

  /** An informer event: schedule a rebuild unless the node is idle and the object cannot concern it. */
  #changed(obj: unknown, old: unknown): void {
    if (!this.#started || this.#stopped) return;
    if (this.#idle) {
      const bound = (x: unknown) => (x as PortObj | undefined)?.status?.bindingHost === this.nodeName;
      const isServer = (x: unknown) =>
        (x as ServerObj | undefined)?.metadata?.labels?.[SERVER_NODE_LABEL] === this.nodeName;
      if (!bound(obj) && !bound(old) && !isServer(obj)) return;
    }
    this.#schedule(this.#o.debounceMs ?? 50);
  }

  #schedule(delayMs: number): void {
    if (this.#stopped || this.#timer) return;
    this.#timer = this.#clock.setTimer(() => {
      this.#timer = undefined;
      void this.#run();
    }, delayMs);
  }

  async #run(): Promise<void> {
    if (this.#running) {
      this.#again = true;
      return this.#running;
    }
    this.#running = (async () => {
      do {
        this.#again = false;
        const force = this.#force;
        this.#force = false;
        try {
          await this.#applyOnce(force);
        } catch (err) {
          this.#log.error({ err }, 'network reconcile failed');
          this.#schedule(this.#o.retryMs ?? 5000);
        }
      } while (this.#again && !this.#stopped);
    })().finally(() => {
      this.#running = undefined;
    });
    return this.#running;
  }

  /** One rebuild: plan, apply when changed (or forced), port status, wake waiting servers. */
  async #applyOnce(force: boolean): Promise<void> {
    if (!this.#synced()) {
      this.#schedule(200);
      return;
    }
    this.rebuilds++;
    if (!this.#last && !this.#observed && this.backend.observeNetworks) {
      try {
        this.#observed = await this.backend.observeNetworks();
      } catch (err) {
        this.#log.warn({ err }, 'cannot observe the networks wired on the node');
        this.#observed = new Map();
      }
    }
    const result = buildPlan(this.#input());
    const problems = json(result.problems);
    if (problems !== this.#lastProblems) {
      if (result.problems.length > 0) this.#log.warn({ problems: result.problems }, 'network plan problems');
      this.#lastProblems = problems;
    }
    const plan = result.plan;
    const planJson = JSON.stringify(plan);
    if (force || planJson !== this.#lastPlan) {
      const t0 = this.#clock.now();
      let applied: Awaited<ReturnType<NetworkBackend['apply']>>;
      let ok = true;
      try {
        applied = await this.backend.apply(plan);
      } catch (err) {
        ok = false;
        this.#metrics.errors.inc({ backend: this.backend.name });
        this.#log.error({ err }, 'network backend apply failed');
        this.#schedule(this.#o.retryMs ?? 5000);
        // Ports keep their previous wiring state; the ones never wired stay not ready.
        const message = `apply failed: ${(err as Error).message}`.slice(0, 512);
        // Ports this process never saw wired (e.g. the first apply after a restart) may well be wired: their
        // status is left alone until an apply succeeds, rather than flipped to BUILD.
        this.#unverified = new Set(plan.ports.filter((p) => !this.#wired.has(p.id)).map((p) => p.id));
        applied = { ports: {}, changes: [] };
        for (const p of plan.ports) {
          applied.ports[p.id] = this.#wired.get(p.id)?.ready ? { ready: true } : { ready: false, message };
        }
      }
      const seconds = (this.#clock.now() - t0) / 1000;
      this.#metrics.duration.observe({ backend: this.backend.name }, seconds);
      this.applies++;
      if (applied.changes.length > 0) {
        this.#log.info(
          { changes: applied.changes, ports: plan.ports.length, networks: plan.networks.length, seconds },
          'network applied',
        );
      }
      this.#lastPlan = ok ? planJson : undefined;
      if (ok) this.#unverified = new Set();
      if (ok) this.#observed = undefined; // the plans from now on carry the values the node has
      this.#wired = new Map(
        plan.ports.map((p) => [
          p.id,
          {
            ...(applied.ports[p.id] ?? { ready: false, message: 'not reported by the backend' }),
            fingerprint: portFingerprint(plan, p.id),
          },
        ]),
      );
    }
    this.#last = result;

    // port status
    const results = Object.fromEntries([...this.#wired].map(([id, w]) => [id, w]));
    const changes = bindingChanges(this.nodeName, this.backend.vifType, this.ports.list(), plan, results).filter(
      (c) => !(c.kind === 'bind' && this.#unverified.has(c.port.metadata?.uid ?? '')),
    );
    let failed = false;
    for (const c of changes) {
      if (this.#stopped) return;
      if (!(await this.#writeBinding(c))) failed = true;
    }
    if (failed) this.#schedule(this.#o.retryMs ?? 5000);

    // servers waiting in plug()
    if (this.#waiting.size > 0) {
      const known = new Set(this.#o.servers.list().map((x) => objectKey(x)));
      for (const key of [...this.#waiting]) {
        const s = result.servers.get(key);
        if (!s) {
          if (!known.has(key)) this.#waiting.delete(key); // gone from this node: nothing to wake
          continue;
        }
        if (s.entries.every((e) => e.plan && !e.waiting && this.#wired.get(e.plan.id)?.ready)) {
          this.#waiting.delete(key);
          this.onWake?.(key);
        }
      }
    }
    this.#idle =
      result.servers.size === 0 &&
      this.#waiting.size === 0 &&
      !this.ports.list().some((p) => p.status?.bindingHost === this.nodeName);
  }

  /** Writes one binding change; false when it failed (retried later). */
  async #writeBinding(c: BindingChange): Promise<boolean> {
    const name = `${c.port.metadata?.namespace}/${c.port.metadata?.name}`;
    try {
      await updateStatus(
        this.#client,
        PORTS,
        c.port,
        (st, obj) =>
          bindingStatus(c, st, this.nodeName, this.backend.vifType, (conds, cond) =>
            setCondition(conds as never, cond, obj.metadata?.generation, new Date(this.#clock.now())),
          ),
        { fieldManager: agentFieldManager(this.nodeName) },
      );
      if (c.kind === 'unbind') this.#log.info({ port: name }, 'port unbound');
      else if (c.ready) this.#log.info({ port: name, vifType: this.backend.vifType }, 'port bound');
      else this.#log.warn({ port: name, message: c.message }, 'port bound but not wired');
      return true;
    } catch (err) {
      if (isNotFound(err)) return true;
      this.#log.warn({ err, port: name, change: c.kind }, 'cannot write port status');
      return false;
    }
  }
}

/** The parts of a Network status the plan reads (not conditions, usage counters). */
function netStatus(n: NetworkObj) {
  const s = n.status ?? {};
  return [s.segmentationID, s.mtu, s.subnets?.map((x) => [x.name, x.cidr, x.ipVersion, x.gatewayIP, x.dhcpAddress])];
}

/** The parts of a Port the plan reads. */
function portView(p: PortObj) {
  const s = p.status ?? {};
  return [
    p.metadata?.labels,
    p.metadata?.deletionTimestamp,
    p.spec,
    s.macAddress,
    s.fixedIPs,
    s.bindingHost,
    s.vifType,
    s.status,
    s.conditions?.map((c) => [c.type, c.status, (c as { message?: string }).message]),
  ];
}

/** The parts of a Server the plan reads. */
function serverView(s: ServerObj) {
  return [s.spec?.networks, s.spec?.hostname, s.status?.node, s.metadata?.labels?.[SERVER_NODE_LABEL]];
}
