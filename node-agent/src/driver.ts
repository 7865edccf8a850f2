// The hypervisor driver interface (Nova's nova.virt.driver.ComputeDriver, reduced to what the node agent uses).
// The agent talks to guests only through this interface; a driver is one file under drivers/ plus one line in
// drivers/index.ts. Drivers: fake (in memory, for tests and simulations) and qemu (docs/design/qemu-driver.md).
//
// Rules every driver follows:
//  - A guest is identified by GuestSpec.id, the Server's uid. There is never more than one guest per id:
//    spawn() of an id that already exists leaves it alone and returns its state.
//  - Operations are idempotent towards their target: powerOff of a shut-off guest, unpause of a running guest,
//    destroy of an unknown id... succeed without doing anything. An operation impossible from the guest's
//    current state (pause a shut-off guest) throws InvalidGuestStateError; an unknown id throws GuestNotFoundError.
//  - State comes from the hypervisor, never from the caller: state() and list() describe what really runs.
//  - A driver persists what it needs to bring a guest back (its definition and disks); guests survive a restart
//    of the agent, which re-adopts them through list()/state().
//  - Power states use Nova's names (RUNNING, PAUSED, SHUTDOWN, CRASHED, SUSPENDED; NOSTATE when unknown).
import type { PowerState } from '../../operator/src/api/index.ts';
import type { ImageSource } from './images/cache.ts';
import type { GuestNicInput } from './seed/nic.ts';

/**
 * A NIC of a guest: the host device the network backend wired for the port (a tap, attached and up before spawn) plus
 * what the seeds tell the guest (MAC, MTU, addresses, gateway, routes, DNS; network-config v2 / network_data.json).
 */
export type GuestNetworkInterface = GuestNicInput & {
  /** Host-side device (network/names.ts tapName), e.g. stt-0123456789a. */
  device: string;
};

/**
 * How a QEMU opens a volume (Cinder's connection_info): built by the volume backend (volumes/backend.ts) or the NBD
 * exporter, consumed by the hypervisor driver.
 */
export interface VolumeConnection {
  /** Volume metadata.uid. */
  volumeId: string;
  /** Serial the guest sees (/dev/disk/by-id/*<serial>): volumeSerial(volumeId), at most 20 characters. */
  serial: string;
  /**
   * The blockdev-add argument tree of the volume's top node, without node names (the driver names the nodes), e.g.
   * {driver:'qcow2', file:{driver:'file', filename}}, {driver:'raw', file:{driver:'nbd', server, export,
   * 'tls-creds', 'reconnect-delay'}} or {driver:'raw', file:{driver:'rbd', pool, image, user, server, 'key-secret'}}.
   */
  blockdev: Record<string, unknown>;
  /**
   * QOM objects the tree refers to, created (object-add) before it and removed after it: a `secret` for an RBD key, a
   * `tls-creds-psk` for NBD. Each has `qom-type` and `id`; ids are unique per volume (they embed the serial).
   */
  objects?: Record<string, unknown>[];
  readOnly?: boolean;
}

/** Cinder front-end QoS specs, per volume (QEMU throttle limits; 0 or absent: unlimited). */
export interface VolumeQos {
  totalBytesSec?: number;
  readBytesSec?: number;
  writeBytesSec?: number;
  totalIopsSec?: number;
  readIopsSec?: number;
  writeIopsSec?: number;
  totalBytesSecMax?: number;
  readBytesSecMax?: number;
  writeBytesSecMax?: number;
  totalIopsSecMax?: number;
  readIopsSecMax?: number;
  writeIopsSecMax?: number;
  /** Cinder size_iops_sec: requests larger than this count as several (QEMU iops-size). */
  sizeIopsSec?: number;
}

