// Helpers for tests that talk to the local control plane started by vitest-setup.ts (or `npm run cluster -- up`).
import { KubeConfig } from '@kubernetes/client-node';
import { adminKubeconfigPath, clusterConfig, mintKubeconfig } from './controlplane.ts';

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

/**
 * Compacts etcd's history up to its current revision (etcd's JSON gateway, /v3/kv/compaction), so a watch
 * from an old resourceVersion really gets 410 Gone — on a young cluster nothing has been compacted yet.
 */
export async function compactEtcd(): Promise<number> {
  const base = `http://127.0.0.1:${clusterConfig().etcdPort}`;
  const post = async (path: string, body: unknown) => {
    const res = await fetch(`${base}${path}`, { method: 'POST', body: JSON.stringify(body) });
    if (!res.ok) throw new Error(`etcd ${path}: HTTP ${res.status} ${await res.text()}`);
    return (await res.json()) as { header?: { revision?: string } };
  };
  const revision = (await post('/v3/kv/range', { key: 'AA==' })).header?.revision;
  if (!revision) throw new Error('etcd did not report its revision');
  await post('/v3/kv/compaction', { revision, physical: true });
  return Number(revision);
}
