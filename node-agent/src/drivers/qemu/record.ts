// The on-disk record of one QEMU guest: <stateDir>/guests/<uid>/ and its guest.json.
//
// guest.json is the guest's definition (the GuestSpec the agent resolved, plus what the driver resolved: the cached
// image, the disk paths, the accelerator and cache mode) and the little state that has no process to ask: a saved
// (suspended) state and the last unexpected exit. It is written atomically (temporary file, fsync, rename), so a
// crash leaves either the old or the new version. Everything else in the directory is derived from it.
import { randomBytes } from 'node:crypto';
import { open, readFile, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import * as z from 'zod';
import { GuestNic } from '../../seed/nic.ts';

/** Files of one guest directory. */
export interface GuestPaths {
  dir: string;
  record: string;
  root: string;
  ephemeral: string;
  swap: string;
  seed: string;
  configDrive: string;
  consoleLog: string;
  consoleSocket: string;
  qmpSocket: string;
  vncSocket: string;
  pidFile: string;
  /** QEMU's own stdout/stderr (start-up errors). */
  qemuLog: string;
  /** Saved state of a suspended guest. */
  stateFile: string;
  /** UNIX socket the saved state streams through (suspend and resume). */
  migrateSocket: string;
  /** Held while a QEMU is being started for this guest (cross-process guard). */
  launchLock: string;
  /** Disk export of a cold migration: qemu-storage-daemon's pid file, and export.json (the DiskExport served). */
  exportPid: string;
  exportInfo: string;
  /** What an unconfirmed resize keeps for a revert: guest.json, root.qcow2, ephemeral.qcow2, and `complete`. */
  resizeOld: string;
}

export const GUESTS_DIR = 'guests';
export const RECORD_FILE = 'guest.json';

/** Longest UNIX socket path Linux accepts (sun_path is 108 bytes with the NUL). */
export const MAX_SOCKET_PATH = 107;

export function guestPaths(stateDir: string, id: string): GuestPaths {
  const dir = join(stateDir, GUESTS_DIR, id);
  const f = (name: string) => join(dir, name);
  return {
    dir,
    record: f(RECORD_FILE),
    root: f('root.qcow2'),
    ephemeral: f('ephemeral.qcow2'),
    swap: f('swap.qcow2'),
    seed: f('seed.iso'),
    configDrive: f('config-drive.iso'),
    consoleLog: f('console.log'),
    consoleSocket: f('console.sock'),
    qmpSocket: f('qmp.sock'),
    vncSocket: f('vnc.sock'),
    pidFile: f('qemu.pid'),
    qemuLog: f('qemu.log'),
    stateFile: f('state.bin'),
    migrateSocket: f('migrate.sock'),
    launchLock: f('launch.lock'),
    resizeOld: f('resize-old'),
    exportPid: f('nbd.pid'),
    exportInfo: f('export.json'),
  };
}

/** Guest ids become directory names and QEMU -uuid values: Kubernetes uids are RFC 4122 UUIDs. */
export const GuestId = z.uuid();

/** A host network device name (IFNAMSIZ: at most 15 characters). */
export const DeviceName = z.string().regex(/^[A-Za-z0-9_.-]{1,15}$/, 'device: 1-15 characters [A-Za-z0-9_.-]');

/** A NIC as guest.json keeps it: the tap the network backend made plus the seed data (driver.ts GuestNetworkInterface). */
export const RecordedNic = z.object({ device: DeviceName }).and(GuestNic);
export type RecordedNic = z.infer<typeof RecordedNic>;

const Qos = z.object({
  totalBytesSec: z.number().min(0).optional(),
  readBytesSec: z.number().min(0).optional(),
  writeBytesSec: z.number().min(0).optional(),
  totalIopsSec: z.number().min(0).optional(),
  readIopsSec: z.number().min(0).optional(),
  writeIopsSec: z.number().min(0).optional(),
  totalBytesSecMax: z.number().min(0).optional(),
  readBytesSecMax: z.number().min(0).optional(),
  writeBytesSecMax: z.number().min(0).optional(),
  totalIopsSecMax: z.number().min(0).optional(),
  readIopsSecMax: z.number().min(0).optional(),
  writeIopsSecMax: z.number().min(0).optional(),
  sizeIopsSec: z.number().min(0).optional(),
});

/** A volume attachment as guest.json keeps it (driver.ts VolumeAttachmentSpec). */
export const RecordedVolume = z.object({
  connection: z.object({
    volumeId: z.string().min(1),
    serial: z.string().regex(/^[a-z0-9]{1,20}$/),
    blockdev: z.record(z.string(), z.unknown()),
    objects: z.array(z.record(z.string(), z.unknown())).optional(),
    readOnly: z.boolean().optional(),
  }),
  bus: z.enum(['virtio', 'scsi']),
  bootIndex: z.int().min(0).max(99).optional(),
  qos: Qos.optional(),
  /**
   * An attach or detach of a running guest under way (written before QEMU is touched): `attach` entries are plugged
   * at the next boot (the caller retries the attach anyway), `detach` entries are not.
   */
  pending: z.enum(['attach', 'detach']).optional(),
});
export type RecordedVolume = z.infer<typeof RecordedVolume>;

const Checksum = z.object({ algorithm: z.enum(['sha256', 'sha512']), value: z.string() });

export const RecordedSpec = z.object({
  id: GuestId,
  name: z.string().min(1),
  namespace: z.string(),
  vcpus: z.int().min(1),
  ramMiB: z.int().min(16),
  disk: z.object({ rootGiB: z.int().min(0), ephemeralGiB: z.int().min(0), swapMiB: z.int().min(0) }),
  image: z.string().optional(),
  imageSource: z
    .object({
      name: z.string(),
      namespace: z.string(),
      uid: z.string(),
      url: z.string(),
      diskFormat: z.string(),
      checksum: Checksum.optional(),
    })
    .optional(),
  userData: z.string().optional(),
  keyPair: z.object({ name: z.string(), publicKey: z.string() }).optional(),
  hostname: z.string().optional(),
  configDrive: z.boolean().optional(),
  metadata: z.record(z.string(), z.string()).optional(),
  accelerator: z.enum(['kvm', 'tcg']).optional(),
  annotations: z.record(z.string(), z.string()).default({}),
  /** NICs in guest order; every start (power on, reboot, resume) plugs the same taps with the same MACs. */
  nics: z.array(RecordedNic).max(16).optional(),
  /** Boot from this volume (the root disk; no root.qcow2, no image). */
  rootVolume: RecordedVolume.optional(),
});
export type RecordedSpec = z.infer<typeof RecordedSpec>;

export const GuestRecord = z.object({
  version: z.literal(1),
  spec: RecordedSpec,
  /** Accelerator the guest is started with (kept for every later start, so a saved state restores). */
  accelerator: z.enum(['kvm', 'tcg']),
  /** Disk cache mode: none (O_DIRECT) unless the state directory's filesystem refuses O_DIRECT. */
  cache: z.enum(['none', 'writeback']),
  /** The cached image the root disk is an overlay on (none when the guest boots from a volume). */
  image: z
    .object({
      key: z.string(),
      path: z.string(),
      format: z.enum(['qcow2', 'raw']),
      virtualSize: z.int().min(0),
      sha256: z.string(),
    })
    .optional(),
  /** Absolute paths of the guest's disks (no root file when it boots from a volume: rootBytes 0). */
  disks: z.object({
    root: z.string().optional(),
    rootBytes: z.int().min(0),
    ephemeral: z.string().optional(),
    swap: z.string().optional(),
    seed: z.string(),
    configDrive: z.string().optional(),
  }),
  createdAt: z.string(),
  /** Volumes attached besides the root volume, in attach order (every boot plugs them). */
  volumes: z.array(RecordedVolume).optional(),
  /** Present while the guest is suspended (its state saved to stateFile, no process). */
  suspended: z.object({ stateFile: z.string(), at: z.string(), bytes: z.int().min(0) }).optional(),
  /** Set by a resize until it is confirmed or reverted (resize-old/ holds the previous definition and disks). */
  resizePending: z.string().optional(),
  /** The last exit nobody asked for, until the guest is started again (state() reports its power state). */
  lastExit: z.object({ powerState: z.enum(['SHUTDOWN', 'CRASHED']), reason: z.string(), at: z.string() }).optional(),
});
export type GuestRecord = z.infer<typeof GuestRecord>;

/** Reads and validates guest.json; undefined when there is none. Throws on a corrupt record. */
export async function readRecord(path: string): Promise<GuestRecord | undefined> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  const parsed = GuestRecord.safeParse(JSON.parse(text));
  if (!parsed.success) throw new Error(`${path}: invalid guest record: ${z.prettifyError(parsed.error)}`);
  return parsed.data;
}

/** Writes guest.json atomically: temporary file in the same directory, fsync, rename, fsync of the directory. */
export async function writeRecord(path: string, record: GuestRecord): Promise<void> {
  const data = `${JSON.stringify(GuestRecord.parse(record), null, 2)}\n`;
  const tmp = `${path}.${randomBytes(6).toString('hex')}.tmp`;
  try {
    const fh = await open(tmp, 'w', 0o600);
    try {
      await fh.writeFile(data);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, path);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
  const dir = await open(join(path, '..'), 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}

/** Root + ephemeral + swap of a record in whole GiB (what the guest claims on the node). */
export function diskGiBOf(r: GuestRecord): number {
  const GiB = 1024 ** 3;
  return Math.ceil(r.disks.rootBytes / GiB) + r.spec.disk.ephemeralGiB + Math.ceil(r.spec.disk.swapMiB / 1024);
}
