// What the scheduler knows about one hypervisor: identity, labels, liveness, capacity, reservations,
// allocation ratios, and the usage of the servers placed on it (from claims). Pure: built from a
// Hypervisor object as an informer cache holds it plus the claims the ledger holds for that node.
//
// Units are integers throughout: vCPUs, memory in MiB, disk in GiB, allocation ratios in thousandths.
import { type Hypervisor, HypervisorSpec } from '../api/compute.ts';
import { parseBytes, parseMilli, toGiB, toMiB } from '../api/meta.ts';

/** Label carrying a hypervisor's availability zone. */
export const ZONE_LABEL = 'topology.kubernetes.io/zone';
/** Zone of a hypervisor without the zone label (Nova's default_availability_zone). */
export const DEFAULT_AVAILABILITY_ZONE = 'nova';
/**
 * A hypervisor whose node Lease the operator has not seen renewed for this long is down (Nova service_down_time is
 * 60 s). The verdict is the Hypervisor controller's status.state; the scheduler only reads it.
 */
export const DEFAULT_HEARTBEAT_GRACE_SECONDS = 60;

/** The three resource classes placement tracks (VCPU, MEMORY_MB, DISK_GB). */
export interface Resources {
  vcpus: number;
  ramMiB: number;
  diskGiB: number;
}

/** What one bound (or being-bound) server consumes on its node. */
export interface Claim extends Resources {
  /** `namespace/name` of the server. */
  server: string;
  /** Hypervisor name. */
  node: string;
  /** `namespace/name` of the server group the server is a member of. */
  group?: string;
}

export interface Usage extends Resources {
  /** Number of servers placed. */
  servers: number;
}

/** Allocation ratios in thousandths (`"4.0"` → 4000). */
export interface AllocationRatios {
  vcpus: number;
  ramMiB: number;
  diskGiB: number;
}

export interface HostState {
  name: string;
  labels: Readonly<Record<string, string>>;
  /** spec.enabled. */
  enabled: boolean;
  /** status.state is up: the operator observed its node Lease renewed within the grace period. */
  alive: boolean;
  /** Set when the hypervisor's spec or status could not be read; such a host gets no servers. */
  problem?: string;
  /** status.cpu.architecture, canonical (x86_64, aarch64, i686...). */
  architecture?: string;
  /** status.accelerator: kvm or tcg. */
  accelerator?: 'kvm' | 'tcg';
  capacity: Resources;
  reserved: Resources;
  ratios: AllocationRatios;
  usage: Usage;
  /** Per server group (`namespace/name`): how many of its members are placed here. */
  groupMembers: ReadonlyMap<string, number>;
  /** Volume backends the node reports ok (status.volumeBackends). */
  volumeBackends?: readonly string[];
}

export interface HostStateOptions {
  /** Unused: liveness is the operator's status.state (kept so callers need not change). */
  heartbeatGraceSeconds?: number;
}

const MiB = 1024n ** 2n;
const GiB = 1024n ** 3n;

/** Capacity rounds down (a host never advertises a partial MiB it lacks); consumption rounds up. */
function floorMiB(q: string): number {
  return Number(parseBytes(q) / MiB);
}
function floorGiB(q: string): number {
  return Number(parseBytes(q) / GiB);
}

/** Nova's canonical architecture names (nova.objects.fields.Architecture.canonicalize), plus arm64. */
export function canonicalArch(arch: string): string {
  const a = arch.toLowerCase();
  if (['i386', 'i486', 'i586', 'x86_32', 'x86_32p'].includes(a)) return 'i686';
  if (a === 'amd64') return 'x86_64';
  if (a === 'arm64') return 'aarch64';
  return a;
}

export function emptyUsage(): Usage {
  return { vcpus: 0, ramMiB: 0, diskGiB: 0, servers: 0 };
}

/** Sums claims (only those whose node is `node`) into usage and per-group member counts. */
export function sumClaims(node: string, claims: Iterable<Claim>): { usage: Usage; groupMembers: Map<string, number> } {
  const usage = emptyUsage();
  const groupMembers = new Map<string, number>();
  for (const c of claims) {
    if (c.node !== node) continue;
    usage.vcpus += c.vcpus;
    usage.ramMiB += c.ramMiB;
    usage.diskGiB += c.diskGiB;
    usage.servers += 1;
    if (c.group !== undefined) groupMembers.set(c.group, (groupMembers.get(c.group) ?? 0) + 1);
  }
  return { usage, groupMembers };
}

/**
 * Builds the scheduler's view of a hypervisor. `placed` are the claims on it (claims for other nodes
 * are ignored). Spec defaults (allocation ratios 4.0/1.0/1.0, reserved 512Mi RAM...) are the API's own,
 * applied by parsing the spec. A hypervisor whose spec or capacity cannot be read is kept, with
 * `problem` set, so ComputeFilter can remove it and say so.
 */
