// Networks, ports and security groups against a real API server with the operator in-process: VNIs, MTU,
// effective subnets and the DHCP address; MAC and IP claims, requested addresses and their errors; the default
// security group; deletion order and release of every claim.
import type { KubernetesObject } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ipAllocationName, MAC_PREFIX, NETWORK_FINALIZER, PORT_FINALIZER, ProjectKind } from '../../src/api/index.ts';
import { gvrOf } from '../../src/controllers/common.ts';
import { isAlreadyExists, statusCode } from '../../src/runtime/index.ts';
import {
  cond,
  IP_ALLOCATIONS,
  NETWORKS,
  NetEnv,
  PORTS,
  SECURITY_GROUPS,
  SEGMENT_ALLOCATIONS,
  waitFor,
} from './network-env.ts';

const PROJECTS = gvrOf(ProjectKind);
const env = new NetEnv('ipam');

beforeAll(async () => {
  await env.setup(2);
  await env.startOperator({ orphanGraceSeconds: 2 });
}, 60_000);

afterAll(async () => {
  await env.teardown();
}, 120_000);

const active = (n: { status?: { status?: string; observedGeneration?: number }; metadata?: { generation?: number } }) =>
  n.status?.status === 'ACTIVE' && n.status.observedGeneration === n.metadata?.generation;
const ready = (p: Parameters<typeof cond>[0]) => cond(p, 'Ready')?.status === 'True';

describe('networks', () => {
  it('get distinct VNIs across namespaces, the underlay MTU minus 50, gateways and DHCP addresses', async () => {
    const [ns0, ns1] = env.namespaces as [string, string];
    await env.createNetwork(
      'a',
      {
        subnets: [
          { name: 'v4', cidr: '10.10.0.0/24', enableDHCP: true, disableGateway: false },
          { name: 'v6', cidr: 'fd00:10::/64', enableDHCP: true, disableGateway: false },
        ],
      },
      ns0,
    );
    await env.createNetwork('a', { subnets: [{ name: 'v4', cidr: '10.10.0.0/24' }] } as never, ns1);
    await env.createNetwork('b', { mtu: 1400, subnets: [] }, ns1);
    const a0 = await env.waitNetwork('a', 'ACTIVE', active, ns0);
    const a1 = await env.waitNetwork('a', 'ACTIVE', active, ns1);
    const b1 = await env.waitNetwork('b', 'ACTIVE', active, ns1);
    const vnis = [a0, a1, b1].map((n) => n.status?.segmentationID);
    expect(new Set(vnis).size).toBe(3);
    expect(a0.status?.networkType).toBe('vxlan');
    expect(a0.status?.mtu).toBe(1450);
    expect(b1.status?.mtu).toBe(1400);
    expect(a0.metadata?.finalizers).toContain(NETWORK_FINALIZER);
    const [v4, v6] = a0.status?.subnets ?? [];
    expect(v4).toMatchObject({ name: 'v4', ipVersion: 4, gatewayIP: '10.10.0.1', dhcpAddress: '10.10.0.2' });
    expect(v4?.allocated).toBe(1);
    expect(v4?.available).toBe(252);
    expect(v6).toMatchObject({ name: 'v6', ipVersion: 6, gatewayIP: 'fd00:10::1' });
    expect(v6?.dhcpAddress).toBeUndefined();
    // The claims behind the status: one SegmentAllocation per network, the DHCP address owned by the network.
    for (const n of [a0, a1, b1]) {
      const segs = await env.segmentsOf(n.metadata!.uid!);
      expect(segs.map((s) => s.spec.vni)).toEqual([n.status?.segmentationID]);
    }
    const dhcp = (await env.claims(ns0)).filter((c) => c.spec.purpose === 'dhcp');
    expect(dhcp.map((c) => c.metadata.name)).toEqual([ipAllocationName('a', 'v4', '10.10.0.2')]);
    expect(dhcp[0]?.metadata.ownerReferences?.[0]).toMatchObject({ kind: 'Network', uid: a0.metadata?.uid });
  });

  it('refuses an MTU above the underlay minus the VXLAN overhead', async () => {
    await env.createNetwork('jumbo', { mtu: 9000, subnets: [] });
    const n = await env.waitNetwork('jumbo', 'refused', (x) => x.status?.status === 'ERROR');
    expect(cond(n, 'Ready')).toMatchObject({ status: 'False', reason: 'InvalidMtu' });
    expect(n.status?.segmentationID).toBeUndefined();
  });
});

