// A host cgroup per guest, without systemd (docs/design/guest-placement.md): <hierarchy>/stratus-guests/<uid> in every
// mounted cgroup v1 hierarchy and in the unified (v2) one, so QEMU leaves the agent pod's cgroups and a container
// runtime tearing the pod down does not kill it. Paths exist in two views: the host's (what the launcher's wrapper
// writes its pid to, from the host mount namespace) and the agent's (where the agent makes the directories and
// writes the limits: the host's cgroup mounts as the agent sees them, --host-cgroup-root).
import { mkdir, readdir, readFile, rmdir, stat, writeFile } from 'node:fs/promises';
import { join, posix } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

export const GUESTS_CGROUP = 'stratus-guests';
const MiB = 1024 ** 2;

/** One cgroup hierarchy as the host mounts it. */
export interface CgroupMount {
  /** Mount point in the host's mount namespace. */
  mountPoint: string;
  version: 1 | 2;
  /** v1 controllers (and name=… for named hierarchies); empty for v2. */
  controllers: string[];
}

function unescapeMountinfo(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(Number.parseInt(o, 8)));
}

/**
 * The cgroup hierarchies of a /proc/<pid>/mountinfo, one mount per hierarchy (the same hierarchy mounted twice shares
 * its device number) and only mounts of a hierarchy's root (a container's bind of its own sub-cgroup is not a place
 * to make host cgroups in).
 */
export function cgroupMounts(mountinfo: string): CgroupMount[] {
  const seen = new Set<string>();
  const out: CgroupMount[] = [];
  for (const line of mountinfo.split('\n')) {
    const sepAt = line.indexOf(' - ');
    if (sepAt < 0) continue;
    const left = line.slice(0, sepAt).split(' ');
    const right = line.slice(sepAt + 3).split(' ');
    const [fstype, , superOpts = ''] = right;
    if (fstype !== 'cgroup' && fstype !== 'cgroup2') continue;
    const dev = left[2]!;
    const root = unescapeMountinfo(left[3] ?? '');
    const mountPoint = unescapeMountinfo(left[4] ?? '');
    if (root !== '/' || seen.has(dev)) continue;
    seen.add(dev);
    const controllers =
      fstype === 'cgroup'
        ? superOpts
            .split(',')
            .filter(
              (o) =>
                ![
                  'rw',
                  'ro',
                  'relatime',
                  'noatime',
                  'nosuid',
                  'nodev',
                  'noexec',
                  'xattr',
                  'clone_children',
                  'noprefix',
                  'cpuset_v2_mode',
                ].includes(o) && !o.startsWith('release_agent='),
            )
        : [];
    out.push({ mountPoint, version: fstype === 'cgroup2' ? 2 : 1, controllers });
  }
  return out;
}

/** The guest's cgroup in one hierarchy, in both views. */
export interface GuestCgroup {
  mount: CgroupMount;
  /** Directory as the host sees it (the wrapper writes <hostDir>/cgroup.procs). */
  hostDir: string;
  /** Directory as the agent sees it. */
  agentDir: string;
}

/**
 * Maps a host path to the agent's view: `hostCgroupRoot` is where the agent sees the host's /sys/fs/cgroup (the
 * chart mounts it); a `hostRoot` (/proc/<host pid>/root) reaches any host path; neither: the paths are the same.
 */
export interface CgroupView {
  hostCgroupRoot?: string;
  hostRoot?: string;
}

export function agentPath(view: CgroupView, hostPath: string): string | undefined {
  if (view.hostCgroupRoot !== undefined) {
    const rel = posix.relative('/sys/fs/cgroup', hostPath);
    if (rel.startsWith('..') || posix.isAbsolute(rel)) return undefined;
    return posix.join(view.hostCgroupRoot, rel);
  }
  if (view.hostRoot !== undefined) return posix.join(view.hostRoot, hostPath);
  return hostPath;
}

/** The guest's cgroup directories: <mount>/stratus-guests/<id> in every hierarchy the agent can reach. */
export function guestCgroups(mounts: readonly CgroupMount[], view: CgroupView, id: string): GuestCgroup[] {
  if (!/^[0-9a-f-]{1,64}$/i.test(id)) throw new Error(`invalid guest id ${JSON.stringify(id)}`);
  const out: GuestCgroup[] = [];
  for (const mount of mounts) {
    const base = agentPath(view, mount.mountPoint);
    if (base === undefined) continue;
    out.push({
      mount,
      hostDir: posix.join(mount.mountPoint, GUESTS_CGROUP, id),
      agentDir: posix.join(base, GUESTS_CGROUP, id),
    });
  }
  return out;
}

