// Host filters: each decides alone whether one host can take the request. The registry maps a name
// (the one NoValidHost messages show) to the function; a new filter is a new entry.
import { canonicalArch, freeOf, type HostState, zoneOf } from './host-state.ts';
import type { ScheduleRequest } from './request.ts';

export type FilterFn = (host: HostState, req: ScheduleRequest) => boolean;

/** Service enabled and up (heartbeating), and readable. */
export const ComputeFilter: FilterFn = (host) => host.enabled && host.alive && host.problem === undefined;

/** Not one of the hosts the request excludes (its current host on migrate, failed hosts on reschedule). */
export const IgnoreHostsFilter: FilterFn = (host, req) => !(req.ignoreHosts ?? []).includes(host.name);

/** The host's zone (label, or the default zone) is the requested one; no zone requested matches any. */
export const AvailabilityZoneFilter: FilterFn = (host, req) =>
  req.availabilityZone === undefined || zoneOf(host) === req.availabilityZone;

/** Every label of the request's node selector is on the host with the same value. */
export const NodeSelectorFilter: FilterFn = (host, req) =>
  Object.entries(req.nodeSelector ?? {}).every(([k, v]) => host.labels[k] === v);

/** Hypervisor types a host supports: a KVM host also runs plain QEMU guests. */
function hvTypes(host: HostState): string[] {
  if (host.accelerator === 'kvm') return ['kvm', 'qemu'];
  if (host.accelerator === 'tcg') return ['qemu'];
  return [];
}

/**
 * Image properties the host must satisfy: hw_architecture (canonical names, so amd64 = x86_64) and
 * img_hv_type (kvm needs a KVM host). A property the image does not set matches any host; one it sets
 * fails on a host that does not report the matching fact.
 */
export const ImagePropertiesFilter: FilterFn = (host, req) => {
  const arch = req.imageProperties?.hw_architecture;
  if (arch !== undefined && (host.architecture === undefined || canonicalArch(arch) !== host.architecture)) {
    return false;
  }
  const hvType = req.imageProperties?.img_hv_type;
  return hvType === undefined || hvTypes(host).includes(hvType.toLowerCase());
};

/** Placement semantics: a zero request always fits; otherwise used + requested ≤ limit. */
function fits(requested: number, free: number): boolean {
  return requested === 0 || requested <= free;
}

/** VCPU: (capacity - reserved) × cpu ratio - used. */
export const CoreFilter: FilterFn = (host, req) => fits(req.resources.vcpus, freeOf(host).vcpus);

/** MEMORY_MB: (capacity - reserved) × ram ratio - used. */
export const RamFilter: FilterFn = (host, req) => fits(req.resources.ramMiB, freeOf(host).ramMiB);

/** DISK_GB: (capacity - reserved) × disk ratio - used. */
export const DiskFilter: FilterFn = (host, req) => fits(req.resources.diskGiB, freeOf(host).diskGiB);

/** Hard affinity: once members are placed, only their host(s). */
export const ServerGroupAffinityFilter: FilterFn = (host, req) => {
  const g = req.group;
  if (g?.policy !== 'affinity') return true;
  const hosts = g.hosts ?? [];
  return hosts.length === 0 || hosts.includes(host.name);
};

/** Hard anti-affinity: fewer than maxServerPerHost (default 1) members on the host. */
export const ServerGroupAntiAffinityFilter: FilterFn = (host, req) => {
  const g = req.group;
  if (g?.policy !== 'anti-affinity') return true;
  return (host.groupMembers.get(g.key) ?? 0) < (g.maxServerPerHost ?? 1);
};

/** Boot from volume: the host reaches every volume backend the request needs (its volumeBackends probes ok). */
export const VolumeBackendFilter: FilterFn = (host, req) =>
  (req.volumeBackends ?? []).every((b) => (host.volumeBackends ?? []).includes(b));

/** Every filter by name. */
export const FILTERS = {
  ComputeFilter,
  IgnoreHostsFilter,
  AvailabilityZoneFilter,
  NodeSelectorFilter,
  ImagePropertiesFilter,
  RamFilter,
  CoreFilter,
  DiskFilter,
  ServerGroupAffinityFilter,
  ServerGroupAntiAffinityFilter,
  VolumeBackendFilter,
} as const satisfies Record<string, FilterFn>;

export type FilterName = keyof typeof FILTERS;

/** The filters `schedule` runs, in order, unless configured otherwise. */
export const DEFAULT_FILTERS: readonly FilterName[] = [
  'ComputeFilter',
  'IgnoreHostsFilter',
  'AvailabilityZoneFilter',
  'NodeSelectorFilter',
  'ImagePropertiesFilter',
  'RamFilter',
  'CoreFilter',
  'DiskFilter',
  'ServerGroupAffinityFilter',
  'ServerGroupAntiAffinityFilter',
  'VolumeBackendFilter',
];
