// One scheduling decision: filter the hosts in order (stopping when none is left), weigh the survivors,
// pick the best. Pure and synchronous; the caller assumes the claim in the ledger before binding.
import { DEFAULT_FILTERS, FILTERS, type FilterName } from './filters.ts';
import type { HostState } from './host-state.ts';
import type { ScheduleRequest } from './request.ts';
import { DEFAULT_MULTIPLIERS, type WeighedHost, type WeigherName, weighHosts } from './weighers.ts';

export interface SchedulerConfig {
  /** Filters to run, in order (default {@link DEFAULT_FILTERS}). */
  filters?: readonly FilterName[];
  /** spread (default): RAM, CPU and Disk weighers at +1.0; pack: at -1.0. */
  strategy?: 'spread' | 'pack';
  /** Per-weigher multipliers, overriding the strategy (0 turns a weigher off). */
  multipliers?: Readonly<Partial<Record<WeigherName, number>>>;
  /** With `random`: pick among this many best hosts (default 1, Nova's host_subset_size). */
  hostSubsetSize?: number;
  /** A source of randomness in [0, 1), e.g. Math.random. Without it the choice is deterministic. */
  random?: () => number;
}

/** How many hosts one filter removed, and how many were left. */
export interface FilterStep {
  filter: FilterName;
  removed: number;
  left: number;
}

export type ScheduleResult =
  | { ok: true; host: string; weights: WeighedHost[]; steps: FilterStep[] }
  | { ok: false; reason: 'NoValidHost'; message: string; steps: FilterStep[] };

/** The effective multiplier of every weigher under a config. */
export function multipliersOf(config: SchedulerConfig = {}): Record<WeigherName, number> {
  const resource = config.strategy === 'pack' ? -1 : 1;
  const out: Record<WeigherName, number> = {
    ...DEFAULT_MULTIPLIERS,
    RAMWeigher: resource,
    CPUWeigher: resource,
    DiskWeigher: resource,
  };
  for (const [name, m] of Object.entries(config.multipliers ?? {})) {
    if (m !== undefined) out[name as WeigherName] = m;
  }
  return out;
}

/** `No valid host was found: 4 hosts; ComputeFilter removed 1 (3 left), RamFilter removed 3 (0 left)`. */
export function noValidHostMessage(hosts: number, steps: readonly FilterStep[]): string {
  const head = `No valid host was found: ${hosts} ${hosts === 1 ? 'host' : 'hosts'}`;
  const parts = steps.filter((s) => s.removed > 0).map((s) => `${s.filter} removed ${s.removed} (${s.left} left)`);
  return parts.length === 0 ? head : `${head}; ${parts.join(', ')}`;
}

/** Fills in the group's member hosts from the host states when the caller did not. */
function withGroupHosts(req: ScheduleRequest, hosts: readonly HostState[]): ScheduleRequest {
  const g = req.group;
  if (!g || g.hosts !== undefined) return req;
  const memberHosts = hosts
    .filter((h) => (h.groupMembers.get(g.key) ?? 0) > 0)
    .map((h) => h.name)
    .sort();
  return { ...req, group: { ...g, hosts: memberHosts } };
}

export function schedule(
  req: ScheduleRequest,
  hosts: readonly HostState[],
  config: SchedulerConfig = {},
): ScheduleResult {
  const request = withGroupHosts(req, hosts);
  const steps: FilterStep[] = [];
  let candidates = [...hosts];
  for (const name of config.filters ?? DEFAULT_FILTERS) {
    if (candidates.length === 0) break;
    const filter = FILTERS[name];
    if (!filter) throw new Error(`unknown scheduler filter ${JSON.stringify(name)}`);
    const before = candidates.length;
    candidates = candidates.filter((h) => filter(h, request));
    steps.push({ filter: name, removed: before - candidates.length, left: candidates.length });
  }
  if (candidates.length === 0) {
    return { ok: false, reason: 'NoValidHost', message: noValidHostMessage(hosts.length, steps), steps };
  }
  const weights = weighHosts(candidates, request, multipliersOf(config));
  let pick = weights[0]!;
  if (config.random) {
    const subset = Math.min(Math.max(1, Math.floor(config.hostSubsetSize ?? 1)), weights.length);
    pick = weights[Math.min(subset - 1, Math.floor(config.random() * subset))]!;
  }
  return { ok: true, host: pick.host, weights, steps };
}
