// 300 ports created at once on one /24: every address handed out once, the surplus refused with Neutron's
// IpAddressGenerationFailure, also when the operator process is SIGKILLed in the middle and restarted; deleting the
// ports and then the network leaves no claim behind.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ipAllocationName } from '../../src/api/index.ts';
import {
  type ChildOperator,
  cond,
  NETWORKS,
  NetEnv,
  type P,
  PORTS,
  type RunningOperator,
  startOperator,
  waitFor,
} from './network-env.ts';

const PORT_COUNT = 300;
// 10.x.0.0/24: .0 network, .1 gateway, .255 broadcast, .2 DHCP -> 252 for ports.
const CAPACITY = 252;

const env = new NetEnv('burst');
let child: ChildOperator | undefined;

beforeAll(async () => {
  await env.setup(3);
}, 60_000);

afterAll(async () => {
  await child?.kill();
  await env.teardown();
}, 180_000);

const isReady = (p: P) => cond(p, 'Ready')?.status === 'True';
const isExhausted = (p: P) => cond(p, 'Ready')?.reason === 'IpAddressGenerationFailure';

/**
 * Waits until every port is allocated or refused for exhaustion, the claims agree with the ports (one IP claim
 * per allocated port, one MAC claim per port) and refused ports face a full pool. Claims a racing writer made in excess are released asynchronously,
 * so agreement, not just port status, is the settled state.
 */
async function settle(ns: string, net: string, expected: number): Promise<P[]> {
  let summary = '';
  return waitFor(
    `${expected} ports allocated or refused, claims in agreement`,
    async () => {
      const all = await env.ports(ns);
      const ready = all.filter(isReady).length;
      const failed = all.filter(isExhausted).length;
      const claims = (await env.claims(ns)).filter((c) => c.spec.network === net && c.spec.purpose === 'port');
      const ips = claims.filter((c) => c.spec.ipAddress).length;
      const macs = claims.filter((c) => c.spec.macAddress).length;
      summary = `${ready} ready, ${failed} exhausted of ${all.length}; ${ips} IP and ${macs} MAC claims`;
      // A refusal is final only when the pool is full (addresses released by a racing writer go to waiting ports).
      const full = failed === 0 || ips === CAPACITY;
      return all.length === expected && ready + failed === expected && ips === ready && macs === expected && full
        ? all
        : undefined;
    },
    240_000,
    500,
  ).catch((err: unknown) => {
    throw new Error(`${err} (${summary})`);
  });
}

/** No address twice, none reserved, each backed by exactly one claim of its port, and no claim without a port. */
async function checkAccounting(ns: string, net: string, cidrPrefix: string, all: P[]) {
  const ready = all.filter(isReady);
  const failed = all.filter(isExhausted);
  if (ready.length !== CAPACITY) {
    const claims = (await env.claims(ns)).filter((c) => c.spec.network === net && c.spec.ipAddress);
    const byUid = new Map(all.map((p) => [p.metadata!.uid!, p]));
    for (const c of claims) {
      const p = byUid.get(c.metadata.ownerReferences?.[0]?.uid ?? '');
      if (p?.status?.fixedIPs?.[0]?.ipAddress === c.spec.ipAddress) continue;
      console.log(
        'unreported claim',
        c.metadata.name,
        c.metadata.creationTimestamp,
        p?.metadata?.name,
        JSON.stringify(p?.status),
      );
    }
  }
  expect(ready).toHaveLength(CAPACITY);
  expect(failed).toHaveLength(PORT_COUNT - CAPACITY);
  const ips = ready.map((p) => p.status?.fixedIPs?.[0]?.ipAddress ?? '');
  expect(new Set(ips).size).toBe(CAPACITY);
  const reserved = ['0', '1', '2', '255'].map((o) => `${cidrPrefix}.${o}`);
  for (const ip of ips) {
    expect(ip.startsWith(`${cidrPrefix}.`)).toBe(true);
    expect(reserved).not.toContain(ip);
  }
  const macs = all.map((p) => p.status?.macAddress);
  expect(new Set(macs).size).toBe(PORT_COUNT);
  for (const p of failed) {
    expect(cond(p, 'Ready')?.message).toBe(`No more IP addresses available on subnet v4 of network ${net}.`);
    expect(p.status?.status).toBe('ERROR');
  }
  // The API's record: one IP claim per ready port (nothing leaked by the kill), one MAC claim per port, the DHCP one.
  const claims = (await env.claims(ns)).filter((c) => c.spec.network === net);
  const owner = (c: (typeof claims)[number]) => c.metadata.ownerReferences?.[0]?.uid;
  const ipClaims = claims.filter((c) => c.spec.ipAddress && c.spec.purpose === 'port');
  expect(ipClaims).toHaveLength(CAPACITY);
  expect(claims.filter((c) => c.spec.macAddress)).toHaveLength(PORT_COUNT);
  expect(claims.filter((c) => c.spec.purpose === 'dhcp').map((c) => c.metadata.name)).toEqual([
    ipAllocationName(net, 'v4', `${cidrPrefix}.2`),
  ]);
  const byUid = new Map(all.map((p) => [p.metadata!.uid!, p]));
  for (const c of ipClaims) {
    const p = byUid.get(owner(c) ?? '');
    expect(p, `claim ${c.metadata.name} has no port`).toBeDefined();
    expect(p?.status?.fixedIPs?.[0]?.ipAddress).toBe(c.spec.ipAddress);
  }
}

