// Where the host is, seen from the agent (docs/design/guest-placement.md): a process of the host's mount namespace
// whose namespaces nsenter can enter. PID 1 when its namespace links can be read; on hosts that refuse that (these
// Firecracker VMs: `nsenter -t 1` gets "Permission denied" on /proc/1/ns/*, ../shared/reference/kubelet.md §5), the
// nearest ancestor of the agent in another mount namespace: the container runtime's shim, which runs on the host.
import { readFile, readlink, stat } from 'node:fs/promises';

/** How the discovery looks at /proc; injected in tests. */
export interface ProcNs {
  /** The target of /proc/<pid>/ns/mnt (`mnt:[4026531840]`), or undefined when it cannot be read. */
  mountNs(pid: number | 'self'): Promise<string | undefined>;
  /** The parent pid of a process, or undefined. */
  ppid(pid: number | 'self'): Promise<number | undefined>;
}

/** The parent pid in a /proc/<pid>/stat line (the command name may hold spaces and parentheses). */
export function parseStatPpid(stat: string): number | undefined {
  const end = stat.lastIndexOf(')');
  if (end < 0) return undefined;
  const fields = stat.slice(end + 2).split(' ');
  const ppid = Number(fields[1]);
  return Number.isInteger(ppid) && ppid >= 0 ? ppid : undefined;
}

export const procNs: ProcNs = {
  async mountNs(pid) {
    return readlink(`/proc/${pid}/ns/mnt`).catch(() => undefined);
  },
  async ppid(pid) {
    return parseStatPpid(await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => ''));
  },
};

export interface HostNs {
  /** A host process to nsenter into; undefined when the agent already is in the host's mount namespace. */
  pid?: number;
  /** Whether the agent runs in another mount namespace than the host (a container). */
  inContainer: boolean;
}

/**
 * Finds the host: `override` (--host-mount-ns-pid) when given; else PID 1 when its mount namespace can be read;
 * else the first ancestor in another mount namespace than the agent's. Not in a container when that process shares
 * the agent's mount namespace, or when none differs (no hostPID: the agent cannot reach the host anyway).
 */
export async function findHostNs(proc: ProcNs = procNs, override?: number): Promise<HostNs> {
  const self = await proc.mountNs('self');
  if (self === undefined) return { inContainer: false };
  const judge = async (pid: number): Promise<HostNs | undefined> => {
    const ns = await proc.mountNs(pid);
    if (ns === undefined) return undefined;
    return ns === self ? { inContainer: false } : { pid, inContainer: true };
  };
  if (override !== undefined) {
    const r = await judge(override);
    if (!r) throw new Error(`cannot read the mount namespace of --host-mount-ns-pid ${override}`);
    return r;
  }
  const init = await judge(1);
  if (init) return init;
  const seen = new Set<number>();
  let pid = await proc.ppid('self');
  while (pid !== undefined && pid > 1 && !seen.has(pid)) {
    seen.add(pid);
    const ns = await proc.mountNs(pid);
    if (ns !== undefined && ns !== self) return { pid, inContainer: true };
    pid = await proc.ppid(pid);
  }
  return { inContainer: false };
}

/** The root of the host's file system as the agent sees it ('' when the agent is on the host's). */
export function hostRootOf(h: HostNs): string {
  return h.inContainer && h.pid !== undefined ? `/proc/${h.pid}/root` : '';
}

/** Whether the host runs systemd as its init (/run/systemd/system exists in the host's view). */
export async function hostRunsSystemd(h: HostNs): Promise<boolean> {
  return (await stat(`${hostRootOf(h)}/run/systemd/system`).catch(() => undefined))?.isDirectory() ?? false;
}

export type LauncherChoice = 'direct' | 'systemd' | 'host';

/** --launcher=auto: systemd on a systemd host, host from a container, direct otherwise. */
export function chooseLauncher(o: {
  requested: LauncherChoice | 'auto';
  hostSystemd: boolean;
  inContainer: boolean;
}): LauncherChoice {
  if (o.requested !== 'auto') return o.requested;
  if (o.hostSystemd) return 'systemd';
  return o.inContainer ? 'host' : 'direct';
}

/** nsenter's options that enter the host's mount, UTS, IPC and cgroup namespaces of process `pid`. */
export function nsenterHost(pid: number): string[] {
  if (!Number.isInteger(pid) || pid < 1) throw new Error(`invalid host pid ${pid}`);
  return ['-t', String(pid), '-m', '-u', '-i', '-C'];
}
