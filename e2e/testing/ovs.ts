// Open vSwitch daemons for the e2e tier: one ovsdb-server + ovs-vswitchd per simulated node, running inside the
// node's network namespace with their own run/log/db directory (shared/reference/networking.md §2.11), so several
// nodes each have a private OVS without touching the host's. Bridges use datapath_type=netdev (no kernel module).
// stopOvs() kills exactly the daemons whose pid files are in the node's directory (after checking the pid still
// belongs to that daemon) and removes the directory.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

const SCHEMA = '/usr/share/openvswitch/vswitch.ovsschema';
const TOOLS = ['ovsdb-tool', 'ovsdb-server', 'ovs-vswitchd', 'ovs-vsctl', 'ovs-appctl', 'ethtool'];

export interface OvsDaemons {
  netns: string;
  dir: string;
  /** ovs-vsctl --db target. */
  db: string;
  /** Control socket of ovs-vswitchd (ovs-appctl -t). */
  vswitchdCtl: string;
  /** Runs ovs-appctl against this node's ovs-vswitchd; returns stdout. */
  appctl(args: readonly string[]): string;
}

function which(cmd: string): boolean {
  try {
    execFileSync('sh', ['-c', 'command -v "$1"', 'sh', cmd], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** Why OVS e2e tests cannot run here (undefined: they can). */
export function missingOvsPrerequisite(): string | undefined {
  if (process.getuid?.() !== 0) return 'not root';
  const missing = TOOLS.filter((t) => !which(t));
  if (missing.length) return `missing ${missing.join(', ')}`;
  if (!existsSync(SCHEMA)) return `missing ${SCHEMA}`;
  return undefined;
}

/** Starts ovsdb-server and ovs-vswitchd in `netns` with state in `dir` (created; a previous one is removed). */
export function startOvs(netns: string, dir: string): OvsDaemons {
  stopOvs(dir);
  mkdirSync(dir, { recursive: true });
  const env = { ...process.env, OVS_RUNDIR: dir, OVS_LOGDIR: dir, OVS_DBDIR: dir };
  const inNs = (cmd: string, args: readonly string[]) =>
    execFileSync('ip', ['netns', 'exec', netns, cmd, ...args], {
      env,
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'pipe'],
    });
  const sock = path.join(dir, 'db.sock');
  execFileSync('ovsdb-tool', ['create', path.join(dir, 'conf.db'), SCHEMA], { stdio: 'pipe' });
  inNs('ovsdb-server', [
    path.join(dir, 'conf.db'),
    `--remote=punix:${sock}`,
    `--pidfile=${path.join(dir, 'ovsdb-server.pid')}`,
    `--unixctl=${path.join(dir, 'ovsdb-server.ctl')}`,
    `--log-file=${path.join(dir, 'ovsdb-server.log')}`,
    '-vconsole:off',
    '--detach',
  ]);
  inNs('ovs-vsctl', [`--db=unix:${sock}`, '--no-wait', 'init']);
  const ctl = path.join(dir, 'ovs-vswitchd.ctl');
  inNs('ovs-vswitchd', [
    `unix:${sock}`,
    `--pidfile=${path.join(dir, 'ovs-vswitchd.pid')}`,
    `--unixctl=${ctl}`,
    `--log-file=${path.join(dir, 'ovs-vswitchd.log')}`,
    '-vconsole:off',
    '--detach',
  ]);
  return {
    netns,
    dir,
    db: `unix:${sock}`,
    vswitchdCtl: ctl,
    appctl: (args) => inNs('ovs-appctl', ['-t', ctl, ...args]),
  };
}

/** Kills the daemons of `dir` (SIGTERM, then SIGKILL) and removes the directory. */
export function stopOvs(dir: string): void {
  for (const d of ['ovs-vswitchd', 'ovsdb-server']) {
    const pidFile = path.join(dir, `${d}.pid`);
    if (!existsSync(pidFile)) continue;
    const pid = Number(readFileSync(pidFile, 'utf8').trim());
    if (!Number.isInteger(pid) || pid <= 1) continue;
    // The pid file may be stale: only kill the process if it is that daemon with that pid file.
    const cmdline = (() => {
      try {
        return readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      } catch {
        return '';
      }
    })();
    if (!cmdline.includes(d) || !cmdline.includes(pidFile)) continue;
    try {
      process.kill(pid, 'SIGTERM');
    } catch {
      continue;
    }
    const end = Date.now() + 5000;
    while (Date.now() < end && existsSync(`/proc/${pid}`))
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 50);
    if (existsSync(`/proc/${pid}`)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // exited meanwhile
      }
    }
  }
  rmSync(dir, { recursive: true, force: true });
}

/** Waits until ovs-vswitchd reports the interface with an OpenFlow port (ovs-vsctl get Interface ofport > 0). */
export async function waitOfport(o: OvsDaemons, iface: string, timeoutMs = 10_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    try {
      const out = execFileSync(
        'ip',
        ['netns', 'exec', o.netns, 'ovs-vsctl', `--db=${o.db}`, 'get', 'Interface', iface, 'ofport'],
        {
          encoding: 'utf8',
          stdio: ['ignore', 'pipe', 'ignore'],
        },
      );
      if (Number(out.trim()) > 0) return;
    } catch {
      // not yet
    }
    if (Date.now() > end) throw new Error(`ovs port ${iface} not attached after ${timeoutMs} ms`);
    await sleep(100);
  }
}
