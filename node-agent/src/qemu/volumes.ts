// Volumes in a QEMU guest: node names, blockdev trees, throttle groups and devices, as pure functions shared by the
// command line (volumes attached at boot) and the QMP hot-plug (attachVolume). Facts: ../shared/reference/storage.md
// §1.2-§1.5, verified against QEMU 7.2 here:
//  - The graph of a volume with serial S: the connection's tree with the driver's node names (top `vS`, its `file`
//    child `vS-f`), a throttle filter `vS-t` over `vS` in the throttle group `tgS` (always inserted, limits 0 =
//    unlimited, so QoS changes live with qom-set of the group's `limits`), and the device `dS` (serial=S) on `vS-t`.
//  - blockdev-del of `vS` also removes its inline `vS-f`; `block_resize` works on `vS` under the filter.
//  - virtio: virtio-blk-pci on a pcie-root-port `rp<n>` (pcie.0 is not hot-pluggable on q35); scsi: scsi-hd on
//    `scsi0.0` with `scsi-id` (spelled with a dash), lun 0; the virtio-scsi controller `scsi0` is made at boot.
//  - `-object` and `-blockdev` take JSON on the command line (nested trees, throttle limits).
import type { VolumeConnection, VolumeQos } from '../driver.ts';

/** Serials the driver accepts in node names: volumeSerial() of a uid (lower-case hex), at most 20 characters. */
export const SERIAL_RE = /^[a-z0-9]{1,20}$/;

/** virtio-scsi controller made at boot for scsi volumes (its bus is `scsi0.0`). */
export const SCSI_CONTROLLER = 'scsi0';
/** Highest scsi-id of virtio-scsi (channel 0); lun 0 each. */
export const MAX_SCSI_ID = 255;

export interface VolumeNames {
  /** Top node of the connection's tree (format node, or the only node). */
  node: string;
  /** Its `file` child, when the tree has one. */
  file: string;
  /** Throttle filter over `node`; the device's drive. */
  throttle: string;
  /** Throttle group object. */
  group: string;
  /** qdev id of the guest device. */
  device: string;
}

export function volumeNames(serial: string): VolumeNames {
  if (!SERIAL_RE.test(serial)) throw new Error(`volume serial ${JSON.stringify(serial)} is not 1-20 of [a-z0-9]`);
  return {
    node: `v${serial}`,
    file: `v${serial}-f`,
    throttle: `v${serial}-t`,
    group: `tg${serial}`,
    device: `d${serial}`,
  };
}

/** The serial of a device id `d<serial>` (or of its QOM path), or undefined for another device. */
export function serialOfDevice(idOrPath: string): string | undefined {
  const m = /(?:^|\/)d([a-z0-9]{1,20})(?:\/virtio-backend)?$/.exec(idOrPath);
  return m?.[1];
}

/** Pcie-root-port ids: rp0, rp1, ... */
export function rootPortId(i: number): string {
  return `rp${i}`;
}

/** The port index of a bus path such as /machine/peripheral/rp3/rp3, or undefined. */
export function rootPortOfBus(busPath: string): number | undefined {
  const m = /(?:^|\/)rp(\d+)$/.exec(busPath);
  return m ? Number(m[1]) : undefined;
}

/**
 * Spare pcie-root-ports for virtio-blk hot-plug (KubeVirt's rule, storage.md §1.2): 3 when the guest has at most
 * 2 GiB of RAM, else 6. Each takes a PCI slot of pcie.0 (31 in all), so more would crowd out NICs and disks; more
 * disks than that go on the SCSI bus, which needs no port.
 */
export function spareRootPorts(ramMiB: number): number {
  return ramMiB <= 2048 ? 3 : 6;
}