async function deleteAll(ns: string, net: string) {
  const uid = (await env.network(net, ns)).metadata!.uid!;
  const names = (await env.ports(ns)).map((p) => p.metadata!.name!);
  const t0 = Date.now();
  await Promise.all(names.map((n) => env.delete(PORTS, n, ns)));
  await waitFor('every port deleted', async () => (await env.ports(ns)).length === 0, 120_000, 500);
  const deleteMs = Date.now() - t0;
  const left = (await env.claims(ns)).filter((c) => c.spec.network === net);
  expect(left.map((c) => c.spec.purpose)).toEqual(['dhcp']);
  await env.delete(NETWORKS, net, ns);
  await env.waitGone(NETWORKS, net, ns);
  expect((await env.claims(ns)).filter((c) => c.spec.network === net)).toEqual([]);
  expect(await env.segmentsOf(uid)).toEqual([]);
  return deleteMs;
}

async function createPorts(ns: string, net: string) {
  const names = Array.from({ length: PORT_COUNT }, (_, i) => `${net}-${String(i).padStart(3, '0')}`);
  await Promise.all(names.map((n) => env.createPort(n, { network: net }, ns)));
}

describe(`${PORT_COUNT} ports at once on one /24`, () => {
  it('in-process operator: each address once, the surplus refused, nothing left after deletion', async () => {
    await env.startOperator();
    try {
      const ns = env.namespaces[0]!;
      await env.createNetwork('b1', { subnets: [{ name: 'v4', cidr: '10.41.0.0/24' }] } as never, ns);
      await env.waitNetwork('b1', 'ACTIVE', (n) => n.status?.status === 'ACTIVE', ns);
      const t0 = Date.now();
      await createPorts(ns, 'b1');
      const all = await settle(ns, 'b1', PORT_COUNT);
      const settleMs = Date.now() - t0;
      await checkAccounting(ns, 'b1', '10.41.0', all);
      const deleteMs = await deleteAll(ns, 'b1');
      console.log(`[burst] ${PORT_COUNT} ports settled in ${settleMs} ms; deleted in ${deleteMs} ms`);
    } finally {
      await env.stopOperator();
    }
  }, 300_000);

  it('operator process SIGKILLed in the middle and restarted: still no duplicate and no leak', async () => {
    const ns = env.namespaces[1]!;
    child = await env.startChildOperator(`${env.id}-a`);
    await env.createNetwork('b2', { subnets: [{ name: 'v4', cidr: '10.42.0.0/24' }] } as never, ns);
    await env.waitNetwork('b2', 'ACTIVE', (n) => n.status?.status === 'ACTIVE', ns);
    const t0 = Date.now();
    const creating = createPorts(ns, 'b2');
    const atKill = await waitFor(
      'a third of the ports allocated',
      async () => {
        const n = (await env.ports(ns)).filter(isReady).length;
        return n >= 80 ? n : undefined;
      },
      120_000,
      100,
    );
    await child.kill();
    const killedAt = Date.now() - t0;
    await creating;
    child = await env.startChildOperator(`${env.id}-b`);
    const all = await settle(ns, 'b2', PORT_COUNT);
    const settleMs = Date.now() - t0;
    await checkAccounting(ns, 'b2', '10.42.0', all);
    const deleteMs = await deleteAll(ns, 'b2');
    console.log(
      `[burst-kill] killed after ${killedAt} ms with ${atKill} ports ready; all ${PORT_COUNT} settled after ` +
        `${settleMs} ms; deleted in ${deleteMs} ms`,
    );
    await child.kill();
    child = undefined;
  }, 400_000);

  it('two operators at once (split brain, e.g. a deposed leader finishing its reconciles): they converge', async () => {
    const ns = env.namespaces[2]!;
    const ops: RunningOperator[] = [];
    try {
      for (const id of ['x', 'y'])
        ops.push(await startOperator(env.id, { identity: `${env.id}-${id}`, logger: env.logger }));
      await env.createNetwork('b3', { subnets: [{ name: 'v4', cidr: '10.43.0.0/24' }] } as never, ns);
      await env.waitNetwork('b3', 'ACTIVE', (n) => n.status?.status === 'ACTIVE', ns);
      const t0 = Date.now();
      await createPorts(ns, 'b3');
      const all = await settle(ns, 'b3', PORT_COUNT);
      const settleMs = Date.now() - t0;
      await checkAccounting(ns, 'b3', '10.43.0', all);
      const deleteMs = await deleteAll(ns, 'b3');
      console.log(`[burst-2-operators] settled in ${settleMs} ms; deleted in ${deleteMs} ms`);
    } finally {
      await Promise.all(ops.map((o) => o.stop()));
    }
  }, 400_000);
});
