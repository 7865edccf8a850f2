// Servers and their Ports (Nova's network allocation) through the operator and fake node agents, against a real
// kube-apiserver with kube-controller-manager (garbage collection): a server creates one owned Port per network
// entry and lists their addresses, claims and releases the Ports it names, refuses Ports another server holds, aborts
// its build when a Port gets no address, keeps its Ports' security groups current and takes its Ports along on delete.
//
// When the operator registers a Port controller (IPAM), the Ports get their addresses from it; otherwise the test
// plays its part and writes the Port status (MAC, fixed IPs, condition Ready) itself.
import type { KubernetesObject } from '@kubernetes/client-node';
import { PatchStrategy } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  NETWORK_LABEL,
  NetworkKind,
  PORT_DEVICE_LABEL,
  PORT_READY,
  type Port,
  PortKind,
  SERVER_FINALIZER,
  SERVER_NODE_LABEL,
  SecurityGroupKind,
  ServerKind,
  type ServerSpec,
} from '../../src/api/index.ts';
import { gvrOf } from '../../src/controllers/common.ts';
import { isNotFound } from '../../src/runtime/index.ts';
import { ComputeEnv, condition, type FakeNode, type Srv, waitFor } from './compute-env.ts';

const PORTS = gvrOf(PortKind);
const SERVERS = gvrOf(ServerKind);
const NETWORKS = gvrOf(NetworkKind);
const SECGROUPS = gvrOf(SecurityGroupKind);

const env = new ComputeEnv('net');
let small = '';
let idle: FakeNode;
/** The operator runs a Port controller that allocates addresses (else the test writes Port status). */
let ipam = false;

beforeAll(async () => {
  await env.setup();
  await env.startNodes(2, 'n', { slots: 8, pool: 'busy' });
  idle = (await env.startNodes(1, 'idle', { slots: 4, pool: 'idle' }))[0]!;
  small = await env.flavor('small', 1, 1024);
  await network('net-a', '10.71.0.0/24');
  await network('net-b', '10.72.0.0/24');
  // One address in the pool, taken by a filler port: the next port gets none.
  await network('net-full', '10.79.0.0/29', { allocationPools: [{ start: '10.79.0.2', end: '10.79.0.2' }] });
  for (const sg of ['default', 'web']) {
    await env.client.create(SECGROUPS, {
      apiVersion: SecurityGroupKind.apiVersion,
      kind: SecurityGroupKind.kind,
      metadata: { name: sg, namespace: env.ns, labels: env.scopeLabels },
      spec: { rules: [] },
    } as KubernetesObject);
  }
  const op = await env.startOperator();
  ipam = Object.keys(op.controllers).some((k) => /^ports?$/i.test(k));
  await env.waitNodesUp();
}, 60_000);

afterAll(async () => {
  await env.teardown();
});

// ---- helpers ----

async function network(name: string, cidr: string, extra: Record<string, unknown> = {}) {
  await env.client.create(NETWORKS, {
    apiVersion: NetworkKind.apiVersion,
    kind: NetworkKind.kind,
    metadata: { name, namespace: env.ns, labels: env.scopeLabels },
    spec: { subnets: [{ name: 'v4', cidr, enableDHCP: false, ...extra }] },
  } as KubernetesObject);
}

function createServer(name: string, networks: ServerSpec['networks'], extra: Partial<ServerSpec> = {}, pool = 'busy') {
  const m = env.manifest(name, { flavor: small, pool });
  m.spec = { ...m.spec, networks, ...extra };
  return env.client.create<Srv>(SERVERS, m);
}

async function userPort(name: string, net: string): Promise<Port> {
  return env.client.create<Port>(PORTS, {
    apiVersion: PortKind.apiVersion,
    kind: PortKind.kind,
    metadata: { name, namespace: env.ns, labels: env.scopeLabels },
    spec: { network: net },
  } as Port);
}

const getPort = (name: string) => env.client.get<Port>(PORTS, name, env.ns);

/**
 * "Nothing more happens" without a sleep: waits until the operator's Server informer agrees with `seen` for `name`
 * (undefined once it saw the delete), then until every controller is idle (no key queued, no reconcile in flight).
 */
