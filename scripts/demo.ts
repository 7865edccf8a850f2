// npm run demo: one real QEMU guest on this machine through Stratus, from nothing to a booted VM.
//   npm run demo               checks, test image, local control plane, a network namespace playing the node's
//                              network, operator + one qemu node agent with the linuxbridge backend in it (in the
//                              background), the image served on loopback, the manifests of examples/ (network and
//                              security groups included), then follows the guest's serial console until it is up,
//                              shows its address and pings it, and returns.
//   npm run demo -- --accelerator=tcg   the same with the agent's --accelerator (auto, the default: KVM only if a
//                              kernel really boots under it, else TCG; kvm; tcg)
//   npm run demo -- --down     deletes the guest and the demo objects, stops agent, operator and image server,
//                              removes the demo's network namespaces, and stops the control plane if the demo started
//                              it.
// Background processes, their logs and the guest state live in .cluster/demo/ (demo.json lists the pids). The data
// plane (bridge, VXLAN device, tap, nftables tables, dnsmasq) lives in the namespaces stratus-demo*, never in the
// host's: the demo touches neither the host's devices nor its firewall.
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, open, readdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { KubeConfig, type KubernetesObject, PatchStrategy } from '@kubernetes/client-node';
import { clusterConfig, down as clusterDown, up as clusterUp } from '../e2e/controlplane/controlplane.ts';
import { ensureTestImage } from '../e2e/images/build.ts';
import { start as serveFiles } from '../e2e/images/serve.ts';
import {
  exampleManifests,
  FLAVORS,
  guestDir,
  HYPERVISORS,
  IMAGES,
  isQemuOf,
  KEYPAIRS,
  NAMESPACES,
  Proc,
  qemuPid,
  root,
  SERVERS,
  type Srv,
  startAgentProc,
  startOperatorProc,
  waitFor,
} from '../e2e/stack.ts';
import { dhcpDefaults } from '../node-agent/src/network/dhcp.ts';
import { NetworkKind, PortKind, ProjectKind, SecurityGroupKind, ServerGroupKind } from '../operator/src/api/index.ts';
import { gvrOf } from '../operator/src/controllers/common.ts';
import { type GVR, isNotFound, KubeClient } from '../operator/src/runtime/index.ts';

const demoDir = path.join(clusterConfig().stateDir, 'demo');
const stateFile = path.join(demoDir, 'demo.json');
const stateDir = path.join(demoDir, 'state');
const NODE = `stratus-demo-${os
  .hostname()
  .toLowerCase()
  .replace(/[^a-z0-9-]/g, '-')}`.slice(0, 63);
const DEMO_LABEL = 'stratus.io/demo';
const NODE_LABEL = 'stratus.io/demo-node';
const NS = 'demo';
const SERVER = 'demo-vm';
const LEASE = 'stratus-demo';
const LEASE_NS = 'stratus-system';
const FIELD_MANAGER = 'stratus-demo';
const READY = 'STRATUS-GUEST-READY';
/** The node's network namespace (--netns): the agent's bridge, VXLAN device, taps, nftables and QEMU live in it. */
const NETNS = 'stratus-demo';
/** The node's underlay address (--host-ip), on a veth inside NETNS (TEST-NET-1: never routed anywhere). */
const UNDERLAY_IP = '192.0.2.1';
/** Per-network DHCP namespaces (<prefix><vni>) and dnsmasq files of the agent, as the backend derives them. */
const DHCP = dhcpDefaults({ netns: NETNS });
const NETWORKS = gvrOf(NetworkKind);
const PORTS = gvrOf(PortKind);

interface DemoState {
  operatorPid: number;
  agentPid: number;
  servePid: number;
  startedCluster: boolean;
  nodeName: string;
  /** The node's network namespace, once the demo created it (removed by --down with the DHCP namespaces). */
  netns?: string;
  /** Cluster-scoped and namespaced objects the demo applied, for --down. */
  objects: { gvr: GVR; name: string; namespace?: string }[];
}

const say = (m: string) => console.log(m);
const step = (m: string) => console.log(`\n==> ${m}`);

function fail(m: string): never {
  console.error(`\ndemo: ${m}`);
  process.exit(1);
}

