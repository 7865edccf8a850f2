// Is a guest's QEMU running? The pid file says which process it was; /proc says whether that process is still a
// QEMU of this guest. A pid can be reused by an unrelated process after QEMU died (and a zombie has an empty
// cmdline), so a pid counts only while its command line carries the guest's uuid (`-uuid <uid>`).
import { readFile, stat } from 'node:fs/promises';

/** How the driver looks at processes; injected in tests. */
export interface ProcReader {
  /** Content of the pid file, or undefined when there is none. */
  readPidFile(path: string): Promise<string | undefined>;
  /** argv of a live process (from /proc/<pid>/cmdline), or undefined when there is no such process. */
  cmdline(pid: number): Promise<string[] | undefined>;
}

export const procReader: ProcReader = {
  async readPidFile(path) {
    try {
      return await readFile(path, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
  },
  async cmdline(pid) {
    try {
      const raw = await readFile(`/proc/${pid}/cmdline`, 'utf8');
      return raw.split('\0').filter((s, i, all) => s !== '' || i < all.length - 1);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ESRCH') return undefined;
      throw err;
    }
  },
};

export type GuestProcess =
  | { kind: 'running'; pid: number }
  /** No QEMU runs for this guest: why (for logs). */
  | { kind: 'stopped'; why: 'no-pidfile' | 'bad-pidfile' | 'dead' | 'other-process'; pid?: number };

export function parsePid(text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  const t = text.trim();
  if (!/^[1-9][0-9]{0,9}$/.test(t)) return undefined;
  const pid = Number(t);
  return pid <= 4_194_304 ? pid : undefined;
}

/** Whether argv is a QEMU of guest `uuid` (its `-uuid` value; any argument equal to the uuid as a fallback). */
export function isGuestCmdline(argv: readonly string[], uuid: string): boolean {
  if (argv.length === 0) return false; // zombie or kernel thread
  const u = uuid.toLowerCase();
  const i = argv.indexOf('-uuid');
  if (i >= 0) return argv[i + 1]?.toLowerCase() === u;
  return argv.some((a) => a.toLowerCase() === u);
}

/** The adoption decision: is the process named by the pid file a live QEMU of this guest? */
export async function guestProcess(reader: ProcReader, pidFile: string, uuid: string): Promise<GuestProcess> {
  const text = await reader.readPidFile(pidFile);
  if (text === undefined) return { kind: 'stopped', why: 'no-pidfile' };
  const pid = parsePid(text);
  if (pid === undefined) return { kind: 'stopped', why: 'bad-pidfile' };
  return processOf(reader, pid, uuid);
}

/** Same decision for a known pid. */
export async function processOf(reader: ProcReader, pid: number, uuid: string): Promise<GuestProcess> {
  const argv = await reader.cmdline(pid);
  if (argv === undefined) return { kind: 'stopped', why: 'dead', pid };
  if (argv.length === 0) return { kind: 'stopped', why: 'dead', pid }; // a zombie: exited, not reaped yet
  if (!isGuestCmdline(argv, uuid)) return { kind: 'stopped', why: 'other-process', pid };
  return { kind: 'running', pid };
}

/** When the pid file was written (≈ when QEMU started), RFC 3339. */
export async function startedAtOf(pidFile: string): Promise<string | undefined> {
  try {
    return (await stat(pidFile)).mtime.toISOString();
  } catch {
    return undefined;
  }
}
