// Environment for the compute control plane integration tests: the operator in-process (or as a child process that a
// test can SIGKILL), fake node agents in-process (one Manager each, so one node can be stopped and restarted with its
// driver and guests kept), and helpers for Flavors, Images, ServerGroups and Servers.
//
// Isolation: every object a test creates carries the label test.stratus.io/cmp=<run id>, and the operator runs on a
// ScopedManager whose informers select that label. So this operator schedules only onto this run's Hypervisors,
// reconciles only this run's Servers, and never touches other tests' Projects, Hypervisors or Servers (which the
// project and hypervisor controllers of an unscoped operator would). Servers also carry a nodeSelector on the label,
// so an unscoped operator of another test could not place them elsewhere either.
//
// Run as a script (`node compute-env.ts`) it is the child-process operator: CMP_SCOPE, CMP_GRACE, CMP_IDENTITY.
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { type EventsV1Event, type KubernetesObject, PatchStrategy } from '@kubernetes/client-node';
import { pino } from 'pino';
import { adminKubeConfig } from '../../../e2e/controlplane/testenv.ts';
import { deleteNamespaceFully } from '../../../e2e/testing/cleanup.ts';
import { waitFor } from '../../../e2e/testing/wait.ts';
import { type RunningAgent, startAgent } from '../../../node-agent/src/agent.ts';
import { FakeDriver } from '../../../node-agent/src/drivers/fake.ts';
import {
  FlavorKind,
  type Hypervisor,
  HypervisorKind,
  ImageKind,
  NODE_LEASE_NAMESPACE,
  nodeLeaseName,
  ServerGroupKind,
  ServerKind,
  type ServerSpec,
  type ServerStatus,
  toGiB,
  toMiB,
} from '../../src/api/index.ts';
import { gvrOf } from '../../src/controllers/common.ts';
import { registerControllers } from '../../src/controllers/index.ts';
import { installAdmissionPolicies, installCRDs } from '../../src/crdgen/install.ts';
import {
  createLogger,
  eventGVR,
  type GVR,
  type Informer,
  type InformerSelector,
  isNotFound,
  KubeClient,
  type Logger,
  leaseGVR,
  Manager,
  type ManagerOptions,
  silentLogger,
} from '../../src/runtime/index.ts';

export const SERVERS = gvrOf(ServerKind);
export const FLAVORS = gvrOf(FlavorKind);
export const HYPERVISORS = gvrOf(HypervisorKind);
export const IMAGES = gvrOf(ImageKind);
export const SERVER_GROUPS = gvrOf(ServerGroupKind);
export const NAMESPACES: GVR = { group: '', version: 'v1', plural: 'namespaces' };

/** Label on every object of a run (value: the run id); the operator's informers select it. */
export const SCOPE_LABEL = 'test.stratus.io/cmp';
/** Hypervisor label naming a pool of nodes within a run. */
export const POOL_LABEL = 'test.stratus.io/cmp-pool';
/** Hypervisor label carrying the node's own name (to pin a server to one node). */
export const NODE_LABEL = 'test.stratus.io/cmp-node';
/**
 * Heartbeat grace of the operator under test (the agents renew their Lease every second). Liveness is judged by
 * when the operator observes renewals, so the margin (grace - heartbeat) must absorb the delivery delays of a
 * loaded test process (operator and every agent in one event loop).
 */
export const GRACE_SECONDS = 10;
/** Memory every fake hypervisor keeps for itself (spec.reserved.ram). */
export const RESERVED_RAM_MIB = 512;

export type Srv = KubernetesObject & { spec: ServerSpec; status?: ServerStatus };
export type Hv = Hypervisor & KubernetesObject;

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export { waitFor };

export function condition(s: Srv | undefined, type: string) {
  return s?.status?.conditions?.find((c) => c.type === type);
}

/** STRATUS_TEST_LOG=<file> writes the debug log of operator and agents there. */
export function testLogger(): Logger {
  const file = process.env.STRATUS_TEST_LOG;
  return file
    ? createLogger({ level: 'debug', destination: pino.destination({ dest: file, sync: false, append: true }) })
    : silentLogger();
}

// ---------------------------------------------------------------------------------------------------------------
// The operator
// ---------------------------------------------------------------------------------------------------------------

/**
 * A Manager whose informers only see objects carrying `selector` (besides any selector the caller asks for), except
 * the kinds `unscoped` names (e.g. claim objects, which must be seen whoever made them).
 */
