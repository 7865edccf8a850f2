// The chart on a real node: `npm run images` (OCI archives built here, no Docker), a real kubelet + containerd node
// (e2e/node) with the images imported, `helm install` of charts/stratus, and then what a platform engineer does:
//  1. the operator (2 replicas, one leader) and the agent DaemonSet become Ready, the node's Hypervisor comes up;
//  2. examples/ (adapted: the test image served on loopback, the server pinned to this node) reach ACTIVE and the
//     guest's console prints READY: QEMU runs on the node, started by the agent pod, in a host cgroup of its own
//     (stratus-guests/<uid>, not under the pod's kubepods cgroup) and in the host's mount namespace;
//  3. `kubectl delete pod` of the agent: the guest keeps its QEMU pid and the server stays ACTIVE; the new pod adopts it;
//  4. `helm upgrade` to another agent image tag (the DaemonSet rolls): same;
//  5. `helm uninstall`: the guest still runs, CRDs and objects stay (as the chart README says);
//  6. reinstall (the new agent adopts the guest again), then the chart README's cleanup, in its order: the servers
//     (the agent destroys the guest: QEMU and its cgroups gone), the project, flavors and the Hypervisor, the
//     release, the namespace, the node's state directories.
// The agent's data plane lives in a network namespace of its own (--netns, like the demo's) so the host's devices
// and firewall are not touched. Needs root, QEMU, containerd/runc/CNI and mmdebstrap; skipped with a message without
// QEMU, like the other QEMU tests. Serialise with the other e2e files (one kubelet per machine at the default ports).
import { execFileSync } from 'node:child_process';
import { copyFile, mkdir, readFile, readlink, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parse, stringify } from 'yaml';
import { buildImages } from '../../containers/build.ts';
import { helmPath, kubectlPath } from '../controlplane/build.ts';
import { run } from '../controlplane/util.ts';
import { ensureTestImage, type TestImage } from '../images/build.ts';
import { type FileServer, start as serveFiles } from '../images/serve.ts';
import { type RealNode, startNode } from '../node/node.ts';
import { consoleText, count, exampleManifests, isQemuOf, qemuPid, root, waitConsole } from '../stack.ts';
import { e2eAccelerator, missingQemuPrerequisite } from '../testing/qemu.ts';
import { waitFor } from '../testing/wait.ts';

const log = (m: string) => console.error(`[chart] ${m}`);
const missing = missingQemuPrerequisite();
if (missing) log(`SKIPPED: ${missing} (needs root, QEMU, qemu-img and genisoimage)`);

const RELEASE = 'stratus';
const NS = 'stratus-system';
const CHART = path.join(root, 'charts', 'stratus');
/** The agent's state directory on the node: the chart's default (agent.stateDir and its hostPath). */
const STATE_DIR = '/var/lib/stratus';
const READY = 'STRATUS-GUEST-READY';
/** The node's data plane: bridge, VXLAN, taps, nftables and QEMU's network live here (agent --netns). */
const NETNS = 'stkchart';
const DHCP_PREFIX = 'stkchartd-';
const UNDERLAY_IP = '192.0.2.1';
const HV_LABEL = 'test.stratus.io/e2e';
const HV_LABEL_VALUE = 'chart';
const PROJECT = 'demo';
const SERVER = 'demo-vm';

interface Obj {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; uid?: string; labels?: Record<string, string> };
  spec?: Record<string, unknown>;
  status?: Record<string, unknown>;
}
interface PodList {
  items: {
    metadata: { name: string; uid: string; labels?: Record<string, string> };
    spec: { nodeName?: string; containers: { image: string }[] };
    status: { phase?: string; conditions?: { type: string; status: string }[] };
  }[];
}

const sh = (cmd: string, args: readonly string[]) =>
  execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
const netnsList = (): string[] => {
  const out = sh('ip', ['-j', 'netns', 'list']).trim();
  return out ? (JSON.parse(out) as { name: string }[]).map((n) => n.name) : [];
};
const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};
const isReady = (p: PodList['items'][number]) =>
  p.status.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') === true;