/** A volume attached to a guest, as the driver is asked to attach it (Nova's block device mapping). */
export interface VolumeAttachmentSpec {
  connection: VolumeConnection;
  /** virtio: virtio-blk-pci on a spare PCIe root port; scsi: scsi-hd on the guest's virtio-scsi controller. */
  bus: 'virtio' | 'scsi';
  /** Boot order (0 first); only for a boot volume or when asked. */
  bootIndex?: number;
  qos?: VolumeQos;
}

/** A volume attached to a guest, as the driver observes it (QEMU's block graph when it runs, its record otherwise). */
export interface AttachedVolume {
  volumeId: string;
  serial: string;
  bus: 'virtio' | 'scsi';
  /** qdev id of the guest device. */
  device: string;
  /** Virtual size QEMU sees, in bytes (when running). */
  sizeBytes?: number;
}

/** The guest-visible serial of a volume: its uid without dashes, cut to the 20 bytes a virtio-blk serial holds. */
export function volumeSerial(volumeId: string): string {
  return volumeId.replaceAll('-', '').slice(0, 20);
}

/** What to boot: the Server's uid plus everything the guest needs, resolved by the agent. */
export interface GuestSpec {
  /** Stable guest id: the Server's metadata.uid. */
  id: string;
  /** Server name and namespace (guest naming, logs, orphan matching). */
  name: string;
  namespace: string;
  vcpus: number;
  ramMiB: number;
  /** Root disk (0: sized to the image), ephemeral disk (0: none), swap (0: none). */
  disk: { rootGiB: number; ephemeralGiB: number; swapMiB: number };
  /**
   * Boot from this volume instead of an image (Server spec.bootVolume): it is the root disk; disk.rootGiB and image
   * are then ignored and no root disk file is made.
   */
  rootVolume?: VolumeAttachmentSpec;
  /** Volumes attached when the guest boots (then kept in its definition; hot-plug changes go through attachVolume). */
  volumes?: VolumeAttachmentSpec[];
  /** Image to build the root disk from (Image name in the Server's namespace). */
  image?: string;
  /**
   * That Image as the node's image cache downloads it, resolved by the agent from the Image object; undefined when
   * the object does not exist (drivers that need it fail the spawn).
   */
  imageSource?: ImageSource;
  /** cloud-init user data, as text. */
  userData?: string;
  /** Key pair installed for the default user. */
  keyPair?: { name: string; publicKey: string };
  /** Guest hostname (defaults to the Server name). */
  hostname?: string;
  /** NICs in order (Server spec.networks), wired by the agent before spawn. Changing them needs a new guest. */
  nics?: GuestNetworkInterface[];
  /** Also attach an OpenStack config drive (label config-2) besides the NoCloud seed. */
  configDrive?: boolean;
  /** Server metadata (Nova metadata key/values), visible to the guest through the config drive. */
  metadata?: Readonly<Record<string, string>>;
  /**
   * Accelerator the node's Hypervisor settled on (spec.accelerator against what the host supports). A driver never
   * uses KVM where it found KVM unusable; undefined: the driver's own choice.
   */
  accelerator?: Accelerator;
  /** The Server's annotations (drivers may read hints from them, e.g. the fake driver's failure injection). */
  annotations: Readonly<Record<string, string>>;
}

/** Observed state of one guest. */
export interface GuestState {
  id: string;
  powerState: PowerState;
  /** Process id of the guest (the QEMU process), while one exists. */
  pid?: number;
  /** When the current guest process started (RFC 3339), while one exists. */
  startedAt?: string;
  /** Accelerator the guest runs (or last ran) with, when the driver knows it. */
  accelerator?: Accelerator;
  /** CRASHED only: why, as the driver knows it (e.g. the KVM internal error QEMU reported), for the Server's fault. */
  fault?: string;
}

/** A guest as list() reports it: state plus the identity and size it was spawned with. */
export interface GuestInfo extends GuestState {
  name: string;
  namespace: string;
  vcpus: number;
  ramMiB: number;
  /** Local disk used: root + ephemeral + swap, in GiB (rounded up). */
  diskGiB: number;
}

