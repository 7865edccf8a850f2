// The node's Hypervisor object (Nova's compute service record + resource provider). The agent creates it once with
// spec defaults from its configuration, then keeps status current by server-side apply (field manager
// stratus-agent): host facts from the driver, allocatable after reservations and allocation ratios, usage of the
// guests it runs — written only when they change. Liveness is the node Lease (as kubelets do): every
// heartbeatSeconds the agent renews the coordination.k8s.io/v1 Lease nodeLeaseName(node) in the lease namespace;
// the operator judges up/down by when IT observed renewals, never by the time written in them. status.state and
// status.status are the operator's. RBAC the agent needs on leases (in that namespace): create, patch (and create
// on namespaces only if it may start before the operator has created the lease namespace).
import { type KubernetesObject, PatchStrategy, type V1Lease, V1MicroTime } from '@kubernetes/client-node';
import {
  type Hypervisor,
  HypervisorKind,
  HypervisorSpec,
  NODE_LEASE_LABEL,
  NODE_LEASE_NAMESPACE,
  nodeLeaseName,
  parseBytes,
  parseMilli,
  toGiB,
  toMiB,
} from '../../operator/src/api/index.ts';
import {
  type Clock,
  type Condition,
  type GVR,
  isAlreadyExists,
  isNotFound,
  type KubeClient,
  type Logger,
  leaseGVR,
  patchStatus,
  setCondition,
  silentLogger,
  systemClock,
  type TimerHandle,
} from '../../operator/src/runtime/index.ts';
import type { Accelerator, GuestInfo, HostInfo, HypervisorDriver } from './driver.ts';
import { agentFieldManager } from './fieldmanager.ts';

/** Field manager of the one-time create (so the heartbeat manager owns no spec field). */
const CREATE_FIELD_MANAGER = 'stratus-agent-create';
export const HYPERVISORS: GVR = {
  group: HypervisorKind.group,
  version: HypervisorKind.version,
  plural: HypervisorKind.plural,
};

const NAMESPACES: GVR = { group: '', version: 'v1', plural: 'namespaces' };

const MiB = 1024n ** 2n;
const GiB = 1024n ** 3n;

export interface Amounts {
  vcpus: number;
  ram: string;
  disk: string;
}

/** floor((capacity − reserved) × ratio), never negative; ratio in thousandths. */
function limit(capacity: number, reserved: number, ratioMilli: number): number {
  const usable = capacity - reserved;
  if (usable <= 0) return 0;
  return Number((BigInt(usable) * BigInt(ratioMilli)) / 1000n);
}

/**
 * What servers may use in total: (capacity − reserved) × allocation ratio, in the scheduler's units (vCPUs, whole
 * MiB of RAM, whole GiB of disk; capacity rounded down, reservations rounded up), so the Hypervisor shows exactly
 * the limits placement uses.
 */
export function allocatableOf(capacity: Amounts, spec: HypervisorSpec): Amounts {
  return {
    vcpus: limit(capacity.vcpus, spec.reserved.vcpus, parseMilli(spec.cpuAllocationRatio)),
    ram: `${limit(Number(parseBytes(capacity.ram) / MiB), toMiB(spec.reserved.ram), parseMilli(spec.ramAllocationRatio))}Mi`,
    disk: `${limit(Number(parseBytes(capacity.disk) / GiB), toGiB(spec.reserved.disk), parseMilli(spec.diskAllocationRatio))}Gi`,
  };
}

/** Resources of the guests defined on the node (running or not: a stopped server keeps its claim). */
export function usageOf(guests: readonly GuestInfo[]): Amounts & { servers: number } {
  let vcpus = 0;
  let ramMiB = 0;
  let diskGiB = 0;
  for (const g of guests) {
    vcpus += g.vcpus;
    ramMiB += g.ramMiB;
    diskGiB += g.diskGiB;
  }
  return { vcpus, ram: `${ramMiB}Mi`, disk: `${diskGiB}Gi`, servers: guests.length };
}

