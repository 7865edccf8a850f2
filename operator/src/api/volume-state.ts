// Pure rules of a Volume's operator-side state (cinder-api's view): the attachments of the Cinder v3 attachment flow
// (reserve → attaching → attached → detaching → gone), the refusals of an attach in Cinder's words, and the Cinder
// status derived from the volume host's report (status.host) and the attachments. The Volume controller (operator)
// applies them; the Server controller uses the same refusals for its VolumesAttached condition.
import { parseBytes } from './meta.ts';
import type { VolumeAttachment, VolumeHostReport } from './storage.ts';

export const VOLUME_FINALIZER = 'storage.stratus.io/volume';
export const VOLUME_SNAPSHOT_FINALIZER = 'storage.stratus.io/volumesnapshot';
/** The Secret with the NBD TLS-PSK credentials (keys identity, key), in the operator's namespace. */
export const NBD_SECRET_NAME = 'stratus-volume-nbd';
export const NBD_PSK_IDENTITY = 'stratus';

export type VolumeStatusName =
  | 'creating'
  | 'downloading'
  | 'available'
  | 'reserved'
  | 'attaching'
  | 'detaching'
  | 'in-use'
  | 'extending'
  | 'deleting'
  | 'error'
  | 'error_extending'
  | 'error_deleting';

/** What the volume controller knows of one Server that lists the volume or holds an attachment of it. */
export interface AttachingServer {
  name: string;
  uid: string;
  /** status.node: the hypervisor the server is bound to. */
  node?: string | undefined;
  creationTimestamp?: string | undefined;
  /** The server lists the volume (spec.volumes or spec.bootVolume) and is not being deleted. */
  wants: boolean;
  /** The guest is gone: the server is being deleted and its guest finalizer is released. */
  guestGone: boolean;
  bus?: 'virtio' | 'scsi' | undefined;
  bootIndex?: number | undefined;
  /** The entry of status.compute.volumes for this volume, from the report of the server's current node only. */
  reported?: { state: 'attached' | 'error'; device?: string | undefined; bus?: string | undefined } | undefined;
  /** Whether the server's node can reach the volume's backend (its Hypervisor's volumeBackends). */
  reach?: { ok: boolean; reason?: string | undefined } | undefined;
}

/** The volume's entry in a server's spec: spec.volumes, or spec.bootVolume (boot index 0, virtio). */
export function serverVolumeEntry(
  spec: {
    volumes?:
      | readonly {
          volume: string;
          bus?: 'virtio' | 'scsi' | undefined;
          bootIndex?: number | undefined;
          deleteOnTermination?: boolean | undefined;
        }[]
      | undefined;
    bootVolume?: string | undefined;
    bootVolumeDeleteOnTermination?: boolean | undefined;
  },
  volume: string,
): { bus: 'virtio' | 'scsi'; bootIndex?: number; deleteOnTermination: boolean } | undefined {
  if (spec.bootVolume === volume) {
    return { bus: 'virtio', bootIndex: 0, deleteOnTermination: spec.bootVolumeDeleteOnTermination === true };
  }
  const e = spec.volumes?.find((v) => v.volume === volume);
  if (!e) return undefined;
  return {
    bus: e.bus ?? 'virtio',
    ...(e.bootIndex !== undefined ? { bootIndex: e.bootIndex } : {}),
    deleteOnTermination: e.deleteOnTermination === true,
  };
}

/** Every volume a server spec names: the boot volume first. */
export function serverVolumeNames(spec: {
  volumes?: readonly { volume: string }[] | undefined;
  bootVolume?: string | undefined;
}): string[] {
  return [...(spec.bootVolume ? [spec.bootVolume] : []), ...(spec.volumes ?? []).map((v) => v.volume)];
}

export interface AttachRefusal {
  reason: 'VolumeNotAvailable' | 'VolumeInUse' | 'BackendUnreachable';
  message: string;
}

/**
 * Why a new attachment of the volume to `server` is refused (Cinder's reserve checks, in its words), or undefined.
 * `status` is the volume's current Cinder status; `attachments` its current ones (an attachment of this server
 * itself is no refusal). A server that is not bound yet is only checked against the volume.
 */