/**
 * Memory a guest's QEMU may use beyond the guest's RAM: QEMU itself, its device and I/O buffers, plus TCG's
 * translation cache (QEMU's default tb-size, 1 GiB on 64-bit hosts, touched as code is translated) when it
 * emulates. Documented in docs/design/guest-placement.md.
 */
export function memoryLimitBytes(ramMiB: number, accelerator?: string): number {
  const overheadMiB = 256 + Math.ceil(ramMiB / 32) + (accelerator === 'tcg' ? 1024 : 0);
  return (ramMiB + overheadMiB) * MiB;
}

async function exists(p: string): Promise<boolean> {
  return (await stat(p).catch(() => undefined)) !== undefined;
}

async function copyIfEmpty(from: string, to: string): Promise<void> {
  const cur = (await readFile(to, 'utf8')).trim();
  if (cur !== '') return;
  await writeFile(to, (await readFile(from, 'utf8')).trim());
}

/**
 * Makes the guest's cgroup directories (and stratus-guests above them) and sets the limits: cpuset.cpus/mems copied
 * from the parent (a new v1 cpuset is empty and takes no process), memory limit (v1 memory.limit_in_bytes, v2
 * memory.max when the unified hierarchy has the memory controller).
 */
export async function createGuestCgroups(cgs: readonly GuestCgroup[], memoryBytes?: number): Promise<void> {
  for (const cg of cgs) {
    const parent = posix.dirname(cg.agentDir);
    const root = posix.dirname(parent);
    if (cg.mount.version === 2) {
      // Hosts without systemd may have no controller enabled below the root: memory for the limit.
      for (const dir of [root, parent]) {
        if (dir === parent) await mkdir(parent, { recursive: true });
        const ctl = join(dir, 'cgroup.controllers');
        if ((await readFile(ctl, 'utf8').catch(() => '')).split(/\s+/).includes('memory')) {
          await writeFile(join(dir, 'cgroup.subtree_control'), '+memory').catch(() => {});
        }
      }
    }
    await mkdir(cg.agentDir, { recursive: true });
    if (cg.mount.controllers.includes('cpuset')) {
      for (const f of ['cpuset.cpus', 'cpuset.mems']) {
        await copyIfEmpty(join(root, f), join(parent, f));
        await copyIfEmpty(join(parent, f), join(cg.agentDir, f));
      }
    }
    if (memoryBytes === undefined) continue;
    if (cg.mount.controllers.includes('memory')) {
      await writeFile(join(cg.agentDir, 'memory.limit_in_bytes'), String(memoryBytes));
    } else if (cg.mount.version === 2 && (await exists(join(cg.agentDir, 'memory.max')))) {
      await writeFile(join(cg.agentDir, 'memory.max'), String(memoryBytes));
    }
  }
}

/**
 * Removes the guest's cgroup directories once QEMU has ended. A killed QEMU keeps its cgroups busy (EBUSY) until its
 * parent — init or a subreaper, once the agent that started it is gone — has reaped it: retried for up to `waitMs`.
 */
export async function removeGuestCgroups(cgs: readonly GuestCgroup[], waitMs = 10_000): Promise<void> {
  const deadline = Date.now() + waitMs;
  for (const cg of cgs) {
    for (;;) {
      try {
        await rmdir(cg.agentDir);
        break;
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'ENOENT') break;
        if (code !== 'EBUSY' || Date.now() >= deadline) throw err;
        await sleep(50);
      }
    }
  }
}

/** Removes every empty guest cgroup under stratus-guests (guests destroyed or stopped while no agent ran). */
export async function pruneGuestCgroups(mounts: readonly CgroupMount[], view: CgroupView): Promise<string[]> {
  const removed: string[] = [];
  for (const mount of mounts) {
    const base = agentPath(view, mount.mountPoint);
    if (base === undefined) continue;
    const dir = posix.join(base, GUESTS_CGROUP);
    let names: string[];
    try {
      names = (await readdir(dir, { withFileTypes: true })).filter((e) => e.isDirectory()).map((e) => e.name);
    } catch {
      continue;
    }
    for (const n of names) {
      try {
        await rmdir(posix.join(dir, n));
        removed.push(posix.join(dir, n));
      } catch {
        // busy: a QEMU runs in it
      }
    }
  }
  return removed;
}
