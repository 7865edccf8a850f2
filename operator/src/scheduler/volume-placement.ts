// Placement of a volume on a volume host (Cinder's scheduler for the local and rbd backends), and the scheduler's
// volume-aware pieces for servers (boot from volume). Pure: fed from the Hypervisor objects of an informer cache.
import type { Hypervisor } from '../api/compute.ts';
import { parseBytes } from '../api/meta.ts';
import { DEFAULT_AVAILABILITY_ZONE, ZONE_LABEL } from './host-state.ts';

/** A hypervisor as volume placement sees it. */
export interface VolumeHost {
  name: string;
  /** status.state up and spec.enabled. */
  usable: boolean;
  zone: string;
  /** Backends this node reports ok (status.volumeBackends), with the reason of those not ok. */
  backends: ReadonlyMap<string, { ok: boolean; reason?: string | undefined }>;
  /** allocatable.disk - usage.disk, in bytes (0 when unknown). */
  freeDisk: bigint;
}

export function volumeHostOf(hv: Hypervisor): VolumeHost {
  const st = hv.status ?? {};
  const q = (s: string | undefined) => {
    try {
      return s ? parseBytes(s) : 0n;
    } catch {
      return 0n;
    }
  };
  return {
    name: hv.metadata?.name ?? '',
    usable: st.state === 'up' && hv.spec?.enabled !== false,
    zone: hv.metadata?.labels?.[ZONE_LABEL] ?? DEFAULT_AVAILABILITY_ZONE,
    backends: new Map((st.volumeBackends ?? []).map((b) => [b.name, { ok: b.ok, reason: b.reason }])),
    freeDisk: q(st.allocatable?.disk) - q(st.usage?.disk),
  };
}

/** Whether the node can reach the backend, and why not (from its Hypervisor's volumeBackends). */
export function backendReach(hv: Hypervisor | undefined, backend: string): { ok: boolean; reason?: string } {
  if (!hv) return { ok: false, reason: 'the hypervisor does not exist' };
  const b = hv.status?.volumeBackends?.find((x) => x.name === backend);
  if (!b) return { ok: false, reason: 'the node does not report this backend' };
  return b.ok ? { ok: true } : { ok: false, reason: b.reason ?? 'probe failed' };
}

export interface VolumePlacementRequest {
  backend: string;
  availabilityZone?: string | undefined;
  /** A node that must hold the volume (a bound server's node, a source snapshot's or volume's node). */
  node?: string | undefined;
}

export type VolumePlacement = { ok: true; node: string } | { ok: false; message: string };

/**
 * The volume host for a new volume: the required node when one is given (it must be usable and reach the backend);
 * else, among the usable hypervisors of the zone (any zone when none is asked) that report the backend ok, the one
 * with the most free disk (ties: by name). None: Cinder's NoValidBackend words.
 */
export function placeVolume(req: VolumePlacementRequest, hosts: readonly VolumeHost[]): VolumePlacement {
  const why: string[] = [];
  let candidates = hosts.filter((h) => h.usable);
  if (candidates.length < hosts.length) why.push(`${hosts.length - candidates.length} not up or disabled`);
  if (req.node) {
    const before = candidates.length;
    candidates = candidates.filter((h) => h.name === req.node);
    if (candidates.length < before) why.push(`${before - candidates.length} not node ${req.node}`);
  }
  if (req.availabilityZone) {
    const before = candidates.length;
    candidates = candidates.filter((h) => h.zone === req.availabilityZone);
    if (candidates.length < before) why.push(`${before - candidates.length} not in zone ${req.availabilityZone}`);
  }
  const before = candidates.length;
  candidates = candidates.filter((h) => h.backends.get(req.backend)?.ok === true);
  if (candidates.length < before) why.push(`${before - candidates.length} cannot reach backend ${req.backend}`);
  if (candidates.length === 0) {
    return {
      ok: false,
      message: `No valid backend was found. No hypervisor can hold a ${req.backend} volume${why.length ? ` (of ${hosts.length}: ${why.join(', ')})` : ''}`,
    };
  }
  candidates.sort((a, b) =>
    a.freeDisk === b.freeDisk ? a.name.localeCompare(b.name) : a.freeDisk > b.freeDisk ? -1 : 1,
  );
  return { ok: true, node: candidates[0]!.name };
}