export type Accelerator = 'kvm' | 'tcg';

/** The host as the driver sees it (Nova get_available_resource + host capabilities). */
export interface HostInfo {
  /** Physical resources of the host; ram and disk are byte quantities ("64Gi"). */
  capacity: { vcpus: number; ram: string; disk: string };
  cpu: { architecture: string; model?: string; vendor?: string };
  accelerator: Accelerator;
  /** Why that accelerator (e.g. "/dev/kvm usable", "fake driver"). */
  acceleratorReason: string;
  /** Hypervisor version, e.g. QEMU's. */
  version?: string;
}

/**
 * The disks of a stopped guest served read-only for a cold migration (the source agent publishes it in
 * Server.status.migrationSource; the target's importDisks pulls from it). QEMU driver: an NBD server on the node's
 * host IP, one export per disk, guest-visible contents (raw).
 */
export interface DiskExport {
  host: string;
  port: number;
  /** Export names: the root disk, and the ephemeral disk when the guest has one. */
  disks: { root: string; ephemeral?: string };
  /** sha256 of the image the root disk is an overlay on (the target rebases its copy onto its own cached copy). */
  imageSha256?: string;
}

/** A guest stopped without being asked to (guest-initiated shutdown, crash, QEMU killed). */
export interface GuestExit {
  id: string;
  /** SHUTDOWN for a clean guest shutdown, CRASHED otherwise. */
  powerState: 'SHUTDOWN' | 'CRASHED';
  /** RFC 3339. */
  at: string;
  reason: string;
}

export interface PowerOffOptions {
  /** true: ask the guest (ACPI) first and force it off after timeoutMs; false: force off at once. */
  graceful: boolean;
  /** Grace for a graceful power off (Nova shutdown_timeout, 60 s). */
  timeoutMs: number;
}

/** Operation names, for failure injection, metrics and messages. */
export const DRIVER_OPS = [
  'spawn',
  'destroy',
  'powerOff',
  'powerOn',
  'reboot',
  'pause',
  'unpause',
  'suspend',
  'resume',
  'resize',
  'confirmResize',
  'revertResize',
  'exportDisks',
  'unexportDisks',
  'importDisks',
  'attachVolume',
  'detachVolume',
  'extendVolume',
  'setVolumeQos',
] as const;
export type DriverOp = (typeof DRIVER_OPS)[number];

