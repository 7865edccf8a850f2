// Environment for the network (IPAM) integration tests: the operator in-process or as a child process a test can
// SIGKILL, scoped to one run, plus helpers for Networks, Ports and claims.
//
// Isolation: every Network, Port and SecurityGroup a test creates carries test.stratus.io/net=<run id>, and the
// operator's informers select that label, except for IPAllocations and SegmentAllocations: those are the shared
// record of what is taken (VNIs are unique cluster-wide), so the operator sees all of them, as in production. The
// orphan sweep confirms with a live read before releasing anything, so claims of other runs are never touched.
//
// Run as a script (`node network-env.ts`) it is the child-process operator: NET_SCOPE, NET_IDENTITY.
import { randomBytes } from 'node:crypto';
import { type KubernetesObject, PatchStrategy } from '@kubernetes/client-node';
import { adminKubeConfig } from '../../../e2e/controlplane/testenv.ts';
import { waitFor } from '../../../e2e/testing/wait.ts';
import {
  type IPAllocation,
  IPAllocationKind,
  type Network,
  NetworkKind,
  type NetworkSpec,
  type Port,
  PortKind,
  type PortSpec,
  type SecurityGroup,
  SecurityGroupKind,
  type SegmentAllocation,
  SegmentAllocationKind,
} from '../../src/api/index.ts';
import { gvrOf } from '../../src/controllers/common.ts';
import { registerControllers } from '../../src/controllers/index.ts';
import { installCRDs } from '../../src/crdgen/install.ts';
import { type GVR, isNotFound, KubeClient, type Logger, type Manager } from '../../src/runtime/index.ts';
import { type ChildOperator, ScopedManager, startScriptChild, testLogger } from './compute-env.ts';

export { type ChildOperator, testLogger };

export const NETWORKS = gvrOf(NetworkKind);
export const PORTS = gvrOf(PortKind);
export const SECURITY_GROUPS = gvrOf(SecurityGroupKind);
export const IP_ALLOCATIONS = gvrOf(IPAllocationKind);
export const SEGMENT_ALLOCATIONS = gvrOf(SegmentAllocationKind);
export const NAMESPACES: GVR = { group: '', version: 'v1', plural: 'namespaces' };
export const SCOPE_LABEL = 'test.stratus.io/net';

export type Net = Network & KubernetesObject;
export type P = Port & KubernetesObject;

export { waitFor };
export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

const UNSCOPED = new Set([IP_ALLOCATIONS.plural, SEGMENT_ALLOCATIONS.plural]);
/** The claim kinds: every operator must see every claim, whoever made it. */
const unscoped = (gvr: GVR) => gvr.group === IP_ALLOCATIONS.group && UNSCOPED.has(gvr.plural);

export interface RunningOperator {
  mgr: Manager;
  stop(): Promise<void>;
}

export async function startOperator(
  scope: string,
  o: { identity?: string; logger?: Logger; orphanGraceSeconds?: number } = {},
): Promise<RunningOperator> {
  const mgr = new ScopedManager(
    `${SCOPE_LABEL}=${scope}`,
    {
      kubeConfig: adminKubeConfig(),
      logger: (o.logger ?? testLogger()).child({ operator: o.identity ?? scope }),
      http: false,
      leaderElection: false,
      gracefulShutdownMs: 10_000,
    },
    unscoped,
  );
  registerControllers(mgr, {
    identity: o.identity ?? `${scope}-operator`,
    projectConcurrency: 1,
    serverConcurrency: 1,
    heartbeatGraceSeconds: 60,
    scheduler: {},
    portConcurrency: 8,
    orphanGraceSeconds: o.orphanGraceSeconds ?? 120,
    orphanSweepSeconds: 2,
    portRetrySeconds: 5,
  });
  await mgr.start();
  return { mgr, stop: () => mgr.stop(10_000) };
}

/** The same operator in a child process (this file run as a script), to be killed with SIGKILL. */
export function startChildOperator(scope: string, identity: string): Promise<ChildOperator> {
  return startScriptChild(import.meta.url, { NET_SCOPE: scope, NET_IDENTITY: identity });
}

export class NetEnv {
  readonly id: string;
  readonly client: KubeClient;
  readonly logger: Logger;
  readonly namespaces: string[] = [];
  operator: RunningOperator | undefined;

  constructor(tag: string) {
    this.id = `net-${tag}-${randomBytes(3).toString('hex')}`;
    this.client = new KubeClient(adminKubeConfig());
    this.logger = testLogger().child({ run: this.id });
  }

  get labels(): Record<string, string> {
    return { [SCOPE_LABEL]: this.id };
  }

  /** CRDs and `count` namespaces <run>-0, <run>-1, ... */
  async setup(count = 1): Promise<void> {
    await installCRDs(adminKubeConfig());
    for (let i = 0; i < count; i++) {
      const ns = `${this.id}-${i}`;
      await this.client.create(NAMESPACES, {
        apiVersion: 'v1',
        kind: 'Namespace',
        metadata: { name: ns, labels: this.labels },
      });
      this.namespaces.push(ns);
    }
  }

  get ns(): string {
    return this.namespaces[0]!;
  }

  async startOperator(o: { orphanGraceSeconds?: number } = {}): Promise<RunningOperator> {
    this.operator ??= await startOperator(this.id, { logger: this.logger, ...o });
    return this.operator;
  }

  async stopOperator(): Promise<void> {
    const op = this.operator;
    this.operator = undefined;
    await op?.stop();
  }

