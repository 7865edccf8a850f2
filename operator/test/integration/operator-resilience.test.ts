// The operator process's HTTP endpoints and its recovery: /metrics with controller-runtime's metric names and labels,
// /healthz, /readyz (not ready until the caches synced, observed by holding its API connections in a proxy), and a
// kube-apiserver restart while Projects are being created, and a SIGTERM while the API server is unreachable.
import { PatchStrategy } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { adminKubeConfig, restartApiserver } from '../../../e2e/controlplane/testenv.ts';
import type { Project } from '../../src/api/index.ts';
import { installCRDs } from '../../src/crdgen/install.ts';
import { KubeClient } from '../../src/runtime/index.ts';
import {
  cleanupProjects,
  createProjects,
  deleteLease,
  HoldingProxy,
  killAllOperators,
  PROJECTS,
  projectManifest,
  readyCondition,
  runId,
  startOperator,
  waitFor,
  waitProjectsReady,
} from './harness.ts';

const kc = adminKubeConfig();
const client = new KubeClient(kc);
const runs: string[] = [];
const proxies: HoldingProxy[] = [];

beforeAll(async () => {
  await installCRDs(kc);
});

afterAll(async () => {
  await killAllOperators();
  for (const p of proxies) await p.close();
  for (const r of runs) {
    await cleanupProjects(client, r);
    await deleteLease(client, r);
  }
});

describe('operator process: HTTP endpoints', () => {
  it('answers /readyz 500 until its caches have synced, /healthz 200 throughout', async () => {
    const RUN = runId('readyz');
    runs.push(RUN);
    // Its API connections are held: it can list nothing, as with an API server that is slow to answer.
    const proxy = new HoldingProxy(kc.getCurrentCluster()!.server, true);
    proxies.push(proxy);
    await proxy.listen();
    // Without leader election: with it, main() first creates the Lease namespace, before the HTTP server starts.
    const op = await startOperator({ leaseName: RUN, kubeconfig: proxy.kubeconfig(), leaderElect: false });
    await waitFor('the HTTP endpoints', async () => (await op.http('/healthz')).status === 200, 30_000);
    const before = await op.http('/readyz');
    expect(before.status).toBe(500);
    expect(before.body).toContain('informers not synced');
    expect(before.body).toMatch(/identity\.stratus\.io\|v1alpha1\|projects/);
    expect(await op.http('/healthz')).toEqual({ status: 200, body: 'ok\n' });
    expect(op.logs('caches synced')).toEqual([]);
    expect((await op.metrics()).find('workqueue_depth', { name: 'project' })).toHaveLength(1);

    proxy.release();
    await op.waitForLog('leading: controllers started', 60_000);
    expect(await op.http('/readyz')).toEqual({ status: 200, body: 'ok\n' });
    expect(await op.http('/healthz')).toEqual({ status: 200, body: 'ok\n' });
    expect((await op.terminate()).code).toBe(0);
  });

  it('serves controller-runtime metrics with their labels', async () => {
    const RUN = runId('scrape');
    runs.push(RUN);
    const op = await startOperator({ leaseName: RUN });
    await op.waitForLog('leading: controllers started', 60_000);
    const names = [`${RUN}-0`, `${RUN}-1`];
    await createProjects(client, names, RUN);
    await waitProjectsReady(client, RUN, names, 60_000);
    const m = await op.settle();
    const q = { name: 'project', controller: 'project' };
    const c = { controller: 'project' };

    for (const result of ['success', 'error', 'requeue', 'requeue_after']) {
      expect(m.find('controller_runtime_reconcile_total', { ...c, result }), result).toHaveLength(1);
    }
    expect(m.value('controller_runtime_reconcile_total', { ...c, result: 'success' })).toBeGreaterThanOrEqual(2);
    const reconcileTime = m.find('controller_runtime_reconcile_time_seconds_bucket', c);
    expect(reconcileTime.map((s) => s.labels.le)).toEqual(expect.arrayContaining(['0.005', '1', '60', '+Inf']));
    expect(m.value('controller_runtime_reconcile_time_seconds_bucket', { ...c, le: '+Inf' })).toBe(
      m.sum('controller_runtime_reconcile_total', c),
    );
    expect(m.value('controller_runtime_reconcile_errors_total', c)).toBeGreaterThanOrEqual(0);
    expect(m.value('controller_runtime_max_concurrent_reconciles', c)).toBe(4);
    expect(m.value('controller_runtime_active_workers', c)).toBe(0);

    expect(m.value('workqueue_depth', q)).toBe(0);
    expect(m.value('workqueue_adds_total', q)).toBeGreaterThanOrEqual(2);
    expect(m.value('workqueue_retries_total', q)).toBeGreaterThanOrEqual(0);
    for (const h of ['workqueue_queue_duration_seconds', 'workqueue_work_duration_seconds']) {
      const buckets = m.find(`${h}_bucket`, q);
      expect(
        buckets.map((s) => s.labels.le),
        h,
      ).toEqual(expect.arrayContaining(['1e-8', '1', '+Inf']));
      expect(m.value(`${h}_count`, q), h).toBeGreaterThanOrEqual(2);
    }
    expect(m.value('workqueue_unfinished_work_seconds', q)).toBe(0);
    expect(m.value('workqueue_longest_running_processor_seconds', q)).toBe(0);
    expect(m.value('leader_election_master_status', { name: RUN })).toBe(1);
    expect(m.value('process_cpu_seconds_total')).toBeGreaterThan(0);
    for (const [name, type] of [
      ['controller_runtime_reconcile_total', 'counter'],
      ['controller_runtime_reconcile_time_seconds', 'histogram'],
      ['workqueue_depth', 'gauge'],
      ['workqueue_adds_total', 'counter'],
      ['workqueue_queue_duration_seconds', 'histogram'],
      ['workqueue_work_duration_seconds', 'histogram'],
      ['workqueue_retries_total', 'counter'],
      ['workqueue_unfinished_work_seconds', 'gauge'],
      ['workqueue_longest_running_processor_seconds', 'gauge'],
      ['leader_election_master_status', 'gauge'],
      ['process_cpu_seconds_total', 'counter'],
    ]) {
      expect(m.text).toContain(`# TYPE ${name} ${type}\n`);
    }
    expect(await op.http('/healthz')).toEqual({ status: 200, body: 'ok\n' });
    expect(await op.http('/readyz')).toEqual({ status: 200, body: 'ok\n' });
    expect((await op.http('/nope')).status).toBe(404);
    expect((await op.terminate()).code).toBe(0);
  });
});

