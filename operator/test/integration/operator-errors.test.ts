// The operator process with failing reconciles: a bad spec (a reserved namespace) ends as Ready=False InvalidSpec
// and is not retried; a reconcile that throws (namespace creation refused by a ValidatingAdmissionPolicy) is retried
// with exponentially growing delays, visible in the work queue and controller metrics, and recovers once the API
// accepts the namespace; neither holds up other Projects.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { adminKubeConfig } from '../../../e2e/controlplane/testenv.ts';
import type { Project } from '../../src/api/index.ts';
import { installCRDs } from '../../src/crdgen/install.ts';
import { type GVR, KubeClient } from '../../src/runtime/index.ts';
import {
  cleanupProjects,
  createProjects,
  deleteLease,
  killAllOperators,
  type LogLine,
  NAMESPACES,
  type OperatorProcess,
  PROJECT_LABEL,
  PROJECTS,
  projectManifest,
  readyCondition,
  runId,
  startOperator,
  waitFor,
  waitProjectsReady,
} from './harness.ts';

const RUN = runId('errs');
const DENY = `deny-${RUN.slice(-6)}`; // namespaces named `${DENY}-*` are refused while the policy exists
const POLICY = `stratus-test-${DENY}`;
const VAP: GVR = { group: 'admissionregistration.k8s.io', version: 'v1', plural: 'validatingadmissionpolicies' };
const VAPB: GVR = { group: 'admissionregistration.k8s.io', version: 'v1', plural: 'validatingadmissionpolicybindings' };
const kc = adminKubeConfig();
const client = new KubeClient(kc);
let op: OperatorProcess;

async function deletePolicy(): Promise<void> {
  await client.delete(VAPB, POLICY).catch(() => {});
  await client.delete(VAP, POLICY).catch(() => {});
}

/** Whether the API server currently refuses a namespace named `${DENY}-probe` (dry run). */
async function probeRefused(): Promise<boolean> {
  try {
    await client.create(
      NAMESPACES,
      { apiVersion: 'v1', kind: 'Namespace', metadata: { name: `${DENY}-probe` } },
      { dryRun: true },
    );
    return false;
  } catch (e) {
    if (String(e).includes('refused by a test policy')) return true;
    throw e;
  }
}

beforeAll(async () => {
  await installCRDs(kc);
  op = await startOperator({ leaseName: RUN, logLevel: 'debug' });
  await op.waitForLog('leading: controllers started', 60_000);
});

afterAll(async () => {
  await deletePolicy();
  await killAllOperators();
  await cleanupProjects(client, RUN);
  await deleteLease(client, RUN);
});

