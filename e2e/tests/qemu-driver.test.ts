// The QEMU driver against real QEMU and the test guest image, without Kubernetes. The accelerator is whatever the
// driver decides on this host (STRATUS_E2E_ACCELERATOR, default auto): the tests assert behaviour for that choice.
//  0. the KVM probe recognises a real kernel booting (run under TCG so it runs anywhere) and rejects a non-kernel;
//  1. a driver in a separate process spawns the guest and is SIGKILLed (with its process group): QEMU keeps running;
//  2. a driver in this process adopts it (same pid) and drives it: pause/unpause, hard reboot, graceful power off,
//     power on, suspend (state saved to disk, no process) and resume, a poweroff from inside the guest and a killed
//     QEMU (GuestExit guest-shutdown / crash), and a guest kernel panic that leaves QEMU alive (pvpanic): the driver
//     reports a CRASHED exit naming it, ends that QEMU, and power on starts a fresh one;
//  3. a second driver instance over the same state directory adopts the running guest; destroy removes everything;
//  4. spawns whose image is refused (checksum mismatch, bigger than the root disk) fail with ImageError and leave
//     no guest directory.
// Needs root, qemu-system-x86_64, qemu-img and genisoimage; skipped (with a message) otherwise.
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readdir, readFile, rm, stat, symlink } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Accelerator, GuestExit, GuestSpec } from '../../node-agent/src/driver.ts';
import { resolveQemuUser } from '../../node-agent/src/drivers/qemu/user.ts';
import { QemuDriver } from '../../node-agent/src/drivers/qemu.ts';
import { ImageError } from '../../node-agent/src/images/cache.ts';
import { detectAccelerator, probeKvmKernel } from '../../node-agent/src/qemu/accel.ts';
import { createLogger } from '../../operator/src/runtime/index.ts';
import { ensureTestImage, type TestImage } from '../images/build.ts';
import { type FileServer, start } from '../images/serve.ts';
import { e2eAccelerator, missingQemuPrerequisite } from '../testing/qemu.ts';
import { waitFor } from '../testing/wait.ts';

const log = (m: string) => console.error(`[qemu-driver] ${m}`);

const missing = missingQemuPrerequisite();
if (missing) log(`SKIPPED: ${missing} (the QEMU driver test needs root, QEMU, qemu-img and genisoimage)`);

const UID = '3f6a1c2e-8b4d-4e7f-9a1b-2c3d4e5f6a7b';
const UID_BAD_SUM = '4a7b2d3f-9c5e-4f80-8b2c-3d4e5f6a7b8c';
const UID_TOO_BIG = '5b8c3e4a-ad6f-4091-9c3d-4e5f6a7b8c9d';
const HOSTNAME = 'qd-guest';
const BOOT_TIMEOUT = 150_000;
/** Created by npm run setup; QEMU drops to it (-runas). */
const QEMU_USER = 'stratus-qemu';

