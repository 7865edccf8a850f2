// Guests outlive their agent pod (docs/design/guest-placement.md), without a kubelet: a stand-in agent
// (guest-placement-agent.ts) runs like a container — a cgroup of its own in every hierarchy, a private mount
// namespace, QEMU's files at a path only it sees — and starts a real QEMU (TCG, paused: -S) through the host launcher.
// The test then kills the stand-in and everything in its cgroup, as a container runtime deleting the pod does, and
// checks:
//  1. QEMU runs on with the same pid, in the host's mount namespace (its root is the host's), with nothing mapped
//     from outside its runtime bundle, in stratus-guests/<uid> in every hierarchy with the memory limit set;
//  2. QMP answers; a new launcher (the next agent pod, with a newer bundle) adopts the guest by its pid file, keeps
//     the bundle the running QEMU uses, removes an unused one and an empty stale guest cgroup;
//  3. destroy (QEMU killed, release) removes the guest's cgroup directories; the old bundle goes at the next start;
//  4. the whole QEMU driver with --launcher=host in the stand-in container (qemu-driver-agent.ts) spawns the test
//     image's guest (dropping to the QEMU user, firmware and modules from the bundle), which survives the container,
//     boots to READY, is adopted by a new driver (same pid, RUNNING) and destroyed with its cgroups.
// Needs root and qemu-system-x86_64; skipped (with a message) otherwise.
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readdir, readFile, readlink, rm, rmdir, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  type CgroupMount,
  cgroupMounts,
  GUESTS_CGROUP,
  memoryLimitBytes,
} from '../../node-agent/src/drivers/qemu/cgroups.ts';
import { CGROUP_WRAPPER, HostLauncher } from '../../node-agent/src/drivers/qemu/launcher-host.ts';
import { guestProcess, processOf, procReader } from '../../node-agent/src/drivers/qemu/proc.ts';
import { QemuDriver } from '../../node-agent/src/drivers/qemu.ts';
import { QmpClient } from '../../node-agent/src/qemu/qmp.ts';
import { createLogger } from '../../operator/src/runtime/index.ts';
import { ensureTestImage } from '../images/build.ts';
import { type FileServer, start } from '../images/serve.ts';
import { e2eAccelerator } from '../testing/qemu.ts';
import { waitFor } from '../testing/wait.ts';

const log = (m: string) => console.error(`[guest-placement] ${m}`);
/** SIGKILL, a process that is already gone included. */
const killQuietly = (pid: number) => {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // exited meanwhile
  }
};

function missing(): string | undefined {
  if (process.getuid?.() !== 0) return 'not root';
  try {
    execFileSync('qemu-system-x86_64', ['--version'], { stdio: 'ignore' });
  } catch {
    return 'qemu-system-x86_64 is not installed';
  }
  return undefined;
}
const why = missing();
if (why) log(`SKIPPED: ${why}`);

const UID = '7c1d2e3f-4a5b-4c6d-8e7f-90a1b2c3d4e5';
const UID_DRIVER = '8d2e3f4a-5b6c-4d7e-8f90-a1b2c3d4e5f6';
const BOOT_TIMEOUT = 150_000;
const STALE = '0badcafe-0000-4000-8000-000000000001';
const MEMORY_MIB = 64;
const PREFIX = '/usr';

