// A real node (containerd + runc + CNI from Debian, kubelet + kube-proxy from the control plane's Go module) joins the
// local control plane: it becomes Ready, runs a Deployment on the pod network and a privileged hostNetwork+hostPID
// DaemonSet, serves `kubectl logs`/`exec` through the API server's kubelet client certificate (the kubelet on
// Webhook authn/authz), gives pods the API through the `kubernetes` Service with plain in-cluster config, and leaves
// nothing behind when stopped. Needs root; run under `flock /tmp/stratus-e2e.lock`.
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { kubectlPath } from '../controlplane/build.ts';
import { mintKubeconfig } from '../controlplane/controlplane.ts';
import { exists, probe, run } from '../controlplane/util.ts';
import { type RealNode, startNode } from '../node/node.ts';
import { ensureTestImages, type TestImages } from '../node/testimages.ts';
import { waitFor } from '../testing/wait.ts';

const log = (m: string) => console.error(`[node] ${m}`);
const NS = 'node-e2e';

describe('real kubelet node', () => {
  let images: TestImages;
  let node: RealNode | undefined;
  let stopped = false;
  let hadVarLibKubelet = true;

  const kubectl = async (args: string[], input?: string): Promise<string> => {
    if (!node) throw new Error('no node');
    const env = { ...process.env, KUBECONFIG: node.kubeconfig };
    return (await run(kubectlPath(), args, { env, input, timeoutMs: 60_000 })).stdout;
  };
  const getJson = async <T>(args: string[]): Promise<T> => JSON.parse(await kubectl([...args, '-o', 'json'])) as T;

  interface PodList {
    items: {
      metadata: { name: string };
      spec: { nodeName?: string };
      status: { phase?: string; podIP?: string; conditions?: { type: string; status: string }[] };
    }[];
  }
  const readyPods = async (selector: string, want: number) =>
    waitFor(
      `${want} Ready pods ${selector}`,
      async () => {
        const pods = await getJson<PodList>(['-n', NS, 'get', 'pods', '-l', selector]);
        const ready = pods.items.filter((p) =>
          p.status.conditions?.some((c) => c.type === 'Ready' && c.status === 'True'),
        );
        return ready.length === want ? ready : undefined;
      },
      120_000,
      200,
    );

  beforeAll(async () => {
    images = await ensureTestImages();
    hadVarLibKubelet = await exists('/var/lib/kubelet');
    node = await startNode({ pauseArchive: images.pause.archive, images: [images.busybox.archive], log });
    log(`node ${node.name} Ready ${node.readySeconds.toFixed(1)} s after its kubelet started`);
    // A namespace left by an interrupted run (its pods were bound to a node of the same name).
    await kubectl(['delete', 'namespace', NS, '--ignore-not-found', '--wait', '--timeout=120s']);
    await kubectl(['create', 'namespace', NS]);
  }, 600_000);

  afterAll(async () => {
    if (node && !stopped) {
      await kubectl(['delete', 'namespace', NS, '--wait=false']).catch(() => {});
      await node.stop();
    }
  }, 300_000);

  it('is Ready, untainted, with the containerd runtime and its InternalIP', async () => {
    const n = await getJson<{
      spec: { taints?: unknown[] };
      status: { nodeInfo: { containerRuntimeVersion: string }; addresses: { type: string; address: string }[] };
    }>(['get', 'node', node?.name as string]);
    expect(n.status.nodeInfo.containerRuntimeVersion).toMatch(/^containerd:\/\//);
    expect(n.status.addresses).toContainEqual({ type: 'InternalIP', address: node?.nodeIP });
    // The node-lifecycle controller removes the not-ready taint the kubelet registers with.
    await waitFor('no taints', async () => {
      const cur = await getJson<{ spec: { taints?: unknown[] } }>(['get', 'node', node?.name as string]);
      return (cur.spec.taints ?? []).length === 0;
    });
  });

  it('the kubelet API refuses anonymous clients (401) and clients RBAC does not allow (403)', async () => {
    const url = `https://${node?.nodeIP}:${node?.kubeletPort}/pods`;
    expect((await probe(url, { insecure: true })).status).toBe(401);
    const kc = parse(await readFile(await mintKubeconfig('node-e2e-nobody'), 'utf8')) as {
      users: { user: Record<string, string> }[];
    };
    const user = kc.users[0]?.user ?? {};
    const b64 = (k: string) => Buffer.from(user[k] ?? '', 'base64');
    const res = await probe(url, {
      insecure: true,
      cert: b64('client-certificate-data'),
      key: b64('client-key-data'),
    });
    expect(res.status).toBe(403);
  });

  it('schedules and runs a 2-replica Deployment on the pod network', async () => {
    await kubectl(
      ['apply', '-f', '-'],
      JSON.stringify({
        apiVersion: 'apps/v1',
        kind: 'Deployment',
        metadata: { name: 'pause', namespace: NS },
        spec: {
          replicas: 2,
          selector: { matchLabels: { app: 'pause' } },
          template: {
            metadata: { labels: { app: 'pause' } },
            spec: {
              terminationGracePeriodSeconds: 1,
              containers: [{ name: 'pause', image: images.pause.ref, imagePullPolicy: 'Never' }],
            },
          },
        },
      }),
    );
    const pods = await readyPods('app=pause', 2);
    const prefix = node?.podSubnet.split('.').slice(0, 3).join('.') as string;
    for (const p of pods) {
      expect(p.spec.nodeName).toBe(node?.name);
      expect(p.status.podIP?.startsWith(`${prefix}.`)).toBe(true);
    }
  });

  it('runs a privileged hostNetwork+hostPID DaemonSet pod; logs and exec go through the kubelet', async () => {
    await kubectl(
      ['apply', '-f', '-'],
      JSON.stringify({
        apiVersion: 'apps/v1',
        kind: 'DaemonSet',
        metadata: { name: 'hostpod', namespace: NS },
        spec: {
          selector: { matchLabels: { app: 'hostpod' } },
          template: {
            metadata: { labels: { app: 'hostpod' } },
            spec: {
              hostNetwork: true,
              hostPID: true,
              terminationGracePeriodSeconds: 1,
              tolerations: [{ operator: 'Exists' }],
              containers: [
                {
                  name: 'main',
                  image: images.busybox.ref,
                  imagePullPolicy: 'Never',
                  securityContext: { privileged: true },
                  command: ['/bin/sh', '-c', 'echo hostpod-started; exec sleep 1000000'],
                },
              ],
            },
          },
        },
      }),
    );
    const [pod] = await readyPods('app=hostpod', 1);
    const name = pod?.metadata.name as string;
    expect(pod?.status.podIP).toBe(node?.nodeIP);
    expect(await kubectl(['-n', NS, 'logs', name])).toContain('hostpod-started');
    // hostPID: the test process (an ancestor of nothing in the pod) is visible from inside.
    const comm = await kubectl(['-n', NS, 'exec', name, '--', 'cat', `/proc/${process.pid}/comm`]);
    expect(comm.trim()).toBe((await readFile(`/proc/${process.pid}/comm`, 'utf8')).trim());
    // hostNetwork: the API host address is on one of the pod's interfaces.
    expect(await kubectl(['-n', NS, 'exec', name, '--', 'ip', '-o', 'addr'])).toContain(node?.nodeIP);
  });

  it('gives pod-network and hostNetwork pods the API through the kubernetes Service, with in-cluster config', async () => {
    await kubectl(
      ['apply', '-f', '-'],
      JSON.stringify({
        apiVersion: 'v1',
        kind: 'Pod',
        metadata: { name: 'client', namespace: NS, labels: { app: 'client' } },
        spec: {
          terminationGracePeriodSeconds: 1,
          containers: [
            {
              name: 'main',
              image: images.busybox.ref,
              imagePullPolicy: 'Never',
              command: ['/bin/sh', '-c', 'echo client-started; exec sleep 1000000'],
            },
          ],
        },
      }),
    );
    await readyPods('app=client', 1);
    expect(await kubectl(['-n', NS, 'logs', 'client'])).toContain('client-started');
    // The Service environment the kubelet injects: no override anywhere.
    const env = await kubectl(['-n', NS, 'exec', 'client', '--', 'env']);
    expect(env).toContain('KUBERNETES_SERVICE_HOST=10.96.0.1');
    expect(env).toContain('KUBERNETES_SERVICE_PORT=443');
    // kubectl in the pod has no kubeconfig: in-cluster config (10.96.0.1:443, the SA token, ca.crt; TLS verified).
    const whoami = ['kubectl', 'auth', 'whoami', '-o', 'jsonpath={.status.userInfo.username}'];
    expect(await kubectl(['-n', NS, 'exec', 'client', '--', ...whoami])).toBe(`system:serviceaccount:${NS}:default`);
    const [host] = await readyPods('app=hostpod', 1);
    expect(await kubectl(['-n', NS, 'exec', host?.metadata.name as string, '--', ...whoami])).toBe(
      `system:serviceaccount:${NS}:default`,
    );
  });

  it('adds a second node in its own network namespace: DaemonSet pod, logs/exec, API and pod-to-pod across nodes', async () => {
    const second = await startNode({
      name: 'stratus-node2',
      index: 2,
      netns: 'stknode2',
      pauseArchive: images.pause.archive,
      images: [images.busybox.archive],
      log,
    });
    try {
      expect(second.nodeIP).not.toBe(node?.nodeIP);
      // The DaemonSet of the previous test now has a pod on each node; hostNetwork puts it in the node's netns.
      const pods = await readyPods('app=hostpod', 2);
      const there = pods.find((p) => p.spec.nodeName === second.name);
      expect(there?.status.podIP).toBe(second.nodeIP);
      const name = there?.metadata.name as string;
      expect(await kubectl(['-n', NS, 'logs', name])).toContain('hostpod-started');
      const whoami = ['kubectl', 'auth', 'whoami', '-o', 'jsonpath={.status.userInfo.username}'];
      expect(await kubectl(['-n', NS, 'exec', name, '--', ...whoami])).toBe(`system:serviceaccount:${NS}:default`);
      // A pod on the first node's pod network reaches the second node (routed through the host).
      const ping = ['ping', '-c', '1', '-W', '5', second.nodeIP];
      expect(await kubectl(['-n', NS, 'exec', 'client', '--', ...ping])).toContain('1 packets received');
    } finally {
      await second.stop();
    }
    expect(await exists(second.dir)).toBe(false);
    expect((await run('ip', ['netns', 'list'])).stdout).not.toContain('stknode2');
    expect(await exists('/sys/class/net/stkv2')).toBe(false);
    // The first node is untouched.
    const n = await getJson<{ status: { conditions: { type: string; status: string }[] } }>([
      'get',
      'node',
      node?.name as string,
    ]);
    expect(n.status.conditions).toContainEqual(expect.objectContaining({ type: 'Ready', status: 'True' }));
  });

  it('stops and leaves nothing behind', async () => {
    const n = node as RealNode;
    await kubectl(['delete', 'namespace', NS, '--wait', '--timeout=120s']);
    await n.stop();
    stopped = true;
    const procs: string[] = [];
    for (const pid of await run('ps', ['-eo', 'pid=']).then((r) => r.stdout.split('\n').filter(Boolean))) {
      const cmd = await readFile(`/proc/${pid.trim()}/cmdline`, 'utf8').catch(() => '');
      if (cmd.includes(n.dir) || cmd.includes(n.containerdSocket)) procs.push(cmd.replaceAll('\0', ' '));
    }
    expect(procs).toEqual([]);
    const mounts = (await readFile('/proc/self/mountinfo', 'utf8')).split('\n').filter((l) => l.includes(n.dir));
    expect(mounts).toEqual([]);
    expect(await exists(n.dir)).toBe(false);
    expect(await exists(path.join('/sys/class/net', 'stkcni0'))).toBe(false);
    if (!hadVarLibKubelet) expect(await exists('/var/lib/kubelet')).toBe(false);
    const tables = (await run('nft', ['list', 'tables'])).stdout;
    expect(tables).not.toContain('kube-proxy');
    const nodes = await kubectl(['get', 'nodes', '-o', 'name']);
    expect(nodes).not.toContain(n.name);
  });
});