const cmdline = async (pid: number) => (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0');
/** The pid is a live QEMU of our guest (a zombie has an empty command line). */
const alive = async (pid: number) => (await cmdline(pid)).includes(UID);
const count = (text: string, needle: string) => text.split(needle).length - 1;

describe.skipIf(missing !== undefined)('QEMU driver (real QEMU)', () => {
  let image: TestImage;
  /** What the driver decides on this host (the same probe and cache file the driver uses). */
  let accel: Accelerator;
  let work: string;
  let stateDir: string;
  let imageCacheDir: string;
  let server: FileServer;
  let agent: ChildProcess | undefined;
  const drivers: QemuDriver[] = [];
  const logger = createLogger({
    level: process.env.STRATUS_TEST_LOG === '1' ? 'debug' : 'warn',
    destination: process.stderr as never,
  });

  const spec = (over: Partial<GuestSpec> = {}): GuestSpec => ({
    id: UID,
    name: 'web-1',
    namespace: 'demo',
    vcpus: 1,
    ramMiB: 256,
    disk: { rootGiB: 1, ephemeralGiB: 1, swapMiB: 64 },
    image: 'test-image',
    imageSource: {
      name: 'test-image',
      namespace: 'demo',
      uid: 'img-0001',
      url: `${server.url}/test.qcow2`,
      diskFormat: 'qcow2',
      checksum: { algorithm: 'sha256', value: image.sha256 },
    },
    userData: '#!/bin/sh\necho USERDATA-RAN-$((6*7))\n',
    keyPair: { name: 'k1', publicKey: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ1 test@stratus' },
    hostname: HOSTNAME,
    configDrive: true,
    metadata: { role: 'web' },
    annotations: {},
    ...over,
  });

  const driverOptions = () => ({
    stateDir,
    imageCacheDir,
    accelerator: e2eAccelerator(),
    kvmProbeKernel: image.kernel,
    acceleratorCacheFile: path.join(work, 'kvm-probe.json'),
    powerOffTimeoutMs: 60_000,
    startTimeoutMs: BOOT_TIMEOUT,
    imageUrlPolicy: { allowCidrs: ['127.0.0.0/8'] }, // the image server is on loopback
    qemuUser: QEMU_USER,
  });
  const newDriver = () => {
    const d = new QemuDriver(driverOptions(), { logger });
    drivers.push(d);
    return d;
  };

  const guestDir = (id = UID) => path.join(stateDir, 'guests', id);
  const consoleText = async () =>
    (await readFile(path.join(guestDir(), 'console.log'), 'utf8').catch(() => '')).replaceAll('\r', '');
  const waitConsole = async (needle: string, times: number, timeoutMs = BOOT_TIMEOUT) => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const text = await consoleText();
      if (count(text, needle) >= times) return text;
      if (Date.now() > deadline) throw new Error(`no ${needle} (x${times}) in the console:\n${text.slice(-3000)}`);
      await sleep(100);
    }
  };
  const ready = `STRATUS-GUEST-READY hostname=${HOSTNAME} instance-id=${UID}\n`;
  /** Types a line on the guest's serial console (a busybox shell). */
  const typeLine = async (line: string) => {
    const sock = net.connect(path.join(guestDir(), 'console.sock'));
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', () => resolve());
      sock.once('error', reject);
    });
    // QEMU feeds the guest's UART from the socket only as fast as the guest reads, and closing a socket with unread
    // data resets it, which drops what QEMU has not read yet: keep it open until the shell has echoed the line.
    let echoed = '';
    sock.on('data', (b: Buffer) => {
      echoed += b.toString('utf8');
    });
    sock.write(`\n${line}\n`);
    try {
      await waitFor(`the guest shell to echo ${JSON.stringify(line)}`, () =>
        echoed.replaceAll('\r', '').includes(line),
      );
    } finally {
      sock.destroy();
    }
  };

  beforeAll(async () => {
    const t0 = Date.now();
    image = await ensureTestImage({ log });
    log(`test image ready in ${Date.now() - t0} ms`);
    work = await mkdtemp('/tmp/stratus-qd-');
    await chmod(work, 0o711); // QEMU drops to --qemu-user and must still reach its guest directory
    stateDir = path.join(work, 'state');
    imageCacheDir = path.join(work, 'cache');
    const serveDir = path.join(work, 'www');
    await mkdir(serveDir);
    await symlink(image.path, path.join(serveDir, 'test.qcow2'));
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(serveDir, 'big.qcow2'), '2G']);
    server = await start(serveDir);
    const decision = await detectAccelerator({
      mode: e2eAccelerator(),
      probeKernel: image.kernel,
      cacheFile: path.join(work, 'kvm-probe.json'),
    });
    accel = decision.accelerator;
    log(`accelerator on this host: ${decision.accelerator} (${decision.reason})`);
  }, 600_000);

  it('the KVM probe recognises a real kernel booting (under TCG, so on any host) and rejects a non-kernel', async () => {
    const ok = await probeKvmKernel({
      qemuBinary: 'qemu-system-x86_64',
      cpuModel: 'max',
      kernel: image.kernel,
      deadlineMs: BOOT_TIMEOUT,
      accelerator: 'tcg',
    });
    log(`probe under TCG: ${ok.detail}`);
    expect(ok).toEqual({
      ok: true,
      detail: expect.stringMatching(/^kernel banner after \d+ ms, through its initialisation/),
    });
    // A qcow2 file is no kernel: QEMU runs garbage that never prints a banner, so the probe gives up at its deadline.
    const bad = await probeKvmKernel({
      qemuBinary: 'qemu-system-x86_64',
      cpuModel: 'max',
      kernel: image.path,
      deadlineMs: 5_000,
      accelerator: 'tcg',
    });
    expect(bad).toEqual({ ok: false, detail: expect.stringMatching(/no kernel output|qemu exited/) });
  });

  afterAll(async () => {
    if (agent?.pid && agent.exitCode === null) {
      try {
        process.kill(-agent.pid, 'SIGKILL');
      } catch {}
    }
    // Never leave a guest behind, whatever failed.
    for (const id of [UID, UID_BAD_SUM, UID_TOO_BIG]) {
      const pid = Number((await readFile(path.join(guestDir(id), 'qemu.pid'), 'utf8').catch(() => '')).trim());
      if (pid > 0 && (await cmdline(pid)).includes(id)) process.kill(pid, 'SIGKILL');
    }
    for (const d of drivers) await d.close().catch(() => {});
    await server?.close();
    if (work) await rm(work, { recursive: true, force: true });
  });

  let pid = 0;

  it('spawns from a separate agent process; the guest survives SIGKILL of that process', async () => {
    const t0 = Date.now();
    agent = spawn(
      process.execPath,
      [
        path.join(import.meta.dirname, 'qemu-driver-agent.ts'),
        JSON.stringify({ ...driverOptions(), startTimeoutMs: BOOT_TIMEOUT }),
        JSON.stringify(spec()),
      ],
      { detached: true, stdio: ['ignore', 'pipe', 'inherit'] },
    );
    const line = await new Promise<string>((resolve, reject) => {
      let buf = '';
      agent!.stdout!.on('data', (c: Buffer) => {
        buf += c.toString();
        if (buf.includes('\n')) resolve(buf.split('\n')[0]!);
      });
      agent!.once('exit', (code) => reject(new Error(`agent exited ${code}: ${buf}`)));
    });
    const state = JSON.parse(line) as { powerState: string; pid: number; accelerator: string };
    log(`spawn (download, disks, seeds, QEMU up) took ${Date.now() - t0} ms`);
    expect(state).toMatchObject({ powerState: 'RUNNING', accelerator: accel });
    pid = state.pid;
    // QEMU dropped to the QEMU user (real, effective, saved and filesystem ids), and its files are that user's alone.
    const user = await resolveQemuUser(QEMU_USER);
    const status = await readFile(`/proc/${pid}/status`, 'utf8');
    expect(/^Uid:\s+(.*)$/m.exec(status)?.[1]?.split(/\s+/)).toEqual(Array(4).fill(String(user!.uid)));
    expect(/^Gid:\s+(.*)$/m.exec(status)?.[1]?.split(/\s+/)).toEqual(Array(4).fill(String(user!.gid)));
    for (const f of ['root.qcow2', 'ephemeral.qcow2', 'seed.iso', 'console.log']) {
      const st = await stat(path.join(guestDir(), f));
      expect({ f, uid: st.uid, mode: st.mode & 0o777 }).toEqual({ f, uid: user!.uid, mode: 0o600 });
    }
    expect((await stat(guestDir())).mode & 0o777).toBe(0o700);
    expect((await stat(path.join(guestDir(), 'guest.json'))).uid).toBe(0);
    const text = await waitConsole('STRATUS-GUEST-READY', 1);
    log(`spawn -> READY: ${Date.now() - t0} ms`);
    expect(text).toContain(ready);
    expect(text).toContain('USERDATA-RAN-42\n');
    expect((await readdir(guestDir())).sort()).toEqual(
      [
        'config-drive.iso',
        'console.log',
        'console.sock',
        'ephemeral.qcow2',
        'guest.json',
        'qemu.log',
        'qemu.pid',
        'qmp.sock',
        'root.qcow2',
        'seed.iso',
        'swap.qcow2',
        'vnc.sock',
      ].sort(),
    );
    // Kill the agent and its whole process group: QEMU is in neither.
    process.kill(-agent.pid!, 'SIGKILL');
    await new Promise((resolve) => agent!.once('exit', resolve));
    expect(await alive(pid)).toBe(true);
    expect(await cmdline(pid)).toContain(UID);
  });

  it('adopts the guest and drives it: pause, hard reboot, power off/on, suspend/resume, exits', async () => {
    const d = newDriver();
    await d.init();
    const host = await d.hostInfo();
    log(`accelerator ${host.accelerator}: ${host.acceleratorReason}`);
    expect(host).toMatchObject({ accelerator: accel, version: expect.stringMatching(/^\d+\.\d+/) });
    // The driver decided from the cached probe result (one probe per host boot), and says why.
    if (/kernel boot probe/.test(host.acceleratorReason ?? '')) {
      expect(host.acceleratorReason).toMatch(/cached for this host boot/);
    }
    expect(host.capacity.vcpus).toBeGreaterThan(0);
    const exits: GuestExit[] = [];
    d.onGuestExit((e) => exits.push(e));
    expect(await d.state(UID)).toMatchObject({ powerState: 'RUNNING', pid });
    expect(await d.list()).toEqual([
      expect.objectContaining({ id: UID, name: 'web-1', namespace: 'demo', vcpus: 1, ramMiB: 256, diskGiB: 3 }),
    ]);

    await d.pause(UID);
    expect((await d.state(UID))?.powerState).toBe('PAUSED');
    await d.pause(UID); // idempotent
    await d.unpause(UID);
    expect((await d.state(UID))?.powerState).toBe('RUNNING');

    let t = Date.now();
    await d.reboot(UID, { hard: true });
    await waitConsole('STRATUS-GUEST-READY', 2);
    log(`hard reboot -> READY: ${Date.now() - t} ms`);
    expect(await d.state(UID)).toMatchObject({ powerState: 'RUNNING', pid });

    t = Date.now();
    await d.powerOff(UID, { graceful: true, timeoutMs: 60_000 });
    log(`graceful power off: ${Date.now() - t} ms`);
    expect(await consoleText()).toContain('STRATUS-GUEST-POWEROFF');
    expect(await alive(pid)).toBe(false);
    expect(await d.state(UID)).toEqual({ id: UID, powerState: 'SHUTDOWN', accelerator: accel });
    await d.powerOff(UID, { graceful: true, timeoutMs: 1000 }); // idempotent

    t = Date.now();
    await d.powerOn(UID);
    await waitConsole('STRATUS-GUEST-READY', 3);
    log(`power on -> READY: ${Date.now() - t} ms`);
    const on = await d.state(UID);
    expect(on?.powerState).toBe('RUNNING');
    expect(on?.pid).not.toBe(pid);
    pid = on!.pid!;

    t = Date.now();
    await d.suspend(UID);
    log(`suspend: ${Date.now() - t} ms`);
    expect(await alive(pid)).toBe(false);
    expect(await d.state(UID)).toMatchObject({ powerState: 'SUSPENDED' });
    expect(existsSync(path.join(guestDir(), 'state.bin'))).toBe(true);
    t = Date.now();
    await d.resume(UID);
    log(`resume: ${Date.now() - t} ms`);
    const resumed = await d.state(UID);
    expect(resumed?.powerState).toBe('RUNNING');
    pid = resumed!.pid!;
    expect(existsSync(path.join(guestDir(), 'state.bin'))).toBe(false);
    // The same guest continues (no new boot) and its shell answers.
    await typeLine('echo RESUMED-$((40+2))');
    await waitConsole('RESUMED-42\n', 1, 30_000);
    expect(count(await consoleText(), 'STRATUS-GUEST-READY')).toBe(3);
    expect(exits).toEqual([]);

    // The guest powers itself off: a GuestExit with guest-shutdown.
    await typeLine('poweroff');
    await waitFor('the guest-shutdown exit', () => exits.length > 0);
    expect(exits).toEqual([{ id: UID, powerState: 'SHUTDOWN', at: expect.any(String), reason: 'guest-shutdown' }]);
    expect((await d.state(UID))?.powerState).toBe('SHUTDOWN');

    await d.powerOn(UID);
    await waitConsole('STRATUS-GUEST-READY', 4);
    pid = (await d.state(UID))!.pid!;
    // QEMU killed: a crash.
    process.kill(pid, 'SIGKILL');
    await waitFor('the crash exit', () => exits.length > 1);
    expect(exits[1]).toEqual({ id: UID, powerState: 'CRASHED', at: expect.any(String), reason: 'crash' });
    expect((await d.state(UID))?.powerState).toBe('CRASHED');

    t = Date.now();
    await d.powerOn(UID);
    await waitConsole('STRATUS-GUEST-READY', 5);
    log(`power on after crash -> READY: ${Date.now() - t} ms`);
    const back = await d.state(UID);
    expect(back?.powerState).toBe('RUNNING');
    pid = back!.pid!;
    expect(exits).toHaveLength(2);

    // A guest kernel panic: pvpanic stops the VM (guest-panicked) with QEMU alive, like a KVM internal error does.
    // The driver reports it, ends that QEMU (no guest stays stuck CRASHED with a live process), and powerOn works.
    await typeLine('echo c > /proc/sysrq-trigger');
    await waitFor('the panic exit', () => exits.length > 2, 60_000);
    expect(exits[2]).toEqual({
      id: UID,
      powerState: 'CRASHED',
      at: expect.any(String),
      reason: expect.stringMatching(/^the guest kernel panicked \(QEMU status guest-panicked/),
    });
    await waitFor('the panicked QEMU to end', async () => !(await alive(pid)));
    expect(await d.state(UID)).toEqual({
      id: UID,
      powerState: 'CRASHED',
      accelerator: accel,
      fault: expect.stringMatching(/^the guest kernel panicked/),
    });
    await d.powerOn(UID);
    await waitConsole('STRATUS-GUEST-READY', 6);
    const again = await d.state(UID);
    expect(again).toMatchObject({ powerState: 'RUNNING' });
    expect(again).not.toHaveProperty('fault');
    pid = again!.pid!;
    expect(exits).toHaveLength(3);
    await d.close();
    expect(await alive(pid)).toBe(true);
  });

  it('a second driver over the same state directory adopts the running guest; destroy removes it', async () => {
    const d = newDriver();
    await d.init();
    expect(await d.state(UID)).toMatchObject({ powerState: 'RUNNING', pid });
    // The image a guest is built on is never evicted, however old.
    expect(await d.evictImages(0)).toEqual([]);
    await d.destroy(UID);
    expect(await alive(pid)).toBe(false);
    expect(existsSync(guestDir())).toBe(false);
    expect(await d.state(UID)).toBeUndefined();
    await d.destroy(UID); // idempotent
    // Once no guest uses it, it goes.
    const evicted = await d.evictImages(0);
    expect(evicted.length).toBeGreaterThan(0);
    for (const f of evicted) expect(existsSync(f)).toBe(false);
  });

  it('refuses images with a wrong checksum or bigger than the root disk, leaving no guest directory', async () => {
    const d = newDriver();
    await d.init();
    const base = spec();
    const badSum = await d
      .spawn(
        spec({
          id: UID_BAD_SUM,
          imageSource: {
            ...base.imageSource!,
            uid: 'img-0002',
            checksum: { algorithm: 'sha256', value: '0'.repeat(64) },
          },
        }),
      )
      .catch((e: unknown) => e);
    expect(badSum).toBeInstanceOf(ImageError);
    expect(badSum).toMatchObject({ reason: 'ChecksumMismatch' });
    expect(existsSync(guestDir(UID_BAD_SUM))).toBe(false);

    const tooBig = await d
      .spawn(
        spec({
          id: UID_TOO_BIG,
          imageSource: {
            name: 'big',
            namespace: 'demo',
            uid: 'img-0003',
            url: `${server.url}/big.qcow2`,
            diskFormat: 'qcow2',
          },
        }),
      )
      .catch((e: unknown) => e);
    expect(tooBig).toBeInstanceOf(ImageError);
    expect(tooBig).toMatchObject({ reason: 'TooBig' });
    expect(existsSync(guestDir(UID_TOO_BIG))).toBe(false);
    expect(await readdir(path.join(stateDir, 'guests'))).toEqual([]);
    await d.close();
  });
});