describe.skipIf(missing !== undefined)('the Helm chart on a real node', () => {
  let node: RealNode | undefined;
  let files: FileServer | undefined;
  let testImage: TestImage;
  let agentRef = '';
  let agentTag = '';
  let valuesFile = '';
  let uid = '';
  let pid = 0;
  let installed = false;

  const kubectl = async (args: string[], input?: string): Promise<string> => {
    if (!node) throw new Error('no node');
    const env = { ...process.env, KUBECONFIG: node.kubeconfig };
    return (await run(kubectlPath(), args, { env, input, timeoutMs: 300_000 })).stdout;
  };
  const helm = async (args: string[]): Promise<string> => {
    if (!node) throw new Error('no node');
    const env = { ...process.env, KUBECONFIG: node.kubeconfig };
    return (await run(helmPath(), args, { env, timeoutMs: 600_000 })).stdout;
  };
  const getJson = async <T>(args: string[]): Promise<T> => JSON.parse(await kubectl([...args, '-o', 'json'])) as T;
  const server = () => getJson<Obj>(['-n', PROJECT, 'get', 'server', SERVER]);
  const agentPods = async () =>
    (await getJson<PodList>(['-n', NS, 'get', 'pods', '-l', 'app.kubernetes.io/component=agent'])).items;

  /** Waits until exactly one agent pod runs, Ready, other than `not` (and with `image` when given). */
  const newAgentPod = (not: string | undefined, image?: string) =>
    waitFor(
      `a Ready agent pod${not ? ` other than ${not}` : ''}${image ? ` with ${image}` : ''}`,
      async () => {
        const pods = await agentPods();
        if (pods.length !== 1) return undefined;
        const p = pods[0]!;
        if (p.metadata.uid === not || !isReady(p)) return undefined;
        if (image && p.spec.containers[0]?.image !== image) return undefined;
        return p;
      },
      300_000,
      500,
    );

  /** The example's data volume once its status is `status` (it is attached to demo-vm in examples/). */
  const dataVolume = (status: string) =>
    waitFor(
      `volume data ${status}`,
      async () => {
        const v = JSON.parse(await kubectl(['-n', PROJECT, 'get', 'volume', 'data', '-o', 'json'])) as {
          status?: { status?: string; node?: string; attachments?: { server: string; state: string }[] };
        };
        return v.status?.status === status ? v : undefined;
      },
      300_000,
      500,
    );

  /** The guest is the same process, still ACTIVE, its console printed READY once (it did not reboot), its volume in use. */
  const expectGuestUntouched = async () => {
    expect(alive(pid)).toBe(true);
    expect(await isQemuOf(pid, uid)).toBe(true);
    expect(await qemuPid(STATE_DIR, uid)).toBe(pid);
    expect((await server()).status?.status).toBe('ACTIVE');
    expect(count(await consoleText(STATE_DIR, uid), READY)).toBe(1);
    expect((await dataVolume('in-use')).status?.attachments).toEqual([
      expect.objectContaining({ server: 'demo-vm', state: 'attached' }),
    ]);
  };

  /**
   * The agent pod `pod` adopted the running guest: its driver found the guest's QEMU by its pid file and connected to
   * its QMP socket (read with `kubectl logs`, through the API server's kubelet client certificate).
   */
  const waitAdopted = (pod: string) =>
    waitFor(
      `${pod} adopting the guest`,
      async () => {
        const logs = await kubectl(['-n', NS, 'logs', pod]).catch(() => '');
        for (const line of logs.split('\n')) {
          if (!line.includes('adopted a running guest')) continue;
          try {
            const rec = JSON.parse(line) as { guest?: string; pid?: number; connected?: boolean };
            if (rec.guest === uid) return rec;
          } catch {
            // not a JSON log line
          }
        }
        return undefined;
      },
      180_000,
      500,
    );

  const waitServerStatus = (want: string, timeoutMs = 600_000) =>
    waitFor(
      `server ${SERVER} ${want}`,
      async () => {
        const s = await server().catch(() => undefined);
        const st = s?.status?.status;
        if (st === 'ERROR') throw new Error(`server in ERROR: ${JSON.stringify(s?.status?.fault)}`);
        return st === want ? s : undefined;
      },
      timeoutMs,
      500,
    );

  // --skip-crds: this cluster is shared with the other test files, whose operators install the CRDs of the code they
  // run (--install-crds, as the chart's operator does too); Helm's own CRD install on a cluster without them is
  // covered by operator/test/integration/chart.test.ts.
  const install = async () => {
    await helm([
      'install',
      '--skip-crds',
      RELEASE,
      CHART,
      '-n',
      NS,
      '--create-namespace',
      '-f',
      valuesFile,
      '--wait',
      '--timeout',
      '10m',
    ]);
    installed = true;
  };

  /** examples/ adapted to this test: the local test image, the server pinned to this node's Hypervisor. */
  const examples = async (imageUrl: string): Promise<string> =>
    (await exampleManifests({ imageUrl, sha256: testImage.sha256, nodeSelector: { [HV_LABEL]: HV_LABEL_VALUE } }))
      .map((d) => stringify(d))
      .join('---\n');

  beforeAll(async () => {
    const images = await buildImages({ log: (m) => log(`images: ${m}`) });
    if (!images.operator || !images.agent || !images.pause) throw new Error('buildImages returned no images');
    agentRef = images.agent.ref;
    agentTag = agentRef.slice(agentRef.lastIndexOf(':') + 1);
    log(`images: ${images.operator.ref} ${images.operator.digest}, ${agentRef} ${images.agent.digest}`);
    testImage = await ensureTestImage();
    files = await serveFiles(path.dirname(testImage.path));

    node = await startNode({
      pauseArchive: images.pause.archive,
      images: [images.operator.archive, images.agent.archive],
      log,
    });
    log(`node ${node.name} Ready ${node.readySeconds.toFixed(1)} s after its kubelet started`);

    // Leftovers of an interrupted run: the release, the project, the data plane's namespaces.
    await helm(['uninstall', RELEASE, '-n', NS, '--wait', '--ignore-not-found']).catch(() => '');
    await kubectl(['delete', 'project', PROJECT, '--ignore-not-found', '--wait', '--timeout=180s']).catch(() => '');
    for (const ns of netnsList().filter((n) => n.startsWith(NETNS))) sh('ip', ['netns', 'del', ns]);
    // The node's network for guests, as the demo builds it: an underlay address on a veth inside NETNS.
    sh('ip', ['netns', 'add', NETNS]);
    sh('ip', ['-n', NETNS, 'link', 'set', 'lo', 'up']);
    sh('ip', ['-n', NETNS, 'link', 'add', 'eth0', 'type', 'veth', 'peer', 'name', 'eth1']);
    sh('ip', ['-n', NETNS, 'addr', 'add', `${UNDERLAY_IP}/24`, 'dev', 'eth0']);
    sh('ip', ['-n', NETNS, 'link', 'set', 'eth1', 'up']);
    sh('ip', ['-n', NETNS, 'link', 'set', 'eth0', 'up']);

    // The KVM probe boots the test image's kernel: put it where the agent pod sees it (the state hostPath).
    await mkdir(STATE_DIR, { recursive: true });
    const probeKernel = path.join(STATE_DIR, 'kvm-probe.vmlinuz');
    await copyFile(testImage.kernel, probeKernel);

    valuesFile = path.join(node.dir, 'chart-values.yaml');
    const values = parse(await readFile(path.join(CHART, 'ci', 'test-values.yaml'), 'utf8')) as {
      accelerator?: string;
      agent?: Record<string, unknown>;
    };
    values.accelerator = e2eAccelerator();
    values.agent = {
      ...values.agent,
      extraArgs: [
        `--netns=${NETNS}`,
        `--host-ip=${UNDERLAY_IP}`,
        `--dhcp-netns-prefix=${DHCP_PREFIX}`,
        `--labels=${JSON.stringify({ [HV_LABEL]: HV_LABEL_VALUE })}`,
        `--kvm-probe-kernel=${probeKernel}`,
      ],
    };
    await writeFile(valuesFile, stringify(values));
    log(`values:\n${await readFile(valuesFile, 'utf8')}`);
  }, 1_800_000);

  afterAll(async () => {
    if (node) {
      if (installed) await helm(['uninstall', RELEASE, '-n', NS, '--wait']).catch((e) => log(`uninstall: ${e}`));
      await node.stop().catch((e) => log(`node stop: ${e}`));
    }
    if (pid && alive(pid) && (await isQemuOf(pid, uid))) {
      log(`killing the guest's QEMU ${pid} left by a failed run`);
      process.kill(pid, 'SIGKILL');
    }
    for (const ns of netnsList().filter((n) => n.startsWith(NETNS))) sh('ip', ['netns', 'del', ns]);
    await files?.close();
  }, 600_000);

  it('installs: operator 2/2 with one leader, the agent on the node, its Hypervisor up', async () => {
    await install();
    const dep = await getJson<{ status: { readyReplicas?: number } }>([
      '-n',
      NS,
      'get',
      'deployment',
      `${RELEASE}-operator`,
    ]);
    expect(dep.status.readyReplicas).toBe(2);
    const pods = await agentPods();
    expect(pods).toHaveLength(1);
    expect(pods[0]?.spec.nodeName).toBe(node?.name);
    expect(pods[0]?.spec.containers[0]?.image).toBe(agentRef);
    const lease = await waitFor(
      'the operator leader Lease',
      async () => {
        const l = await getJson<{ spec: { holderIdentity?: string } }>([
          '-n',
          NS,
          'get',
          'lease',
          'stratus-operator',
        ]).catch(() => undefined);
        return l?.spec.holderIdentity ? l : undefined;
      },
      120_000,
      500,
    );
    const operatorPods = (
      await getJson<PodList>(['-n', NS, 'get', 'pods', '-l', 'app.kubernetes.io/component=operator'])
    ).items.map((p) => p.metadata.name);
    expect(operatorPods.some((n) => lease.spec.holderIdentity?.startsWith(n))).toBe(true);
    const hv = await waitFor(
      `Hypervisor ${node?.name} up`,
      async () => {
        const h = await getJson<Obj>(['get', 'hypervisor', node?.name as string]).catch(() => undefined);
        return h?.status?.state === 'up' ? h : undefined;
      },
      180_000,
      500,
    );
    log(
      `Hypervisor ${hv.metadata.name}: accelerator ${hv.status?.accelerator} (${hv.status?.acceleratorReason ?? ''})`,
    );
    expect(['kvm', 'tcg']).toContain(hv.status?.accelerator);
  }, 900_000);

  it('runs examples/: the server reaches ACTIVE, the guest boots, QEMU runs on the host outside the pod', async () => {
    const manifest = await examples(`http://127.0.0.1:${files?.port}/${path.basename(testImage.path)}`);
    // The project's namespace appears once the operator has made it; the namespaced objects wait for it.
    await waitFor(
      'examples/ applied',
      async () => {
        try {
          await kubectl(['apply', '--server-side', '--field-manager=chart-e2e', '-f', '-'], manifest);
          return true;
        } catch (e) {
          if (/namespaces? "?demo"? not found/i.test(String(e))) return undefined;
          throw e;
        }
      },
      120_000,
      500,
    );
    const s = await waitServerStatus('ACTIVE');
    uid = s.metadata.uid as string;
    expect(s.status?.node).toBe(node?.name);
    await waitConsole(STATE_DIR, uid, READY, 1, 600_000);
    pid = await qemuPid(STATE_DIR, uid);
    expect(pid).toBeGreaterThan(0);
    expect(await isQemuOf(pid, uid)).toBe(true);
    // A host cgroup of its own in every hierarchy, nothing of the pod's (kubepods under the node's cgroup root).
    const cgroups = (await readFile(`/proc/${pid}/cgroup`, 'utf8')).trim().split('\n');
    expect(cgroups.length).toBeGreaterThan(0);
    for (const line of cgroups) {
      expect(line).toContain(`/stratus-guests/${uid}`);
      expect(line).not.toContain('kubepods');
    }
    // The host's mount namespace (this test runs in it), not the agent container's.
    expect(await readlink(`/proc/${pid}/ns/mnt`)).toBe(await readlink('/proc/self/ns/mnt'));
    // examples/08-volume.yaml, listed in demo-vm's spec.volumes: a local volume on this node, hot-plugged by the pod.
    const v = await dataVolume('in-use');
    expect(v.status?.node).toBe(node?.name);
    expect(v.status?.attachments).toEqual([expect.objectContaining({ server: 'demo-vm', state: 'attached' })]);
  }, 900_000);

  it('keeps the guest when the agent pod is deleted; the new pod adopts it', async () => {
    const old = (await agentPods())[0]!;
    await kubectl(['-n', NS, 'delete', 'pod', old.metadata.name, '--wait']);
    const pod = await newAgentPod(old.metadata.uid);
    expect(await waitAdopted(pod.metadata.name)).toMatchObject({ pid, connected: true });
    await expectGuestUntouched();
  }, 600_000);

  it('keeps the guest through helm upgrade to another agent image (the DaemonSet rolls)', async () => {
    const nextTag = `${agentTag}-next`;
    const nextRef = agentRef.replace(/:[^:]+$/, `:${nextTag}`);
    await node?.ctr(['images', 'tag', '--force', agentRef, nextRef]);
    const old = (await agentPods())[0]!;
    await helm([
      'upgrade',
      RELEASE,
      CHART,
      '-n',
      NS,
      '--reuse-values',
      '--set',
      `agent.image.tag=${nextTag}`,
      '--wait',
    ]);
    const pod = await newAgentPod(old.metadata.uid, nextRef);
    expect(await waitAdopted(pod.metadata.name)).toMatchObject({ pid, connected: true });
    await expectGuestUntouched();
  }, 600_000);

  it('helm uninstall leaves the guest running and the CRDs and objects in place', async () => {
    await helm(['uninstall', RELEASE, '-n', NS, '--wait']);
    installed = false;
    await waitFor('no agent pod', async () => ((await agentPods()).length === 0 ? true : undefined), 180_000, 500);
    expect(alive(pid)).toBe(true);
    expect(await isQemuOf(pid, uid)).toBe(true);
    expect(await kubectl(['get', 'crd', 'servers.compute.stratus.io', '-o', 'name'])).toContain('servers');
    expect((await server()).metadata.uid).toBe(uid);
  }, 600_000);

  it('reinstalls (the guest is adopted again), then the documented cleanup removes guest, objects and state', async () => {
    await install();
    const pod = await newAgentPod(undefined);
    expect(await waitAdopted(pod.metadata.name)).toMatchObject({ pid, connected: true });
    await expectGuestUntouched();

    // charts/stratus/README.md "Uninstall", in its order (scoped to this test's objects: the cluster is shared).
    await kubectl(['-n', PROJECT, 'delete', 'servers', '--all', '--wait', '--timeout=300s']);
    await waitFor('QEMU gone', async () => (alive(pid) ? undefined : true), 120_000, 200);
    const guestCgroups = (await readFile('/proc/self/mountinfo', 'utf8'))
      .split('\n')
      .filter((l) => l.includes(' - cgroup'))
      .map((l) => l.split(' ')[4] as string)
      .map((m) => path.join(m, 'stratus-guests', uid));
    for (const dir of guestCgroups) {
      await expect(readFile(path.join(dir, 'cgroup.procs'))).rejects.toThrow();
    }
    await kubectl(['delete', 'project', PROJECT, '--wait', '--timeout=300s']);
    await kubectl(['delete', 'flavors', 'm1.tiny', 'm1.small', '--ignore-not-found']);
    await kubectl(['delete', 'hypervisor', node?.name as string, '--ignore-not-found']);
    await helm(['uninstall', RELEASE, '-n', NS, '--wait']);
    installed = false;
    await kubectl(['delete', 'namespace', NS, '--wait', '--timeout=180s']);
    await rm(STATE_DIR, { recursive: true, force: true });
    await rm('/run/stratus', { recursive: true, force: true });
    // Nothing of the guest's data plane is left in the node's namespace: no tap, no per-network DHCP namespace.
    expect(netnsList().filter((n) => n.startsWith(DHCP_PREFIX))).toEqual([]);
    const links = JSON.parse(sh('ip', ['-n', NETNS, '-j', 'link', 'show'])) as { ifname: string }[];
    expect(links.map((l) => l.ifname).filter((n) => n.startsWith('stt-'))).toEqual([]);
  }, 900_000);
});
