// Pure IPAM logic: effective subnets (gateway, pools, reserved addresses), free-address candidates, counts,
// address formatting, VNI candidates and random MACs. No I/O: the controllers feed it what the API holds (the
// IPAllocation and SegmentAllocation objects are the only record of what is taken) and claim what it proposes.
import { isIP } from 'node:net';
import { parseCidr } from '../api/meta.ts';
import { formatIP, ipToBigInt, MAC_PREFIX, MAX_VNI, type Subnet } from '../api/network.ts';

export { formatIP };

/** An inclusive range of addresses, as integers. */
export interface Range {
  start: bigint;
  end: bigint;
}

/** A subnet as IPAM sees it: bounds, gateway and the pools addresses are handed out from. */
export interface EffectiveSubnet {
  name: string;
  cidr: string;
  family: 4 | 6;
  prefix: number;
  /** The network address (first of the CIDR). */
  first: bigint;
  /** The last address of the CIDR (the IPv4 broadcast address). */
  last: bigint;
  /** Effective gateway, unless disabled. */
  gateway?: bigint;
  /** Pools clipped to the CIDR, sorted and merged. */
  pools: Range[];
  enableDHCP: boolean;
}

/** An address in canonical text form (see {@link formatIP}); throws on a malformed address. */
export function canonicalIP(ip: string): string {
  const family = isIP(ip);
  if (family === 0) throw new Error(`not an IP address: ${ip}`);
  return formatIP(ipToBigInt(ip), family as 4 | 6);
}

function mergeRanges(ranges: Range[]): Range[] {
  const sorted = [...ranges].sort((a, b) => (a.start < b.start ? -1 : a.start > b.start ? 1 : 0));
  const out: Range[] = [];
  for (const r of sorted) {
    const prev = out[out.length - 1];
    if (prev && r.start <= prev.end + 1n) {
      if (r.end > prev.end) prev.end = r.end;
    } else {
      out.push({ ...r });
    }
  }
  return out;
}

/**
 * The effective form of a subnet. Gateway: spec.gatewayIP, else the first host address unless disableGateway.
 * Pools: spec.allocationPools, else the whole CIDR without the network address, the IPv4 broadcast address and
 * the gateway (Neutron's default pools). Reserved addresses are never handed out even when a pool covers them.
 */
export function effectiveSubnet(s: Subnet): EffectiveSubnet {
  const c = parseCidr(s.cidr);
  if (!c) throw new Error(`subnet ${s.name}: invalid cidr ${s.cidr}`);
  const bits = c.family === 4 ? 32 : 128;
  const size = 1n << BigInt(bits - c.prefix);
  const first = (ipToBigInt(c.address) / size) * size;
  const last = first + size - 1n;
  const hosts = hostRange(c.family, c.prefix, first, last);
  let gateway: bigint | undefined;
  if (s.gatewayIP !== undefined) gateway = ipToBigInt(s.gatewayIP);
  else if (!s.disableGateway && hosts) gateway = hosts.start;
  let pools: Range[];
  if (s.allocationPools && s.allocationPools.length > 0) {
    pools = s.allocationPools
      .map((p) => ({ start: ipToBigInt(p.start), end: ipToBigInt(p.end) }))
      .map((p) => ({ start: p.start < first ? first : p.start, end: p.end > last ? last : p.end }))
      .filter((p) => p.start <= p.end);
  } else if (hosts) {
    pools = [hosts];
    if (gateway !== undefined && gateway >= hosts.start && gateway <= hosts.end) {
      pools = [
        { start: hosts.start, end: gateway - 1n },
        { start: gateway + 1n, end: hosts.end },
      ].filter((p) => p.start <= p.end);
    }
  } else {
    pools = [];
  }
  return {
    name: s.name,
    cidr: s.cidr,
    family: c.family,
    prefix: c.prefix,
    first,
    last,
    ...(gateway !== undefined ? { gateway } : {}),
    pools: mergeRanges(pools),
    enableDHCP: s.enableDHCP ?? true,
  };
}

/** Usable host addresses of a CIDR: IPv4 without network and broadcast (/31 and /32 whole), IPv6 without ::0. */
function hostRange(family: 4 | 6, prefix: number, first: bigint, last: bigint): Range | undefined {
  if (family === 4) return prefix >= 31 ? { start: first, end: last } : { start: first + 1n, end: last - 1n };
  // IPv6: the first address is the subnet-router anycast address (RFC 4291 2.6.1).
  return prefix === 128 ? { start: first, end: last } : { start: first + 1n, end: last };
}