describe('operator process: kube-apiserver restart', () => {
  // Leader election stays on, as in a cluster: the elector's renewals fail during the restart along with the informers'
  // watches and in-flight reconciles, and all must recover. The restart leaves no API server for 6-8 s here (3 s of
  // SIGTERM grace, then a cold start), too close to the default 10 s renew deadline: a longer outage correctly makes
  // the leader step down and exit (the partition test covers that). So the lease is 30 s and the renew deadline 20 s.
  it('keeps running through a restart in the middle of a batch and converges', { timeout: 180_000 }, async () => {
    const RUN = runId('restart');
    runs.push(RUN);
    const op = await startOperator({
      leaseName: RUN,
      leaseDurationSeconds: 30,
      renewDeadlineSeconds: 20,
      retryPeriodSeconds: 2,
    });
    await op.waitForLog('leading: controllers started', 60_000);
    const first = Array.from({ length: 20 }, (_, i) => `${RUN}-a${i}`);
    await createProjects(client, first, RUN);
    await waitProjectsReady(client, RUN, first, 60_000);

    const second = Array.from({ length: 60 }, (_, i) => `${RUN}-b${i}`);
    let created = 0;
    let createErrors = 0;
    const creating = createProjects(client, second, RUN, {
      concurrency: 5,
      retryUntil: Date.now() + 120_000,
      onCreated: () => created++,
      onError: () => createErrors++,
    });
    await waitFor('15 creates of the second batch', () => created >= 15, 30_000, 20);
    const t0 = Date.now();
    await restartApiserver();
    const restartS = (Date.now() - t0) / 1000;
    await creating;
    await waitProjectsReady(client, RUN, [...first, ...second], 120_000);
    const informerRestarts = op.logs('informer stopped by an error; restarting').length;
    const failedRenewals = op.logs((l) => /^error (reading|updating) lease$/.test(l.msg)).length;
    console.log(
      `apiserver restart took ${restartS.toFixed(1)} s; ${createErrors} failed creates retried; ` +
        `${created - 15} created after the restart began; ${informerRestarts} informer restarts, ` +
        `${failedRenewals} failed lease renewals`,
    );

    expect(op.running).toBe(true);
    expect(createErrors).toBeGreaterThan(0); // the API server really was gone for a while
    expect(informerRestarts).toBeGreaterThan(0); // and the operator noticed: its watches failed,
    expect(failedRenewals).toBeGreaterThan(0); // and so did renewing its Lease
    expect(op.logs((l) => /leader(ship| election) lost/.test(l.msg))).toEqual([]);
    expect(await op.http('/healthz')).toEqual({ status: 200, body: 'ok\n' });
    expect(await op.http('/readyz')).toEqual({ status: 200, body: 'ok\n' });
    expect((await op.metrics()).value('leader_election_master_status', { name: RUN })).toBe(1);
    expect((await op.terminate()).code).toBe(0);
  });
});

