// The volume backend interface (Cinder's volume driver, reduced to what the node agent's volume host uses).
// A backend is one file under volumes/ plus one line in volumes/index.ts. Backends: local (qcow2 files under the
// agent's state directory, the default) and rbd (Ceph RBD images through librbd). docs/design/storage.md.
//
// Rules every backend follows (the same as the hypervisor drivers', node-agent/src/driver.ts):
//  - A volume is identified by VolumeRef.id, the Volume's uid; a snapshot by SnapshotRef.id, the VolumeSnapshot's uid.
//  - Every operation is idempotent towards its target: create of a volume that exists as asked returns it, delete of
//    an unknown volume succeeds, extend to the current size does nothing. An agent killed at any line calls them
//    again and converges; nothing is created twice and no data is destroyed by a repeat.
//  - Creation is atomic: a volume (or snapshot) either exists complete or not at all (temporary name, then rename).
//  - State comes from the backend (files, `rbd ... --format json`), never from the caller.
//  - Locations are opaque strings the backend alone parses (`local://<node>/<path>`, `rbd://<fsid>/<pool>/<image>`);
//    the operator stores them in Volume.status.host.location and hands them back.
import type { VolumeConnection } from '../driver.ts';
import type { CachedImage } from '../images/cache.ts';

export interface VolumeRef {
  /** Volume metadata.uid. */
  id: string;
  name: string;
  namespace: string;
}

export interface SnapshotRef {
  /** VolumeSnapshot metadata.uid. */
  id: string;
  name: string;
  namespace: string;
}

/** What a new volume starts with (Volume spec.source, resolved by the volume host). */
export type VolumeSourceSpec =
  | { kind: 'blank' }
  /** An image in the node's image cache (local: a qcow2 overlay on it; rbd: imported as a raw RBD image). */
  | { kind: 'image'; image: CachedImage }
  /** A snapshot this backend made (its location). */
  | { kind: 'snapshot'; location: string }
  /** Another volume of this backend (its location): a clone. The source is detached or the backend can copy live. */
  | { kind: 'volume'; location: string };

export interface ProvisionedVolume {
  location: string;
  /** Virtual size in bytes. */
  sizeBytes: number;
  /** Bytes really used on the backend, when it knows (qcow2 actual size, rbd du). */
  allocatedBytes?: number;
}

export interface ProvisionedSnapshot {
  location: string;
  /** Virtual size of the volume when it was taken. */
  sizeBytes: number;
}

export interface BackendProbe {
  /** Whether this node can run the backend and attach its volumes (tools, QEMU block driver, credentials). */
  ok: boolean;
  /** Why not, in words an operator acts on ("QEMU has no rbd block driver: install qemu-block-extra"). */
  reason?: string;
}

export interface VolumeBackend {
  /** Backend name as VolumeType spec.backend names it: 'local', 'rbd'. */
  readonly name: string;
  probe(): Promise<BackendProbe>;
  /** Creates the volume (sizeBytes ≥ the source's size) or returns it when it exists. */
  create(vol: VolumeRef, sizeBytes: number, source: VolumeSourceSpec): Promise<ProvisionedVolume>;
  /** Current size and allocation of a volume, or undefined when it does not exist. */
  inspect(location: string): Promise<ProvisionedVolume | undefined>;
  /** Grows a detached volume to sizeBytes (never shrinks: a smaller size is a RangeError). */
  extend(location: string, sizeBytes: number): Promise<ProvisionedVolume>;
  /** Removes the volume; unknown succeeds. Data its snapshots or clones still need is kept until they go. */
  delete(location: string): Promise<void>;
  /** Point-in-time snapshot of a detached volume (an attached one is snapshotted through the guest's QEMU). */
  createSnapshot(location: string, snap: SnapshotRef): Promise<ProvisionedSnapshot>;
  /** Removes a snapshot; unknown succeeds. */
  deleteSnapshot(location: string): Promise<void>;
  /** Locations of every volume and snapshot the backend holds for this node (orphan sweep). */
  list(): Promise<{ volumes: string[]; snapshots: string[] }>;
  /**
   * How a QEMU on this node opens the volume: the blockdev tree and the QOM objects it needs. The local backend
   * returns a qcow2 file; a volume held on another node is reached over NBD instead (volumes/nbd-export.ts).
   */
  connection(vol: VolumeRef, location: string): Promise<VolumeConnection>;
}