/** The accelerator guests get: spec.accelerator unless auto, and never KVM on a host without it. */
export function effectiveAccelerator(
  wanted: HypervisorSpec['accelerator'],
  host: Pick<HostInfo, 'accelerator' | 'acceleratorReason'>,
): { accelerator: Accelerator; reason: string } {
  if (wanted === 'auto') return { accelerator: host.accelerator, reason: host.acceleratorReason };
  if (wanted === 'tcg') return { accelerator: 'tcg', reason: 'spec.accelerator is tcg' };
  if (host.accelerator === 'kvm') return { accelerator: 'kvm', reason: 'spec.accelerator is kvm' };
  return { accelerator: 'tcg', reason: `spec.accelerator is kvm but KVM is unusable: ${host.acceleratorReason}` };
}

export interface HypervisorReporterOptions {
  client: KubeClient;
  nodeName: string;
  driver: HypervisorDriver;
  /** Network backend name reported in status.networkBackend. */
  networkBackend?: 'linuxbridge' | 'ovs' | 'noop';
  /** Spec of a Hypervisor the agent creates (API defaults fill the rest). */
  specDefaults: Partial<HypervisorSpec>;
  /** Labels the Hypervisor must carry (e.g. topology.kubernetes.io/zone). */
  labels: Readonly<Record<string, string>>;
  hostIP?: string;
  heartbeatSeconds: number;
  /** Namespace of the node Lease (default NODE_LEASE_NAMESPACE, the operator's). */
  leaseNamespace?: string;
  agentVersion: string;
  /**
   * The node's volume backends as their probe() sees them (status.volumeBackends; VolumeHost.probe). Without it
   * the field is not written.
   */
  volumeBackends?: () => Promise<VolumeBackendReport[]>;
  /** Whether the agent is ready to run servers (caches synced), with a message when not. */
  readiness: () => { ready: boolean; message: string };
  logger?: Logger;
  clock?: Clock;
}

/** One entry of status.volumeBackends. */
export interface VolumeBackendReport {
  name: string;
  ok: boolean;
  reason?: string;
}

/** Usage is informational (the scheduler counts its own claims): report it at most every few seconds. */
export const POKE_DELAY_MS = 3000;

/** Creates the node's Hypervisor and heartbeats its status. */
export class HypervisorReporter {
  readonly name: string;
  readonly #o: HypervisorReporterOptions;
  readonly #log: Logger;
  readonly #clock: Clock;
  #spec: HypervisorSpec = HypervisorSpec.parse({});
  #generation: number | undefined;
  #conditions: Condition[] | undefined;
  #host: HostInfo | undefined;
  #usage: (Amounts & { servers: number }) | undefined;
  #timer: TimerHandle | undefined;
  #leaseTimer: TimerHandle | undefined;
  #pokeTimer: TimerHandle | undefined;
  #running: Promise<void> | undefined;
  #again = false;
  #stopped = false;
  /** The status last written (JSON): an identical one is not written again. */
  #written: string | undefined;
  /** Successful status writes (for tests and metrics). */
  heartbeats = 0;
  /** Successful renewals of the node Lease. */
  leaseRenewals = 0;

  constructor(o: HypervisorReporterOptions) {
    this.#o = o;
    this.name = o.nodeName;
    this.#log = (o.logger ?? silentLogger()).child({ hypervisor: o.nodeName });
    this.#clock = o.clock ?? systemClock;
  }

  /** The spec as last read from the API (API defaults before the first read). */
  get spec(): HypervisorSpec {
    return this.#spec;
  }

  /** The accelerator guests are started with, once host facts are known. */
  accelerator(): Accelerator | undefined {
    return this.#host && effectiveAccelerator(this.#spec.accelerator, this.#host).accelerator;
  }

