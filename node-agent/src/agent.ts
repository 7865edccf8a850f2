// The node agent (nova-compute): one NodeAgent per node runs the node's Hypervisor heartbeat, its Server
// reconciler and its network service (Neutron's L2 agent) on a shared runtime Manager. A process runs one agent, or
// many simulated ones with the fake driver (fakeNodes), all sharing one Manager, KubeClient and /metrics endpoint.
import { readFileSync } from 'node:fs';
import { hostname, networkInterfaces } from 'node:os';
import type { KubeConfig } from '@kubernetes/client-node';
import * as z from 'zod';
import {
  byteQuantity,
  decimalRatio,
  type HypervisorSpec,
  ipAddress,
  NODE_LEASE_NAMESPACE,
} from '../../operator/src/api/index.ts';
import {
  type Clock,
  type EventRecorder,
  type Logger,
  Manager,
  silentLogger,
} from '../../operator/src/runtime/index.ts';
import { ComputeService } from './compute.ts';
import type { HypervisorDriver } from './driver.ts';
import { FakeDriverOptions } from './drivers/fake.ts';
import { createDriver, DRIVER_NAMES } from './drivers/index.ts';
import type { QemuDriverOptions } from './drivers/qemu.ts';
import { HypervisorReporter } from './hypervisor.ts';
import { parseCidr } from './images/urlguard.ts';
import type { NetworkBackend } from './network/backend.ts';
import { NetworkController } from './network/controller.ts';
import { BACKEND_NAMES, type BackendName } from './network/index.ts';
import { NoopBackend } from './network/noop.ts';
import { VolumeAttacher, type VolumeConnectors } from './volumes/attach.ts';
import { VolumeHost, type VolumeHostOptions } from './volumes/host.ts';

export const ZONE_LABEL = 'topology.kubernetes.io/zone';

const DNS1123_SUBDOMAIN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;
const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
const fakeOps = FakeDriverOptions.shape;
const cidr = z.string().refine(
  (c) => {
    try {
      parseCidr(c);
      return true;
    } catch {
      return false;
    }
  },
  { message: 'must be a CIDR (address/prefix) or an address' },
);

