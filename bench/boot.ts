// npm run bench:boot [-- --runs=3 --accelerator=auto|kvm|tcg --record]
// Boot time of one server through Stratus versus bare QEMU, both to the test image's READY line on the serial
// console:
//   stratus  Server create (kubectl-equivalent POST) → operator schedules and binds → agent downloads nothing (the
//            image cache is warmed by one unmeasured boot first), builds the overlay, seed and config, starts
//            QEMU → READY. Measured from just before the POST.
//   bare     the exact QEMU command line the driver used (read from /proc/<pid>/cmdline of a Stratus guest), with
//            its paths moved to a fresh directory: `qemu-img create` of the overlay on the same cached image, a copy
//            of the same NoCloud seed ISO, then `qemu-system-x86_64 …` → READY. Measured from the qemu-img call.
// Median of --runs each; prints both and the overhead. --record appends them to BENCHMARKS.md. Needs root and QEMU.
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { appendFileSync, readFileSync } from 'node:fs';
import { chmod, copyFile, mkdir, mkdtemp, readFile, rm, symlink } from 'node:fs/promises';
import { cpus, loadavg, totalmem } from 'node:os';
import path from 'node:path';
import { KubeConfig } from '@kubernetes/client-node';
import { acquireCluster, releaseCluster } from '../e2e/controlplane/controlplane.ts';
import { ensureTestImage } from '../e2e/images/build.ts';
import { start as serveFiles } from '../e2e/images/serve.ts';
import {
  deleteIgnore,
  FLAVORS,
  flavor,
  getServer,
  guestDir,
  HYPERVISORS,
  IMAGES,
  image,
  KEYPAIRS,
  keyPair,
  LEASES,
  NAMESPACES,
  qemuPid,
  root,
  SERVERS,
  type Srv,
  server,
  startAgentProc,
  startOperatorProc,
  waitConsole,
  waitFor,
} from '../e2e/stack.ts';
import { KubeClient } from '../operator/src/runtime/index.ts';

const arg = (name: string, def: string) => process.argv.find((a) => a.startsWith(`--${name}=`))?.split('=')[1] ?? def;
const RUNS = Number(arg('runs', '3'));
const ACCEL = arg('accelerator', 'auto') as 'auto' | 'kvm' | 'tcg';
const RECORD = process.argv.includes('--record');
const READY = 'STRATUS-GUEST-READY';
const ID = `bench-boot-${process.pid}`;
const labels = { 'bench.stratus.io/boot': ID };
const log = (m: string) => console.error(`[bench:boot] ${m}`);
/** When a process was started (epoch ms, 10 ms resolution), from /proc/<pid>/stat and the boot time. */
function procStartMs(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const ticks = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19]);
  const btime = Number(/^btime (\d+)$/m.exec(readFileSync('/proc/stat', 'utf8'))![1]);
  return (btime + ticks / 100) * 1000;
}
/** procStartMs(pid) minus the wall clock at the spawn (btime is whole seconds and drifts): median of 5 `sleep`s. */
function procClockOffsetMs(): number {
  const xs: number[] = [];
  for (let i = 0; i < 5; i++) {
    const at = Date.now();
    const c = spawn('sleep', ['0.2'], { stdio: 'ignore' });
    xs.push(procStartMs(c.pid!) - at);
  }
  return xs.sort((a, b) => a - b)[2]!;
}
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

if (process.getuid?.() !== 0) {
  console.error('bench:boot needs root (QEMU guests)');
  process.exit(2);
}

const loadAtStart = loadavg()[0]!.toFixed(1);
const procOffset = procClockOffsetMs();
const img = await ensureTestImage({ log });
const cluster = await acquireCluster({ log });
const kc = new KubeConfig();
kc.loadFromFile(cluster.kubeconfig);
const client = new KubeClient(kc);
const work = await mkdtemp('/tmp/stratus-bench-boot-');
await chmod(work, 0o711); // QEMU drops to --qemu-user and must still reach its guest directory
const stateDir = path.join(work, 'state');
const www = path.join(work, 'www');
await mkdir(www);
await symlink(img.path, path.join(www, 'test.qcow2'));
const files = await serveFiles(www);
const operator = startOperatorProc({
  kubeconfig: cluster.kubeconfig,
  leaseName: ID,
  logFile: path.join(work, 'op.log'),
});
const agent = startAgentProc({
  kubeconfig: cluster.kubeconfig,
  nodeName: ID,
  stateDir,
  accelerator: ACCEL,
  kvmProbeKernel: img.kernel,
  labels,
  logFile: path.join(work, 'agent.log'),
});
const started: ChildProcess[] = [];
const NS = ID;

