// npm run bench [-- --servers=1000 --nodes=100 --concurrency=50 --record]
//
// The compute control-plane benchmark: the local control plane, the operator and one node-agent process
// simulating --nodes hypervisors with the fake driver (zero latency), then --servers Servers created at once.
// Reports create→ACTIVE latency (p50/p95/p99), throughput, delete→gone latency, overcommit, the operator's
// and the agent's peak RSS and CPU seconds, and the API requests made (kube-apiserver's own counters).
// --record appends the result to BENCHMARKS.md. Figures, not assertions: nothing here fails on a target.
import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { appendFileSync, readFileSync } from 'node:fs';
import { cpus, loadavg, totalmem } from 'node:os';
import { resolve } from 'node:path';
import * as k8s from '@kubernetes/client-node';
import { adminKubeconfigPath, up } from '../e2e/controlplane/controlplane.ts';
import {
  FlavorKind,
  HypervisorKind,
  ImageKind,
  parseBytes,
  type Server,
  ServerKind,
} from '../operator/src/api/index.ts';
import { installCRDs } from '../operator/src/crdgen/install.ts';
import { KubeClient } from '../operator/src/runtime/index.ts';

const root = resolve(import.meta.dirname, '..');
const arg = (name: string, dflt: number) => {
  const a = process.argv.find((x) => x.startsWith(`--${name}=`));
  return a ? Number(a.split('=')[1]) : dflt;
};
const SERVERS = arg('servers', 1000);
const NODES = arg('nodes', 100);
const CONCURRENCY = arg('concurrency', 50);
const RECORD = process.argv.includes('--record');
const NS = 'stratus-bench';
const PREFIX = 'bench';

const gvr = (k: { group: string; version: string; plural: string }) => ({
  group: k.group,
  version: k.version,
  plural: k.plural,
});
const log = (m: string) => console.error(`[bench] ${m}`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function quantile(sorted: number[], q: number): number {
  if (sorted.length === 0) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)]!;
}

/** Peak RSS (MiB) and CPU seconds of a live process, from /proc. */
function procUsage(pid: number): { peakRssMiB: number; cpuSeconds: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const hwm = Number(/VmHWM:\s+(\d+) kB/.exec(status)?.[1] ?? 0);
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const ticks = Number(fields[11]) + Number(fields[12]); // utime + stime
  return { peakRssMiB: Math.round(hwm / 1024), cpuSeconds: ticks / 100 };
}

/** kube-apiserver's apiserver_request_total for Stratus groups, Leases and Events, summed by verb. */
async function apiRequests(client: KubeClient): Promise<Map<string, number>> {
  const text = await client.request<string>(k8s.HttpMethod.GET, '/metrics');
  const byVerb = new Map<string, number>();
  for (const line of String(text).split('\n')) {
    if (!line.startsWith('apiserver_request_total{')) continue;
    const group = /group="([^"]*)"/.exec(line)?.[1] ?? '';
    const resource = /resource="([^"]*)"/.exec(line)?.[1] ?? '';
    if (!group.endsWith('stratus.io') && resource !== 'leases' && resource !== 'events') continue;
    const verb = /verb="([^"]*)"/.exec(line)?.[1] ?? '';
    const value = Number(line.slice(line.lastIndexOf(' ') + 1));
    byVerb.set(verb, (byVerb.get(verb) ?? 0) + value);
  }
  return byVerb;
}

function startProcess(name: string, args: string[]): ChildProcess {
  const p = spawn(process.execPath, args, { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] });
  let tail = '';
  const keep = (b: Buffer) => {
    tail = (tail + b.toString()).slice(-4000);
  };
  p.stdout?.on('data', keep);
  p.stderr?.on('data', keep);
  p.on('exit', (code, sig) => {
    if (code !== 0 && sig !== 'SIGTERM') log(`${name} exited (${code ?? sig}); last output:\n${tail}`);
  });
  return p;
}

async function pool<T>(items: T[], n: number, fn: (t: T) => Promise<void>): Promise<void> {
  let i = 0;
  await Promise.all(
    Array.from({ length: n }, async () => {
      while (i < items.length) await fn(items[i++]!);
    }),
  );
}

