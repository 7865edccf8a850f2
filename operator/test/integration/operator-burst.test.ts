// The operator process under a burst: 500 Projects created at once all become Ready through one deduplicating
// work queue (fewer reconciles than watch events), then deleting all of them releases every finalizer, each only
// after the project's namespace is gone.
import type { V1Namespace } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { adminKubeConfig } from '../../../e2e/controlplane/testenv.ts';
import type { Project } from '../../src/api/index.ts';
import { installCRDs } from '../../src/crdgen/install.ts';
import { KubeClient } from '../../src/runtime/index.ts';
import {
  cleanupProjects,
  createProjects,
  deleteLease,
  killAllOperators,
  listProjects,
  NAMESPACES,
  type OperatorProcess,
  PROJECT_FINALIZER,
  PROJECT_LABEL,
  PROJECTS,
  pool,
  projectNamespaces,
  RUN_LABEL,
  recordWatch,
  runId,
  startOperator,
  waitFor,
  waitProjectsReady,
} from './harness.ts';

const N = 500;
const RUN = runId('burst');
const names = Array.from({ length: N }, (_, i) => `${RUN}-${String(i).padStart(3, '0')}`);
const nameSet = new Set(names);
const kc = adminKubeConfig();
const client = new KubeClient(kc);
let op: OperatorProcess;

beforeAll(async () => {
  await installCRDs(kc);
  op = await startOperator({ leaseName: RUN, logLevel: 'debug' }); // debug: a line per reconcile, with its key
  await op.waitForLog('leading: controllers started', 60_000);
});

afterAll(async () => {
  await killAllOperators();
  await cleanupProjects(client, RUN);
  await deleteLease(client, RUN);
});

const rv = (o: { metadata?: { resourceVersion?: string } }) => Number(o.metadata?.resourceVersion);

