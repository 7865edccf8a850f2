// A real Kubernetes node for the tests: containerd + runc (Debian), the CNI bridge/host-local plugins (Debian's
// containernetworking-plugins), kubelet and kube-proxy (built from the control plane's Go module), joined to the local
// control plane in node mode. Facts and settings: ../shared/reference/kubelet.md (cited as kubelet.md §n).
//
// Everything a node creates is recorded in <cluster dir>/nodes/<name>/node.json before it is created, so stopNode()
// (and `npm run cluster -- down`) can tear it down after a crash of whoever started it. Host-wide state that the
// kubelet and CNI change (sysctls, paths outside the node's directory, iptables-nft tables) is recorded once, by the
// first node, in <cluster dir>/nodes/host.json and restored when the last node stops.
import { spawn } from 'node:child_process';
import { closeSync, openSync, writeSync } from 'node:fs';
import { mkdir, readdir, readFile, rm, rmdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { KubeConfig, type V1Node, Watch } from '@kubernetes/client-node';
import { stringify } from 'yaml';
import { binaryPath } from '../controlplane/build.ts';
import {
  adminKubeconfigPath,
  type ClusterConfig,
  clusterConfig,
  ensureNodeMode,
  nodeApiserverUrl,
  SERVICE_CIDR,
} from '../controlplane/controlplane.ts';
import { mintUserKubeconfig, pkiPaths } from '../controlplane/pki.ts';
import { exists, pidAlive, readPid, run, sleep, tail, waitFor, withLock } from '../controlplane/util.ts';

/** Pod addresses of all test nodes (kube-proxy's --cluster-cidr); node i gets 10.244.i.0/24. */
export const CLUSTER_CIDR = '10.244.0.0/16';
/** Debian's containernetworking-plugins. */
export const CNI_BIN_DIR = '/usr/lib/cni';
export const SANDBOX_IMAGE = 'stratus.local/pause:1';

export interface StartNodeOptions {
  /** Node name (also the kubelet's hostname override). Default `stratus-node<index>`. */
  name?: string;
  /** 1-based; picks the default pod subnet, bridge, ports and netns link addresses. Default 1. */
  index?: number;
  /**
   * Run the node in a network namespace of this name (created, with a veth to the host; kubelet.md §7). Default:
   * the host's network namespace.
   */
  netns?: string;
  /** OCI archive of `stratus.local/pause:1` (the sandbox image), imported before the kubelet starts. */
  pauseArchive: string;
  /** More OCI archives to import before the kubelet starts. */
  images?: readonly string[];
  /** Default `10.244.<index>.0/24`. */
  podSubnet?: string;
  /** CNI bridge. Default `stkcni<index-1>`. */
  bridge?: string;
  /** Default 17250 + 10 * (index - 1) ($STRATUS_NODE_PORT_BASE moves the base). */
  kubeletPort?: number;
  /** Default kubeletPort + 1 (127.0.0.1). */
  kubeletHealthzPort?: number;
  /** Default kubeletPort + 2 (127.0.0.1). */
  proxyHealthzPort?: number;
  /** Default kubeletPort + 3 (127.0.0.1). */
  proxyMetricsPort?: number;
  /** cgroup (in every v1 hierarchy) holding the node's pods. Default `/stk-<name>`. */
  cgroupRoot?: string;
  /** Default <cluster dir>/nodes/<name>. */
  dir?: string;
  /** Default 180 s. */
  readyTimeoutMs?: number;
  log?: (msg: string) => void;
}

export interface RealNode {
  name: string;
  /** The node's state directory (configs, logs, containerd and kubelet roots). */
  dir: string;
  /** Admin kubeconfig of the cluster the node joined. */
  kubeconfig: string;
  /** The node's InternalIP (where the API server dials the kubelet). */
  nodeIP: string;
  netns?: string;
  podSubnet: string;
  /** containerd's socket (`ctr --address`). */
  containerdSocket: string;
  /** The kubelet's API port (on nodeIP). */
  kubeletPort: number;
  /** Seconds from the kubelet's start to the Node's Ready condition. */
  readySeconds: number;
  /** `ctr -n k8s.io images import <archive>` into this node's containerd. */
  importImage(archive: string): Promise<void>;
  /** Runs `ctr --address <socket> -n k8s.io <args>` and returns its stdout. */
  ctr(args: readonly string[]): Promise<string>;
  /** Stops the node and removes what it created (see stopNode). */
  stop(): Promise<void>;
}

/** What node.json records: enough to tear the node down with nothing else. */
export interface NodeState {
  name: string;
  dir: string;
  netns?: string;
  /** Host end of the netns veth. */
  hostVeth?: string;
  nodeIP: string;
  podSubnet: string;
  bridge: string;
  cgroupRoot: string;
  kubeletPort: number;
  kubeletHealthzPort: number;
  proxyHealthzPort: number;
  proxyMetricsPort: number;
}

/** Host-wide state before the first node started. */
interface HostState {
  sysctls: Record<string, string>;
  /** Paths that did not exist (the kubelet, containerd and libcni create them outside the node's directory). */
  absentPaths: string[];
  /** `family name` of the nft tables that existed. */
  nftTables: string[];
}

const SYSCTLS = [
  'vm.overcommit_memory',
  'vm.panic_on_oom',
  'kernel.panic',
  'kernel.panic_on_oops',
  'kernel.keys.root_maxkeys',
  'kernel.keys.root_maxbytes',
  'net.ipv4.ip_forward',
  'net.ipv4.conf.all.route_localnet',
];

/** Written outside --root-dir by the kubelet (hard-coded), containerd 1.6 and libcni (kubelet.md §1, §4, §6). */
const HOST_PATHS = [
  '/var/lib/kubelet',
  '/var/log/containers',
  '/var/log/pods',
  '/run/containerd',
  '/opt/containerd',
  '/var/lib/cni',
  '/usr/libexec/kubernetes',
];

type Proc = 'containerd' | 'kubelet' | 'kube-proxy';
const PROCS: readonly Proc[] = ['containerd', 'kubelet', 'kube-proxy'];

function nodesDir(cfg: ClusterConfig): string {
  return path.join(cfg.stateDir, 'nodes');
}

function hostStateFile(cfg: ClusterConfig): string {
  return path.join(nodesDir(cfg), 'host.json');
}

function portBase(): number {
  const raw = process.env.STRATUS_NODE_PORT_BASE;
  const n = raw ? Number(raw) : 17250;
  if (!Number.isInteger(n) || n < 1 || n > 65000) throw new Error(`STRATUS_NODE_PORT_BASE=${raw} is not a port`);
  return n;
}

const p = (st: NodeState) => ({
  containerdDir: path.join(st.dir, 'containerd'),
  containerdConfig: path.join(st.dir, 'containerd', 'config.toml'),
  socket: path.join(st.dir, 'containerd', 'containerd.sock'),
  cniConfDir: path.join(st.dir, 'cni', 'net.d'),
  kubeletConfig: path.join(st.dir, 'kubelet', 'config.yaml'),
  kubeletRoot: path.join(st.dir, 'kubelet', 'root'),
  proxyConfig: path.join(st.dir, 'kube-proxy.kubeconfig'),
  logs: path.join(st.dir, 'logs'),
  pid: (c: Proc) => path.join(st.dir, `${c}.pid`),
  log: (c: Proc) => path.join(st.dir, 'logs', `${c}.log`),
});

export function containerdConfig(st: NodeState): string {
  const d = p(st);
  // kubelet.md §1; runc's state under the node's own directory (Root) instead of /run/containerd/runc.
  return `version = 2
root = "${d.containerdDir}/root"
state = "${d.containerdDir}/state"
[grpc]
  address = "${d.socket}"
[ttrpc]
  address = ""
[debug]
  level = "info"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "${SANDBOX_IMAGE}"
  enable_selinux = false
  netns_mounts_under_state_dir = true
  # Root here lacks CAP_SYS_RESOURCE: without this every pod fails (kubelet.md §4).
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "${d.containerdDir}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "${CNI_BIN_DIR}"
    conf_dir = "${d.cniConfDir}"
`;
}

export function cniConflist(st: NodeState): string {
  // No ipMasq: pods only talk to the API host address and to each other, and without it CNI adds no iptables rules.
  return `${JSON.stringify(
    {
      cniVersion: '0.4.0',
      name: `stratus-${st.name}`,
      plugins: [
        {
          type: 'bridge',
          bridge: st.bridge,
          isGateway: true,
          ipMasq: false,
          hairpinMode: true,
          ipam: {
            type: 'host-local',
            dataDir: path.join(st.dir, 'cni', 'ipam'),
            ranges: [[{ subnet: st.podSubnet }]],
            routes: [{ dst: '0.0.0.0/0' }],
          },
        },
        { type: 'portmap', capabilities: { portMappings: true } },
      ],
    },
    null,
    2,
  )}\n`;
}

export function kubeletConfig(st: NodeState, cfg: ClusterConfig): string {
  const d = p(st);
  return stringify({
    apiVersion: 'kubelet.config.k8s.io/v1beta1',
    kind: 'KubeletConfiguration',
    containerRuntimeEndpoint: `unix://${d.socket}`,
    cgroupDriver: 'cgroupfs',
    cgroupRoot: st.cgroupRoot,
    failSwapOn: false,
    failCgroupV1: false,
    podLogsDir: path.join(st.dir, 'kubelet', 'pod-logs'),
    staticPodPath: path.join(st.dir, 'kubelet', 'manifests'),
    volumePluginDir: path.join(st.dir, 'kubelet', 'volume-plugins'),
    address: st.nodeIP,
    port: st.kubeletPort,
    readOnlyPort: 0,
    healthzBindAddress: '127.0.0.1',
    healthzPort: st.kubeletHealthzPort,
    // The API server's client certificate (x509) and service-account tokens (webhook); no anonymous access.
    authentication: {
      anonymous: { enabled: false },
      webhook: { enabled: true },
      x509: { clientCAFile: pkiPaths(cfg.stateDir).caCert },
    },
    authorization: { mode: 'Webhook' },
    clusterDomain: 'cluster.local',
    resolvConf: '/etc/resolv.conf',
    serializeImagePulls: false,
    evictionHard: { 'memory.available': '100Mi', 'nodefs.available': '2%', 'imagefs.available': '2%' },
    imageGCHighThresholdPercent: 98,
    imageGCLowThresholdPercent: 95,
    maxPods: 50,
  });
}

function kubeletArgs(st: NodeState, kubeconfig: string): string[] {
  const d = p(st);
  return [
    `--config=${d.kubeletConfig}`,
    `--kubeconfig=${kubeconfig}`,
    `--root-dir=${d.kubeletRoot}`,
    `--cert-dir=${path.join(st.dir, 'kubelet', 'pki')}`,
    `--hostname-override=${st.name}`,
    `--node-ip=${st.nodeIP}`,
    '--v=2',
  ];
}

function proxyArgs(st: NodeState): string[] {
  return [
    `--kubeconfig=${p(st).proxyConfig}`,
    '--proxy-mode=nftables',
    `--cluster-cidr=${CLUSTER_CIDR}`,
    `--hostname-override=${st.name}`,
    `--bind-address=${st.nodeIP}`,
    // Leave the host's conntrack sysctls alone.
    '--conntrack-max-per-core=0',
    '--conntrack-tcp-timeout-established=0',
    '--conntrack-tcp-timeout-close-wait=0',
    `--healthz-bind-address=127.0.0.1:${st.proxyHealthzPort}`,
    `--metrics-bind-address=127.0.0.1:${st.proxyMetricsPort}`,
  ];
}

async function procPid(st: NodeState, c: Proc): Promise<number | undefined> {
  const pid = await readPid(p(st).pid(c));
  return pid !== undefined && (await pidAlive(pid, c)) ? pid : undefined;
}

async function spawnProc(st: NodeState, c: Proc, args: string[], log: (m: string) => void): Promise<number> {
  const d = p(st);
  const exe = c === 'containerd' ? 'containerd' : binaryPath(c);
  // nsenter execs the program: the pid and argv[0] are the program's. --net only (not `ip netns exec`, which
  // remounts /sys and would hide /sys/fs/cgroup; kubelet.md §7).
  const [file, argv] = st.netns ? ['nsenter', [`--net=/run/netns/${st.netns}`, '--', exe, ...args]] : [exe, args];
  await mkdir(d.logs, { recursive: true });
  const fd = openSync(d.log(c), 'a');
  writeSync(fd, `\n==== ${new Date().toISOString()} starting ${file} ${argv.join(' ')}\n`);
  try {
    const child = spawn(file, argv, { cwd: st.dir, detached: true, stdio: ['ignore', fd, fd] });
    await new Promise<void>((resolve, reject) => {
      child.once('spawn', resolve);
      child.once('error', reject);
    });
    child.unref();
    if (child.pid === undefined) throw new Error(`${c}: no pid`);
    await writeFile(d.pid(c), `${child.pid}\n`);
    log(`node ${st.name}: started ${c} (pid ${child.pid}), log ${d.log(c)}`);
    return child.pid;
  } finally {
    closeSync(fd);
  }
}

async function stopProc(st: NodeState, c: Proc, graceMs: number, log: (m: string) => void): Promise<void> {
  const pid = await procPid(st, c);
  if (pid !== undefined) {
    const kill = (sig: NodeJS.Signals) => {
      try {
        process.kill(pid, sig);
      } catch {
        // gone
      }
    };
    kill('SIGTERM');
    const deadline = Date.now() + graceMs;
    while (Date.now() < deadline && (await pidAlive(pid))) await sleep(100);
    if (await pidAlive(pid)) kill('SIGKILL');
    while (await pidAlive(pid)) await sleep(50);
    log(`node ${st.name}: stopped ${c} (pid ${pid})`);
  }
  await rm(p(st).pid(c), { force: true });
}

/** Runs `ip` in the node's network namespace (or the host's). */
function ipIn(st: Pick<NodeState, 'netns'>, args: readonly string[]) {
  return st.netns ? run('ip', ['-n', st.netns, ...args]) : run('ip', args);
}

async function quiet<T>(f: () => Promise<T>): Promise<T | undefined> {
  try {
    return await f();
  } catch {
    return undefined;
  }
}

/** cgroup v1 hierarchies (mount points of type cgroup) — the kubelet's cgroupfs driver uses all of them. */
async function cgroupV1Mounts(): Promise<string[]> {
  const text = await readFile('/proc/self/mountinfo', 'utf8');
  const out: string[] = [];
  for (const line of text.split('\n')) {
    const [left, right] = line.split(' - ');
    if (!left || !right) continue;
    if (right.split(' ')[0] === 'cgroup') out.push(left.split(' ')[4] as string);
  }
  return out;
}

async function ensureCgroupRoot(root: string): Promise<void> {
  for (const mnt of await cgroupV1Mounts()) {
    const dir = path.join(mnt, root);
    await mkdir(dir, { recursive: true });
    if (path.basename(mnt) === 'cpuset' || mnt.includes('cpuset')) {
      // A new cpuset has no cpus/mems: copy the parent's so tasks can join it.
      for (const f of ['cpuset.cpus', 'cpuset.mems']) {
        const cur = (await readFile(path.join(dir, f), 'utf8')).trim();
        if (cur === '') await writeFile(path.join(dir, f), await readFile(path.join(mnt, f), 'utf8'));
      }
    }
  }
}

/** Kills every process left in the node's cgroups, then removes them deepest first. */
async function removeCgroupRoot(root: string, log: (m: string) => void): Promise<void> {
  for (const mnt of await cgroupV1Mounts()) {
    const top = path.join(mnt, root);
    if (!(await exists(top))) continue;
    const dirs: string[] = [];
    const walk = async (d: string) => {
      dirs.push(d);
      for (const e of await readdir(d, { withFileTypes: true }).catch(() => [])) {
        if (e.isDirectory()) await walk(path.join(d, e.name));
      }
    };
    await walk(top);
    for (const d of dirs.reverse()) {
      await waitFor(
        async () => {
          const procs = (await readFile(path.join(d, 'cgroup.procs'), 'utf8').catch(() => ''))
            .split('\n')
            .filter(Boolean)
            .map(Number);
          for (const pid of procs) await quiet(async () => process.kill(pid, 'SIGKILL'));
          try {
            await rmdir(d);
            return true;
          } catch (err) {
            if ((err as NodeJS.ErrnoException).code === 'ENOENT') return true;
            return undefined;
          }
        },
        10_000,
        async () => new Error(`cannot remove cgroup ${d}`),
        100,
      );
    }
    log(`removed cgroup ${top}`);
  }
}

/** Mount points at or under `dir`, deepest first. */
async function mountsUnder(dir: string): Promise<string[]> {
  return mountPointsUnder(await readFile('/proc/self/mountinfo', 'utf8'), dir);
}

/** Mount points (field 5 of mountinfo, octal escapes decoded) at or under `dir`, deepest first. */
export function mountPointsUnder(text: string, dir: string): string[] {
  const decode = (s: string) =>
    s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(Number.parseInt(o, 8)));
  const mps = text
    .split('\n')
    .map((l) => l.split(' ')[4])
    .filter((m): m is string => m !== undefined)
    .map(decode)
    .filter((m) => m === dir || m.startsWith(`${dir}/`));
  return [...new Set(mps)].sort((a, b) => b.length - a.length);
}