export function attachRefusal(
  volume: {
    name: string;
    status?: string | undefined;
    multiattach?: boolean | undefined;
    backend?: string | undefined;
  },
  attachments: readonly VolumeAttachment[],
  server: Pick<AttachingServer, 'name' | 'uid' | 'node' | 'reach'>,
): AttachRefusal | undefined {
  const own = attachments.find((a) => a.server === server.name && (a.serverUID ?? server.uid) === server.uid);
  if (own && (own.state !== 'reserved' || !server.node || server.reach?.ok !== false)) return undefined;
  const others = attachments.filter((a) => a.server !== server.name);
  const s = volume.status ?? 'creating';
  if (others.length > 0 && !volume.multiattach) {
    return {
      reason: 'VolumeInUse',
      message: `Invalid volume: volume ${volume.name} already attached to server ${others[0]!.server} and is not multiattach`,
    };
  }
  const ok = s === 'available' || (volume.multiattach && others.length > 0 && ATTACHED_STATUSES.has(s));
  if (!ok && !own) {
    return {
      reason: 'VolumeNotAvailable',
      message: `Invalid volume: Volume ${volume.name} status must be available or in-use, but the current status is ${s}`,
    };
  }
  if (server.node && server.reach && !server.reach.ok) {
    return {
      reason: 'BackendUnreachable',
      message: `Invalid volume: hypervisor ${server.node} cannot reach volume backend ${volume.backend ?? 'local'}: ${server.reach.reason ?? 'not reported'}`,
    };
  }
  return undefined;
}

const ATTACHED_STATUSES: ReadonlySet<string> = new Set(['in-use', 'reserved', 'attaching', 'detaching']);

export interface AttachmentsResult {
  attachments: VolumeAttachment[];
  /** Servers that want the volume and were refused, with why. */
  refused: Array<{ server: string } & AttachRefusal>;
}

/**
 * The next attachments of a volume, one step of the v3 flow for each server (pure, idempotent):
 * - an attachment whose server is gone (another uid, or none), no longer on the attachment's node, or whose guest
 *   is gone is dropped (a guest that is gone counts as detached);
 * - a server that lists the volume: `reserved` (no node yet, or a node that cannot reach the backend) → `attaching`
 *   (bound, backend reachable) → `attached` with device, bus and attachedAt once its node reports it attached;
 *   a `detaching` one listed again goes back to `attaching`;
 * - a server that no longer lists it (or is being deleted): `reserved` is dropped; `attaching`/`attached` →
 *   `detaching`; `detaching` is dropped once its node's report no longer lists the volume;
 * - a server that lists the volume and holds no attachment gets `reserved` unless attachRefusal refuses it
 *   (the oldest server first, so two racing for a non-multiattach volume settle on one); none while `accepting` is
 *   false (the volume is being deleted).
 */
export function nextAttachments(
  volume: {
    name: string;
    status?: string | undefined;
    multiattach?: boolean | undefined;
    backend?: string | undefined;
  },
  current: readonly VolumeAttachment[],
  servers: readonly AttachingServer[],
  now: string,
  accepting = true,
): AttachmentsResult {
  const byName = new Map(servers.map((s) => [s.name, s]));
  const out: VolumeAttachment[] = [];
  for (const a of current) {
    const s = byName.get(a.server);
    if (!s || (a.serverUID && a.serverUID !== s.uid) || s.guestGone) continue;
    if (a.node && s.node !== a.node) continue; // moved or unbound: the guest on a.node is gone
    const reported = s.reported?.state === 'attached';
    if (s.wants) {
      if (a.state === 'reserved') {
        if (s.node && s.reach?.ok) out.push({ ...a, serverUID: s.uid, node: s.node, state: 'attaching' });
        else if (!s.node) out.push(a);
        // Bound to a node that cannot reach the backend: the reservation goes (refused below, volume untouched).
      } else if (a.state === 'attaching' || a.state === 'detaching') {
        out.push(reported ? attachedFrom(a, s, now) : { ...a, state: 'attaching' });
      } else {
        out.push(reported && !a.device && s.reported?.device ? attachedFrom(a, s, now) : a);
      }
      continue;
    }
    if (a.state === 'reserved' || !a.node) continue;
    if (a.state === 'detaching' && !s.reported) continue;
    out.push({ ...a, state: 'detaching' });
  }
  const refused: AttachmentsResult['refused'] = [];
  if (accepting) {
    const wanting = servers
      .filter((s) => s.wants && !s.guestGone && !out.some((a) => a.server === s.name))
      .sort(
        (x, y) => (x.creationTimestamp ?? '').localeCompare(y.creationTimestamp ?? '') || x.name.localeCompare(y.name),
      );
    // Attachments dropped in this pass no longer hold the volume.
    let status = out.length === 0 && ATTACHED_STATUSES.has(volume.status ?? '') ? 'available' : volume.status;
    for (const s of wanting) {
      const no = attachRefusal({ ...volume, status }, out, s);
      if (no) {
        refused.push({ server: s.name, ...no });
        continue;
      }
      out.push({
        server: s.name,
        serverUID: s.uid,
        state: 'reserved',
        ...(s.bus ? { bus: s.bus } : {}),
        ...(s.bootIndex !== undefined ? { bootIndex: s.bootIndex } : {}),
      });
      status = 'reserved';
    }
  }
  return { attachments: out, refused };
}

