// Two operator processes and one Lease: exactly one leads; when the leader is SIGKILLed the standby takes over only
// after the lease expired and never reconciles while the other leads. A leader SIGTERMed in the middle of a burst
// finishes its in-flight reconciles, releases the Lease and exits 0; its successor converges without duplicates.
import type { V1Lease } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { adminKubeConfig } from '../../../e2e/controlplane/testenv.ts';
import { installCRDs } from '../../src/crdgen/install.ts';
import { KubeClient } from '../../src/runtime/index.ts';
import {
  cleanupProjects,
  createProjects,
  deleteLease,
  HoldingProxy,
  isReady,
  killAllOperators,
  LEASE_NAMESPACE,
  type LogLine,
  listProjects,
  NAMESPACES,
  type OperatorProcess,
  PROJECT_FINALIZER,
  PROJECT_LABEL,
  readLease,
  recordWatch,
  runId,
  startOperator,
  waitFor,
  waitProjectsReady,
} from './harness.ts';

const kc = adminKubeConfig();
const client = new KubeClient(kc);
const runs: string[] = [];
const leases: string[] = [];

beforeAll(async () => {
  await installCRDs(kc);
});

afterAll(async () => {
  await killAllOperators();
  for (const r of runs) await cleanupProjects(client, r);
  for (const l of leases) await deleteLease(client, l);
});

const isReconcileLine = (l: LogLine) => typeof l.reconcileID === 'string';

/** Leadership intervals [start, end] from a process's log; an interval still open ends at `openEnd`. */
function leadership(op: OperatorProcess, openEnd: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  let start: number | undefined;
  for (const l of op.lines) {
    if (l.msg === 'successfully acquired lease') start = l.t;
    if ((l.msg === 'leadership released' || l.msg === 'leader election lost') && start !== undefined) {
      out.push([start, l.t]);
      start = undefined;
    }
  }
  if (start !== undefined) out.push([start, openEnd]);
  return out;
}