async function unmountUnder(dir: string, log: (m: string) => void): Promise<void> {
  // A mount can be stacked several times (the kubelet bind-mounts its root-dir onto itself): loop until none left.
  for (let round = 0; round < 20; round++) {
    const mps = await mountsUnder(dir);
    if (mps.length === 0) return;
    for (const m of mps) {
      if ((await quiet(() => run('umount', [m]))) === undefined) await quiet(() => run('umount', ['-l', m]));
    }
    if (round === 0) log(`unmounted ${mps.length} mount(s) under ${dir}`);
  }
  throw new Error(`mounts left under ${dir}: ${(await mountsUnder(dir)).join(', ')}`);
}

/** containerd shims serving this node's containerd (they outlive containerd). */
async function shimPids(socket: string): Promise<number[]> {
  const out: number[] = [];
  for (const e of await readdir('/proc')) {
    const pid = Number(e);
    if (!Number.isInteger(pid)) continue;
    const argv = (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0');
    if (!argv[0]?.includes('containerd-shim')) continue;
    const i = argv.indexOf('-address');
    if (i >= 0 && argv[i + 1] === socket) out.push(pid);
  }
  return out;
}

async function nftTables(): Promise<string[]> {
  const { stdout } = await run('nft', ['-j', 'list', 'tables']);
  const items = (JSON.parse(stdout) as { nftables: { table?: { family: string; name: string } }[] }).nftables;
  return items.flatMap((i) => (i.table ? [`${i.table.family} ${i.table.name}`] : []));
}

/** Chain names of an nft table. */
async function nftChains(table: string): Promise<string[]> {
  const [family, name] = table.split(' ') as [string, string];
  const { stdout } = await run('nft', ['-j', 'list', 'table', family, name]);
  const items = (JSON.parse(stdout) as { nftables: { chain?: { name: string } }[] }).nftables;
  return items.flatMap((i) => (i.chain ? [i.chain.name] : []));
}

async function recordHostState(cfg: ClusterConfig): Promise<void> {
  const file = hostStateFile(cfg);
  if (await exists(file)) return;
  const sysctls: Record<string, string> = {};
  for (const s of SYSCTLS) {
    const v = await quiet(() => readFile(path.join('/proc/sys', ...s.split('.')), 'utf8'));
    if (v !== undefined) sysctls[s] = v.trim();
  }
  const absentPaths: string[] = [];
  for (const f of HOST_PATHS) if (!(await exists(f))) absentPaths.push(f);
  const state: HostState = { sysctls, absentPaths, nftTables: await nftTables() };
  await writeFile(file, `${JSON.stringify(state, null, 2)}\n`);
}

/**
 * True for an nft table that the nodes made (and that did not exist before): kube-proxy's, or an iptables-nft table
 * holding nothing but the kubelet's KUBE-* (and CNI-*) chains besides the base chains.
 */
export function madeByNodes(table: string, chains: readonly string[]): boolean {
  if (table === 'ip kube-proxy' || table === 'ip6 kube-proxy') return true;
  return chains.every((c) => /^(KUBE-|CNI-)/.test(c) || /^(INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING)$/.test(c));
}

/** Restores what the first node recorded; called when no node is left. */
async function restoreHostState(cfg: ClusterConfig, log: (m: string) => void): Promise<void> {
  const file = hostStateFile(cfg);
  const raw = await quiet(() => readFile(file, 'utf8'));
  if (raw === undefined) return;
  const state = JSON.parse(raw) as HostState;
  for (const [k, v] of Object.entries(state.sysctls)) {
    const f = path.join('/proc/sys', ...k.split('.'));
    const now = (await quiet(() => readFile(f, 'utf8')))?.trim();
    if (now !== undefined && now !== v) {
      await writeFile(f, `${v}\n`);
      log(`restored ${k} ${now} -> ${v}`);
    }
  }
  // Tables the node made: kube-proxy's own, and the iptables-nft tables the kubelet fills with KUBE-* chains.
  for (const t of await nftTables()) {
    if (state.nftTables.includes(t)) continue;
    const chains = (await quiet(() => nftChains(t))) ?? [];
    if (!madeByNodes(t, chains)) {
      log(`nft table ${t} holds foreign chains (${chains.join(', ')}): left alone`);
      continue;
    }
    await run('nft', ['delete', 'table', ...t.split(' ')]);
    log(`deleted nft table ${t}`);
  }
  for (const f of state.absentPaths) {
    if (await exists(f)) {
      await unmountUnder(f, log);
      await rm(f, { recursive: true, force: true });
      log(`removed ${f}`);
    }
  }
  await rm(file, { force: true });
}

async function readState(file: string): Promise<NodeState | undefined> {
  const raw = await quiet(() => readFile(file, 'utf8'));
  return raw === undefined ? undefined : (JSON.parse(raw) as NodeState);
}

/** Node state directories of this cluster. */
async function nodeDirs(cfg: ClusterConfig): Promise<string[]> {
  const entries = await readdir(nodesDir(cfg), { withFileTypes: true }).catch(() => []);
  return entries.filter((e) => e.isDirectory()).map((e) => path.join(nodesDir(cfg), e.name));
}

function nodesLock(cfg: ClusterConfig): string {
  return path.join(nodesDir(cfg), '.lock');
}

async function waitReady(kubeconfig: string, name: string, timeoutMs: number, logFile: string): Promise<void> {
  const kc = new KubeConfig();
  kc.loadFromFile(kubeconfig);
  const isReady = (n: V1Node | undefined) =>
    n?.status?.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') ?? false;
  await new Promise<void>((resolve, reject) => {
    let done = false;
    let req: { abort(): void } | undefined;
    const finish = (err?: Error) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      req?.abort();
      if (err) reject(err);
      else resolve();
    };
    const timer = setTimeout(async () => {
      finish(new Error(`node ${name} not Ready after ${timeoutMs / 1000} s; kubelet log:\n${await tail(logFile, 30)}`));
    }, timeoutMs);
    const start = () => {
      if (done) return;
      new Watch(kc)
        .watch(
          '/api/v1/nodes',
          { fieldSelector: `metadata.name=${name}` },
          (_type, obj: V1Node) => {
            if (isReady(obj)) finish();
          },
          // The watch ends (timeout, or a restart of the API server): start another.
          () => start(),
        )
        .then((r) => {
          req = r;
          if (done) r.abort();
        })
        .catch(() => setTimeout(start, 500));
    };
    start();
  });
}

