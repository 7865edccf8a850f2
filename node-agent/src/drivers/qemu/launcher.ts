// How a guest's QEMU process is started so that it outlives the agent (docs/design/qemu-driver.md):
//
//  - direct:  spawned detached (own session and process group, stdio to a file, unref'd): killing the agent, even
//             with SIGKILL or by process group, leaves QEMU running; it is re-parented to init (or the nearest
//             subreaper). It stays in the agent's cgroup, so a service manager that kills the agent's whole cgroup
//             (systemd's default KillMode=control-group, a container runtime stopping the pod) kills the guests
//             too: for local runs and tests.
//  - systemd: a transient systemd service per guest (`systemd-run --unit=stratus-guest-<uid>`), run in the host's
//             namespaces (nsenter into a host process' mount/UTS/IPC/PID namespaces when the agent is in a container
//             with hostPID; hostns.ts finds that process). QEMU then lives in its own cgroup under machine.slice,
//             independent of the agent's pod.
//  - host:    (launcher-host.ts) for a container on a host without systemd: QEMU from a runtime bundle copied to
//             the host, in the host's mount namespace, in a cgroupfs cgroup of its own per guest
//             (stratus-guests/<uid>). docs/design/guest-placement.md.
//
// Both can start QEMU inside a named network namespace (LaunchRequest.netns; the simulated nodes of the e2e tier, one
// netns per node): direct runs `ip netns exec <ns> <qemu> …`, which execs QEMU in place (same pid, QEMU's own command
// line in /proc, so pid-file adoption works unchanged); systemd sets the unit's NetworkNamespacePath.
//
// Neither uses QEMU's -daemonize (incompatible with the full seccomp sandbox; see ../../qemu/README.md). QEMU writes
// its pid file itself (-pidfile) in both cases; the driver finds and adopts guests through it.
import { execFile, spawn } from 'node:child_process';
import { open } from 'node:fs/promises';
import { promisify } from 'node:util';
import { bundleArgv } from './bundle.ts';
import { memoryLimitBytes } from './cgroups.ts';

const execFileP = promisify(execFile);

export type LauncherName = 'direct' | 'systemd' | 'host';

export interface LaunchRequest {
  /** Guest uid. */
  id: string;
  name: string;
  namespace: string;
  /** The QEMU binary and its arguments. */
  binary: string;
  args: readonly string[];
  /** Guest directory (working directory of QEMU). */
  dir: string;
  /** QEMU's stdout and stderr are appended here. */
  logFile: string;
  /** Network namespace (a name under /run/netns) QEMU runs in; undefined: the launcher's own. */
  netns?: string;
  /** Guest RAM (the host launcher's cgroup memory limit adds QEMU's overhead to it). */
  memoryMiB?: number;
  /** kvm or tcg (TCG's translation cache counts in the overhead). */
  accelerator?: string;
}

/** Network namespace names as `ip netns` accepts them (a file name under /run/netns). */
const NETNS_NAME = /^[A-Za-z0-9_.-]{1,64}$/;

/** Throws unless `netns` is a plain namespace name (no path, nothing a command line could misread). */
export function checkNetnsName(netns: string): string {
  if (!NETNS_NAME.test(netns) || netns === '.' || netns === '..') {
    throw new Error(`invalid network namespace name ${JSON.stringify(netns)}`);
  }
  return netns;
}

/** argv of the direct launcher: the binary and its arguments, through `ip netns exec` when a netns is asked for. */
export function directArgv(req: Pick<LaunchRequest, 'binary' | 'args' | 'netns'>): string[] {
  if (req.netns === undefined) return [req.binary, ...req.args];
  return ['ip', 'netns', 'exec', checkNetnsName(req.netns), req.binary, ...req.args];
}

export interface Launched {
  /** Known at once for direct children; the driver reads the pid file otherwise. */
  pid?: number;
  /** Direct children only: resolves when the process exits (used to fail a start-up fast). */
  exited?: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Other launchers: says why the process has ended (undefined while it may still run). Polled during start-up. */
  ended?: () => Promise<string | undefined>;
}

export interface Launcher {
  readonly name: LauncherName;
  /** Once, before the driver adopts or launches anything. */
  init?(): Promise<void>;
  launch(req: LaunchRequest): Promise<Launched>;
  /** After the guest's QEMU has ended for good (destroy): frees what the launcher made for it. */
  release?(id: string): Promise<void>;
}

/** Spawns QEMU detached from the agent. */
export class DirectLauncher implements Launcher {
  readonly name = 'direct';

  async launch(req: LaunchRequest): Promise<Launched> {
    return spawnDetached(directArgv(req), { cwd: req.dir, logFile: req.logFile });
  }
}

/**
 * Spawns `argv` detached from the agent (own session and process group, stdio appended to `logFile`, unref'd): it
 * outlives the agent. Resolves once the process has started, with its pid and a promise of its exit.
 */
export async function spawnDetached(
  argv: readonly string[],
  o: { cwd: string; logFile: string; env?: NodeJS.ProcessEnv },
): Promise<Launched> {
  const out = await open(o.logFile, 'a', 0o600);
  try {
    const [bin, ...args] = argv;
    const child = spawn(bin!, args, {
      cwd: o.cwd,
      detached: true,
      stdio: ['ignore', out.fd, out.fd],
      ...(o.env ? { env: o.env } : {}),
    });
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
      child.once('exit', (code, signal) => resolve({ code, signal }));
      child.once('error', () => resolve({ code: null, signal: null }));
    });
    await new Promise<void>((resolve, reject) => {
      child.once('spawn', () => resolve());
      child.once('error', (err) => reject(new Error(`cannot start ${bin}: ${err.message}`, { cause: err })));
    });
    // The handle stays (node reaps the child when it exits, so no zombie lingers), but keeps nothing alive.
    child.unref();
    return { ...(child.pid !== undefined ? { pid: child.pid } : {}), exited };
  } finally {
    await out.close();
  }
}