export function hostStateFrom(
  hypervisor: Hypervisor,
  placed: Iterable<Claim>,
  _now?: number | Date,
  _opts: HostStateOptions = {},
): HostState {
  const name = hypervisor.metadata.name ?? '';
  const status = hypervisor.status;
  const { usage, groupMembers } = sumClaims(name, placed);
  const arch = status?.cpu?.architecture;
  const base: HostState = {
    name,
    labels: { ...(hypervisor.metadata.labels ?? {}) },
    enabled: false,
    // The operator's verdict from its own observations of the node Lease: no comparison of two hosts' clocks.
    alive: status?.state === 'up',
    ...(arch ? { architecture: canonicalArch(arch) } : {}),
    ...(status?.accelerator ? { accelerator: status.accelerator } : {}),
    capacity: { vcpus: 0, ramMiB: 0, diskGiB: 0 },
    reserved: { vcpus: 0, ramMiB: 0, diskGiB: 0 },
    ratios: { vcpus: 0, ramMiB: 0, diskGiB: 0 },
    usage,
    groupMembers,
    volumeBackends: (status?.volumeBackends ?? []).filter((b) => b.ok).map((b) => b.name),
  };
  const parsed = HypervisorSpec.safeParse(hypervisor.spec ?? {});
  if (!parsed.success) return { ...base, problem: `invalid spec: ${parsed.error.issues[0]?.message ?? 'unknown'}` };
  const spec = parsed.data;
  try {
    const cap = status?.capacity;
    return {
      ...base,
      enabled: spec.enabled,
      capacity: {
        vcpus: cap?.vcpus ?? 0,
        ramMiB: cap?.ram === undefined ? 0 : floorMiB(cap.ram),
        diskGiB: cap?.disk === undefined ? 0 : floorGiB(cap.disk),
      },
      reserved: { vcpus: spec.reserved.vcpus, ramMiB: toMiB(spec.reserved.ram), diskGiB: toGiB(spec.reserved.disk) },
      ratios: {
        vcpus: parseMilli(spec.cpuAllocationRatio),
        ramMiB: parseMilli(spec.ramAllocationRatio),
        diskGiB: parseMilli(spec.diskAllocationRatio),
      },
    };
  } catch (err) {
    return { ...base, problem: `invalid capacity: ${(err as Error).message}` };
  }
}

/**
 * Builds host states for many hypervisors from one set of claims (e.g. `ledger.claims()`).
 * `exclude` drops the claim of the server being scheduled, so a retried request does not count itself.
 */
export function hostStatesFrom(
  hypervisors: Iterable<Hypervisor>,
  claims: Iterable<Claim>,
  now: number | Date,
  opts: HostStateOptions & { exclude?: string } = {},
): HostState[] {
  const byNode = new Map<string, Claim[]>();
  for (const c of claims) {
    if (c.server === opts.exclude) continue;
    const list = byNode.get(c.node) ?? [];
    byNode.set(c.node, list);
    list.push(c);
  }
  return [...hypervisors].map((hv) => hostStateFrom(hv, byNode.get(hv.metadata.name ?? '') ?? [], now, opts));
}

/** floor((capacity - reserved) × ratio), never negative: placement's inventory capacity. */
function limit(capacity: number, reserved: number, ratioMilli: number): number {
  const usable = capacity - reserved;
  if (usable <= 0) return 0;
  return Number((BigInt(usable) * BigInt(ratioMilli)) / 1000n);
}

/** What servers may use in total on the host, after reservations and allocation ratios. */
export function limitsOf(host: HostState): Resources {
  return {
    vcpus: limit(host.capacity.vcpus, host.reserved.vcpus, host.ratios.vcpus),
    ramMiB: limit(host.capacity.ramMiB, host.reserved.ramMiB, host.ratios.ramMiB),
    diskGiB: limit(host.capacity.diskGiB, host.reserved.diskGiB, host.ratios.diskGiB),
  };
}

/** Limits minus usage (negative when the host is over-committed, e.g. after lowering a ratio). */
export function freeOf(host: HostState): Resources {
  const l = limitsOf(host);
  return {
    vcpus: l.vcpus - host.usage.vcpus,
    ramMiB: l.ramMiB - host.usage.ramMiB,
    diskGiB: l.diskGiB - host.usage.diskGiB,
  };
}

/** The host's availability zone: its zone label, or the default zone. */
export function zoneOf(host: HostState): string {
  return host.labels[ZONE_LABEL] ?? DEFAULT_AVAILABILITY_ZONE;
}
