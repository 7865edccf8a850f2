// A real single-node Ceph cluster for the tests (storage.md §5): one mon, one mgr and one OSD whose BlueStore lives
// in a sparse file (bluestore_block_path + bluestore_block_create: no LVM, no ceph-volume, no kernel rbd), pools of
// size 1, started from Debian's packages by a small hand-written bootstrap (no vstart.sh, no systemd). See README.md.
//
// Every tool runs through execFile/spawn with an argument array. The daemons run detached (`-f`, their pids in
// <dir>/run/*.pid), so a cluster started by one process (the CLI, a test file) is reused by the next one: startCeph
// checks the recorded cluster's health first and starts nothing when it answers. stop() kills every daemon of the
// directory and removes the state.
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { existsSync, openSync } from 'node:fs';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

export interface CephOptions {
  /** State directory (default `${STRATUS_CEPH_DIR:-${STRATUS_CACHE_DIR:-~/.cache/stratus}/ceph-run}`). */
  dir?: string;
  /**
   * Address the mon and the OSD bind (default `STRATUS_CEPH_BIND_IP` or 127.0.0.1). An address that no interface
   * holds is put as a /32 on a port-less bridge of its own (`stceph0`, like the control plane's API host): QEMUs in
   * simulated nodes' namespaces reach it through routeLabToCeph().
   */
  bindIP?: string;
  log?: (msg: string) => void;
}

export interface CephCluster {
  fsid: string;
  /** "ip:port" of the mon (msgr2). */
  monHost: string;
  monitors: string[];
  user: 'stratus';
  /** base64 cephx key of client.stratus (as `ceph auth get-key` prints it). */
  key: string;
  pools: { volumes: 'volumes'; images: 'images' };
  dir: string;
  /** True when this call started the daemons (false: a running cluster was reused). */
  started: boolean;
  /** Seconds the start took (0 when reused). */
  seconds: number;
  /** Arguments that make the ceph/rbd CLI talk to this cluster as client.admin. */
  adminArgs(): string[];
  /** Kills every daemon of the directory and removes the state (and the bind interface if startCeph made it). */
  stop(): Promise<void>;
}

const MON_V2_PORT = 3300;
const MON_V1_PORT = 6789;
export const CEPH_IFACE = 'stceph0';
const DAEMONS = ['mon.a', 'mgr.x', 'osd.0'] as const;
type Daemon = (typeof DAEMONS)[number];

interface Recorded {
  fsid: string;
  bindIP: string;
  key: string;
  /** Whether startCeph created CEPH_IFACE for bindIP. */
  iface: boolean;
}

export function defaultCephDir(): string {
  if (process.env.STRATUS_CEPH_DIR) return path.resolve(process.env.STRATUS_CEPH_DIR);
  const cache = process.env.STRATUS_CACHE_DIR || path.join(homedir(), '.cache', 'stratus');
  return path.join(cache, 'ceph-run');
}

function run(file: string, args: readonly string[], input?: string, timeoutMs = 60_000): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = execFile(
      file,
      args,
      { encoding: 'utf8', timeout: timeoutMs, maxBuffer: 64 << 20 },
      (err, stdout, stderr) => {
        if (err) {
          const detail = (stderr || stdout || '').trim().split('\n').slice(-10).join('\n');
          reject(new Error(`${file} ${args[0] ?? ''}… failed: ${err.message.split('\n')[0]}\n${detail}`));
        } else resolve(stdout);
      },
    );
    if (input !== undefined) child.stdin?.end(input);
  });
}

class Paths {
  readonly dir: string;
  constructor(dir: string) {
    this.dir = dir;
  }
  get conf() {
    return path.join(this.dir, 'ceph.conf');
  }
  get adminKeyring() {
    return path.join(this.dir, 'admin.keyring');
  }
  get monKeyring() {
    return path.join(this.dir, 'mon.keyring');
  }
  get record() {
    return path.join(this.dir, 'cluster.json');
  }
  get lock() {
    return `${this.dir}.lock`;
  }
  pid(d: Daemon) {
    return path.join(this.dir, 'run', `${d}.pid`);
  }
}