export interface SystemdLauncherOptions {
  /** Run systemd-run/systemctl through `nsenter -t <hostPid> -m -u -i -p --` (agent in a container with hostPID). */
  nsenter: boolean;
  /** The host process whose namespaces nsenter enters (default 1; hostns.ts findHostNs). */
  hostPid?: number;
  /** Run QEMU from this runtime bundle (bundle.ts) instead of req.binary: an agent in a container. */
  bundle?: { dir: string };
  /** Slice of the guest units (default machine.slice, as libvirt and systemd-machined use). */
  slice?: string;
  /** Seconds systemd waits after SIGTERM to QEMU before SIGKILL when the unit is stopped (default 30). */
  stopTimeoutSeconds?: number;
  /** Runs a command and resolves with its stdout; injected in tests. */
  run?: (argv: readonly string[]) => Promise<string>;
}

/** Transient unit name of a guest. */
export function unitName(id: string): string {
  return `stratus-guest-${id}.service`;
}

function nsenterArgv(hostPid = 1): string[] {
  if (!Number.isInteger(hostPid) || hostPid < 1) throw new Error(`invalid host pid ${hostPid}`);
  return ['nsenter', '-t', String(hostPid), '-m', '-u', '-i', '-p', '--'];
}

/** systemd quotes: a property value must not contain newlines; paths with spaces are fine in append:. */
function checkProperty(v: string): string {
  if (/[\n\r\0]/.test(v)) throw new Error(`invalid systemd property value ${JSON.stringify(v)}`);
  return v;
}

/** The argv that starts a guest as a transient systemd service. */
export function systemdRunArgv(req: LaunchRequest, o: Omit<SystemdLauncherOptions, 'run'>): string[] {
  const argv: string[] = o.nsenter ? nsenterArgv(o.hostPid) : [];
  argv.push(
    'systemd-run',
    `--unit=${unitName(req.id)}`,
    `--description=${checkProperty(`Stratus guest ${req.namespace}/${req.name} (${req.id})`)}`,
    `--slice=${o.slice ?? 'machine.slice'}`,
    '--collect',
    '--quiet',
    '--property=Type=exec',
    // SIGTERM to QEMU only (a clean "terminating on signal"), SIGKILL to whatever is left after the timeout.
    '--property=KillMode=mixed',
    `--property=TimeoutStopSec=${o.stopTimeoutSeconds ?? 30}`,
    `--property=WorkingDirectory=${checkProperty(req.dir)}`,
    `--property=StandardOutput=append:${checkProperty(req.logFile)}`,
    `--property=StandardError=append:${checkProperty(req.logFile)}`,
    ...(req.netns === undefined ? [] : [`--property=NetworkNamespacePath=/run/netns/${checkNetnsName(req.netns)}`]),
    // The same limit the host launcher sets (guest-placement.md); systemd maps it to memory.limit_in_bytes on v1.
    ...(req.memoryMiB === undefined
      ? []
      : [`--property=MemoryMax=${memoryLimitBytes(req.memoryMiB, req.accelerator)}`]),
  );
  if (o.bundle) {
    const b = bundleArgv(o.bundle, req.args);
    for (const [k, v] of Object.entries(b.env)) argv.push(`--setenv=${k}=${checkProperty(v)}`);
    argv.push('--', ...b.argv);
  } else argv.push('--', req.binary, ...req.args);
  return argv;
}

/** argv that clears a failed unit of the same name left from an earlier run (errors are ignored). */
export function resetFailedArgv(id: string, nsenter: boolean, hostPid?: number): string[] {
  return [...(nsenter ? nsenterArgv(hostPid) : []), 'systemctl', 'reset-failed', unitName(id)];
}

async function runCommand(argv: readonly string[]): Promise<string> {
  const [bin, ...args] = argv;
  try {
    const { stdout } = await execFileP(bin!, args, { timeout: 30_000, maxBuffer: 1024 * 1024 });
    return stdout;
  } catch (err) {
    const e = err as Error & { stderr?: string };
    const detail = e.stderr?.trim() || e.message;
    throw new Error(`${argv.slice(0, 2).join(' ')}…: ${detail}`, { cause: err });
  }
}

/** Starts QEMU as a transient systemd service on the host. */
export class SystemdLauncher implements Launcher {
  readonly name = 'systemd';
  readonly #o: SystemdLauncherOptions;

  constructor(o: SystemdLauncherOptions) {
    this.#o = o;
  }

  async launch(req: LaunchRequest): Promise<Launched> {
    const run = this.#o.run ?? runCommand;
    await run(resetFailedArgv(req.id, this.#o.nsenter, this.#o.hostPid)).catch(() => '');
    await run(systemdRunArgv(req, this.#o));
    const show = [
      ...(this.#o.nsenter ? nsenterArgv(this.#o.hostPid) : []),
      'systemctl',
      'show',
      '--property=ActiveState,Result,ExecMainStatus',
      unitName(req.id),
    ];
    return { ended: async () => unitEnded(await run(show).catch(() => '')) };
  }
}

/** From `systemctl show --property=ActiveState,Result,ExecMainStatus`: why the unit's process ended, if it did. */
export function unitEnded(show: string): string | undefined {
  const props = Object.fromEntries(
    show
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l.includes('='))
      .map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]),
  );
  const state = props.ActiveState;
  if (state !== 'inactive' && state !== 'failed') return undefined;
  return `unit ${state} (result ${props.Result ?? '?'}, exit status ${props.ExecMainStatus ?? '?'})`;
}