async function operatorSettled(name: string, seen: (s: Srv | undefined) => boolean): Promise<void> {
  const mgr = env.operator!.mgr;
  await waitFor(`the operator to see ${name}`, () => seen(mgr.informer<Srv>(SERVERS).get(name, env.ns)));
  await mgr.idle();
}

function waitPort(name: string, what: string, ok: (p: Port) => boolean, timeoutMs = 30_000): Promise<Port> {
  return waitFor(
    `port ${name}: ${what}`,
    async () => {
      const p = await getPort(name);
      return ok(p) ? p : undefined;
    },
    timeoutMs,
  );
}

async function waitPortGone(name: string, timeoutMs = 60_000) {
  await waitFor(
    `port ${name} gone`,
    async () => {
      try {
        await getPort(name);
        return false;
      } catch (err) {
        if (isNotFound(err)) return true;
        throw err;
      }
    },
    timeoutMs,
  );
}

let nextHost = 10;
/**
 * The port's addresses: allocated by the operator's Port controller, or (without one) written here the way it
 * would: MAC, one address (`ip`, else the next free one of the test's counter) and Ready=True.
 */
async function allocated(name: string, ip?: string): Promise<Port> {
  if (ipam) return waitPort(name, 'addresses allocated', (p) => (p.status?.fixedIPs?.length ?? 0) > 0);
  const p = await getPort(name);
  const prefix = p.spec.network === 'net-b' ? '10.72.0' : '10.71.0';
  const host = nextHost++;
  return writePortStatus(name, {
    macAddress: `fa:16:3e:00:00:${host.toString(16).padStart(2, '0')}`,
    fixedIPs: [{ subnet: 'v4', ipAddress: ip ?? `${prefix}.${host}` }],
    conditions: [readyCondition('True', 'Allocated', 'addresses allocated')],
  });
}

/** Without a Port controller: the port gets no address (its pool is empty). */
async function exhausted(name: string): Promise<Port> {
  if (ipam) return waitPort(name, 'allocation failed', (p) => readyOf(p)?.status === 'False');
  return writePortStatus(name, {
    conditions: [readyCondition('False', 'IpAddressGenerationFailure', 'no address left in subnet v4 of net-full')],
  });
}

const readyOf = (p: Port) => p.status?.conditions?.find((c) => c.type === PORT_READY);

function readyCondition(status: string, reason: string, message: string) {
  return { type: PORT_READY, status, reason, message, lastTransitionTime: new Date().toISOString() };
}

function writePortStatus(name: string, status: Record<string, unknown>): Promise<Port> {
  return env.client.patch<Port>(PORTS, name, env.ns, { status }, PatchStrategy.MergePatch, { subresource: 'status' });
}

// Whether the guest then starts depends on the node agent and the network controller, not on what is tested here.
const bound = (s: Srv) => s.status?.node !== undefined;

// ---- tests ----

