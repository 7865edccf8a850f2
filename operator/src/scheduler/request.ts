// What a server asks of the scheduler, and the helpers that derive it from API objects.
import type { FlavorSpec, ServerGroup, ServerGroupSpec } from '../api/compute.ts';
import { toGiB, toMiB } from '../api/meta.ts';
import type { Resources } from './host-state.ts';

export type GroupPolicyName = ServerGroupSpec['policy'];

/** The server group of a request, with its policy. */
export interface RequestGroup {
  /** `namespace/name` of the ServerGroup. */
  key: string;
  policy: GroupPolicyName;
  /** Anti-affinity only: members allowed per host (default 1). */
  maxServerPerHost?: number;
  /**
   * Hosts where members are already placed. When absent, `schedule` derives it from the host
   * states it is given; pass it (e.g. `ledger.hostsOfGroup(key)`) if members may sit on hypervisors
   * missing from that list.
   */
  hosts?: readonly string[];
}

export interface ScheduleRequest {
  /** `namespace/name` of the server. */
  server: string;
  /** What the server consumes (see {@link flavorClaim}). */
  resources: Resources;
  /** Image properties (hw_architecture, img_hv_type...). */
  imageProperties?: Readonly<Record<string, string>>;
  availabilityZone?: string;
  nodeSelector?: Readonly<Record<string, string>>;
  group?: RequestGroup;
  /** Hosts not to use, e.g. the current host on migrate or reschedule. */
  ignoreHosts?: readonly string[];
  /** Volume backends the host must reach (a boot volume's backend). */
  volumeBackends?: readonly string[];
  /** Nodes holding the server's local volumes (boot volume and spec.volumes), one entry per volume: preferred. */
  volumeHosts?: readonly string[];
}

/** The fields of an Image the claim depends on. */
export interface ImageSizing {
  spec?: { minDisk?: number };
  status?: { virtualSize?: number };
}

export interface FlavorClaimOptions {
  /** The root disk is a volume, not local disk: it is not counted (Nova's boot-from-volume). */
  bootFromVolume?: boolean;
}

/**
 * Resources a server with this flavor consumes on its node, like Nova's resources_from_flavor:
 * vCPUs, RAM in MiB, and DISK_GB = root + ephemeral + swap, each rounded up to whole GiB. A flavor
 * with disk 0 sizes the root disk to the image: the larger of the image's minDisk and its virtual size
 * (when known), else 0.
 */
export function flavorClaim(flavor: FlavorSpec, image?: ImageSizing, opts: FlavorClaimOptions = {}): Resources {
  let root = toGiB(flavor.disk);
  if (root === 0 && image) {
    const virtual = image.status?.virtualSize;
    const virtualGiB = virtual === undefined ? 0 : Number((BigInt(virtual) + 1024n ** 3n - 1n) / 1024n ** 3n);
    root = Math.max(image.spec?.minDisk ?? 0, virtualGiB);
  }
  if (opts.bootFromVolume) root = 0;
  return {
    vcpus: flavor.vcpus,
    ramMiB: toMiB(flavor.ram),
    diskGiB: root + toGiB(flavor.ephemeral ?? '0') + toGiB(flavor.swap ?? '0'),
  };
}

/** The request group of a ServerGroup object (maxServerPerHost defaults to 1 for anti-affinity). */
export function groupPolicyOf(group: Pick<ServerGroup, 'metadata' | 'spec'>): RequestGroup {
  const key = `${group.metadata.namespace ?? ''}/${group.metadata.name ?? ''}`;
  const { policy, rules } = group.spec;
  if (policy === 'anti-affinity') return { key, policy, maxServerPerHost: rules?.maxServerPerHost ?? 1 };
  return { key, policy };
}