describe('operator process: a burst of 500 Projects', () => {
  it('makes all 500 Ready with fewer reconciles than watch events (deduplication)', { timeout: 240_000 }, async () => {
    const before = await op.settle(); // leftovers of other runs reconciled: a clean baseline
    const projectsPath = '/apis/identity.stratus.io/v1alpha1/projects';
    const listed = await client.list(PROJECTS, { labelSelector: `${RUN_LABEL}=${RUN}` });
    const projectEvents = await recordWatch<Project>(kc, projectsPath, {
      labelSelector: `${RUN_LABEL}=${RUN}`,
      resourceVersion: listed.metadata!.resourceVersion!,
    });
    const nsList = await client.list(NAMESPACES, { labelSelector: PROJECT_LABEL, limit: 1 });
    const nsEvents = await recordWatch<V1Namespace>(kc, '/api/v1/namespaces', {
      labelSelector: PROJECT_LABEL,
      resourceVersion: nsList.metadata!.resourceVersion!,
    });

    const t0 = Date.now();
    await createProjects(client, names, RUN, { concurrency: 25 });
    const createdS = (Date.now() - t0) / 1000;
    const projects = await waitProjectsReady(client, RUN, names, 180_000);
    const readyS = (Date.now() - t0) / 1000;
    const after = await op.settle();
    projectEvents.stop();
    nsEvents.stop();

    // Every Project: Active, Ready, one finalizer, its namespace recorded; every namespace owned by its Project.
    for (const p of projects) {
      expect(p.metadata.finalizers).toEqual([PROJECT_FINALIZER]);
      expect(p.status?.phase).toBe('Active');
      expect(p.status?.namespace).toBe(p.metadata.name);
      expect(p.status?.observedGeneration).toBe(p.metadata.generation);
    }
    const nss = await projectNamespaces(client, nameSet);
    expect(nss).toHaveLength(N);
    const uid = new Map(projects.map((p) => [p.metadata.name, p.metadata.uid]));
    for (const ns of nss) {
      const owner = ns.metadata!.labels![PROJECT_LABEL]!;
      expect(ns.metadata!.name).toBe(owner);
      expect(ns.metadata!.ownerReferences).toEqual([
        expect.objectContaining({ kind: 'Project', name: owner, uid: uid.get(owner), controller: true }),
      ]);
    }

    // Dedup: the watch events the API produced for these objects (each Project: added, finalizer patched, status
    // written; each namespace: added) far outnumber the reconciles the operator ran for them.
    expect(projectEvents.failed()).toBeUndefined();
    expect(nsEvents.failed()).toBeUndefined();
    const isOurs = (o: { metadata?: { name?: string } }) => nameSet.has(o.metadata?.name ?? '');
    const pEvents = projectEvents.events.filter((e) => e.type === 'ADDED' || e.type === 'MODIFIED');
    const nEvents = nsEvents.events.filter(
      (e) =>
        (e.type === 'ADDED' || e.type === 'MODIFIED') && nameSet.has(e.object.metadata?.labels?.[PROJECT_LABEL] ?? ''),
    );
    expect(pEvents.filter((e) => e.type === 'ADDED')).toHaveLength(N);
    expect(pEvents.length).toBeGreaterThanOrEqual(3 * N);
    expect(nEvents.filter((e) => e.type === 'ADDED' && isOurs(e.object))).toHaveLength(N);
    const events = pEvents.length + nEvents.length;

    const delta = (name: string, labels: Record<string, string>) => after.sum(name, labels) - before.sum(name, labels);
    const reconciles = delta('controller_runtime_reconcile_total', { controller: 'project' });
    const adds = delta('workqueue_adds_total', { name: 'project' });
    const errors = delta('controller_runtime_reconcile_errors_total', { controller: 'project' });
    // The operator's own log agrees: reconciles of these keys (distinct reconcile IDs) are within the metric.
    const ours = new Set(
      op
        .logs((l) => typeof l.reconcileID === 'string' && nameSet.has(l.key ?? '') && l.t >= t0)
        .map((l) => l.reconcileID),
    ).size;
    console.log(
      `burst of ${N}: created in ${createdS.toFixed(1)} s, all Ready after ${readyS.toFixed(1)} s; ` +
        `watch events ${events} (projects ${pEvents.length}, namespaces ${nEvents.length}), ` +
        `reconciles ${reconciles} (of these keys: ${ours}), queue adds ${adds}, reconcile errors ${errors}`,
    );
    expect(ours).toBeGreaterThanOrEqual(N);
    expect(ours).toBeLessThanOrEqual(reconciles);
    expect(reconciles).toBeLessThan(pEvents.length);
    expect(reconciles).toBeLessThan(events);
    expect(adds).toBeGreaterThanOrEqual(reconciles);
    expect(op.running).toBe(true);
  });

  it('deleting all 500 deletes every namespace and releases each finalizer only after its namespace is gone', {
    timeout: 420_000,
  }, async () => {
    const listed = await client.list(PROJECTS, { labelSelector: `${RUN_LABEL}=${RUN}` });
    const projectEvents = await recordWatch<Project>(kc, '/apis/identity.stratus.io/v1alpha1/projects', {
      labelSelector: `${RUN_LABEL}=${RUN}`,
      resourceVersion: listed.metadata!.resourceVersion!,
    });
    const nsList = await client.list(NAMESPACES, { labelSelector: PROJECT_LABEL, limit: 1 });
    const nsEvents = await recordWatch<V1Namespace>(kc, '/api/v1/namespaces', {
      labelSelector: PROJECT_LABEL,
      resourceVersion: nsList.metadata!.resourceVersion!,
    });
    const t0 = Date.now();
    await pool(names, 25, async (n) => {
      await client.delete(PROJECTS, n);
    });
    // The operator deletes every namespace (the API server's namespace controller then empties and removes them).
    await waitFor(
      'every project namespace to be deleting',
      async () => (await projectNamespaces(client, nameSet)).every((ns) => ns.metadata?.deletionTimestamp),
      120_000,
      1000,
    );
    const allDeletingS = (Date.now() - t0) / 1000;
    let left = N;
    await waitFor(
      'every project and namespace to be gone',
      async () => {
        left = (await listProjects(client, RUN)).length + (await projectNamespaces(client, nameSet)).length;
        return left === 0;
      },
      380_000,
      2000,
    ).catch((e: unknown) => {
      throw new Error(`${String(e)} (${left} left)`);
    });
    const goneS = (Date.now() - t0) / 1000;
    projectEvents.stop();
    nsEvents.stop();
    expect(projectEvents.failed()).toBeUndefined();
    expect(nsEvents.failed()).toBeUndefined();

    // resourceVersions of one etcd are ordered: each namespace was removed before its Project's finalizer let go.
    const nsGone = new Map(
      nsEvents.events.filter((e) => e.type === 'DELETED').map((e) => [e.object.metadata!.name!, rv(e.object)]),
    );
    const projectGone = projectEvents.events.filter((e) => e.type === 'DELETED');
    expect(projectGone).toHaveLength(N);
    const early = projectGone.filter((e) => !(rv(e.object) > (nsGone.get(e.object.metadata.name!) ?? Infinity)));
    expect(early.map((e) => e.object.metadata.name)).toEqual([]);
    // While deleting, the operator reported it on each Project.
    const terminating = new Set(
      projectEvents.events
        .filter((e) => e.object.status?.phase === 'Terminating' && e.object.metadata.deletionTimestamp)
        .map((e) => e.object.metadata.name),
    );
    expect(terminating.size).toBe(N);
    console.log(
      `deleting ${N}: every namespace deleting after ${allDeletingS.toFixed(1)} s, all gone after ${goneS.toFixed(1)} s`,
    );
    expect(op.running).toBe(true);
  });
});