export interface HypervisorDriver {
  /** Driver name as reported in Hypervisor status.driver: 'fake', 'qemu'. */
  readonly name: string;
  /** Prepares the driver (probe the host, open state directories, re-attach to running guests). */
  init(): Promise<void>;
  /** Stops watching guests; guests keep running. */
  close(): Promise<void>;
  hostInfo(): Promise<HostInfo>;
  /** Creates the guest's disks and definition and boots it; resolves once it runs (RUNNING). */
  spawn(guest: GuestSpec): Promise<GuestState>;
  /** Stops the guest if needed and removes it with its files. Unknown ids succeed. */
  destroy(id: string): Promise<void>;
  powerOff(id: string, opts: PowerOffOptions): Promise<void>;
  /** Boots a SHUTDOWN or CRASHED guest from its definition. */
  powerOn(id: string): Promise<void>;
  /** Soft (ACPI reboot, hard after a timeout) or hard (reset; also boots a guest that is off, paused or suspended). */
  reboot(id: string, opts: { hard: boolean }): Promise<void>;
  /** vCPUs stopped, memory kept (QEMU stop / cont). */
  pause(id: string): Promise<void>;
  unpause(id: string): Promise<void>;
  /** State saved to disk and the process ended (managed save) / restored. */
  suspend(id: string): Promise<void>;
  resume(id: string): Promise<void>;
  /**
   * Resize keeping the disks (Nova's resize on the same host): the guest is powered off (opts) if it runs, and gets
   * spec's vCPUs and RAM; its root and ephemeral disks are kept and grown when spec's are bigger (the guest's data
   * stays), the swap disk is re-created at its new size. A smaller root or ephemeral disk is refused with Nova's
   * words (RESIZE_DOWN_MESSAGE) before anything changes. The guest is left stopped (the caller starts it) and the
   * previous definition and disks are kept until confirmResize (dropped) or revertResize (restored). Repeating it with
   * the same spec while unconfirmed does nothing.
   */
  resize(id: string, spec: GuestSpec, opts: PowerOffOptions): Promise<void>;
  /** Drops what an unconfirmed resize kept for a revert; a guest without one (or an unknown id) is left alone. */
  confirmResize(id: string): Promise<void>;
  /**
   * Powers the guest off and restores the definition and disks kept by an unconfirmed resize (left stopped); a guest
   * without one is left alone.
   */
  revertResize(id: string, opts: PowerOffOptions): Promise<void>;
  /**
   * Cold migration, source side: serves the disks of a stopped (SHUTDOWN/CRASHED) guest read-only on `host` until
   * unexportDisks; a running guest is InvalidGuestStateError. Repeating it returns the export already served.
   */
  exportDisks(id: string, host: string): Promise<DiskExport>;
  /** Ends the export of exportDisks (no process, port or file left); no export (or an unknown id) succeeds. */
  unexportDisks(id: string): Promise<void>;
  /**
   * Cold migration, target side: creates the guest from the disks `from` serves (copies, not shared) with spec's
   * definition, left stopped (SHUTDOWN); the caller starts it. A guest that already exists is left alone.
   */
  importDisks(spec: GuestSpec, from: DiskExport): Promise<GuestState>;
  /**
   * Attaches a volume: hot-plugged into a running or paused guest (blockdev-add, device_add), recorded in the
   * definition of a stopped one so its next boot has it. Attaching a volume already attached returns it unchanged.
   */
  attachVolume(id: string, att: VolumeAttachmentSpec): Promise<AttachedVolume>;
  /**
   * Detaches a volume (device_del, DEVICE_DELETED, blockdev-del and its objects) and drops it from the definition.
   * A volume not attached (or an unknown id) succeeds. A guest that does not release the device in time is a
   * DriverError (the caller retries; nothing is half removed).
   */
  detachVolume(id: string, volumeId: string): Promise<void>;
  /** Volumes attached to the guest: read back from QEMU when it runs (query-block), from its definition otherwise. */
  volumes(id: string): Promise<AttachedVolume[]>;
  /** Online extend: tells the guest's QEMU the volume grew (block_resize); a stopped guest needs nothing. */
  extendVolume(id: string, volumeId: string, sizeBytes: number): Promise<void>;
  /** Sets (or with {} clears) the QoS limits of an attached volume, live. */
  setVolumeQos(id: string, volumeId: string, qos: VolumeQos): Promise<void>;
  /** The guest's state, or undefined when no guest with this id exists. */
  state(id: string): Promise<GuestState | undefined>;
  list(): Promise<GuestInfo[]>;
  /** Subscribes to unexpected exits; returns an unsubscribe function. */
  onGuestExit(listener: (e: GuestExit) => void): () => void;
}

export class DriverError extends Error {
  override name = 'DriverError';
  readonly op: DriverOp;
  readonly id: string;

  constructor(op: DriverOp, id: string, message: string, options?: ErrorOptions) {
    super(message, options);
    this.op = op;
    this.id = id;
  }
}

export class GuestNotFoundError extends DriverError {
  override name = 'GuestNotFoundError';

  constructor(op: DriverOp, id: string) {
    super(op, id, `${op}: no guest ${id} on this host`);
  }
}

export class InvalidGuestStateError extends DriverError {
  override name = 'InvalidGuestStateError';

  constructor(op: DriverOp, id: string, state: PowerState) {
    super(op, id, `${op}: guest ${id} is ${state}`);
  }
}
