// Lifecycle of the local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager) used by the
// integration and e2e tests and by people: `npm run cluster -- up|down|status|kubeconfig|env|build`.
// In node mode (`up({ node: true })`, for e2e/node) it also runs kube-scheduler and the workload controllers, and
// serves the API on a non-loopback host address so that pods reach it through the `kubernetes` Service.
import { spawn } from 'node:child_process';
import { closeSync, openSync, writeSync } from 'node:fs';
import { mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { type Binary, binaryPath, buildAll, repoRoot } from './build.ts';
import { ensurePki, FRONT_PROXY_CLIENT, mintUserKubeconfig, type PkiPaths, pkiPaths, writeKubeconfig } from './pki.ts';
import { exists, pidAlive, portInUse, probe, readPid, run, sleep, tail, waitFor, withLock } from './util.ts';

export { helmPath, kubectlPath } from './build.ts';

export const SERVICE_CIDR = '10.96.0.0/16';
export const SERVICE_ACCOUNT_ISSUER = 'https://kubernetes.default.svc.cluster.local';

/** Controllers run by kube-controller-manager (names as accepted by 1.34 `--controllers`). */
export const CONTROLLERS = [
  'garbage-collector-controller',
  'namespace-controller',
  'serviceaccount-controller',
  'serviceaccount-token-controller',
  'clusterrole-aggregation-controller',
  'root-ca-certificate-publisher-controller',
] as const;

/**
 * Controllers added in node mode: what Deployments, DaemonSets, Services and PodDisruptionBudgets need (helm install
 * --wait of the chart), the node lifecycle (removes the not-ready taint, marks dead nodes) and pod GC.
 */
export const NODE_CONTROLLERS = [
  'deployment-controller',
  'replicaset-controller',
  'daemonset-controller',
  'node-lifecycle-controller',
  'taint-eviction-controller',
  'endpoints-controller',
  'endpointslice-controller',
  'pod-garbage-collector-controller',
  'disruption-controller',
] as const;

/**
 * Where pods and nodes reach the API server in node mode: a /32 on an interface of its own on the host (a bridge
 * without ports: these kernels have no `dummy` driver).
 */
export interface ApiHost {
  iface: string;
  address: string;
}

export interface ClusterConfig {
  stateDir: string;
  etcdPort: number;
  etcdPeerPort: number;
  apiserverPort: number;
  controllerManagerPort: number;
  schedulerPort: number;
  /** The API host address of node mode (configured even when node mode is off: it is in the serving cert). */
  apiHost: ApiHost;
  /** Node mode on: scheduler, workload controllers, API served on apiHost too. */
  node: boolean;
}

function envPort(name: string, fallback: number): number {
  const raw = process.env[name];
  if (!raw) return fallback;
  const port = Number(raw);
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new Error(`${name}=${raw} is not a TCP port`);
  return port;
}

/** Settings from the environment: STRATUS_CLUSTER_DIR, STRATUS_ETCD_PORT, STRATUS_ETCD_PEER_PORT, ... */
export function clusterConfig(): ClusterConfig {
  return {
    stateDir: path.resolve(process.env.STRATUS_CLUSTER_DIR || path.join(repoRoot, '.cluster')),
    etcdPort: envPort('STRATUS_ETCD_PORT', 23790),
    etcdPeerPort: envPort('STRATUS_ETCD_PEER_PORT', 23800),
    apiserverPort: envPort('STRATUS_APISERVER_PORT', 16443),
    controllerManagerPort: envPort('STRATUS_KCM_PORT', 16457),
    schedulerPort: envPort('STRATUS_SCHEDULER_PORT', envPort('STRATUS_KCM_PORT', 16457) + 100),
    apiHost: {
      iface: process.env.STRATUS_API_HOST_IFACE || 'stkapi0',
      address: process.env.STRATUS_API_HOST_ADDRESS || '172.31.253.1',
    },
    node: false,
  };
}

/** Records that the cluster runs in node mode, until `down`. */
function nodeModeFile(cfg: ClusterConfig): string {
  return path.join(cfg.stateDir, 'node-mode.json');
}

/** The configuration with `node` as recorded in the state directory (by `up({ node: true })`). */
export async function effectiveConfig(cfg = clusterConfig()): Promise<ClusterConfig> {
  return { ...cfg, node: await exists(nodeModeFile(cfg)) };
}

/** `https://<api host address>:<port>`: the URL nodes (also in other network namespaces) use. */
export function nodeApiserverUrl(cfg = clusterConfig()): string {
  return `https://${cfg.apiHost.address}:${cfg.apiserverPort}`;
}

async function linkExists(iface: string): Promise<boolean> {
  return exists(path.join('/sys/class/net', iface));
}

/** Creates the interface holding the API host address (idempotent; needs root). */
async function ensureApiHost(h: ApiHost): Promise<void> {
  if (!(await linkExists(h.iface))) await run('ip', ['link', 'add', h.iface, 'type', 'bridge']);
  const { stdout } = await run('ip', ['-j', 'addr', 'show', 'dev', h.iface]);
  const addrs = (JSON.parse(stdout) as { addr_info?: { local?: string }[] }[]).flatMap((l) => l.addr_info ?? []);
  if (!addrs.some((a) => a.local === h.address)) await run('ip', ['addr', 'add', `${h.address}/32`, 'dev', h.iface]);
  await run('ip', ['link', 'set', h.iface, 'up']);
}

async function removeApiHost(h: ApiHost, log: (m: string) => void): Promise<void> {
  if (!(await linkExists(h.iface))) return;
  await run('ip', ['link', 'del', h.iface]);
  log(`removed ${h.iface} (${h.address})`);
}

/** The documented admin kubeconfig (CN=stratus-admin, O=system:masters). */
export function adminKubeconfigPath(cfg = clusterConfig()): string {
  return path.join(cfg.stateDir, 'admin.kubeconfig');
}

export function apiserverUrl(cfg = clusterConfig()): string {
  return `https://127.0.0.1:${cfg.apiserverPort}`;
}

function kcmKubeconfigPath(cfg: ClusterConfig): string {
  return path.join(cfg.stateDir, 'kube-controller-manager.kubeconfig');
}

function schedulerKubeconfigPath(cfg: ClusterConfig): string {
  return path.join(cfg.stateDir, 'kube-scheduler.kubeconfig');
}

// ---- components ----

interface Component {
  name: Binary;
  /** Ports it listens on (checked before starting so a foreign listener gives a clear error). */
  ports: (cfg: ClusterConfig) => { port: number; env: string }[];
  args: (cfg: ClusterConfig, pki: PkiPaths) => string[];
  healthUrl: (cfg: ClusterConfig) => string;
  healthy: (cfg: ClusterConfig, pki: PkiPaths) => Promise<boolean>;
  startTimeoutMs: number;
  stopGraceMs: number;
}

async function adminProbe(cfg: ClusterConfig, pki: PkiPaths, urlPath: string) {
  const [ca, cert, key] = await Promise.all([pki.caCert, pki.adminCert, pki.adminKey].map((f) => readFile(f)));
  return probe(`${apiserverUrl(cfg)}${urlPath}`, { ca, cert, key });
}

const etcd: Component = {
  name: 'etcd',
  ports: (cfg) => [
    { port: cfg.etcdPort, env: 'STRATUS_ETCD_PORT' },
    { port: cfg.etcdPeerPort, env: 'STRATUS_ETCD_PEER_PORT' },
  ],
  args: (cfg) => {
    const client = `http://127.0.0.1:${cfg.etcdPort}`;
    const peer = `http://127.0.0.1:${cfg.etcdPeerPort}`;
    const args = [
      '--name=stratus',
      `--data-dir=${path.join(cfg.stateDir, 'etcd')}`,
      `--listen-client-urls=${client}`,
      `--advertise-client-urls=${client}`,
      `--listen-peer-urls=${peer}`,
      `--initial-advertise-peer-urls=${peer}`,
      `--initial-cluster=stratus=${peer}`,
      '--initial-cluster-state=new',
      '--log-level=warn',
    ];
    // A throwaway test cluster: skip fsync unless asked (much faster on VM disks).
    if (!process.env.STRATUS_ETCD_FSYNC) args.push('--unsafe-no-fsync');
    return args;
  },
  healthUrl: (cfg) => `http://127.0.0.1:${cfg.etcdPort}/health`,
  healthy: async (cfg) => {
    const r = await probe(`http://127.0.0.1:${cfg.etcdPort}/health`);
    return r.status === 200 && r.body.includes('"health":"true"');
  },
  startTimeoutMs: 30_000,
  stopGraceMs: 10_000,
};

const apiserver: Component = {
  name: 'kube-apiserver',
  ports: (cfg) => [{ port: cfg.apiserverPort, env: 'STRATUS_APISERVER_PORT' }],
  args: (cfg, pki) => [
    // Node mode: pods and nodes (also in other network namespaces) reach it on the API host address, which the
    // lease endpoint reconciler publishes as the `kubernetes` Service's endpoint (kube-proxy does the rest).
    ...(cfg.node
      ? ['--bind-address=0.0.0.0', `--advertise-address=${cfg.apiHost.address}`]
      : [
          '--bind-address=127.0.0.1',
          '--advertise-address=127.0.0.1',
          // The `kubernetes` Endpoints may not hold a loopback address, and nothing in this cluster dials the Service.
          '--endpoint-reconciler-type=none',
        ]),
    `--secure-port=${cfg.apiserverPort}`,
    `--etcd-servers=http://127.0.0.1:${cfg.etcdPort}`,
    // ConfigMaps are watched straight from etcd (no watch cache), so after a compaction a watch from an old
    // resourceVersion gets a real 410 Gone however young the cluster is (the relist test relies on it).
    '--watch-cache-sizes=configmaps#0',
    `--tls-cert-file=${pki.serverCert}`,
    `--tls-private-key-file=${pki.serverKey}`,
    `--client-ca-file=${pki.caCert}`,
    '--authorization-mode=RBAC,Node',
    `--service-account-issuer=${SERVICE_ACCOUNT_ISSUER}`,
    `--service-account-key-file=${pki.saPub}`,
    `--service-account-signing-key-file=${pki.saKey}`,
    `--service-cluster-ip-range=${SERVICE_CIDR}`,
    '--allow-privileged=true',
    '--profiling=false',
    // logs/exec/port-forward: the kubelets authenticate this client (x509) and authorize it (system:masters).
    `--kubelet-client-certificate=${pki.kubeletClientCert}`,
    `--kubelet-client-key=${pki.kubeletClientKey}`,
    // Test nodes' names do not resolve: dial their InternalIP.
    '--kubelet-preferred-address-types=InternalIP,Hostname',
    `--requestheader-client-ca-file=${pki.frontProxyCaCert}`,
    `--requestheader-allowed-names=${FRONT_PROXY_CLIENT}`,
    '--requestheader-username-headers=X-Remote-User',
    '--requestheader-group-headers=X-Remote-Group',
    '--requestheader-extra-headers-prefix=X-Remote-Extra-',
    `--proxy-client-cert-file=${pki.frontProxyClientCert}`,
    `--proxy-client-key-file=${pki.frontProxyClientKey}`,
  ],
  healthUrl: (cfg) => `${apiserverUrl(cfg)}/readyz`,
  healthy: async (cfg, pki) => {
    const r = await adminProbe(cfg, pki, '/readyz');
    return r.status === 200 && r.body.trim() === 'ok';
  },
  startTimeoutMs: 120_000,
  // It keeps no state, and with clients watching it lingers for up to the request timeout (60 s) draining
  // connections after SIGTERM: kill it soon after so restart tests stay fast.
  stopGraceMs: 3_000,
};

const controllerManager: Component = {
  name: 'kube-controller-manager',
  ports: (cfg) => [{ port: cfg.controllerManagerPort, env: 'STRATUS_KCM_PORT' }],
  args: (cfg, pki) => [
    `--kubeconfig=${kcmKubeconfigPath(cfg)}`,
    `--authentication-kubeconfig=${kcmKubeconfigPath(cfg)}`,
    `--authorization-kubeconfig=${kcmKubeconfigPath(cfg)}`,
    '--bind-address=127.0.0.1',
    `--secure-port=${cfg.controllerManagerPort}`,
    `--cert-dir=${path.join(cfg.stateDir, 'pki', 'kube-controller-manager-serving')}`,
    '--leader-elect=false',
    `--controllers=${controllers(cfg).join(',')}`,
    // Each controller acts as its own service account with the bootstrap system:controller:* roles.
    '--use-service-account-credentials=true',
    `--service-account-private-key-file=${pki.saKey}`,
    `--root-ca-file=${pki.caCert}`,
  ],
  healthUrl: (cfg) => `https://127.0.0.1:${cfg.controllerManagerPort}/healthz`,
  healthy: async (cfg) => {
    const r = await probe(`https://127.0.0.1:${cfg.controllerManagerPort}/healthz`, { insecure: true });
    return r.status === 200 && r.body.trim() === 'ok';
  },
  startTimeoutMs: 60_000,
  stopGraceMs: 10_000,
};

export function controllers(cfg: ClusterConfig): string[] {
  return cfg.node ? [...CONTROLLERS, ...NODE_CONTROLLERS] : [...CONTROLLERS];
}

const scheduler: Component = {
  name: 'kube-scheduler',
  ports: (cfg) => [{ port: cfg.schedulerPort, env: 'STRATUS_SCHEDULER_PORT' }],
  args: (cfg) => [
    `--kubeconfig=${schedulerKubeconfigPath(cfg)}`,
    `--authentication-kubeconfig=${schedulerKubeconfigPath(cfg)}`,
    `--authorization-kubeconfig=${schedulerKubeconfigPath(cfg)}`,
    '--bind-address=127.0.0.1',
    `--secure-port=${cfg.schedulerPort}`,
    '--leader-elect=false',
  ],
  healthUrl: (cfg) => `https://127.0.0.1:${cfg.schedulerPort}/healthz`,
  healthy: async (cfg) => {
    const r = await probe(`https://127.0.0.1:${cfg.schedulerPort}/healthz`, { insecure: true });
    return r.status === 200 && r.body.trim() === 'ok';
  },
  startTimeoutMs: 60_000,
  stopGraceMs: 10_000,
};

/** The command-line flags of a component in this configuration (for tests). */
export function componentArgs(name: Binary, cfg: ClusterConfig, pki: PkiPaths): string[] {
  const c = ALL_COMPONENTS.find((x) => x.name === name);
  if (!c) throw new Error(`${name} is not a control-plane component`);
  return c.args(cfg, pki);
}

/** Every component that may run, in start order (stop in reverse). */
const ALL_COMPONENTS: readonly Component[] = [etcd, apiserver, controllerManager, scheduler];

/** The components of this mode, in start order. */
function components(cfg: ClusterConfig): readonly Component[] {
  return cfg.node ? ALL_COMPONENTS : [etcd, apiserver, controllerManager];
}

function pidFile(cfg: ClusterConfig, c: Component): string {
  return path.join(cfg.stateDir, `${c.name}.pid`);
}

export function logFile(name: Binary, cfg = clusterConfig()): string {
  return path.join(cfg.stateDir, 'logs', `${name}.log`);
}

/** Pid of the component if it is running (pid file present and the process is that binary). */
async function runningPid(cfg: ClusterConfig, c: Component): Promise<number | undefined> {
  const pid = await readPid(pidFile(cfg, c));
  return pid !== undefined && (await pidAlive(pid, c.name)) ? pid : undefined;
}

async function rotateLog(file: string): Promise<void> {
  try {
    if ((await stat(file)).size > 20 * 1024 * 1024) await rename(file, `${file}.1`);
  } catch {
    // no log yet
  }
}

async function startComponent(cfg: ClusterConfig, pki: PkiPaths, c: Component, log: (m: string) => void) {
  for (const { port, env } of c.ports(cfg)) {
    // A component just stopped may hold its port for a moment: a Go process's leader thread is a zombie (which
    // pidAlive counts as gone) until its other threads have exited and closed its sockets.
    const deadline = Date.now() + 5_000;
    while ((await portInUse(port)) && Date.now() < deadline) await sleep(100);
    if (await portInUse(port)) {
      throw new Error(
        `cannot start ${c.name}: 127.0.0.1:${port} is already in use by another process ` +
          `(another cluster or clone?). Stop it or set ${env} to a free port.`,
      );
    }
  }
  const logPath = logFile(c.name, cfg);
  await mkdir(path.dirname(logPath), { recursive: true });
  await rotateLog(logPath);
  const fd = openSync(logPath, 'a');
  const args = c.args(cfg, pki);
  writeSync(fd, `\n==== ${new Date().toISOString()} starting ${binaryPath(c.name)} ${args.join(' ')}\n`);
  try {
    const child = spawn(binaryPath(c.name), args, {
      cwd: cfg.stateDir,
      detached: true, // own process group: survives the starting process and is stopped as a group
      stdio: ['ignore', fd, fd],
      env: { ...process.env, GOTRACEBACK: 'all' },
    });
    await new Promise<void>((resolve, reject) => {
      child.once('spawn', resolve);
      child.once('error', reject);
    });
    child.unref();
    await writeFile(pidFile(cfg, c), `${child.pid}\n`);
    log(`started ${c.name} (pid ${child.pid}), log ${logPath}`);
  } finally {
    closeSync(fd);
  }
}

async function waitHealthy(cfg: ClusterConfig, pki: PkiPaths, c: Component, timeoutMs = c.startTimeoutMs) {
  await waitFor(
    async () => {
      if (await c.healthy(cfg, pki)) return true;
      if ((await runningPid(cfg, c)) === undefined) {
        throw new Error(
          `${c.name} exited during startup; last lines of ${logFile(c.name, cfg)}:\n${await tail(logFile(c.name, cfg), 25)}`,
        );
      }
      return undefined;
    },
    timeoutMs,
    async () =>
      new Error(
        `${c.name} not healthy at ${c.healthUrl(cfg)} after ${timeoutMs / 1000} s; ` +
          `last lines of ${logFile(c.name, cfg)}:\n${await tail(logFile(c.name, cfg), 25)}`,
      ),
  );
}

async function stopComponent(cfg: ClusterConfig, c: Component, log: (m: string) => void): Promise<boolean> {
  const pid = await runningPid(cfg, c);
  if (pid === undefined) {
    await rm(pidFile(cfg, c), { force: true });
    return false;
  }
  const signal = (sig: NodeJS.Signals) => {
    try {
      process.kill(-pid, sig); // the process group created by detached spawn
    } catch {
      try {
        process.kill(pid, sig);
      } catch {
        // already gone
      }
    }
  };
  signal('SIGTERM');
  const deadline = Date.now() + c.stopGraceMs;
  while (Date.now() < deadline && (await pidAlive(pid))) await sleep(100);
  if (await pidAlive(pid)) {
    log(`${c.name} (pid ${pid}) still running ${c.stopGraceMs / 1000} s after SIGTERM: SIGKILL`);
    signal('SIGKILL');
    while (await pidAlive(pid)) await sleep(50);
  }
  await rm(pidFile(cfg, c), { force: true });
  log(`stopped ${c.name} (pid ${pid})`);
  return true;
}

async function writeKubeconfigs(cfg: ClusterConfig, pki: PkiPaths): Promise<void> {
  const server = apiserverUrl(cfg);
  await writeKubeconfig(adminKubeconfigPath(cfg), {
    server,
    caCert: pki.caCert,
    clientCert: pki.adminCert,
    clientKey: pki.adminKey,
    user: 'stratus-admin',
  });
  await writeKubeconfig(kcmKubeconfigPath(cfg), {
    server,
    caCert: pki.caCert,
    clientCert: pki.kcmCert,
    clientKey: pki.kcmKey,
    user: 'system:kube-controller-manager',
  });
  await writeKubeconfig(schedulerKubeconfigPath(cfg), {
    server,
    caCert: pki.caCert,
    clientCert: pki.schedulerCert,
    clientKey: pki.schedulerKey,
    user: 'system:kube-scheduler',
  });
}

function lockPath(cfg: ClusterConfig): string {
  return path.join(cfg.stateDir, '.lifecycle.lock');
}

async function locked<T>(cfg: ClusterConfig, fn: () => Promise<T>): Promise<T> {
  await mkdir(cfg.stateDir, { recursive: true });
  return withLock(lockPath(cfg), 15 * 60_000, fn);
}

export interface UpOptions {
  log?: (msg: string) => void;
  /**
   * Node mode (for e2e/node): kube-scheduler, the workload controllers, and the API served on the API host address
   * (an interface of its own; needs root). Recorded in the state directory: later `up()` calls without the option keep
   * it, until `down`. Undefined keeps the recorded mode.
   */
  node?: boolean;
}

function clientsDir(cfg: ClusterConfig): string {
  return path.join(cfg.stateDir, 'clients');
}

/** Present while the cluster was brought up by a test run (not by `npm run cluster -- up`). */
function startedByTestsMarker(cfg: ClusterConfig): string {
  return path.join(cfg.stateDir, 'started-by-tests');
}

async function liveClients(cfg: ClusterConfig): Promise<number[]> {
  const live: number[] = [];
  let names: string[] = [];
  try {
    names = await readdir(clientsDir(cfg));
  } catch {
    return live;
  }
  for (const name of names) {
    const pid = Number(name);
    if (Number.isInteger(pid) && (await pidAlive(pid))) live.push(pid);
    else await rm(path.join(clientsDir(cfg), name), { force: true });
  }
  return live;
}

export interface UpResult {
  /** Components this call started or restarted (empty: the cluster was already healthy). */
  started: Binary[];
  /** True when nothing was running before this call (a cold start). */
  fresh: boolean;
  /** Node mode is on. */
  node: boolean;
  kubeconfig: string;
  server: string;
  seconds: number;
}

/** The command line of a running process, or undefined when it cannot be read. */
async function cmdline(pid: number): Promise<string[] | undefined> {
  try {
    return (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0').slice(0, -1);
  } catch {
    return undefined;
  }
}

/** Starts the component unless it runs with exactly the wanted binary and flags (restarting it if they changed). */
async function ensureComponent(
  cfg: ClusterConfig,
  pki: PkiPaths,
  c: Component,
  log: (m: string) => void,
): Promise<boolean> {
  let started = false;
  const pid = await runningPid(cfg, c);
  if (pid !== undefined) {
    const want = [binaryPath(c.name), ...c.args(cfg, pki)];
    const have = await cmdline(pid);
    if (have !== undefined && have.join('\0') !== want.join('\0')) {
      log(`${c.name} (pid ${pid}) runs with another binary or flags: restarting it`);
      await stopComponent(cfg, c, log);
    }
  }
  if ((await runningPid(cfg, c)) === undefined) {
    await startComponent(cfg, pki, c, log);
    started = true;
  }
  await waitHealthy(cfg, pki, c);
  return started;
}

/**
 * Starts whatever part of the control plane is not running (building binaries and PKI first if needed) and waits
 * until kube-apiserver /readyz and kube-controller-manager /healthz answer ok. A healthy cluster is left alone.
 */
export async function up(opts: UpOptions = {}): Promise<UpResult> {
  return upInternal(opts, 'user');
}

/**
 * For e2e/node: `up` in node mode without changing who owns the cluster (a test run that cold-started it still stops
 * it at the end; a cluster someone started stays theirs).
 */
export async function ensureNodeMode(opts: Omit<UpOptions, 'node'> = {}): Promise<UpResult> {
  return upInternal({ ...opts, node: true }, 'unchanged');
}

async function upInternal(opts: UpOptions, owner: 'user' | 'tests' | 'unchanged'): Promise<UpResult> {
  const log = opts.log ?? ((m: string) => console.error(m));
  const cfg0 = clusterConfig();
  const t0 = Date.now();
  await buildAll(log);
  return locked(cfg0, async () => {
    const recorded = await effectiveConfig(cfg0);
    const cfg: ClusterConfig = { ...recorded, node: opts.node ?? recorded.node };
    if (cfg.node) {
      await ensureApiHost(cfg.apiHost);
      await writeFile(nodeModeFile(cfg), `${JSON.stringify({ apiHost: cfg.apiHost }, null, 2)}\n`);
    } else {
      await rm(nodeModeFile(cfg), { force: true });
    }
    const pki = await ensurePki(cfg.stateDir, [cfg.apiHost.address]);
    await writeKubeconfigs(cfg, pki);
    const wasRunning = await Promise.all(ALL_COMPONENTS.map(async (c) => (await runningPid(cfg, c)) !== undefined));
    const fresh = !wasRunning.some(Boolean);
    const started: Binary[] = [];
    for (const c of components(cfg)) if (await ensureComponent(cfg, pki, c, log)) started.push(c.name);
    if (!cfg.node) await stopComponent(cfg, scheduler, log);
    if (owner === 'user') {
      // Someone asked for the cluster explicitly: test runs must leave it running.
      await rm(startedByTestsMarker(cfg), { force: true });
    } else if (owner === 'tests') {
      // Only a cold start makes the cluster the tests' to stop; repairing a running one does not.
      if (fresh) await writeFile(startedByTestsMarker(cfg), `${process.pid}\n`);
      await mkdir(clientsDir(cfg), { recursive: true });
      await writeFile(path.join(clientsDir(cfg), String(process.pid)), '');
    }
    return {
      started,
      fresh,
      node: cfg.node,
      kubeconfig: adminKubeconfigPath(cfg),
      server: apiserverUrl(cfg),
      seconds: (Date.now() - t0) / 1000,
    };
  });
}

/**
 * For test runs (vitest global setup): like `up`, and registers this process as a user of the cluster. After a cold
 * start the cluster is marked as started by tests, so the last test run to release it stops it.
 */
export async function acquireCluster(opts: UpOptions = {}): Promise<UpResult> {
  return upInternal(opts, 'tests');
}

/**
 * Unregisters this process. When no other registered process is alive and the cluster was started by a test run
 * (not by `npm run cluster -- up`), stops it unless `keep`. Returns true when it stopped the cluster.
 */
export async function releaseCluster(opts: { keep?: boolean; log?: (msg: string) => void } = {}): Promise<boolean> {
  const log = opts.log ?? ((m: string) => console.error(m));
  const cfg = clusterConfig();
  if (!(await exists(cfg.stateDir))) return false;
  return locked(cfg, async () => {
    await rm(path.join(clientsDir(cfg), String(process.pid)), { force: true });
    const others = await liveClients(cfg);
    if (others.length > 0) {
      log(`cluster still used by pid ${others.join(', ')}: leaving it running`);
      return false;
    }
    if (!(await exists(startedByTestsMarker(cfg)))) return false;
    if (opts.keep) {
      log('STRATUS_KEEP_CLUSTER is set: leaving the cluster running (npm run cluster -- down stops it)');
      return false;
    }
    await stopNodes(cfg, log);
    for (const c of [...ALL_COMPONENTS].reverse()) await stopComponent(cfg, c, log);
    await leaveNodeMode(cfg, log);
    await rm(startedByTestsMarker(cfg), { force: true });
    return true;
  });
}

export interface DownOptions {
  purge?: boolean;
  log?: (msg: string) => void;
}

/** Stops the nodes of e2e/node recorded in the state directory (a no-op when there are none). */
async function stopNodes(cfg: ClusterConfig, log: (m: string) => void): Promise<void> {
  if (!(await exists(path.join(cfg.stateDir, 'nodes')))) return;
  // Imported lazily: node.ts builds on this module.
  const { stopAllNodes } = await import('../node/node.ts');
  await stopAllNodes({ log });
}

async function leaveNodeMode(cfg: ClusterConfig, log: (m: string) => void): Promise<void> {
  if (!(await exists(nodeModeFile(cfg)))) return;
  await removeApiHost(cfg.apiHost, log);
  await rm(nodeModeFile(cfg), { force: true });
}

/**
 * Stops the test nodes (if any), kube-scheduler, kube-controller-manager, kube-apiserver and etcd (SIGTERM, SIGKILL
 * after a grace) and leaves node mode. Keeps pki and data.
 */
export async function down(opts: DownOptions = {}): Promise<void> {
  const log = opts.log ?? ((m: string) => console.error(m));
  const cfg = clusterConfig();
  if (!(await exists(cfg.stateDir))) return;
  await stopNodes(cfg, log);
  await locked(cfg, async () => {
    for (const c of [...ALL_COMPONENTS].reverse()) await stopComponent(cfg, c, log);
    await leaveNodeMode(cfg, log);
    await rm(startedByTestsMarker(cfg), { force: true });
  });
  if (opts.purge) {
    await rm(cfg.stateDir, { recursive: true, force: true });
    log(`removed ${cfg.stateDir}`);
  }
}

export interface ComponentStatus {
  name: Binary;
  pid?: number;
  running: boolean;
  healthy: boolean;
  url: string;
  log: string;
}

export async function status(): Promise<ComponentStatus[]> {
  const cfg = await effectiveConfig();
  const pki = pkiPaths(cfg.stateDir);
  const havePki = await exists(pki.adminKey);
  return Promise.all(
    components(cfg).map(async (c) => {
      const pid = await runningPid(cfg, c);
      const healthy = pid !== undefined && havePki ? await c.healthy(cfg, pki) : false;
      return {
        name: c.name,
        pid,
        running: pid !== undefined,
        healthy,
        url: c.healthUrl(cfg),
        log: logFile(c.name, cfg),
      };
    }),
  );
}

/** Stops kube-apiserver only (etcd and the controller manager keep running), for restart tests. */
export async function stopApiserver(log: (m: string) => void = () => {}): Promise<void> {
  const cfg = await effectiveConfig();
  await locked(cfg, async () => {
    await stopComponent(cfg, apiserver, log);
  });
}

/** Starts kube-apiserver again (if stopped) and waits for /readyz. */
export async function startApiserver(log: (m: string) => void = () => {}): Promise<void> {
  const cfg = await effectiveConfig();
  await locked(cfg, async () => {
    const pki = pkiPaths(cfg.stateDir);
    await ensureComponent(cfg, pki, apiserver, log);
  });
}

export async function restartApiserver(log: (m: string) => void = () => {}): Promise<void> {
  await stopApiserver(log);
  await startApiserver(log);
}

/**
 * Writes `<state>/users/<user>.kubeconfig` with a client certificate CN=<user>, O=<each group> signed by the
 * cluster CA, and returns its path. The user has no permissions until RBAC grants some.
 */
export async function mintKubeconfig(user: string, groups: readonly string[] = []): Promise<string> {
  const cfg = clusterConfig();
  return mintUserKubeconfig(cfg.stateDir, apiserverUrl(cfg), user, groups);
}