describe('operator process: failing reconciles', () => {
  it('reports a reserved namespace as InvalidSpec without retrying, while other Projects become Ready', async () => {
    const bad = `${RUN}-bad`;
    const good = Array.from({ length: 10 }, (_, i) => `${RUN}-ok-${i}`);
    await Promise.all([
      client.create(PROJECTS, projectManifest(bad, RUN, { namespace: 'kube-system' })),
      createProjects(client, good, RUN, { concurrency: 10 }),
    ]);
    await waitProjectsReady(client, RUN, good, 60_000);
    const failed = await waitFor(
      `${bad} to report InvalidSpec`,
      async () => {
        const p = await client.get<Project>(PROJECTS, bad);
        return readyCondition(p)?.reason === 'InvalidSpec' ? p : undefined;
      },
      30_000,
    );
    expect(readyCondition(failed)).toMatchObject({
      status: 'False',
      reason: 'InvalidSpec',
      message: 'namespace kube-system is reserved and cannot be owned by a project',
    });
    expect(failed.status?.phase).toBe('Failed');
    expect(failed.metadata.finalizers ?? []).toEqual([]);
    const kubeSystem = await client.get(NAMESPACES, 'kube-system');
    expect(kubeSystem.metadata?.labels?.[PROJECT_LABEL]).toBeUndefined();

    // Not retried: once the controller is idle, every reconcile of that key has ended in plain success (no error, no
    // requeue, no requeueAfter), so nothing is scheduled for it and only a new event could bring it back.
    await op.settle();
    const outcomes = op
      .logs((l) => typeof l.reconcileID === 'string' && l.key === bad && /^reconcile(r)? /.test(String(l.msg)))
      .map((l) => l.msg);
    expect(outcomes.length).toBeGreaterThanOrEqual(1);
    expect(outcomes).toEqual(outcomes.map(() => 'reconcile succeeded'));
    expect(op.logs((l) => l.level === 'error' && l.key === bad)).toEqual([]);
  });

  it('retries a failing reconcile through the rate limiter, counts it in metrics and recovers', {
    timeout: 120_000,
  }, async () => {
    await client.create(VAP, {
      apiVersion: 'admissionregistration.k8s.io/v1',
      kind: 'ValidatingAdmissionPolicy',
      metadata: { name: POLICY },
      spec: {
        failurePolicy: 'Fail',
        matchConstraints: {
          resourceRules: [{ apiGroups: [''], apiVersions: ['v1'], operations: ['CREATE'], resources: ['namespaces'] }],
        },
        validations: [
          {
            expression: `!object.metadata.name.startsWith('${DENY}-')`,
            message: `namespaces named ${DENY}-* are refused by a test policy`,
          },
        ],
      },
    });
    await client.create(VAPB, {
      apiVersion: 'admissionregistration.k8s.io/v1',
      kind: 'ValidatingAdmissionPolicyBinding',
      metadata: { name: POLICY },
      spec: { policyName: POLICY, validationActions: ['Deny'] },
    });
    await waitFor('the admission policy to take effect', probeRefused, 30_000, 250);

    const key = `${DENY}-x`;
    const along = Array.from({ length: 5 }, (_, i) => `${RUN}-along-${i}`);
    const m0 = await op.settle();
    await Promise.all([
      client.create(PROJECTS, projectManifest(key, RUN)),
      createProjects(client, along, RUN, { concurrency: 5 }),
    ]);
    const errorsOf = () => op.logs((l: LogLine) => l.msg === 'reconciler error' && l.key === key);
    // Created alongside, the others become Ready while this key keeps failing.
    await waitProjectsReady(client, RUN, along, 60_000);
    await waitFor('10 failed reconciles', () => errorsOf().length >= 10, 60_000);
    const m1 = await op.metrics();
    await waitFor('an 11th failed reconcile', () => errorsOf().length >= 11, 30_000);
    const m2 = await op.metrics();
    const failing = await client.get<Project>(PROJECTS, key);
    expect(readyCondition(failing)?.status).not.toBe('True');

    // Each failure is logged with the API server's refusal and the key's retry count 1, 2, 3, ...
    const errs = errorsOf();
    expect(errs.slice(0, 11).map((l) => l.retries)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    expect(JSON.stringify(errs[0]!.err)).toContain(`namespaces named ${DENY}-* are refused by a test policy`);
    // The retry count grows with each failure, so every retry went through the rate limiter (addRateLimited). Its
    // delays (5 ms doubling) are asserted on a fake clock in operator/src/runtime/controller.test.ts and
    // ratelimit.test.ts: wall-clock gaps here depend on the host's load, so they are only logged.
    const gaps = errs
      .slice(0, 11)
      .map((l, i, a) => (i === 0 ? 0 : l.t - a[i - 1]!.t))
      .slice(1);
    console.log(`gaps between failed reconciles (ms): ${gaps.join(', ')}`);

    // The failures are visible in the metrics, and keep growing.
    const d = (m: typeof m0, name: string, labels: Record<string, string>) =>
      m.sum(name, labels) - m0.sum(name, labels);
    expect(d(m1, 'workqueue_retries_total', { name: 'project' })).toBeGreaterThanOrEqual(10);
    expect(d(m1, 'controller_runtime_reconcile_errors_total', { controller: 'project' })).toBeGreaterThanOrEqual(10);
    expect(
      d(m1, 'controller_runtime_reconcile_total', { controller: 'project', result: 'error' }),
    ).toBeGreaterThanOrEqual(10);
    expect(m2.sum('workqueue_retries_total', { name: 'project' })).toBeGreaterThan(
      m1.sum('workqueue_retries_total', { name: 'project' }),
    );
    expect(m2.sum('controller_runtime_reconcile_errors_total', { controller: 'project' })).toBeGreaterThan(
      m1.sum('controller_runtime_reconcile_errors_total', { controller: 'project' }),
    );

    // Once the API server accepts the namespace, the next retry succeeds.
    await deletePolicy();
    await waitFor('the admission policy to be gone', async () => !(await probeRefused()), 30_000, 250);
    const [ready] = await waitProjectsReady(client, RUN, [key], 60_000);
    expect(ready!.status?.namespace).toBe(key);
    expect(op.running).toBe(true);
  });
});
