// The compute control plane schedules against a real kube-apiserver: the operator in-process, fake node agents
// in-process. A burst beyond capacity books exactly what fits (no host over-committed) and fails the rest with
// Nova's NoValidHost fault; server groups are honoured under concurrent creation; a server naming a missing Flavor
// waits for it.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { waitFor } from '../../../e2e/testing/wait.ts';
import { SERVER_NODE_LABEL } from '../../src/api/index.ts';
import {
  allocatableOf,
  allocationsByNode,
  ComputeEnv,
  condition,
  type FakeNode,
  SERVERS,
  type Srv,
} from './compute-env.ts';

const env = new ComputeEnv('sched');
let burstNodes: FakeNode[];
let groupNodes: FakeNode[];
let small = '';

beforeAll(async () => {
  await env.setup();
  burstNodes = await env.startNodes(5, 'burst', { slots: 4, pool: 'burst' });
  groupNodes = await env.startNodes(3, 'group', { slots: 8, pool: 'group' });
  small = await env.flavor('small', 1, 1024);
  await env.startOperator();
  await env.waitNodesUp();
});

afterAll(async () => {
  await env.teardown();
});

const byStatus = (servers: readonly Srv[], status: string) => servers.filter((s) => s.status?.status === status);

describe('burst beyond capacity', () => {
  let servers: Srv[] = [];
  const names = Array.from({ length: 30 }, (_, i) => `burst-${String(i).padStart(2, '0')}`);

  it('30 servers on 5 nodes with room for 4 each: exactly 20 ACTIVE and 10 ERROR', async () => {
    await env.createServers(names, { flavor: small, pool: 'burst' });
    servers = await env.waitSettled(30, 120_000);
    expect(byStatus(servers, 'ACTIVE')).toHaveLength(20);
    expect(byStatus(servers, 'ERROR')).toHaveLength(10);
  });

  it('the ERROR ones carry the NoValidHost fault naming the filter and its counts, and are not bound', () => {
    for (const s of byStatus(servers, 'ERROR')) {
      expect(s.status?.fault?.message).toMatch(/^No valid host was found: \d+ hosts; /);
      expect(s.status?.fault?.message).toMatch(/RamFilter removed 5 \(0 left\)$/);
      expect(s.status?.fault?.code).toBe(500);
      expect(s.status).toMatchObject({ vmState: 'error' });
      expect(s.status?.node).toBeUndefined();
      expect(s.metadata?.labels?.[SERVER_NODE_LABEL]).toBeUndefined();
      expect(condition(s, 'Scheduled')).toMatchObject({ status: 'False', reason: 'NoValidHost' });
      expect(s.status?.actions?.at(-1)).toMatchObject({ action: 'create', result: 'Error' });
    }
  });

  it('no node is over-committed: 4 servers per node, allocations within allocatable, one guest per server', async () => {
    const books = allocationsByNode(servers);
    for (const nd of burstNodes) {
      const book = books.get(nd.name);
      const limit = allocatableOf(await env.hypervisor(nd.name));
      expect(book?.servers, nd.name).toBe(4);
      expect(book!.ramMiB).toBeLessThanOrEqual(limit.ramMiB);
      expect(book!.vcpus).toBeLessThanOrEqual(limit.vcpus);
      expect(book!.diskGiB).toBeLessThanOrEqual(limit.diskGiB);
      const onNode = byStatus(servers, 'ACTIVE').filter((s) => s.status?.node === nd.name);
      expect((await nd.guestIds()).sort()).toEqual(onNode.map((s) => s.metadata!.uid!).sort());
    }
    for (const s of byStatus(servers, 'ACTIVE')) {
      expect(s.metadata?.labels?.[SERVER_NODE_LABEL]).toBe(s.status?.node);
      expect(s.status).toMatchObject({ vmState: 'active', powerState: 'RUNNING', allocation: { ramMiB: 1024 } });
    }
    for (const nd of groupNodes) expect(nd.driver.size).toBe(0);
  });

  it('a FailedScheduling Warning Event is recorded for an errored server', async () => {
    const failed = byStatus(servers, 'ERROR')[0]!.metadata!.name!;
    const e = await env.waitEvent(failed, 'FailedScheduling', 'Warning');
    expect(e.note).toMatch(/^No valid host was found/);
  });

  it('an errored server is not retried while its spec is unchanged', async () => {
    const failed = byStatus(servers, 'ERROR')[0]!.metadata!.name!;
    const before = await env.server(failed);
    await env.patchServer(failed, { metadata: { annotations: { 'test.stratus.io/touch': '1' } } });
    // the operator reconciles it (annotations count as a change) and must leave it alone: wait until its informer
    // holds the touched server, then until every controller is idle (no key queued, no reconcile in flight)
    const mgr = env.operator!.mgr;
    await waitFor(
      'the operator to see the touch',
      () => mgr.informer<Srv>(SERVERS).get(failed, env.ns)?.metadata?.annotations?.['test.stratus.io/touch'] === '1',
    );
    await mgr.idle();
    const after = await env.server(failed);
    expect(after.status?.actions).toEqual(before.status?.actions);
    expect(after.status?.status).toBe('ERROR');
  });
});