async function main(): Promise<void> {
  await up({ log });
  const kc = new k8s.KubeConfig();
  kc.loadFromFile(adminKubeconfigPath());
  await installCRDs(kc);
  const client = new KubeClient(kc);
  const core = kc.makeApiClient(k8s.CoreV1Api);
  const objects = k8s.KubernetesObjectApi.makeApiClient(kc);

  // A clean slate: no bench namespace or hypervisors left from an earlier run.
  await core.deleteNamespace({ name: NS }).catch(() => {});
  while (
    await core.readNamespace({ name: NS }).then(
      () => true,
      () => false,
    )
  )
    await sleep(500);
  for (const hv of (await client.listAll(gvr(HypervisorKind))).items) {
    if (hv.metadata?.name?.startsWith(`${PREFIX}-`)) await client.delete(gvr(HypervisorKind), hv.metadata.name);
  }
  await core.createNamespace({ body: { metadata: { name: NS } } });

  const kubeconfig = adminKubeconfigPath();
  const operator = startProcess('operator', [
    'operator/src/main.ts',
    `--kubeconfig=${kubeconfig}`,
    '--metrics-port=0',
    '--lease-name=stratus-bench',
    '--log-level=warn',
    '--server-concurrency=8',
  ]);
  const agent = startProcess('agent', [
    'node-agent/src/main.ts',
    `--kubeconfig=${kubeconfig}`,
    '--driver=fake',
    `--fake-nodes=${NODES}`,
    `--node-name=${PREFIX}`,
    '--fake-vcpus=16',
    '--fake-ram=64Gi',
    '--fake-disk=1Ti',
    '--metrics-port=0',
    '--log-level=warn',
  ]);
  const stop = async () => {
    for (const p of [operator, agent]) if (p.exitCode === null) p.kill('SIGTERM');
    await Promise.all([operator, agent].map((p) => (p.exitCode === null ? once(p, 'exit') : undefined)));
  };
  try {
    log(`waiting for ${NODES} hypervisors to be up`);
    for (;;) {
      const hvs = (await client.listAll(gvr(HypervisorKind))).items as {
        metadata?: { name?: string };
        status?: { state?: string };
      }[];
      const upCount = hvs.filter((h) => h.metadata?.name?.startsWith(`${PREFIX}-`) && h.status?.state === 'up').length;
      if (upCount >= NODES) break;
      if (operator.exitCode !== null || agent.exitCode !== null) throw new Error('operator or agent exited');
      await sleep(500);
    }
    await objects
      .create({
        apiVersion: FlavorKind.apiVersion,
        kind: 'Flavor',
        metadata: { name: 'bench.small' },
        spec: { vcpus: 1, ram: '512Mi', disk: '1Gi' },
      } as k8s.KubernetesObject)
      .catch((e: unknown) => {
        if (!(e instanceof k8s.ApiException && e.code === 409)) throw e;
      });
    await objects.create({
      apiVersion: ImageKind.apiVersion,
      kind: 'Image',
      metadata: { name: 'bench-img', namespace: NS },
      spec: { source: { url: 'http://127.0.0.1:1/bench.qcow2' }, diskFormat: 'qcow2' },
    } as k8s.KubernetesObject);

    // Watch the servers: first time each one is ACTIVE, and when it is gone.
    const created = new Map<string, number>();
    const active = new Map<string, number>();
    const deleteSent = new Map<string, number>();
    const gone = new Map<string, number>();
    // A watch can end without an error (server timeout, a dropped connection under load): it is then resumed from a
    // fresh list, which also records what happened meanwhile (ACTIVE servers, servers gone since their delete).
    const watch = new k8s.Watch(kc);
    const path = `/apis/${ServerKind.group}/${ServerKind.version}/namespaces/${NS}/servers`;
    let watching: { abort(): void } | undefined;
    let stopped = false;
    const observe = (type: string, obj: Server) => {
      const name = obj.metadata.name ?? '';
      if (type === 'DELETED') gone.set(name, performance.now());
      else if (obj.status?.status === 'ACTIVE' && !active.has(name)) active.set(name, performance.now());
    };
    const startWatch = async (): Promise<void> => {
      const list = await client.listAll<Server>(gvr(ServerKind), { namespace: NS });
      const present = new Set(list.items.map((s) => s.metadata.name ?? ''));
      for (const s of list.items) observe('MODIFIED', s);
      for (const name of deleteSent.keys())
        if (!present.has(name) && !gone.has(name)) gone.set(name, performance.now());
      watching = await watch.watch(
        path,
        { resourceVersion: list.metadata?.resourceVersion },
        observe,
        (err: unknown) => {
          if (stopped) return;
          log(`watch ended${err ? `: ${String(err)}` : ''}; resuming`);
          setTimeout(() => void startWatch().catch((e: unknown) => log(`watch restart failed: ${String(e)}`)), 200);
        },
      );
    };
    await startWatch();
    const req = {
      abort: () => {
        stopped = true;
        watching?.abort();
      },
    };

    const loadAtStart = loadavg()[0]!.toFixed(1);
    const before = await apiRequests(client);
    const opBefore = procUsage(operator.pid!);
    const names = Array.from({ length: SERVERS }, (_, i) => `vm-${String(i).padStart(5, '0')}`);
    log(`creating ${SERVERS} servers, ${CONCURRENCY} at a time`);
    const t0 = performance.now();
    await pool(names, CONCURRENCY, async (name) => {
      created.set(name, performance.now());
      await objects.create({
        apiVersion: ServerKind.apiVersion,
        kind: 'Server',
        metadata: { name, namespace: NS },
        spec: { flavor: 'bench.small', image: 'bench-img' },
      } as k8s.KubernetesObject);
    });
    const createdIn = performance.now() - t0;
    const deadline = Date.now() + 10 * 60_000;
    while (active.size < SERVERS && Date.now() < deadline) await sleep(200);
    const tActive = Math.max(...active.values());
    const latencies = names
      .filter((n) => active.has(n))
      .map((n) => active.get(n)! - created.get(n)!)
      .sort((a, b) => a - b);

    // Overcommit: what the servers claim on each hypervisor against what it may give.
    const servers = (await client.listAll<Server>(gvr(ServerKind), { namespace: NS })).items;
    const perNode = new Map<string, { vcpus: number; ramMiB: number; n: number }>();
    for (const s of servers) {
      const n = s.status?.node;
      const a = s.status?.allocation;
      if (!n || !a) continue;
      const e = perNode.get(n) ?? { vcpus: 0, ramMiB: 0, n: 0 };
      e.vcpus += a.vcpus;
      e.ramMiB += a.ramMiB;
      e.n += 1;
      perNode.set(n, e);
    }
    const hvs = (await client.listAll(gvr(HypervisorKind))).items as {
      metadata?: { name?: string };
      status?: { allocatable?: { vcpus?: number; ram?: string } };
    }[];
    let overcommitted = 0;
    for (const hv of hvs) {
      const use = perNode.get(hv.metadata?.name ?? '');
      const cap = hv.status?.allocatable;
      if (!use || !cap) continue;
      const ramCapMiB = cap.ram ? Number(parseBytes(cap.ram) / 1048576n) : 0;
      if (use.vcpus > (cap.vcpus ?? 0) || use.ramMiB > ramCapMiB) overcommitted++;
    }
    const opAfterCreate = procUsage(operator.pid!);

    log('deleting them');
    const td = performance.now();
    await pool(names, CONCURRENCY, async (name) => {
      deleteSent.set(name, performance.now());
      await objects.delete({ apiVersion: ServerKind.apiVersion, kind: 'Server', metadata: { name, namespace: NS } });
    });
    while (gone.size < SERVERS && Date.now() < deadline + 5 * 60_000) await sleep(200);
    const deletedIn = Math.max(...gone.values()) - td;
    const delLat = names
      .filter((n) => gone.has(n))
      .map((n) => gone.get(n)! - deleteSent.get(n)!)
      .sort((a, b) => a - b);
    const after = await apiRequests(client);
    const op = procUsage(operator.pid!);
    const ag = procUsage(agent.pid!);
    req.abort();

    const requests = [...after]
      .map(([verb, v]) => [verb, v - (before.get(verb) ?? 0)] as const)
      .filter(([, v]) => v > 0);
    const total = requests.reduce((s, [, v]) => s + v, 0);
    const ms = (x: number) => `${Math.round(x)} ms`;
    const date = new Date().toISOString().slice(0, 10);
    const machine = `${cpus().length} × ${cpus()[0]?.model.trim()}, ${Math.round(totalmem() / 2 ** 30)} GiB`;
    const report = [
      `### Compute control plane: ${SERVERS} servers on ${NODES} fake hypervisors (${date})`,
      '',
      `Machine: ${machine}, 1-min load average ${loadAtStart} at the start. Command: \`npm run bench -- --servers=${SERVERS} --nodes=${NODES} --concurrency=${CONCURRENCY}\`.`,
      'Local control plane (etcd, kube-apiserver 1.34 on loopback), operator and agent as separate processes,',
      'fake driver with zero latency.',
      '',
      '| metric | value | target |',
      '|---|---|---|',
      `| servers ACTIVE | ${active.size} / ${SERVERS} | all |`,
      `| create → ACTIVE p50 / p95 / p99 | ${ms(quantile(latencies, 0.5))} / ${ms(quantile(latencies, 0.95))} / ${ms(quantile(latencies, 0.99))} | p99 ≤ 1 s |`,
      `| throughput (first create → last ACTIVE) | ${(active.size / ((tActive - t0) / 1000)).toFixed(1)} servers/s | ≥ 50/s |`,
      `| client create calls took | ${ms(createdIn)} | |`,
      `| delete → gone p50 / p99, all gone after | ${ms(quantile(delLat, 0.5))} / ${ms(quantile(delLat, 0.99))}, ${ms(deletedIn)} | |`,
      `| hypervisors over their allocatable vCPU/RAM | ${overcommitted} | 0 |`,
      `| operator peak RSS | ${op.peakRssMiB} MiB | ≤ 300 MiB |`,
      `| operator CPU (whole run / create phase) | ${op.cpuSeconds.toFixed(1)} s / ${(opAfterCreate.cpuSeconds - opBefore.cpuSeconds).toFixed(1)} s | |`,
      `| agent (${NODES} nodes) peak RSS, CPU | ${ag.peakRssMiB} MiB, ${ag.cpuSeconds.toFixed(1)} s | |`,
      `| API requests (Stratus kinds, leases, events) | ${total} (${requests.map(([v, n]) => `${v} ${n}`).join(', ')}) | |`,
      `| API requests per server | ${(total / SERVERS).toFixed(1)} | |`,
      '',
    ].join('\n');
    console.log(report);
    if (RECORD) appendFileSync(resolve(root, 'BENCHMARKS.md'), `\n${report}`);
  } finally {
    await stop();
    await core.deleteNamespace({ name: NS }).catch(() => {});
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