/**
 * Starts a node and waits until its Node is Ready. Brings the control plane up in node mode first (restarting the
 * API server if it ran without it). Needs root.
 */
export async function startNode(opts: StartNodeOptions): Promise<RealNode> {
  const log = opts.log ?? ((m: string) => console.error(m));
  await ensureNodeMode({ log });
  const cfg = clusterConfig();
  const index = opts.index ?? 1;
  const name = opts.name ?? `stratus-node${index}`;
  const dir = opts.dir ?? path.join(nodesDir(cfg), name);
  const kubeletPort = opts.kubeletPort ?? portBase() + 10 * (index - 1);
  const st: NodeState = {
    name,
    dir,
    netns: opts.netns,
    hostVeth: opts.netns ? `stkv${index}` : undefined,
    // In a netns: a /30 per node to the host; on the host: the API host address (node and control plane share
    // the host, as on a real machine).
    nodeIP: opts.netns ? `172.31.254.${4 * index + 2}` : cfg.apiHost.address,
    podSubnet: opts.podSubnet ?? `10.244.${index}.0/24`,
    bridge: opts.bridge ?? `stkcni${index - 1}`,
    cgroupRoot: opts.cgroupRoot ?? `/stk-${name}`,
    kubeletPort,
    kubeletHealthzPort: opts.kubeletHealthzPort ?? kubeletPort + 1,
    proxyHealthzPort: opts.proxyHealthzPort ?? kubeletPort + 2,
    proxyMetricsPort: opts.proxyMetricsPort ?? kubeletPort + 3,
  };
  const d = p(st);
  const stateFile = path.join(dir, 'node.json');
  await mkdir(nodesDir(cfg), { recursive: true });
  const startedAt = await withLock(nodesLock(cfg), 10 * 60_000, async () => {
    // A node of this name left by a crash: tear it down first.
    if (await exists(stateFile)) await teardown(cfg, stateFile, log);
    await recordHostState(cfg);
    for (const sub of ['containerd', 'cni/net.d', 'kubelet/manifests', 'kubelet/pod-logs', 'logs']) {
      await mkdir(path.join(dir, sub), { recursive: true });
    }
    await writeFile(stateFile, `${JSON.stringify(st, null, 2)}\n`);

    if (st.netns) {
      const hostIP = `172.31.254.${4 * index + 1}`;
      await run('ip', ['netns', 'add', st.netns]);
      await run('ip', [
        'link',
        'add',
        st.hostVeth as string,
        'type',
        'veth',
        'peer',
        'name',
        'eth0',
        'netns',
        st.netns,
      ]);
      await run('ip', ['addr', 'add', `${hostIP}/30`, 'dev', st.hostVeth as string]);
      await run('ip', ['link', 'set', st.hostVeth as string, 'up']);
      await ipIn(st, ['addr', 'add', `${st.nodeIP}/30`, 'dev', 'eth0']);
      await ipIn(st, ['link', 'set', 'eth0', 'up']);
      await ipIn(st, ['link', 'set', 'lo', 'up']);
      await ipIn(st, ['route', 'add', 'default', 'via', hostIP]);
      await run('ip', ['route', 'add', st.podSubnet, 'via', st.nodeIP]);
    }
    await ensureCgroupRoot(st.cgroupRoot);
    await writeFile(d.containerdConfig, containerdConfig(st));
    await writeFile(path.join(d.cniConfDir, '10-stratus.conflist'), cniConflist(st));
    await writeFile(d.kubeletConfig, kubeletConfig(st, cfg));

    // Identities: the Node authorizer's system:node:<name>, and kube-proxy's bootstrap system:kube-proxy.
    const server = nodeApiserverUrl(cfg);
    const kubeletKubeconfig = await mintUserKubeconfig(cfg.stateDir, server, `system:node:${name}`, ['system:nodes']);
    const proxyUserConfig = await mintUserKubeconfig(cfg.stateDir, server, 'system:kube-proxy');
    await writeFile(d.proxyConfig, await readFile(proxyUserConfig));

    await spawnProc(st, 'containerd', ['--config', d.containerdConfig], log);
    await waitFor(
      async () => ((await quiet(() => run('ctr', ['--address', d.socket, 'version']))) ? true : undefined),
      30_000,
      async () => new Error(`containerd did not answer on ${d.socket}:\n${await tail(d.log('containerd'), 20)}`),
      100,
    );
    for (const archive of [opts.pauseArchive, ...(opts.images ?? [])]) await importInto(d.socket, archive);
    const t = Date.now();
    await spawnProc(st, 'kubelet', kubeletArgs(st, kubeletKubeconfig), log);
    await spawnProc(st, 'kube-proxy', proxyArgs(st), log);
    return t;
  });
  try {
    await waitReady(adminKubeconfigPath(cfg), name, opts.readyTimeoutMs ?? 180_000, d.log('kubelet'));
  } catch (err) {
    await stopNode(name, { log }).catch(() => {});
    throw err;
  }
  const readySeconds = (Date.now() - startedAt) / 1000;
  log(`node ${name} Ready ${readySeconds.toFixed(1)} s after the kubelet started`);
  return {
    name,
    dir,
    kubeconfig: adminKubeconfigPath(cfg),
    nodeIP: st.nodeIP,
    netns: st.netns,
    podSubnet: st.podSubnet,
    kubeletPort: st.kubeletPort,
    containerdSocket: d.socket,
    readySeconds,
    importImage: (archive) => importInto(d.socket, archive),
    ctr: async (args) => (await run('ctr', ['--address', d.socket, '-n', 'k8s.io', ...args])).stdout,
    stop: () => stopNode(name, { log }),
  };
}