function attachedFrom(a: VolumeAttachment, s: AttachingServer, now: string): VolumeAttachment {
  const bus = s.reported?.bus === 'scsi' || s.reported?.bus === 'virtio' ? s.reported.bus : a.bus;
  return {
    ...a,
    state: 'attached',
    ...(s.reported?.device ? { device: s.reported.device } : {}),
    ...(bus ? { bus } : {}),
    attachedAt: a.attachedAt ?? now,
  };
}

/** What the Cinder status of a volume is made of. */
export interface VolumeStateInput {
  deleting: boolean;
  /** status.node (the volume host); undefined: not placed. */
  node?: string | undefined;
  /** The operator's current status (kept while nothing else decides, e.g. error on placement). */
  status?: string | undefined;
  /** The report of the volume host; only one whose node is `node` counts. */
  host?: VolumeHostReport | undefined;
  specSize: string;
  /** status.size: the provisioned size. */
  size?: string | undefined;
  fromImage: boolean;
  attachments: readonly VolumeAttachment[];
}

export interface VolumeState {
  status: VolumeStatusName;
  /** The provisioned size to record (status.size). */
  size?: string | undefined;
  /** The host's fault, when the state is an error. */
  fault?: string | undefined;
}

const bytes = (q: string | undefined): bigint | undefined => {
  if (q === undefined) return undefined;
  try {
    return parseBytes(q);
  } catch {
    return undefined;
  }
};

/**
 * The Cinder status of a volume from the volume host's report of its node and the attachments (pure):
 * - not placed: the operator's own status (creating, or error after a refusal);
 * - no report of that node yet, or `creating`: creating (downloading for an image source);
 * - `error`: error, error_extending while an extend is pending, error_deleting while deleting;
 * - deleting: deleting;
 * - `available`/`extending`: extending while spec.size exceeds the provisioned size (status.size follows host.size
 *   once it reaches spec.size); else from the attachments: in-use if one is attached, else detaching, attaching,
 *   reserved, available.
 */
export function deriveVolumeState(v: VolumeStateInput): VolumeState {
  if (!v.node) {
    const own = v.status === 'error' ? 'error' : v.deleting ? 'deleting' : 'creating';
    return { status: own, size: v.size };
  }
  const host = v.host?.node === v.node ? v.host : undefined;
  const spec = bytes(v.specSize) ?? 0n;
  const hostSize = bytes(host?.size);
  let size = v.size;
  if (host && (host.state === 'available' || host.state === 'extending') && hostSize !== undefined) {
    if (hostSize >= spec || size === undefined) size = host.size;
  }
  const provisioned = bytes(size);
  const extendPending = provisioned !== undefined && spec > provisioned;
  if (host?.state === 'error') {
    const status = v.deleting ? 'error_deleting' : extendPending ? 'error_extending' : 'error';
    return { status, size, fault: host.fault ?? 'the volume host reported an error' };
  }
  if (v.deleting) return { status: 'deleting', size };
  if (!host || host.state === 'creating') return { status: v.fromImage ? 'downloading' : 'creating', size };
  if (host.state === 'deleting' || host.state === 'deleted') return { status: 'deleting', size };
  if (extendPending || host.state === 'extending') return { status: 'extending', size };
  const states = new Set(v.attachments.map((a) => a.state));
  const status: VolumeStatusName = states.has('attached')
    ? 'in-use'
    : states.has('detaching')
      ? 'detaching'
      : states.has('attaching')
        ? 'attaching'
        : states.has('reserved')
          ? 'reserved'
          : 'available';
  return { status, size };
}

/** Attachments served over NBD from the volume's node (local backend, server on another node): the degraded mode. */
export function remoteAttachments(
  backend: string | undefined,
  node: string | undefined,
  attachments: readonly VolumeAttachment[],
): VolumeAttachment[] {
  if (backend !== 'local' || !node) return [];
  return attachments.filter((a) => a.node && a.node !== node && a.state !== 'reserved');
}