async function stratusBoot(name: string): Promise<{ ms: number; qemuMs: number; uid: string; pid: number }> {
  const wall0 = Date.now();
  const t0 = performance.now();
  const s = await client.create<Srv>(
    SERVERS,
    server(
      name,
      NS,
      {
        flavor: ID,
        image: 'test',
        keyPair: 'key',
        userData: '#!/bin/sh\necho USERDATA-MARKER-$((6*7))\n',
        nodeSelector: labels,
      },
      labels,
    ),
  );
  const uid = s.metadata!.uid!;
  await waitConsole(stateDir, uid, READY, 1, 300_000);
  const ms = performance.now() - t0;
  const pid = await qemuPid(stateDir, uid);
  return { ms, qemuMs: procStartMs(pid) - procOffset - wall0, uid, pid };
}

async function deleteServer(name: string): Promise<void> {
  await client.delete(SERVERS, name, NS);
  await waitFor(`${name} deleted`, async () => (await getServer(client, NS, name)) === undefined, 120_000);
}

let exitCode = 0;
try {
  await operator.waitForLog('leading: controllers started', 120_000);
  await client.create(NAMESPACES, { apiVersion: 'v1', kind: 'Namespace', metadata: { name: NS, labels } });
  await client.create(FLAVORS, flavor(ID, labels));
  await client.create(KEYPAIRS, keyPair('key', NS, labels));
  await client.create(IMAGES, image('test', NS, `${files.url}/test.qcow2`, img.sha256, labels));
  await agent.waitForLog('node agent started', 180_000);
  const accel = await waitFor('accelerator', async () => {
    const h = await client.get<{ status?: { accelerator?: string } } & Srv>(HYPERVISORS, ID);
    return h.status?.accelerator;
  });
  log(`accelerator ${accel}`);

  // Warm-up: downloads the image into the cache; its QEMU command line and seed are the bare run's template.
  const warm = await stratusBoot('warmup');
  log(`warm-up (with download) ${warm.ms.toFixed(0)} ms`);
  const argv = (await readFile(`/proc/${warm.pid}/cmdline`, 'utf8')).split('\0').slice(0, -1);
  const gdir = guestDir(stateDir, warm.uid);
  const guest = JSON.parse(await readFile(path.join(gdir, 'guest.json'), 'utf8')) as Record<string, unknown>;
  const seedTemplate = path.join(work, 'seed-template.iso');
  await copyFile(path.join(gdir, 'seed.iso'), seedTemplate);
  const hasConfigDrive = argv.some((a) => a.includes('config-drive.iso'));
  if (hasConfigDrive) await copyFile(path.join(gdir, 'config-drive.iso'), path.join(work, 'cd-template.iso'));
  const rootInfo = JSON.parse(
    execFileSync('qemu-img', ['info', '--output=json', '-U', path.join(gdir, 'root.qcow2')], { encoding: 'utf8' }),
  ) as { 'virtual-size': number; 'full-backing-filename'?: string; 'backing-filename'?: string };
  const backing = rootInfo['full-backing-filename'] ?? rootInfo['backing-filename'];
  if (!backing) throw new Error(`root.qcow2 has no backing file: ${JSON.stringify(guest).slice(0, 300)}`);
  const extraDisks = argv.filter((a) => /(ephemeral|swap)\.qcow2/.test(a));
  if (extraDisks.length > 0) throw new Error('the flavor has ephemeral/swap disks: not reproduced by the bare run');
  await deleteServer('warmup');

  const bareBoot = async (i: number): Promise<{ ms: number; qemuMs: number }> => {
    const dir = path.join(work, `bare-${i}`);
    await mkdir(dir);
    await copyFile(seedTemplate, path.join(dir, 'seed.iso'));
    if (hasConfigDrive) await copyFile(path.join(work, 'cd-template.iso'), path.join(dir, 'config-drive.iso'));
    const args = argv.slice(1).map((a) => a.replaceAll(gdir, dir));
    const wall0 = Date.now();
    const t0 = performance.now();
    execFileSync('qemu-img', [
      'create',
      '-q',
      '-f',
      'qcow2',
      '-F',
      'qcow2',
      '-b',
      backing,
      path.join(dir, 'root.qcow2'),
      String(rootInfo['virtual-size']),
    ]);
    const q = spawn(argv[0]!, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    started.push(q);
    let stderr = '';
    q.stderr!.on('data', (c: Buffer) => {
      stderr += c.toString();
    });
    const consoleFile = path.join(dir, 'console.log');
    await waitFor(
      'bare READY',
      async () => {
        if (q.exitCode !== null) throw new Error(`qemu exited ${q.exitCode}: ${stderr}`);
        return (await readFile(consoleFile, 'utf8').catch(() => '')).includes(READY);
      },
      300_000,
      50,
    );
    const ms = performance.now() - t0;
    const qemuMs = procStartMs(q.pid!) - procOffset - wall0;
    q.kill('SIGKILL');
    await new Promise((r) => q.once('exit', r));
    return { ms, qemuMs };
  };

  // Interleaved (Stratus, bare, Stratus, bare…) so that load from other work on the machine hits both alike.
  const stratus: number[] = [];
  const bare: number[] = [];
  const stratusQ: number[] = [];
  const bareQ: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    const r = await stratusBoot(`boot-${i}`);
    stratus.push(r.ms);
    stratusQ.push(r.qemuMs);
    await deleteServer(`boot-${i}`);
    const b = await bareBoot(i);
    bare.push(b.ms);
    bareQ.push(b.qemuMs);
    log(
      `run ${i + 1}: Stratus create → QEMU ${r.qemuMs.toFixed(0)} ms, → READY ${r.ms.toFixed(0)} ms; bare → QEMU ${b.qemuMs.toFixed(0)} ms, → READY ${b.ms.toFixed(0)} ms`,
    );
  }

  const s = median(stratus);
  const b = median(bare);
  const overhead = ((s - b) / b) * 100;
  console.log(
    `create → READY through Stratus (median of ${RUNS}): ${s.toFixed(0)} ms   [${stratus.map((x) => x.toFixed(0)).join(', ')}]`,
  );
  console.log(
    `bare qemu-system-x86_64 → READY   (median of ${RUNS}): ${b.toFixed(0)} ms   [${bare.map((x) => x.toFixed(0)).join(', ')}]`,
  );
  console.log(`overhead: ${(s - b).toFixed(0)} ms (${overhead.toFixed(0)} %), accelerator ${accel}`);
  const sq = median(stratusQ);
  const bq = median(bareQ);
  console.log(`to the QEMU process start (median): Stratus ${sq.toFixed(0)} ms, bare ${bq.toFixed(0)} ms`);

  if (RECORD) {
    const machine = `${cpus().length} × ${cpus()[0]?.model.trim()}, ${Math.round(totalmem() / 2 ** 30)} GiB`;
    const date = new Date().toISOString().slice(0, 10);
    const report = [
      `### Boot: Server create → READY through Stratus vs bare QEMU (${date})`,
      '',
      `Machine: ${machine}, 1-min load average ${loadAtStart} at the start, accelerator ${accel}. Command: \`npm run bench:boot -- --runs=${RUNS} --accelerator=${ACCEL} --record\`.`,
      'Test guest image (1 vCPU, 256 MiB, 1 GiB root), READY = the `STRATUS-GUEST-READY` line on the serial console.',
      'Stratus: POST of the Server → operator (schedule, bind) → node agent (overlay, seed, QEMU) → READY, image already',
      "cached. Bare: `qemu-img create` of the overlay + the driver's exact QEMU command line with the same seed → READY.",
      'Runs interleaved (Stratus, bare, …); the console file is polled every 50 ms on both paths.',
      '',
      '| path, to READY | median | runs |',
      '|---|---|---|',
      `| Stratus (operator + agent) | ${s.toFixed(0)} ms | ${stratus.map((x) => x.toFixed(0)).join(', ')} |`,
      `| bare qemu-system-x86_64 | ${b.toFixed(0)} ms | ${bare.map((x) => x.toFixed(0)).join(', ')} |`,
      `| overhead | ${(s - b).toFixed(0)} ms (${overhead.toFixed(0)} %) | |`,
      `| to the QEMU process start: Stratus | ${sq.toFixed(0)} ms | ${stratusQ.map((x) => x.toFixed(0)).join(', ')} |`,
      `| to the QEMU process start: bare | ${bq.toFixed(0)} ms | ${bareQ.map((x) => x.toFixed(0)).join(', ')} |`,
      '',
    ].join('\n');
    appendFileSync(path.join(root, 'BENCHMARKS.md'), `\n${report}`);
    log('appended to BENCHMARKS.md');
  }
} catch (e) {
  console.error(e);
  exitCode = 1;
} finally {
  const list = await client.list<Srv>(SERVERS, { namespace: NS }).catch(() => ({ items: [] as Srv[] }));
  for (const s of list.items) await deleteServer(s.metadata!.name!).catch(() => {});
  await agent.stop('SIGTERM');
  await operator.stop('SIGTERM');
  for (const q of started) if (q.exitCode === null && q.signalCode === null) q.kill('SIGKILL');
  await deleteIgnore(client, HYPERVISORS, ID).catch(() => {});
  await deleteIgnore(client, FLAVORS, ID).catch(() => {});
  await deleteIgnore(client, NAMESPACES, NS).catch(() => {});
  await deleteIgnore(client, LEASES, ID, 'stratus-operator-test').catch(() => {});
  await files.close();
  await rm(work, { recursive: true, force: true });
  await releaseCluster({ log });
}
process.exit(exitCode);