async function importInto(socket: string, archive: string): Promise<void> {
  if (!(await exists(archive))) throw new Error(`image archive ${archive} not found`);
  await run('ctr', ['--address', socket, '-n', 'k8s.io', 'images', 'import', archive], { timeoutMs: 600_000 });
}

/** Deletes the Node and force-deletes its pods (their containers are killed below, with the node's cgroups). */
async function forgetNode(cfg: ClusterConfig, name: string): Promise<void> {
  const kubeconfig = adminKubeconfigPath(cfg);
  if (!(await exists(kubeconfig))) return;
  const kc = new KubeConfig();
  kc.loadFromFile(kubeconfig);
  const { CoreV1Api } = await import('@kubernetes/client-node');
  const api = kc.makeApiClient(CoreV1Api);
  // The API server may be down (a crash, or `down` after it stopped): then there is nothing to forget.
  await quiet(() => api.deleteNode({ name }));
  const pods = await quiet(() => api.listPodForAllNamespaces({ fieldSelector: `spec.nodeName=${name}` }));
  for (const pod of pods?.items ?? []) {
    await quiet(() =>
      api.deleteNamespacedPod({
        name: pod.metadata?.name as string,
        namespace: pod.metadata?.namespace as string,
        gracePeriodSeconds: 0,
      }),
    );
  }
}