describe('server groups', () => {
  it('anti-affinity: 3 members on 3 different nodes, a 4th is refused by ServerGroupAntiAffinityFilter', async () => {
    await env.serverGroup('anti', 'anti-affinity');
    const names = ['anti-0', 'anti-1', 'anti-2', 'anti-3'];
    await env.createServers(names, { flavor: small, pool: 'group', group: 'anti' });
    const all = await settled(names);
    const active = byStatus(all, 'ACTIVE');
    expect(active).toHaveLength(3);
    expect(new Set(active.map((s) => s.status?.node)).size).toBe(3);
    const [err] = byStatus(all, 'ERROR');
    expect(err?.status?.fault?.message).toMatch(/^No valid host was found: /);
    expect(err?.status?.fault?.message).toMatch(/ServerGroupAntiAffinityFilter removed 3 \(0 left\)/);
  });

  it('anti-affinity with maxServerPerHost 2: six fit, two per node; a seventh does not', async () => {
    await env.serverGroup('anti2', 'anti-affinity', 2);
    const names = Array.from({ length: 6 }, (_, i) => `anti2-${i}`);
    await env.createServers(names, { flavor: small, pool: 'group', group: 'anti2' });
    const six = await settled(names);
    expect(byStatus(six, 'ACTIVE')).toHaveLength(6);
    const perNode = new Map<string, number>();
    for (const s of six) perNode.set(s.status!.node!, (perNode.get(s.status!.node!) ?? 0) + 1);
    expect([...perNode.values()]).toEqual([2, 2, 2]);

    await env.createServer('anti2-6', { flavor: small, pool: 'group', group: 'anti2' });
    const [seventh] = await settled(['anti2-6']);
    expect(seventh?.status?.status).toBe('ERROR');
    expect(seventh?.status?.fault?.message).toMatch(/ServerGroupAntiAffinityFilter removed 3 \(0 left\)/);
  });

  it('affinity: every member on one node', async () => {
    await env.serverGroup('aff', 'affinity');
    const names = ['aff-0', 'aff-1', 'aff-2', 'aff-3'];
    await env.createServers(names, { flavor: small, pool: 'group', group: 'aff' });
    const all = await settled(names);
    expect(byStatus(all, 'ACTIVE')).toHaveLength(4);
    expect(new Set(all.map((s) => s.status?.node)).size).toBe(1);
    const node = env.node(all[0]!.status!.node);
    const uids = new Set(await node.guestIds());
    for (const s of all) expect(uids.has(s.metadata!.uid!)).toBe(true);
  });
});

describe('server groups on the move', () => {
  it('migrating an anti-affinity member never lands next to another member', async () => {
    // three members occupy all three group nodes: there is nowhere to go
    const members = await Promise.all(['anti-0', 'anti-1', 'anti-2', 'anti-3'].map((n) => env.server(n)));
    const s = members.find((x) => x.status?.status === 'ACTIVE')!;
    const name = s.metadata!.name!;
    const node = s.status?.node;
    await env.patchServer(name, { spec: { triggers: { migrate: 'm1' } } });
    const r = await env.waitServer(name, 'Migrated', (x) => condition(x, 'Migrated') !== undefined);
    expect(condition(r, 'Migrated')).toMatchObject({
      status: 'False',
      reason: 'NoValidHost',
      message: expect.stringMatching(/ServerGroupAntiAffinityFilter removed 2 \(0 left\)/),
    });
    expect(r.status).toMatchObject({ node, status: 'ACTIVE', triggers: { migrate: 'm1' } });
  });

  it('migrating a member of an affinity group with other members is refused', async () => {
    const s = await env.server('aff-0');
    const node = s.status?.node;
    await env.patchServer('aff-0', { spec: { triggers: { migrate: 'm1' } } });
    const r = await env.waitServer('aff-0', 'Migrated', (x) => condition(x, 'Migrated') !== undefined);
    expect(condition(r, 'Migrated')).toMatchObject({
      status: 'False',
      reason: 'NoValidHost',
      message: expect.stringMatching(/ServerGroupAffinityFilter removed 2 \(0 left\)/),
    });
    expect(r.status).toMatchObject({ node, status: 'ACTIVE' });
  });
});

describe('missing references', () => {
  it('a server naming a missing Flavor waits (FlavorNotFound) and is scheduled once the Flavor exists', async () => {
    const late = `${env.id}-late`;
    await env.createServer('late', { flavor: late, pool: 'group' });
    const waiting = await env.waitServer(
      'late',
      'Scheduled=False FlavorNotFound',
      (s) => condition(s, 'Scheduled')?.reason === 'FlavorNotFound',
    );
    expect(condition(waiting, 'Scheduled')).toMatchObject({ status: 'False', message: expect.stringContaining(late) });
    expect(waiting.status).toMatchObject({ status: 'BUILD', vmState: 'building', taskState: 'scheduling' });
    expect(waiting.status?.node).toBeUndefined();

    await env.flavor('late', 1, 512);
    const s = await env.waitServer('late', 'ACTIVE', (x) => x.status?.status === 'ACTIVE');
    expect(condition(s, 'Scheduled')).toMatchObject({ status: 'True', reason: 'Scheduled' });
    expect(s.status).toMatchObject({ flavor: { name: late }, allocation: { ramMiB: 512 }, powerState: 'RUNNING' });
    expect(await env.node(s.status?.node).guestIds()).toContain(s.metadata!.uid);
  });
});

/** Waits until the named servers are ACTIVE or ERROR with no task. */
async function settled(names: readonly string[]): Promise<Srv[]> {
  return Promise.all(
    names.map((n) =>
      env.waitServer(
        n,
        'ACTIVE or ERROR',
        (s) => (s.status?.status === 'ACTIVE' || s.status?.status === 'ERROR') && !s.status.taskState,
        60_000,
      ),
    ),
  );
}
