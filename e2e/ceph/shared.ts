// The Ceph cluster e2e test files share: started on first need by the first file that asks (sharedCeph), reused by
// the next ones (startCeph is idempotent and locked, so two clusters never run at once), and stopped at the end of
// the run by the e2e project's global teardown (e2e/ceph/vitest-setup.ts) when a test started it. A cluster started
// with `npm run ceph -- up` is used and left running.
import { existsSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { type CephCluster, defaultCephDir, startCeph, stopCeph } from './ceph.ts';

/** Address of the shared cluster: on its own port-less bridge, so simulated nodes can be routed to it. */
export const SHARED_CEPH_IP = process.env.STRATUS_CEPH_BIND_IP || '172.31.252.1';

const marker = (dir: string) => path.join(dir, 'started-by-tests');

export async function sharedCeph(log: (m: string) => void = (m) => console.error(m)): Promise<CephCluster> {
  const c = await startCeph({ bindIP: SHARED_CEPH_IP, log });
  if (c.started) await writeFile(marker(c.dir), String(process.pid));
  return c;
}

/** Stops the shared cluster if a test run started it (not `npm run ceph -- up`), unless STRATUS_KEEP_CEPH is set. */
export async function releaseSharedCeph(log: (m: string) => void = (m) => console.error(m)): Promise<void> {
  const dir = defaultCephDir();
  if (!existsSync(marker(dir))) return;
  if (process.env.STRATUS_KEEP_CEPH) {
    log('[ceph] STRATUS_KEEP_CEPH is set: leaving the test cluster running (npm run ceph -- down stops it)');
    return;
  }
  await stopCeph({ dir, log });
}

/**
 * Lets the QEMUs of a network lab's nodes (e2e/testing/netlab.ts) reach the cluster: the lab's underlay bridge gets
 * the address .254 of the nodes' /24, and each node a /32 route to the cluster's address through it (the packets
 * end in the root namespace, which holds the address on CEPH_IFACE). Removed with the lab.
 */
export function routeLabToCeph(
  lab: {
    underlay: string;
    nodes: { netns: string; hostIP: string }[];
    sh(netns: string | undefined, cmd: string, args: readonly string[]): string;
  },
  cluster: CephCluster,
): void {
  const first = lab.nodes[0];
  if (!first) return;
  const gw = first.hostIP.replace(/\.\d+$/, '.254');
  const cephIP = cluster.monHost.replace(/:\d+$/, '');
  try {
    lab.sh(undefined, 'ip', ['addr', 'add', `${gw}/24`, 'dev', lab.underlay]);
  } catch {
    // already there
  }
  for (const n of lab.nodes) lab.sh(n.netns, 'ip', ['route', 'replace', `${cephIP}/32`, 'via', gw]);
}
