// Installs (or upgrades) the Stratus CRDs with server-side apply and waits until the API server
// serves them. Used by the operator's --install-crds flag and by the test harness.
import * as k8s from '@kubernetes/client-node';
import { ALL_KINDS } from '../api/index.ts';
import type { KindDefinition } from '../api/kind.ts';
import { admissionPolicies } from './admission.ts';
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

/** Installs (or upgrades) the admission policies (admission.ts) with server-side apply. */
export async function installAdmissionPolicies(kc: k8s.KubeConfig): Promise<void> {
  const api = kc.makeApiClient(k8s.AdmissionregistrationV1Api);
  const ssa = k8s.setHeaderOptions('Content-Type', k8s.PatchStrategy.ServerSideApply);
  for (const p of admissionPolicies()) {
    const name = (p.metadata as { name: string }).name;
    if (p.kind === 'ValidatingAdmissionPolicy') {
      await api.patchValidatingAdmissionPolicy(
        { name, body: p as unknown as k8s.V1ValidatingAdmissionPolicy, fieldManager: CRD_FIELD_MANAGER, force: true },
        ssa,
      );
    } else {
      await api.patchValidatingAdmissionPolicyBinding(
        {
          name,
          body: p as unknown as k8s.V1ValidatingAdmissionPolicyBinding,
          fieldManager: CRD_FIELD_MANAGER,
          force: true,
        },
        ssa,
      );
    }
  }
}
