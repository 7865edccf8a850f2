// Which accelerator the node's guests use: KVM only when a real kernel demonstrably boots under it, TCG otherwise.
//
// /dev/kvm existing (even opening, even running firmware) is not enough:
//  - nested in a Firecracker VM, -cpu host aborts at start ("failed to set MSR 0x10a"), and SeaBIOS under KVM took
//    4-5 s where TCG needs 0.15 s (every port-I/O exit of real-mode firmware is expensive when nested);
//  - on hosts whose KVM is the paravirtual nested flavour (`kvm-pvm` in the kernel log), /dev/kvm opens, query-kvm
//    says enabled+present and SeaBIOS even runs a boot sector, but an ordinary kernel never gets going: the guest
//    stalls or dies with "KVM internal error. Suberror: 1 … emulation failure".
// The probe therefore boots a real Linux kernel (`-kernel`, no disk, no initrd) under KVM with the CPU model guests
// get, and accepts KVM only if, within the deadline, the kernel prints its banner ("Linux version") and gets as far
// as failing to mount a root file system ("Kernel panic" / QEMU exiting through panic=-1 + -no-reboot): that is past
// firmware, real mode, protected and long mode, paging, interrupts and timers. A QEMU that enters internal-error,
// exits otherwise or stays silent past the deadline means TCG.
//
// The kernel comes from --kvm-probe-kernel or the first existing of KERNEL_CANDIDATES (the agent image ships one;
// Debian hosts have /boot/vmlinuz-<release>). The result is cached (cacheFile, per boot of the host, host kernel,
// QEMU binary, probe kernel and CPU model), so a restarted agent does not probe again.
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { constants } from 'node:fs';
import { mkdir, mkdtemp, open, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { release, tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpClient } from './qmp.ts';

/** Same values as the API's Accelerator (Hypervisor and Server status). */
export type Accelerator = 'kvm' | 'tcg';
export type AcceleratorMode = 'auto' | 'kvm' | 'tcg';

export interface AcceleratorDecision {
  accelerator: Accelerator;
  /** Why, for HostInfo.acceleratorReason and logs. */
  reason: string;
}

export interface KvmProbeResult {
  ok: boolean;
  /** What happened, e.g. "kernel banner after 310 ms, reached its root mount (panic) after 820 ms". */
  detail: string;
}

export interface KvmProbeOptions {
  qemuBinary: string;
  cpuModel: string;
  /** The kernel (bzImage) booted under KVM. */
  kernel: string;
  /** Time allowed from `cont` to the kernel's root-mount panic. */
  deadlineMs: number;
  signal?: AbortSignal;
  /** Default kvm; tcg only to test the probe itself on hosts without KVM. */
  accelerator?: Accelerator;
}

export interface DetectAcceleratorOptions {
  mode: AcceleratorMode;
  /** Default /dev/kvm. */
  kvmDevice?: string;
  /** Default qemu-system-x86_64 (from PATH). */
  qemuBinary?: string;
  /** The -cpu guests will use under KVM. Default host. */
  cpuModel?: string;
  /** Kernel to boot; default the first existing of KERNEL_CANDIDATES. */
  probeKernel?: string;
  /** Per attempt, from `cont` to the root-mount panic. Default 15 s (a working KVM needs about 1 s). */
  deadlineMs?: number;
  /** Attempts that must all succeed (catches flaky KVM). Default 2. */
  attempts?: number;
  /** Where the probe result is cached (JSON); none: probe every time. */
  cacheFile?: string;
  signal?: AbortSignal;
  /** Injected for tests: open the device read-write (throws if impossible). */
  openDevice?: (path: string) => Promise<void>;
  /** Injected for tests: one boot probe. */
  probe?: (options: KvmProbeOptions) => Promise<KvmProbeResult>;
  /** Where to look for a kernel when probeKernel is not given; default kernelCandidates(). */
  kernelCandidates?: string[];
  /** Injected for tests: what identifies this host boot and its files (see probeCacheKey). */
  identity?: (files: string[]) => Promise<string>;
}

/** Thrown by detectAccelerator({mode: 'kvm'}) when KVM does not work. */
export class AcceleratorUnavailableError extends Error {
  override readonly name = 'AcceleratorUnavailableError';
}

/** Where a probe kernel is looked for when --kvm-probe-kernel is not given, in order. */
export function kernelCandidates(): string[] {
  return ['/usr/share/stratus/kvm-probe/vmlinuz', `/boot/vmlinuz-${release()}`, '/boot/vmlinuz', '/vmlinuz'];
}

/**
 * Decide the accelerator. mode 'tcg': TCG, no probing. mode 'kvm': KVM if it works, else throws
 * AcceleratorUnavailableError (the operator asked for KVM explicitly). mode 'auto': KVM if it works, else TCG
 * with the reason KVM was rejected.
 */
export async function detectAccelerator(options: DetectAcceleratorOptions): Promise<AcceleratorDecision> {
  if (options.mode === 'tcg') return { accelerator: 'tcg', reason: 'configured: tcg' };
  const result = await checkKvm(options);
  if (result.ok) {
    return { accelerator: 'kvm', reason: `${options.mode === 'kvm' ? 'configured: kvm; ' : ''}${result.detail}` };
  }
  if (options.mode === 'kvm') throw new AcceleratorUnavailableError(`KVM configured but unusable: ${result.detail}`);
  return { accelerator: 'tcg', reason: `KVM unusable, using TCG: ${result.detail}` };
}

async function checkKvm(options: DetectAcceleratorOptions): Promise<KvmProbeResult> {
  const device = options.kvmDevice ?? '/dev/kvm';
  try {
    await (options.openDevice ?? openReadWrite)(device);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const why = code === 'ENOENT' ? 'does not exist' : code === 'EACCES' ? 'permission denied' : String(err);
    return { ok: false, detail: `${device} cannot be opened read-write: ${why}` };
  }
  const candidates = options.kernelCandidates ?? kernelCandidates();
  const kernel = options.probeKernel ?? (await firstExisting(candidates));
  if (!kernel) {
    return {
      ok: false,
      detail: `${device} opens, but there is no kernel to boot the KVM probe with (looked for ${candidates.join(', ')}; set --kvm-probe-kernel)`,
    };
  }
  const probeOptions: KvmProbeOptions = {
    qemuBinary: options.qemuBinary ?? 'qemu-system-x86_64',
    cpuModel: options.cpuModel ?? 'host',
    kernel,
    deadlineMs: options.deadlineMs ?? 15_000,
    ...(options.signal ? { signal: options.signal } : {}),
  };
  const attempts = options.attempts ?? 2;

  let key: string | undefined;
  if (options.cacheFile) {
    key = await (options.identity ?? probeCacheKey)([probeOptions.qemuBinary, kernel]).catch(() => undefined);
    if (key) key = `${key} ${device} -cpu ${probeOptions.cpuModel} x${attempts}`;
    const cached = key ? await readCache(options.cacheFile, key) : undefined;
    if (cached) return { ok: cached.ok, detail: `${cached.detail} (probed ${cached.at}, cached for this host boot)` };
  }

  const probe = options.probe ?? probeKvmKernel;
  const details: string[] = [];
  let result: KvmProbeResult | undefined;
  for (let i = 1; i <= attempts && !result; i++) {
    const r = await probe(probeOptions);
    if (!r.ok)
      result = { ok: false, detail: `${device} opens, but kernel boot probe ${i}/${attempts} failed: ${r.detail}` };
    else details.push(r.detail);
  }
  result ??= {
    ok: true,
    detail: `${device} usable; kernel boot probe (${kernel}, -cpu ${probeOptions.cpuModel}): ${details.join('; ')}`,
  };
  options.signal?.throwIfAborted(); // an aborted probe decides nothing worth caching
  if (options.cacheFile && key) await writeCache(options.cacheFile, key, result).catch(() => {});
  return result;
}

async function openReadWrite(path: string): Promise<void> {
  const fh = await open(path, constants.O_RDWR);
  await fh.close();
}

async function firstExisting(paths: string[]): Promise<string | undefined> {
  for (const p of paths) {
    if (
      await stat(p).then(
        (s) => s.isFile(),
        () => false,
      )
    )
      return p;
  }
  return undefined;
}

/**
 * What a cached probe result is valid for: this boot of this host (boot_id), its kernel release, and the QEMU binary
 * and probe kernel as they are on disk (path, size, mtime).
 */
export async function probeCacheKey(files: string[]): Promise<string> {
  const bootId = (await readFile('/proc/sys/kernel/random/boot_id', 'utf8')).trim();
  const parts = [bootId, release()];
  for (const f of files) {
    const path = f.includes('/') ? f : ((await which(f)) ?? f);
    const s = await stat(path);
    parts.push(`${path}:${s.size}:${s.mtimeMs}`);
  }
  return createHash('sha256').update(parts.join('\n')).digest('hex').slice(0, 32);
}

async function which(name: string): Promise<string | undefined> {
  for (const dir of (process.env.PATH ?? '').split(':')) {
    if (
      dir &&
      (await stat(join(dir, name)).then(
        (s) => s.isFile(),
        () => false,
      ))
    )
      return join(dir, name);
  }
  return undefined;
}

interface CacheEntry {
  key: string;
  ok: boolean;
  detail: string;
  at: string;
}

async function readCache(file: string, key: string): Promise<CacheEntry | undefined> {
  try {
    const e = JSON.parse(await readFile(file, 'utf8')) as CacheEntry;
    return e.key === key && typeof e.ok === 'boolean' && typeof e.detail === 'string' ? e : undefined;
  } catch {
    return undefined;
  }
}

async function writeCache(file: string, key: string, r: KvmProbeResult): Promise<void> {
  await mkdir(dirname(file), { recursive: true });
  const entry: CacheEntry = { key, ok: r.ok, detail: r.detail, at: new Date().toISOString().replace(/\.\d+Z$/, 'Z') };
  const tmp = `${file}.${process.pid}.tmp`;
  await writeFile(tmp, `${JSON.stringify(entry, null, 2)}\n`);
  await rename(tmp, file);
}

/** The kernel command line of the probe: console on the first serial port, reboot (= QEMU exit) on panic. */
export const PROBE_APPEND = 'console=ttyS0 panic=-1';
/** Printed by start_kernel, in long mode with paging on. */
const BANNER = 'Linux version';
/** Printed when the kernel has found no root file system: it ran through its whole initialisation. */
const PANIC = 'Kernel panic';

/** argv of the probe guest (exported for tests). */
export function probeArgs(dir: string, kernel: string, cpuModel: string, accelerator: Accelerator = 'kvm'): string[] {
  return [
    '-machine',
    'q35',
    '-accel',
    accelerator,
    '-cpu',
    cpuModel,
    '-smp',
    '1',
    '-m',
    '256M',
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-no-reboot',
    '-S',
    '-chardev',
    `socket,id=qmp,path=${join(dir, 'qmp.sock').replaceAll(',', ',,')},server=on,wait=off`,
    '-mon',
    'chardev=qmp,mode=control',
    '-serial',
    'stdio',
    '-kernel',
    kernel,
    '-append',
    PROBE_APPEND,
  ];
}

/**
 * Boots the probe kernel once under KVM. Never throws: failures (QEMU missing, aborting, KVM not enabled, an
 * internal error, no progress before the deadline) come back as {ok: false, detail}.
 */
export async function probeKvmKernel(options: KvmProbeOptions): Promise<KvmProbeResult> {
  const dir = await mkdtemp(join(tmpdir(), 'stratus-kvm-probe-'));
  let qmp: QmpClient | undefined;
  const child = spawn(options.qemuBinary, probeArgs(dir, options.kernel, options.cpuModel, options.accelerator), {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  let serial = '';
  let bannerAt: number | undefined;
  let panicAt: number | undefined;
  let t0 = performance.now();
  const progressed = new AbortController();
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (s: string) => {
    if (stderr.length < 8192) stderr += s;
  });
  child.stdout.setEncoding('utf8');
  child.stdout.on('data', (s: string) => {
    if (serial.length < 1 << 20) serial += s;
    if (bannerAt === undefined && serial.includes(BANNER)) bannerAt = performance.now() - t0;
    if (panicAt === undefined && serial.includes(PANIC)) {
      panicAt = performance.now() - t0;
      progressed.abort();
    }
  });
  // 'close': the process has exited and its output has been read to the end.
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null; error?: Error }>((resolve) => {
    child.once('error', (error) => resolve({ code: null, signal: null, error }));
    child.once('close', (code, signal) => resolve({ code, signal }));
  });
  const stderrSummary = () =>
    stderr
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l && !l.includes('terminating on signal') && !l.startsWith('EAX=') && !/^[A-Z]{2,3}=/.test(l))
      .map((l) => l.replace(/^qemu-system-[\w-]+: /, ''))
      .slice(0, 2)
      .join('; ');
  const lastConsoleLine = () =>
    serial
      .split(/\r?\n/)
      .map((l) => l.trim())
      .filter(Boolean)
      .at(-1)
      ?.slice(0, 160);
  const describeExit = (e: Awaited<typeof exited>) =>
    e.error
      ? `cannot run ${options.qemuBinary}: ${e.error.message}`
      : `qemu exited ${e.code ?? e.signal}${stderrSummary() ? `: ${stderrSummary()}` : ''}`;
  const ms = (t: number) => `${Math.round(t)} ms`;
  try {
    const sock = join(dir, 'qmp.sock');
    const ready = await Promise.race([waitForSocket(sock, 10_000, options.signal), exited]);
    if (ready !== true) {
      return { ok: false, detail: ready === false ? 'no QMP socket within 10 s' : describeExit(ready) };
    }
    qmp = await QmpClient.connect(sock, { timeoutMs: 5000, ...(options.signal ? { signal: options.signal } : {}) });
    const kvm = await qmp.queryKvm();
    if ((options.accelerator ?? 'kvm') === 'kvm' && (!kvm.enabled || !kvm.present)) {
      return { ok: false, detail: `query-kvm: enabled=${kvm.enabled} present=${kvm.present}` };
    }
    // A KVM internal error stops the VM (STOP event, status internal-error) while QEMU stays alive.
    const stopped = new Promise<string>((resolve) => {
      qmp!.on('event', (e) => {
        if (e.event !== 'STOP' && e.event !== 'GUEST_PANICKED') return;
        qmp!
          .queryStatus({ timeoutMs: 5000 })
          .then((s) => {
            if (s.status !== 'running') resolve(s.status);
          })
          .catch(() => {});
      });
    });
    t0 = performance.now();
    await qmp.cont();
    const timer = new AbortController();
    const onAbort = () => timer.abort(options.signal?.reason);
    options.signal?.addEventListener('abort', onAbort, { once: true });
    const timedOut = Symbol('timeout');
    const panicked = Symbol('panic');
    const outcome = await Promise.race([
      exited,
      stopped,
      sleep(options.deadlineMs, timedOut, { signal: timer.signal }),
      new Promise<typeof panicked>((resolve) => {
        if (progressed.signal.aborted) resolve(panicked);
        progressed.signal.addEventListener('abort', () => resolve(panicked), { once: true });
      }),
    ]).finally(() => {
      options.signal?.removeEventListener('abort', onAbort);
      timer.abort();
    });
    const reached = () =>
      bannerAt === undefined
        ? 'no kernel output'
        : `kernel banner after ${ms(bannerAt)}, last console line: ${JSON.stringify(lastConsoleLine() ?? '')}`;
    if (outcome === panicked || (typeof outcome === 'object' && bannerAt !== undefined && panicAt !== undefined)) {
      return {
        ok: true,
        detail: `kernel banner after ${ms(bannerAt ?? panicAt ?? 0)}, through its initialisation to the root mount after ${ms(panicAt ?? 0)}`,
      };
    }
    if (outcome === timedOut) {
      const status = await qmp.queryStatus({ timeoutMs: 2000 }).catch(() => undefined);
      return {
        ok: false,
        detail: `the kernel did not finish booting within ${options.deadlineMs} ms under KVM (${status ? `status ${status.status}; ` : ''}${reached()})`,
      };
    }
    if (typeof outcome === 'string') {
      // Give QEMU a moment to print the error it stopped for (it writes it right before stopping).
      await sleep(100);
      return {
        ok: false,
        detail: `the guest stopped with status ${outcome} under KVM${stderrSummary() ? `: ${stderrSummary()}` : ''} (${reached()})`,
      };
    }
    return { ok: false, detail: `${describeExit(outcome)} (${reached()})` };
  } catch (err) {
    const e = await Promise.race([exited, sleep(100, undefined)]);
    return { ok: false, detail: e ? describeExit(e) : `probe failed: ${(err as Error).message}` };
  } finally {
    await qmp?.close().catch(() => {});
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL');
      await exited;
    }
    await rm(dir, { recursive: true, force: true });
  }
}

async function waitForSocket(path: string, timeoutMs: number, signal?: AbortSignal): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    signal?.throwIfAborted();
    try {
      if ((await stat(path)).isSocket()) return true;
    } catch {
      // not yet
    }
    await sleep(20);
  }
  return false;
}