  startChildOperator(identity = `${this.id}-child`): Promise<ChildOperator> {
    return startChildOperator(this.id, identity);
  }

  createNetwork(name: string, spec: Partial<NetworkSpec>, ns = this.ns): Promise<Net> {
    return this.client.create<Net>(NETWORKS, {
      apiVersion: NetworkKind.apiVersion,
      kind: 'Network',
      metadata: { name, namespace: ns, labels: this.labels },
      spec,
    } as Net);
  }

  network(name: string, ns = this.ns): Promise<Net> {
    return this.client.get<Net>(NETWORKS, name, ns);
  }

  waitNetwork(name: string, what: string, ok: (n: Net) => boolean, ns = this.ns, timeoutMs = 30_000): Promise<Net> {
    return waitFor(
      `network ${name}: ${what}`,
      async () => {
        const n = await this.network(name, ns);
        return ok(n) ? n : undefined;
      },
      timeoutMs,
    );
  }

  createPort(name: string, spec: Partial<PortSpec>, ns = this.ns): Promise<P> {
    return this.client.create<P>(PORTS, {
      apiVersion: PortKind.apiVersion,
      kind: 'Port',
      metadata: { name, namespace: ns, labels: this.labels },
      spec,
    } as P);
  }

  port(name: string, ns = this.ns): Promise<P> {
    return this.client.get<P>(PORTS, name, ns);
  }

  waitPort(name: string, what: string, ok: (p: P) => boolean, ns = this.ns, timeoutMs = 30_000): Promise<P> {
    return waitFor(
      `port ${name}: ${what}`,
      async () => {
        const p = await this.port(name, ns);
        return ok(p) ? p : undefined;
      },
      timeoutMs,
    );
  }

  async ports(ns = this.ns): Promise<P[]> {
    return (await this.client.listAll<P>(PORTS, { namespace: ns })).items;
  }

  async claims(ns = this.ns): Promise<IPAllocation[]> {
    return (await this.client.listAll<IPAllocation & KubernetesObject>(IP_ALLOCATIONS, { namespace: ns })).items;
  }

  async segmentsOf(uid: string): Promise<SegmentAllocation[]> {
    const all = (await this.client.listAll<SegmentAllocation & KubernetesObject>(SEGMENT_ALLOCATIONS)).items;
    return all.filter((s) => s.spec.network.uid === uid);
  }

  securityGroup(name: string, ns = this.ns): Promise<SecurityGroup & KubernetesObject> {
    return this.client.get(SECURITY_GROUPS, name, ns);
  }

  async delete(gvr: GVR, name: string, ns = this.ns): Promise<void> {
    await this.client.delete(gvr, name, ns).catch((e: unknown) => {
      if (!isNotFound(e)) throw e;
    });
  }

  async waitGone(gvr: GVR, name: string, ns = this.ns, timeoutMs = 30_000): Promise<void> {
    await waitFor(
      `${gvr.plural} ${name} gone`,
      async () => {
        try {
          await this.client.get(gvr, name, ns);
          return false;
        } catch (e) {
          if (isNotFound(e)) return true;
          throw e;
        }
      },
      timeoutMs,
    );
  }

  /**
   * Deletes ports and networks with an operator running (it releases the claims), then removes what is left,
   * finalizers included, and the namespaces. SegmentAllocations of this run's networks go too.
   */
  async teardown(): Promise<void> {
    const uids: string[] = [];
    try {
      await this.startOperator({ orphanGraceSeconds: 1 });
      for (const ns of this.namespaces) {
        for (const p of await this.ports(ns)) await this.delete(PORTS, p.metadata!.name!, ns);
        const nets = (await this.client.listAll<Net>(NETWORKS, { namespace: ns })).items;
        for (const n of nets) {
          uids.push(n.metadata!.uid!);
          await this.delete(NETWORKS, n.metadata!.name!, ns);
        }
      }
      for (const ns of this.namespaces) {
        await waitFor(
          `networks of ${ns} gone`,
          async () => (await this.client.listAll(NETWORKS, { namespace: ns })).items.length === 0,
          60_000,
          500,
        );
      }
    } catch (err) {
      this.logger.warn({ err }, 'cleanup: objects did not go away; removing finalizers');
    }
    await this.stopOperator().catch(() => {});
    for (const ns of this.namespaces) {
      for (const gvr of [PORTS, NETWORKS]) {
        const left = await this.client.listAll(gvr, { namespace: ns }).catch(() => ({ items: [] }));
        for (const o of left.items) {
          await this.client
            .patch(gvr, o.metadata!.name!, ns, { metadata: { finalizers: null } }, PatchStrategy.MergePatch)
            .catch(() => {});
        }
      }
      await this.client.delete(NAMESPACES, ns).catch(() => {});
    }
    for (const uid of uids) {
      for (const s of await this.segmentsOf(uid).catch(() => [])) {
        await this.client.delete(SEGMENT_ALLOCATIONS, s.metadata.name ?? '').catch(() => {});
      }
    }
  }
}

export function cond(
  o: { status?: { conditions?: { type: string; status: string; reason: string; message?: string }[] } },
  t: string,
) {
  return o.status?.conditions?.find((c) => c.type === t);
}

if (import.meta.main) {
  const scope = process.env.NET_SCOPE;
  if (!scope) throw new Error('NET_SCOPE is not set');
  startOperator(scope, { identity: process.env.NET_IDENTITY ?? `${scope}-child` }).then(
    () => process.stdout.write('ready\n'),
    (err: unknown) => {
      console.error(err);
      process.exit(1);
    },
  );
}