export class ScopedManager extends Manager {
  readonly #selector: string;
  readonly #unscoped: (gvr: GVR) => boolean;

  constructor(selector: string, opts: ManagerOptions, unscoped: (gvr: GVR) => boolean = () => false) {
    super(opts);
    this.#selector = selector;
    this.#unscoped = unscoped;
  }

  override informer<T extends KubernetesObject>(gvr: GVR, selector: InformerSelector = {}): Informer<T> {
    if (this.#unscoped(gvr)) return super.informer<T>(gvr, selector);
    const labelSelector = selector.labelSelector ? `${this.#selector},${selector.labelSelector}` : this.#selector;
    return super.informer<T>(gvr, { ...selector, labelSelector });
  }
}

export interface InProcessOperator {
  mgr: Manager;
  controllers: ReturnType<typeof registerControllers>;
  stop(deadlineMs?: number): Promise<void>;
}

/** The operator in-process: every controller (registerControllers), no leader election, no HTTP. */
export async function startOperator(
  scope: string,
  o: { identity?: string; heartbeatGraceSeconds?: number; logger?: Logger } = {},
): Promise<InProcessOperator> {
  const mgr = new ScopedManager(`${SCOPE_LABEL}=${scope}`, {
    kubeConfig: adminKubeConfig(),
    logger: (o.logger ?? testLogger()).child({ operator: o.identity ?? scope }),
    http: false,
    leaderElection: false,
    gracefulShutdownMs: 10_000,
  });
  const controllers = registerControllers(mgr, {
    identity: o.identity ?? `${scope}-operator`,
    projectConcurrency: 1,
    serverConcurrency: 4,
    heartbeatGraceSeconds: o.heartbeatGraceSeconds ?? GRACE_SECONDS,
    scheduler: {},
  });
  await mgr.start();
  return { mgr, controllers, stop: (deadlineMs = 10_000) => mgr.stop(deadlineMs) };
}

/** The same operator in a child process (this file run as a script), to be killed with SIGKILL. */
export interface ChildOperator {
  child: ChildProcess;
  output: string[];
  exited: Promise<void>;
  kill(): Promise<void>;
}

export function startChildOperator(scope: string, identity: string): Promise<ChildOperator> {
  return startScriptChild(import.meta.url, {
    CMP_SCOPE: scope,
    CMP_IDENTITY: identity,
    CMP_GRACE: String(GRACE_SECONDS),
  });
}

/** Runs a test module as a script (its `import.meta.main` branch) and resolves once it prints `ready`. */
export async function startScriptChild(moduleUrl: string, env: Record<string, string>): Promise<ChildOperator> {
  const child = spawn(process.execPath, [fileURLToPath(moduleUrl)], {
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const output: string[] = [];
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const ready = new Promise<void>((resolve, reject) => {
    createInterface({ input: child.stdout! }).on('line', (l) => {
      output.push(l);
      if (l === 'ready') resolve();
    });
    createInterface({ input: child.stderr! }).on('line', (l) => output.push(l));
    void exited.then(() => reject(new Error(`child operator exited before it was ready:\n${output.join('\n')}`)));
  });
  await ready;
  return {
    child,
    output,
    exited,
    kill: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    },
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Fake nodes
// ---------------------------------------------------------------------------------------------------------------

export interface NodeShape {
  /** How many servers of 1 GiB RAM fit: capacity RAM is reserved (512 MiB) + slots GiB at ratio 1.0. */
  slots: number;
  vcpus?: number;
  pool?: string;
}

/** One node agent with its own Manager and a FakeDriver that outlives restarts (guests survive an agent stop). */
export class FakeNode {
  readonly name: string;
  readonly driver: FakeDriver;
  readonly labels: Record<string, string>;
  readonly shape: NodeShape;
  #agent: RunningAgent | undefined;
  readonly #logger: Logger;

  constructor(name: string, scope: string, shape: NodeShape, logger: Logger) {
    this.name = name;
    this.shape = shape;
    this.labels = { [SCOPE_LABEL]: scope, [NODE_LABEL]: name, ...(shape.pool ? { [POOL_LABEL]: shape.pool } : {}) };
    this.driver = new FakeDriver({
      vcpus: shape.vcpus ?? 16,
      ram: `${RESERVED_RAM_MIB + shape.slots * 1024}Mi`,
      disk: '1Ti',
    });
    this.#logger = logger;
  }

  get running(): boolean {
    return this.#agent !== undefined;
  }

  /** Allocatable RAM in MiB: exactly `slots` GiB. */
  get allocatableRamMiB(): number {
    return this.shape.slots * 1024;
  }

  async start(): Promise<void> {
    if (this.#agent) return;
    this.#agent = await startAgent({
      kubeConfig: adminKubeConfig(),
      nodeName: this.name,
      driver: this.driver,
      logger: this.#logger,
      labels: this.labels,
      hostIP: '192.0.2.1',
      hypervisorSpec: {
        cpuAllocationRatio: '4.0',
        ramAllocationRatio: '1.0',
        diskAllocationRatio: '1.0',
        reserved: { vcpus: 0, ram: `${RESERVED_RAM_MIB}Mi`, disk: '0' },
      },
      heartbeatSeconds: 1,
      powerOffTimeoutSeconds: 1,
      orphanGraceSeconds: 1,
      orphanSweepSeconds: 1,
      resyncSeconds: 30,
    });
  }

  /** Stops heartbeat and reconciling (the process of the agent dies); the guests keep running in the driver. */
  async stop(): Promise<void> {
    const a = this.#agent;
    this.#agent = undefined;
    await a?.stop();
  }

  async guestIds(): Promise<string[]> {
    return (await this.driver.list()).map((g) => g.id);
  }

  /** Driver calls of one operation on one guest. */
  calls(op: string, id: string): number {
    return this.driver.calls.filter((c) => c.op === op && c.id === id).length;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// A test run
// ---------------------------------------------------------------------------------------------------------------

export interface ServerOptions {
  flavor: string;
  pool?: string;
  /** Pin to one node (its NODE_LABEL). */
  node?: string;
  group?: string;
  powerState?: ServerSpec['powerState'];
  annotations?: Record<string, string>;
}

export class ComputeEnv {
  /** Run id: namespace, name prefix of nodes and flavors, and the scope label value. */
  readonly id: string;
  readonly ns: string;
  readonly client: KubeClient;
  readonly logger: Logger;
  readonly nodes: FakeNode[] = [];
  operator: InProcessOperator | undefined;
  readonly #flavors = new Set<string>();

  constructor(tag: string) {
    this.id = `cmp-${tag}-${randomBytes(3).toString('hex')}`;
    this.ns = this.id;
    this.client = new KubeClient(adminKubeConfig());
    this.logger = testLogger().child({ run: this.id });
  }

  get scopeLabels(): Record<string, string> {
    return { [SCOPE_LABEL]: this.id };
  }

  /** CRDs, the namespace and the image `cirros` every server boots from. */
  async setup(): Promise<void> {
    await installCRDs(adminKubeConfig());
    await installAdmissionPolicies(adminKubeConfig());
    await this.client.create(NAMESPACES, {
      apiVersion: 'v1',
      kind: 'Namespace',
      metadata: { name: this.ns, labels: this.scopeLabels },
    });
    await this.client.create(IMAGES, {
      apiVersion: ImageKind.apiVersion,
      kind: 'Image',
      metadata: { name: 'cirros', namespace: this.ns, labels: this.scopeLabels },
      spec: { source: { url: 'https://images.example/cirros.qcow2' }, diskFormat: 'qcow2' },
    } as KubernetesObject);
  }

  async startOperator(identity = `${this.id}-op`): Promise<InProcessOperator> {
    if (this.operator) return this.operator;
    this.operator = await startOperator(this.id, { identity, logger: this.logger });
    return this.operator;
  }

  async stopOperator(deadlineMs?: number): Promise<void> {
    const op = this.operator;
    this.operator = undefined;
    await op?.stop(deadlineMs);
  }

  startChildOperator(identity = `${this.id}-child`): Promise<ChildOperator> {
    return startChildOperator(this.id, identity);
  }

  /** Starts n fake nodes named <run>-<tag>-<i>. */
  async startNodes(n: number, tag: string, shape: NodeShape): Promise<FakeNode[]> {
    const nodes = Array.from(
      { length: n },
      (_, i) => new FakeNode(`${this.id}-${tag}-${i}`, this.id, shape, this.logger.child({ node: `${tag}-${i}` })),
    );
    this.nodes.push(...nodes);
    await Promise.all(nodes.map((nd) => nd.start()));
    return nodes;
  }

  node(name: string | undefined): FakeNode {
    const nd = this.nodes.find((x) => x.name === name);
    if (!nd) throw new Error(`no fake node ${name}`);
    return nd;
  }

  /** Waits until the operator marks every started node up and the agents report the expected allocatable. */
  async waitNodesUp(nodes: readonly FakeNode[] = this.nodes): Promise<void> {
    for (const nd of nodes) {
      await waitFor(`hypervisor ${nd.name} up`, async () => {
        const hv = await this.hypervisor(nd.name);
        return hv.status?.state === 'up' && hv.status.allocatable?.ram === `${nd.allocatableRamMiB}Mi`;
      });
    }
  }

  hypervisor(name: string): Promise<Hv> {
    return this.client.get<Hv>(HYPERVISORS, name);
  }

  /** Creates Flavor <run>-<name> (cluster-scoped) and returns its name. */
  async flavor(name: string, vcpus: number, ramMiB: number, diskGiB = 10): Promise<string> {
    const full = `${this.id}-${name}`;
    this.#flavors.add(full);
    await this.client.create(FLAVORS, {
      apiVersion: FlavorKind.apiVersion,
      kind: 'Flavor',
      metadata: { name: full, labels: this.scopeLabels },
      spec: { vcpus, ram: `${ramMiB}Mi`, disk: `${diskGiB}Gi` },
    } as KubernetesObject);
    return full;
  }

  async serverGroup(name: string, policy: string, maxServerPerHost?: number): Promise<string> {
    await this.client.create(SERVER_GROUPS, {
      apiVersion: ServerGroupKind.apiVersion,
      kind: 'ServerGroup',
      metadata: { name, namespace: this.ns, labels: this.scopeLabels },
      spec: { policy, ...(maxServerPerHost ? { rules: { maxServerPerHost } } : {}) },
    } as KubernetesObject);
    return name;
  }

  manifest(name: string, o: ServerOptions): Srv {
    return {
      apiVersion: ServerKind.apiVersion,
      kind: 'Server',
      metadata: { name, namespace: this.ns, labels: this.scopeLabels, annotations: o.annotations ?? {} },
      spec: {
        flavor: o.flavor,
        image: 'cirros',
        powerState: o.powerState ?? 'Running',
        nodeSelector: {
          ...this.scopeLabels,
          ...(o.pool ? { [POOL_LABEL]: o.pool } : {}),
          ...(o.node ? { [NODE_LABEL]: o.node } : {}),
        },
        ...(o.group ? { serverGroup: o.group } : {}),
      } as ServerSpec,
    };
  }

  createServer(name: string, o: ServerOptions): Promise<Srv> {
    return this.client.create<Srv>(SERVERS, this.manifest(name, o));
  }

  /** Creates all at once (every request in flight together). */
  async createServers(names: readonly string[], o: ServerOptions): Promise<void> {
    await Promise.all(names.map((n) => this.createServer(n, o)));
  }

  server(name: string): Promise<Srv> {
    return this.client.get<Srv>(SERVERS, name, this.ns);
  }

  async servers(): Promise<Srv[]> {
    return (await this.client.listAll<Srv>(SERVERS, { namespace: this.ns })).items;
  }

  patchServer(name: string, patch: Record<string, unknown>): Promise<Srv> {
    return this.client.patch<Srv>(SERVERS, name, this.ns, patch, PatchStrategy.MergePatch);
  }

  waitServer(name: string, what: string, ok: (s: Srv) => boolean, timeoutMs = 30_000): Promise<Srv> {
    return waitFor(
      `${name}: ${what}`,
      async () => {
        const s = await this.server(name);
        return ok(s) ? s : undefined;
      },
      timeoutMs,
    );
  }

  /** Waits until every server of the run is ACTIVE or ERROR with no task; returns them all. */
  waitSettled(expected: number, timeoutMs = 90_000): Promise<Srv[]> {
    let summary = '';
    return waitFor(
      `${expected} servers ACTIVE or ERROR`,
      async () => {
        const all = await this.servers();
        const settled = all.filter(
          (s) => (s.status?.status === 'ACTIVE' || s.status?.status === 'ERROR') && !s.status.taskState,
        );
        summary = `${settled.length}/${all.length}`;
        return all.length === expected && settled.length === expected ? all : undefined;
      },
      timeoutMs,
      500,
    ).catch((err: unknown) => {
      throw new Error(`${err} (settled ${summary})`);
    });
  }

  async deleteServer(name: string): Promise<void> {
    await this.client.delete(SERVERS, name, this.ns).catch((err: unknown) => {
      if (!isNotFound(err)) throw err;
    });
  }

  async waitServerGone(name: string, timeoutMs = 30_000): Promise<void> {
    await waitFor(
      `${name} gone`,
      async () => {
        try {
          await this.server(name);
          return false;
        } catch (err) {
          if (isNotFound(err)) return true;
          throw err;
        }
      },
      timeoutMs,
    );
  }

  /** Events about one object of the namespace. */
  async events(name: string): Promise<EventsV1Event[]> {
    const list = await this.client.list<EventsV1Event & KubernetesObject>(eventGVR, { namespace: this.ns });
    return (list.items ?? []).filter((e) => e.regarding?.name === name);
  }

  waitEvent(name: string, reason: string, type: 'Normal' | 'Warning' = 'Normal'): Promise<EventsV1Event> {
    return waitFor(`event ${reason} about ${name}`, async () =>
      (await this.events(name)).find((e) => e.reason === reason && e.type === type),
    );
  }

  /**
   * Deletes every server with operator and agents running (they release the finalizers), then stops them and removes
   * hypervisors, flavors and the namespace. Leftovers lose their finalizers, so nothing outlives the run.
   */
  async teardown(): Promise<void> {
    try {
      for (const nd of this.nodes) await nd.start();
      await this.startOperator(`${this.id}-cleanup`);
      const names = (await this.servers()).map((s) => s.metadata!.name!);
      await Promise.all(names.map((n) => this.deleteServer(n)));
      await waitFor('every server deleted', async () => (await this.servers()).length === 0, 60_000, 500);
    } catch (err) {
      this.logger.warn({ err }, 'cleanup: servers did not go away; removing their finalizers');
    }
    await this.stopOperator().catch(() => {});
    await Promise.all(this.nodes.map((nd) => nd.stop().catch(() => {})));
    const left = await this.servers().catch(() => [] as Srv[]);
    for (const s of left) {
      await this.client
        .patch(SERVERS, s.metadata!.name!, this.ns, { metadata: { finalizers: null } }, PatchStrategy.MergePatch)
        .catch(() => {});
    }
    for (const nd of this.nodes) {
      await this.client.delete(HYPERVISORS, nd.name).catch(() => {});
      await this.client.delete(leaseGVR, nodeLeaseName(nd.name), NODE_LEASE_NAMESPACE).catch(() => {});
    }
    for (const f of this.#flavors) await this.client.delete(FLAVORS, f).catch(() => {});
    await deleteNamespaceFully(this.client, this.ns);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Accounting
// ---------------------------------------------------------------------------------------------------------------

export interface NodeBook {
  servers: number;
  vcpus: number;
  ramMiB: number;
  diskGiB: number;
}

/** Sum of status.allocation per status.node. */
export function allocationsByNode(servers: readonly Srv[]): Map<string, NodeBook> {
  const out = new Map<string, NodeBook>();
  for (const s of servers) {
    const node = s.status?.node;
    const a = s.status?.allocation;
    if (!node || !a) continue;
    const b = out.get(node) ?? { servers: 0, vcpus: 0, ramMiB: 0, diskGiB: 0 };
    b.servers++;
    b.vcpus += a.vcpus;
    b.ramMiB += a.ramMiB;
    b.diskGiB += a.diskGiB;
    out.set(node, b);
  }
  return out;
}

/** status.allocatable of a Hypervisor in the scheduler's units. */
export function allocatableOf(hv: Hv): Omit<NodeBook, 'servers'> {
  const a = hv.status?.allocatable ?? {};
  return { vcpus: a.vcpus ?? 0, ramMiB: toMiB(a.ram ?? '0'), diskGiB: toGiB(a.disk ?? '0') };
}

// ---------------------------------------------------------------------------------------------------------------
// Child-process operator
// ---------------------------------------------------------------------------------------------------------------

if (import.meta.main) {
  const scope = process.env.CMP_SCOPE;
  if (!scope) throw new Error('CMP_SCOPE is not set');
  startOperator(scope, {
    identity: process.env.CMP_IDENTITY ?? `${scope}-child`,
    heartbeatGraceSeconds: Number(process.env.CMP_GRACE ?? GRACE_SECONDS),
  }).then(
    () => process.stdout.write('ready\n'),
    (err: unknown) => {
      console.error(err);
      process.exit(1);
    },
  );
}