/** ceph.conf of the test cluster: one replica, small memory, everything under dir. */
export function cephConf(dir: string, fsid: string, bindIP: string): string {
  return `[global]
fsid = ${fsid}
mon_host = [v2:${bindIP}:${MON_V2_PORT},v1:${bindIP}:${MON_V1_PORT}]
public_addr = ${bindIP}
cluster_addr = ${bindIP}
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_crush_chooseleaf_type = 0
run_dir = ${dir}/run
admin_socket = ${dir}/run/$name.asok
log_file = ${dir}/log/$name.log
keyring = ${dir}/admin.keyring
ms_bind_ipv6 = false
[mon]
mon_data = ${dir}/mon/$cluster-$id
mon_data_avail_warn = 1
mon_data_avail_crit = 0
[mgr]
mgr_data = ${dir}/mgr/$cluster-$id
keyring = ${dir}/mgr/$cluster-$id/keyring
mgr_initial_modules = iostat
[osd]
osd_data = ${dir}/osd/$cluster-$id
keyring = ${dir}/osd/$cluster-$id/keyring
osd_objectstore = bluestore
bluestore_block_path = ${dir}/osd/$cluster-$id.block
bluestore_block_create = true
bluestore_block_size = 21474836480
bluestore_fsck_on_mkfs = false
bluestore_fsck_on_mount = false
osd_memory_target = 939524096
bluestore_cache_autotune = true
osd_op_num_shards = 1
osd_op_num_threads_per_shard = 2
`;
}

async function pidOf(p: Paths, d: Daemon): Promise<number | undefined> {
  try {
    const pid = Number.parseInt((await readFile(p.pid(d), 'utf8')).trim(), 10);
    if (!Number.isInteger(pid) || pid <= 0) return undefined;
    // Only a live process of this directory counts (pids get reused).
    const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8');
    return cmdline.includes(p.conf) ? pid : undefined;
  } catch {
    return undefined;
  }
}

async function hasAddress(ip: string, dev?: string): Promise<boolean> {
  if (dev && !existsSync(`/sys/class/net/${dev}`)) return false;
  const out = await run('ip', ['-j', 'addr', 'show', ...(dev ? ['dev', dev] : [])]);
  return (JSON.parse(out) as { addr_info?: { local?: string }[] }[]).some((l) =>
    (l.addr_info ?? []).some((a) => a.local === ip),
  );
}

/** Exclusive lock on `<dir>.lock` (O_EXCL file holding our pid; a dead holder's lock is taken over). */
async function locked<T>(p: Paths, fn: () => Promise<T>): Promise<T> {
  await mkdir(path.dirname(p.lock), { recursive: true });
  for (let i = 0; ; i++) {
    try {
      await writeFile(p.lock, String(process.pid), { flag: 'wx' });
      break;
    } catch {
      const holder = Number.parseInt(await readFile(p.lock, 'utf8').catch(() => ''), 10);
      let alive = false;
      try {
        if (holder > 0) process.kill(holder, 0);
        alive = holder > 0;
      } catch {
        alive = false;
      }
      if (!alive) await rm(p.lock, { force: true });
      else if (i > 6000) throw new Error(`${p.lock} held by pid ${holder}`);
      else await sleep(100);
    }
  }
  try {
    return await fn();
  } finally {
    await rm(p.lock, { force: true });
  }
}

function clusterOf(p: Paths, rec: Recorded, started: boolean, seconds: number): CephCluster {
  const monHost = `${rec.bindIP}:${MON_V2_PORT}`;
  return {
    fsid: rec.fsid,
    monHost,
    monitors: [monHost],
    user: 'stratus',
    key: rec.key,
    pools: { volumes: 'volumes', images: 'images' },
    dir: p.dir,
    started,
    seconds,
    adminArgs: () => ['--conf', p.conf, '-m', monHost, '--keyring', p.adminKeyring, '--name', 'client.admin'],
    stop: () => stopCeph({ dir: p.dir }),
  };
}

