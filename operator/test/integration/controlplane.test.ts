// The local control plane behaves like a real cluster: RBAC is enforced for client-certificate users, the garbage
// collector follows ownerReferences and the namespace controller empties and removes namespaces.
import { randomBytes } from 'node:crypto';
import { ApiException, CoreV1Api, RbacAuthorizationV1Api } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { adminKubeConfig, userKubeConfig } from '../../../e2e/controlplane/testenv.ts';
import { waitFor } from '../../../e2e/testing/wait.ts';

const suffix = randomBytes(3).toString('hex');
const created: string[] = [];

let core: CoreV1Api;
let rbac: RbacAuthorizationV1Api;

/** The HTTP status of a failed API call (0 when the call succeeded). */
async function statusOf(call: Promise<unknown>): Promise<number> {
  try {
    await call;
    return 0;
  } catch (err) {
    if (err instanceof ApiException) return err.code;
    throw err;
  }
}

/** Polls until `check` returns true (e2e/testing/wait.ts), failing with `what` after `timeoutMs`. */
async function eventually(what: string, check: () => Promise<boolean>, timeoutMs = 60_000): Promise<void> {
  await waitFor(what, check, timeoutMs, 250);
}

async function createNamespace(prefix: string): Promise<string> {
  const name = `${prefix}-${suffix}`;
  await core.createNamespace({ body: { metadata: { name } } });
  created.push(name);
  return name;
}

beforeAll(() => {
  expect(inject('kubeconfig')).toMatch(/admin\.kubeconfig$/);
  const kc = adminKubeConfig();
  core = kc.makeApiClient(CoreV1Api);
  rbac = kc.makeApiClient(RbacAuthorizationV1Api);
});

afterAll(async () => {
  for (const name of created) await statusOf(core.deleteNamespace({ name }));
});

describe('local control plane', () => {
  it('serves the admin user (system:masters)', async () => {
    const list = await core.listNamespace();
    expect(list.items.map((n) => n.metadata?.name)).toContain('kube-system');
  });

  it('authenticates minted users and enforces RBAC', async () => {
    const ns = await createNamespace('cp-rbac');
    const user = `cp-user-${suffix}`;
    const userCore = (await userKubeConfig(user, ['stratus:testers'])).makeApiClient(CoreV1Api);

    expect(await statusOf(userCore.listNamespace())).toBe(403);
    expect(await statusOf(userCore.listNamespacedConfigMap({ namespace: ns }))).toBe(403);

    await rbac.createNamespacedRole({
      namespace: ns,
      body: {
        metadata: { name: 'configmap-reader' },
        rules: [{ apiGroups: [''], resources: ['configmaps'], verbs: ['get', 'list', 'watch'] }],
      },
    });
    await rbac.createNamespacedRoleBinding({
      namespace: ns,
      body: {
        metadata: { name: 'configmap-reader' },
        roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name: 'configmap-reader' },
        subjects: [{ apiGroup: 'rbac.authorization.k8s.io', kind: 'User', name: user }],
      },
    });

    // The RBAC authorizer watches bindings: allow a moment for the new grant to be seen.
    await eventually('the RoleBinding to take effect', async () => {
      return (await statusOf(userCore.listNamespacedConfigMap({ namespace: ns }))) === 0;
    });
    // The grant is namespaced: cluster-wide listing and other namespaces stay forbidden.
    expect(await statusOf(userCore.listNamespace())).toBe(403);
    expect(await statusOf(userCore.listNamespacedConfigMap({ namespace: 'kube-system' }))).toBe(403);
    expect(
      await statusOf(userCore.createNamespacedConfigMap({ namespace: ns, body: { metadata: { name: 'x' } } })),
    ).toBe(403);
  });

  it('garbage-collects dependents after their owner is deleted', async () => {
    const ns = await createNamespace('cp-gc');
    const owner = await core.createNamespacedConfigMap({ namespace: ns, body: { metadata: { name: 'owner' } } });
    await core.createNamespacedConfigMap({
      namespace: ns,
      body: {
        metadata: {
          name: 'dependent',
          ownerReferences: [{ apiVersion: 'v1', kind: 'ConfigMap', name: 'owner', uid: owner.metadata!.uid! }],
        },
        data: { hello: 'world' },
      },
    });
    await core.deleteNamespacedConfigMap({ namespace: ns, name: 'owner', propagationPolicy: 'Background' });
    await eventually('the garbage collector to delete the dependent ConfigMap', async () => {
      return (await statusOf(core.readNamespacedConfigMap({ namespace: ns, name: 'dependent' }))) === 404;
    });
  });

  it('empties and removes a deleted namespace', async () => {
    const ns = await createNamespace('cp-ns');
    await core.createNamespacedConfigMap({ namespace: ns, body: { metadata: { name: 'doomed' } } });
    // The serviceaccount controller gives every namespace a default ServiceAccount.
    await eventually('the default ServiceAccount', async () => {
      return (await statusOf(core.readNamespacedServiceAccount({ namespace: ns, name: 'default' }))) === 0;
    });

    await core.deleteNamespace({ name: ns });
    await eventually('the namespace to disappear', async () => {
      return (await statusOf(core.readNamespace({ name: ns }))) === 404;
    });
    expect(await statusOf(core.readNamespacedConfigMap({ namespace: ns, name: 'doomed' }))).toBe(404);
    const left = await core.listNamespacedConfigMap({ namespace: ns });
    expect(left.items).toEqual([]);
  });
});