describe('a server with two networks', () => {
  const VM = 'two';
  let uid = '';

  it('creates one owned port per network with the network, fixed IP, security groups and labels', async () => {
    const s = await createServer(VM, [{ network: 'net-a' }, { network: 'net-b', fixedIP: '10.72.0.50' }], {
      securityGroups: ['default', 'web'],
    });
    uid = s.metadata!.uid!;
    const p0 = await waitPort(`${VM}-0`, 'exists', () => true);
    const p1 = await waitPort(`${VM}-1`, 'exists', () => true);
    expect(p0.spec).toMatchObject({ network: 'net-a', securityGroups: ['default', 'web'] });
    expect(p0.spec.fixedIPs).toBeUndefined();
    expect(p1.spec).toMatchObject({
      network: 'net-b',
      fixedIPs: [{ ipAddress: '10.72.0.50' }],
      securityGroups: ['default', 'web'],
    });
    for (const [p, net] of [
      [p0, 'net-a'],
      [p1, 'net-b'],
    ] as const) {
      expect(p.metadata.labels).toMatchObject({ [PORT_DEVICE_LABEL]: VM, [NETWORK_LABEL]: net, ...env.scopeLabels });
      expect(p.metadata.labels?.[SERVER_NODE_LABEL]).toBeUndefined();
      expect(p.metadata.ownerReferences).toEqual([
        {
          apiVersion: ServerKind.apiVersion,
          kind: 'Server',
          name: VM,
          uid,
          controller: true,
          blockOwnerDeletion: true,
        },
      ]);
    }
    // Scheduling does not wait for the addresses (the node agent does, before it spawns the guest).
    const b = await env.waitServer(VM, 'bound', bound);
    if (!ipam) expect(b.status?.addresses).toBeUndefined();
  });

  it('lists the ports addresses in spec.networks order once they are allocated', async () => {
    const p0 = await allocated(`${VM}-0`);
    const p1 = await allocated(`${VM}-1`, '10.72.0.50');
    const s = await env.waitServer(VM, 'two addresses', (x) => (x.status?.addresses?.length ?? 0) === 2);
    expect(s.status?.addresses).toEqual([
      {
        network: 'net-a',
        ip: p0.status!.fixedIPs![0]!.ipAddress,
        version: 4,
        macAddress: p0.status!.macAddress,
        type: 'fixed',
        port: `${VM}-0`,
      },
      {
        network: 'net-b',
        ip: '10.72.0.50',
        version: 4,
        macAddress: p1.status!.macAddress,
        type: 'fixed',
        port: `${VM}-1`,
      },
    ]);
    expect(p0.status?.macAddress).toMatch(/^fa:16:3e:/);
  });

  it('keeps the ports security groups equal to the server ones', async () => {
    await env.patchServer(VM, { spec: { securityGroups: ['web'] } });
    await waitPort(`${VM}-0`, 'security groups [web]', (p) => JSON.stringify(p.spec.securityGroups) === '["web"]');
    await waitPort(`${VM}-1`, 'security groups [web]', (p) => JSON.stringify(p.spec.securityGroups) === '["web"]');
    await env.patchServer(VM, { spec: { securityGroups: [] } });
    await waitPort(`${VM}-0`, 'no security groups', (p) => JSON.stringify(p.spec.securityGroups) === '[]');
    const s = await env.server(VM);
    expect(s.status?.vmState).not.toBe('error');
    expect(s.status?.addresses).toHaveLength(2);
  });

  it('takes its ports along when deleted', async () => {
    await env.deleteServer(VM);
    await env.waitServerGone(VM);
    await waitPortGone(`${VM}-0`);
    await waitPortGone(`${VM}-1`);
  });
});