function ceph(p: Paths, args: readonly string[], input?: string): Promise<string> {
  return run('ceph', ['--conf', p.conf, '--connect-timeout', '15', ...args], input);
}

/** The recorded cluster if its mon answers and its OSD is up. */
async function healthy(p: Paths): Promise<Recorded | undefined> {
  let rec: Recorded;
  try {
    rec = JSON.parse(await readFile(p.record, 'utf8')) as Recorded;
  } catch {
    return undefined;
  }
  for (const d of DAEMONS) if ((await pidOf(p, d)) === undefined) return undefined;
  try {
    const stat = JSON.parse(await ceph(p, ['osd', 'stat', '--format', 'json'])) as { num_up_osds?: number };
    return stat.num_up_osds === 1 ? rec : undefined;
  } catch {
    return undefined;
  }
}

function startDaemon(p: Paths, d: Daemon): number {
  const [type, id] = d.split('.') as [string, string];
  const out = openSync(path.join(p.dir, 'log', `${d}.out`), 'a');
  const child: ChildProcess = spawn(`ceph-${type}`, ['-f', '--conf', p.conf, '--id', id], {
    detached: true,
    stdio: ['ignore', out, out],
  });
  child.unref();
  if (!child.pid) throw new Error(`ceph-${type} did not start`);
  return child.pid;
}

async function waitUntil(what: string, fn: () => Promise<boolean>, timeoutMs = 120_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    try {
      if (await fn()) return;
    } catch {
      // not yet
    }
    if (Date.now() > end) throw new Error(`ceph: timed out waiting for ${what}`);
    await sleep(250);
  }
}

/** Starts (or reuses) the single-node cluster of opts.dir. */
export async function startCeph(opts: CephOptions = {}): Promise<CephCluster> {
  const p = new Paths(path.resolve(opts.dir ?? defaultCephDir()));
  const log = opts.log ?? (() => {});
  const bindIP = opts.bindIP ?? process.env.STRATUS_CEPH_BIND_IP ?? '127.0.0.1';
  return locked(p, async () => {
    const have = await healthy(p);
    if (have) {
      if (have.bindIP !== bindIP)
        throw new Error(`ceph: the cluster in ${p.dir} runs on ${have.bindIP}, not ${bindIP}: stop it first`);
      log(`ceph: reusing the cluster in ${p.dir} (mon ${have.bindIP}:${MON_V2_PORT})`);
      return clusterOf(p, have, false, 0);
    }
    // A half-started or dead cluster: clear it.
    await stopLocked(p, log);
    const t0 = performance.now();
    let rec: Recorded;
    try {
      rec = await bootstrap(p, bindIP, log);
    } catch (e) {
      // Nothing half-started stays behind (the logs go with the state: keep STRATUS_CEPH_KEEP_FAILED=1 to look).
      if (!process.env.STRATUS_CEPH_KEEP_FAILED) await stopLocked(p, log);
      throw e;
    }
    const seconds = (performance.now() - t0) / 1000;
    log(`ceph: cluster ${rec.fsid} up on ${bindIP}:${MON_V2_PORT} in ${seconds.toFixed(1)} s`);
    return clusterOf(p, rec, true, seconds);
  });
}

