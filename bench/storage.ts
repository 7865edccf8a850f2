// npm run bench:storage [-- --accelerator=tcg|auto|kvm --runs=5 --rounds=3 --mib=128 --qos-mib=32 --qos-limit=8388608 --no-rbd --record]
// Block storage figures (issue #12), measured, never asserted:
//  1. Create from image (median of --runs each), the test guest image as a CachedImage of its file:
//       local overlay  LocalBackend.create {kind: image}: a qcow2 overlay on the cached file (qemu-img create -b);
//       local copy     LocalBackend.create {kind: volume} of such an overlay: a full independent copy (qemu-img
//                      convert of the chain into a new qcow2), what a clone or a flatten costs;
//       rbd import     RbdBackend.create {kind: image}: qemu-img convert of the cached file into a new raw RBD image
//                      (sparse). There is no RBD copy-on-write clone from an `images` pool yet (images are not kept in
//                      Ceph), so this is the only rbd way from an image today.
//  2. Guest sequential I/O: one test guest (TCG, 1 vCPU, 256 MiB) booted with four blank volumes attached at boot
//     (GuestSpec.volumes, virtio-blk, each behind the driver's throttle filter):
//       local  a qcow2 file opened directly ({driver: qcow2, file: {driver: file}}: the local backend's path and what
//              bare QEMU does with a file);
//       nbd    a qcow2 file of the same kind in the same directory, served by the node's NbdExporter
//              (qemu-storage-daemon, TLS-PSK, 127.0.0.1) and opened by the guest's QEMU as raw over nbd — the
//              cross-node path. (Not the same file as `local`: both would need its write lock.);
//       rbd    an RBD image of the test Ceph cluster (e2e/ceph: one OSD on a file on this disk) through librbd;
//       qos    a local qcow2 with totalBytesSec = --qos-limit (QEMU throttle group).
//     The guest runs `dd if=/dev/zero of=/dev/vdX bs=1M count=--mib oflag=direct` then `dd if=/dev/vdX of=/dev/null
//     bs=1M count=--mib iflag=direct`, --rounds times over the paths in turn, and prints /proc/uptime before and
//     after each on its serial console; MiB/s from those (the guest's clock). Median per path, ratio to `local`.
// Needs root, qemu-system-x86_64, qemu-img, qemu-storage-daemon, genisoimage, and for rbd the Ceph packages and
// qemu-block-extra (it starts the test Ceph cluster when none runs, and stops it again; --no-rbd skips it).
// Run it serialised with the e2e tier: `flock /tmp/stratus-e2e.lock npm run bench:storage`.
import { randomBytes, randomUUID } from 'node:crypto';
import { appendFileSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readFile, rm, symlink } from 'node:fs/promises';
import { cpus, loadavg, totalmem } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { type CephCluster, startCeph } from '../e2e/ceph/ceph.ts';
import { SHARED_CEPH_IP } from '../e2e/ceph/shared.ts';
import { ensureTestImage } from '../e2e/images/build.ts';
import { type FileServer, start as serveFiles } from '../e2e/images/serve.ts';
import { missingQemuPrerequisite } from '../e2e/testing/qemu.ts';
import { waitFor } from '../e2e/testing/wait.ts';
import type { VolumeAttachmentSpec, VolumeConnection } from '../node-agent/src/driver.ts';
import { volumeSerial } from '../node-agent/src/driver.ts';
import { resolveQemuUser } from '../node-agent/src/drivers/qemu/user.ts';
import { QemuDriver } from '../node-agent/src/drivers/qemu.ts';
import type { CachedImage } from '../node-agent/src/images/cache.ts';
import type { VolumeBackend } from '../node-agent/src/volumes/backend.ts';
import { LocalBackend } from '../node-agent/src/volumes/local.ts';
import { NbdExporter, nbdConnection, nbdExportName, writeClientPsk } from '../node-agent/src/volumes/nbd-export.ts';
import { RbdBackend } from '../node-agent/src/volumes/rbd.ts';