describe('a server on existing ports', () => {
  it('waits for a port that does not exist yet, then claims it', async () => {
    await createServer('later', [{ port: 'later-p' }]);
    const s = await env.waitServer(
      'later',
      'PortNotFound',
      (x) => condition(x, 'Scheduled')?.reason === 'PortNotFound',
    );
    expect(s.status?.node).toBeUndefined();
    expect(condition(s, 'Scheduled')?.message).toContain('later-p');
    await userPort('later-p', 'net-a');
    await waitPort('later-p', 'claimed by later', (p) => p.metadata.labels?.[PORT_DEVICE_LABEL] === 'later');
    await env.waitServer('later', 'bound', bound);
  });

  it('claims the port it names, lists its address, and releases it on delete without deleting it', async () => {
    const created = await userPort('mine-p', 'net-b');
    await createServer('claimer', [{ port: 'mine-p' }]);
    const p = await waitPort('mine-p', 'claimed', (x) => x.metadata.labels?.[PORT_DEVICE_LABEL] === 'claimer');
    expect(p.metadata.ownerReferences ?? []).toEqual([]);
    const a = await allocated('mine-p');
    const s = await env.waitServer('claimer', 'bound', bound);
    expect(s.metadata?.finalizers).toContain(SERVER_FINALIZER);
    await env.waitServer(
      'claimer',
      'address',
      (x) => x.status?.addresses?.[0]?.ip === a.status?.fixedIPs?.[0]?.ipAddress,
    );

    await env.deleteServer('claimer');
    await env.waitServerGone('claimer');
    const after = await getPort('mine-p');
    expect(after.metadata.uid).toBe(created.metadata.uid);
    expect(after.metadata.labels?.[PORT_DEVICE_LABEL]).toBeUndefined();
    expect(after.metadata.deletionTimestamp).toBeUndefined();
  });

  it('keeps a port deleted under a live server (PortInUse, addresses kept) until the server goes', async ({ skip }) => {
    if (!ipam) skip();
    await userPort('busy-p', 'net-a');
    await createServer('user', [{ port: 'busy-p' }]);
    const a = await allocated('busy-p');
    await env.waitServer('user', 'bound', bound);
    await env.client.delete(PORTS, 'busy-p', env.ns);
    const p = await waitPort('busy-p', 'PortInUse', (x) => readyOf(x)?.reason === 'PortInUse');
    expect(p.metadata.deletionTimestamp).toBeDefined();
    expect(readyOf(p)?.message).toContain('server user');
    expect(p.status?.fixedIPs).toEqual(a.status?.fixedIPs);
    await env.deleteServer('user');
    await env.waitServerGone('user');
    await waitPortGone('busy-p');
  });

  it('refuses a port another server holds (ERROR, PortInUse) and leaves it alone', async () => {
    await userPort('shared-p', 'net-a');
    await createServer('holder', [{ port: 'shared-p' }]);
    await waitPort('shared-p', 'claimed', (x) => x.metadata.labels?.[PORT_DEVICE_LABEL] === 'holder');
    await env.waitServer('holder', 'bound', bound);
    const before = await getPort('shared-p');

    await createServer('thief', [{ port: 'shared-p' }]);
    const s = await env.waitServer('thief', 'ERROR', (x) => x.status?.status === 'ERROR');
    expect(s.status?.fault?.message).toBe('Port shared-p is still in use by server holder');
    expect(condition(s, 'Scheduled')).toMatchObject({ status: 'False', reason: 'PortInUse' });
    expect(s.status?.node).toBeUndefined();
    await operatorSettled('thief', (x) => x?.status?.status === 'ERROR');
    const after = await getPort('shared-p');
    expect(after.metadata.labels?.[PORT_DEVICE_LABEL]).toBe('holder');
    expect(after.metadata.labels).toEqual(before.metadata.labels);
    expect(after.metadata.ownerReferences).toEqual(before.metadata.ownerReferences);

    // The refused server's delete does not release the holder's port.
    await env.deleteServer('thief');
    await env.waitServerGone('thief');
    await operatorSettled('thief', (x) => x === undefined);
    expect((await getPort('shared-p')).metadata.labels?.[PORT_DEVICE_LABEL]).toBe('holder');
  });

  it('refuses to adopt a port that has its port name but was not created by it', async () => {
    await userPort('squat-0', 'net-a');
    await createServer('squat', [{ network: 'net-a' }]);
    const s = await env.waitServer('squat', 'ERROR', (x) => x.status?.status === 'ERROR');
    expect(s.status?.fault?.message).toBe('Port squat-0 already exists and was not created by server squat');
    const p = await getPort('squat-0');
    expect(p.metadata.ownerReferences ?? []).toEqual([]);
    expect(p.metadata.labels?.[PORT_DEVICE_LABEL]).toBeUndefined();
  });
});

describe('a port that gets no address', () => {
  it('aborts the build: ERROR naming the port and reason, claim released, node label removed', async () => {
    await userPort('filler', 'net-full');
    if (ipam) await allocated('filler');
    // The idle node's agent stops: the server stays building on it (the hypervisor is up for the grace period).
    await idle.stop();
    await createServer('starved', [{ network: 'net-full' }], {}, 'idle');
    if (!ipam) await env.waitServer('starved', 'bound', (x) => x.status?.node === idle.name);
    await waitPort('starved-0', 'exists', () => true);
    await exhausted('starved-0');
    const s = await env.waitServer('starved', 'ERROR', (x) => x.status?.status === 'ERROR');
    expect(s.status?.fault?.message).toMatch(/^port starved-0: IpAddressGenerationFailure: /);
    expect(s.status?.fault?.code).toBe(500);
    expect(condition(s, 'Scheduled')).toMatchObject({ status: 'False', reason: 'IpAddressGenerationFailure' });
    expect(s.status?.node).toBeUndefined();
    expect(s.status?.allocation).toBeUndefined();
    expect(s.status?.actions?.at(-1)).toMatchObject({ action: 'create', result: 'Error' });
    await env.waitServer('starved', 'node label removed', (x) => x.metadata?.labels?.[SERVER_NODE_LABEL] === undefined);
    // The claim is released: the ledger and the status agree, a new server fits where it was.
    expect(env.operator?.controllers.server.ledger.get(`${env.ns}/starved`)).toBeUndefined();
    await idle.start();
  });
});