function which(tool: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${tool}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** What the demo needs from the machine; every missing piece is listed with how to get it. */
function setupChecks(): void {
  step('checking this machine');
  const missing: string[] = [];
  if (process.platform !== 'linux') missing.push(`Linux is required (this is ${process.platform})`);
  if (process.getuid?.() !== 0) missing.push('run as root (QEMU guests, image cache and state in .cluster/demo)');
  const tools: [string, string][] = [
    ['qemu-system-x86_64', 'qemu-system-x86'],
    ['qemu-img', 'qemu-utils'],
    ['genisoimage', 'genisoimage'],
    ['mkfs.vfat', 'dosfstools'],
    ['sfdisk', 'fdisk'],
    ['mcopy', 'mtools'],
    ['syslinux', 'syslinux'],
    ['openssl', 'openssl'],
    ['ip', 'iproute2'],
    ['nft', 'nftables'],
    ['dnsmasq', 'dnsmasq-base'],
    ['ping', 'iputils-ping'],
  ];
  for (const [tool, pkg] of tools) {
    if (!which(tool)) missing.push(`${tool} not found: apt-get install ${pkg} (or npm run setup)`);
  }
  if (!existsSync(path.join(root, 'node_modules'))) missing.push('node_modules missing: npm install');
  if (missing.length > 0)
    fail(`missing prerequisites:\n  - ${missing.join('\n  - ')}\nnpm run setup installs them on Debian 12.`);
  const kvm = existsSync('/dev/kvm')
    ? '/dev/kvm present (the agent probes whether KVM really works)'
    : 'no /dev/kvm: guests will run under TCG (software emulation, slower)';
  say(`  ok: Linux, root, QEMU, qemu-img, genisoimage, image build tools, iproute2, nftables, dnsmasq; ${kvm}`);
}

async function readState(): Promise<DemoState | undefined> {
  try {
    return JSON.parse(await readFile(stateFile, 'utf8')) as DemoState;
  } catch {
    return undefined;
  }
}

/** The pid runs `node ... <script>` (so a reused pid is never signalled). */
function isOurs(pid: number, script: string): boolean {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8')
      .split('\0')
      .some((a) => a.endsWith(script));
  } catch {
    return false;
  }
}

async function stopPid(pid: number, script: string, what: string): Promise<void> {
  if (!pid || !isOurs(pid, script)) return;
  process.kill(pid, 'SIGTERM');
  for (let i = 0; i < 300 && isOurs(pid, script); i++) await sleep(100);
  if (isOurs(pid, script)) process.kill(pid, 'SIGKILL');
  say(`  stopped ${what} (pid ${pid})`);
}

function client(): KubeClient {
  const kc = new KubeConfig();
  kc.loadFromFile(path.join(clusterConfig().stateDir, 'admin.kubeconfig'));
  return new KubeClient(kc);
}

const GVR_BY_KIND: Record<string, GVR> = {
  Project: gvrOf(ProjectKind),
  Flavor: FLAVORS,
  KeyPair: KEYPAIRS,
  Image: IMAGES,
  Network: NETWORKS,
  SecurityGroup: gvrOf(SecurityGroupKind),
  ServerGroup: gvrOf(ServerGroupKind),
  Server: SERVERS,
};

/** examples/ adapted to this machine: the local test image, the server pinned to the demo's hypervisor. */
function manifests(imageUrl: string, sha256: string): Promise<KubernetesObject[]> {
  return exampleManifests({ imageUrl, sha256, nodeSelector: { [NODE_LABEL]: NODE }, labels: { [DEMO_LABEL]: 'true' } });
}

