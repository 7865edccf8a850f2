// vitest globalSetup for the integration and e2e projects: starts the local control plane once per run (unless it is
// already running) and hands the admin kubeconfig path to the tests. Tests read it with `inject('kubeconfig')` or,
// outside vitest's context, from process.env.STRATUS_KUBECONFIG (workers inherit the environment set here).
//
// Teardown stops the cluster only when it was started by a test run (not by `npm run cluster -- up`), no other
// test run is still using it, and STRATUS_KEEP_CLUSTER is unset.
import type { TestProject } from 'vitest/node';
import { acquireCluster, releaseCluster } from './controlplane.ts';

declare module 'vitest' {
  export interface ProvidedContext {
    /** Path of the admin kubeconfig (CN=stratus-admin, O=system:masters). */
    kubeconfig: string;
    /** https://127.0.0.1:<port> of kube-apiserver. */
    apiserverUrl: string;
  }
}

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const log = (m: string) => console.error(`[controlplane] ${m}`);
  const res = await acquireCluster({ log });
  if (res.started.length > 0) log(`ready in ${res.seconds.toFixed(1)} s (started ${res.started.join(', ')})`);
  process.env.STRATUS_KUBECONFIG = res.kubeconfig;
  process.env.STRATUS_APISERVER_URL = res.server;
  project.provide('kubeconfig', res.kubeconfig);
  project.provide('apiserverUrl', res.server);
  return async () => {
    await releaseCluster({ keep: Boolean(process.env.STRATUS_KEEP_CLUSTER), log });
  };
}