describe('ports', () => {
  beforeAll(async () => {
    await env.createNetwork('p', {
      subnets: [
        { name: 'v4', cidr: '10.20.0.0/24' },
        { name: 'v6', cidr: 'fd00:20::/64' },
      ] as never,
    });
    await env.waitNetwork('p', 'ACTIVE', active);
  });

  it('get a fa:16:3e MAC and one address per IP version, claimed before they are reported', async () => {
    await env.createPort('p1', { network: 'p' });
    const p = await env.waitPort('p1', 'Ready', ready);
    expect(p.status?.macAddress).toMatch(new RegExp(`^${MAC_PREFIX}(:[0-9a-f]{2}){3}$`));
    expect(p.status?.fixedIPs).toEqual([
      { subnet: 'v4', ipAddress: '10.20.0.3' }, // .1 gateway, .2 DHCP
      { subnet: 'v6', ipAddress: 'fd00:20::2' },
    ]);
    expect(p.status?.status).toBe('DOWN');
    expect(p.status?.securityGroups).toEqual(['default']);
    expect(p.metadata?.finalizers).toContain(PORT_FINALIZER);
    const mine = (await env.claims()).filter((c) => c.metadata.ownerReferences?.[0]?.uid === p.metadata?.uid);
    expect(mine.map((c) => c.spec.ipAddress ?? c.spec.macAddress).sort()).toEqual(
      ['10.20.0.3', 'fd00:20::2', p.status!.macAddress!].sort(),
    );
    for (const c of mine) expect(c.metadata.ownerReferences?.[0]?.controller).toBe(true);
  });

  it("creates the namespace's default security group on first use with OpenStack's rules", async () => {
    const sg = await env.securityGroup('default');
    expect(sg.spec.rules).toEqual([
      { direction: 'egress', ethertype: 'IPv4' },
      { direction: 'egress', ethertype: 'IPv6' },
      { direction: 'ingress', ethertype: 'IPv4', remoteGroup: 'default' },
      { direction: 'ingress', ethertype: 'IPv6', remoteGroup: 'default' },
    ]);
  });

  it('get a requested address and MAC; a taken address or MAC is refused as Neutron does', async () => {
    await env.createPort('p2', {
      network: 'p',
      macAddress: 'fa:16:3e:aa:bb:cc',
      fixedIPs: [{ subnet: 'v4', ipAddress: '10.20.0.50' }],
      securityGroups: [],
    });
    const p2 = await env.waitPort('p2', 'Ready', ready);
    expect(p2.status?.macAddress).toBe('fa:16:3e:aa:bb:cc');
    expect(p2.status?.fixedIPs).toEqual([{ subnet: 'v4', ipAddress: '10.20.0.50' }]);
    expect(p2.status?.securityGroups).toEqual([]);

    await env.createPort('p3', { network: 'p', fixedIPs: [{ ipAddress: '10.20.0.50' }] });
    const p3 = await env.waitPort('p3', 'ERROR', (x) => x.status?.status === 'ERROR');
    expect(cond(p3, 'Ready')).toMatchObject({ status: 'False', reason: 'IpAddressAlreadyAllocated' });

    await env.createPort('p4', { network: 'p', macAddress: 'fa:16:3e:aa:bb:cc' });
    const p4 = await env.waitPort('p4', 'ERROR', (x) => x.status?.status === 'ERROR');
    expect(cond(p4, 'Ready')).toMatchObject({ status: 'False', reason: 'MacAddressInUse' });

    // Once p2 is gone, both get what they asked for (the released claims requeue them).
    await env.delete(PORTS, 'p2');
    await env.waitGone(PORTS, 'p2');
    const p3b = await env.waitPort('p3', 'Ready after p2 went', ready);
    expect(p3b.status?.fixedIPs).toEqual([{ subnet: 'v4', ipAddress: '10.20.0.50' }]);
    const p4b = await env.waitPort('p4', 'Ready after p2 went', ready);
    expect(p4b.status?.macAddress).toBe('fa:16:3e:aa:bb:cc');
  });

  it('refuses an address outside the subnet, and the gateway or DHCP address', async () => {
    await env.createPort('bad1', { network: 'p', fixedIPs: [{ subnet: 'v4', ipAddress: '10.99.0.5' }] });
    await env.createPort('bad2', { network: 'p', fixedIPs: [{ ipAddress: '10.20.0.1' }] });
    await env.createPort('bad3', { network: 'p', fixedIPs: [{ ipAddress: '10.20.0.2' }] });
    await env.createPort('bad4', { network: 'p', fixedIPs: [{ subnet: 'nope' }] });
    const b1 = await env.waitPort('bad1', 'ERROR', (x) => x.status?.status === 'ERROR');
    expect(cond(b1, 'Ready')).toMatchObject({ reason: 'InvalidIpForSubnet' });
    const b2 = await env.waitPort('bad2', 'ERROR', (x) => x.status?.status === 'ERROR');
    expect(cond(b2, 'Ready')).toMatchObject({ reason: 'InvalidIpForSubnet' });
    const b3 = await env.waitPort('bad3', 'ERROR', (x) => x.status?.status === 'ERROR');
    expect(cond(b3, 'Ready')).toMatchObject({ reason: 'IpAddressAlreadyAllocated' });
    const b4 = await env.waitPort('bad4', 'waiting', (x) => cond(x, 'Ready')?.reason === 'SubnetNotFound');
    expect(b4.status?.fixedIPs).toBeUndefined();
    for (const n of ['bad1', 'bad2', 'bad3', 'bad4']) await env.delete(PORTS, n);
  });

  it('waits for its network, reports a missing security group, and gets deviceOwner from the server label', async () => {
    await env.createPort('early', {
      network: 'later',
      securityGroups: ['web'],
    });
    const w = await env.waitPort('early', 'waiting', (x) => cond(x, 'Ready')?.reason === 'NetworkNotFound');
    expect(w.status?.status).toBe('BUILD');
    await env.createNetwork('later', { subnets: [{ name: 's', cidr: '10.30.0.0/28' }] as never });
    const p = await env.waitPort('early', 'Ready', ready);
    expect(p.status?.fixedIPs).toEqual([{ subnet: 's', ipAddress: '10.30.0.3' }]);
    expect(cond(p, 'SecurityGroupsResolved')).toMatchObject({ status: 'False', reason: 'SecurityGroupNotFound' });
    await env.client.create(SECURITY_GROUPS, {
      apiVersion: 'network.stratus.io/v1alpha1',
      kind: 'SecurityGroup',
      metadata: { name: 'web', namespace: env.ns, labels: env.labels },
      spec: {},
    } as KubernetesObject);
    await env.waitPort('early', 'groups resolved', (x) => cond(x, 'SecurityGroupsResolved')?.status === 'True');
    // A group created without rules allows egress only, as OpenStack's new groups do.
    const web = await env.securityGroup('web');
    expect(web.spec.rules).toEqual([
      { direction: 'egress', ethertype: 'IPv4' },
      { direction: 'egress', ethertype: 'IPv6' },
    ]);
    await waitFor('web Ready', async () => cond(await env.securityGroup('web'), 'Ready')?.status === 'True');

    await env.client.patch(
      PORTS,
      'early',
      env.ns,
      { metadata: { labels: { 'compute.stratus.io/server': 'vm1' } } },
      'application/merge-patch+json' as never,
    );
    const d = await env.waitPort('early', 'device set', (x) => x.status?.deviceID === 'vm1');
    expect(d.status?.deviceOwner).toBe('compute:nova');
  });

  it('network deletion waits for its ports (NetworkInUse), then releases the VNI and DHCP address', async () => {
    const net = await env.network('later');
    const uid = net.metadata!.uid!;
    expect((await env.segmentsOf(uid)).length).toBe(1);
    await env.delete(NETWORKS, 'later');
    const inUse = await env.waitNetwork('later', 'NetworkInUse', (n) => cond(n, 'Ready')?.reason === 'NetworkInUse');
    expect(inUse.metadata?.deletionTimestamp).toBeDefined();
    await env.delete(PORTS, 'early');
    await env.waitGone(NETWORKS, 'later');
    expect(await env.segmentsOf(uid)).toEqual([]);
    expect((await env.claims()).filter((c) => c.spec.network === 'later')).toEqual([]);
  });
});

