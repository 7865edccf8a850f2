// The host launcher (docs/design/guest-placement.md): QEMU placed on the host, for an agent running in a container
// on a host without systemd. So that a guest outlives its agent pod (kubectl delete pod, a DaemonSet roll):
//  - QEMU runs in the host's mount namespace (nsenter into a host process' mount/UTS/IPC/cgroup namespaces), from
//    the QEMU runtime bundle the agent copied to the host (bundle.ts): nothing it uses lives in the container's root
//    file system, which the runtime removes with the pod;
//  - QEMU runs in a host cgroup of its own, <hierarchy>/stratus-guests/<uid> in every hierarchy (cgroups.ts), so
//    the runtime killing the pod's cgroups does not reach it; the guest's memory limit is set there. A constant
//    shell wrapper writes its own pid to the cgroup.procs files and then execs the loader: QEMU is in its cgroup
//    before it allocates guest memory, and keeps the pid nsenter was started with (nsenter, sh and the loader exec
//    in place), so the driver's pid-file adoption works as with the direct launcher.
// Spawned detached, stdio to the guest's qemu.log, like the direct launcher.
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { type Bundle, bundleArgv, collectBundles, ensureBundle, RUNTIME_DIR } from './bundle.ts';
import {
  type CgroupMount,
  type CgroupView,
  cgroupMounts,
  createGuestCgroups,
  guestCgroups,
  memoryLimitBytes,
  pruneGuestCgroups,
  removeGuestCgroups,
} from './cgroups.ts';
import { type HostNs, hostRootOf, nsenterHost } from './hostns.ts';
import { checkNetnsName, type Launched, type Launcher, type LaunchRequest, spawnDetached } from './launcher.ts';

/**
 * Enters the directory given first (in the host's mount namespace), writes its pid into each file before `--`, then
 * execs the rest. Constant: the directory, the files and the command come as positional arguments, nothing is
 * interpolated into the script.
 */
export const CGROUP_WRAPPER =
  'cd "$1" || exit 125; shift; while [ "$#" -gt 0 ] && [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"';

/** The host's shell (in the host's mount namespace). */
const HOST_SH = '/bin/sh';

export interface HostArgvInput {
  /** nsenter target; undefined: no mount namespace change. */
  hostPid?: number;
  netns?: string;
  dir: string;
  /** cgroup.procs files, host view. */
  procsFiles: readonly string[];
  /** The QEMU command (bundle loader argv or binary + args). */
  command: readonly string[];
}

/** The full argv of a host launch: [nsenter …] /bin/sh -c WRAPPER sh <dir> <procs…> -- <command…>. */
export function hostArgv(i: HostArgvInput): string[] {
  const wrapper = [HOST_SH, '-c', CGROUP_WRAPPER, 'sh', i.dir, ...i.procsFiles, '--', ...i.command];
  const ns: string[] = [];
  if (i.hostPid !== undefined) ns.push(...nsenterHost(i.hostPid));
  if (i.netns !== undefined) ns.push(`--net=/run/netns/${checkNetnsName(i.netns)}`);
  if (ns.length === 0) return wrapper;
  return ['nsenter', ...ns, '--', ...wrapper];
}

export interface HostLauncherOptions {
  host: HostNs;
  /** The agent's state directory: the bundle goes to <stateDir>/runtime/<hash>/ (a host path, the same in both views). */
  stateDir: string;
  /** The QEMU the bundle is made of (the agent's own). */
  qemuBinary: string;
  /** Where the agent sees the host's /sys/fs/cgroup (--host-cgroup-root); default: through /proc/<host pid>/root. */
  hostCgroupRoot?: string;
  /** Run QEMU from a bundle (default: when the agent is in a container). */
  bundle?: boolean;
  logger?: Logger;
  /** The host's /proc/<pid>/mountinfo; injected in tests. */
  mountinfo?: () => Promise<string>;
}

export class HostLauncher implements Launcher {
  readonly name = 'host';
  readonly #o: HostLauncherOptions;
  #mounts: CgroupMount[] | undefined;
  #bundle: Bundle | undefined;

  constructor(o: HostLauncherOptions) {
    this.#o = o;
  }

  get view(): CgroupView {
    if (this.#o.hostCgroupRoot !== undefined) return { hostCgroupRoot: this.#o.hostCgroupRoot };
    const root = hostRootOf(this.#o.host);
    return root ? { hostRoot: root } : {};
  }

  get runtimeDir(): string {
    return join(this.#o.stateDir, RUNTIME_DIR);
  }

  get bundle(): Bundle | undefined {
    return this.#bundle;
  }

  /** The host's cgroup hierarchies. */
  async mounts(): Promise<CgroupMount[]> {
    if (!this.#mounts) {
      const pid = this.#o.host.inContainer && this.#o.host.pid !== undefined ? this.#o.host.pid : 'self';
      const text = await (this.#o.mountinfo ?? (() => readFile(`/proc/${pid}/mountinfo`, 'utf8')))();
      this.#mounts = cgroupMounts(text);
      if (this.#mounts.length === 0) throw new Error('the host has no cgroup hierarchy mounted');
    }
    return this.#mounts;
  }

  /** Makes the bundle, removes unused older ones and the empty cgroups of guests that no longer run. */
  async init(): Promise<void> {
    const mounts = await this.mounts();
    if (this.#o.bundle ?? this.#o.host.inContainer) {
      this.#bundle = await ensureBundle({ qemuBinary: this.#o.qemuBinary, runtimeDir: this.runtimeDir });
      const removed = await collectBundles({ runtimeDir: this.runtimeDir, keep: this.#bundle.hash });
      if (removed.length > 0) this.#o.logger?.info({ removed }, 'removed unused QEMU runtime bundles');
    }
    const pruned = await pruneGuestCgroups(mounts, this.view);
    if (pruned.length > 0) this.#o.logger?.info({ pruned }, 'removed empty guest cgroups');
    this.#o.logger?.info(
      {
        hostPid: this.#o.host.pid,
        inContainer: this.#o.host.inContainer,
        bundle: this.#bundle?.dir,
        cgroups: mounts.map((m) => m.mountPoint),
      },
      'host launcher ready',
    );
  }

  async launch(req: LaunchRequest): Promise<Launched> {
    const cgs = guestCgroups(await this.mounts(), this.view, req.id);
    await createGuestCgroups(
      cgs,
      req.memoryMiB !== undefined ? memoryLimitBytes(req.memoryMiB, req.accelerator) : undefined,
    );
    const q = this.#bundle ? bundleArgv(this.#bundle, req.args) : { argv: [req.binary, ...req.args], env: {} };
    const argv = hostArgv({
      ...(this.#o.host.inContainer && this.#o.host.pid !== undefined ? { hostPid: this.#o.host.pid } : {}),
      ...(req.netns !== undefined ? { netns: req.netns } : {}),
      dir: req.dir,
      procsFiles: cgs.map((c) => `${c.hostDir}/cgroup.procs`),
      command: q.argv,
    });
    return spawnDetached(argv, { cwd: req.dir, logFile: req.logFile, env: { ...process.env, ...q.env } });
  }

  /** Removes the guest's cgroups (its QEMU has ended). */
  async release(id: string): Promise<void> {
    await removeGuestCgroups(guestCgroups(await this.mounts(), this.view, id));
  }
}
