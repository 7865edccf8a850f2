// The QEMU driver (Nova's libvirt driver without libvirt): one qemu-system-x86_64 process per running guest,
// driven over QMP. Design notes: docs/design/qemu-driver.md. In short:
//  - Each guest has a directory <stateDir>/guests/<uid>/ holding guest.json (its definition, written atomically),
//    its disks (root overlay on the node's cached image, ephemeral, swap), the seed ISOs, the console log and the
//    QMP/console/VNC sockets, and qemu.pid. destroy() removes the directory.
//  - QEMU does not live and die with the agent (drivers/qemu/launcher.ts). A driver adopts guests from the
//    directory: a guest whose qemu.pid names a live process whose command line carries its uuid is running, and the
//    driver connects to its QMP socket; otherwise it is stopped (SHUTDOWN, or SUSPENDED with a saved state).
//  - One long-lived QMP connection per running guest carries commands and events; when QEMU exits without the
//    driver asking, listeners get a GuestExit (guest-shutdown after a guest SHUTDOWN event, crash otherwise).
//  - Operations on one guest are serialised; a launch takes a lock file and re-checks the pid first, so one uid
//    never gets two QEMUs (QEMU's own image and pid-file locks are a second line).
//  - NICs: the network backend creates each port's tap (persistent, attached, up) before spawn; QEMU (root) opens it
//    by name (-netdev tap,ifname=…,script=no,downscript=no). guest.json keeps the NICs, so every later start plugs the
//    same taps with the same MACs; each start first checks the taps exist (QEMU as root would otherwise create an
//    unplugged tap of that name and the guest would boot without network). The seeds carry the addresses
//    (network-config v2, network_data.json). With options.netns, QEMU runs in that network namespace (the taps are
//    there; the e2e tier runs one namespace per simulated node).
import { constants, createReadStream, createWriteStream } from 'node:fs';
import { chmod, chown, mkdir, open, readdir, readFile, rename, rm, stat, unlink, writeFile } from 'node:fs/promises';
import { createServer, type Server as NetServer, connect as netConnect } from 'node:net';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import * as z from 'zod';
import { RESIZE_DOWN_MESSAGE } from '../../../operator/src/api/index.ts';
import { crashPoint, silentLogger } from '../../../operator/src/runtime/index.ts';
import {
  type Accelerator,
  type AttachedVolume,
  type DiskExport,
  DriverError,
  type DriverOp,
  type GuestExit,
  type GuestInfo,
  GuestNotFoundError,
  type GuestSpec,
  type GuestState,
  type HostInfo,
  type HypervisorDriver,
  InvalidGuestStateError,
  type PowerOffOptions,
  type VolumeAttachmentSpec,
  type VolumeQos,
  volumeSerial,
} from '../driver.ts';
import { type CachedImage, ImageCache, ImageError, type ImageSource } from '../images/cache.ts';
import { copyDisk, createBlankDisk, createRootDisk, growDisk } from '../images/disks.ts';
import { type Exec, ExecError, hostExec } from '../network/exec.ts';
import {
  type AcceleratorDecision,
  type AcceleratorMode,
  type DetectAcceleratorOptions,
  detectAccelerator,
} from '../qemu/accel.ts';
import { type DiskSpec, type NicSpec, qemuArgs, type VolumeSpec } from '../qemu/cmdline.ts';
import { QmpClient, QmpError, type QmpEvent, type QmpStatus } from '../qemu/qmp.ts';
import {
  MAX_SCSI_ID,
  rootPortOfBus,
  SERIAL_RE,
  serialOfDevice,
  spareRootPorts,
  throttleBlockdev,
  throttleGroupObject,
  throttleLimits,
  type VolumeSlot,
  volumeBlockdev,
  volumeDevice,
  volumeNames,
} from '../qemu/volumes.ts';
import { writeConfigDriveIso } from '../seed/configdrive.ts';
import type { GuestNicInput } from '../seed/nic.ts';
import { writeNoCloudIso } from '../seed/nocloud.ts';
import { collectBundles, ensureBundle, RUNTIME_DIR } from './qemu/bundle.ts';
import { hostFacts, mebibytes, qemuVersion } from './qemu/host.ts';
import { chooseLauncher, findHostNs, hostRunsSystemd, procNs } from './qemu/hostns.ts';
import {
  checkNetnsName,
  DirectLauncher,
  type Launched,
  type Launcher,
  type LauncherName,
  SystemdLauncher,
} from './qemu/launcher.ts';
import { HostLauncher } from './qemu/launcher-host.ts';
import { type GuestProcess, guestProcess, type ProcReader, processOf, procReader, startedAtOf } from './qemu/proc.ts';
import {
  diskGiBOf,
  GUESTS_DIR,
  GuestId,
  type GuestPaths,
  type GuestRecord,
  guestPaths,
  MAX_SOCKET_PATH,
  RecordedNic,
  type RecordedSpec,
  RecordedVolume,
  readRecord,
  writeRecord,
} from './qemu/record.ts';
import { type QemuUser, resolveQemuUser, untraversable } from './qemu/user.ts';

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
/** NBD ports of disk exports (cold migration): EXPORT_PORT_BASE + (guest id % EXPORT_PORT_SPAN), then the next. */
const EXPORT_PORT_BASE = 10_810;
const EXPORT_PORT_SPAN = 1000;

export interface QemuDriverOptions {
  /** Root of the driver's files (default /var/lib/stratus): guests/<uid>/ and, by default, images/. */
  stateDir?: string;
  /** Image cache directory (default <stateDir>/images). */
  imageCacheDir?: string;
  /** auto: KVM when a boot probe works, else TCG; kvm: KVM or init fails; tcg: TCG. Default auto. */
  accelerator?: AcceleratorMode;
  /** The kernel the KVM probe boots (default: see kernelCandidates in qemu/accel.ts). */
  kvmProbeKernel?: string;
  /**
   * Where the KVM probe's result is kept (default /run/stratus/kvm-probe.json: /run is emptied at boot, and every
   * agent of the host shares it), so KVM is probed once per host boot, host kernel, QEMU and probe kernel.
   */
  acceleratorCacheFile?: string;
  /** Default qemu-system-x86_64 (from PATH). */
  qemuBinary?: string;
  /**
   * How QEMU is started (default direct). auto: systemd when the host runs systemd, host when the agent runs in a
   * container, direct otherwise (docs/design/guest-placement.md).
   */
  launcher?: LauncherName | 'auto';
  /** systemd launcher: run systemd-run through nsenter into the host's namespaces (default: when they differ). */
  nsenter?: boolean;
  /** The host process whose namespaces host commands enter (default: found, see qemu/hostns.ts). */
  hostMountNsPid?: number;
  /** host launcher: where the agent sees the host's /sys/fs/cgroup (default: /proc/<host pid>/root/sys/fs/cgroup). */
  hostCgroupRoot?: string;
  /** Grace of the ACPI power off inside a soft reboot (default 60 s); powerOff gets its own from the caller. */
  powerOffTimeoutMs?: number;
  /** Time QEMU gets to come up (pid file + QMP) and, for resume, to load the saved state (default 120 s). */
  startTimeoutMs?: number;
  /** Serve the guest display on vnc.sock (adds a VGA adapter). Default true. */
  vnc?: boolean;
  /** Cached images no guest on this node is built on are evicted once unused this long (default 1 h; 0: never). */
  imageRetentionMs?: number;
  /** How often unused images are looked for (default 10 min). */
  imageEvictIntervalMs?: number;
  /**
   * Network namespace (a name under /run/netns) QEMU runs in and the guests' taps live in; default: the agent's own.
   * The node agent passes its --netns (simulated nodes of the e2e tier).
   */
  netns?: string;
  /** Use vhost-net for the taps (needs /dev/vhost-net in the kernel). Default off. */
  vhostNet?: boolean;
  /**
   * The unprivileged user QEMU drops to before the guest runs (-runas uid:gid): a name or uid:gid; root or unset:
   * QEMU keeps root. The node agent's --qemu-user defaults to stratus-qemu. See drivers/qemu/user.ts.
   */
  qemuUser?: string;
  /**
   * How long detachVolume waits for the guest to release a device (DEVICE_DELETED) before it fails (the unplug stays
   * requested; the caller retries). Default 30 s. scsi needs no guest help; virtio-blk needs the guest's PCIe hot-plug.
   */
  volumeDetachTimeoutMs?: number;
  /** Which addresses image URLs may reach (the image cache's URL guard; default: no loopback/link-local). */
  imageUrlPolicy?: { allowCidrs?: string[]; denyCidrs?: string[] };
}

/** What the driver needs from the image cache and disk helpers (injected in tests). */
export interface ImageOps {
  ensure(src: ImageSource, opts?: { signal?: AbortSignal }): Promise<CachedImage>;
  createRootDisk(o: { base: CachedImage; path: string; sizeBytes: number }): Promise<void>;
  createBlankDisk(o: { path: string; sizeBytes: number }): Promise<void>;
  /** Grows a qcow2 disk (qemu-img resize); default images/disks.ts growDisk. */
  growDisk?(o: { path: string; sizeBytes: number }): Promise<void>;
  /** Copies a disk file as it is (sparse); default images/disks.ts copyDisk. */
  copyDisk?(o: { from: string; to: string }): Promise<void>;
}

export interface QemuDriverDeps {
  logger?: Logger;
  images?: ImageOps;
  proc?: ProcReader;
  launcher?: Launcher;
  detectAccelerator?: (o: DetectAcceleratorOptions) => Promise<AcceleratorDecision>;
  /** QEMU's version (default: `<qemuBinary> --version`). */
  qemuVersion?: () => Promise<string>;
  /** Runs host commands in the guests' network namespace (the tap checks); default hostExec(options.netns). */
  exec?: Exec;
}

/** A running guest the driver is connected to. */
interface Live {
  id: string;
  pid: number;
  qmp: QmpClient;
  /** The driver is ending this process itself: its exit is no GuestExit. */
  expectExit: boolean;
  /** The driver closed the connection (close()): the process keeps running. */
  detached: boolean;
  /** Data of the last SHUTDOWN event. */
  shutdown: { guest: boolean; reason: string } | undefined;
  /** Data of a GUEST_PANICKED event. */
  panic?: Record<string, unknown>;
  /** The driver is ending this process because the guest crashed (see #endCrashed). */
  crashing?: boolean;
  /** Resolves once the process is gone. */
  gone: Promise<void>;
  markGone: () => void;
}

/**
 * QEMU run states in which QEMU stays alive but the guest cannot continue without a reset: a KVM internal error
 * (e.g. "KVM internal error. Suberror: 1 … emulation failure" on hosts whose KVM cannot run ordinary guests) and a
 * guest kernel panic reported through pvpanic (-action panic=pause). The driver records why, ends QEMU and reports
 * a CRASHED exit; start and hard reboot launch a fresh QEMU.
 */
const CRASHED_STATUSES: ReadonlySet<string> = new Set(['internal-error', 'guest-panicked']);

/** What QEMU printed about the error that stopped a guest: its log's error lines, without the register dump. */
export function crashDetail(qemuLog: string): string | undefined {
  // Only the end of the log speaks of how this process ended (earlier lines are older runs and warnings).
  const lines = qemuLog
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !/^[A-Z][A-Z0-9]{1,3} *=/.test(l) && !/^(Code=|extra data)/.test(l))
    .slice(-6);
  const at = lines.findLastIndex((l) => /internal error|emulation failure|error/i.test(l));
  if (at < 0) return undefined;
  const first = lines.findIndex(
    (l, i) => i <= at && /KVM internal error/i.test(l) && lines.slice(i, at + 1).length <= 4,
  );
  return lines
    .slice(first >= 0 ? first : at, at + 1)
    .map((l) => l.replace(/^qemu-system-[\w-]+: /, ''))
    .join('; ')
    .slice(0, 500);
}