describe('operator processes: leader election', () => {
  it('elects one leader; after SIGKILL the standby takes over once the lease expired; never two leaders', {
    timeout: 120_000,
  }, async () => {
    const RUN = runId('le');
    runs.push(RUN);
    leases.push(RUN);
    const timing = { leaseDurationSeconds: 4, renewDeadlineSeconds: 3, retryPeriodSeconds: 1 };
    const leaseWatch = await recordWatch<V1Lease>(
      kc,
      `/apis/coordination.k8s.io/v1/namespaces/${LEASE_NAMESPACE}/leases`,
      { fieldSelector: `metadata.name=${RUN}` },
    );
    // Started together: both race to create the Lease.
    const [a, b] = await Promise.all(
      ['a', 'b'].map((s) => startOperator({ leaseName: RUN, identity: `${RUN}-${s}`, logLevel: 'debug', ...timing })),
    );
    const both = [a!, b!];
    await Promise.all(both.map((o) => o.waitForLog('attempting to acquire leader lease', 60_000)));
    const leader = await waitFor(
      'a leader',
      () => both.find((o) => o.logs('leading: controllers started').length > 0),
      30_000,
    );
    const standby = leader === a ? b! : a!;

    // Exactly one reports leader_election_master_status 1; the Lease names it.
    const status = async (o: OperatorProcess) =>
      (await o.metrics()).value('leader_election_master_status', { name: RUN });
    expect(await status(leader)).toBe(1);
    expect(await status(standby)).toBe(0);
    expect((await readLease(client, RUN)).spec?.holderIdentity).toBe(leader.identity);

    // The leader reconciles; the standby (warm caches) does not.
    const first = Array.from({ length: 5 }, (_, i) => `${RUN}-first-${i}`);
    await createProjects(client, first, RUN);
    await waitProjectsReady(client, RUN, first, 60_000);
    expect(leader.logs((l) => isReconcileLine(l) && first.includes(l.key ?? '')).length).toBeGreaterThanOrEqual(5);
    expect(standby.logs(isReconcileLine)).toEqual([]);
    expect(await status(standby)).toBe(0);

    // SIGKILL the leader: the standby takes over once the lease has expired (how soon is a fake-clock unit test of
    // the LeaderElector; here only the order of things is asserted).
    const killedAt = await leader.kill();
    const leading = await standby.waitForLog('leading: controllers started', 30_000);
    console.log(`takeover after SIGKILL: ${leading.t - killedAt} ms (lease 4 s, retry 1 s)`);
    expect(standby.logs('lease expired; taking over').length).toBeGreaterThan(0);
    expect(await status(standby)).toBe(1);

    // The new leader serves a new Project.
    const second = [`${RUN}-second`];
    await createProjects(client, second, RUN);
    await waitProjectsReady(client, RUN, second, 30_000);
    expect(standby.logs((l) => isReconcileLine(l) && l.key === second[0]).length).toBeGreaterThanOrEqual(1);
    expect(leader.logs((l) => l.key === second[0])).toEqual([]);

    // The Lease went from one holder to the other once, and only after the old holder's last renewal had expired.
    leaseWatch.stop();
    expect(leaseWatch.failed()).toBeUndefined();
    const seen = leaseWatch.events.filter((e) => e.type !== 'DELETED').map((e) => e.object.spec!);
    const holders = seen.map((s) => s.holderIdentity).filter((h, i, all) => i === 0 || h !== all[i - 1]);
    expect(holders).toEqual([leader.identity, standby.identity]);
    const lastRenewal = Math.max(
      ...seen.filter((s) => s.holderIdentity === leader.identity).map((s) => new Date(s.renewTime!).getTime()),
    );
    const takenOver = seen.find((s) => s.holderIdentity === standby.identity)!;
    expect(new Date(takenOver.acquireTime!).getTime() - lastRenewal).toBeGreaterThanOrEqual(4000);
    expect(takenOver.leaseTransitions).toBe(
      (seen.find((s) => s.holderIdentity === leader.identity)!.leaseTransitions ?? 0) + 1,
    );

    // Never two leaders: the leadership intervals from both logs do not overlap, and every reconcile line of each
    // process falls inside its own intervals (the killed one has none after its death).
    const now = Date.now();
    const iv = new Map(both.map((o) => [o, leadership(o, o === leader ? killedAt : now)]));
    expect(iv.get(leader)).toHaveLength(1);
    expect(iv.get(standby)).toHaveLength(1);
    const [[, e1]] = iv.get(leader)! as [[number, number]];
    const [[s2]] = iv.get(standby)! as [[number, number]];
    expect(e1).toBeLessThan(s2);
    for (const o of both) {
      const inside = (t: number) => iv.get(o)!.some(([s, e]) => t >= s && t <= e);
      const outside = o.logs((l) => isReconcileLine(l) && !inside(l.t));
      expect(outside.map((l) => `${l.time} ${l.msg} ${l.key}`)).toEqual([]);
    }
    expect(leader.logs((l) => l.t > killedAt)).toEqual([]);
    await standby.terminate();
  });

  it('a leader cut off from the API server stops leading (and exits 1) before the standby takes over', {
    timeout: 90_000,
  }, async () => {
    const RUN = runId('part');
    runs.push(RUN);
    leases.push(RUN);
    const timing = {
      leaseDurationSeconds: 4,
      renewDeadlineSeconds: 3,
      retryPeriodSeconds: 1,
      logLevel: 'debug' as const,
    };
    const proxy = new HoldingProxy(kc.getCurrentCluster()!.server, false);
    await proxy.listen();
    try {
      const leaseWatch = await recordWatch<V1Lease>(
        kc,
        `/apis/coordination.k8s.io/v1/namespaces/${LEASE_NAMESPACE}/leases`,
        { fieldSelector: `metadata.name=${RUN}` },
      );
      const a = await startOperator({
        leaseName: RUN,
        identity: `${RUN}-a`,
        kubeconfig: proxy.kubeconfig(),
        ...timing,
      });
      await a.waitForLog('leading: controllers started', 60_000);
      const b = await startOperator({ leaseName: RUN, identity: `${RUN}-b`, ...timing });
      await b.waitForLog('attempting to acquire leader lease', 60_000);
      const first = [`${RUN}-first`];
      await createProjects(client, first, RUN);
      await waitProjectsReady(client, RUN, first, 30_000);

      // Partition the leader: its renewals fail; it must give up (renew deadline 3 s) before the lease expires (4 s).
      proxy.cut();
      const cutAt = Date.now();
      const lost = await a.waitForLog('leader election lost', 30_000);
      expect(lost.reason).toBe('renew-deadline');
      expect((await a.exited).code).toBe(1); // a replica that lost its lease exits, to come back as a candidate
      const acquired = await b.waitForLog('successfully acquired lease', 30_000);
      console.log(
        `partition: leader gave up after ${lost.t - cutAt} ms, standby acquired after ${acquired.t - cutAt} ms`,
      );
      expect(lost.t).toBeLessThan(acquired.t);
      // (a reconcile still waiting on the cut-off API server is aborted when leadership ends, which it logs: that
      // is the end of old work, not new work)
      expect(a.logs((l) => isReconcileLine(l) && l.t > lost.t && l.msg !== 'reconcile aborted while stopping')).toEqual(
        [],
      );
      expect(b.logs((l) => isReconcileLine(l) && l.t < acquired.t)).toEqual([]);

      const second = [`${RUN}-second`];
      await createProjects(client, second, RUN);
      await waitProjectsReady(client, RUN, second, 30_000);
      leaseWatch.stop();
      const seen = leaseWatch.events.map((e) => e.object.spec!);
      const lastRenewal = Math.max(
        ...seen.filter((s) => s.holderIdentity === a.identity).map((s) => new Date(s.renewTime!).getTime()),
      );
      const takenOver = seen.find((s) => s.holderIdentity === b.identity)!;
      expect(new Date(takenOver.acquireTime!).getTime() - lastRenewal).toBeGreaterThanOrEqual(4000);
      expect(lost.t).toBeLessThan(lastRenewal + 4000);
      await b.terminate();
    } finally {
      await proxy.close();
    }
  });

  it('SIGTERM mid-burst: exits 0 within the deadline and releases the Lease; a successor converges, no duplicates', {
    timeout: 180_000,
  }, async () => {
    const RUN = runId('term');
    runs.push(RUN);
    leases.push(RUN);
    const names = Array.from({ length: 200 }, (_, i) => `${RUN}-${String(i).padStart(3, '0')}`);
    const nameSet = new Set(names);
    const graceS = 10;
    // Default lease timing (15 s): a successor leading sooner than that proves the Lease was released.
    const op1 = await startOperator({ leaseName: RUN, gracefulShutdownSeconds: graceS, logLevel: 'debug' });
    await op1.waitForLog('leading: controllers started', 60_000);

    const creating = createProjects(client, names, RUN, { concurrency: 25 });
    await waitFor('40 namespaces created', () => op1.logs('created the project namespace').length >= 40, 60_000, 20);
    const termAt = op1.signal('SIGTERM');
    const exit = await op1.exited;
    const readyAtExit = (await listProjects(client, RUN)).filter(isReady).length;
    console.log(`SIGTERM → exit ${exit.code} after ${exit.at - termAt} ms; ${readyAtExit}/200 Ready at exit`);
    // (That stop() keeps its deadline is a fake-clock unit test of the Manager.)
    expect(exit.code).toBe(0);
    expect(readyAtExit).toBeLessThan(200); // it really was mid-burst
    for (const msg of ['signal received; shutting down', 'stopping', 'leadership released', 'stopped']) {
      expect(op1.logs(msg), msg).toHaveLength(1);
    }
    expect(op1.logs('some reconciles did not finish before the shutdown deadline')).toEqual([]);
    // (a reconcile may fail and be retried under load; nothing else may go wrong)
    expect(op1.logs((l) => l.level === 'error' && l.msg !== 'reconciler error')).toEqual([]);
    expect(op1.logs('reconcile aborted while stopping')).toEqual([]);
    // Only reconciles already in flight finish after the stop began: nothing new is taken. Per controller that is
    // at most its worker count, as each controller logged it when it started.
    const stopping = op1.logs('stopping')[0]!;
    const after = op1.lines.slice(op1.lines.indexOf(stopping)).filter(isReconcileLine);
    const workers: Record<string, number> = Object.fromEntries(
      op1.logs('starting workers').map((l) => [String(l.controller), Number(l.workers)]),
    );
    expect(workers.project).toBe(4); // --project-concurrency's default
    const inFlight = new Map<string, Set<string>>();
    for (const l of after) {
      const c = String(l.controller);
      inFlight.set(c, (inFlight.get(c) ?? new Set()).add(String(l.reconcileID)));
    }
    for (const [c, ids] of inFlight)
      expect(ids.size, `${c} reconciles after the stop`).toBeLessThanOrEqual(workers[c] ?? 0);
    const lease = await readLease(client, RUN);
    expect(lease.spec?.holderIdentity ?? '').toBe('');

    await creating;
    const op2 = await startOperator({ leaseName: RUN, gracefulShutdownSeconds: graceS });
    await op2.waitForLog('leading: controllers started', 60_000);
    // The released Lease is taken at once: no waiting for a foreign holder's lease to expire.
    expect(op2.logs('lease expired; taking over')).toEqual([]);
    const projects = await waitProjectsReady(client, RUN, names, 120_000);
    await op2.settle();

    // No duplicates: one finalizer per Project, one namespace per Project, none for a Project that does not exist.
    for (const p of projects) expect(p.metadata.finalizers).toEqual([PROJECT_FINALIZER]);
    const all = (await client.listAll(NAMESPACES, { labelSelector: PROJECT_LABEL })).items;
    const ours = all.filter((ns) => ns.metadata?.labels?.[PROJECT_LABEL]?.startsWith(`${RUN}-`));
    const owners = ours.map((ns) => ns.metadata!.labels![PROJECT_LABEL]!);
    expect(ours.filter((ns) => !nameSet.has(ns.metadata!.labels![PROJECT_LABEL]!))).toEqual([]);
    expect(new Set(owners).size).toBe(owners.length);
    expect(owners.length).toBe(200);
    for (const ns of ours) expect(ns.metadata!.name).toBe(ns.metadata!.labels![PROJECT_LABEL]);
    const e2 = await op2.terminate();
    expect(e2.code).toBe(0);
  });
});