describe('operator process: SIGTERM while the API server is unreachable', () => {
  it('still exits 0 within the graceful shutdown deadline', { timeout: 90_000 }, async () => {
    const RUN = runId('cutterm');
    runs.push(RUN);
    const proxy = new HoldingProxy(kc.getCurrentCluster()!.server, false);
    proxies.push(proxy);
    await proxy.listen();
    const graceS = 5;
    const op = await startOperator({
      leaseName: RUN,
      kubeconfig: proxy.kubeconfig(),
      leaseDurationSeconds: 4,
      renewDeadlineSeconds: 3,
      retryPeriodSeconds: 1,
      gracefulShutdownSeconds: graceS,
      logLevel: 'debug',
    });
    await op.waitForLog('leading: controllers started', 60_000);
    // A Project asking for another one's namespace gets a NamespaceConflict warning Event on every reconcile; the
    // repeat becomes an Event series whose count is written later (or on shutdown).
    const owner = `${RUN}-owner`;
    const squatter = `${RUN}-squatter`;
    await client.create(PROJECTS, projectManifest(owner, RUN));
    await waitProjectsReady(client, RUN, [owner], 30_000);
    await client.create(PROJECTS, projectManifest(squatter, RUN, { namespace: owner }));
    const reconciled = (n: number) => () =>
      op.logs((l) => l.key === squatter && l.msg === 'reconcile succeeded').length >= n;
    await waitFor('the conflict', reconciled(1), 30_000);
    await client.patch(
      PROJECTS,
      squatter,
      undefined,
      { metadata: { labels: { touched: '1' } } },
      PatchStrategy.MergePatch,
    );
    await waitFor('the conflict again', reconciled(2), 30_000);
    const p = await client.get<Project>(PROJECTS, squatter);
    expect(readyCondition(p)?.reason).toBe('NamespaceConflict');

    // Cut the operator off (connections dropped, new ones never answered), then SIGTERM: the Lease release and the
    // pending Event series write cannot succeed, but neither may hold the process beyond its deadline.
    proxy.cut();
    const termAt = op.signal('SIGTERM');
    const exit = await op.exited;
    console.log(`SIGTERM while cut off: exit ${exit.code} after ${exit.at - termAt} ms (deadline ${graceS} s)`);
    // That it returns at its deadline is the Manager's fake-clock unit test (stop() waits for pending Event writes
    // only until the deadline); here: it exits cleanly although nothing could be written.
    expect(exit.code).toBe(0);
    expect(op.logs('stopped')).toHaveLength(1);
  });
});