function errMsg(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function isoNow(): string {
  return new Date().toISOString();
}

/** Guest name for -name: "<namespace>:<name>", restricted to what QEMU accepts. */
function qemuName(spec: RecordedSpec): string {
  const raw = `${spec.namespace || 'default'}:${spec.name}`.replace(/[^A-Za-z0-9_.:-]/g, '_');
  return raw.slice(0, 128);
}

export class QemuDriver implements HypervisorDriver {
  readonly name = 'qemu';
  readonly stateDir: string;
  readonly imageCacheDir: string;
  readonly #o: QemuDriverOptions;
  readonly #log: Logger;
  readonly #proc: ProcReader;
  readonly #qemu: string;
  readonly #exec: Exec;
  #images: ImageOps | undefined;
  #launcher: Launcher | undefined;
  #accel: AcceleratorDecision | undefined;
  /** The user QEMU drops to (undefined: root). */
  #runAs: QemuUser | undefined;
  #version: string | undefined;
  #cache: 'none' | 'writeback' = 'none';
  readonly #deps: QemuDriverDeps;
  readonly #live = new Map<string, Live>();
  readonly #attaching = new Map<string, Promise<Live | undefined>>();
  readonly #locks = new Map<string, Promise<void>>();
  readonly #listeners = new Set<(e: GuestExit) => void>();
  #closed = false;
  #imageCache: ImageCache | undefined;
  /** Others whose files are overlays on cached images (the local volume backend): eviction keeps what they use. */
  readonly #imageUsers: (() => Promise<Iterable<string>>)[] = [];
  #evictTimer: NodeJS.Timeout | undefined;

  constructor(options: QemuDriverOptions = {}, deps: QemuDriverDeps = {}) {
    this.#o = options;
    this.#deps = deps;
    this.stateDir = options.stateDir ?? '/var/lib/stratus';
    this.imageCacheDir = options.imageCacheDir ?? join(this.stateDir, 'images');
    this.#qemu = options.qemuBinary ?? 'qemu-system-x86_64';
    this.#log = (deps.logger ?? silentLogger()).child({ driver: 'qemu' });
    this.#proc = deps.proc ?? procReader;
    if (options.netns !== undefined) checkNetnsName(options.netns);
    this.#exec = deps.exec ?? hostExec(options.netns);
  }

  /** The network namespace QEMU runs in (undefined: the agent's own). */
  get netns(): string | undefined {
    return this.#o.netns;
  }

  /** The accelerator decision made by init(). */
  get accelerator(): AcceleratorDecision | undefined {
    return this.#accel;
  }

  /** The guest directory layout of an id (for tools and tests). */
  paths(id: string): GuestPaths {
    return guestPaths(this.stateDir, id);
  }

  async init(): Promise<void> {
    this.#closed = false;
    const guestsDir = join(this.stateDir, GUESTS_DIR);
    await mkdir(guestsDir, { recursive: true, mode: 0o700 });
    await mkdir(this.imageCacheDir, { recursive: true, mode: 0o700 });
    const longest = guestPaths(this.stateDir, '00000000-0000-0000-0000-000000000000').consoleSocket;
    if (Buffer.byteLength(longest) > MAX_SOCKET_PATH) {
      throw new Error(
        `state directory ${this.stateDir} is too long: guest sockets would exceed ${MAX_SOCKET_PATH} bytes`,
      );
    }
    if (this.#o.netns !== undefined && !this.#deps.exec) {
      await stat(join('/run/netns', this.#o.netns)).catch((err: unknown) => {
        throw new Error(`network namespace ${this.#o.netns} does not exist (/run/netns): ${errMsg(err)}`);
      });
    }
    this.#cache = (await supportsODirect(guestsDir)) ? 'none' : 'writeback';
    if (this.#cache === 'writeback') {
      this.#log.warn(
        { dir: guestsDir },
        'the state directory refuses O_DIRECT (tmpfs?): guest disks use cache=writeback',
      );
    }
    this.#runAs = this.#o.qemuUser ? await resolveQemuUser(this.#o.qemuUser) : undefined;
    if (!this.#runAs) this.#log.warn('QEMU runs as root (--qemu-user=root): guests are not confined to a user');
    else {
      // QEMU, once it is the user, still enters its guest directory (suspend/resume streams, pid file), and qemu-img
      // the image cache's work directories: the agent's own directories may be entered (o+x), not listed. Directories
      // above the state directory are the admin's: they are only checked.
      for (const dir of [this.stateDir, guestsDir, this.imageCacheDir]) {
        await chmod(dir, ((await stat(dir)).mode & 0o777) | 0o001);
      }
      for (const dir of [guestsDir, this.imageCacheDir]) {
        const blocked = await untraversable(dir, this.#runAs);
        if (blocked) {
          throw new Error(
            `QEMU user ${this.#runAs.name} (uid ${this.#runAs.uid}) cannot reach ${dir}: ${blocked.path} is mode 0${blocked.mode.toString(8)}; let it in (chmod o+x ${blocked.path}), choose another --state-dir, or --qemu-user=root`,
          );
        }
      }
    }
    this.#version = await (this.#deps.qemuVersion ?? (() => qemuVersion(this.#qemu)))();
    const detect = this.#deps.detectAccelerator ?? detectAccelerator;
    this.#accel = await detect({
      mode: this.#o.accelerator ?? 'auto',
      qemuBinary: this.#qemu,
      ...(this.#o.kvmProbeKernel ? { probeKernel: this.#o.kvmProbeKernel } : {}),
      // Probed once per host boot, host kernel, QEMU binary and probe kernel, not at every agent start.
      cacheFile: this.#o.acceleratorCacheFile ?? '/run/stratus/kvm-probe.json',
    });
    this.#log.info(this.#accel, 'accelerator');
    if (!this.#images && !this.#deps.images) {
      this.#imageCache = new ImageCache({
        dir: this.imageCacheDir,
        logger: this.#log,
        // Downloaded (untrusted) data is inspected and converted by qemu-img running as the QEMU user, not root.
        ...(this.#runAs ? { user: { uid: this.#runAs.uid, gid: this.#runAs.gid } } : {}),
        ...(this.#o.imageUrlPolicy ? { urlPolicy: this.#o.imageUrlPolicy } : {}),
      });
    }
    this.#images ??= this.#deps.images
      ? { growDisk, copyDisk, ...this.#deps.images }
      : { ...bindCache(this.#imageCache!), createRootDisk, createBlankDisk, growDisk, copyDisk };
    const retention = this.#o.imageRetentionMs ?? 3_600_000;
    if (this.#imageCache && retention > 0 && !this.#evictTimer) {
      this.#evictTimer = setInterval(() => void this.evictImages(retention), this.#o.imageEvictIntervalMs ?? 600_000);
      this.#evictTimer.unref();
    }
    if (!this.#launcher) {
      this.#launcher = this.#deps.launcher ?? (await this.#makeLauncher());
      await this.#launcher.init?.();
    }
    this.#log.info(
      {
        stateDir: this.stateDir,
        qemu: this.#version,
        accelerator: this.#accel.accelerator,
        reason: this.#accel.reason,
        launcher: this.#launcher.name,
        cache: this.#cache,
        ...(this.#o.netns !== undefined ? { netns: this.#o.netns } : {}),
      },
      'qemu driver ready',
    );
    // Adopt: connect to every guest whose QEMU still runs; clear leftovers of spawns interrupted before guest.json.
    for (const id of await this.#guestIds()) {
      const p = this.paths(id);
      let rec: GuestRecord | undefined;
      try {
        rec = await readRecord(p.record);
      } catch (err) {
        this.#log.error({ err, guest: id }, 'unreadable guest record: guest ignored');
        continue;
      }
      if (!rec) {
        this.#log.warn({ guest: id, dir: p.dir }, 'removing the files of an interrupted spawn (no guest.json)');
        await rm(p.dir, { recursive: true, force: true });
        continue;
      }
      const proc = await guestProcess(this.#proc, p.pidFile, id);
      if (proc.kind === 'running') {
        const live = await this.#attach(id, proc.pid);
        this.#log.info({ guest: id, pid: proc.pid, connected: Boolean(live) }, 'adopted a running guest');
      } else {
        this.#log.info({ guest: id, why: proc.why }, 'found a stopped guest');
      }
    }
  }

  /** The launcher --launcher asks for (auto: see QemuDriverOptions.launcher). */
  async #makeLauncher(): Promise<Launcher> {
    const requested = this.#o.launcher ?? 'direct';
    if (requested === 'direct') return new DirectLauncher();
    const host = await findHostNs(procNs, this.#o.hostMountNsPid);
    const choice = chooseLauncher({
      requested,
      hostSystemd: requested === 'auto' ? await hostRunsSystemd(host) : false,
      inContainer: host.inContainer,
    });
    if (choice === 'direct') return new DirectLauncher();
    if (choice === 'host') {
      return new HostLauncher({
        host,
        stateDir: this.stateDir,
        qemuBinary: this.#qemu,
        ...(this.#o.hostCgroupRoot !== undefined ? { hostCgroupRoot: this.#o.hostCgroupRoot } : {}),
        logger: this.#log,
      });
    }
    const nsenter = this.#o.nsenter ?? host.inContainer;
    // From a container, the unit runs QEMU from the runtime bundle (the container's files are not the host's).
    const bundle = host.inContainer
      ? await ensureBundle({ qemuBinary: this.#qemu, runtimeDir: join(this.stateDir, RUNTIME_DIR) })
      : undefined;
    if (bundle) await collectBundles({ runtimeDir: join(this.stateDir, RUNTIME_DIR), keep: bundle.hash });
    return new SystemdLauncher({
      nsenter,
      ...(host.pid !== undefined ? { hostPid: host.pid } : {}),
      ...(bundle ? { bundle } : {}),
    });
  }

  /** The node's image cache (after init): volumes made from an image are built on its entries too. */
  get imageCache(): ImageCache | undefined {
    return this.#imageCache;
  }

  /** Registers files (cached image paths) someone besides the guests still uses: eviction leaves them. */
  addImageUser(user: () => Promise<Iterable<string>>): void {
    this.#imageUsers.push(user);
  }

  /**
   * Removes cached images that no guest on this node (running or stopped) is built on and that nothing used
   * for `retentionMs` — the retention also protects an image between its download and the disk built on it.
   */
  async evictImages(retentionMs = this.#o.imageRetentionMs ?? 3_600_000): Promise<string[]> {
    if (!this.#imageCache) return [];
    try {
      const inUse = await this.imagesInUse();
      for (const user of this.#imageUsers) for (const path of await user()) inUse.add(path);
      const removed = await this.#imageCache.evict({ inUse, maxUnusedAgeMs: retentionMs });
      if (removed.length > 0) this.#log.info({ removed }, 'evicted unused images');
      return removed;
    } catch (err) {
      this.#log.warn({ err }, 'image eviction failed');
      return [];
    }
  }

  async close(): Promise<void> {
    clearInterval(this.#evictTimer);
    this.#evictTimer = undefined;
    this.#closed = true;
    this.#listeners.clear();
    const lives = [...this.#live.values()];
    this.#live.clear();
    await Promise.all(
      lives.map((l) => {
        l.detached = true;
        return l.qmp.close().catch(() => {});
      }),
    );
  }

  async hostInfo(): Promise<HostInfo> {
    const accel = this.#ready();
    const facts = await hostFacts(this.stateDir);
    return {
      capacity: { vcpus: availableParallelism(), ram: mebibytes(facts.ramBytes), disk: mebibytes(facts.diskBytes) },
      cpu: {
        architecture: facts.architecture,
        ...(facts.model ? { model: facts.model } : {}),
        ...(facts.vendor ? { vendor: facts.vendor } : {}),
      },
      accelerator: accel.accelerator,
      acceleratorReason: accel.reason,
      ...(this.#version ? { version: this.#version } : {}),
    };
  }

  onGuestExit(listener: (e: GuestExit) => void): () => void {
    this.#listeners.add(listener);
    return () => {
      this.#listeners.delete(listener);
    };
  }

  /** Keys of the cached images the guests on this node are built on (for ImageCache.evict). */
  async imagesInUse(): Promise<Set<string>> {
    const keys = new Set<string>();
    for (const id of await this.#guestIds()) {
      const rec = await readRecord(this.paths(id).record).catch(() => undefined);
      if (rec?.image) keys.add(rec.image.key);
    }
    return keys;
  }

  // ---- spawn / destroy ----

  async spawn(spec: GuestSpec): Promise<GuestState> {
    const accel = this.#ready();
    const id = spec.id;
    if (!GuestId.safeParse(id).success) throw new DriverError('spawn', id, `spawn: guest id ${id} is not a UUID`);
    return this.#withLock(id, async () => {
      const p = this.paths(id);
      const existing = await readRecord(p.record);
      if (existing) return this.#stateOf(id, existing);
      const nicProblem = nicsProblem(spec.nics ?? []);
      if (nicProblem) throw new DriverError('spawn', id, `spawn: ${nicProblem}`);
      const volumeProblem = volumesProblem(spec);
      if (volumeProblem) throw new DriverError('spawn', id, `spawn: ${volumeProblem}`);
      const src = spec.imageSource;
      if (!src && !spec.rootVolume) {
        const what = spec.image ? `image ${spec.image} was not found in namespace ${spec.namespace}` : 'no image';
        throw new DriverError('spawn', id, `spawn: ${what}`);
      }
      // Download (or reuse) first: an ImageError leaves nothing behind in the guest directory. A guest booting from
      // a volume needs no image: the volume is its root disk.
      const image = spec.rootVolume ? undefined : await this.#images!.ensure(src!);
      const rootBytes = !image ? 0 : spec.disk.rootGiB > 0 ? spec.disk.rootGiB * GiB : image.virtualSize;
      await rm(p.dir, { recursive: true, force: true }); // leftovers of an interrupted spawn
      await mkdir(p.dir, { recursive: true, mode: 0o700 });
      let launched = false;
      try {
        if (image) await this.#images!.createRootDisk({ base: image, path: p.root, sizeBytes: rootBytes });
        if (spec.disk.ephemeralGiB > 0) {
          await this.#images!.createBlankDisk({ path: p.ephemeral, sizeBytes: spec.disk.ephemeralGiB * GiB });
        }
        if (spec.disk.swapMiB > 0) {
          await this.#images!.createBlankDisk({ path: p.swap, sizeBytes: spec.disk.swapMiB * MiB });
        }
        const rec = await this.#define(spec, image, rootBytes, accel);
        await writeRecord(p.record, rec);
        launched = true;
        await this.#launch('spawn', rec);
        this.#log.info(
          { guest: id, server: `${spec.namespace}/${spec.name}`, accelerator: rec.accelerator },
          'guest spawned',
        );
        return this.#stateOf(id, rec);
      } catch (err) {
        if (launched) await this.#kill(id).catch(() => {});
        await rm(p.dir, { recursive: true, force: true });
        if (err instanceof DriverError || err instanceof ImageError) throw err;
        throw new DriverError('spawn', id, `spawn: ${errMsg(err)}`, { cause: err });
      }
    });
  }

  /** Writes the seeds of a guest whose disks exist and returns its record (not written yet). */
  async #define(
    spec: GuestSpec,
    image: CachedImage | undefined,
    rootBytes: number,
    accel: AcceleratorDecision,
  ): Promise<GuestRecord> {
    const id = spec.id;
    const p = this.paths(id);
    const hostname = spec.hostname ?? spec.name;
    const keyPair = spec.keyPair ? { name: spec.keyPair.name, publicKey: spec.keyPair.publicKey } : undefined;
    await writeNoCloudIso(
      {
        instanceId: id,
        hostname,
        ...(spec.userData !== undefined ? { userData: spec.userData } : {}),
        ...(keyPair ? { keyPair } : {}),
        nics: seedNicsOf(spec.nics),
      },
      p.seed,
    );
    if (spec.configDrive) {
      await writeConfigDriveIso(
        {
          uuid: id,
          name: spec.name,
          hostname,
          ...(keyPair ? { keyPair } : {}),
          ...(spec.userData !== undefined ? { userData: spec.userData } : {}),
          metadata: { ...(spec.metadata ?? {}) },
          nics: seedNicsOf(spec.nics),
        },
        p.configDrive,
      );
    }
    const accelerator: Accelerator =
      spec.accelerator === 'tcg' || accel.accelerator === 'tcg' ? 'tcg' : (spec.accelerator ?? accel.accelerator);
    const rec: GuestRecord = {
      version: 1,
      spec: recordedSpec(spec),
      accelerator,
      cache: this.#cache,
      ...(image
        ? {
            image: {
              key: image.key,
              path: image.path,
              format: image.format,
              virtualSize: image.virtualSize,
              sha256: image.sha256,
            },
          }
        : {}),
      disks: {
        ...(image ? { root: p.root } : {}),
        rootBytes,
        ...(spec.disk.ephemeralGiB > 0 ? { ephemeral: p.ephemeral } : {}),
        ...(spec.disk.swapMiB > 0 ? { swap: p.swap } : {}),
        seed: p.seed,
        ...(spec.configDrive ? { configDrive: p.configDrive } : {}),
      },
      createdAt: isoNow(),
      volumes: (spec.volumes ?? []).map(recordedVolume),
    };
    return rec;
  }

  async destroy(id: string): Promise<void> {
    this.#ready();
    if (!GuestId.safeParse(id).success) return; // no such guest can exist
    await this.#withLock(id, async () => {
      const p = this.paths(id);
      await this.#kill(id);
      await this.#launcher!.release?.(id).catch((err: unknown) => {
        // Left for the next agent start (empty guest cgroups are pruned then).
        this.#log.warn({ err, guest: id }, 'cannot remove the guest cgroups');
      });
      await this.#endExport(id);
      await rm(p.dir, { recursive: true, force: true });
      this.#log.info({ guest: id }, 'guest destroyed');
    });
  }

  // ---- power ----

  async powerOff(id: string, opts: PowerOffOptions): Promise<void> {
    await this.#op('powerOff', id, async (rec, live) => {
      if (live) await this.#stop(live, opts);
      if (rec.suspended) await rm(rec.suspended.stateFile, { force: true });
      if (rec.suspended || rec.lastExit) {
        delete rec.suspended;
        delete rec.lastExit;
        await writeRecord(this.paths(id).record, rec);
      }
    });
  }

  async powerOn(id: string): Promise<void> {
    await this.#op('powerOn', id, async (rec, live) => {
      if (live) {
        const s = await live.qmp.queryStatus();
        if (s.powerState === 'RUNNING') return;
        if (!CRASHED_STATUSES.has(s.status)) throw new InvalidGuestStateError('powerOn', id, s.powerState);
        // Crashed but alive (internal error, panic): end this QEMU and start a fresh one.
        await this.#stop(live, { graceful: false, timeoutMs: 0 });
      }
      if (rec.suspended) throw new InvalidGuestStateError('powerOn', id, 'SUSPENDED');
      await this.#start('powerOn', rec);
    });
  }

  async reboot(id: string, opts: { hard: boolean }): Promise<void> {
    await this.#op('reboot', id, async (rec, live) => {
      if (opts.hard) {
        const crashed = live && CRASHED_STATUSES.has((await live.qmp.queryStatus()).status);
        if (live && crashed) {
          // A reset would re-enter the state that stopped it (a KVM internal error): a fresh QEMU instead.
          await this.#stop(live, { graceful: false, timeoutMs: 0 });
          await this.#start('reboot', rec);
          return;
        }
        if (live) {
          await live.qmp.reset();
          const s = await live.qmp.queryStatus();
          if (s.status === 'paused') await live.qmp.cont();
          return;
        }
        if (rec.suspended) {
          await rm(rec.suspended.stateFile, { force: true });
          delete rec.suspended;
        }
        await this.#start('reboot', rec);
        return;
      }
      // Soft: no guest agent, so (like libvirt without one) a graceful power off and a fresh start.
      const s = live ? await live.qmp.queryStatus() : undefined;
      if (!live || s?.powerState !== 'RUNNING') {
        throw new InvalidGuestStateError('reboot', id, s?.powerState ?? this.#stoppedState(rec));
      }
      await this.#stop(live, { graceful: true, timeoutMs: this.#o.powerOffTimeoutMs ?? 60_000 });
      await this.#start('reboot', rec);
    });
  }

  async pause(id: string): Promise<void> {
    await this.#op('pause', id, async (rec, live) => {
      const s = live ? await live.qmp.queryStatus() : undefined;
      if (s?.powerState === 'PAUSED') return;
      if (!live || s?.powerState !== 'RUNNING') {
        throw new InvalidGuestStateError('pause', id, s?.powerState ?? this.#stoppedState(rec));
      }
      await live.qmp.stop();
    });
  }

  async unpause(id: string): Promise<void> {
    await this.#op('unpause', id, async (rec, live) => {
      const s = live ? await live.qmp.queryStatus() : undefined;
      if (s?.powerState === 'RUNNING') return;
      if (!live || s?.status !== 'paused') {
        throw new InvalidGuestStateError('unpause', id, s?.powerState ?? this.#stoppedState(rec));
      }
      await live.qmp.cont();
    });
  }

  /** Managed save: the guest's state streams into state.bin over a UNIX socket, then QEMU quits. */
  async suspend(id: string): Promise<void> {
    await this.#op('suspend', id, async (rec, live) => {
      if (!live && rec.suspended) return;
      const s = live ? await live.qmp.queryStatus() : undefined;
      if (!live || s?.powerState !== 'RUNNING') {
        throw new InvalidGuestStateError('suspend', id, s?.powerState ?? this.#stoppedState(rec));
      }
      const p = this.paths(id);
      const tmp = `${p.stateFile}.tmp`;
      await rm(p.migrateSocket, { force: true });
      let server: NetServer | undefined;
      let stopped = false;
      try {
        await live.qmp.execute('migrate-set-capabilities', {
          capabilities: [{ capability: 'events', state: true }],
        });
        await live.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 1024 * GiB });
        let received: Promise<void> | undefined;
        server = createServer((sock) => {
          // flush: fsync before the stream closes (pipeline resolves after the close).
          received ??= pipeline(sock, createWriteStream(tmp, { mode: 0o600, flush: true }));
        });
        await new Promise<void>((resolve, reject) => {
          server!.once('error', reject);
          server!.listen(p.migrateSocket, () => resolve());
        });
        // QEMU no longer runs as root: the socket must be its to connect to.
        if (this.#runAs) await chown(p.migrateSocket, this.#runAs.uid, this.#runAs.gid);
        const done = live.qmp.waitForEvent('MIGRATION', {
          timeoutMs: this.#startTimeout(),
          predicate: (e) => ['completed', 'failed', 'cancelled'].includes(String(e.data.status)),
        });
        await live.qmp.stop();
        stopped = true;
        await live.qmp.execute('migrate', { uri: `unix:${p.migrateSocket}` });
        this.#log.debug({ guest: id }, 'suspend: migration started');
        const ev = await done;
        this.#log.debug({ guest: id, status: ev.data.status }, 'suspend: migration ended');
        if (ev.data.status !== 'completed') throw new Error(`saving the guest state: migration ${ev.data.status}`);
        if (!received) throw new Error('saving the guest state: QEMU never connected');
        await withTimeout(received, 30_000, 'saving the guest state: the stream did not end');
        const { size } = await stat(tmp);
        live.expectExit = true;
        await this.#stop(live, { graceful: false, timeoutMs: 0 });
        await rename(tmp, p.stateFile);
        rec.suspended = { stateFile: p.stateFile, at: isoNow(), bytes: size };
        delete rec.lastExit;
        await writeRecord(p.record, rec);
        this.#log.info({ guest: id, bytes: size }, 'guest suspended (state saved)');
      } catch (err) {
        await rm(tmp, { force: true });
        if (this.#live.get(id) === live && !live.qmp.closed) {
          live.expectExit = false;
          if (stopped) await live.qmp.cont().catch(() => {});
        }
        throw err;
      } finally {
        server?.close();
        await rm(p.migrateSocket, { force: true });
      }
    });
  }

  async resume(id: string): Promise<void> {
    await this.#op('resume', id, async (rec, live) => {
      if (live) {
        const s = await live.qmp.queryStatus();
        if (s.powerState === 'RUNNING') return;
        throw new InvalidGuestStateError('resume', id, s.powerState);
      }
      if (!rec.suspended) throw new InvalidGuestStateError('resume', id, this.#stoppedState(rec));
      await this.#start('resume', rec, { restore: rec.suspended.stateFile });
      await rm(rec.suspended.stateFile, { force: true });
      delete rec.suspended;
      await writeRecord(this.paths(id).record, rec);
      this.#log.info({ guest: id }, 'guest resumed from its saved state');
    });
  }

  // ---- resize (keeps the disks) ----

  async resize(id: string, spec: GuestSpec, opts: PowerOffOptions): Promise<void> {
    await this.#op('resize', id, async (rec, live) => {
      const p = this.paths(id);
      // A guest booting from a volume has no root file: its root disk is the volume (never copied nor grown here).
      const root = rec.disks.root;
      const rootBytes = !root ? 0 : spec.disk.rootGiB > 0 ? spec.disk.rootGiB * GiB : rec.disks.rootBytes;
      const sameSize =
        rec.spec.vcpus === spec.vcpus &&
        rec.spec.ramMiB === spec.ramMiB &&
        rec.disks.rootBytes === rootBytes &&
        rec.spec.disk.ephemeralGiB === spec.disk.ephemeralGiB &&
        rec.spec.disk.swapMiB === spec.disk.swapMiB;
      if (rec.resizePending) {
        if (sameSize) return; // repeated: already done, waiting for confirm or revert
        throw new DriverError('resize', id, `resize: guest ${id} has a resize that is not confirmed or reverted`);
      }
      if (rec.suspended) throw new InvalidGuestStateError('resize', id, 'SUSPENDED');
      // Nova refuses a smaller root or ephemeral disk (the data would not fit); a flavor with disk 0 keeps the root.
      const down = rootBytes < rec.disks.rootBytes || spec.disk.ephemeralGiB < rec.spec.disk.ephemeralGiB;
      const refused = down ? RESIZE_DOWN_MESSAGE : undefined;
      if (refused) throw new DriverError('resize', id, refused);
      const nicProblem = nicsProblem(spec.nics ?? []);
      if (nicProblem) throw new DriverError('resize', id, `resize: ${nicProblem}`);
      if (live) await this.#stop(live, opts);
      const images = this.#images!;
      const old = p.resizeOld;
      const complete = join(old, 'complete');
      const oldRoot = join(old, 'root.qcow2');
      const oldEphemeral = join(old, 'ephemeral.qcow2');
      if (await pathExists(complete)) {
        // An earlier resize was interrupted after the backup: start again from the backed-up disks.
        if (root) await images.copyDisk!({ from: oldRoot, to: root });
        if (rec.disks.ephemeral) await images.copyDisk!({ from: oldEphemeral, to: rec.disks.ephemeral });
      } else {
        await rm(old, { recursive: true, force: true });
        await mkdir(old, { recursive: true, mode: 0o700 });
        if (root) await images.copyDisk!({ from: root, to: oldRoot });
        if (rec.disks.ephemeral) await images.copyDisk!({ from: rec.disks.ephemeral, to: oldEphemeral });
        await writeRecord(join(old, 'guest.json'), rec);
        await writeFile(complete, '');
      }
      if (root && rootBytes > rec.disks.rootBytes) await images.growDisk!({ path: root, sizeBytes: rootBytes });
      let ephemeral: string | undefined;
      if (spec.disk.ephemeralGiB > 0) {
        ephemeral = p.ephemeral;
        if (rec.disks.ephemeral) {
          await images.growDisk!({ path: p.ephemeral, sizeBytes: spec.disk.ephemeralGiB * GiB });
        } else {
          await images.createBlankDisk({ path: p.ephemeral, sizeBytes: spec.disk.ephemeralGiB * GiB });
        }
      }
      if (spec.disk.swapMiB !== rec.spec.disk.swapMiB) {
        await rm(p.swap, { force: true }); // swap holds nothing to keep (Nova re-creates it too)
        if (spec.disk.swapMiB > 0) {
          await images.createBlankDisk({ path: p.swap, sizeBytes: spec.disk.swapMiB * MiB });
        }
      }
      const next: GuestRecord = {
        ...rec,
        // The volumes stay as attached (hot-plug changes went through attachVolume), so does the root volume.
        spec: {
          ...recordedSpec(spec),
          accelerator: rec.spec.accelerator,
          ...(rec.spec.rootVolume ? { rootVolume: rec.spec.rootVolume } : {}),
        },
        disks: {
          ...rec.disks,
          rootBytes,
          ...(ephemeral ? { ephemeral } : {}),
          ...(spec.disk.swapMiB > 0 ? { swap: p.swap } : {}),
        },
        resizePending: isoNow(),
      };
      if (!ephemeral) delete next.disks.ephemeral;
      if (spec.disk.swapMiB === 0) delete next.disks.swap;
      if (rec.spec.accelerator === undefined) delete next.spec.accelerator;
      delete next.lastExit;
      await writeRecord(p.record, next);
      this.#log.info(
        { guest: id, vcpus: spec.vcpus, ramMiB: spec.ramMiB, rootBytes, ephemeralGiB: spec.disk.ephemeralGiB },
        'guest resized (disks kept)',
      );
    });
  }

  async confirmResize(id: string): Promise<void> {
    this.#ready();
    if (!GuestId.safeParse(id).success) return;
    await this.#withLock(id, async () => {
      const p = this.paths(id);
      const rec = await readRecord(p.record);
      await rm(p.resizeOld, { recursive: true, force: true });
      if (rec?.resizePending) {
        delete rec.resizePending;
        await writeRecord(p.record, rec);
        this.#log.info({ guest: id }, 'resize confirmed (previous disks dropped)');
      }
    });
  }

  async revertResize(id: string, opts: PowerOffOptions): Promise<void> {
    await this.#op('revertResize', id, async (rec, live) => {
      const p = this.paths(id);
      const complete = join(p.resizeOld, 'complete');
      if (!(await pathExists(complete))) {
        // Nothing kept: no resize, or a revert that already restored everything but the directory.
        await rm(p.resizeOld, { recursive: true, force: true });
        if (rec.resizePending) {
          delete rec.resizePending;
          await writeRecord(p.record, rec);
        }
        return;
      }
      const prev = await readRecord(join(p.resizeOld, 'guest.json'));
      if (!prev) throw new Error(`${p.resizeOld} has no guest.json`);
      if (live) await this.#stop(live, opts);
      const images = this.#images!;
      if (prev.disks.root) await images.copyDisk!({ from: join(p.resizeOld, 'root.qcow2'), to: prev.disks.root });
      if (prev.disks.ephemeral) {
        await images.copyDisk!({ from: join(p.resizeOld, 'ephemeral.qcow2'), to: prev.disks.ephemeral });
      } else {
        await rm(p.ephemeral, { force: true });
      }
      if (prev.spec.disk.swapMiB !== rec.spec.disk.swapMiB) {
        await rm(p.swap, { force: true });
        if (prev.spec.disk.swapMiB > 0) {
          await images.createBlankDisk({ path: p.swap, sizeBytes: prev.spec.disk.swapMiB * MiB });
        }
      }
      // Volumes attached meanwhile stay attached (they are not the resize's).
      const restored: GuestRecord = { ...prev, ...(rec.volumes ? { volumes: rec.volumes } : {}) };
      delete restored.resizePending;
      delete restored.lastExit;
      delete restored.suspended;
      await writeRecord(p.record, restored);
      await rm(p.resizeOld, { recursive: true, force: true });
      this.#log.info({ guest: id }, 'resize reverted (previous definition and disks restored)');
    });
  }

  // ---- cold migration: the source serves the stopped guest's disks over NBD, the target copies them ----

  async exportDisks(id: string, host: string): Promise<DiskExport> {
    let out: DiskExport | undefined;
    await this.#op('exportDisks', id, async (rec, live) => {
      if (live) {
        const s = await live.qmp.queryStatus().catch(() => undefined);
        throw new InvalidGuestStateError('exportDisks', id, s?.powerState ?? 'RUNNING');
      }
      if (rec.suspended) throw new InvalidGuestStateError('exportDisks', id, 'SUSPENDED');
      const p = this.paths(id);
      const served = await this.#exportServed(id);
      if (served && served.host === host) {
        out = served;
        return;
      }
      await this.#endExport(id);
      // A guest booting from a volume has no root file to serve (root ''): the volume is reached where it is.
      const disks = { root: rec.disks.root ? 'root' : '', ...(rec.disks.ephemeral ? { ephemeral: 'ephemeral' } : {}) };
      const blockdevs = (name: string, file: string) => [
        '--blockdev',
        `driver=file,node-name=${name}-file,filename=${file},read-only=on`,
        '--blockdev',
        `driver=qcow2,node-name=${name},file=${name}-file,read-only=on`,
        '--export',
        `type=nbd,id=export-${name},node-name=${name},name=${name},writable=off`,
      ];
      const args = [
        ...(rec.disks.root ? blockdevs('root', rec.disks.root) : []),
        ...(rec.disks.ephemeral ? blockdevs('ephemeral', rec.disks.ephemeral) : []),
      ];
      // A port per guest from its id, the next ones when taken (the netns of the node may not be the agent's).
      const base = EXPORT_PORT_BASE + (Number.parseInt(id.slice(0, 8), 16) % EXPORT_PORT_SPAN);
      let lastErr: unknown;
      for (let i = 0; i < 16; i++) {
        const port = EXPORT_PORT_BASE + ((base - EXPORT_PORT_BASE + i) % EXPORT_PORT_SPAN);
        try {
          await this.#exec.run(
            'qemu-storage-daemon',
            [
              // qemu-storage-daemon acts on its options in order: the NBD server before the exports.
              '--nbd-server',
              `addr.type=inet,addr.host=${host},addr.port=${port},max-connections=4`,
              ...args,
              '--pidfile',
              p.exportPid,
              '--daemonize',
            ],
            { timeoutMs: 30_000 },
          );
        } catch (err) {
          lastErr = err;
          if (err instanceof ExecError && /in use/i.test(err.stderr)) continue;
          throw err;
        }
        out = { host, port, disks, ...(rec.image ? { imageSha256: rec.image.sha256 } : {}) };
        await writeFile(p.exportInfo, `${JSON.stringify(out)}\n`, { mode: 0o600 });
        this.#log.info({ guest: id, host, port }, 'disks exported read-only over NBD');
        return;
      }
      throw lastErr;
    });
    return out!;
  }

  // ---- volumes (Cinder attachments): hot-plug over QMP, guest.json for the next boot ----

  async attachVolume(id: string, att: VolumeAttachmentSpec): Promise<AttachedVolume> {
    const problem = attachmentProblem(att);
    if (problem) throw new DriverError('attachVolume', id, `attachVolume: ${problem}`);
    let out!: AttachedVolume;
    await this.#op('attachVolume', id, async (rec, live) => {
      const c = att.connection;
      const root = rec.spec.rootVolume;
      if (root?.connection.volumeId === c.volumeId) {
        out = {
          volumeId: c.volumeId,
          serial: root.connection.serial,
          bus: root.bus,
          device: volumeNames(root.connection.serial).device,
        };
        return;
      }
      const p = this.paths(id);
      const entry = (rec.volumes ?? []).find((v) => v.connection.volumeId === c.volumeId);
      const other = (rec.volumes ?? []).find(
        (v) => v.connection.volumeId !== c.volumeId && v.connection.serial === c.serial,
      );
      if (other)
        throw new DriverError(
          'attachVolume',
          id,
          `attachVolume: serial ${c.serial} is used by volume ${other.connection.volumeId}`,
        );
      if (!live) {
        // A saved state restores only onto the same devices: no change while suspended.
        if (rec.suspended) throw new InvalidGuestStateError('attachVolume', id, 'SUSPENDED');
        if (!entry || entry.pending) {
          const volumes = [...(rec.volumes ?? []).filter((v) => v !== entry), recordedVolume(att)];
          if (!bootVolumesOf({ ...rec, volumes }).fits) {
            throw new DriverError(
              'attachVolume',
              id,
              `attachVolume: guest ${id} has no PCI slot left for another virtio volume; attach it on the scsi bus`,
            );
          }
          rec.volumes = volumes;
          await writeRecord(p.record, rec);
        }
        const v = entry ?? recordedVolume(att);
        out = {
          volumeId: c.volumeId,
          serial: v.connection.serial,
          bus: v.bus,
          device: volumeNames(v.connection.serial).device,
        };
        return;
      }
      const n = volumeNames((entry ?? att).connection.serial);
      const devices = await peripherals(live.qmp);
      if (devices.has(n.device)) {
        // Already plugged (a repeat, or a crash between device_add and guest.json): the record follows QEMU.
        if (!entry || entry.pending) {
          const kept = entry ?? recordedVolume(att);
          delete kept.pending;
          rec.volumes = [...(rec.volumes ?? []).filter((v) => v !== entry), kept];
          await writeRecord(p.record, rec);
        }
        const bus = devices.get(n.device) === 'scsi-hd' ? 'scsi' : 'virtio';
        out = { volumeId: c.volumeId, serial: n.device.slice(1), bus, device: n.device };
        const size = (await blockSizes(live.qmp)).get(n.device.slice(1));
        if (size !== undefined) out.sizeBytes = size;
        return;
      }
      // Intent first: a crash from here on leaves an entry the retried attach completes (or the next boot plugs).
      const want: RecordedVolume = { ...recordedVolume(att), pending: 'attach' };
      rec.volumes = [...(rec.volumes ?? []).filter((v) => v !== entry), want];
      await writeRecord(p.record, rec);
      // Leftovers of an attach interrupted before its device (objects, nodes): removed, then done again once.
      await this.#unplugNodes(live, want);
      const slot = await freeSlot(live.qmp, att.bus, devices);
      if (!slot) {
        rec.volumes = rec.volumes.filter((v) => v !== want);
        await writeRecord(p.record, rec);
        throw new DriverError(
          'attachVolume',
          id,
          `attachVolume: no free PCIe root port for a virtio volume in guest ${id} (ports are made at boot); attach it on the scsi bus or power the guest off and on`,
        );
      }
      try {
        for (const o of c.objects ?? []) await live.qmp.execute('object-add', o);
        await live.qmp.execute('object-add', throttleGroupObject(c.serial, att.qos));
        await live.qmp.execute('blockdev-add', volumeBlockdev(c, rec.cache));
        await live.qmp.execute('blockdev-add', throttleBlockdev(c.serial, c.readOnly ?? false));
        crashPoint('attach:after-blockdev');
        await live.qmp.execute('device_add', volumeDevice(c.serial, slot, att.bootIndex));
        crashPoint('attach:after-device');
      } catch (err) {
        await this.#unplugNodes(live, want).catch((e: unknown) =>
          this.#log.warn({ err: e, guest: id, volume: c.volumeId }, 'cleaning a failed attach failed'),
        );
        rec.volumes = rec.volumes.filter((v) => v !== want);
        await writeRecord(p.record, rec);
        throw new DriverError('attachVolume', id, `attachVolume: volume ${c.volumeId}: ${errMsg(err)}`, { cause: err });
      }
      delete want.pending;
      await writeRecord(p.record, rec);
      out = { volumeId: c.volumeId, serial: c.serial, bus: att.bus, device: n.device };
      const size = (await blockSizes(live.qmp)).get(c.serial);
      if (size !== undefined) out.sizeBytes = size;
      this.#log.info({ guest: id, volume: c.volumeId, bus: att.bus, slot }, 'volume attached');
    });
    return out;
  }

  async detachVolume(id: string, volumeId: string): Promise<void> {
    this.#ready();
    if (!GuestId.safeParse(id).success) return;
    await this.#withLock(id, async () => {
      const p = this.paths(id);
      const rec = await readRecord(p.record);
      if (!rec) return; // no guest: nothing attached
      if (rec.spec.rootVolume?.connection.volumeId === volumeId) {
        throw new DriverError('detachVolume', id, `detachVolume: volume ${volumeId} is the root disk of guest ${id}`);
      }
      const entry = (rec.volumes ?? []).find((v) => v.connection.volumeId === volumeId);
      const serial = entry?.connection.serial ?? volumeSerial(volumeId);
      const proc = await guestProcess(this.#proc, p.pidFile, id);
      const live = proc.kind === 'running' ? await this.#liveOf(id, proc.pid) : undefined;
      if (proc.kind === 'running' && !live) {
        throw new DriverError('detachVolume', id, `detachVolume: guest ${id} runs but its QMP socket does not answer`);
      }
      if (live) {
        if (!entry && !SERIAL_RE.test(serial)) return;
        if (entry && entry.pending !== 'detach') {
          entry.pending = 'detach'; // the next boot leaves it out, whatever happens now
          await writeRecord(p.record, rec);
        }
        try {
          await this.#unplug(live, serial);
          crashPoint('detach:after-device-del');
          await this.#unplugNodes(live, entry ?? { connection: { serial } });
        } catch (err) {
          if (err instanceof DriverError) throw err;
          throw new DriverError('detachVolume', id, `detachVolume: volume ${volumeId}: ${errMsg(err)}`, { cause: err });
        }
      } else if (rec.suspended && entry) {
        throw new InvalidGuestStateError('detachVolume', id, 'SUSPENDED');
      }
      if (entry) {
        rec.volumes = (rec.volumes ?? []).filter((v) => v !== entry);
        await writeRecord(p.record, rec);
        this.#log.info({ guest: id, volume: volumeId }, 'volume detached');
      }
    });
  }

  /**
   * device_del and the DEVICE_DELETED event of that device (the first event may be its virtio-backend's, storage.md
   * §1.3). A guest that does not release it in time is a DriverError: the unplug stays requested, nothing else is
   * removed, the caller retries.
   */
  async #unplug(live: Live, serial: string): Promise<void> {
    const dev = volumeNames(serial).device;
    if (!(await peripherals(live.qmp)).has(dev)) return;
    const timeoutMs = this.#o.volumeDetachTimeoutMs ?? 30_000;
    const deleted = live.qmp.waitForEvent('DEVICE_DELETED', { timeoutMs, predicate: (e) => e.data.device === dev });
    deleted.catch(() => {});
    try {
      await live.qmp.execute('device_del', { id: dev });
    } catch (err) {
      // Gone meanwhile; a second request for a pending unplug is refused by some QEMUs (7.2 answers {}).
      if (!(err instanceof QmpError) || !/not found|already in the process of unplug/i.test(err.desc)) throw err;
    }
    this.#log.debug({ guest: live.id, device: dev, timeoutMs }, 'unplug requested; waiting for DEVICE_DELETED');
    try {
      await deleted;
    } catch (err) {
      if (!(await peripherals(live.qmp)).has(dev)) return;
      throw new DriverError(
        'detachVolume',
        live.id,
        `detachVolume: guest ${live.id} did not release device ${dev} within ${timeoutMs} ms (unplug requested; retry)`,
        { cause: err },
      );
    }
  }

  /** Removes what a volume added besides its device (throttle filter, its tree, group, connection objects), if there. */
  async #unplugNodes(
    live: Live,
    v: { connection: { serial: string; objects?: Record<string, unknown>[] } },
  ): Promise<void> {
    const n = volumeNames(v.connection.serial);
    let nodes = await nodeNames(live.qmp);
    for (const node of [n.throttle, n.node, n.file]) {
      if (!nodes.has(node)) continue;
      await live.qmp.execute('blockdev-del', { 'node-name': node });
      nodes = await nodeNames(live.qmp); // a node's inline children go with it
    }
    const objects = await qomChildren(live.qmp, '/objects');
    const ids = [n.group, ...(v.connection.objects ?? []).map((o) => String(o.id))];
    for (const objId of ids) if (objects.has(objId)) await live.qmp.execute('object-del', { id: objId });
  }

  async volumes(id: string): Promise<AttachedVolume[]> {
    this.#ready();
    if (!GuestId.safeParse(id).success) return [];
    return this.#withLock(id, async () => {
      const p = this.paths(id);
      const rec = await readRecord(p.record);
      if (!rec) return [];
      const known = [...(rec.spec.rootVolume ? [rec.spec.rootVolume] : []), ...(rec.volumes ?? [])];
      const proc = await guestProcess(this.#proc, p.pidFile, id);
      const live = proc.kind === 'running' ? await this.#liveOf(id, proc.pid) : undefined;
      if (proc.kind === 'running' && !live) {
        throw new DriverError('attachVolume', id, `volumes: guest ${id} runs but its QMP socket does not answer`);
      }
      if (!live) {
        return known
          .filter((v) => v.pending !== 'detach')
          .map((v) => ({
            volumeId: v.connection.volumeId,
            serial: v.connection.serial,
            bus: v.bus,
            device: volumeNames(v.connection.serial).device,
          }));
      }
      // Running: what QEMU has plugged (d<serial> devices), named by the record, sized by QEMU.
      const devices = await peripherals(live.qmp);
      // An attach or detach cut short (the agent killed, a guest releasing its device after detachVolume gave up) is
      // finished here, under the guest's lock: no attachVolume/detachVolume runs, so a pending entry is a leftover.
      // A device that is there is attached (the record follows QEMU); one that is not: its nodes and objects go (an
      // interrupted attach is rolled back, the attacher attaches it again if it is still wanted).
      const cut = (rec.volumes ?? []).filter((v) => v.pending);
      for (const v of cut) {
        if (devices.has(volumeNames(v.connection.serial).device)) {
          if (v.pending === 'attach') delete v.pending;
        } else await this.#unplugNodes(live, v);
      }
      if (cut.length > 0) {
        rec.volumes = (rec.volumes ?? []).filter(
          (v) => !v.pending || devices.has(volumeNames(v.connection.serial).device),
        );
        await writeRecord(p.record, rec);
        known.splice(0, known.length, ...(rec.spec.rootVolume ? [rec.spec.rootVolume] : []), ...rec.volumes);
      }
      const sizes = await blockSizes(live.qmp);
      const out: AttachedVolume[] = [];
      for (const [dev, type] of devices) {
        const serial = serialOfDevice(dev);
        if (!serial || !/^(virtio-blk-pci|scsi-hd)$/.test(type)) continue;
        const v = known.find((k) => k.connection.serial === serial);
        const size = sizes.get(serial);
        out.push({
          volumeId: v?.connection.volumeId ?? serial,
          serial,
          bus: type === 'scsi-hd' ? 'scsi' : 'virtio',
          device: dev,
          ...(size !== undefined ? { sizeBytes: size } : {}),
        });
      }
      return out.sort(
        (a, b) =>
          known.findIndex((k) => k.connection.serial === a.serial) -
          known.findIndex((k) => k.connection.serial === b.serial),
      );
    });
  }

  async extendVolume(id: string, volumeId: string, sizeBytes: number): Promise<void> {
    await this.#op('extendVolume', id, async (rec, live) => {
      const v = this.#attached(rec, volumeId, 'extendVolume');
      if (!live) return; // QEMU reads the size when it opens the volume
      const serial = v.connection.serial;
      const current = (await blockSizes(live.qmp)).get(serial);
      if (current === undefined)
        throw new DriverError('extendVolume', id, `extendVolume: volume ${volumeId} is not plugged in guest ${id}`);
      if (current >= sizeBytes) return;
      // On the top node (the throttle filter): resizing the node under it would not change the size the filter, and
      // so the device and the guest, see (QEMU 7.2, verified).
      await live.qmp.execute('block_resize', { 'node-name': volumeNames(serial).throttle, size: sizeBytes });
      this.#log.info({ guest: id, volume: volumeId, from: current, to: sizeBytes }, 'volume extended');
    });
  }

  async setVolumeQos(id: string, volumeId: string, qos: VolumeQos): Promise<void> {
    await this.#op('setVolumeQos', id, async (rec, live) => {
      const v = this.#attached(rec, volumeId, 'setVolumeQos');
      if (live) {
        const group = volumeNames(v.connection.serial).group;
        if ((await qomChildren(live.qmp, '/objects')).has(group)) {
          await live.qmp.execute('qom-set', {
            path: `/objects/${group}`,
            property: 'limits',
            value: throttleLimits(qos),
          });
        }
      }
      const empty = Object.values(qos).every((x) => !x);
      if (empty) delete v.qos;
      else v.qos = { ...qos };
      await writeRecord(this.paths(id).record, rec);
    });
  }

  /** The recorded attachment of a volume (root or not), or a DriverError naming the operation. */
  #attached(rec: GuestRecord, volumeId: string, op: DriverOp): RecordedVolume {
    const root = rec.spec.rootVolume;
    if (root?.connection.volumeId === volumeId) return root;
    const v = (rec.volumes ?? []).find((x) => x.connection.volumeId === volumeId && x.pending !== 'detach');
    if (!v) throw new DriverError(op, rec.spec.id, `${op}: volume ${volumeId} is not attached to guest ${rec.spec.id}`);
    return v;
  }

  /** Runs a QMP command on a running guest (tests and tools; not serialised with the driver's operations). */
  async qmpExecute(id: string, command: string, args?: Record<string, unknown>): Promise<unknown> {
    this.#ready();
    const proc = await guestProcess(this.#proc, this.paths(id).pidFile, id);
    if (proc.kind !== 'running') throw new Error(`guest ${id} does not run`);
    const live = await this.#liveOf(id, proc.pid);
    if (!live) throw new Error(`guest ${id}: QMP does not answer`);
    return live.qmp.execute(command, args);
  }

  async unexportDisks(id: string): Promise<void> {
    this.#ready();
    if (!GuestId.safeParse(id).success) return;
    await this.#withLock(id, () => this.#endExport(id));
  }

  async importDisks(spec: GuestSpec, from: DiskExport): Promise<GuestState> {
    const accel = this.#ready();
    const id = spec.id;
    if (!GuestId.safeParse(id).success) throw new DriverError('importDisks', id, `importDisks: ${id} is not a UUID`);
    return this.#withLock(id, async () => {
      const p = this.paths(id);
      const existing = await readRecord(p.record);
      if (existing) return this.#stateOf(id, existing);
      const nicProblem = nicsProblem(spec.nics ?? []);
      if (nicProblem) throw new DriverError('importDisks', id, `importDisks: ${nicProblem}`);
      const volumeProblem = volumesProblem(spec);
      if (volumeProblem) throw new DriverError('importDisks', id, `importDisks: ${volumeProblem}`);
      // Booting from a volume: only the ephemeral and swap disks are the guest's (the volume is reached where it is).
      if (!spec.imageSource && !spec.rootVolume) {
        throw new DriverError('importDisks', id, `importDisks: image ${spec.image} not found`);
      }
      const image = spec.rootVolume ? undefined : await this.#images!.ensure(spec.imageSource!);
      await rm(p.dir, { recursive: true, force: true });
      await mkdir(p.dir, { recursive: true, mode: 0o700 });
      try {
        const url = (name: string) => `nbd://${from.host}:${from.port}/${name}`;
        // The copy keeps the overlay on the image when this node's cached copy is the same image (sha256):
        // qemu-img convert -B writes only what differs from it; otherwise the copy is flattened.
        const rebase = image !== undefined && from.imageSha256 !== undefined && from.imageSha256 === image.sha256;
        if (image) await this.#pull(url(from.disks.root), p.root, rebase ? image : undefined);
        if (spec.disk.ephemeralGiB > 0) {
          if (from.disks.ephemeral) await this.#pull(url(from.disks.ephemeral), p.ephemeral, undefined);
          else await this.#images!.createBlankDisk({ path: p.ephemeral, sizeBytes: spec.disk.ephemeralGiB * GiB });
        }
        if (spec.disk.swapMiB > 0) {
          await this.#images!.createBlankDisk({ path: p.swap, sizeBytes: spec.disk.swapMiB * MiB });
        }
        let rootBytes = 0;
        if (image) {
          const { stdout } = await this.#exec.run('qemu-img', ['info', '--output=json', '-f', 'qcow2', p.root]);
          rootBytes = z.object({ 'virtual-size': z.int() }).parse(JSON.parse(stdout))['virtual-size'];
        }
        const rec = await this.#define(spec, image, rootBytes, accel);
        await writeRecord(p.record, rec);
        this.#log.info({ guest: id, from: `${from.host}:${from.port}`, rebase }, 'guest disks imported');
        return this.#stateOf(id, rec);
      } catch (err) {
        await rm(p.dir, { recursive: true, force: true });
        if (err instanceof DriverError || err instanceof ImageError) throw err;
        throw new DriverError('importDisks', id, `importDisks: ${errMsg(err)}`, { cause: err });
      }
    });
  }

  /** Copies an NBD export into a qcow2 file (over the backing image when given), through a temporary name. */
  async #pull(url: string, path: string, backing: CachedImage | undefined): Promise<void> {
    const tmp = `${path}.part`;
    await rm(tmp, { force: true });
    const args = ['convert', '-q', '-f', 'raw', '-O', 'qcow2'];
    if (backing) args.push('-B', backing.path, '-F', backing.format);
    // Runs in the node's network namespace (the source's host IP is reachable there).
    await this.#exec.run('qemu-img', [...args, url, tmp], { timeoutMs: 6 * 3600_000 });
    await rename(tmp, path);
  }

  /** The export this guest serves now (its qemu-storage-daemon alive), if any. */
  async #exportServed(id: string): Promise<DiskExport | undefined> {
    const p = this.paths(id);
    const pid = await this.#exportPid(id);
    if (pid === undefined) return undefined;
    const text = await readFile(p.exportInfo, 'utf8').catch(() => undefined);
    if (!text) return undefined;
    return JSON.parse(text) as DiskExport;
  }

  /** pid of this guest's live qemu-storage-daemon (its command line names the guest's pid file). */
  async #exportPid(id: string): Promise<number | undefined> {
    const p = this.paths(id);
    const pid = Number((await this.#proc.readPidFile(p.exportPid))?.trim());
    if (!Number.isInteger(pid) || pid <= 0) return undefined;
    const argv = await this.#proc.cmdline(pid);
    if (!argv?.some((a) => a.endsWith('qemu-storage-daemon')) || !argv.includes(p.exportPid)) return undefined;
    return pid;
  }

  /** Stops this guest's export (SIGTERM, then SIGKILL) and removes its files. */
  async #endExport(id: string): Promise<void> {
    const p = this.paths(id);
    const pid = await this.#exportPid(id);
    if (pid !== undefined) {
      try {
        process.kill(pid, 'SIGTERM');
      } catch {
        // gone meanwhile
      }
      for (let i = 0; i < 100 && (await this.#exportPid(id)) !== undefined; i++) await sleep(50);
      if ((await this.#exportPid(id)) !== undefined) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // gone meanwhile
        }
      }
      this.#log.info({ guest: id, pid }, 'disk export ended');
    }
    await rm(p.exportPid, { force: true });
    await rm(p.exportInfo, { force: true });
  }

  // ---- state ----

  async state(id: string): Promise<GuestState | undefined> {
    if (!GuestId.safeParse(id).success) return undefined;
    const rec = await readRecord(this.paths(id).record).catch((err: unknown) => {
      this.#log.warn({ err, guest: id }, 'unreadable guest record');
      return undefined;
    });
    return rec && this.#stateOf(id, rec);
  }

  async list(): Promise<GuestInfo[]> {
    const out: GuestInfo[] = [];
    for (const id of await this.#guestIds()) {
      const rec = await readRecord(this.paths(id).record).catch(() => undefined);
      if (!rec) continue;
      const st = await this.#stateOf(id, rec);
      out.push({
        ...st,
        name: rec.spec.name,
        namespace: rec.spec.namespace,
        vcpus: rec.spec.vcpus,
        ramMiB: rec.spec.ramMiB,
        diskGiB: diskGiBOf(rec),
      });
    }
    return out;
  }

  // ---- internals ----

  #ready(): AcceleratorDecision {
    if (!this.#accel) throw new Error('qemu driver: init() has not run');
    return this.#accel;
  }

  #startTimeout(): number {
    return this.#o.startTimeoutMs ?? 120_000;
  }

  async #guestIds(): Promise<string[]> {
    let names: string[];
    try {
      names = await readdir(join(this.stateDir, GUESTS_DIR));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw err;
    }
    return names.filter((n) => GuestId.safeParse(n).success).sort();
  }

  async #withLock<T>(id: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.#locks.get(id) ?? Promise.resolve();
    let release!: () => void;
    const mine = new Promise<void>((resolve) => {
      release = resolve;
    });
    const chained = prev.then(() => mine);
    this.#locks.set(id, chained);
    await prev;
    try {
      return await fn();
    } finally {
      release();
      if (this.#locks.get(id) === chained) this.#locks.delete(id);
    }
  }

  /** Runs an operation on an existing guest under its lock, with its record and (if it runs) its QMP link. */
  async #op(op: DriverOp, id: string, fn: (rec: GuestRecord, live: Live | undefined) => Promise<void>): Promise<void> {
    this.#ready();
    if (!GuestId.safeParse(id).success) throw new GuestNotFoundError(op, id);
    await this.#withLock(id, async () => {
      const rec = await readRecord(this.paths(id).record);
      if (!rec) throw new GuestNotFoundError(op, id);
      const proc = await guestProcess(this.#proc, this.paths(id).pidFile, id);
      let live: Live | undefined;
      if (proc.kind === 'running') {
        live = await this.#liveOf(id, proc.pid);
        if (!live)
          throw new DriverError(op, id, `${op}: guest ${id} runs (pid ${proc.pid}) but its QMP socket does not answer`);
      }
      try {
        await fn(rec, live);
      } catch (err) {
        if (err instanceof DriverError) throw err;
        throw new DriverError(op, id, `${op}: ${errMsg(err)}`, { cause: err });
      }
    });
  }

  #stoppedState(rec: GuestRecord): 'SHUTDOWN' | 'CRASHED' | 'SUSPENDED' {
    if (rec.suspended) return 'SUSPENDED';
    return rec.lastExit?.powerState ?? 'SHUTDOWN';
  }

  async #stateOf(id: string, rec: GuestRecord): Promise<GuestState> {
    const p = this.paths(id);
    const proc = await guestProcess(this.#proc, p.pidFile, id);
    const stopped = (): GuestState => ({
      id,
      powerState: this.#stoppedState(rec),
      accelerator: rec.accelerator,
      ...(!rec.suspended && rec.lastExit?.powerState === 'CRASHED' ? { fault: rec.lastExit.reason } : {}),
    });
    if (proc.kind !== 'running') return stopped();
    const startedAt = await startedAtOf(p.pidFile);
    const base = { id, pid: proc.pid, ...(startedAt ? { startedAt } : {}), accelerator: rec.accelerator };
    const live = await this.#liveOf(id, proc.pid);
    let status: QmpStatus | undefined;
    if (live) status = await live.qmp.queryStatus({ timeoutMs: 10_000 }).catch(() => undefined);
    if (!status) {
      // Alive but not answering (another client holds the QMP socket, or QEMU is exiting): unknown.
      const again = await processOf(this.#proc, proc.pid, id);
      if (again.kind !== 'running') return stopped();
      return { ...base, powerState: 'NOSTATE' };
    }
    if (CRASHED_STATUSES.has(status.status) && live) {
      const fault = await this.#crashReason(id, status.status, live.panic);
      // End it (under the guest's lock, which the caller may hold: not awaited here); reported as a GuestExit.
      void this.#endCrashed(live, status.status);
      return { ...base, powerState: 'CRASHED', fault };
    }
    return { ...base, powerState: status.powerState };
  }

  /** Why a guest crashed while its QEMU stays alive, for the fault. */
  async #crashReason(id: string, status: string, panic?: Record<string, unknown>): Promise<string> {
    if (status === 'guest-panicked') {
      return `the guest kernel panicked (QEMU status guest-panicked${panic ? `, ${JSON.stringify(panic).slice(0, 300)}` : ''})`;
    }
    const log = await readFile(this.paths(id).qemuLog, 'utf8').catch(() => '');
    const detail = crashDetail(log.slice(-16_384));
    return `QEMU stopped the guest with status ${status}${detail ? `: ${detail}` : ''}`;
  }

  /**
   * A guest stopped in a crashed state while QEMU stays alive: record why, end QEMU and report a CRASHED exit (so
   * the Server shows the fault and, with spec.powerState Running, is started again on a fresh QEMU).
   */
  async #endCrashed(live: Live, status: string): Promise<void> {
    if (live.crashing || live.expectExit || this.#closed) return;
    live.crashing = true;
    const reason = await this.#crashReason(live.id, status, live.panic);
    const exit: GuestExit = { id: live.id, powerState: 'CRASHED', at: isoNow(), reason };
    let ended = false;
    await this.#withLock(live.id, async () => {
      if (live.expectExit || this.#live.get(live.id) !== live) return; // an operation got there first
      const s = await live.qmp.queryStatus({ timeoutMs: 10_000 }).catch(() => undefined);
      if (s && !CRASHED_STATUSES.has(s.status)) return; // reset meanwhile
      const p = this.paths(live.id);
      const rec = await readRecord(p.record).catch(() => undefined);
      if (!rec) return;
      await this.#stop(live, { graceful: false, timeoutMs: 0 });
      rec.lastExit = { powerState: 'CRASHED', reason: exit.reason.slice(0, 1000), at: exit.at };
      await writeRecord(p.record, rec);
      ended = true;
    }).catch((err: unknown) => this.#log.warn({ err, guest: live.id }, 'cannot end the crashed guest'));
    live.crashing = false;
    if (!ended || this.#closed) return;
    this.#log.warn({ guest: live.id, pid: live.pid, reason }, 'guest crashed; its QEMU was ended');
    this.#notifyExit(exit);
  }

  /** The QMP link of a running guest, connecting (adopting) if needed; undefined if QMP does not answer. */
  async #liveOf(id: string, pid: number): Promise<Live | undefined> {
    const live = this.#live.get(id);
    if (live && live.pid === pid && !live.qmp.closed) return live;
    return this.#attach(id, pid);
  }

  /** Connects to a guest's QMP socket, sharing an attempt already under way (QEMU serves one client at a time). */
  #attach(id: string, pid: number, timeoutMs = 5_000, logFailure = true): Promise<Live | undefined> {
    const pending = this.#attaching.get(id);
    if (pending) return pending;
    const attempt = this.#connect(id, pid, timeoutMs, logFailure).finally(() => this.#attaching.delete(id));
    this.#attaching.set(id, attempt);
    return attempt;
  }

  async #connect(id: string, pid: number, timeoutMs = 5_000, logFailure = true): Promise<Live | undefined> {
    if (this.#closed) return undefined;
    const existing = this.#live.get(id);
    if (existing && existing.pid === pid && !existing.qmp.closed) return existing;
    let markGone!: () => void;
    const gone = new Promise<void>((resolve) => {
      markGone = resolve;
    });
    const qmp = new QmpClient({ commandTimeoutMs: 30_000 });
    const live: Live = {
      id,
      pid,
      qmp,
      expectExit: false,
      detached: false,
      shutdown: undefined,
      gone,
      markGone,
    };
    qmp.on('event', (e) => this.#onEvent(live, e));
    try {
      await qmp.connect(this.paths(id).qmpSocket, { timeoutMs });
    } catch (err) {
      if (logFailure) this.#log.warn({ guest: id, pid, err: errMsg(err) }, 'cannot connect to the guest QMP socket');
      else this.#log.debug({ guest: id, pid, err: errMsg(err) }, 'QMP socket not ready yet');
      return undefined;
    }
    qmp.once('close', () => void this.#onClose(live));
    this.#live.set(id, live);
    return live;
  }

  #onEvent(live: Live, e: QmpEvent): void {
    if (e.event === 'SHUTDOWN') {
      live.shutdown = { guest: e.data.guest === true, reason: String(e.data.reason ?? '') };
    }
    if (['SHUTDOWN', 'RESET', 'STOP', 'RESUME', 'GUEST_PANICKED', 'SUSPEND', 'WAKEUP'].includes(e.event)) {
      this.#log.debug({ guest: live.id, event: e.event, data: e.data }, 'qmp event');
    }
    if (e.event === 'GUEST_PANICKED') live.panic = e.data;
    if (e.event === 'STOP' || e.event === 'GUEST_PANICKED') {
      // A KVM internal error or a guest panic stops the VM with QEMU alive: find out which stop this was.
      void live.qmp
        .queryStatus({ timeoutMs: 10_000 })
        .then((s) => (CRASHED_STATUSES.has(s.status) ? this.#endCrashed(live, s.status) : undefined))
        .catch(() => {});
    }
  }

  #notifyExit(exit: GuestExit): void {
    for (const l of [...this.#listeners]) {
      try {
        l(exit);
      } catch (err) {
        this.#log.warn({ err }, 'guest exit listener failed');
      }
    }
  }

  /** The QMP connection ended: QEMU exited (or is exiting), or the driver detached. */
  async #onClose(live: Live): Promise<void> {
    if (live.detached) return;
    const dead = await this.#waitDead(live.id, live.pid, 15_000);
    if (this.#live.get(live.id) === live) this.#live.delete(live.id);
    if (!dead) {
      this.#log.warn({ guest: live.id, pid: live.pid }, 'QMP connection lost but QEMU still runs; will reconnect');
      return;
    }
    live.markGone();
    if (live.expectExit || this.#closed) return;
    const guestShutdown = live.shutdown?.guest === true && live.shutdown.reason === 'guest-shutdown';
    const detail = guestShutdown
      ? undefined
      : crashDetail((await readFile(this.paths(live.id).qemuLog, 'utf8').catch(() => '')).slice(-16_384));
    const exit: GuestExit = {
      id: live.id,
      powerState: guestShutdown ? 'SHUTDOWN' : 'CRASHED',
      at: isoNow(),
      reason: guestShutdown ? 'guest-shutdown' : detail ? `crash: ${detail}` : 'crash',
    };
    let unexpected = true;
    await this.#withLock(live.id, async () => {
      // An operation holding the lock may have been ending this process itself (a failed start-up).
      if (live.expectExit) {
        unexpected = false;
        return;
      }
      const p = this.paths(live.id);
      const rec = await readRecord(p.record).catch(() => undefined);
      if (!rec) return;
      const now = await guestProcess(this.#proc, p.pidFile, live.id);
      if (now.kind === 'running') return; // started again meanwhile
      rec.lastExit = { powerState: exit.powerState, reason: exit.reason, at: exit.at };
      await writeRecord(p.record, rec);
    }).catch((err: unknown) => this.#log.warn({ err, guest: live.id }, 'cannot record the guest exit'));
    if (!unexpected || this.#closed) return;
    this.#log.warn({ guest: live.id, pid: live.pid, ...exit, qmpShutdown: live.shutdown }, 'guest exited on its own');
    this.#notifyExit(exit);
  }

  async #waitDead(id: string, pid: number, timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if ((await processOf(this.#proc, pid, id)).kind !== 'running') return true;
      if (Date.now() >= deadline) return false;
      await sleep(50);
    }
  }

  /** Ends a running QEMU: ACPI power button first when graceful, then quit, then SIGKILL. */
  async #stop(live: Live, opts: PowerOffOptions): Promise<void> {
    live.expectExit = true;
    if (opts.graceful) {
      const s = await live.qmp.queryStatus().catch(() => undefined);
      if (s?.powerState === 'RUNNING') {
        await live.qmp.powerdown().catch(() => {});
        if (await settles(live.gone, opts.timeoutMs)) return;
        this.#log.info({ guest: live.id, timeoutMs: opts.timeoutMs }, 'guest ignored the power button; forcing it off');
      }
    }
    if (!live.qmp.closed) await live.qmp.quit({ timeoutMs: 5_000 }).catch(() => {});
    if (await settles(live.gone, 15_000)) return;
    if ((await processOf(this.#proc, live.pid, live.id)).kind === 'running') {
      this.#log.warn({ guest: live.id, pid: live.pid }, 'QEMU did not quit; killing it');
      try {
        process.kill(live.pid, 'SIGKILL');
      } catch {
        // gone meanwhile
      }
    }
    if (!(await this.#waitDead(live.id, live.pid, 15_000))) {
      throw new Error(`QEMU (pid ${live.pid}) does not exit`);
    }
    live.markGone();
  }

  /** Stops whatever QEMU runs for this guest, connected or not (destroy, failed spawn). */
  async #kill(id: string): Promise<void> {
    const proc = await guestProcess(this.#proc, this.paths(id).pidFile, id);
    const live = this.#live.get(id);
    if (live && !live.qmp.closed && (proc.kind !== 'running' || live.pid === proc.pid)) {
      await this.#stop(live, { graceful: false, timeoutMs: 0 });
      return;
    }
    if (proc.kind !== 'running') return;
    if (live) live.expectExit = true;
    try {
      process.kill(proc.pid, 'SIGKILL');
    } catch {
      // gone meanwhile
    }
    if (!(await this.#waitDead(id, proc.pid, 15_000))) throw new Error(`QEMU (pid ${proc.pid}) does not exit`);
  }

  /** Starts a stopped guest (from its definition, or restoring a saved state) and clears its last exit. */
  async #start(op: DriverOp, rec: GuestRecord, o: { restore?: string } = {}): Promise<void> {
    if (rec.lastExit) {
      delete rec.lastExit;
      await writeRecord(this.paths(rec.spec.id).record, rec);
    }
    await this.#launch(op, rec, o);
  }

  /**
   * With --qemu-user, the guest directory and the files QEMU uses (disks, seeds, console log) belong to that user and
   * are readable by it alone (0700/0600); guest.json and qemu.log stay root's. Before every start, so guests made
   * before the option was set are brought in line too.
   */
  async #own(rec: GuestRecord): Promise<void> {
    const u = this.#runAs;
    if (!u) return;
    const p = this.paths(rec.spec.id);
    await chown(p.dir, u.uid, u.gid);
    await chmod(p.dir, 0o700);
    // The console log is created here, so QEMU (root until it drops) never makes it world-readable.
    await (await open(p.consoleLog, 'a', 0o600)).close();
    const d = rec.disks;
    for (const f of [d.root, d.ephemeral, d.swap, d.seed, d.configDrive, p.consoleLog]) {
      if (!f) continue;
      await chown(f, u.uid, u.gid);
      await chmod(f, 0o600);
    }
  }

  /** Starts QEMU for a guest and waits until it runs. Never starts a second QEMU for the same guest. */
  async #launch(op: DriverOp, rec: GuestRecord, o: { restore?: string } = {}): Promise<Live> {
    const id = rec.spec.id;
    const p = this.paths(id);
    const unlock = await acquireLaunchLock(p.launchLock, this.#proc);
    try {
      const before = await guestProcess(this.#proc, p.pidFile, id);
      if (before.kind === 'running') {
        // Someone (another agent instance) started it meanwhile: adopt, never start a second QEMU.
        const live = await this.#liveOf(id, before.pid);
        if (live) return live;
        throw new DriverError(op, id, `${op}: guest ${id} already runs (pid ${before.pid})`);
      }
      await this.#checkTaps(op, rec);
      if ((rec.volumes ?? []).some((v) => v.pending)) {
        // Attaches and detaches cut short while the guest ran: the next boot has what was asked for last.
        rec.volumes = (rec.volumes ?? []).filter((v) => v.pending !== 'detach');
        for (const v of rec.volumes) delete v.pending;
        await writeRecord(p.record, rec);
      }
      for (const f of [p.qmpSocket, p.consoleSocket, p.vncSocket, p.migrateSocket, p.pidFile]) {
        await rm(f, { force: true });
      }
      await this.#own(rec);
      const args = qemuArgs({
        name: qemuName(rec.spec),
        uuid: id,
        accelerator: rec.accelerator,
        vcpus: rec.spec.vcpus,
        memoryMiB: rec.spec.ramMiB,
        qmpSocket: p.qmpSocket,
        ...(this.#o.vnc === false ? {} : { vncSocket: p.vncSocket }),
        serial: { socket: p.consoleSocket, log: p.consoleLog },
        pidFile: p.pidFile,
        ...(this.#runAs ? { runAs: `${this.#runAs.uid}:${this.#runAs.gid}` } : {}),
        disks: disksOf(rec),
        nics: nicsOf(rec, { vhost: this.#o.vhostNet ?? false }),
        scsiController: true,
        ...(({ volumes, rootPorts }) => ({ volumes, rootPorts }))(bootVolumesOf(rec)),
        ...(o.restore ? { incoming: 'defer' } : {}),
      });
      const started = Date.now();
      const launched = await this.#launcher!.launch({
        id,
        name: rec.spec.name,
        namespace: rec.spec.namespace,
        binary: this.#qemu,
        args,
        dir: p.dir,
        logFile: p.qemuLog,
        ...(this.#o.netns !== undefined ? { netns: this.#o.netns } : {}),
        memoryMiB: rec.spec.ramMiB,
        accelerator: rec.accelerator,
      });
      let live: Live | undefined;
      try {
        const pid = await this.#waitStarted(p, id, launched);
        live = await this.#attachStarted(id, pid, 10_000);
        if (!live) throw new Error(`QEMU (pid ${pid}) started but its QMP socket does not answer`);
        if (o.restore) await this.#restore(live, o.restore);
        const s = await live.qmp.queryStatus();
        if (s.powerState !== 'RUNNING') throw new Error(`QEMU started but the guest is ${s.status}`);
        this.#log.info({ guest: id, pid, ms: Date.now() - started, op }, 'QEMU started');
        return live;
      } catch (err) {
        if (live) live.expectExit = true;
        await this.#kill(id).catch(() => {});
        const log = await tail(p.qemuLog);
        throw new DriverError(op, id, `${op}: starting QEMU failed: ${errMsg(err)}${log ? `; qemu: ${log}` : ''}`, {
          cause: err,
        });
      }
    } finally {
      await unlock();
    }
  }

  /**
   * Fails unless every NIC's tap exists (in the driver's network namespace) and is a tap: QEMU running as root would
   * create a missing one itself, unplugged, and the guest would run without network.
   */
  async #checkTaps(op: DriverOp, rec: GuestRecord): Promise<void> {
    const where = this.#o.netns !== undefined ? ` in network namespace ${this.#o.netns}` : '';
    const problems = await Promise.all(
      (rec.spec.nics ?? []).map(async (n) => {
        let out: string;
        try {
          out = (await this.#exec.run('ip', ['-d', '-j', 'link', 'show', 'dev', n.device])).stdout;
        } catch (err) {
          if (err instanceof ExecError && /does not exist/i.test(err.stderr)) {
            return `tap ${n.device} does not exist${where} (the port is not wired on this node)`;
          }
          return `cannot inspect tap ${n.device}${where}: ${errMsg(err)}`;
        }
        return tapProblem(out, n.device, where);
      }),
    );
    const bad = problems.filter((x) => x !== undefined);
    if (bad.length > 0) throw new DriverError(op, rec.spec.id, `${op}: ${bad.join('; ')}`);
  }

  /** Waits for the pid file and the QMP socket; fails fast when a direct child exits. */
  async #waitStarted(p: GuestPaths, id: string, launched: Launched): Promise<number> {
    const deadline = Date.now() + this.#startTimeout();
    let exit: { code: number | null; signal: NodeJS.Signals | null } | undefined;
    void launched.exited?.then((e) => {
      exit = e;
    });
    let nextPoll = Date.now() + 500;
    for (;;) {
      const proc: GuestProcess = await guestProcess(this.#proc, p.pidFile, id);
      if (proc.kind === 'running' && (await isSocket(p.qmpSocket))) return proc.pid;
      if (exit) throw new Error(`QEMU exited during start-up (${exit.code ?? exit.signal})`);
      if (launched.ended && Date.now() >= nextPoll) {
        nextPoll = Date.now() + 1000;
        const why = await launched.ended();
        if (why) throw new Error(`QEMU exited during start-up: ${why}`);
      }
      if (Date.now() >= deadline) throw new Error(`QEMU did not come up within ${this.#startTimeout()} ms`);
      await sleep(25);
    }
  }

  /**
   * Connects to a QEMU that just started. Retries for up to `timeoutMs` while it lives: QEMU writes its pid file
   * before it creates the QMP socket, and binds the socket before it listens, so a connect in between is refused
   * (seen under load with several guests starting at once).
   */
  async #attachStarted(id: string, pid: number, timeoutMs: number): Promise<Live | undefined> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const last = Date.now() + 100 >= deadline;
      const live = await this.#attach(id, pid, Math.max(1_000, deadline - Date.now()), last);
      if (live || last || this.#closed) return live;
      if ((await processOf(this.#proc, pid, id)).kind !== 'running') return undefined;
      await sleep(100);
    }
  }

  /** Feeds a saved state into a QEMU started with -incoming defer, then lets the guest run. */
  async #restore(live: Live, stateFile: string): Promise<void> {
    const p = this.paths(live.id);
    await live.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    const done = live.qmp.waitForEvent('MIGRATION', {
      timeoutMs: this.#startTimeout(),
      predicate: (e) => ['completed', 'failed', 'cancelled'].includes(String(e.data.status)),
    });
    await live.qmp.execute('migrate-incoming', { uri: `unix:${p.migrateSocket}` });
    const sock = netConnect({ path: p.migrateSocket });
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', () => resolve());
      sock.once('error', reject);
    });
    try {
      const [ev] = await Promise.all([done, pipeline(createReadStream(stateFile), sock)]);
      if (ev.data.status !== 'completed') throw new Error(`restoring the saved state: migration ${ev.data.status}`);
    } finally {
      sock.destroy();
      await rm(p.migrateSocket, { force: true });
    }
    const s = await live.qmp.queryStatus();
    if (s.status !== 'running') await live.qmp.cont();
  }
}

function recordedSpec(spec: GuestSpec): RecordedSpec {
  const { id, name, namespace, vcpus, ramMiB, disk, annotations } = spec;
  return {
    id,
    name,
    namespace,
    vcpus,
    ramMiB,
    disk: { ...disk },
    annotations: { ...annotations },
    ...(spec.image !== undefined ? { image: spec.image } : {}),
    ...(spec.imageSource ? { imageSource: { ...spec.imageSource } } : {}),
    ...(spec.userData !== undefined ? { userData: spec.userData } : {}),
    ...(spec.keyPair ? { keyPair: { ...spec.keyPair } } : {}),
    ...(spec.hostname !== undefined ? { hostname: spec.hostname } : {}),
    ...(spec.configDrive !== undefined ? { configDrive: spec.configDrive } : {}),
    ...(spec.metadata ? { metadata: { ...spec.metadata } } : {}),
    ...(spec.accelerator ? { accelerator: spec.accelerator } : {}),
    ...(spec.nics && spec.nics.length > 0 ? { nics: spec.nics.map((n) => RecordedNic.parse(n)) } : {}),
    ...(spec.rootVolume ? { rootVolume: recordedVolume(spec.rootVolume) } : {}),
  };
}

/** A volume attachment as guest.json keeps it. */
function recordedVolume(att: VolumeAttachmentSpec): RecordedVolume {
  const c = att.connection;
  return RecordedVolume.parse({
    connection: {
      volumeId: c.volumeId,
      serial: c.serial,
      blockdev: c.blockdev,
      ...(c.objects ? { objects: c.objects } : {}),
      ...(c.readOnly !== undefined ? { readOnly: c.readOnly } : {}),
    },
    bus: att.bus,
    ...(att.bootIndex !== undefined ? { bootIndex: att.bootIndex } : {}),
    ...(att.qos ? { qos: att.qos } : {}),
  });
}

/** Why an attachment cannot be plugged by this driver (its serial is no node name, ...), or undefined. */
export function attachmentProblem(att: VolumeAttachmentSpec): string | undefined {
  const c = att.connection;
  if (!SERIAL_RE.test(c.serial))
    return `volume ${c.volumeId}: serial ${JSON.stringify(c.serial)} is not 1-20 of [a-z0-9]`;
  if (att.bus !== 'virtio' && att.bus !== 'scsi') return `volume ${c.volumeId}: unknown bus ${String(att.bus)}`;
  for (const o of c.objects ?? []) {
    if (typeof o.id !== 'string' || typeof o['qom-type'] !== 'string') {
      return `volume ${c.volumeId}: connection objects need qom-type and id`;
    }
  }
  return undefined;
}

/** Why the volumes of a spec cannot be plugged (a bad attachment, one volume twice), or undefined. */
export function volumesProblem(spec: Pick<GuestSpec, 'rootVolume' | 'volumes'>): string | undefined {
  const all = [...(spec.rootVolume ? [spec.rootVolume] : []), ...(spec.volumes ?? [])];
  const serials = new Set<string>();
  for (const att of all) {
    const problem = attachmentProblem(att);
    if (problem) return problem;
    if (serials.has(att.connection.serial)) return `volume ${att.connection.volumeId} is attached twice`;
    serials.add(att.connection.serial);
  }
  return undefined;
}

/**
 * The volumes of a record as QEMU boots them: the root volume first, then the attached ones (slots assigned), and the
 * number of root ports. `fits` is false when its virtio volumes need more ports than pcie.0 has slots for.
 */
export function bootVolumesOf(rec: GuestRecord): { volumes: VolumeSpec[]; rootPorts: number; fits: boolean } {
  const out: VolumeSpec[] = [];
  let port = 0;
  let scsiId = 0;
  const spec = (v: RecordedVolume, slot: VolumeSpec['slot'], bootIndex?: number): VolumeSpec => ({
    serial: v.connection.serial,
    blockdev: v.connection.blockdev,
    objects: v.connection.objects ?? [],
    readOnly: v.connection.readOnly ?? false,
    cache: rec.cache,
    ...(v.qos ? { qos: v.qos as Record<string, number> } : {}),
    slot,
    ...(bootIndex !== undefined ? { bootIndex } : {}),
  });
  const root = rec.spec.rootVolume;
  if (root) {
    // The root disk: a virtio root volume sits on pcie.0 where root.qcow2 would (never unplugged), bootindex 0.
    out.push(
      spec(root, root.bus === 'scsi' ? { bus: 'scsi', scsiId: scsiId++ } : { bus: 'virtio', port: 'pcie.0' }, 0),
    );
  }
  for (const v of rec.volumes ?? []) {
    if (v.pending === 'detach') continue;
    out.push(
      spec(v, v.bus === 'scsi' ? { bus: 'scsi', scsiId: scsiId++ } : { bus: 'virtio', port: port++ }, v.bootIndex),
    );
  }
  // Spare ports for hot-plug, as many as pcie.0 has room for (NICs, disks, rng, controller, VGA take slots).
  const used =
    (rec.spec.nics?.length ?? 0) +
    disksOf(rec).filter((d) => d.media === 'disk').length +
    (root && root.bus !== 'scsi' ? 1 : 0) +
    3; /* rng, scsi0, VGA */
  const rootPorts = Math.max(port, Math.min(port + spareRootPorts(rec.spec.ramMiB), 30 - used));
  return { volumes: out, rootPorts, fits: port <= 30 - used };
}

/** Why a list of NICs cannot be plugged (invalid entry, a tap or MAC used twice), or undefined when it can. */
export function nicsProblem(nics: readonly unknown[]): string | undefined {
  const parsed = RecordedNic.array().max(16).safeParse(nics);
  if (!parsed.success) return `invalid nics: ${z.prettifyError(parsed.error)}`;
  const devices = new Set<string>();
  const macs = new Set<string>();
  for (const n of parsed.data) {
    if (devices.has(n.device)) return `invalid nics: tap ${n.device} is used twice`;
    if (macs.has(n.mac)) return `invalid nics: MAC ${n.mac} is used twice`;
    devices.add(n.device);
    macs.add(n.mac);
  }
  return undefined;
}

/**
 * What the seeds say about the NICs: everything but the host device, which names the config drive's link (Nova's
 * links[].id is the tap's name) unless the caller named it.
 */
export function seedNicsOf(nics: readonly (GuestNicInput & { device: string })[] | undefined): GuestNicInput[] {
  return (nics ?? []).map(({ device, ...n }) => ({ ...n, linkName: n.linkName ?? device }));
}

/** First PCI slot of the NICs on pcie.0: NIC i sits at slot 0x0f + i (16 NICs: 0x0f-0x1e, below ICH9's 0x1f). */
export const NIC_PCI_SLOT_BASE = 0x0f;

/**
 * NICs in guest order: net<i> on the recorded tap, opened by name, at a fixed PCI slot (the guest's interface names
 * and order never depend on the disks), no option ROM, the network MTU advertised through virtio (host_mtu).
 */
export function nicsOf(rec: GuestRecord, o: { vhost: boolean }): NicSpec[] {
  return (rec.spec.nics ?? []).map((n, i) => ({
    id: `net${i}`,
    mac: n.mac,
    ...(n.mtu !== undefined ? { mtu: n.mtu } : {}),
    tap: { ifname: n.device },
    vhost: o.vhost,
    pciSlot: NIC_PCI_SLOT_BASE + i,
  }));
}

/** Why `ip -d -j link show dev <device>` output is not a usable tap, or undefined when it is. */
export function tapProblem(ipJson: string, device: string, where = ''): string | undefined {
  let links: { ifname?: string; linkinfo?: { info_kind?: string; info_data?: { type?: string } } }[];
  try {
    links = JSON.parse(ipJson) as typeof links;
  } catch {
    return `cannot parse ip link output for ${device}`;
  }
  const link = links.find((l) => l.ifname === device);
  if (!link) return `tap ${device} does not exist${where} (the port is not wired on this node)`;
  const kind = link.linkinfo?.info_kind;
  const type = link.linkinfo?.info_data?.type;
  if (kind !== 'tun' || type !== 'tap')
    return `${device}${where} is not a tap (${kind ?? 'unknown'}${type ? `/${type}` : ''})`;
  return undefined;
}

/**
 * Disks in guest order: vda root (boot), vdb ephemeral, vdc swap, then the NoCloud seed and the config drive. A guest
 * booting from a volume has no root file (the volume is its first disk, see bootVolumesOf).
 */
export function disksOf(rec: GuestRecord): DiskSpec[] {
  const cache = rec.cache;
  const disks: DiskSpec[] = [];
  if (rec.disks.root) {
    disks.push({
      id: 'root',
      path: rec.disks.root,
      format: 'qcow2',
      media: 'disk',
      readOnly: false,
      cache,
      discard: true,
      bootIndex: 0,
      serial: 'root',
    });
  }
  if (rec.disks.ephemeral) {
    disks.push({
      id: 'ephemeral0',
      path: rec.disks.ephemeral,
      format: 'qcow2',
      media: 'disk',
      readOnly: false,
      cache,
      discard: true,
      serial: 'ephemeral0',
    });
  }
  if (rec.disks.swap) {
    disks.push({
      id: 'swap',
      path: rec.disks.swap,
      format: 'qcow2',
      media: 'disk',
      readOnly: false,
      cache,
      discard: true,
      serial: 'swap',
    });
  }
  // Seeds are read-only virtio disks (cloud-init finds them by label; no AHCI driver needed in the guest).
  disks.push({
    id: 'seed',
    path: rec.disks.seed,
    format: 'raw',
    media: 'disk',
    readOnly: true,
    cache,
    discard: false,
    serial: 'cidata',
  });
  if (rec.disks.configDrive) {
    disks.push({
      id: 'config-drive',
      path: rec.disks.configDrive,
      format: 'raw',
      media: 'disk',
      readOnly: true,
      cache,
      discard: false,
      serial: 'config-2',
    });
  }
  return disks;
}

// ---- QEMU's view of the volumes (derived from QEMU, never from memory) ----

/** Devices with an id (/machine/peripheral): id → QOM type. */
async function peripherals(qmp: QmpClient): Promise<Map<string, string>> {
  return qomChildren(qmp, '/machine/peripheral');
}

/** Children of a QOM path: name → type (child<type>). */
async function qomChildren(qmp: QmpClient, path: string): Promise<Map<string, string>> {
  const props = await qmp.execute<{ name: string; type: string }[]>('qom-list', { path });
  const out = new Map<string, string>();
  for (const p of props) {
    const m = /^child<(.+)>$/.exec(p.type);
    if (m) out.set(p.name, m[1]!);
  }
  return out;
}

/** Names of every block node. */
async function nodeNames(qmp: QmpClient): Promise<Set<string>> {
  const nodes = await qmp.execute<{ 'node-name'?: string }[]>('query-named-block-nodes', { flat: true });
  return new Set(nodes.map((n) => n['node-name']).filter((n): n is string => n !== undefined));
}

/** Virtual size of each volume device's medium, by serial (query-block: qdev `d<serial>` or its virtio-backend). */
async function blockSizes(qmp: QmpClient): Promise<Map<string, number>> {
  const blocks =
    await qmp.execute<{ qdev?: string; inserted?: { image?: { 'virtual-size'?: number } } }[]>('query-block');
  const out = new Map<string, number>();
  for (const b of blocks) {
    const serial = b.qdev ? serialOfDevice(b.qdev) : undefined;
    const size = b.inserted?.image?.['virtual-size'];
    if (serial && size !== undefined) out.set(serial, size);
  }
  return out;
}

/**
 * Where a new volume device can go, from QEMU's state: virtio → the lowest pcie-root-port `rp<n>` no device sits on
 * (each device's parent_bus), scsi → the lowest scsi-id no scsi device of scsi0 uses. undefined: none free.
 */
async function freeSlot(
  qmp: QmpClient,
  bus: 'virtio' | 'scsi',
  devices: Map<string, string>,
): Promise<VolumeSlot | undefined> {
  if (bus === 'virtio') {
    const ports = [...devices]
      .filter(([name, type]) => type === 'pcie-root-port' && /^rp\d+$/.test(name))
      .map(([name]) => Number(name.slice(2)))
      .sort((a, b) => a - b);
    const used = new Set<number>();
    for (const [name, type] of devices) {
      if (type === 'pcie-root-port' || type === 'virtio-scsi-pci') continue;
      const parent = await qmp
        .execute<string>('qom-get', { path: `/machine/peripheral/${name}`, property: 'parent_bus' })
        .catch(() => '');
      const port = rootPortOfBus(parent);
      if (port !== undefined) used.add(port);
    }
    const free = ports.find((p) => !used.has(p));
    return free === undefined ? undefined : { bus: 'virtio', port: free };
  }
  const used = new Set<number>();
  for (const [name, type] of devices) {
    if (type !== 'scsi-hd' && type !== 'scsi-cd' && type !== 'scsi-block') continue;
    used.add(await qmp.execute<number>('qom-get', { path: `/machine/peripheral/${name}`, property: 'scsi-id' }));
  }
  for (let i = 0; i <= MAX_SCSI_ID; i++) if (!used.has(i)) return { bus: 'scsi', scsiId: i };
  return undefined;
}

function bindCache(cache: ImageCache): Pick<ImageOps, 'ensure'> {
  return { ensure: (src, opts) => cache.ensure(src, opts) };
}

async function supportsODirect(dir: string): Promise<boolean> {
  const probe = join(dir, `.odirect-probe-${process.pid}`);
  try {
    const fh = await open(probe, constants.O_CREAT | constants.O_RDWR | constants.O_DIRECT, 0o600);
    await fh.close();
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EINVAL') return false;
    throw err;
  } finally {
    await rm(probe, { force: true });
  }
}

async function pathExists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    (err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return false;
      throw err;
    },
  );
}

async function isSocket(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isSocket();
  } catch {
    return false;
  }
}

/** Whether p settles within ms. */
async function settles(p: Promise<unknown>, ms: number): Promise<boolean> {
  const timeout = Symbol('timeout');
  const ac = new AbortController();
  const r = await Promise.race([p.then(() => true), sleep(ms, timeout, { signal: ac.signal }).catch(() => timeout)]);
  ac.abort();
  return r === true;
}

async function withTimeout<T>(p: Promise<T>, ms: number, message: string): Promise<T> {
  const timeout = Symbol('timeout');
  const ac = new AbortController();
  try {
    const r = await Promise.race([p, sleep(ms, timeout, { signal: ac.signal }).catch(() => timeout)]);
    if (r === timeout) throw new Error(message);
    return r as T;
  } finally {
    ac.abort();
  }
}

/** The last lines of QEMU's log (start-up errors), on one line. */
async function tail(path: string): Promise<string> {
  const text = await readFile(path, 'utf8').catch(() => '');
  return text
    .split('\n')
    .map((l) => l.trim())
    .filter(Boolean)
    .slice(-3)
    .join('; ')
    .slice(0, 600);
}

/**
 * A lock file held while a QEMU is started (O_EXCL create; the holder's pid inside). A lock whose holder process is
 * gone is stale and taken over. Returns the release function.
 */
export async function acquireLaunchLock(
  path: string,
  proc: ProcReader,
  timeoutMs = 30_000,
): Promise<() => Promise<void>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const fh = await open(path, 'wx', 0o600);
      await fh.writeFile(`${process.pid}\n`);
      await fh.close();
      return () => unlink(path).catch(() => {});
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const holder = Number((await readFile(path, 'utf8').catch(() => '')).trim());
    const alive =
      Number.isInteger(holder) && holder > 0 && holder !== process.pid && (await proc.cmdline(holder)) !== undefined;
    if (!alive) {
      await unlink(path).catch(() => {});
      continue;
    }
    if (Date.now() >= deadline) throw new Error(`${path} is held by process ${holder}`);
    await sleep(100);
  }
}