describe('claims', () => {
  const claim = (name: string, spec: Record<string, unknown>) =>
    env.client.create(IP_ALLOCATIONS, {
      apiVersion: 'network.stratus.io/v1alpha1',
      kind: 'IPAllocation',
      metadata: { name, namespace: env.namespaces[1] },
      spec,
    } as KubernetesObject);

  it('are atomic (a second claim of an address is AlreadyExists), immutable and exactly one address', async () => {
    const name = ipAllocationName('manual', 's', '10.77.0.9');
    await claim(name, { network: 'manual', subnet: 's', ipAddress: '10.77.0.9' });
    const again = await claim(name, { network: 'manual', subnet: 's', ipAddress: '10.77.0.9' }).catch((e) => e);
    expect(isAlreadyExists(again)).toBe(true);
    const changed = await env.client
      .patch(
        IP_ALLOCATIONS,
        name,
        env.namespaces[1],
        { spec: { ipAddress: '10.77.0.10' } },
        'application/merge-patch+json' as never,
      )
      .catch((e) => e);
    expect(statusCode(changed)).toBe(422);
    const both = await claim('manual.x', {
      network: 'manual',
      subnet: 's',
      ipAddress: '10.77.0.11',
      macAddress: 'fa:16:3e:00:00:01',
    }).catch((e) => e);
    expect(statusCode(both)).toBe(422);
    const noSubnet = await claim('manual.y', { network: 'manual', ipAddress: '10.77.0.12' }).catch((e) => e);
    expect(statusCode(noSubnet)).toBe(422);
    await env.client.delete(IP_ALLOCATIONS, name, env.namespaces[1]);
  });
});