describe.skipIf(why !== undefined)('guest placement: QEMU outlives its agent container (host launcher)', () => {
  let work: string;
  let stateDir: string;
  let guestDir: string;
  let mounts: CgroupMount[];
  const ctrCgroup = `stratus-e2e-ctr-${process.pid}`;
  let agent: ChildProcess | undefined;
  let qemuPid: number | undefined;
  let oldBundle: string;
  let server: FileServer | undefined;

  const ctrDirs = () => mounts.map((m) => path.join(m.mountPoint, ctrCgroup));
  const guestDirs = (id = UID) => mounts.map((m) => path.join(m.mountPoint, GUESTS_CGROUP, id));
  /** The "pod" cgroup, in every hierarchy. */
  const makePodCgroups = async () => {
    for (const [i, dir] of ctrDirs().entries()) {
      await mkdir(dir, { recursive: true });
      if (mounts[i]!.controllers.includes('cpuset')) {
        for (const f of ['cpuset.cpus', 'cpuset.mems']) {
          await writeFile(path.join(dir, f), await readFile(path.join(mounts[i]!.mountPoint, f), 'utf8'));
        }
      }
    }
  };
  /** The "container runtime" deletes the pod: SIGKILL to everything in its cgroups, then removes them. */
  const deletePod = async () => {
    // Until empty, as runc does (a process of the pod may fork or exit meanwhile).
    await waitFor('the pod cgroups empty', async () => {
      let left = 0;
      for (const dir of ctrDirs()) {
        for (const p of await procsOf(dir)) {
          left++;
          killQuietly(p);
        }
      }
      return left === 0;
    });
    for (const dir of ctrDirs()) await rmdir(dir);
    agent = undefined;
  };
  /** Starts `command` like a container's process: in the pod cgroups, then in a private mount namespace. */
  const startInPod = (command: string[]) =>
    spawn(
      '/bin/sh',
      [
        '-c',
        CGROUP_WRAPPER,
        'sh',
        work,
        ...ctrDirs().map((d) => path.join(d, 'cgroup.procs')),
        '--',
        'unshare',
        '-m',
        '--propagation',
        'private',
        '--',
        ...command,
      ],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    );
  const firstLine = (child: ChildProcess) =>
    new Promise<string>((resolve, reject) => {
      let buf = '';
      child.stdout!.on('data', (d: Buffer) => {
        buf += d.toString();
        if (buf.includes('\n')) resolve(buf.slice(0, buf.indexOf('\n')));
      });
      child.once('exit', (code) => reject(new Error(`stand-in agent exited (${code}) before starting QEMU: ${buf}`)));
    });
  const procsOf = async (dir: string) =>
    (await readFile(path.join(dir, 'cgroup.procs'), 'utf8').catch(() => ''))
      .split('\n')
      .filter((l) => l !== '')
      .map(Number);

  beforeAll(async () => {
    work = await mkdtemp('/tmp/stratus-place-');
    stateDir = path.join(work, 'state');
    guestDir = path.join(stateDir, 'guests', UID);
    await mkdir(guestDir, { recursive: true });
    // The "container image": QEMU's install prefix copied, plus a marker so its bundle differs from the host's.
    const src = path.join(work, 'ctr-src');
    for (const rel of ['bin', 'share', 'lib/ipxe', 'lib/x86_64-linux-gnu'])
      await mkdir(path.join(src, rel), { recursive: true });
    execFileSync('cp', ['-L', `${PREFIX}/bin/qemu-system-x86_64`, path.join(src, 'bin')]);
    for (const rel of ['share/qemu', 'share/seabios', 'lib/ipxe/qemu', 'lib/x86_64-linux-gnu/qemu']) {
      if (existsSync(path.join(PREFIX, rel)))
        execFileSync('cp', ['-rL', path.join(PREFIX, rel), path.dirname(path.join(src, rel))]);
    }
    await writeFile(path.join(src, 'share/qemu/stratus-placement-marker'), `${work}\n`);
    await mkdir(path.join(work, 'ctr'));
    mounts = cgroupMounts(await readFile('/proc/self/mountinfo', 'utf8'));
  });

  afterAll(async () => {
    agent?.kill('SIGKILL');
    const driverPid = Number(
      (await readFile(path.join(stateDir, 'guests', UID_DRIVER, 'qemu.pid'), 'utf8').catch(() => '')).trim(),
    );
    if (driverPid > 0 && (await processOf(procReader, driverPid, UID_DRIVER)).kind === 'running') {
      process.kill(driverPid, 'SIGKILL');
      await waitFor('QEMU gone', async () => (await processOf(procReader, driverPid, UID_DRIVER)).kind !== 'running');
    }
    await server?.close();
    if (qemuPid !== undefined && (await processOf(procReader, qemuPid, UID)).kind === 'running') {
      process.kill(qemuPid, 'SIGKILL');
      await waitFor('QEMU gone', async () => (await processOf(procReader, qemuPid!, UID)).kind !== 'running');
    }
    for (const dir of ctrDirs()) {
      for (const pid of await procsOf(dir)) killQuietly(pid);
    }
    for (const dir of [...ctrDirs(), ...guestDirs(), ...guestDirs(STALE), ...guestDirs(UID_DRIVER)]) {
      await waitFor(`${dir} removable`, async () => {
        await rmdir(dir).catch((e: NodeJS.ErrnoException) => {
          if (e.code !== 'ENOENT') throw e;
        });
        return true;
      });
    }
    for (const m of mounts ?? []) await rmdir(path.join(m.mountPoint, GUESTS_CGROUP)).catch(() => {});
    await rm(work, { recursive: true, force: true });
  });

  it('QEMU started from the container survives the container, on the host', async () => {
    const input = {
      ctrSrc: path.join(work, 'ctr-src'),
      ctr: path.join(work, 'ctr'),
      stateDir,
      id: UID,
      dir: guestDir,
      memoryMiB: MEMORY_MIB,
      args: [
        '-name',
        'guest=e2e:placement',
        '-uuid',
        UID,
        '-nodefaults',
        '-display',
        'none',
        '-machine',
        'pc',
        '-accel',
        'tcg',
        '-m',
        String(MEMORY_MIB),
        '-S',
        '-qmp',
        `unix:${path.join(guestDir, 'qmp.sock')},server=on,wait=off`,
        '-pidfile',
        path.join(guestDir, 'qemu.pid'),
      ],
    };
    await makePodCgroups();
    agent = startInPod([
      process.execPath,
      path.join(import.meta.dirname, 'guest-placement-agent.ts'),
      JSON.stringify(input),
    ]);
    const line = await firstLine(agent);
    const started = JSON.parse(line) as { pid?: number; bundle?: string; error?: string };
    expect(started.error).toBeUndefined();
    const pid = started.pid!;
    qemuPid = pid;
    oldBundle = started.bundle!;
    expect(path.dirname(oldBundle)).toBe(path.join(stateDir, 'runtime'));
    // The binary the agent named exists only in its mount namespace.
    expect(existsSync(path.join(work, 'ctr', 'bin', 'qemu-system-x86_64'))).toBe(false);

    await deletePod();

    // Same pid, still this guest's QEMU, in the host's mount namespace with the host's root.
    expect(await guestProcess(procReader, path.join(guestDir, 'qemu.pid'), UID)).toEqual({ kind: 'running', pid });
    expect(await readlink(`/proc/${pid}/ns/mnt`)).toBe(await readlink('/proc/self/ns/mnt'));
    expect(await readlink(`/proc/${pid}/root`)).toBe('/');
    // QMP answers (paused at start: -S); QEMU writes its pid file before it loads its accelerator module and opens
    // QMP, so the mappings are looked at after this.
    const qmp = await waitFor('QMP', () => QmpClient.connect(path.join(guestDir, 'qmp.sock')));
    try {
      expect((await qmp.queryStatus()).status).toBe('prelaunch');
    } finally {
      await qmp.close();
    }
    const cmdline = (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0');
    expect(cmdline[0]).toBe(path.join(oldBundle, 'lib64', 'ld-linux-x86-64.so.2'));
    // Every file QEMU maps (loader, binary, libraries, the TCG accelerator module) comes from the bundle.
    const mapped = new Set(
      (await readFile(`/proc/${pid}/maps`, 'utf8'))
        .split('\n')
        .map((l) => l.split(/\s+/).slice(5).join(' '))
        .filter((f) => f.startsWith('/') && !f.startsWith('/dev/') && !f.startsWith('/memfd:')),
    );
    expect([...mapped].filter((f) => !f.startsWith(`${oldBundle}/`))).toEqual([]);
    expect([...mapped].some((f) => f.endsWith('/accel-tcg-x86_64.so'))).toBe(true);
    // Its own cgroup in every hierarchy, with the memory limit.
    const cgroups = (await readFile(`/proc/${pid}/cgroup`, 'utf8')).split('\n').filter((l) => l !== '');
    expect(cgroups.length).toBe(mounts.length);
    for (const l of cgroups) expect(l.slice(l.indexOf(':', l.indexOf(':') + 1) + 1)).toBe(`/${GUESTS_CGROUP}/${UID}`);
    const memory = mounts.find((m) => m.controllers.includes('memory'));
    if (memory) {
      const limit = await readFile(path.join(memory.mountPoint, GUESTS_CGROUP, UID, 'memory.limit_in_bytes'), 'utf8');
      expect(Number(limit.trim())).toBe(memoryLimitBytes(MEMORY_MIB, 'tcg'));
    }
  });

  it('the next agent adopts it, keeps its bundle, and destroy removes its cgroups', async () => {
    const pid = qemuPid!;
    const runtime = path.join(stateDir, 'runtime');
    const unused = path.join(runtime, 'cc'.repeat(32));
    await mkdir(path.join(unused, 'bin'), { recursive: true });
    for (const dir of guestDirs(STALE)) await mkdir(dir, { recursive: true });
    // The next pod: the host's own QEMU (another bundle), the host seen through this process' root.
    const next = new HostLauncher({
      host: { pid: process.pid, inContainer: true },
      stateDir,
      qemuBinary: 'qemu-system-x86_64',
    });
    await next.init();
    expect(next.bundle!.dir).not.toBe(oldBundle);
    expect((await readdir(runtime)).sort()).toEqual([path.basename(oldBundle), next.bundle!.hash].sort());
    for (const dir of guestDirs(STALE)) expect(existsSync(dir)).toBe(false);
    for (const dir of guestDirs()) expect(existsSync(dir)).toBe(true);
    // Adoption is the driver's: the pid file names a live QEMU of this guest.
    expect(await guestProcess(procReader, path.join(guestDir, 'qemu.pid'), UID)).toEqual({ kind: 'running', pid });

    // destroy: the driver kills QEMU, then the launcher releases the guest.
    process.kill(pid, 'SIGKILL');
    await waitFor('QEMU gone', async () => (await processOf(procReader, pid, UID)).kind !== 'running');
    await next.release(UID); // waits for the killed QEMU to be reaped (its cgroups are busy until then)
    for (const dir of guestDirs()) expect(existsSync(dir)).toBe(false);
    qemuPid = undefined;
    // The old bundle is no longer used: the next start removes it.
    await next.init();
    expect(await readdir(runtime)).toEqual([next.bundle!.hash]);
  });

  it('the QEMU driver with --launcher=host: a real guest outlives the container, is adopted and destroyed', async () => {
    const image = await ensureTestImage({ log });
    await chmod(work, 0o711); // QEMU drops to the QEMU user and must still reach its guest directory
    const serveDir = path.join(work, 'www');
    await mkdir(serveDir);
    await symlink(image.path, path.join(serveDir, 'test.qcow2'));
    server = await start(serveDir);
    const options = {
      stateDir,
      imageCacheDir: path.join(work, 'cache'),
      accelerator: e2eAccelerator(),
      kvmProbeKernel: image.kernel,
      acceleratorCacheFile: path.join(work, 'kvm-probe.json'),
      startTimeoutMs: BOOT_TIMEOUT,
      imageUrlPolicy: { allowCidrs: ['127.0.0.0/8'] },
      qemuUser: 'stratus-qemu',
      launcher: 'host' as const,
    };
    const spec = {
      id: UID_DRIVER,
      name: 'placed',
      namespace: 'e2e',
      vcpus: 1,
      ramMiB: 256,
      disk: { rootGiB: 1, ephemeralGiB: 0, swapMiB: 0 },
      image: 'test-image',
      imageSource: {
        name: 'test-image',
        namespace: 'e2e',
        uid: 'img-0001',
        url: `${server.url}/test.qcow2`,
        diskFormat: 'qcow2' as const,
        checksum: { algorithm: 'sha256' as const, value: image.sha256 },
      },
      hostname: 'placed',
      annotations: {},
    };
    await makePodCgroups();
    // The container's QEMU is at a path only the stand-in agent sees.
    agent = startInPod([
      '/bin/sh',
      '-c',
      'mount --bind "$1" "$2" && shift 2 && exec "$@"',
      'sh',
      path.join(work, 'ctr-src'),
      path.join(work, 'ctr'),
      process.execPath,
      path.join(import.meta.dirname, 'qemu-driver-agent.ts'),
      JSON.stringify({ ...options, qemuBinary: path.join(work, 'ctr', 'bin', 'qemu-system-x86_64') }),
      JSON.stringify(spec),
    ]);
    const state = JSON.parse(await firstLine(agent)) as { powerState?: string; pid?: number; error?: string };
    expect(state.error).toBeUndefined();
    expect(state.powerState).toBe('RUNNING');
    const pid = state.pid!;
    await deletePod();

    expect((await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0')[0]).toMatch(
      new RegExp(`^${stateDir}/runtime/[0-9a-f]{64}/lib64/ld-linux-x86-64.so.2$`),
    );
    const cgroups = (await readFile(`/proc/${pid}/cgroup`, 'utf8')).split('\n').filter((l) => l !== '');
    for (const l of cgroups) expect(l.endsWith(`:/${GUESTS_CGROUP}/${UID_DRIVER}`)).toBe(true);
    // The guest boots to the end with the container gone (firmware, modules and libraries from the bundle).
    await waitFor(
      'the guest READY on its console',
      async () =>
        (await readFile(path.join(stateDir, 'guests', UID_DRIVER, 'console.log'), 'utf8').catch(() => '')).includes(
          'STRATUS-GUEST-READY',
        ),
      BOOT_TIMEOUT,
    );

    // The next agent (on the host here: no bundle, same cgroups) adopts it, then destroys it.
    const logger = createLogger({ level: 'warn', destination: process.stderr as never });
    const next = new QemuDriver({ ...options, qemuBinary: 'qemu-system-x86_64' }, { logger });
    try {
      await next.init();
      expect(await next.state(UID_DRIVER)).toMatchObject({ powerState: 'RUNNING', pid });
      await next.destroy(UID_DRIVER);
      expect((await processOf(procReader, pid, UID_DRIVER)).kind).not.toBe('running');
      for (const dir of guestDirs(UID_DRIVER)) expect(existsSync(dir)).toBe(false);
    } finally {
      await next.close();
    }
  });
});