/** Runs a command; returns stdout; throws with its stderr on failure. */
function run(cmd: string, args: readonly string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** Network namespaces whose name starts with `prefix`. */
function netnsWithPrefix(prefix: string): string[] {
  const out = run('ip', ['-j', 'netns', 'list']).trim();
  if (!out) return [];
  return (JSON.parse(out) as { name: string }[]).map((n) => n.name).filter((n) => n.startsWith(prefix));
}

/**
 * The node's network, as a network namespace: lo, and a veth pair whose end eth0 holds the underlay address (the
 * VXLAN local address; with one node no packet ever leaves on it). Like a node of e2e/testing/netlab.ts.
 */
function createNodeNetns(): void {
  run('ip', ['netns', 'add', NETNS]);
  run('ip', ['netns', 'exec', NETNS, 'sysctl', '-qw', 'net.ipv6.conf.all.disable_ipv6=1']);
  run('ip', ['-n', NETNS, 'link', 'set', 'lo', 'up']);
  run('ip', ['-n', NETNS, 'link', 'add', 'eth0', 'type', 'veth', 'peer', 'name', 'eth1']);
  run('ip', ['-n', NETNS, 'addr', 'add', `${UNDERLAY_IP}/24`, 'dev', 'eth0']);
  run('ip', ['-n', NETNS, 'link', 'set', 'eth1', 'up']);
  run('ip', ['-n', NETNS, 'link', 'set', 'eth0', 'up']);
}

/**
 * Removes what the demo's data plane may have left (normally the agent already removed it when the server went):
 * dnsmasq processes of the demo's run directory (by pid, checked against their command line), the node and DHCP
 * namespaces (their devices and nftables tables go with them) and the run directory.
 */
async function removeNodeNetwork(): Promise<void> {
  for (const ns of netnsWithPrefix(NETNS)) {
    let pids: string[] = [];
    try {
      pids = run('ip', ['netns', 'pids', ns]).split('\n').filter(Boolean);
    } catch {
      // namespace gone meanwhile
    }
    for (const pid of pids.map(Number)) {
      let cmdline = '';
      try {
        cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      } catch {
        continue;
      }
      if (cmdline.includes('dnsmasq') && cmdline.includes(`--conf-file=${DHCP.runDir}/`)) {
        process.kill(pid, 'SIGTERM');
        say(`  stopped dnsmasq (pid ${pid}) in ${ns}`);
      }
    }
    try {
      run('ip', ['netns', 'del', ns]);
      say(`  deleted network namespace ${ns}`);
    } catch (e) {
      say(`  ip netns del ${ns}: ${(e as { stderr?: string }).stderr?.trim() ?? e}`);
    }
  }
  await rm(DHCP.runDir, { recursive: true, force: true });
}

async function up(): Promise<void> {
  const prev = await readState();
  if (prev && (isOurs(prev.agentPid, 'node-agent/src/main.ts') || isOurs(prev.operatorPid, 'operator/src/main.ts'))) {
    fail(`the demo is already running (see ${stateFile}): npm run demo -- --down first`);
  }
  setupChecks();
  await mkdir(demoDir, { recursive: true });

  step('test guest image (built from Debian packages once, then cached)');
  const img = await ensureTestImage({ log: (m) => say(`  ${m}`) });
  say(`  ${img.path} (${(img.size / 2 ** 20).toFixed(1)} MiB, sha256 ${img.sha256.slice(0, 16)}…)`);

  step('local control plane (etcd, kube-apiserver, kube-controller-manager)');
  const cluster = await clusterUp({ log: (m) => say(`  ${m}`) });
  say(
    cluster.started.length === 0
      ? `  already running at ${cluster.server} (left running by --down)`
      : `  started ${cluster.started.join(', ')} at ${cluster.server} in ${cluster.seconds.toFixed(1)} s`,
  );
  const kubeconfig = cluster.kubeconfig;
  const c = client();

  const state: DemoState = {
    operatorPid: 0,
    agentPid: 0,
    servePid: 0,
    startedCluster: cluster.started.length > 0,
    nodeName: NODE,
    objects: [],
  };
  const save = () => writeFile(stateFile, `${JSON.stringify(state, null, 2)}\n`);

  step(`the node's network: namespace ${NETNS}`);
  state.netns = NETNS;
  await save();
  if (netnsWithPrefix(NETNS).length > 0) {
    say('  removing what an earlier demo left');
    await removeNodeNetwork();
  }
  createNodeNetns();
  say(`  underlay address ${UNDERLAY_IP} on eth0 (a veth inside the namespace); the agent runs --netns ${NETNS}:`);
  say('  its bridge, VXLAN device, tap, nftables tables and QEMU live there, dnsmasq in per-network namespaces');
  say(`  ${DHCP.netnsPrefix}<vni>; the host's devices and firewall are not touched`);

  step('operator and node agent (background processes)');
  const operator = startOperatorProc({
    kubeconfig,
    leaseName: LEASE,
    leaseNamespace: LEASE_NS,
    logFile: path.join(demoDir, 'operator.log'),
    detached: true,
  });
  state.operatorPid = operator.pid;
  await save();
  await operator.waitForLog('leading: controllers started', 120_000);
  say(`  operator pid ${operator.pid}, log .cluster/demo/operator.log`);
  const agent = startAgentProc({
    kubeconfig,
    nodeName: NODE,
    stateDir,
    accelerator: options.accelerator,
    kvmProbeKernel: img.kernel,
    labels: { [NODE_LABEL]: NODE, [DEMO_LABEL]: 'true' },
    logFile: path.join(demoDir, 'agent.log'),
    detached: true,
    netns: NETNS,
    hostIP: UNDERLAY_IP,
    networkBackend: 'linuxbridge',
    dhcpNetnsPrefix: DHCP.netnsPrefix,
    leaseNamespace: LEASE_NS,
  });
  state.agentPid = agent.pid;
  await save();
  await agent.waitForLog('node agent started', 180_000);
  const hv = await waitFor(
    `Hypervisor ${NODE} status`,
    async () => {
      const h = await c.get<KubernetesObject & { status?: { accelerator?: string; acceleratorReason?: string } }>(
        HYPERVISORS,
        NODE,
      );
      return h.status?.accelerator ? h : undefined;
    },
    60_000,
  );
  say(`  node agent pid ${agent.pid}, Hypervisor ${NODE}, state .cluster/demo/state, log .cluster/demo/agent.log`);
  say(
    `  accelerator: ${hv.status!.accelerator} (${hv.status!.acceleratorReason ?? 'auto'}); network backend linuxbridge`,
  );

  step('image server on loopback');
  const www = path.join(demoDir, 'www');
  await mkdir(www, { recursive: true });
  await rm(path.join(www, 'stratus-test.qcow2'), { force: true });
  await symlink(img.path, path.join(www, 'stratus-test.qcow2'));
  const urlFile = path.join(demoDir, 'serve.url');
  await rm(urlFile, { force: true });
  const serve = new Proc(
    'image server',
    [path.join(root, 'scripts/demo.ts'), '--serve', www, urlFile],
    path.join(demoDir, 'serve.log'),
    true,
  );
  state.servePid = serve.pid;
  await save();
  const base = await waitFor(
    'image server URL',
    async () => (await readFile(urlFile, 'utf8')).trim() || undefined,
    30_000,
  );
  const imageUrl = `${base}/stratus-test.qcow2`;
  say(`  ${imageUrl} (pid ${serve.pid})`);

  step('applying examples/ (Project, Flavors, KeyPair, Image, Network, SecurityGroup, ServerGroup, Server), adapted');
  say('  Image: the local test image (URL + sha256) instead of Debian 12');
  say(`  Server: nodeSelector ${NODE_LABEL}=${NODE} keeps it on this machine's agent`);
  for (const o of await manifests(imageUrl, img.sha256)) {
    const gvr = GVR_BY_KIND[o.kind!]!;
    const namespace = o.metadata?.namespace;
    if (namespace) {
      await waitFor(`namespace ${namespace}`, async () => {
        try {
          return await c.get(NAMESPACES, namespace);
        } catch (e) {
          if (!isNotFound(e)) throw e;
          return undefined;
        }
      });
    }
    await c.apply(gvr, o, { fieldManager: FIELD_MANAGER, force: true });
    state.objects.push({ gvr, name: o.metadata!.name!, ...(namespace ? { namespace } : {}) });
    await save();
    say(`  ${o.kind!.toLowerCase()}/${o.metadata!.name}${namespace ? ` -n ${namespace}` : ''} applied`);
  }

  step(`waiting for server ${SERVER}`);
  const t0 = Date.now();
  const bound = await waitFor(
    'the server to be scheduled',
    async () => {
      const s = await c.get<Srv>(SERVERS, SERVER, NS);
      if (s.status?.status === 'ERROR') fail(`server ${SERVER} in ERROR: ${s.status.fault?.message}`);
      return s.status?.node ? s : undefined;
    },
    120_000,
  );
  const uid = bound.metadata!.uid!;
  say(`  scheduled on ${bound.status!.node}; uid ${uid}`);
  say(`  serial console (${path.relative(root, path.join(guestDir(stateDir, uid), 'console.log'))}):`);
  await followConsole(c, uid, 300_000);
  const s = await waitFor(
    'ACTIVE',
    async () => {
      const v = await c.get<Srv>(SERVERS, SERVER, NS);
      return v.status?.status === 'ACTIVE' ? v : undefined;
    },
    60_000,
  );
  say(
    `\n==> ${SERVER} is ${s.status!.status}/${s.status!.powerState} on ${s.status!.node} (${s.status!.accelerator}), booted in ${((Date.now() - t0) / 1000).toFixed(1)} s`,
  );
  const addresses = await showNetwork(c, s);
  say(`
The operator, the node agent and the image server keep running in the background (pids in .cluster/demo/demo.json).
  eval "$(npm run -s cluster -- env)"           # KUBECONFIG and kubectl
  kubectl -n ${NS} get servers -o wide
  kubectl -n ${NS} get networks,ports,securitygroups,ipallocations
  ip netns exec ${addresses.dhcpNetns ?? `${DHCP.netnsPrefix}<vni>`} ping ${addresses.ip ?? '<address>'}   # from the node's DHCP namespace, on the tenant network
  ip netns exec ${NETNS} nft list ruleset          # the security groups as nftables rules
  kubectl -n ${NS} patch server ${SERVER} --type merge -p '{"spec":{"powerState":"Stopped"}}'
  kubectl -n ${NS} patch server ${SERVER} --type merge -p "{\\"spec\\":{\\"triggers\\":{\\"hardReboot\\":\\"$(date -Is)\\"}}}"
  tail -f ${path.relative(root, path.join(guestDir(stateDir, uid), 'console.log'))}
  socat -,raw,echo=0,escape=0x1d UNIX-CONNECT:${path.relative(root, path.join(guestDir(stateDir, uid), 'console.sock'))}   # interactive console (Ctrl-] to quit)
Stop everything (deletes the guest, stops agent, operator and image server, removes the namespaces ${NETNS}*, and
the cluster if the demo started it):
  npm run demo -- --down`);
}

/**
 * Prints the server's addresses (status.addresses, from its Port), then pings the first IPv4 one from the node's DHCP
 * namespace of that network (an interface on the tenant network; the security group ssh-and-ping lets ICMP in) and
 * tries TCP port 80, which no rule allows.
 */
async function showNetwork(c: KubeClient, s: Srv): Promise<{ ip?: string; dhcpNetns?: string }> {
  const addrs =
    (s.status as { addresses?: { network: string; ip: string; version: number; macAddress?: string; port?: string }[] })
      .addresses ?? [];
  if (addrs.length === 0) {
    say('  no addresses in status (the server has no networks)');
    return {};
  }
  for (const a of addrs)
    say(`  address: ${a.ip} on network ${a.network} (MAC ${a.macAddress ?? '?'}, port ${a.port ?? '?'})`);
  const v4 = addrs.find((a) => a.version === 4);
  if (!v4) return {};
  const net = await c.get<KubernetesObject & { status?: { segmentationID?: number } }>(NETWORKS, v4.network, NS);
  const vni = net.status?.segmentationID;
  if (vni === undefined) return { ip: v4.ip };
  const dhcpNetns = `${DHCP.netnsPrefix}${vni}`;
  say(`  network ${v4.network}: VXLAN id ${vni}; the node's DHCP server for it runs in namespace ${dhcpNetns}`);
  const ping = () => {
    try {
      run('ip', ['netns', 'exec', dhcpNetns, 'ping', '-c', '1', '-W', '1', v4.ip]);
      return true;
    } catch {
      return false;
    }
  };
  let ok = false;
  for (let i = 0; i < 10 && !ok; i++) {
    ok = ping();
    if (!ok) await sleep(500);
  }
  say(
    ok
      ? `  ping ${v4.ip} from ${dhcpNetns}: answered (security group ssh-and-ping lets ICMP echo in)`
      : `  ping ${v4.ip} from ${dhcpNetns}: no answer (see .cluster/demo/agent.log)`,
  );
  if (which('curl')) {
    let http = false;
    try {
      run('ip', ['netns', 'exec', dhcpNetns, 'curl', '-s', '--max-time', '2', `http://${v4.ip}/`]);
      http = true;
    } catch {
      // refused or timed out
    }
    say(
      http
        ? `  HTTP to ${v4.ip}:80 answered, although no security group rule allows it`
        : `  HTTP to ${v4.ip}:80 (the guest listens): dropped, no security group rule allows it`,
    );
  }
  return { ip: v4.ip, dhcpNetns };
}

/** Prints the guest's serial console as it grows, until the READY marker. */
async function followConsole(c: KubeClient, uid: string, timeoutMs: number): Promise<void> {
  const file = path.join(guestDir(stateDir, uid), 'console.log');
  const deadline = Date.now() + timeoutMs;
  let pos = 0;
  let partial = '';
  for (;;) {
    if (existsSync(file)) {
      const fh = await open(file, 'r');
      const { size } = await fh.stat();
      if (size > pos) {
        const buf = Buffer.alloc(size - pos);
        await fh.read(buf, 0, buf.length, pos);
        pos = size;
        const lines = (partial + buf.toString('utf8').replaceAll('\r', '')).split('\n');
        partial = lines.pop() ?? '';
        for (const l of lines) {
          say(`  | ${l}`);
          if (l.includes(READY)) {
            await fh.close();
            return;
          }
        }
      }
      await fh.close();
    }
    const s = await c.get<Srv>(SERVERS, SERVER, NS).catch(() => undefined);
    if (Date.now() > deadline) {
      const st = s?.status;
      fail(
        `no ${READY} on the serial console within ${timeoutMs / 1000} s: server ${st?.status ?? '?'}/${st?.powerState ?? '?'}` +
          ` on ${st?.accelerator ?? '?'}${st?.fault ? `, fault: ${st.fault.message}` : ''}` +
          `; see .cluster/demo/agent.log and ${path.join(guestDir(stateDir, uid), 'qemu.log')}` +
          (st?.accelerator === 'kvm' ? '; try npm run demo -- --down && npm run demo -- --accelerator=tcg' : ''),
      );
    }
    if (s?.status?.status === 'ERROR') fail(`server ${SERVER} in ERROR: ${s.status.fault?.message}`);
    await sleep(200);
  }
}

async function down(): Promise<void> {
  const st = await readState();
  if (!st) fail(`nothing to stop (${stateFile} not found)`);
  step('deleting the demo objects');
  const c = client();
  const reachable = await c.get(NAMESPACES, 'default').then(
    () => true,
    () => false,
  );
  if (reachable) {
    const agentUp = isOurs(st.agentPid, 'node-agent/src/main.ts') && isOurs(st.operatorPid, 'operator/src/main.ts');
    for (const o of [...st.objects].reverse()) {
      await c.delete(o.gvr, o.name, o.namespace).catch((e: unknown) => {
        if (!isNotFound(e)) say(`  ${o.name}: ${e}`);
      });
      if (o.gvr.plural === 'servers') {
        const gone = await waitFor(
          `server ${o.name} deleted`,
          async () =>
            c.get(SERVERS, o.name, o.namespace).then(
              () => false,
              (e: unknown) => isNotFound(e),
            ),
          agentUp ? 90_000 : 1,
        ).catch(() => false);
        if (!gone) {
          // Agent or operator not running: release the finalizers (the guest is destroyed below).
          await c
            .patch(
              SERVERS,
              o.name,
              o.namespace,
              [{ op: 'remove', path: '/metadata/finalizers' }],
              PatchStrategy.JsonPatch,
            )
            .catch(() => {});
        }
      }
      if (o.gvr.plural === 'networks') {
        // The Network's finalizer waits for its ports (the server's port goes with the server).
        const gone = await waitFor(
          `network ${o.name} deleted`,
          async () =>
            c.get(NETWORKS, o.name, o.namespace).then(
              () => false,
              (e: unknown) => isNotFound(e),
            ),
          agentUp ? 60_000 : 1,
        ).catch(() => false);
        if (!gone) {
          // Operator not running: release the finalizers of the network and its ports (nothing else would).
          const ports = await c.list<KubernetesObject>(PORTS, { namespace: o.namespace }).then(
            (l) => l.items,
            () => [] as KubernetesObject[],
          );
          const stuck: [GVR, string][] = [
            ...ports.map((p): [GVR, string] => [PORTS, p.metadata!.name!]),
            [NETWORKS, o.name],
          ];
          for (const [gvr, name] of stuck) {
            await c
              .patch(gvr, name, o.namespace, [{ op: 'remove', path: '/metadata/finalizers' }], PatchStrategy.JsonPatch)
              .catch(() => {});
          }
        }
      }
      if (o.gvr.plural === 'projects') {
        await waitFor(
          `project ${o.name} deleted`,
          async () =>
            c.get(o.gvr, o.name).then(
              () => false,
              (e: unknown) => isNotFound(e),
            ),
          agentUp ? 60_000 : 1,
        ).catch(() => say(`  project ${o.name} still terminating (its namespace is being deleted)`));
      }
      say(`  deleted ${o.gvr.plural}/${o.name}`);
    }
  } else say('  the control plane does not answer: objects left as they are');

  step('stopping the background processes');
  await stopPid(st.agentPid, 'node-agent/src/main.ts', 'node agent');
  await stopPid(st.operatorPid, 'operator/src/main.ts', 'operator');
  await stopPid(st.servePid, 'scripts/demo.ts', 'image server');
  // Guests the agent did not destroy (it was not running): only QEMUs of this state directory's guests.
  const guests = await readdir(path.join(stateDir, 'guests')).catch(() => [] as string[]);
  for (const uid of guests) {
    const pid = await qemuPid(stateDir, uid);
    if (await isQemuOf(pid, uid)) {
      process.kill(pid, 'SIGKILL');
      say(`  killed QEMU of guest ${uid} (pid ${pid})`);
    }
  }
  await rm(stateDir, { recursive: true, force: true });
  // After the agent stopped (its heartbeat would create it again).
  if (reachable) {
    await c.delete(HYPERVISORS, st.nodeName).catch(() => {});
    say(`  deleted hypervisors/${st.nodeName}`);
  }
  if (st.netns) {
    step("removing the node's network namespaces");
    await removeNodeNetwork();
  }

  if (st.startedCluster) {
    step('stopping the local control plane (the demo started it)');
    await clusterDown({ log: (m) => say(`  ${m}`) });
  } else say('\nthe control plane was running before the demo: left running (npm run cluster -- down stops it)');
  await rm(stateFile, { force: true });
  say('demo stopped');
}

/** Internal: the background image server (`demo.ts --serve <dir> <url file>`). */
async function serve(dir: string, urlFile: string): Promise<void> {
  const srv = await serveFiles(dir);
  await writeFile(urlFile, `${srv.url}\n`);
  const stop = () => void srv.close().finally(() => process.exit(0));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

const argv = process.argv.slice(2);
const options = { accelerator: 'auto' as 'auto' | 'kvm' | 'tcg' };
if (argv[0] !== '--serve') {
  const { values } = parseArgs({
    args: argv,
    options: { down: { type: 'boolean' }, accelerator: { type: 'string', default: 'auto' } },
    strict: true,
  });
  if (!['auto', 'kvm', 'tcg'].includes(values.accelerator)) {
    console.error(`--accelerator=${values.accelerator}: auto, kvm or tcg`);
    process.exit(2);
  }
  options.accelerator = values.accelerator as typeof options.accelerator;
}
const main = argv[0] === '--serve' ? () => serve(argv[1]!, argv[2]!) : argv.includes('--down') ? down : up;
main().catch((err: unknown) => {
  console.error(err instanceof Error ? err.message : err);
  process.exit(1);
});