const arg = (name: string, def: string) => process.argv.find((a) => a.startsWith(`--${name}=`))?.split('=')[1] ?? def;
const RUNS = Number(arg('runs', '5'));
const ROUNDS = Number(arg('rounds', '3'));
const MIB = Number(arg('mib', '128'));
const QOS_MIB = Number(arg('qos-mib', '32'));
const QOS_LIMIT = Number(arg('qos-limit', String(8 * 2 ** 20)));
const NBD_BENCH_PORT = Number(arg('nbd-port', '10899'));
const ACCEL = arg('accelerator', 'tcg') as 'auto' | 'kvm' | 'tcg';
const RBD = !process.argv.includes('--no-rbd');
const RECORD = process.argv.includes('--record');
const MiB = 2 ** 20;
const QEMU_USER = 'stratus-qemu';
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const log = (m: string) => console.error(`[bench:storage] ${m}`);
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
/** Every volume id this run made (the cleanup removes only those). */
const createdHere = new Set<string>();
const ref = (id: string) => {
  createdHere.add(id);
  return { id, name: `bench-${id.slice(0, 8)}`, namespace: 'bench' };
};

const missing = missingQemuPrerequisite();
if (missing) {
  console.error(`bench:storage: ${missing}`);
  process.exit(2);
}

const loadAtStart = loadavg()[0]!.toFixed(1);
const img = await ensureTestImage({ log });
const owner = await resolveQemuUser(QEMU_USER);
if (!owner) throw new Error(`bench:storage: no user ${QEMU_USER}`);
const own = { uid: owner.uid, gid: owner.gid };
const work = await mkdtemp('/tmp/stratus-bench-storage-');
await chmod(work, 0o711); // QEMU and qsd run as the QEMU user and must reach the volumes
const image: CachedImage = {
  key: 'bench',
  path: img.path,
  format: 'qcow2',
  virtualSize: img.virtualSize,
  size: img.size,
  sha256: img.sha256,
};
const sizeBytes = Math.max(img.virtualSize, 1024 * MiB);

let ceph: CephCluster | undefined;
let rbd: RbdBackend | undefined;
let exporter: NbdExporter | undefined;
let driver: QemuDriver | undefined;
let files: FileServer | undefined;
const GUEST = randomUUID();
let exitCode = 0;

type Row = { path: string; ms: number[] };
const createRows: Row[] = [];
type Io = { path: string; write: number[]; read: number[] };
const io: Io[] = [];

async function timeCreate(
  label: string,
  backend: VolumeBackend,
  source: () => Promise<Parameters<VolumeBackend['create']>[2]>,
) {
  const ms: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    const src = await source();
    const id = randomUUID();
    const t0 = performance.now();
    const v = await backend.create(ref(id), sizeBytes, src);
    ms.push(performance.now() - t0);
    await backend.delete(v.location);
  }
  log(`${label}: ${ms.map((x) => x.toFixed(0)).join(', ')} ms`);
  createRows.push({ path: label, ms });
}

