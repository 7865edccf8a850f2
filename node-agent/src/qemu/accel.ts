// Which accelerator the node's guests use: KVM only when it demonstrably works, TCG otherwise.
//
// /dev/kvm existing (even opening) is not enough. On the development machines (nested in a Firecracker VM on
// AMD EPYC) /dev/kvm opens read-write and query-kvm says enabled+present, yet:
//  - -cpu host (and max) abort at start: "failed to set MSR 0x10a to 0x69" (IA32_ARCH_CAPABILITIES);
//  - with qemu64 the same SeaBIOS boot that TCG finishes in ~0.15 s takes 4-5 s under KVM (each of the many
//    port-I/O exits of real-mode firmware is very expensive when nested), so real guests look hung.
// The probe therefore boots what every guest boots: q35 + SeaBIOS + a virtio-blk disk, with the CPU model
// guests will get. The disk's boot sector writes 0x2a to an isa-debug-exit port, which makes QEMU exit with
// status (0x2a << 1) | 1 = 85. KVM is accepted only if, on every attempt, QEMU starts, QMP query-kvm reports
// enabled+present, and the boot sector runs within the deadline after `cont`.
import { spawn } from 'node:child_process';
import { constants } from 'node:fs';
import { mkdtemp, open, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
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
  /** What happened, e.g. "boot sector reached in 812 ms" or "qemu exited 134: failed to set MSR 0x10a". */
  detail: string;
}

export interface KvmProbeOptions {
  qemuBinary: string;
  cpuModel: string;
  /** Time allowed from `cont` to the boot sector's exit. */
  deadlineMs: number;
  signal?: AbortSignal;
}

export interface DetectAcceleratorOptions {
  mode: AcceleratorMode;
  /** Default /dev/kvm. */
  kvmDevice?: string;
  /** Default qemu-system-x86_64 (from PATH). */
  qemuBinary?: string;
  /** The -cpu guests will use under KVM. Default host. */
  cpuModel?: string;
  /** Per attempt, from `cont` to the boot sector. Default 2000 ms (TCG needs ~150 ms on the dev machines). */
  deadlineMs?: number;
  /** Attempts that must all succeed (catches flaky KVM). Default 2. */
  attempts?: number;
  signal?: AbortSignal;
  /** Injected for tests: open the device read-write (throws if impossible). */
  openDevice?: (path: string) => Promise<void>;
  /** Injected for tests: one boot probe. */
  probe?: (options: KvmProbeOptions) => Promise<KvmProbeResult>;
}

/** Thrown by detectAccelerator({mode: 'kvm'}) when KVM does not work. */
export class AcceleratorUnavailableError extends Error {
  override readonly name = 'AcceleratorUnavailableError';
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
  const attempts = options.attempts ?? 2;
  const probeOptions: KvmProbeOptions = {
    qemuBinary: options.qemuBinary ?? 'qemu-system-x86_64',
    cpuModel: options.cpuModel ?? 'host',
    deadlineMs: options.deadlineMs ?? 2000,
    ...(options.signal ? { signal: options.signal } : {}),
  };
  const probe = options.probe ?? probeKvmBoot;
  const details: string[] = [];
  for (let i = 1; i <= attempts; i++) {
    const r = await probe(probeOptions);
    if (!r.ok) return { ok: false, detail: `${device} opens, but boot probe ${i}/${attempts} failed: ${r.detail}` };
    details.push(r.detail);
  }
  return { ok: true, detail: `${device} usable; boot probe (-cpu ${probeOptions.cpuModel}): ${details.join(', ')}` };
}

async function openReadWrite(path: string): Promise<void> {
  const fh = await open(path, constants.O_RDWR);
  await fh.close();
}

/** A boot sector: cli; mov al,0x2a; out 0xf4,al; hlt; jmp $-1 … with the 0x55aa signature. */
export function probeBootSector(): Buffer {
  const sector = Buffer.alloc(512);
  Buffer.from([0xfa, 0xb0, 0x2a, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd]).copy(sector);
  sector[510] = 0x55;
  sector[511] = 0xaa;
  return sector;
}

/** QEMU's exit status after the boot sector writes 0x2a to isa-debug-exit. */
export const PROBE_EXIT_CODE = (0x2a << 1) | 1;