/** Whether an address may never be handed out: network address, IPv4 broadcast, gateway. */
export function isReserved(sub: EffectiveSubnet, n: bigint): boolean {
  if (n === sub.gateway) return true;
  if (sub.family === 4 && sub.prefix < 31) return n === sub.first || n === sub.last;
  if (sub.family === 6 && sub.prefix < 128) return n === sub.first;
  return false;
}

/** Whether an address lies in the CIDR of the subnet. */
export function inSubnet(sub: EffectiveSubnet, n: bigint): boolean {
  return n >= sub.first && n <= sub.last;
}

/** Whether an address lies in one of the pools. */
export function inPools(sub: EffectiveSubnet, n: bigint): boolean {
  return sub.pools.some((p) => n >= p.start && n <= p.end);
}

/** How many addresses the pools can hand out (reserved addresses inside pools excluded). */
export function poolCapacity(sub: EffectiveSubnet): bigint {
  let total = 0n;
  for (const p of sub.pools) total += p.end - p.start + 1n;
  for (const r of reservedList(sub)) if (inPools(sub, r)) total--;
  return total;
}

function reservedList(sub: EffectiveSubnet): bigint[] {
  const out = new Set<bigint>();
  if (sub.gateway !== undefined) out.add(sub.gateway);
  if (sub.family === 4 && sub.prefix < 31) {
    out.add(sub.first);
    out.add(sub.last);
  }
  if (sub.family === 6 && sub.prefix < 128) out.add(sub.first);
  return [...out];
}

/**
 * Free addresses of the pools in ascending order, skipping reserved addresses and those `taken` reports.
 * Lazy: callers take as many as they need (IPv6 pools are practically endless).
 */
export function* candidates(sub: EffectiveSubnet, taken: (n: bigint) => boolean): Generator<bigint> {
  for (const p of sub.pools) {
    for (let n = p.start; n <= p.end; n++) {
      if (!isReserved(sub, n) && !taken(n)) yield n;
    }
  }
}

/** The first free address, or undefined when the pools are exhausted. */
export function firstFree(sub: EffectiveSubnet, taken: (n: bigint) => boolean): bigint | undefined {
  for (const n of candidates(sub, taken)) return n;
  return undefined;
}

/** Addresses claimed in the subnet and addresses still free in its pools, capped at Number.MAX_SAFE_INTEGER. */
export function usage(sub: EffectiveSubnet, claimed: Iterable<bigint>): { allocated: number; available: number } {
  let allocated = 0;
  let inPoolTaken = 0n;
  for (const n of new Set(claimed)) {
    if (!inSubnet(sub, n)) continue;
    allocated++;
    if (inPools(sub, n) && !isReserved(sub, n)) inPoolTaken++;
  }
  const free = poolCapacity(sub) - inPoolTaken;
  const cap = BigInt(Number.MAX_SAFE_INTEGER);
  return { allocated, available: Number(free < 0n ? 0n : free > cap ? cap : free) };
}

/** FNV-1a 32-bit hash. */
function fnv1a(s: string): number {
  let h = 2166136261;
  for (const c of s) h = Math.imul(h ^ c.charCodeAt(0), 16777619) >>> 0;
  return h;
}

/** First VNI a network tries: a hash of its uid in [1, MAX_VNI], so restarts and retries try the same one. */
export function vniStart(uid: string): number {
  return (fnv1a(uid) % MAX_VNI) + 1;
}

/** The VNI probed after `vni` (wrapping from MAX_VNI to 1). */
export function nextVni(vni: number): number {
  return vni >= MAX_VNI ? 1 : vni + 1;
}

/** A MAC with OpenStack's prefix fa:16:3e and the three given bytes. */
export function macFromBytes(bytes: ArrayLike<number>): string {
  const hex = Array.from({ length: 3 }, (_, i) => ((bytes[i] ?? 0) & 255).toString(16).padStart(2, '0'));
  return `${MAC_PREFIX}:${hex.join(':')}`;
}

/** MTU of a VXLAN network on an underlay of `underlayMtu` with IPv4 endpoints (Neutron: underlay - 50). */
export const VXLAN_OVERHEAD = 50;
export function vxlanMtu(underlayMtu: number): number {
  return underlayMtu - VXLAN_OVERHEAD;
}
