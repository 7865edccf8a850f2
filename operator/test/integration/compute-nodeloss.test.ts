// A node whose agent stops reporting: the operator marks its Hypervisor down and its servers NOSTATE /
// HypervisorUp=False, deletes and moves nothing, and recovers when the agent reports again. Deleting a server on a
// down node is a local delete; the agent destroys the orphaned guest when it comes back.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GUEST_FINALIZER, SERVER_NODE_LABEL } from '../../src/api/index.ts';
import { ComputeEnv, condition, type FakeNode, GRACE_SECONDS, type Srv, waitFor } from './compute-env.ts';

const env = new ComputeEnv('loss');
let lost: FakeNode;
let other: FakeNode;
let small = '';
const ON_LOST = ['lost-0', 'lost-1'];
const DOWN_WITHIN_MS = (GRACE_SECONDS + 10) * 1000;

beforeAll(async () => {
  await env.setup();
  [lost, other] = (await env.startNodes(2, 'n', { slots: 4 })) as [FakeNode, FakeNode];
  small = await env.flavor('small', 1, 1024);
  await env.startOperator();
  await env.waitNodesUp();
  for (const n of ON_LOST) await env.createServer(n, { flavor: small, node: lost.name });
  await env.createServer('safe', { flavor: small, node: other.name });
  await env.waitSettled(3);
});

afterAll(async () => {
  await env.teardown();
});

const hypervisorUp = (s: Srv) => condition(s, 'HypervisorUp');

describe('node loss', () => {
  let before: Srv[] = [];

  it('the agent stops: its Hypervisor goes down, its servers get NOSTATE and HypervisorUp=False', async () => {
    before = await Promise.all(ON_LOST.map((n) => env.server(n)));
    for (const s of before) expect(s.status).toMatchObject({ status: 'ACTIVE', powerState: 'RUNNING' });
    await lost.stop();
    await waitFor(
      `${lost.name} down`,
      async () => (await env.hypervisor(lost.name)).status?.state === 'down',
      DOWN_WITHIN_MS,
    );
    for (const n of ON_LOST) {
      const s = await env.waitServer(
        n,
        'NOSTATE and HypervisorUp=False',
        (x) => x.status?.powerState === 'NOSTATE' && hypervisorUp(x)?.status === 'False',
        DOWN_WITHIN_MS,
      );
      expect(hypervisorUp(s)).toMatchObject({ reason: 'HeartbeatExpired' });
      await env.waitEvent(n, 'HypervisorDown', 'Warning');
    }
    expect((await env.hypervisor(other.name)).status?.state).toBe('up');
  });

  it('nothing is deleted or moved', async () => {
    for (const b of before) {
      const s = await env.server(b.metadata!.name!);
      expect(s.metadata?.uid).toBe(b.metadata?.uid);
      expect(s.metadata?.deletionTimestamp).toBeUndefined();
      expect(s.status?.node).toBe(lost.name);
      expect(s.metadata?.labels?.[SERVER_NODE_LABEL]).toBe(lost.name);
      expect(s.status).toMatchObject({ vmState: 'active', flavor: b.status?.flavor, allocation: b.status?.allocation });
    }
    expect((await lost.guestIds()).sort()).toEqual(before.map((s) => s.metadata!.uid!).sort());
    expect(await other.guestIds()).toHaveLength(1);
    const safe = await env.server('safe');
    expect(safe.status?.powerState).toBe('RUNNING');
    expect(hypervisorUp(safe)?.status).not.toBe('False');
  });

  it('the agent comes back: HypervisorUp=True and the real power state, same guests', async () => {
    const spawns = lost.driver.calls.filter((c) => c.op === 'spawn').length;
    await lost.start();
    await waitFor(`${lost.name} up`, async () => (await env.hypervisor(lost.name)).status?.state === 'up');
    for (const n of ON_LOST) {
      const s = await env.waitServer(
        n,
        'HypervisorUp=True and RUNNING',
        (x) => x.status?.powerState === 'RUNNING' && hypervisorUp(x)?.status === 'True',
      );
      expect(hypervisorUp(s)).toMatchObject({ reason: 'HeartbeatResumed' });
      expect(s.status).toMatchObject({ status: 'ACTIVE', node: lost.name });
    }
    expect(lost.driver.calls.filter((c) => c.op === 'spawn').length).toBe(spawns);
    expect((await lost.guestIds()).sort()).toEqual(before.map((s) => s.metadata!.uid!).sort());
  });

  it('deleting a server on a down node completes (local delete); the returning agent destroys the orphan', async () => {
    const victim = await env.server('lost-0');
    const id = victim.metadata!.uid!;
    await lost.stop();
    await waitFor(
      `${lost.name} down`,
      async () => (await env.hypervisor(lost.name)).status?.state === 'down',
      DOWN_WITHIN_MS,
    );
    await env.deleteServer('lost-0');
    await env.waitServerGone('lost-0');
    await env.waitEvent('lost-0', 'LocalDelete', 'Warning');
    expect(await lost.guestIds()).toContain(id); // the node was unreachable: its guest is still there

    await lost.start();
    await waitFor('orphaned guest destroyed', async () => !(await lost.guestIds()).includes(id));
    const kept = await env.waitServer('lost-1', 'back to RUNNING', (x) => hypervisorUp(x)?.status === 'True');
    expect(kept.metadata?.finalizers).toContain(GUEST_FINALIZER);
    expect(await lost.guestIds()).toEqual([kept.metadata!.uid]);
  });
});