/**
 * Tears a node down, in this order (kubelet.md §8.3): kube-proxy and the kubelet stop; the Node and its pods are
 * deleted from the API; containerd stops and its shims and every process left in the node's cgroups are killed;
 * everything mounted under the node's directory is unmounted; the cgroups, the CNI bridge, the netns and the node's
 * directory are removed. The last node also restores sysctls, host paths and nft tables (host.json).
 */
async function teardown(cfg: ClusterConfig, stateFile: string, log: (m: string) => void): Promise<void> {
  const st = await readState(stateFile);
  if (st === undefined) return;
  const d = p(st);
  await stopProc(st, 'kube-proxy', 5_000, log);
  await stopProc(st, 'kubelet', 10_000, log);
  await forgetNode(cfg, st.name);
  await stopProc(st, 'containerd', 10_000, log);
  for (const pid of await shimPids(d.socket)) await quiet(async () => process.kill(pid, 'SIGKILL'));
  await removeCgroupRoot(st.cgroupRoot, log);
  await unmountUnder(st.dir, log);
  if (st.netns) {
    await quiet(() => run('ip', ['route', 'del', st.podSubnet]));
    await quiet(() => run('ip', ['netns', 'del', st.netns as string]));
    if (st.hostVeth) await quiet(() => run('ip', ['link', 'del', st.hostVeth as string]));
  } else {
    await quiet(() => run('ip', ['link', 'del', st.bridge]));
    await quiet(() => run('nft', ['delete', 'table', 'ip', 'kube-proxy']));
    await quiet(() => run('nft', ['delete', 'table', 'ip6', 'kube-proxy']));
  }
  await rm(st.dir, { recursive: true, force: true });
  log(`node ${st.name}: removed ${st.dir}`);
}