  /** Creates the Hypervisor if absent (spec from config), else adds missing labels. Leaves an existing spec alone. */
  async ensure(): Promise<void> {
    const { client, nodeName, labels } = this.#o;
    let obj: Hypervisor;
    try {
      obj = await client.create<Hypervisor>(
        HYPERVISORS,
        {
          apiVersion: HypervisorKind.apiVersion,
          kind: HypervisorKind.kind,
          metadata: { name: nodeName, labels: { ...labels } },
          spec: this.#o.specDefaults as HypervisorSpec,
        },
        { fieldManager: CREATE_FIELD_MANAGER },
      );
      this.#log.info('created the Hypervisor');
    } catch (err) {
      if (!isAlreadyExists(err)) throw err;
      obj = await client.get<Hypervisor>(HYPERVISORS, nodeName);
      const current = obj.metadata.labels ?? {};
      const missing = Object.fromEntries(Object.entries(labels).filter(([k, v]) => current[k] !== v));
      if (Object.keys(missing).length > 0) {
        obj = await client.patch<Hypervisor>(
          HYPERVISORS,
          nodeName,
          undefined,
          { metadata: { labels: missing } },
          PatchStrategy.MergePatch,
          { fieldManager: agentFieldManager(nodeName) },
        );
      }
    }
    this.#observe(obj);
  }