async function bootstrap(p: Paths, bindIP: string, log: (m: string) => void): Promise<Recorded> {
  for (const tool of ['ceph', 'ceph-mon', 'ceph-mgr', 'ceph-osd', 'monmaptool', 'ceph-authtool']) {
    try {
      await run('which', [tool]);
    } catch {
      throw new Error(`ceph: ${tool} not found: install ceph-mon ceph-osd ceph-mgr ceph-common (scripts/setup.sh)`);
    }
  }
  if (!(await hasAddress(bindIP))) {
    if (!existsSync(`/sys/class/net/${CEPH_IFACE}`)) await run('ip', ['link', 'add', CEPH_IFACE, 'type', 'bridge']);
    await run('ip', ['addr', 'add', `${bindIP}/32`, 'dev', CEPH_IFACE]);
    await run('ip', ['link', 'set', CEPH_IFACE, 'up']);
  }
  // Ours to remove on stop, also when a crashed run left it behind.
  const iface = await hasAddress(bindIP, CEPH_IFACE);
  const fsid = randomUUID();
  for (const sub of ['run', 'log', 'mon/ceph-a', 'mgr/ceph-x', 'osd/ceph-0'])
    await mkdir(path.join(p.dir, sub), { recursive: true });
  await writeFile(p.conf, cephConf(p.dir, fsid, bindIP));
  // Records the interface before anything can fail, so stop() removes it.
  const partial: Recorded = { fsid, bindIP, key: '', iface };
  await writeFile(p.record, JSON.stringify(partial));

  // Keys: mon., client.admin (imported into the mon's keyring so the mon knows it from the start).
  await run('ceph-authtool', ['--create-keyring', p.monKeyring, '--gen-key', '-n', 'mon.', '--cap', 'mon', 'allow *']);
  await run('ceph-authtool', [
    '--create-keyring',
    p.adminKeyring,
    '--gen-key',
    '-n',
    'client.admin',
    '--cap',
    'mon',
    'allow *',
    '--cap',
    'osd',
    'allow *',
    '--cap',
    'mgr',
    'allow *',
  ]);
  await run('ceph-authtool', [p.monKeyring, '--import-keyring', p.adminKeyring]);
  const monmap = path.join(p.dir, 'monmap');
  await run('monmaptool', [
    '--create',
    '--fsid',
    fsid,
    '--addv',
    'a',
    `[v2:${bindIP}:${MON_V2_PORT},v1:${bindIP}:${MON_V1_PORT}]`,
    '--set-min-mon-release',
    'pacific',
    monmap,
  ]);
  await run('ceph-mon', ['--conf', p.conf, '--mkfs', '--id', 'a', '--monmap', monmap, '--keyring', p.monKeyring]);
  await writeFile(p.pid('mon.a'), String(startDaemon(p, 'mon.a')));
  log('ceph: mon.a started');
  await waitUntil('the mon', async () => {
    await ceph(p, ['mon', 'stat']);
    return true;
  });

  const mgrKeyring = path.join(p.dir, 'mgr/ceph-x/keyring');
  await writeFile(
    mgrKeyring,
    await ceph(p, ['auth', 'get-or-create', 'mgr.x', 'mon', 'allow profile mgr', 'osd', 'allow *', 'mds', 'allow *']),
  );
  await writeFile(p.pid('mgr.x'), String(startDaemon(p, 'mgr.x')));
  log('ceph: mgr.x started');

  // OSD 0 on a sparse file: `ceph osd new` with a key we generate, then mkfs (creates the block file), then run.
  const osdUuid = randomUUID();
  const osdKey = (await run('ceph-authtool', ['--gen-print-key'])).trim();
  const id = (await ceph(p, ['osd', 'new', osdUuid, '-i', '-'], JSON.stringify({ cephx_secret: osdKey }))).trim();
  if (id !== '0') throw new Error(`ceph: expected osd id 0, got ${id}`);
  await run('ceph-authtool', [
    '--create-keyring',
    path.join(p.dir, 'osd/ceph-0/keyring'),
    '--name',
    'osd.0',
    '--add-key',
    osdKey,
  ]);
  await run('ceph-osd', ['--conf', p.conf, '--id', '0', '--mkfs', '--osd-uuid', osdUuid], undefined, 180_000);
  await writeFile(p.pid('osd.0'), String(startDaemon(p, 'osd.0')));
  log('ceph: osd.0 started');
  await waitUntil('osd.0 up', async () => {
    const stat = JSON.parse(await ceph(p, ['osd', 'stat', '--format', 'json'])) as { num_up_osds?: number };
    return stat.num_up_osds === 1;
  });

  for (const pool of ['volumes', 'images']) {
    await ceph(p, ['osd', 'pool', 'create', pool, '8', '8', 'replicated', '--size', '1']);
    await ceph(p, ['osd', 'pool', 'set', pool, 'size', '1', '--yes-i-really-mean-it']);
    await ceph(p, ['osd', 'pool', 'application', 'enable', pool, 'rbd']);
    await run('rbd', ['--conf', p.conf, 'pool', 'init', pool], undefined, 120_000);
  }
  await ceph(p, [
    'auth',
    'get-or-create',
    'client.stratus',
    'mon',
    'profile rbd',
    'osd',
    'profile rbd pool=volumes, profile rbd pool=images',
  ]);
  const key = (await ceph(p, ['auth', 'get-key', 'client.stratus'])).trim();
  const rec: Recorded = { fsid, bindIP, key, iface };
  await writeFile(p.record, JSON.stringify(rec));
  return rec;
}