/** Stops one node (idempotent; works from node.json alone, e.g. after a crash). */
export async function stopNode(name: string, opts: { log?: (m: string) => void } = {}): Promise<void> {
  const log = opts.log ?? ((m: string) => console.error(m));
  const cfg = clusterConfig();
  if (!(await exists(nodesDir(cfg)))) return;
  await withLock(nodesLock(cfg), 10 * 60_000, async () => {
    for (const dir of await nodeDirs(cfg)) {
      const st = await readState(path.join(dir, 'node.json'));
      if (st?.name === name || (st === undefined && path.basename(dir) === name)) {
        await teardown(cfg, path.join(dir, 'node.json'), log);
        if (st === undefined) await rm(dir, { recursive: true, force: true });
      }
    }
    if ((await nodeDirs(cfg)).length === 0) await restoreHostState(cfg, log);
  });
}

/** Stops every node of this cluster and restores the host (idempotent). */
export async function stopAllNodes(opts: { log?: (m: string) => void } = {}): Promise<void> {
  const log = opts.log ?? ((m: string) => console.error(m));
  const cfg = clusterConfig();
  if (!(await exists(nodesDir(cfg)))) return;
  await withLock(nodesLock(cfg), 10 * 60_000, async () => {
    for (const dir of await nodeDirs(cfg)) {
      await teardown(cfg, path.join(dir, 'node.json'), log);
      await rm(dir, { recursive: true, force: true });
    }
    await restoreHostState(cfg, log);
  });
  await rm(nodesDir(cfg), { recursive: true, force: true });
}

export interface NodeStatus {
  name: string;
  dir: string;
  running: boolean;
  components: string;
}

export async function listNodes(): Promise<NodeStatus[]> {
  const cfg = clusterConfig();
  const out: NodeStatus[] = [];
  for (const dir of await nodeDirs(cfg)) {
    const st = await readState(path.join(dir, 'node.json'));
    if (!st) continue;
    const live = await Promise.all(PROCS.map(async (c) => `${c} ${(await procPid(st, c)) ?? '-'}`));
    const running = (await Promise.all(PROCS.map((c) => procPid(st, c)))).every((x) => x !== undefined);
    out.push({ name: st.name, dir, running, components: live.join(', ') });
  }
  return out;
}

export { SERVICE_CIDR };