  /**
   * Renews the node Lease and reports (when something changed) now and then every heartbeatSeconds, on separate
   * timers: a slow status report (driver, a burst of usage changes) never delays a renewal.
   */
  start(): void {
    if (this.#timer || this.#stopped) return;
    const every = (run: () => Promise<void>, set: (t: TimerHandle) => void) => {
      const tick = () => {
        if (this.#stopped) return;
        void run().finally(() => {
          if (!this.#stopped) set(this.#clock.setTimer(tick, this.#o.heartbeatSeconds * 1000));
        });
      };
      tick();
    };
    every(
      () => this.renewLease(),
      (t) => {
        this.#leaseTimer = t;
      },
    );
    every(
      () => this.report(),
      (t) => {
        this.#timer = t;
      },
    );
  }

  /** Asks for an early report (usage changed); the pokes of POKE_DELAY_MS make one write. */
  poke(): void {
    if (this.#stopped || this.#pokeTimer) return;
    this.#pokeTimer = this.#clock.setTimer(() => {
      this.#pokeTimer = undefined;
      void this.report();
    }, POKE_DELAY_MS);
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    this.#timer?.cancel();
    this.#leaseTimer?.cancel();
    this.#pokeTimer?.cancel();
    await this.#running;
  }

  /** Renews (or creates) the node Lease; never throws (failures are logged). */
  async renewLease(): Promise<void> {
    const { client, nodeName } = this.#o;
    const namespace = this.#o.leaseNamespace ?? NODE_LEASE_NAMESPACE;
    const name = nodeLeaseName(nodeName);
    // renewTime is informational (this host's clock): the operator only notices that it changed.
    const spec = { holderIdentity: nodeName, renewTime: new V1MicroTime(this.#clock.now()) };
    const labels = { ...this.#o.labels, [NODE_LEASE_LABEL]: nodeName };
    try {
      try {
        await client.patch<V1Lease>(
          leaseGVR,
          name,
          namespace,
          { metadata: { labels }, spec },
          PatchStrategy.MergePatch,
          {
            fieldManager: agentFieldManager(nodeName),
          },
        );
      } catch (err) {
        if (!isNotFound(err)) throw err;
        const lease: V1Lease = {
          apiVersion: 'coordination.k8s.io/v1',
          kind: 'Lease',
          metadata: { name, namespace, labels },
          spec,
        };
        try {
          await client.create<V1Lease>(leaseGVR, lease, { fieldManager: agentFieldManager(nodeName) });
        } catch (createErr) {
          // The operator creates its namespace at start; an agent that comes first creates it (or waits for it).
          if (!isNotFound(createErr)) throw createErr;
          await client
            .create(NAMESPACES, { apiVersion: 'v1', kind: 'Namespace', metadata: { name: namespace } })
            .catch((nsErr: unknown) => {
              if (!isAlreadyExists(nsErr)) throw nsErr;
            });
          await client.create<V1Lease>(leaseGVR, lease, { fieldManager: agentFieldManager(nodeName) });
        }
      }
      this.leaseRenewals++;
    } catch (err) {
      this.#log.warn({ err, lease: `${namespace}/${name}` }, 'node lease renewal failed');
    }
  }

  /** One status write (never throws; failures are logged). Concurrent calls coalesce into one more write. */
  async report(): Promise<void> {
    if (this.#running) {
      this.#again = true;
      return this.#running;
    }
    this.#running = (async () => {
      do {
        this.#again = false;
        await this.#reportOnce();
      } while (this.#again && !this.#stopped);
    })().finally(() => {
      this.#running = undefined;
    });
    return this.#running;
  }

  async #reportOnce(): Promise<void> {
    let driverProblem: string | undefined;
    try {
      this.#host = await this.#o.driver.hostInfo();
      this.#usage = usageOf(await this.#o.driver.list());
    } catch (err) {
      driverProblem = `driver ${this.#o.driver.name}: ${(err as Error).message}`;
      this.#log.warn({ err }, 'cannot read host facts from the driver');
    }
    const readiness = this.#o.readiness();
    const ready =
      driverProblem !== undefined
        ? { status: 'False' as const, reason: 'DriverError', message: driverProblem }
        : !readiness.ready || !this.#host
          ? { status: 'False' as const, reason: 'Starting', message: readiness.message || 'reading host facts' }
          : { status: 'True' as const, reason: 'AgentReady', message: readiness.message };
    const now = new Date(this.#clock.now());
    const status: Record<string, unknown> = {
      ...(this.#o.hostIP ? { hostIP: this.#o.hostIP } : {}),
      ...(this.#o.networkBackend ? { networkBackend: this.#o.networkBackend } : {}),
      agentVersion: this.#o.agentVersion,
      driver: this.#o.driver.name,
      ...(this.#generation !== undefined ? { observedGeneration: this.#generation } : {}),
      conditions: setCondition(this.#conditions, { type: 'Ready', ...ready }, this.#generation, now).filter(
        (c) => c.type === 'Ready',
      ),
    };
    const host = this.#host;
    if (host) {
      const accel = effectiveAccelerator(this.#spec.accelerator, host);
      Object.assign(status, {
        accelerator: accel.accelerator,
        acceleratorReason: accel.reason.slice(0, 1024),
        cpu: host.cpu,
        capacity: host.capacity,
        allocatable: allocatableOf(host.capacity, this.#spec),
        ...(this.#o.driver.name === 'qemu' && host.version ? { qemuVersion: host.version } : {}),
      });
    }
    if (this.#usage) status.usage = this.#usage;
    if (this.#o.volumeBackends) {
      try {
        status.volumeBackends = (await this.#o.volumeBackends()).slice(0, 8);
      } catch (err) {
        this.#log.warn({ err }, 'cannot probe the volume backends');
      }
    }
    // Nothing new to say: no write (liveness is the Lease, not a rewrite of the status).
    const json = JSON.stringify(status);
    if (json === this.#written) return;
    try {
      const obj = await patchStatus<Hypervisor & KubernetesObject>(
        this.#o.client,
        HYPERVISORS,
        { apiVersion: HypervisorKind.apiVersion, kind: HypervisorKind.kind, metadata: { name: this.#o.nodeName } },
        status,
        { fieldManager: agentFieldManager(this.#o.nodeName) },
      );
      this.heartbeats++;
      this.#written = json;
      const generationBefore = this.#generation;
      this.#observe(obj);
      // The spec changed since the values were computed (ratios, reservations): report again at once.
      if (this.#generation !== generationBefore && generationBefore !== undefined) this.#again = true;
    } catch (err) {
      this.#log.warn({ err }, 'hypervisor heartbeat failed');
    }
  }

  #observe(obj: Hypervisor): void {
    const parsed = HypervisorSpec.safeParse(obj.spec ?? {});
    if (parsed.success) this.#spec = parsed.data;
    else this.#log.warn({ issues: parsed.error.issues }, 'Hypervisor spec is invalid; keeping the previous one');
    this.#generation = obj.metadata.generation;
    this.#conditions = obj.status?.conditions as Condition[] | undefined;
  }
}