try {
  const local = new LocalBackend({ stateDir: path.join(work, 'local'), node: 'bench', owner: own });
  if (RBD) {
    ceph = await startCeph({ bindIP: SHARED_CEPH_IP, log });
    log(ceph.started ? `started the test Ceph cluster in ${ceph.seconds} s` : 'using the running Ceph cluster');
    rbd = new RbdBackend({ pool: ceph.pools.volumes, user: ceph.user, key: ceph.key, monitors: ceph.monitors });
  }

  // ---- 1. create from image ----
  await timeCreate('local overlay (qcow2 -b on the cached image)', local, async () => ({ kind: 'image', image }));
  const base = await local.create(ref(randomUUID()), sizeBytes, { kind: 'image', image });
  await timeCreate('local full copy (qemu-img convert of an overlay volume)', local, async () => ({
    kind: 'volume',
    location: base.location,
  }));
  await local.delete(base.location);
  if (rbd) await timeCreate('rbd (qemu-img convert into a new RBD image)', rbd, async () => ({ kind: 'image', image }));

  // ---- 2. guest sequential I/O ----
  const volSize = (MIB + 16) * MiB;
  const ids = { local: randomUUID(), nbd: randomUUID(), rbd: randomUUID(), qos: randomUUID() };
  const conns: Record<string, VolumeConnection> = {};
  const lv = await local.create(ref(ids.local), volSize, { kind: 'blank' });
  conns.local = await local.connection(ref(ids.local), lv.location);

  const key = randomBytes(32).toString('hex');
  await mkdir(path.join(work, 'nbd'), { mode: 0o711 }); // the daemon (QEMU user) reaches its <stateDir>/nbd
  exporter = new NbdExporter({
    stateDir: path.join(work, 'nbd'),
    hostIP: '127.0.0.1',
    port: NBD_BENCH_PORT,
    psk: { identity: 'stratus', key },
    owner: own,
  });
  const nv = await local.create(ref(ids.nbd), volSize, { kind: 'blank' });
  const nlocal = await local.connection(ref(ids.nbd), nv.location);
  const addr = await exporter.ensureExport({
    name: nbdExportName(ids.nbd),
    volumeId: ids.nbd,
    blockdev: nlocal.blockdev,
    writable: true,
  });
  const clientPskDir = path.join(work, 'nbd-client');
  await writeClientPsk(clientPskDir, 'stratus', key, own);
  conns.nbd = nbdConnection({ volumeId: ids.nbd, host: addr.host, port: addr.port, name: addr.name, clientPskDir });

  if (rbd) {
    const rv = await rbd.create(ref(ids.rbd), volSize, { kind: 'blank' });
    conns.rbd = await rbd.connection(ref(ids.rbd), rv.location);
  }
  const qv = await local.create(ref(ids.qos), (QOS_MIB + 16) * MiB, { kind: 'blank' });
  conns.qos = await local.connection(ref(ids.qos), qv.location);

  const paths = (['local', 'nbd', 'rbd'] as const).filter((p) => conns[p]);
  const volumes: VolumeAttachmentSpec[] = [...paths, 'qos' as const].map((p) => ({
    connection: conns[p]!,
    bus: 'virtio',
    ...(p === 'qos' ? { qos: { totalBytesSec: QOS_LIMIT } } : {}),
  }));
  const serial = (p: keyof typeof ids) => volumeSerial(ids[p]);
  const userData = `#!/bin/sh
dev() { for d in /sys/block/vd*; do [ "$(cat $d/serial 2>/dev/null)" = "$1" ] && { echo /dev/\${d##*/}; return; }; done; }
up() { cut -d' ' -f1 /proc/uptime; }
run() { # label op round dev count
  t0=$(up)
  if [ "$2" = write ]; then dd if=/dev/zero of=$4 bs=1M count=$5 oflag=direct 2>/dev/null; rc=$?
  else dd if=$4 of=/dev/null bs=1M count=$5 iflag=direct 2>/dev/null; rc=$?; fi
  t1=$(up)
  echo "BENCH-IO $1 $2 $3 $t0 $t1 $rc"
}
(
  for s in ${[...paths, 'qos' as const].map(serial).join(' ')}; do while [ -z "$(dev $s)" ]; do sleep 1; done; done
  echo BENCH-IO-START
  r=1
  while [ $r -le ${ROUNDS} ]; do
${paths.map((p) => `    run ${p} write $r $(dev ${serial(p)}) ${MIB}; run ${p} read $r $(dev ${serial(p)}) ${MIB}`).join('\n')}
    r=$((r+1))
  done
  run qos write 1 $(dev ${serial('qos')}) ${QOS_MIB}; run qos read 1 $(dev ${serial('qos')}) ${QOS_MIB}
  echo BENCH-IO-DONE
) &
`;
  const www = path.join(work, 'www');
  await mkdir(www);
  await symlink(img.path, path.join(www, 'test.qcow2'));
  files = await serveFiles(www);
  const stateDir = path.join(work, 'state');
  driver = new QemuDriver({
    stateDir,
    imageCacheDir: path.join(work, 'cache'),
    accelerator: ACCEL,
    acceleratorCacheFile: path.join(work, 'kvm-probe.json'),
    qemuUser: QEMU_USER,
    vnc: false,
    imageUrlPolicy: { allowCidrs: ['127.0.0.0/8'] },
  });
  await driver.init();
  await driver.spawn({
    id: GUEST,
    name: 'bench-storage',
    namespace: 'bench',
    vcpus: 1,
    ramMiB: 256,
    disk: { rootGiB: 1, ephemeralGiB: 0, swapMiB: 0 },
    image: 'test-image',
    imageSource: {
      name: 'test-image',
      namespace: 'bench',
      uid: 'img-bench',
      url: `${files.url}/test.qcow2`,
      diskFormat: 'qcow2',
      checksum: { algorithm: 'sha256', value: img.sha256 },
    },
    volumes,
    userData,
    annotations: {},
  });
  const accel = /-accel\s+(\w+)|accel=(\w+)/.exec(
    (await readFile(`/proc/${(await driver.state(GUEST))?.pid}/cmdline`, 'utf8').catch(() => '')).replaceAll('\0', ' '),
  );
  const accelName = accel?.[1] ?? accel?.[2] ?? 'unknown';
  const consoleLog = path.join(stateDir, 'guests', GUEST, 'console.log');
  const text = () => readFile(consoleLog, 'utf8').catch(() => '');
  await waitFor('BENCH-IO-START on the guest console', async () => (await text()).includes('BENCH-IO-START'), 300_000);
  log('guest sees all volumes; running dd');
  const budget = 60_000 + ROUNDS * paths.length * 2 * 120_000 + ((2 * QOS_MIB * MiB) / QOS_LIMIT) * 2_000;
  await waitFor(
    'BENCH-IO-DONE on the guest console',
    async () => (await text()).includes('BENCH-IO-DONE'),
    budget,
    500,
  );
  const lines = [...(await text()).matchAll(/BENCH-IO (\w+) (write|read) (\d+) ([\d.]+) ([\d.]+) (\d+)/g)];
  for (const m of lines) {
    const [, p, op, , t0, t1, rc] = m as unknown as string[];
    if (rc !== '0') throw new Error(`guest dd ${op} on ${p} failed (status ${rc})`);
    const mib = p === 'qos' ? QOS_MIB : MIB;
    const rate = mib / (Number(t1) - Number(t0));
    let row = io.find((r) => r.path === p);
    if (!row) {
      row = { path: p!, write: [], read: [] };
      io.push(row);
    }
    row[op as 'write' | 'read'].push(rate);
  }
  for (const r of io)
    log(
      `${r.path}: write ${r.write.map((x) => x.toFixed(1)).join(', ')} / read ${r.read.map((x) => x.toFixed(1)).join(', ')} MiB/s`,
    );
  await driver.destroy(GUEST);

  const fmt = (xs: number[]) => xs.map((x) => x.toFixed(0)).join(', ');
  const ref0 = io.find((r) => r.path === 'local');
  const pct = (x: number, base: number | undefined) => (base ? `${((100 * x) / base).toFixed(0)} %` : '');
  const table = [
    '| create from image | median | runs |',
    '|---|---|---|',
    ...createRows.map((r) => `| ${r.path} | ${median(r.ms).toFixed(0)} ms | ${fmt(r.ms)} |`),
    '',
    `| guest sequential I/O, ${MIB} MiB, 1 MiB O_DIRECT | write MiB/s (median) | vs local | read MiB/s (median) | vs local | write / read runs |`,
    '|---|---|---|---|---|---|',
    ...io
      .filter((r) => r.path !== 'qos')
      .map(
        (r) =>
          `| ${r.path} | ${median(r.write).toFixed(1)} | ${pct(median(r.write), ref0 && median(ref0.write))} | ${median(r.read).toFixed(1)} | ${pct(median(r.read), ref0 && median(ref0.read))} | ${r.write.map((x) => x.toFixed(1)).join(', ')} / ${r.read.map((x) => x.toFixed(1)).join(', ')} |`,
      ),
  ];
  const qos = io.find((r) => r.path === 'qos');
  const qosLine = qos
    ? `QoS: a local volume with totalBytesSec = ${QOS_LIMIT} (${(QOS_LIMIT / MiB).toFixed(1)} MiB/s): guest dd of ${QOS_MIB} MiB wrote at ${qos.write[0]!.toFixed(2)} MiB/s and read at ${qos.read[0]!.toFixed(2)} MiB/s (${pct(qos.write[0]!, QOS_LIMIT / MiB)} / ${pct(qos.read[0]!, QOS_LIMIT / MiB)} of the limit).`
    : '';
  console.log(`${table.join('\n')}\n\n${qosLine}`);

  if (RECORD) {
    const machine = `${cpus().length} × ${cpus()[0]?.model.trim()}, ${Math.round(totalmem() / 2 ** 30)} GiB`;
    const date = new Date().toISOString().slice(0, 10);
    const flags = `--accelerator=${ACCEL} --runs=${RUNS} --rounds=${ROUNDS} --mib=${MIB} --qos-mib=${QOS_MIB} --qos-limit=${QOS_LIMIT}${RBD ? '' : ' --no-rbd'}`;
    const report = [
      `### Block storage: create from image, guest I/O through local, NBD and rbd (${date})`,
      '',
      `Machine: ${machine}, 1-min load average ${loadAtStart} at the start, guest accelerator ${accelName}.`,
      `Command: \`flock /tmp/stratus-e2e.lock npm run bench:storage -- ${flags} --record\`.`,
      '',
      `Create: the test guest image (${(img.virtualSize / MiB).toFixed(0)} MiB virtual, ${(img.size / MiB).toFixed(1)} MiB of qcow2) as a cached image,`,
      `volumes of ${(sizeBytes / MiB).toFixed(0)} MiB, median of ${RUNS}. "local full copy" is LocalBackend's clone of a volume (qemu-img convert`,
      'of the overlay chain into a new qcow2). rbd has no copy-on-write clone from an image yet (images are not stored in',
      'Ceph): its way is qemu-img convert into a raw RBD image, which is what is timed.',
      '',
      `I/O: one test guest (1 vCPU, 256 MiB), its volumes attached at boot on virtio-blk, each behind the driver's throttle`,
      `filter; ${ROUNDS} rounds over the paths in turn; rates from /proc/uptime in the guest (10 ms resolution). local = a qcow2`,
      "file opened directly (bare QEMU's way with a file); nbd = another qcow2 of the same kind in the same directory served",
      "by the node's qemu-storage-daemon (TLS-PSK, 127.0.0.1) and opened as raw over nbd; rbd = librbd to the test Ceph",
      'cluster (one mon, one OSD on a file of the same disk: the client path, not a real cluster). Zeros are written, with',
      'no detect-zeroes anywhere.',
      accelName === 'tcg'
        ? 'The guest runs under TCG (the host KVM is unusable): the emulated vCPU bounds every path, so the ratios say more than the absolute rates.'
        : '',
      '',
      ...table,
      '',
      qosLine,
      '',
    ].filter((l, i, a) => l !== '' || a[i - 1] !== '');
    appendFileSync(path.join(root, 'BENCHMARKS.md'), `\n${report.join('\n')}\n`);
    log('appended to BENCHMARKS.md');
  }
} catch (e) {
  console.error(e);
  exitCode = 1;
} finally {
  if (driver) {
    await driver.destroy(GUEST).catch(() => {});
    await driver.close().catch(() => {});
  }
  await files?.close().catch(() => {});
  await exporter?.stop().catch((e) => log(`nbd exporter stop: ${String(e)}`));
  if (rbd) {
    const l = await rbd.list().catch(() => ({ volumes: [] as string[] }));
    for (const loc of l.volumes)
      if (createdHere.has(loc.split('volume-')[1] ?? '')) await rbd.delete(loc).catch(() => {});
    await rbd.close().catch(() => {});
  }
  if (ceph?.started) await ceph.stop().catch((e) => log(`ceph stop: ${String(e)}`));
  await rm(work, { recursive: true, force: true });
  process.exitCode = exitCode;
}