describe('orphan sweep', () => {
  it('releases a VNI whose network is gone, after the grace period', async () => {
    const vni = 16_000_000 + Math.floor(Math.random() * 700_000);
    await env.client.create(SEGMENT_ALLOCATIONS, {
      apiVersion: 'network.stratus.io/v1alpha1',
      kind: 'SegmentAllocation',
      metadata: { name: `vxlan-${vni}` },
      spec: { vni, network: { namespace: env.ns, name: 'ghost', uid: '00000000-0000-0000-0000-000000000000' } },
    } as KubernetesObject);
    await env.waitGone(SEGMENT_ALLOCATIONS, `vxlan-${vni}`, undefined, 30_000);
  });
});

describe('projects', () => {
  it('get the default security group in their namespace', async () => {
    const name = `${env.id}-proj`;
    await env.client.create(PROJECTS, {
      apiVersion: ProjectKind.apiVersion,
      kind: 'Project',
      metadata: { name, labels: env.labels },
      spec: {},
    } as KubernetesObject);
    try {
      const sg = await waitFor('default group in the project namespace', () =>
        env.securityGroup('default', name).catch(() => undefined),
      );
      expect(sg.spec.rules).toHaveLength(4);
      expect(sg.spec.rules.filter((r) => r.direction === 'ingress').map((r) => r.remoteGroup)).toEqual([
        'default',
        'default',
      ]);
    } finally {
      await env.client.delete(PROJECTS, name).catch(() => {});
      await env.waitGone(PROJECTS, name, undefined, 60_000).catch(() => {});
    }
  });
});
