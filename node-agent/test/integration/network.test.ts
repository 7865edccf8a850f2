// The node agent's network service against a real kube-apiserver, with the fake driver and the noop backend. The test
// plays the operator: it writes Networks and Ports with the status the operator's IPAM would fill in, and binds a
// Server to the agent's node. It checks that the guest is spawned only once the server's ports are usable and wired
// (with NICs in the GuestSpec), that ports are marked bound here, that the plan carries the remote view of other
// nodes, and that the binding is cleared when the server goes.
import { randomBytes } from 'node:crypto';
import type { EventsV1Event, KubernetesObject } from '@kubernetes/client-node';
import { PatchStrategy } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { adminKubeConfig } from '../../../e2e/controlplane/testenv.ts';
import { waitFor as poll } from '../../../e2e/testing/wait.ts';
import {
  deriveServerState,
  GUEST_FINALIZER,
  HypervisorKind,
  NetworkKind,
  PORT_BOUND,
  PORT_DEVICE_LABEL,
  PORT_READY,
  PortKind,
  SERVER_FINALIZER,
  SERVER_NODE_LABEL,
  SecurityGroupKind,
  ServerKind,
  type ServerStatus,
} from '../../../operator/src/api/index.ts';
import { installCRDs } from '../../../operator/src/crdgen/install.ts';
import { eventGVR, type GVR, isNotFound, KubeClient, updateStatus } from '../../../operator/src/runtime/index.ts';
import { type RunningAgent, startAgent } from '../../src/agent.ts';
import { SERVERS, type ServerObject } from '../../src/compute.ts';
import type { GuestSpec, GuestState } from '../../src/driver.ts';
import { FakeDriver } from '../../src/drivers/fake.ts';
import { HYPERVISORS } from '../../src/hypervisor.ts';
import { NETWORKS, PORTS, SECURITY_GROUPS } from '../../src/network/controller.ts';
import { tapName } from '../../src/network/names.ts';
import { NoopBackend } from '../../src/network/noop.ts';
import type { NetworkObj, PortObj } from '../../src/network/plan.ts';

const suffix = randomBytes(3).toString('hex');
const NS = `net-${suffix}`;
const NODE = `netnode-${suffix}`;
const PEER = `netpeer-${suffix}`;
const VNI = 100_000 + Math.floor(Math.random() * 1_000_000);
const nsGVR: GVR = { group: '', version: 'v1', plural: 'namespaces' };

type Srv = ServerObject & { status?: ServerStatus & Record<string, unknown> };
type Obj = KubernetesObject & { spec?: unknown; status?: Record<string, unknown> };

/** The fake driver, keeping the GuestSpecs it was asked to spawn. */
class RecordingDriver extends FakeDriver {
  readonly specs: GuestSpec[] = [];

  override async spawn(spec: GuestSpec): Promise<GuestState> {
    this.specs.push(spec);
    return super.spawn(spec);
  }
}

let client: KubeClient;
let driver: RecordingDriver;
let backend: NoopBackend;
let agent: RunningAgent;

const waitFor = <T>(what: string, fn: () => Promise<T | undefined | false>, timeoutMs = 20_000): Promise<T> =>
  poll(what, fn, timeoutMs, 100);
/** The Server as stored. */
const rawServer = (name: string) => client.get<Srv>(SERVERS, name, NS);
/** The Server as the operator shows it (see derived). */
const getServer = async (name: string) => derived(await rawServer(name));

/**
 * The Server as the operator shows it (no operator runs here): its state fields (vmState, taskState, status,
 * powerState, fault, actions) derived from the agent's report status.compute, as the operator writes them.
 */
function derived<T extends { status?: unknown }>(s: T): T {
  const st = structuredClone((s.status ?? {}) as Record<string, unknown>);
  deriveServerState(st);
  return { ...s, status: st };
}

const getPort = (name: string) => client.get<PortObj & Obj>(PORTS, name, NS);
const condition = (conds: { type: string }[] | undefined, type: string) =>
  conds?.find((c) => c.type === type) as { status: string; reason: string; message: string } | undefined;

