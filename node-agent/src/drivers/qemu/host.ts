// Host facts for HostInfo: memory (/proc/meminfo), CPU (/proc/cpuinfo), local disk (statfs of the state
// directory), QEMU's version. Parsers are pure and exported for tests.
import { execFile } from 'node:child_process';
import { readFile, statfs } from 'node:fs/promises';
import { machine } from 'node:os';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);

/** MemTotal in bytes from /proc/meminfo text. */
export function memTotalBytes(meminfo: string): number | undefined {
  const m = /^MemTotal:\s+(\d+)\s*kB$/m.exec(meminfo);
  return m ? Number(m[1]) * 1024 : undefined;
}

/** CPU model and vendor of the first processor in /proc/cpuinfo (vendor as libvirt names it: Intel, AMD). */
export function cpuOf(cpuinfo: string): { model?: string; vendor?: string } {
  const field = (name: string) => new RegExp(`^${name}\\s*:\\s*(.+)$`, 'm').exec(cpuinfo)?.[1]?.trim();
  const vendorId = field('vendor_id') ?? field('CPU implementer');
  const vendor =
    vendorId === 'GenuineIntel'
      ? 'Intel'
      : vendorId === 'AuthenticAMD'
        ? 'AMD'
        : vendorId === 'HygonGenuine'
          ? 'Hygon'
          : vendorId;
  const model = field('model name') ?? field('cpu model');
  return { ...(model ? { model } : {}), ...(vendor ? { vendor } : {}) };
}

/** "QEMU emulator version 7.2.22 (Debian …)" → "7.2.22". */
export function qemuVersionOf(text: string): string | undefined {
  return /QEMU emulator version (\d+\.\d+(?:\.\d+)?)/.exec(text)?.[1];
}

export async function qemuVersion(binary: string): Promise<string> {
  const { stdout } = await execFileP(binary, ['--version'], { timeout: 30_000 });
  const v = qemuVersionOf(stdout);
  if (!v) throw new Error(`${binary} --version: unexpected output ${JSON.stringify(stdout.slice(0, 200))}`);
  return v;
}

export interface HostFacts {
  ramBytes: number;
  diskBytes: number;
  architecture: string;
  model?: string;
  vendor?: string;
}

export async function hostFacts(stateDir: string): Promise<HostFacts> {
  const [meminfo, cpuinfo, fs] = await Promise.all([
    readFile('/proc/meminfo', 'utf8'),
    readFile('/proc/cpuinfo', 'utf8').catch(() => ''),
    statfs(stateDir),
  ]);
  const ramBytes = memTotalBytes(meminfo);
  if (ramBytes === undefined) throw new Error('/proc/meminfo has no MemTotal');
  return { ramBytes, diskBytes: fs.blocks * fs.bsize, architecture: machine(), ...cpuOf(cpuinfo) };
}

/** Bytes as a Kubernetes quantity in whole MiB (rounded down). */
export function mebibytes(bytes: number): string {
  return `${Math.floor(bytes / 1024 ** 2)}Mi`;
}
