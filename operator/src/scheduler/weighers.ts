// Host weighers, Nova's algorithm: each weigher gives every candidate a raw value; the values are
// normalised to 0..1 across the candidates (all equal → all 0), multiplied by the weigher's multiplier
// and summed. Higher total wins. Weights order hosts; they are not accounting, so floats are fine.
import { freeOf, type HostState } from './host-state.ts';
import type { ScheduleRequest } from './request.ts';

export type WeigherFn = (host: HostState, req: ScheduleRequest) => number;

/** Free RAM after ratios: positive multiplier spreads, negative packs. */
export const RAMWeigher: WeigherFn = (host) => freeOf(host).ramMiB;

/** Free vCPUs after ratios. */
export const CPUWeigher: WeigherFn = (host) => freeOf(host).vcpus;

/** Free disk after ratios. */
export const DiskWeigher: WeigherFn = (host) => freeOf(host).diskGiB;

function members(host: HostState, req: ScheduleRequest): number {
  return req.group ? (host.groupMembers.get(req.group.key) ?? 0) : 0;
}

/** soft-affinity: the more members already on the host, the better. */
export const ServerGroupSoftAffinityWeigher: WeigherFn = (host, req) =>
  req.group?.policy === 'soft-affinity' ? members(host, req) : 0;

/** soft-anti-affinity: the fewer members already on the host, the better. */
export const ServerGroupSoftAntiAffinityWeigher: WeigherFn = (host, req) =>
  req.group?.policy === 'soft-anti-affinity' ? -members(host, req) : 0;

/**
 * Local volumes (the boot volume and those in spec.volumes): the node holding most of them is preferred (the guest
 * opens those qcow2 files directly instead of over NBD, which would make that node a single point of failure). The
 * weight is the share of the server's local volumes the node holds; its default multiplier outweighs the resource
 * weighers (each at most 1 after normalisation).
 */
export const VolumeAffinityWeigher: WeigherFn = (host, req) => {
  const hosts = req.volumeHosts ?? [];
  return hosts.length === 0 ? 0 : hosts.filter((h) => h === host.name).length / hosts.length;
};

/** Every weigher by name. */
export const WEIGHERS = {
  RAMWeigher,
  CPUWeigher,
  DiskWeigher,
  ServerGroupSoftAffinityWeigher,
  ServerGroupSoftAntiAffinityWeigher,
  VolumeAffinityWeigher,
} as const satisfies Record<string, WeigherFn>;

export type WeigherName = keyof typeof WEIGHERS;

/** Nova's default multipliers: 1.0 each (spread by free resources). */
export const DEFAULT_MULTIPLIERS: Readonly<Record<WeigherName, number>> = {
  RAMWeigher: 1,
  CPUWeigher: 1,
  DiskWeigher: 1,
  ServerGroupSoftAffinityWeigher: 1,
  ServerGroupSoftAntiAffinityWeigher: 1,
  VolumeAffinityWeigher: 10,
};

/** Scales values to 0..1 (min → 0, max → 1); all equal → all 0. */
export function normalize(values: readonly number[]): number[] {
  if (values.length === 0) return [];
  let min = values[0]!;
  let max = min;
  for (const v of values) {
    if (v < min) min = v;
    if (v > max) max = v;
  }
  if (min === max) return values.map(() => 0);
  return values.map((v) => (v - min) / (max - min));
}

export interface WeighedHost {
  host: string;
  weight: number;
}

/**
 * Weighs the candidates and sorts them best first: by total weight descending, ties by host name,
 * so the order is deterministic.
 */
export function weighHosts(
  hosts: readonly HostState[],
  req: ScheduleRequest,
  multipliers: Readonly<Partial<Record<string, number>>>,
  weighers: Readonly<Record<string, WeigherFn>> = WEIGHERS,
): WeighedHost[] {
  const totals = hosts.map(() => 0);
  for (const [name, fn] of Object.entries(weighers)) {
    const m = multipliers[name] ?? 0;
    if (m === 0) continue;
    normalize(hosts.map((h) => fn(h, req))).forEach((w, i) => {
      totals[i]! += m * w;
    });
  }
  return hosts
    .map((h, i) => ({ host: h.name, weight: totals[i]! }))
    .sort((a, b) => b.weight - a.weight || (a.host < b.host ? -1 : a.host > b.host ? 1 : 0));
}