/** Stops the cluster of opts.dir (every daemon; state removed). Does nothing when none is there. */
export async function stopCeph(opts: { dir?: string; log?: (m: string) => void } = {}): Promise<void> {
  const p = new Paths(path.resolve(opts.dir ?? defaultCephDir()));
  await locked(p, () => stopLocked(p, opts.log ?? (() => {})));
}

async function stopLocked(p: Paths, log: (m: string) => void): Promise<void> {
  if (!existsSync(p.dir)) return;
  let rec: Recorded | undefined;
  try {
    rec = JSON.parse(await readFile(p.record, 'utf8')) as Recorded;
  } catch {
    rec = undefined;
  }
  for (const d of [...DAEMONS].reverse()) {
    const pid = await pidOf(p, d);
    if (pid === undefined) continue;
    try {
      process.kill(pid, 'SIGTERM');
    } catch {
      continue;
    }
    const end = Date.now() + 15_000;
    while ((await pidOf(p, d)) === pid && Date.now() < end) await sleep(100);
    if ((await pidOf(p, d)) === pid) {
      process.kill(pid, 'SIGKILL');
      while ((await pidOf(p, d)) === pid) await sleep(50);
    }
    log(`ceph: stopped ${d} (pid ${pid})`);
  }
  if (rec?.iface && existsSync(`/sys/class/net/${CEPH_IFACE}`)) await run('ip', ['link', 'del', CEPH_IFACE]);
  await rm(p.dir, { recursive: true, force: true });
}

/** Whether a cluster runs in opts.dir (its record, when it does). */
export async function cephStatus(
  opts: { dir?: string } = {},
): Promise<{ running: false } | { running: true; cluster: CephCluster; pids: Record<string, number> }> {
  const p = new Paths(path.resolve(opts.dir ?? defaultCephDir()));
  const rec = await healthy(p);
  if (!rec) return { running: false };
  const pids: Record<string, number> = {};
  for (const d of DAEMONS) pids[d] = (await pidOf(p, d)) ?? 0;
  return { running: true, cluster: clusterOf(p, rec, false, 0), pids };
}

/** Resident set size of each daemon of a running cluster, in bytes (from /proc/<pid>/status VmRSS). */
export async function cephRss(opts: { dir?: string } = {}): Promise<Record<string, number>> {
  const p = new Paths(path.resolve(opts.dir ?? defaultCephDir()));
  const out: Record<string, number> = {};
  for (const d of DAEMONS) {
    const pid = await pidOf(p, d);
    if (pid === undefined) continue;
    const m = /VmRSS:\s+(\d+) kB/.exec(await readFile(`/proc/${pid}/status`, 'utf8'));
    if (m) out[d] = Number(m[1]) * 1024;
  }
  return out;
}