/** Flags (--node-name=x) and environment (STRATUS_NODE_NAME=x); see `node node-agent/src/main.ts --help`. */
export const AgentConfig = z.object({
  nodeName: z
    .string()
    .max(200)
    .regex(DNS1123_SUBDOMAIN, 'must be a lower-case DNS subdomain')
    .default(hostname().toLowerCase())
    .describe('Node (and Hypervisor) name; default: the host name.'),
  kubeconfig: z.string().optional().describe('Path of a kubeconfig; default: in-cluster or $KUBECONFIG.'),
  driver: z
    .enum(DRIVER_NAMES)
    .default('qemu')
    .describe('Hypervisor driver: qemu (QEMU guests) or fake (in-memory guests).'),
  fakeNodes: z
    .int()
    .min(1)
    .max(1000)
    .default(1)
    .describe('With the fake driver: simulate this many nodes, named <node-name>-<i> (i from 0).'),
  fakeVcpus: fakeOps.vcpus,
  fakeRam: fakeOps.ram.describe('Host memory the fake hypervisor reports.'),
  fakeDisk: fakeOps.disk.describe('Host local disk the fake hypervisor reports.'),
  fakeLatencyMs: fakeOps.latencyMs,
  fakeOpLatencyMs: fakeOps.opLatencyMs.describe('Latency per operation as JSON, e.g. {"spawn":2000}.'),
  fakeFailureRate: fakeOps.failureRate,
  fakeOpFailureRate: fakeOps.opFailureRate.describe('Failure probability per operation as JSON, e.g. {"spawn":0.1}.'),
  networkBackend: z
    .enum(BACKEND_NAMES)
    .optional()
    .describe(
      'Network backend wiring the ports: linuxbridge (Linux bridge + VXLAN + nftables), ovs (Open vSwitch) or noop (wires nothing); default: linuxbridge with the qemu driver, noop with the fake driver.',
    ),
  netns: z
    .string()
    .max(64)
    .regex(/^[A-Za-z0-9][A-Za-z0-9_.-]*$/, 'must be a network namespace name')
    .optional()
    .describe(
      'Run the data plane (network backend commands and QEMU) inside this network namespace (simulated nodes).',
    ),
  dhcpNetnsPrefix: z
    .string()
    .max(32)
    .regex(/^[A-Za-z0-9][A-Za-z0-9_.-]*$/, 'must be a network namespace name prefix')
    .optional()
    .describe("Prefix of the per-network DHCP namespaces (default: the backend's)."),
  underlayDevice: z
    .string()
    .max(15)
    .optional()
    .describe('Underlay device of the VXLAN tunnels (default: the device holding --host-ip).'),
  ovsDb: z
    .string()
    .min(1)
    .optional()
    .describe('ovs backend: OVSDB server (ovs-vsctl --db), e.g. unix:/run/openvswitch/db.sock.'),
  ovsDatapath: z
    .enum(['system', 'netdev'])
    .default('system')
    .describe('ovs backend: datapath type of the integration bridge (netdev: userspace, for tests).'),
  networkResyncSeconds: z
    .number()
    .min(0)
    .default(30)
    .describe('Re-apply the node network plan this often, repairing drift (0: only on changes).'),
  zone: z.string().max(63).optional().describe(`Availability zone: the ${ZONE_LABEL} label of the Hypervisor.`),
  labels: z.record(z.string().max(317), z.string().max(63)).default({}).describe('More Hypervisor labels, as JSON.'),
  hostIP: ipAddress('Underlay address of the node.')
    .optional()
    .describe('Underlay address of the node; default: the first non-loopback IPv4 address.'),
  heartbeatSeconds: z
    .number()
    .positive()
    .max(300)
    .default(10)
    .describe('Node Lease renewal period (and how often host facts and usage are checked for a status write).'),
  leaseNamespace: z
    .string()
    .min(1)
    .max(63)
    .default(NODE_LEASE_NAMESPACE)
    .describe("Namespace of the node Lease: the operator's lease namespace."),
  concurrency: z
    .int()
    .min(1)
    .max(64)
    .default(4)
    .describe('Parallel Server reconciles per node (Nova max_concurrent_builds).'),
  powerOffTimeoutSeconds: z
    .number()
    .positive()
    .default(60)
    .describe('Graceful shutdown grace before power off is forced (Nova shutdown_timeout).'),
  orphanGraceSeconds: z
    .number()
    .min(0)
    .default(60)
    .describe('A guest no Server bound here owns is destroyed after this long.'),
  orphanSweepSeconds: z.number().positive().default(60).describe('How often to look for orphaned guests.'),
  resyncSeconds: z
    .number()
    .min(0)
    .default(60)
    .describe('Reconcile every Server this often without events (power state sync; 0: never).'),
  accelerator: z
    .enum(['auto', 'kvm', 'tcg'])
    .default('auto')
    .describe(
      'Accelerator: auto (KVM when a real kernel boots under it, else TCG), kvm (the qemu driver refuses to start without it) or tcg; also spec.accelerator of a Hypervisor the agent creates.',
    ),
  kvmProbeKernel: z
    .string()
    .regex(/^\//, 'must be an absolute path')
    .optional()
    .describe(
      'qemu driver: the kernel (vmlinuz) the KVM probe boots; default /usr/share/stratus/kvm-probe/vmlinuz, /boot/vmlinuz-<release>, /boot/vmlinuz or /vmlinuz, the first that exists.',
    ),
  stateDir: z
    .string()
    .regex(/^\//, 'must be an absolute path')
    .default('/var/lib/stratus')
    .describe('qemu driver: root of the guest directories (guests/<uid>/) and, by default, the image cache.'),
  imageCacheDir: z
    .string()
    .regex(/^\//, 'must be an absolute path')
    .optional()
    .describe('qemu driver: image cache directory; default <state-dir>/images.'),
  qemuBinary: z.string().min(1).default('qemu-system-x86_64').describe('qemu driver: the QEMU system emulator.'),
  qemuUser: z
    .string()
    .regex(/^([a-z_][a-z0-9_-]{0,31}|\d+:\d+)$/, 'a user name or uid:gid')
    .default('stratus-qemu')
    .describe(
      'qemu driver: the unprivileged user QEMU drops to before the guest runs (-runas); a name or uid:gid; root keeps QEMU root. The guest files are owned by it, mode 0600.',
    ),
  imageUrlAllowCidr: z
    .array(cidr)
    .default([])
    .describe(
      'qemu driver: addresses image URLs may reach although denied (CIDRs; repeatable or comma separated), e.g. 127.0.0.0/8 for an image server on loopback. Wins over every denied range.',
    ),
  imageUrlDenyCidr: z
    .array(cidr)
    .default([])
    .describe(
      "qemu driver: addresses image URLs may not reach besides loopback, link-local and unspecified ones (CIDRs; repeatable or comma separated): the cluster's service and pod ranges (the Helm chart fills them in).",
    ),
  launcher: z
    .enum(['auto', 'direct', 'systemd', 'host'])
    .default('direct')
    .describe(
      'qemu driver: how QEMU is started so guests outlive the agent: direct (detached child; local runs), systemd (a transient unit per guest on the host), host (from a container on a host without systemd: a QEMU bundle copied to the host, the host mount namespace, a cgroup per guest under stratus-guests/), or auto (systemd when the host runs systemd, else host in a container, else direct; the DaemonSet). docs/design/guest-placement.md.',
    ),
  hostMountNsPid: z
    .int()
    .min(1)
    .optional()
    .describe(
      'qemu driver: a host process whose namespaces the agent enters to start QEMU on the host; default PID 1 when its namespaces can be read, else the nearest ancestor in another mount namespace (the container shim).',
    ),
  hostCgroupRoot: z
    .string()
    .regex(/^\//, 'must be an absolute path')
    .optional()
    .describe(
      "qemu driver, host launcher: where the agent sees the host's /sys/fs/cgroup (a hostPath mount); default /sys/fs/cgroup through /proc/<host pid>/root.",
    ),
  cpuAllocationRatio: decimalRatio('spec.cpuAllocationRatio')
    .default('4.0')
    .describe('spec.cpuAllocationRatio of a Hypervisor the agent creates.'),
  ramAllocationRatio: decimalRatio('spec.ramAllocationRatio')
    .default('1.0')
    .describe('spec.ramAllocationRatio of a Hypervisor the agent creates.'),
  diskAllocationRatio: decimalRatio('spec.diskAllocationRatio')
    .default('1.0')
    .describe('spec.diskAllocationRatio of a Hypervisor the agent creates.'),
  reservedVcpus: z.int().min(0).default(0).describe('spec.reserved.vcpus of a Hypervisor the agent creates.'),
  reservedRam: byteQuantity('spec.reserved.ram')
    .default('512Mi')
    .describe('spec.reserved.ram of a Hypervisor the agent creates.'),
  reservedDisk: byteQuantity('spec.reserved.disk')
    .default('0')
    .describe('spec.reserved.disk of a Hypervisor the agent creates.'),
  metricsPort: z
    .int()
    .min(0)
    .max(65535)
    .default(8081)
    .describe('Port of /metrics, /healthz and /readyz (0: any free port).'),
  metricsHost: z.string().default('0.0.0.0').describe('Address the HTTP endpoints listen on.'),
  gracefulShutdownSeconds: z.number().positive().default(30).describe('Deadline for in-flight reconciles on SIGTERM.'),
  logLevel: z.enum(LOG_LEVELS).default('info').describe('Log level.'),
});
export type AgentConfig = z.infer<typeof AgentConfig>;

export const AGENT_VERSION: string = (() => {
  try {
    const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as {
      version?: string;
    };
    return pkg.version ?? 'unknown';
  } catch {
    return 'unknown';
  }
})();

/** The first non-internal IPv4 address of the host, if any. */
export function detectHostIP(): string | undefined {
  for (const addrs of Object.values(networkInterfaces())) {
    for (const a of addrs ?? []) if (a.family === 'IPv4' && !a.internal) return a.address;
  }
  return undefined;
}

export interface NodeAgentOptions {
  nodeName: string;
  driver: HypervisorDriver;
  /** The node's network backend (default: a noop backend). */
  networkBackend?: NetworkBackend;
  /** Forced network apply period in seconds (default 30; 0: only on changes). */
  networkResyncSeconds?: number;
  /** Hypervisor labels (zone included). */
  labels?: Readonly<Record<string, string>>;
  hostIP?: string;
  /** Spec of a Hypervisor the agent creates (API defaults fill the rest). */
  hypervisorSpec?: Partial<HypervisorSpec>;
  heartbeatSeconds?: number;
  /** Namespace of the node Lease (default NODE_LEASE_NAMESPACE); also that of the Secret stratus-volume-nbd. */
  leaseNamespace?: string;
  /**
   * How this node reaches volumes (volumes/attach.ts VolumeConnectors): the volume backends by name, the rbd backend
   * of a volume type and the NBD client. Default: none (attachments wait or fail with "no ... backend").
   */
  volumeConnectors?: VolumeConnectors;
  /**
   * The volume host of this node (cinder-volume: volumes/host.ts) and its backends; default: none (this node holds no
   * volumes and reports no volume backends). volumes/node.ts nodeVolumes builds it for the qemu driver.
   */
  volumeHost?: Omit<VolumeHostOptions, 'manager' | 'nodeName' | 'logger' | 'clock'>;
  concurrency?: number;
  powerOffTimeoutSeconds?: number;
  orphanGraceSeconds?: number;
  orphanSweepSeconds?: number;
  resyncSeconds?: number;
  clock?: Clock;
}

/** One node: its Hypervisor heartbeat, its Server reconciler and its network service, registered on a Manager. */
export class NodeAgent {
  readonly nodeName: string;
  readonly driver: HypervisorDriver;
  readonly hypervisor: HypervisorReporter;
  readonly compute: ComputeService;
  readonly network: NetworkController;
  readonly volumes: VolumeAttacher;
  /** The volume host, when the node runs one (volumeHost option). */
  readonly volumeHost: VolumeHost | undefined;
  readonly events: EventRecorder;
  readonly #log: Logger;

  /** Registers the agent's informer and controller on mgr (before or after mgr.start()). */
  constructor(mgr: Manager, o: NodeAgentOptions) {
    this.nodeName = o.nodeName;
    this.driver = o.driver;
    this.#log = mgr.logger.child({ node: o.nodeName });
    this.events = mgr.eventRecorder({
      reportingController: 'stratus.io/node-agent',
      reportingInstance: o.nodeName.slice(0, 128),
    });
    let compute: ComputeService | undefined;
    let network: NetworkController | undefined;
    const backend = o.networkBackend ?? new NoopBackend();
    const volumeHost = o.volumeHost
      ? new VolumeHost({
          ...o.volumeHost,
          manager: mgr,
          nodeName: o.nodeName,
          logger: this.#log,
          ...(o.clock ? { clock: o.clock } : {}),
        })
      : undefined;
    this.volumeHost = volumeHost;
    this.hypervisor = new HypervisorReporter({
      ...(volumeHost ? { volumeBackends: () => volumeHost.probe() } : {}),
      client: mgr.client,
      nodeName: o.nodeName,
      driver: o.driver,
      networkBackend: backend.name,
      specDefaults: o.hypervisorSpec ?? {},
      labels: o.labels ?? {},
      ...(o.hostIP ? { hostIP: o.hostIP } : {}),
      heartbeatSeconds: o.heartbeatSeconds ?? 10,
      ...(o.leaseNamespace ? { leaseNamespace: o.leaseNamespace } : {}),
      agentVersion: AGENT_VERSION,
      readiness: () =>
        compute?.servers.hasSynced() && network?.ports.hasSynced()
          ? { ready: true, message: `driver ${o.driver.name}, network backend ${backend.name}` }
          : { ready: false, message: 'server and network caches not synced yet' },
      logger: this.#log,
      ...(o.clock ? { clock: o.clock } : {}),
    });
    const s = (v: number | undefined) => (v === undefined ? undefined : v * 1000);
    let volumes: VolumeAttacher | undefined;
    compute = new ComputeService({
      manager: mgr,
      nodeName: o.nodeName,
      driver: o.driver,
      events: this.events,
      hypervisor: this.hypervisor,
      network: { plug: (server) => this.network.plug(server) },
      volumes: { blockDevices: (server) => volumes!.blockDevices(server) },
      ...(o.hostIP ? { hostIP: o.hostIP } : {}),
      ...defined({
        concurrency: o.concurrency,
        powerOffTimeoutMs: s(o.powerOffTimeoutSeconds),
        orphanGraceMs: s(o.orphanGraceSeconds),
        orphanSweepMs: s(o.orphanSweepSeconds),
        resyncMs: s(o.resyncSeconds),
        clock: o.clock,
      }),
      logger: this.#log,
    });
    this.compute = compute;
    // The block-device side (Nova's): the one place the node's volume backends, rbd factory and NBD client come in.
    volumes = new VolumeAttacher({
      manager: mgr,
      nodeName: o.nodeName,
      driver: o.driver,
      servers: compute.servers,
      connectors: o.volumeConnectors ?? { backends: new Map() },
      ...(o.leaseNamespace ? { secretNamespace: o.leaseNamespace } : {}),
      ...defined({ concurrency: o.concurrency }),
      logger: this.#log,
    });
    // A spawn waiting for its boot volume is woken by the Volume's changes.
    compute.controller.watches(volumes.volumes, (v) => volumes!.serverKeysOf(v));
    this.volumes = volumes;
    network = new NetworkController({
      manager: mgr,
      nodeName: o.nodeName,
      ...(o.hostIP ? { hostIP: o.hostIP } : {}),
      backend,
      servers: compute.servers,
      retained: () => compute?.retainedServers() ?? [],
      ...(o.networkResyncSeconds !== undefined ? { resyncMs: o.networkResyncSeconds * 1000 } : {}),
      logger: this.#log,
      ...(o.clock ? { clock: o.clock } : {}),
    });
    network.onWake = (key) => this.compute.controller.enqueue(key);
    compute.onRetainedChanged = () => network?.refresh();
    this.network = network;
  }

  /** Initialises the driver and the network backend and creates the Hypervisor (before the manager starts). */
  async init(): Promise<void> {
    await this.driver.init();
    await this.network.init();
    await this.hypervisor.ensure();
  }

  /** Starts the heartbeat, the orphan sweep and the network service (after the manager started: caches synced). */
  start(): void {
    this.compute.start();
    this.network.start();
    this.volumeHost?.start();
    this.hypervisor.start();
    this.#log.info({ driver: this.driver.name, networkBackend: this.network.backend.name }, 'node agent started');
  }

  /** Stops heartbeat, sweep and network applies; the manager stops the controller. Guests keep running, wired. */
  async stop(): Promise<void> {
    this.compute.stop();
    this.volumeHost?.stop();
    await this.network.stop();
    await this.hypervisor.stop();
  }
}

function defined<T extends Record<string, unknown>>(o: T): { [K in keyof T]?: Exclude<T[K], undefined> } {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as never;
}

export interface StartAgentOptions extends Omit<NodeAgentOptions, 'driver'> {
  kubeConfig: KubeConfig;
  /** A driver instance (tests keep it across agent restarts); default: a new fake driver. */
  driver?: HypervisorDriver;
  logger?: Logger;
  /** HTTP endpoints of the manager (default: none). */
  http?: { port: number; host?: string } | false;
  /** Use this manager instead of a new one (it must not have been started yet). */
  manager?: Manager;
}

export interface RunningAgent {
  agent: NodeAgent;
  driver: HypervisorDriver;
  hypervisorName: string;
  manager: Manager;
  stop(): Promise<void>;
}

/** Starts one node agent in-process (tests, tools). */
export async function startAgent(o: StartAgentOptions): Promise<RunningAgent> {
  const logger = o.logger ?? silentLogger();
  const manager =
    o.manager ??
    new Manager({ kubeConfig: o.kubeConfig, logger, http: o.http ?? false, ...(o.clock ? { clock: o.clock } : {}) });
  const driver = o.driver ?? createDriver('fake', { nodeName: o.nodeName, logger });
  const agent = new NodeAgent(manager, { ...o, driver });
  await agent.init();
  await manager.start();
  agent.start();
  return {
    agent,
    driver,
    hypervisorName: agent.hypervisor.name,
    manager,
    stop: async () => {
      await agent.stop();
      await manager.stop();
    },
  };
}

/** Every simulated node gets its own fake driver and noop network backend. */
export interface FakeNodesOptions extends Omit<StartAgentOptions, 'driver' | 'nodeName' | 'networkBackend'> {
  /** Nodes are named `<prefix>-<i>`. */
  prefix: string;
  fake?: FakeDriverOptions;
}

export interface RunningFakeNodes {
  agents: NodeAgent[];
  manager: Manager;
  stop(): Promise<void>;
}

/**
 * Simulates n nodes with fake drivers in this process: n Hypervisors, heartbeats, Server informers and network
 * services with noop backends (their Network, Port, SecurityGroup and Hypervisor informers are shared).
 */
export async function startFakeNodes(n: number, o: FakeNodesOptions): Promise<RunningFakeNodes> {
  const logger = o.logger ?? silentLogger();
  const manager =
    o.manager ??
    new Manager({ kubeConfig: o.kubeConfig, logger, http: o.http ?? false, ...(o.clock ? { clock: o.clock } : {}) });
  const agents: NodeAgent[] = [];
  for (let i = 0; i < n; i++) {
    const nodeName = `${o.prefix}-${i}`;
    const driver = createDriver('fake', { nodeName, logger, ...(o.fake ? { fake: o.fake } : {}) });
    agents.push(new NodeAgent(manager, { ...o, nodeName, driver }));
  }
  // Hypervisors are created a few at a time, so 100 nodes do not open 100 requests at once.
  for (let i = 0; i < agents.length; i += 10) await Promise.all(agents.slice(i, i + 10).map((a) => a.init()));
  await manager.start();
  for (const a of agents) a.start();
  return {
    agents,
    manager,
    stop: async () => {
      await Promise.all(agents.map((a) => a.stop()));
      await manager.stop();
    },
  };
}

/** Agent options from the configuration (everything but driver and node name). */
export function nodeOptionsFrom(cfg: AgentConfig): Omit<NodeAgentOptions, 'driver' | 'nodeName'> {
  const hostIP = cfg.hostIP ?? detectHostIP();
  return {
    labels: { ...cfg.labels, ...(cfg.zone ? { [ZONE_LABEL]: cfg.zone } : {}) },
    ...(hostIP ? { hostIP } : {}),
    hypervisorSpec: {
      accelerator: cfg.accelerator,
      cpuAllocationRatio: cfg.cpuAllocationRatio,
      ramAllocationRatio: cfg.ramAllocationRatio,
      diskAllocationRatio: cfg.diskAllocationRatio,
      reserved: { vcpus: cfg.reservedVcpus, ram: cfg.reservedRam, disk: cfg.reservedDisk },
    },
    heartbeatSeconds: cfg.heartbeatSeconds,
    leaseNamespace: cfg.leaseNamespace,
    concurrency: cfg.concurrency,
    powerOffTimeoutSeconds: cfg.powerOffTimeoutSeconds,
    orphanGraceSeconds: cfg.orphanGraceSeconds,
    orphanSweepSeconds: cfg.orphanSweepSeconds,
    resyncSeconds: cfg.resyncSeconds,
    networkResyncSeconds: cfg.networkResyncSeconds,
  };
}

/** The network backend name: --network-backend, else linuxbridge for the qemu driver and noop for the fake one. */
export function networkBackendName(cfg: Pick<AgentConfig, 'networkBackend' | 'driver'>): BackendName {
  return cfg.networkBackend ?? (cfg.driver === 'qemu' ? 'linuxbridge' : 'noop');
}

/** The fake driver options from the configuration. */
export function fakeOptionsFrom(cfg: AgentConfig): FakeDriverOptions {
  return {
    vcpus: cfg.fakeVcpus,
    ram: cfg.fakeRam,
    disk: cfg.fakeDisk,
    latencyMs: cfg.fakeLatencyMs,
    opLatencyMs: cfg.fakeOpLatencyMs,
    failureRate: cfg.fakeFailureRate,
    opFailureRate: cfg.fakeOpFailureRate,
  };
}

/** The QEMU driver options from the configuration. */
export function qemuOptionsFrom(cfg: AgentConfig): QemuDriverOptions {
  return {
    stateDir: cfg.stateDir,
    ...(cfg.imageCacheDir ? { imageCacheDir: cfg.imageCacheDir } : {}),
    accelerator: cfg.accelerator,
    ...(cfg.kvmProbeKernel ? { kvmProbeKernel: cfg.kvmProbeKernel } : {}),
    qemuBinary: cfg.qemuBinary,
    qemuUser: cfg.qemuUser,
    launcher: cfg.launcher,
    ...(cfg.hostMountNsPid !== undefined ? { hostMountNsPid: cfg.hostMountNsPid } : {}),
    ...(cfg.hostCgroupRoot !== undefined ? { hostCgroupRoot: cfg.hostCgroupRoot } : {}),
    powerOffTimeoutMs: cfg.powerOffTimeoutSeconds * 1000,
    ...(cfg.netns ? { netns: cfg.netns } : {}),
    ...(cfg.imageUrlAllowCidr.length > 0 || cfg.imageUrlDenyCidr.length > 0
      ? { imageUrlPolicy: { allowCidrs: cfg.imageUrlAllowCidr, denyCidrs: cfg.imageUrlDenyCidr } }
      : {}),
  };
}
