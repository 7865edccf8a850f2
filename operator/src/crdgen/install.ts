// Installs (or upgrades) the Stratus CRDs with server-side apply and waits until the API server
// serves them. Used by the operator's --install-crds flag and by the test harness.
import * as k8s from '@kubernetes/client-node';
import { ALL_KINDS } from '../api/index.ts';
import type { KindDefinition } from '../api/kind.ts';
import { buildCRD } from './crd.ts';

export const CRD_FIELD_MANAGER = 'stratus-crd-installer';

export async function installCRDs(
  kc: k8s.KubeConfig,
  kinds: readonly KindDefinition[] = ALL_KINDS,
  timeoutMs = 60_000,
): Promise<void> {
  const api = kc.makeApiClient(k8s.ApiextensionsV1Api);
  const ssa = k8s.setHeaderOptions('Content-Type', k8s.PatchStrategy.ServerSideApply);
  const names: string[] = [];
  for (const k of kinds) {
    const crd = buildCRD(k);
    names.push(crd.metadata.name);
    await api.patchCustomResourceDefinition(
      { name: crd.metadata.name, body: crd, fieldManager: CRD_FIELD_MANAGER, force: true },
      ssa,
    );
  }
  const deadline = Date.now() + timeoutMs;
  for (const name of names) {
    for (;;) {
      const crd = await api.readCustomResourceDefinition({ name });
      const established = crd.status?.conditions?.some((c) => c.type === 'Established' && c.status === 'True');
      if (established) break;
      if (Date.now() > deadline) throw new Error(`CRD ${name} not established after ${timeoutMs} ms`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}
