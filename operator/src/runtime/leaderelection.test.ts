import { ApiException } from '@kubernetes/client-node';
import { Registry } from 'prom-client';
import { describe, expect, it } from 'vitest';
import { FakeClock, sleep } from './clock.ts';
import { LeaderElector, type LeaderElectorOptions, type LeaseStore } from './leaderelection.ts';
import { runtimeMetrics } from './metrics.ts';
import { FakeLeaseStore, metricValue } from './testing.ts';

function elector(store: LeaseStore, clock: FakeClock, identity: string, extra: Partial<LeaderElectorOptions> = {}) {
  const events: string[] = [];
  let signal: AbortSignal | undefined;
  const e = new LeaderElector({
    leaseName: 'op',
    leaseNamespace: 'sys',
    identity,
    store,
    clock,
    onStartedLeading: (s) => {
      signal = s;
      events.push('started');
    },
    onStoppedLeading: () => events.push('stopped'),
    ...extra,
  });
  return { e, events, signal: () => signal };
}

describe('LeaderElector', () => {
  it('creates the Lease when absent and leads; times are MicroTime with 6 fractional digits', async () => {
    const clock = new FakeClock();
    const store = new FakeLeaseStore();
    const registry = new Registry();
    const { e, events } = elector(store, clock, 'me', { metrics: runtimeMetrics(registry) });
    const run = e.run();
    await clock.advance(0);
    expect(e.isLeader()).toBe(true);
    expect(events).toEqual(['started']);
    expect(store.lease?.spec).toMatchObject({ holderIdentity: 'me', leaseDurationSeconds: 15, leaseTransitions: 0 });
    expect(String(store.lease?.spec?.renewTime)).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$/);
    expect(String(store.lease?.spec?.acquireTime)).toMatch(/\.\d{6}Z$/);
    expect(await metricValue(registry, 'leader_election_master_status', { name: 'op' })).toBe(1);
    // Renews every retryPeriod, keeping acquireTime and transitions.
    await clock.advance(2000);
    expect(store.writes.length).toBe(2);
    expect(store.lease?.spec?.acquireTime).toBe(store.writes[0]!.spec?.acquireTime);
    expect(store.lease?.spec?.renewTime).not.toBe(store.writes[0]!.spec?.renewTime);
    await e.stop();
    expect(await run).toBe('stopped');
    expect(await metricValue(registry, 'leader_election_master_status', { name: 'op' })).toBe(0);
  });

  it('takes over a foreign Lease only after its resourceVersion stayed unchanged for leaseDuration locally', async () => {
    const clock = new FakeClock();
    const store = new FakeLeaseStore();
    // The holder's timestamps are irrelevant (its clock may be skewed): only local observation counts.
    store.setHolder('other', { renewTime: '2000-01-01T00:00:00.000000Z' as never });
    const { e } = elector(store, clock, 'me');
    void e.run();
    await clock.advance(14_000);
    expect(e.isLeader()).toBe(false);
    expect(e.observedLeader()).toBe('other');
    expect(store.lease?.spec?.holderIdentity).toBe('other');
    await clock.advance(2000);
    expect(e.isLeader()).toBe(true);
    expect(store.lease?.spec).toMatchObject({ holderIdentity: 'me', leaseTransitions: 5 });
    await e.stop();
  });

  it('never takes over while the holder keeps renewing', async () => {
    const clock = new FakeClock();
    const store = new FakeLeaseStore();
    store.setHolder('other');
    const { e } = elector(store, clock, 'me');
    void e.run();
    for (let i = 0; i < 30; i++) {
      await clock.advance(2000);
      store.setHolder('other'); // a renewal: new resourceVersion
    }
    expect(e.isLeader()).toBe(false);
    await e.stop();
    expect(store.lease?.spec?.holderIdentity).toBe('other'); // stop without leading writes nothing
  });

  it('a 409 when creating means another candidate won the race', async () => {
    const clock = new FakeClock();
    const store = new FakeLeaseStore();
    const realCreate = store.create.bind(store);
    store.create = async (l) => {
      store.setHolder('racer'); // the racer creates it first
      store.create = realCreate;
      return realCreate(l);
    };
    const { e } = elector(store, clock, 'me');
    void e.run();
    await clock.advance(0);
    expect(e.isLeader()).toBe(false);
    await clock.advance(4000);
    expect(e.isLeader()).toBe(false);
    expect(store.lease?.spec?.holderIdentity).toBe('racer');
    await e.stop();
  });

  it('loses leadership at once when a renewal conflicts with another holder', async () => {
    const clock = new FakeClock();
    const store = new FakeLeaseStore();
    const { e, events, signal } = elector(store, clock, 'me');
    const run = e.run();
    await clock.advance(0);
    expect(e.isLeader()).toBe(true);
    // Someone takes the lease between our read and our write.
    store.failReplace = () => {
      store.failReplace = undefined;
      store.setHolder('usurper');
      return undefined;
    };
    await clock.advance(2000);
    expect(e.isLeader()).toBe(false);
    expect(signal()?.aborted).toBe(true);
    expect(events).toEqual(['started', 'stopped']);
    expect(await run).toBe('taken-over');
    expect(store.lease?.spec?.holderIdentity).toBe('usurper');
  });

  it('a renewal conflict on a Lease still ours is retried, not a loss', async () => {
    const clock = new FakeClock();
    const store = new FakeLeaseStore();
    const { e } = elector(store, clock, 'me');
    void e.run();
    await clock.advance(0);
    let conflicts = 0;
    store.failReplace = () => {
      if (conflicts++ > 0) return undefined;
      return new ApiException(409, 'conflict', { reason: 'Conflict' }, {});
    };
    await clock.advance(4000);
    expect(e.isLeader()).toBe(true);
    expect(store.lease?.spec?.holderIdentity).toBe('me');
    await e.stop();
  });

  it('stops leading when renewals fail for renewDeadline (errors or a hung request)', async () => {
    for (const failure of [new ApiException(500, 'etcd down', {}, {}), 'hang' as const]) {
      const clock = new FakeClock();
      const store = new FakeLeaseStore();
      const { e, events, signal } = elector(store, clock, 'me');
      const run = e.run();
      await clock.advance(0);
      const lastGood = clock.now();
      store.failReplace = () => failure;
      await clock.advance(9_999);
      expect(e.isLeader()).toBe(true);
      await clock.advance(1);
      expect(clock.now() - lastGood).toBe(10_000);
      expect(e.isLeader()).toBe(false);
      expect(signal()?.aborted).toBe(true);
      expect(events).toEqual(['started', 'stopped']);
      expect(await run).toBe('renew-deadline');
    }
  });

  it('the renew deadline runs from when the last renewal was sent, not from its (late) answer', async () => {
    const clock = new FakeClock();
    const store = new FakeLeaseStore();
    const { e, events, signal } = elector(store, clock, 'me');
    const run = e.run();
    await clock.advance(0);
    expect(e.isLeader()).toBe(true);
    // The next renewal is sent at t=2 s and answered only at t=9 s; later renewals hang.
    const realReplace = store.replace.bind(store);
    let sentAt: number | undefined;
    store.replace = async (l) => {
      if (sentAt !== undefined) return new Promise(() => {});
      sentAt = clock.now();
      await sleep(clock, 7000);
      return realReplace(l);
    };
    await clock.advance(9000);
    expect(sentAt).toBe(Date.UTC(2026, 0, 1) + 2000);
    expect(e.isLeader()).toBe(true);
    // Others count the lease duration from when they saw that renewal, which may be as early as its sending.
    await clock.advance(sentAt! + e.renewDeadlineMs - 1 - clock.now());
    expect(e.isLeader()).toBe(true);
    await clock.advance(1);
    expect(e.isLeader()).toBe(false);
    expect(signal()?.aborted).toBe(true);
    expect(events).toEqual(['started', 'stopped']);
    expect(await run).toBe('renew-deadline');
  });

  it('stop({ release: false }) ends leadership but leaves the Lease to expire', async () => {
    const clock = new FakeClock();
    const store = new FakeLeaseStore();
    const { e, events, signal } = elector(store, clock, 'me');
    const run = e.run();
    await clock.advance(0);
    const writes = store.writes.length;
    await e.stop({ release: false });
    expect(await run).toBe('stopped');
    expect(events).toEqual(['started', 'stopped']);
    expect(signal()?.aborted).toBe(true);
    expect(store.writes).toHaveLength(writes);
    expect(store.lease?.spec?.holderIdentity).toBe('me');
  });

  it('releases the Lease on stop so a successor acquires it without waiting for expiry', async () => {
    const clock = new FakeClock();
    const store = new FakeLeaseStore();
    const a = elector(store, clock, 'a');
    const b = elector(store, clock, 'b');
    void a.e.run();
    await clock.advance(0);
    void b.e.run();
    await clock.advance(6000);
    expect([a.e.isLeader(), b.e.isLeader()]).toEqual([true, false]);
    await a.e.stop();
    expect(a.events).toEqual(['started', 'stopped']);
    expect(store.lease?.spec).toMatchObject({ holderIdentity: '', leaseDurationSeconds: 1 });
    await clock.advance(2000); // one retry period, far less than the 15 s lease duration
    expect(b.e.isLeader()).toBe(true);
    expect(store.lease?.spec).toMatchObject({ holderIdentity: 'b', leaseTransitions: 1 });
    await b.e.stop();
  });

  it('with two candidates exactly one leads; the other takes over only after the leader dies and the lease expires', async () => {
    const clock = new FakeClock();
    const store = new FakeLeaseStore();
    const a = elector(store, clock, 'a');
    const b = elector(store, clock, 'b');
    void a.e.run();
    void b.e.run();
    await clock.advance(10_000);
    expect([a.e.isLeader(), b.e.isLeader()].filter(Boolean).length).toBe(1);
    const [leader, follower] = a.e.isLeader() ? [a, b] : [b, a];
    // "Kill" the leader: its writes hang from now on (no release).
    store.failReplace = (l) => (l.spec?.holderIdentity === leader.e.identity ? 'hang' : undefined);
    const killedAt = clock.now();
    while (!follower.e.isLeader()) await clock.advance(1000);
    const took = clock.now() - killedAt;
    expect(took).toBeGreaterThanOrEqual(15_000 - 2000);
    expect(took).toBeLessThanOrEqual(15_000 + 2000);
    expect(leader.e.isLeader()).toBe(false); // its renew deadline passed first
    await follower.e.stop();
    await leader.e.stop();
  });

  it('validates timing settings', () => {
    const store = new FakeLeaseStore();
    const base = { leaseName: 'x', leaseNamespace: 'y', store };
    expect(() => new LeaderElector({ ...base, leaseDurationMs: 10_000, renewDeadlineMs: 10_000 })).toThrow();
    expect(() => new LeaderElector({ ...base, renewDeadlineMs: 2000, retryPeriodMs: 2000 })).toThrow();
    expect(new LeaderElector(base).identity).toMatch(/_[0-9a-f-]{36}$/);
  });
});
