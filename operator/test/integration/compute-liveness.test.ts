// Node liveness by Lease (as kubelets do): the agent renews coordination.k8s.io Lease stratus-agent-<node> every
// heartbeat instead of rewriting the Hypervisor status, and the operator judges up/down by WHEN it observed the
// renewals, never by the times written in them (another host's clock).
import type { V1Lease } from '@kubernetes/client-node';
import { PatchStrategy } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NODE_LEASE_NAMESPACE, nodeLeaseName } from '../../src/api/index.ts';
import { leaseGVR } from '../../src/runtime/index.ts';
import { ComputeEnv, type FakeNode, GRACE_SECONDS, sleep, waitFor } from './compute-env.ts';

const env = new ComputeEnv('live');
let node: FakeNode;
const DOWN_WITHIN_MS = (GRACE_SECONDS + 10) * 1000;

beforeAll(async () => {
  await env.setup();
  [node] = (await env.startNodes(1, 'n', { slots: 2 })) as [FakeNode];
  await env.startOperator();
  await env.waitNodesUp();
});

afterAll(async () => {
  await env.teardown();
});

const readLease = () => env.client.get<V1Lease>(leaseGVR, nodeLeaseName(node.name), NODE_LEASE_NAMESPACE);
const state = async () => (await env.hypervisor(node.name)).status?.state;
/** A renewal as an agent whose clock says `at` would write it. */
const renew = (at: string) =>
  env.client.patch(
    leaseGVR,
    nodeLeaseName(node.name),
    NODE_LEASE_NAMESPACE,
    { spec: { renewTime: at } },
    PatchStrategy.MergePatch,
  );

describe('node liveness by Lease', () => {
  it('the agent renews its Lease; the Hypervisor status is not rewritten just to say it is alive', async () => {
    const lease = await readLease();
    expect(lease.spec?.holderIdentity).toBe(node.name);
    const hvBefore = await env.hypervisor(node.name);
    expect(Object.keys(hvBefore.status ?? {})).not.toContain('lastHeartbeatTime');
    // Three renewals later (heartbeat 1 s) the Hypervisor is the same object version.
    const seen = new Set([lease.spec?.renewTime?.toString()]);
    await waitFor('three lease renewals', async () => {
      seen.add((await readLease()).spec?.renewTime?.toString());
      return seen.size >= 4;
    });
    const hvAfter = await env.hypervisor(node.name);
    expect(hvAfter.metadata?.resourceVersion).toBe(hvBefore.metadata?.resourceVersion);
    expect(hvAfter.status?.state).toBe('up');
  });

  it('renewals keep a node up whatever time they carry; without renewals it goes down after the grace period', async () => {
    await node.stop(); // the agent's own renewals stop; we renew "as the node" with a badly skewed clock
    const states: Array<string | undefined> = [];
    // Renew every second for twice the grace period, with renewTime far in the past or the future.
    for (let i = 0; i < 2 * GRACE_SECONDS; i++) {
      await renew(i % 2 === 0 ? `1970-01-01T00:00:0${i % 10}.000000Z` : `2999-12-31T23:59:5${i % 10}.000000Z`);
      await sleep(1000); // the simulated node's heartbeat period, not a synchronisation
      states.push(await state());
    }
    expect(states.every((s) => s === 'up')).toBe(true);
    // A last renewal that claims to come from the far future does not keep the node up beyond the grace period.
    await renew('2999-12-31T23:59:59.999999Z');
    await waitFor(`${node.name} down`, async () => (await state()) === 'down', DOWN_WITHIN_MS);
    // One renewal (time far in the past) is observed now: up again.
    await renew('1970-01-01T00:00:00.000001Z');
    await waitFor(`${node.name} up again`, async () => (await state()) === 'up', DOWN_WITHIN_MS);
  });
});
