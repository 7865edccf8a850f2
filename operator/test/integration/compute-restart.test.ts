// The operator is killed (SIGKILL of a child process) in the middle of a burst of server creations, while binding
// writes are in flight; a fresh operator takes over from what the API holds. Capacity must be booked exactly once:
// the right number of ACTIVE and ERROR servers, no host over-committed, no server bound twice, one guest per server.
import { Watch } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SERVER_NODE_LABEL, ServerKind } from '../../src/api/index.ts';
import {
  allocatableOf,
  allocationsByNode,
  ComputeEnv,
  condition,
  type FakeNode,
  type Srv,
  sleep,
} from './compute-env.ts';

const env = new ComputeEnv('kill');
let nodes: FakeNode[];
let small = '';
const SLOTS = 6;
const NODES = 5;
const SERVERS = 40;
const CAPACITY = SLOTS * NODES; // 30

beforeAll(async () => {
  await env.setup();
  nodes = await env.startNodes(NODES, 'n', { slots: SLOTS });
  small = await env.flavor('small', 1, 1024);
});

afterAll(async () => {
  await env.teardown();
});

describe('operator killed mid-burst', () => {
  let servers: Srv[] = [];

  it(`${SERVERS} servers with room for ${CAPACITY}: kill the operator half way, a new one finishes the job`, async () => {
    const child = await env.startChildOperator();
    try {
      await env.waitNodesUp();
      const names = Array.from({ length: SERVERS }, (_, i) => `s-${String(i).padStart(2, '0')}`);
      // Kill when a quarter is bound and a binding is half written (status, not yet the label), or at half at the
      // latest: reconciles (finalizer, status, label) are in flight then.
      const bound = new Set<string>();
      let killedAt = '';
      let onKill: () => void = () => {};
      const killed = new Promise<void>((r) => {
        onKill = r;
      });
      const watch = await new Watch(env.client.kubeConfig).watch(
        `/apis/${ServerKind.group}/${ServerKind.version}/namespaces/${env.ns}/servers`,
        {},
        (_type: string, obj: Srv) => {
          if (!obj.status?.node || killedAt) return;
          bound.add(obj.metadata!.name!);
          const halfWritten = obj.metadata?.labels?.[SERVER_NODE_LABEL] === undefined;
          if ((halfWritten && bound.size >= SERVERS / 4) || bound.size >= SERVERS / 2) {
            child.child.kill('SIGKILL');
            killedAt = `${bound.size} bound${halfWritten ? `, ${obj.metadata!.name} without its label` : ''}`;
            onKill();
          }
        },
        () => onKill(),
      );
      await env.createServers(names, { flavor: small });
      await Promise.race([killed, sleep(60_000)]);
      watch.abort();
      expect(killedAt).not.toBe('');
      await child.kill();
      const snapshot = await env.servers();
      const done = snapshot.filter((s) => s.status?.node);
      const unlabelled = done.filter((s) => s.metadata?.labels?.[SERVER_NODE_LABEL] !== s.status?.node);
      console.info(
        `killed at ${killedAt}; after the kill ${done.length} bound, ${unlabelled.length} without their label`,
      );
      expect(done.length).toBeLessThan(SERVERS); // the kill really interrupted the burst
    } finally {
      await child.kill();
    }

    await env.startOperator(`${env.id}-successor`);
    servers = await env.waitSettled(SERVERS, 120_000);
    expect(servers.filter((s) => s.status?.status === 'ACTIVE')).toHaveLength(CAPACITY);
    expect(servers.filter((s) => s.status?.status === 'ERROR')).toHaveLength(SERVERS - CAPACITY);
  });

  it('the ERROR ones failed scheduling for lack of RAM and are bound nowhere', () => {
    for (const s of servers.filter((x) => x.status?.status === 'ERROR')) {
      expect(condition(s, 'Scheduled')).toMatchObject({ status: 'False', reason: 'NoValidHost' });
      expect(s.status?.fault?.message).toMatch(/^No valid host was found: \d+ hosts; .*RamFilter removed 5 \(0 left\)/);
      expect(s.status?.node).toBeUndefined();
      expect(s.metadata?.labels?.[SERVER_NODE_LABEL]).toBeUndefined();
    }
  });

  it('no double booking: allocations within allocatable, each server bound once, one guest per ACTIVE server', async () => {
    const active = servers.filter((s) => s.status?.status === 'ACTIVE');
    const books = allocationsByNode(servers);
    for (const nd of nodes) {
      const book = books.get(nd.name);
      const limit = allocatableOf(await env.hypervisor(nd.name));
      expect(book?.servers, nd.name).toBe(SLOTS);
      expect(book!.ramMiB, nd.name).toBeLessThanOrEqual(limit.ramMiB);
      expect(book!.vcpus, nd.name).toBeLessThanOrEqual(limit.vcpus);
      expect(book!.diskGiB, nd.name).toBeLessThanOrEqual(limit.diskGiB);
    }
    for (const s of active) {
      expect(s.metadata?.labels?.[SERVER_NODE_LABEL], s.metadata?.name).toBe(s.status?.node);
      expect(
        s.status?.actions?.filter((a) => a.action === 'create'),
        s.metadata?.name,
      ).toEqual([expect.objectContaining({ result: 'Success' })]);
    }
    // the drivers together run exactly one guest per ACTIVE server, on the server's node
    const guests: { node: string; id: string }[] = [];
    for (const nd of nodes) for (const id of await nd.guestIds()) guests.push({ node: nd.name, id });
    expect(guests).toHaveLength(CAPACITY);
    expect(new Set(guests.map((g) => g.id)).size).toBe(CAPACITY);
    const where = new Map(active.map((s) => [s.metadata!.uid!, s.status!.node]));
    for (const g of guests) expect(where.get(g.id), g.id).toBe(g.node);
    for (const nd of nodes) expect(nd.driver.calls.filter((c) => c.op === 'spawn')).toHaveLength(SLOTS);
  });
});
