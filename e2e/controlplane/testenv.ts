// Helpers for tests that talk to the local control plane started by vitest-setup.ts (or `npm run cluster -- up`).
import { KubeConfig } from '@kubernetes/client-node';
import { adminKubeconfigPath, mintKubeconfig } from './controlplane.ts';

export {
  helmPath,
  kubectlPath,
  mintKubeconfig,
  restartApiserver,
  startApiserver,
  stopApiserver,
} from './controlplane.ts';

/** Path of the admin kubeconfig: $STRATUS_KUBECONFIG (set by the global setup) or the state-dir default. */
export function adminKubeconfigFile(): string {
  return process.env.STRATUS_KUBECONFIG || adminKubeconfigPath();
}

/** A KubeConfig for the cluster admin (CN=stratus-admin, O=system:masters). */
export function adminKubeConfig(): KubeConfig {
  const kc = new KubeConfig();
  kc.loadFromFile(adminKubeconfigFile());
  return kc;
}

/** A KubeConfig authenticating as `user` in `groups` via a freshly minted client certificate (no RBAC grants). */
export async function userKubeConfig(user: string, groups: readonly string[] = []): Promise<KubeConfig> {
  const kc = new KubeConfig();
  kc.loadFromFile(await mintKubeconfig(user, groups));
  return kc;
}