/** argv of the probe guest (exported for tests). */
export function probeArgs(dir: string, accelerator: Accelerator, cpuModel: string): string[] {
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
    '32M',
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-boot',
    'strict=on',
    '-S',
    '-chardev',
    `socket,id=qmp,path=${join(dir, 'qmp.sock').replaceAll(',', ',,')},server=on,wait=off`,
    '-mon',
    'chardev=qmp,mode=control',
    '-blockdev',
    `driver=file,node-name=probe-file,filename=${join(dir, 'boot.img').replaceAll(',', ',,')},read-only=on`,
    '-blockdev',
    'driver=raw,node-name=probe-fmt,file=probe-file,read-only=on',
    '-device',
    'virtio-blk-pci,drive=probe-fmt,bootindex=0',
    '-device',
    'isa-debug-exit,iobase=0xf4,iosize=0x04',
  ];
}

/**
 * Boot the probe guest once under KVM. Never throws: failures (QEMU missing, aborting, KVM not enabled, no
 * progress before the deadline) come back as {ok: false, detail}.
 */
export async function probeKvmBoot(options: KvmProbeOptions): Promise<KvmProbeResult> {
  const dir = await mkdtemp(join(tmpdir(), 'stratus-kvm-probe-'));
  let qmp: QmpClient | undefined;
  const child = spawn(options.qemuBinary, probeArgs(dir, 'kvm', options.cpuModel), {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (s: string) => {
    if (stderr.length < 8192) stderr += s;
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null; error?: Error }>((resolve) => {
    child.once('error', (error) => resolve({ code: null, signal: null, error }));
    child.once('exit', (code, signal) => resolve({ code, signal }));
  });
  const stderrSummary = () =>
    stderr
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l && !l.includes('terminating on signal'))
      .map((l) => l.replace(/^qemu-system-[\w-]+: /, ''))
      .slice(0, 2)
      .join('; ');
  const describeExit = (e: Awaited<typeof exited>) =>
    e.error
      ? `cannot run ${options.qemuBinary}: ${e.error.message}`
      : `qemu exited ${e.code ?? e.signal}${stderrSummary() ? `: ${stderrSummary()}` : ''}`;
  try {
    await writeFile(join(dir, 'boot.img'), probeBootSector());
    // SeaBIOS cannot read a one-sector disk (its CHS geometry rounds to 0 cylinders): make it 1 MiB (sparse).
    const fh = await open(join(dir, 'boot.img'), 'r+');
    await fh.truncate(1024 * 1024);
    await fh.close();

    const sock = join(dir, 'qmp.sock');
    const ready = await Promise.race([waitForSocket(sock, 10_000, options.signal), exited]);
    if (ready !== true) {
      return { ok: false, detail: ready === false ? 'no QMP socket within 10 s' : describeExit(ready) };
    }
    qmp = await QmpClient.connect(sock, { timeoutMs: 5000, ...(options.signal ? { signal: options.signal } : {}) });
    const kvm = await qmp.queryKvm();
    if (!kvm.enabled || !kvm.present) {
      return { ok: false, detail: `query-kvm: enabled=${kvm.enabled} present=${kvm.present}` };
    }
    const t0 = performance.now();
    await qmp.cont();
    const timedOut = Symbol('timeout');
    const timer = new AbortController();
    const onAbort = () => timer.abort(options.signal?.reason);
    options.signal?.addEventListener('abort', onAbort, { once: true });
    const outcome = await Promise.race([exited, sleep(options.deadlineMs, timedOut, { signal: timer.signal })]).finally(
      () => {
        options.signal?.removeEventListener('abort', onAbort);
        timer.abort();
      },
    );
    const ms = Math.round(performance.now() - t0);
    if (outcome === timedOut) {
      const status = await qmp.queryStatus().catch(() => undefined);
      return {
        ok: false,
        detail: `boot sector not reached within ${options.deadlineMs} ms under KVM${status ? ` (status ${status.status})` : ''}`,
      };
    }
    if (outcome.code === PROBE_EXIT_CODE) return { ok: true, detail: `boot sector reached in ${ms} ms` };
    return { ok: false, detail: describeExit(outcome) };
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