/** QEMU ThrottleLimits of a Cinder QoS spec: every key present (0 = unlimited), since qom-set only changes given keys. */
export function throttleLimits(qos: VolumeQos | undefined): Record<string, number> {
  const q = qos ?? {};
  return {
    'iops-total': q.totalIopsSec ?? 0,
    'iops-total-max': q.totalIopsSecMax ?? 0,
    'iops-read': q.readIopsSec ?? 0,
    'iops-read-max': q.readIopsSecMax ?? 0,
    'iops-write': q.writeIopsSec ?? 0,
    'iops-write-max': q.writeIopsSecMax ?? 0,
    'bps-total': q.totalBytesSec ?? 0,
    'bps-total-max': q.totalBytesSecMax ?? 0,
    'bps-read': q.readBytesSec ?? 0,
    'bps-read-max': q.readBytesSecMax ?? 0,
    'bps-write': q.writeBytesSec ?? 0,
    'bps-write-max': q.writeBytesSecMax ?? 0,
    'iops-size': q.sizeIopsSec ?? 0,
  };
}

/** The throttle-group object of a volume (object-add arguments / -object JSON). */
export function throttleGroupObject(serial: string, qos: VolumeQos | undefined): Record<string, unknown> {
  return { 'qom-type': 'throttle-group', id: volumeNames(serial).group, limits: throttleLimits(qos) };
}

/**
 * The connection's blockdev tree with the driver's node names (blockdev-add arguments / -blockdev JSON): `v<serial>`
 * on top, `v<serial>-f` on its `file` child when that is an inline tree. Local files get the guest's cache mode
 * (cache.direct on for none) and pass discards down; read-only connections open every node read-only.
 */
export function volumeBlockdev(
  conn: Pick<VolumeConnection, 'serial' | 'blockdev' | 'readOnly'>,
  cache: 'none' | 'writeback',
): Record<string, unknown> {
  const n = volumeNames(conn.serial);
  const ro = conn.readOnly === true;
  const top: Record<string, unknown> = { ...conn.blockdev, 'node-name': n.node, 'read-only': ro };
  if (!ro) top.discard = 'unmap';
  const file = conn.blockdev.file;
  if (file !== null && typeof file === 'object' && !Array.isArray(file)) {
    const child: Record<string, unknown> = {
      ...(file as Record<string, unknown>),
      'node-name': n.file,
      'read-only': ro,
    };
    if (child.driver === 'file' || child.driver === 'host_device') {
      child.cache = { direct: cache === 'none', 'no-flush': false };
      if (!ro) child.discard = 'unmap';
    }
    top.file = child;
  }
  return top;
}

/** The throttle filter node of a volume (over `v<serial>`, in group `tg<serial>`). */
export function throttleBlockdev(serial: string, readOnly = false): Record<string, unknown> {
  const n = volumeNames(serial);
  return {
    driver: 'throttle',
    'node-name': n.throttle,
    'throttle-group': n.group,
    file: n.node,
    'read-only': readOnly,
  };
}

/** Where a volume's device sits: a root port (virtio), pcie.0 (a virtio boot volume), or a scsi-id on scsi0.0. */
export type VolumeSlot = { bus: 'virtio'; port: number | 'pcie.0' } | { bus: 'scsi'; scsiId: number };

/** The device of a volume (device_add arguments; the command line uses the same keys). */
export function volumeDevice(serial: string, slot: VolumeSlot, bootIndex?: number): Record<string, unknown> {
  const n = volumeNames(serial);
  const dev: Record<string, unknown> =
    slot.bus === 'virtio'
      ? {
          driver: 'virtio-blk-pci',
          id: n.device,
          drive: n.throttle,
          ...(slot.port === 'pcie.0' ? {} : { bus: rootPortId(slot.port) }),
        }
      : {
          driver: 'scsi-hd',
          id: n.device,
          drive: n.throttle,
          bus: `${SCSI_CONTROLLER}.0`,
          channel: 0,
          'scsi-id': slot.scsiId,
          lun: 0,
        };
  dev.serial = serial;
  if (bootIndex !== undefined) dev.bootindex = bootIndex;
  return dev;
}