async function events(name: string): Promise<EventsV1Event[]> {
  const list = await client.list<EventsV1Event & KubernetesObject>(eventGVR, { namespace: NS });
  return (list.items ?? []).filter((e) => e.regarding?.name === name);
}

/** A Network with the status the operator gives it (VNI, MTU, effective subnets). */
async function createNetwork(name: string): Promise<NetworkObj & Obj> {
  const n = await client.create<NetworkObj & Obj>(NETWORKS, {
    apiVersion: 'network.stratus.io/v1alpha1',
    kind: 'Network',
    metadata: { name, namespace: NS },
    spec: {
      subnets: [
        {
          name: 'v4',
          cidr: '10.20.0.0/24',
          dnsNameservers: ['10.20.0.53'],
          hostRoutes: [{ destination: '172.16.0.0/12', nexthop: '10.20.0.254' }],
        },
      ],
    },
  });
  return updateStatus(client, NETWORKS, n, (st) => ({
    ...st,
    status: 'ACTIVE',
    networkType: 'vxlan',
    segmentationID: VNI,
    mtu: 1450,
    subnets: [{ name: 'v4', cidr: '10.20.0.0/24', ipVersion: 4, gatewayIP: '10.20.0.1' }],
  }));
}

/** A Port claimed by `server`, with the MAC and address the operator's IPAM would allocate. */
async function createPort(
  name: string,
  o: { server: string; mac: string; ip: string; bindingHost?: string },
): Promise<PortObj & Obj> {
  const p = await client.create<PortObj & Obj>(PORTS, {
    apiVersion: 'network.stratus.io/v1alpha1',
    kind: 'Port',
    metadata: { name, namespace: NS, labels: { [PORT_DEVICE_LABEL]: o.server } },
    spec: { network: 'net' },
  });
  return updateStatus(client, PORTS, p, (st) => ({
    ...st,
    status: 'DOWN',
    macAddress: o.mac,
    fixedIPs: [{ subnet: 'v4', ipAddress: o.ip }],
    ...(o.bindingHost ? { bindingHost: o.bindingHost, vifType: 'bridge' } : {}),
    conditions: [
      {
        type: PORT_READY,
        status: 'True',
        reason: 'Allocated',
        message: 'addresses allocated',
        lastTransitionTime: new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
      },
    ],
  }));
}

/** Creates a Server with one NIC on `net` and binds it to the agent's node as the operator does. */
async function createAndBind(name: string): Promise<Srv> {
  await client.create<Srv>(SERVERS, {
    apiVersion: 'compute.stratus.io/v1alpha1',
    kind: 'Server',
    metadata: { name, namespace: NS, finalizers: [SERVER_FINALIZER] },
    spec: { flavor: 'm1.small', image: 'cirros', powerState: 'Running', networks: [{ network: 'net' }] },
  });
  const labelled = await client.patch<Srv>(
    SERVERS,
    name,
    NS,
    { metadata: { labels: { [SERVER_NODE_LABEL]: NODE } } },
    PatchStrategy.MergePatch,
  );
  return updateStatus(client, SERVERS, labelled, (st) => ({
    ...st,
    node: NODE,
    flavor: { name: 'm1.small', vcpus: 1, ram: '1Gi', disk: '10Gi', ephemeral: '0', swap: '0' },
    allocation: { vcpus: 1, ramMiB: 1024, diskGiB: 10 },
    image: 'cirros',
    vmState: 'building',
    taskState: 'spawning',
    status: 'BUILD',
  }));
}

beforeAll(async () => {
  const kc = adminKubeConfig();
  // Only the kinds this test uses (other kinds may be mid-change in the working tree).
  await installCRDs(kc, [ServerKind, HypervisorKind, NetworkKind, PortKind, SecurityGroupKind]);
  client = new KubeClient(kc);
  await client.create(nsGVR, { apiVersion: 'v1', kind: 'Namespace', metadata: { name: NS } });
  driver = new RecordingDriver({ vcpus: 8, ram: '16Gi', disk: '100Gi' });
  backend = new NoopBackend();
  agent = await startAgent({
    kubeConfig: adminKubeConfig(),
    nodeName: NODE,
    driver,
    networkBackend: backend,
    hostIP: '192.0.2.20',
    heartbeatSeconds: 1,
    orphanGraceSeconds: 1,
    orphanSweepSeconds: 1,
  });
});

