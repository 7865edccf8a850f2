// Builders shared by the scheduler's unit tests (not part of the scheduler's API).
import { type Hypervisor, HypervisorKind } from '../api/compute.ts';
import { type Claim, type HostState, hostStateFrom } from './host-state.ts';
import type { ScheduleRequest } from './request.ts';

export const NOW = Date.parse('2025-06-01T12:00:00Z');

export interface HvOptions {
  vcpus?: number;
  ram?: string;
  disk?: string;
  labels?: Record<string, string>;
  enabled?: boolean;
  /** status.state as the operator's Hypervisor controller wrote it; null: not judged yet. Default up. */
  state?: 'up' | 'down' | null;
  arch?: string;
  accelerator?: 'kvm' | 'tcg';
  spec?: Record<string, unknown>;
}

/** A Hypervisor as the API server returns it (defaults applied), 8 vCPUs / 16Gi / 100Gi, alive. */
export function hypervisor(name: string, o: HvOptions = {}): Hypervisor {
  const state = o.state === undefined ? 'up' : o.state;
  return HypervisorKind.schema.parse({
    metadata: { name, ...(o.labels ? { labels: o.labels } : {}) },
    spec: { enabled: o.enabled ?? true, ...o.spec },
    status: {
      capacity: { vcpus: o.vcpus ?? 8, ram: o.ram ?? '16Gi', disk: o.disk ?? '100Gi' },
      ...(state === null ? {} : { state }),
      ...(o.arch ? { cpu: { architecture: o.arch } } : {}),
      ...(o.accelerator ? { accelerator: o.accelerator } : {}),
    },
  });
}

export function host(name: string, o: HvOptions = {}, claims: Claim[] = []): HostState {
  return hostStateFrom(hypervisor(name, o), claims, NOW);
}

let serial = 0;
export function claim(node: string, c: Partial<Claim> = {}): Claim {
  serial += 1;
  return { server: `ns/s${serial}`, node, vcpus: 1, ramMiB: 1024, diskGiB: 10, ...c };
}

export function request(r: Partial<ScheduleRequest> = {}): ScheduleRequest {
  return { server: 'ns/new', resources: { vcpus: 1, ramMiB: 1024, diskGiB: 10 }, ...r };
}
