// Test cleanup against the shared API server: test files run one after another on one cluster, and an object a file
// leaves behind (a Volume whose finalizer nobody removes in a namespace being deleted) is reconciled by every later
// file's operator. A file therefore ends with its namespace really gone.
import { type KubernetesObject, PatchStrategy, type V1CustomResourceDefinition } from '@kubernetes/client-node';
import { type GVR, isNotFound, type KubeClient } from '../../operator/src/runtime/index.ts';
import { waitFor } from './wait.ts';

const CRDS: GVR = { group: 'apiextensions.k8s.io', version: 'v1', plural: 'customresourcedefinitions' };
const NAMESPACES: GVR = { group: '', version: 'v1', plural: 'namespaces' };

/** The namespaced kinds of our API groups (*.stratus.io), at their storage versions. */
async function stratusNamespacedKinds(client: KubeClient): Promise<GVR[]> {
  const crds = await client.list<V1CustomResourceDefinition>(CRDS);
  return (crds.items ?? [])
    .filter((c) => c.spec.group.endsWith('stratus.io') && c.spec.scope === 'Namespaced')
    .map((c) => ({
      group: c.spec.group,
      version: (c.spec.versions.find((v) => v.storage) ?? c.spec.versions[0]!).name,
      plural: c.spec.names.plural,
    }));
}

/**
 * Deletes a test namespace and waits until the API server no longer has it. Our objects in it lose their finalizers
 * (their controllers may be stopped already) and are deleted one by one, so no later operator finds them, adds a
 * finalizer and keeps the namespace, and its own test, busy.
 */
export async function deleteNamespaceFully(client: KubeClient, ns: string, timeoutMs = 60_000): Promise<void> {
  const kinds = await stratusNamespacedKinds(client);
  const ignoreNotFound = (e: unknown) => {
    if (!isNotFound(e)) throw e;
  };
  await client.delete(NAMESPACES, ns).catch(ignoreNotFound);
  await waitFor(
    `namespace ${ns} gone`,
    async () => {
      for (const gvr of kinds) {
        const items = (await client.list<KubernetesObject>(gvr, { namespace: ns })).items ?? [];
        for (const o of items) {
          const name = o.metadata!.name!;
          if (o.metadata?.finalizers?.length) {
            await client
              .patch(gvr, name, ns, { metadata: { finalizers: null } }, PatchStrategy.MergePatch)
              .catch(ignoreNotFound);
          }
          // An attached Volume may not be deleted (the operator's admission policy, Cinder's rule): with no operator
          // left to detach it, its record of attachments goes first.
          if ((o as { status?: { attachments?: unknown[] } }).status?.attachments?.length) {
            await client
              .patch(gvr, name, ns, { status: { attachments: null } }, PatchStrategy.MergePatch, {
                subresource: 'status',
              })
              .catch(ignoreNotFound);
          }
          if (!o.metadata?.deletionTimestamp) await client.delete(gvr, name, ns).catch(ignoreNotFound);
        }
      }
      try {
        await client.get(NAMESPACES, ns);
        return false;
      } catch (e) {
        if (isNotFound(e)) return true;
        throw e;
      }
    },
    timeoutMs,
    250,
  );
}