afterAll(async () => {
  await agent?.stop();
  if (client) {
    for (const gvr of [SERVERS, PORTS, NETWORKS, SECURITY_GROUPS]) {
      const list = await client.list<Obj>(gvr, { namespace: NS }).catch(() => ({ items: [] as Obj[] }));
      for (const o of list.items ?? []) {
        await client
          .patch(gvr, o.metadata?.name ?? '', NS, { metadata: { finalizers: null } }, PatchStrategy.MergePatch)
          .catch(() => {});
      }
    }
    await client.delete(nsGVR, NS).catch(() => {});
    for (const h of [NODE, PEER]) await client.delete(HYPERVISORS, h).catch(() => {});
  }
});

describe('node agent network service (fake driver, noop backend)', () => {
  it('reports its network backend on the Hypervisor', async () => {
    await waitFor('networkBackend', async () => {
      const h = await client.get<Obj>(HYPERVISORS, NODE);
      return h.status?.networkBackend === 'noop';
    });
  });

  it('holds the spawn while the port does not exist: taskState networking, Ready False, an Event', async () => {
    await createNetwork('net');
    await createAndBind('web');
    const s = await waitFor('networking', async () => {
      const x = await getServer('web');
      return x.status?.taskState === 'networking' ? x : undefined;
    });
    expect(s.status?.status).toBe('BUILD');
    expect(condition(s.status?.conditions, 'Ready')).toMatchObject({
      status: 'False',
      reason: 'WaitingForNetwork',
      message: expect.stringContaining('port web-0 does not exist yet'),
    });
    await waitFor('WaitingForNetwork event', async () =>
      (await events('web')).some((e) => e.reason === 'WaitingForNetwork'),
    );
    expect(driver.specs).toEqual([]);
  });

  it('still waits while the port has no addresses (not Ready)', async () => {
    const p = await client.create<PortObj & Obj>(PORTS, {
      apiVersion: 'network.stratus.io/v1alpha1',
      kind: 'Port',
      metadata: { name: 'web-0', namespace: NS, labels: { [PORT_DEVICE_LABEL]: 'web' } },
      spec: { network: 'net' },
    });
    await waitFor('waiting on the IPAM', async () => {
      const x = await getServer('web');
      return condition(x.status?.conditions, 'Ready')?.message.includes('no MAC and addresses yet');
    });
    expect(driver.specs).toEqual([]);
    expect((await getPort('web-0')).status?.bindingHost).toBeUndefined();
    // the operator's IPAM fills in the port
    await updateStatus(client, PORTS, p, (st) => ({
      ...st,
      macAddress: 'fa:16:3e:12:34:56',
      fixedIPs: [{ subnet: 'v4', ipAddress: '10.20.0.10' }],
      conditions: [
        {
          type: PORT_READY,
          status: 'True',
          reason: 'Allocated',
          message: 'addresses allocated',
          lastTransitionTime: new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
        },
      ],
    }));
  });

  it('binds the port here and spawns the guest with its NIC', async () => {
    const s = await waitFor('ACTIVE', async () => {
      const x = await getServer('web');
      return x.status?.status === 'ACTIVE' ? x : undefined;
    });
    expect(s.status?.taskState).toBeUndefined();
    expect(condition(s.status?.conditions, 'Ready')).toMatchObject({ status: 'True' });
    const port = await getPort('web-0');
    const net = await client.get<NetworkObj & Obj>(NETWORKS, 'net', NS);
    // status.status (ACTIVE) is the operator's, derived from this binding; no operator runs here
    expect(port.status).toMatchObject({ bindingHost: NODE, vifType: 'noop' });
    expect(condition(port.status?.conditions, PORT_BOUND)).toMatchObject({ status: 'True', reason: 'Wired' });
    expect(driver.specs).toHaveLength(1);
    expect(driver.specs[0]!.nics).toEqual([
      {
        device: tapName(port.metadata!.uid!),
        mac: 'fa:16:3e:12:34:56',
        mtu: 1450,
        addresses: ['10.20.0.10/24'],
        gateway: '10.20.0.1',
        routes: [{ to: '172.16.0.0/12', via: '10.20.0.254' }],
        dns: ['10.20.0.53'],
        portId: port.metadata!.uid,
        networkId: net.metadata!.uid,
      },
    ]);
    const plan = backend.lastPlan!;
    expect(plan.hostIP).toBe('192.0.2.20');
    expect(plan.ports).toEqual([
      expect.objectContaining({ name: 'web-0', device: tapName(port.metadata!.uid!), portSecurity: true }),
    ]);
    expect(plan.networks).toEqual([expect.objectContaining({ vni: VNI, mtu: 1450, peers: [] })]);
  });

  it('a rebuild re-creates the guest with the same NIC (the port stays bound)', async () => {
    await client.patch(SERVERS, 'web', NS, { spec: { triggers: { rebuild: 'r1' } } }, PatchStrategy.MergePatch);
    await waitFor('rebuilt', async () => {
      const x = await getServer('web');
      return x.status?.triggers?.rebuild === 'r1' && x.status.status === 'ACTIVE';
    });
    expect(driver.specs).toHaveLength(2);
    expect(driver.specs[1]!.nics).toEqual(driver.specs[0]!.nics);
    expect((await getPort('web-0')).status).toMatchObject({ bindingHost: NODE });
    expect(condition((await getPort('web-0')).status?.conditions, PORT_BOUND)).toMatchObject({ status: 'True' });
  });

  it('adds the ports bound on other nodes to the plan (peers and remote ports)', async () => {
    const hv = await client.create<Obj>(HYPERVISORS, {
      apiVersion: 'compute.stratus.io/v1alpha1',
      kind: 'Hypervisor',
      metadata: { name: PEER },
      spec: {},
    });
    await updateStatus(client, HYPERVISORS, hv, (st) => ({ ...st, hostIP: '192.0.2.21' }));
    await createPort('db-0', { server: 'db', mac: 'fa:16:3e:00:00:21', ip: '10.20.0.21', bindingHost: PEER });
    await waitFor('peer in the plan', async () => backend.lastPlan?.networks[0]?.peers.includes('192.0.2.21'));
    expect(backend.lastPlan!.networks[0]!.remotePorts).toEqual([
      { mac: 'fa:16:3e:00:00:21', ips: ['10.20.0.21'], hostIP: '192.0.2.21' },
    ]);
    // no SecurityGroup "default" in the namespace yet: the port gets no rules (deny); once it exists, both ports
    // (here and on the peer) are its members
    expect(backend.lastPlan!.securityGroups).toEqual([]);
    await client.create(SECURITY_GROUPS, {
      apiVersion: 'network.stratus.io/v1alpha1',
      kind: 'SecurityGroup',
      metadata: { name: 'default', namespace: NS },
      spec: { rules: [{ direction: 'ingress', ethertype: 'IPv4', remoteGroup: 'default' }] },
    });
    await waitFor('default group in the plan', async () => backend.lastPlan?.securityGroups.length === 1);
    expect(backend.lastPlan!.securityGroups[0]).toMatchObject({
      name: 'default',
      memberIPs: ['10.20.0.10', '10.20.0.21'],
      rules: [{ direction: 'ingress', ethertype: 'IPv4', remoteGroupId: backend.lastPlan!.securityGroups[0]!.id }],
    });
    expect(backend.lastPlan!.ports[0]!.securityGroups).toEqual([backend.lastPlan!.securityGroups[0]!.id]);
    // a port bound elsewhere is never touched by this node
    expect((await getPort('db-0')).status?.bindingHost).toBe(PEER);
  });

  it('a transient state never unwires the guest: network status dropped, node label changed', async () => {
    const network = agent.agent.network;
    const wired = structuredClone(backend.lastPlan!);
    expect(wired.ports.map((p) => p.name)).toEqual(['web-0']);
    const settled = async (what: string) => {
      // a rebuild that started after the change has seen it (the controller's own settle signal)
      const n = network.rebuilds;
      network.refresh();
      await waitFor(what, async () => network.rebuilds > n);
    };

    // 1. the operator's NetworkInUse write that dropped segmentationID, mtu, networkType and subnets
    const net = await client.get<NetworkObj & Obj>(NETWORKS, 'net', NS);
    await updateStatus(client, NETWORKS, net, (st) => {
      const { segmentationID: _v, mtu: _m, subnets: _s, networkType: _t, ...rest } = st;
      return { ...rest, status: 'ACTIVE' };
    });
    await waitFor('network status without VNI in the cache', async () =>
      network.networks.list().some((n) => n.metadata?.name === 'net' && !n.status?.segmentationID),
    );
    await settled('rebuild after the status loss');
    expect(backend.lastPlan).toEqual(wired);
    expect((await getPort('web-0')).status).toMatchObject({ bindingHost: NODE });
    expect(condition((await getPort('web-0')).status?.conditions, PORT_BOUND)).toMatchObject({ status: 'True' });
    await updateStatus(client, NETWORKS, await client.get<NetworkObj & Obj>(NETWORKS, 'net', NS), (st) => ({
      ...st,
      segmentationID: VNI,
      mtu: 1450,
      networkType: 'vxlan',
      subnets: [{ name: 'v4', cidr: '10.20.0.0/24', ipVersion: 4, gatewayIP: '10.20.0.1' }],
    }));

    // 2. kubectl label: the server leaves the agent's informer, but its guest keeps running and its port wired
    const id = (await getServer('web')).metadata!.uid!;
    await client.patch(
      SERVERS,
      'web',
      NS,
      { metadata: { labels: { [SERVER_NODE_LABEL]: 'somewhere-else' } } },
      PatchStrategy.MergePatch,
    );
    await waitFor('NodeLabelMismatch', async () => {
      const x = await getServer('web');
      return condition(x.status?.conditions, 'Placement')?.reason === 'NodeLabelMismatch';
    });
    await settled('rebuild after the relabel');
    expect(backend.lastPlan?.ports.map((p) => p.name)).toEqual(['web-0']);
    expect((await getPort('web-0')).status).toMatchObject({ bindingHost: NODE });
    expect(condition((await getPort('web-0')).status?.conditions, PORT_BOUND)).toMatchObject({ status: 'True' });
    expect(await driver.state(id)).toMatchObject({ powerState: 'RUNNING' });

    // back: bound here again, Placement True
    await client.patch(
      SERVERS,
      'web',
      NS,
      { metadata: { labels: { [SERVER_NODE_LABEL]: NODE } } },
      PatchStrategy.MergePatch,
    );
    await waitFor('Placement True', async () => {
      const x = await getServer('web');
      return condition(x.status?.conditions, 'Placement')?.status === 'True';
    });
    expect(await driver.state(id)).toMatchObject({ powerState: 'RUNNING' });
  });

  it('clears the binding when the server goes', async () => {
    const applies = backend.applies;
    await client.delete(SERVERS, 'web', NS);
    await waitFor('guest finalizer released', async () => {
      const s = await getServer('web');
      return !s.metadata?.finalizers?.includes(GUEST_FINALIZER);
    });
    await client.patch(SERVERS, 'web', NS, { metadata: { finalizers: null } }, PatchStrategy.MergePatch);
    await waitFor('server gone', async () => getServer('web').then(() => false, isNotFound));
    const port = await waitFor('port unbound', async () => {
      const p = await getPort('web-0');
      return p.status?.bindingHost === undefined ? p : undefined;
    });
    expect(port.status?.vifType).toBeUndefined();
    expect(condition(port.status?.conditions, PORT_BOUND)).toMatchObject({ status: 'False', reason: 'Unbound' });
    expect(backend.applies).toBeGreaterThan(applies);
    expect(backend.lastPlan?.ports).toEqual([]);
    expect((await getPort('db-0')).status?.bindingHost).toBe(PEER);
  });
});
