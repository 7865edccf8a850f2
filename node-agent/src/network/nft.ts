// Security groups and anti-spoofing with nftables, backend-neutral (the Linux bridge and the OVS hybrid-plug backends
// both use it). Design (b2) of shared/reference/networking.md §2.8, for kernels without bridge-family conntrack:
//
//  table bridge stratus_l2   per-port anti-spoofing on frames from the VM (bridge prerouting), the port marks
//                            (bridge forward: source port index in mark bits 16-27, destination port index in bits
//                            0-11, bit 28 = "set by Stratus"), and per-device source-MAC drops (the distributed DHCP
//                            server's MAC must not cross a VXLAN device).
//  table inet stratus_sg     conntrack zone per bridge (raw prerouting); per port an egress chain (selected by the
//                            source-port mark; allowed traffic `return`s so the receiver's ingress chain still runs)
//                            and an ingress chain (selected by the destination-port mark); default drop; remote
//                            groups as named interval sets of member addresses. br_netfilter hands bridged IPv4/IPv6
//                            to this table (needs net.bridge.bridge-nf-call-iptables=1 and -ip6tables=1).
//
// Rendering is pure (renderRules); NftManager applies a rendering atomically (one `nft -f -` batch per table: add
// table; delete table; table {...}), skips the write when the table already carries the rendering's hash, and deletes
// the conntrack entries of permissions that went away (Neutron's behaviour) so removed rules also cut existing flows.
import { createHash } from 'node:crypto';
import { isIPv4, isIPv6 } from 'node:net';
import { formatIP, ipToBigInt } from '../../../operator/src/api/network.ts';
import type { PortPlan, PortResult, SecurityGroupPlan, SecurityGroupRulePlan } from './backend.ts';
import { type Exec, ExecError } from './exec.ts';

/** Mark bits: destination port index (ingress), source port index (egress), and the "set by Stratus" flag. */
export const MARK = { dstMask: 0x00000fff, srcMask: 0x0fff0000, srcShift: 16, flag: 0x10000000 } as const;
/** Port indexes are 1..MAX_PORTS (12 mark bits each way). */
export const MAX_PORTS = 0xfff;

/** Default table names (one node = one set of tables). */
export const DEFAULT_TABLES = { bridge: 'stratus_l2', inet: 'stratus_sg' } as const;

/** The fields of a PortPlan the rules depend on. */
export type NftPortPlan = Pick<
  PortPlan,
  'id' | 'mac' | 'fixedIPs' | 'allowedAddressPairs' | 'portSecurity' | 'securityGroups'
>;

/** One port as the data plane wires it. */
export interface NftPort {
  port: NftPortPlan;
  /**
   * The device the VM's frames enter and leave the Linux bridge by (the tap; for an OVS hybrid plug the tap in its
   * per-port bridge). Bridge-family hooks only see Linux bridge ports.
   */
  device: string;
  /** The Linux bridge `device` is a port of (what the inet hooks see as iifname/oifname). */
  bridge: string;
  /** Conntrack zone of the port's traffic (1..65535): per network (one bridge per network) or per port (hybrid). */
  zone: number;
}

/** Frames with source MAC `mac` are dropped when they enter or leave by `device` (bridge-family rule). */
export interface L2Drop {
  device: string;
  mac: string;
}

export interface NftInput {
  ports: NftPort[];
  /** Every group the ports use or name as a remote group (NodeNetworkPlan.securityGroups). */
  securityGroups: SecurityGroupPlan[];
  l2Drops?: L2Drop[];
  /** Table names (default DEFAULT_TABLES); tests or a second agent in one namespace may pick others. */
  tables?: { bridge: string; inet: string };
}

/** Per secured port: what its chains allow, for conntrack cleanup when a permission goes away. */
export interface PortPermissions {
  zone: number;
  /** Host addresses of the port (fixed IPs and allowed-pair addresses without prefix). */
  ips: string[];
  /** One key per allowed flow class (rule text plus the resolved remote-group members). */
  ingress: string[];
  egress: string[];
}

export interface RenderedRules {
  tables: { bridge: string; inet: string };
  /** Complete `table bridge <name> {...}` text, or undefined when nothing needs the table. */
  bridge?: string;
  /** Complete `table inet <name> {...}` text, or undefined when nothing needs the table. */
  inet?: string;
  /** Mark index per secured port id. */
  portIndex: Record<string, number>;
  /** Per secured port id. */
  permissions: Record<string, PortPermissions>;
  /** Rules that could not be rendered (unknown protocol...), one line each; the rest is still rendered. */
  warnings: string[];
}

// ---------------------------------------------------------------------------------------------------------------
// Address helpers

/** Parsed address or prefix. */
export interface Cidr {
  version: 4 | 6;
  /** Network address as a bigint (host bits cleared). */
  addr: bigint;
  prefix: number;
}

/** Parses "10.0.0.5", "10.0.0.0/24", "2001:db8::/64"; host bits are cleared. Throws on malformed input. */
export function parseCidr(text: string): Cidr {
  const [ip, p] = text.split('/');
  const version: 4 | 6 = isIPv4(ip ?? '') ? 4 : isIPv6(ip ?? '') ? 6 : (0 as never);
  if (!version) throw new Error(`invalid address or prefix ${text}`);
  const bits = version === 4 ? 32 : 128;
  const prefix = p === undefined ? bits : Number(p);
  if (!Number.isInteger(prefix) || prefix < 0 || prefix > bits) throw new Error(`invalid prefix length in ${text}`);
  const hostBits = BigInt(bits - prefix);
  const addr = (ipToBigInt(ip!) >> hostBits) << hostBits;
  return { version, addr, prefix };
}

/** Canonical text of a prefix: "10.0.0.5" for a host, "10.0.0.0/24" otherwise. */
export function formatCidr(c: Cidr): string {
  const ip = formatIP(c.addr, c.version);
  return c.prefix === (c.version === 4 ? 32 : 128) ? ip : `${ip}/${c.prefix}`;
}

function contains(outer: Cidr, inner: Cidr): boolean {
  if (outer.version !== inner.version || outer.prefix > inner.prefix) return false;
  const bits = BigInt((outer.version === 4 ? 32 : 128) - outer.prefix);
  return outer.addr >> bits === inner.addr >> bits;
}

/**
 * Canonical, sorted, de-duplicated prefixes of one IP version with every prefix covered by another one removed
 * (nft rejects overlapping intervals in anonymous sets). Invalid entries are skipped.
 */
export function normalizePrefixes(items: readonly string[], version: 4 | 6): string[] {
  const parsed: Cidr[] = [];
  for (const t of items) {
    try {
      const c = parseCidr(t);
      if (c.version === version) parsed.push(c);
    } catch {
      // skipped: the API validates addresses; a bad one must not break the whole table
    }
  }
  parsed.sort((a, b) => a.prefix - b.prefix || (a.addr < b.addr ? -1 : a.addr > b.addr ? 1 : 0));
  const kept: Cidr[] = [];
  for (const c of parsed) if (!kept.some((k) => contains(k, c))) kept.push(c);
  return kept
    .sort((a, b) => (a.addr < b.addr ? -1 : a.addr > b.addr ? 1 : a.prefix - b.prefix))
    .map((c) => formatCidr(c));
}

/** IPv6 link-local address derived from a MAC (EUI-64), which guests use before anything else. */
export function linkLocalFromMac(mac: string): string {
  const b = mac.split(':').map((x) => Number.parseInt(x, 16));
  b[0] = b[0]! ^ 0x02;
  const eui = [b[0]!, b[1]!, b[2]!, 0xff, 0xfe, b[3]!, b[4]!, b[5]!];
  const groups = [0, 2, 4, 6].map((i) => ((eui[i]! << 8) | eui[i + 1]!).toString(16));
  return `fe80::${groups.join(':')}`;
}

// ---------------------------------------------------------------------------------------------------------------
// Rendering

const PROTOCOLS: Record<string, number> = {
  icmp: 1,
  igmp: 2,
  tcp: 6,
  egp: 8,
  udp: 17,
  dccp: 33,
  ipv6: 41,
  rsvp: 46,
  gre: 47,
  esp: 50,
  ah: 51,
  icmpv6: 58,
  'ipv6-icmp': 58,
  ospf: 89,
  pim: 103,
  vrrp: 112,
  sctp: 132,
  udplite: 136,
};
/** Protocols whose port range is a transport port range (`th dport`). */
const PORT_PROTOCOLS = new Set([6, 17, 33, 132, 136]);

/** Protocol number of a rule's protocol (name or number as text); undefined: any; throws if unknown. */
export function protocolNumber(protocol: string | undefined, ethertype: 'IPv4' | 'IPv6'): number | undefined {
  if (protocol === undefined || protocol === '' || protocol === 'any') return undefined;
  let n = /^\d+$/.test(protocol) ? Number(protocol) : PROTOCOLS[protocol.toLowerCase()];
  if (n === undefined || n > 255) throw new Error(`unknown protocol ${protocol}`);
  // Neutron: "icmp" on an IPv6 rule means ICMPv6
  if (ethertype === 'IPv6' && n === 1) n = 58;
  return n;
}

const q = (s: string) => `"${s.replaceAll('"', '')}"`;
const hex = (n: number) => `0x${n.toString(16).padStart(8, '0')}`;

/** Name of the named set holding a remote group's member prefixes of one IP version. */
function groupSetName(index: number, version: 4 | 6): string {
  return `rg_${index}_v${version}`;
}

interface RuleText {
  /** nft match (without verdict) */
  match: string;
  /** permission key (match with remote group members resolved) */
  key: string;
}

/** Renders one security group rule as an nft match for a port chain; throws if it cannot be rendered. */
export function renderRuleMatch(
  rule: SecurityGroupRulePlan,
  groupIndex: ReadonlyMap<string, number>,
  groupMembers: ReadonlyMap<string, readonly string[]>,
): RuleText | undefined {
  const v = rule.ethertype === 'IPv6' ? 6 : 4;
  const fam = v === 4 ? 'ip' : 'ip6';
  const parts = [`meta nfproto ${v === 4 ? 'ipv4' : 'ipv6'}`];
  const keyParts = [...parts];
  const peer = rule.direction === 'ingress' ? 'saddr' : 'daddr';
  if (rule.remoteIPPrefix) {
    const c = parseCidr(rule.remoteIPPrefix);
    if (c.version !== v) return undefined; // a prefix of the other family never matches (the API should refuse it)
    if (c.prefix !== 0) {
      parts.push(`${fam} ${peer} ${formatCidr(c)}`);
      keyParts.push(parts.at(-1)!);
    }
  } else if (rule.remoteGroupId) {
    const idx = groupIndex.get(rule.remoteGroupId);
    if (idx === undefined) return undefined; // unknown group: no members, matches nothing
    parts.push(`${fam} ${peer} @${groupSetName(idx, v)}`);
    const members = normalizePrefixes(groupMembers.get(rule.remoteGroupId) ?? [], v);
    keyParts.push(`${fam} ${peer} {${members.join(',')}}`);
  }
  const proto = protocolNumber(rule.protocol, rule.ethertype);
  if (proto !== undefined) {
    const p = [`meta l4proto ${proto}`];
    const min = rule.portRangeMin;
    const max = rule.portRangeMax;
    if (PORT_PROTOCOLS.has(proto) && min !== undefined) {
      const hi = max ?? min;
      if (!(min === 1 && hi === 65535) && !(min === 0 && hi === 65535))
        p.push(`th dport ${min === hi ? min : `${min}-${hi}`}`);
    } else if ((proto === 1 || proto === 58) && min !== undefined) {
      // Neutron: port_range_min = ICMP type, port_range_max = ICMP code
      const icmp = proto === 1 ? 'icmp' : 'icmpv6';
      p.push(`${icmp} type ${min}`);
      if (max !== undefined) p.push(`${icmp} code ${max}`);
    }
    parts.push(...p);
    keyParts.push(...p);
  }
  return { match: parts.join(' '), key: keyParts.join(' ') };
}

/** Port-level address information for anti-spoofing: allowed source addresses per source MAC. */
export function allowedSources(port: NftPortPlan): Map<string, { v4: string[]; v6: string[] }> {
  const byMac = new Map<string, string[]>();
  const add = (mac: string, ip: string) => {
    const m = mac.toLowerCase();
    if (!byMac.has(m)) byMac.set(m, []);
    byMac.get(m)!.push(ip);
  };
  add(port.mac, linkLocalFromMac(port.mac));
  for (const f of port.fixedIPs) add(port.mac, f.ipAddress);
  for (const p of port.allowedAddressPairs) {
    const mac = p.macAddress || port.mac;
    add(mac, p.ipAddress);
    if (mac.toLowerCase() !== port.mac.toLowerCase()) add(mac, linkLocalFromMac(mac));
  }
  const out = new Map<string, { v4: string[]; v6: string[] }>();
  for (const [mac, ips] of [...byMac].sort(([a], [b]) => a.localeCompare(b)))
    out.set(mac, { v4: normalizePrefixes(ips, 4), v6: normalizePrefixes(ips, 6) });
  return out;
}

/** Host addresses of a port (for conntrack cleanup). */
function hostAddresses(port: NftPortPlan): string[] {
  const ips = [...port.fixedIPs.map((f) => f.ipAddress), ...port.allowedAddressPairs.map((p) => p.ipAddress)];
  const out = new Set<string>();
  for (const t of ips) {
    try {
      const c = parseCidr(t);
      if (c.prefix === (c.version === 4 ? 32 : 128)) out.add(formatCidr(c));
    } catch {
      // skipped
    }
  }
  return [...out].sort();
}

function table(family: string, name: string, hash: string, body: string[]): string {
  // The hash in the comment lets NftManager skip identical writes (nft 1.0.6 JSON does not show table comments, the
  // text listing does).
  return `table ${family} ${name} {\n\tcomment "stratus:${hash}"\n${body.join('\n')}\n}\n`;
}

function chain(name: string, head: string | undefined, rules: string[]): string {
  // nft 1.0.6: every rule on its own line; the chain's `}` on its own line (not on the table's line).
  const lines = [`\tchain ${name} {`];
  if (head) lines.push(`\t\t${head}`);
  for (const r of rules) lines.push(`\t\t${r}`);
  lines.push('\t}');
  return lines.join('\n');
}

function contentHash(text: string): string {
  return createHash('sha256').update(text).digest('hex').slice(0, 16);
}

/**
 * Renders the two tables for a node from its ports and groups. Pure. Ports are indexed by device name order (only
 * ports with port security get an index, chains and anti-spoofing); ports without port security are left alone.
 */
export function renderRules(input: NftInput): RenderedRules {
  const tables = input.tables ?? DEFAULT_TABLES;
  const warnings: string[] = [];
  const secured = input.ports.filter((p) => p.port.portSecurity).sort((a, b) => a.device.localeCompare(b.device));
  if (secured.length > MAX_PORTS) throw new Error(`at most ${MAX_PORTS} ports with port security per node`);
  const portIndex: Record<string, number> = {};
  secured.forEach((p, i) => {
    portIndex[p.port.id] = i + 1;
  });
  const groups = [...input.securityGroups].sort((a, b) => a.id.localeCompare(b.id));
  const groupIndex = new Map(groups.map((g, i) => [g.id, i + 1]));
  const groupMembers = new Map(groups.map((g) => [g.id, g.memberIPs]));
  const groupById = new Map(groups.map((g) => [g.id, g]));
  const permissions: Record<string, PortPermissions> = {};

  // --- bridge table
  const l2Drops = [...(input.l2Drops ?? [])].sort(
    (a, b) => a.device.localeCompare(b.device) || a.mac.localeCompare(b.mac),
  );
  let bridgeText: string | undefined;
  if (secured.length > 0 || l2Drops.length > 0) {
    const pre: string[] = [];
    const fwd: string[] = [`meta mark set meta mark & ${hex(~(MARK.dstMask | MARK.srcMask | MARK.flag) >>> 0)}`];
    const chains: string[] = [];
    for (const d of l2Drops) pre.push(`iifname ${q(d.device)} ether saddr ${d.mac.toLowerCase()} drop`);
    for (const d of l2Drops) fwd.push(`oifname ${q(d.device)} ether saddr ${d.mac.toLowerCase()} drop`);
    for (const p of secured) {
      const i = portIndex[p.port.id]!;
      pre.push(`iifname ${q(p.device)} jump spoof_${i}`);
      fwd.push(`iifname ${q(p.device)} meta mark set meta mark | ${hex(MARK.flag | (i << MARK.srcShift))}`);
      fwd.push(`oifname ${q(p.device)} meta mark set meta mark | ${hex(MARK.flag | i)}`);
      const sources = allowedSources(p.port);
      const rules = [
        `ether saddr != { ${[...sources.keys()].join(', ')} } drop`,
        // DHCP discover/request before the client has an address
        'ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept',
        // no DHCP servers and no router advertisements from VMs
        'ether type ip udp sport 67 udp dport 68 drop',
        'ether type ip6 udp sport 547 udp dport 546 drop',
        'icmpv6 type nd-router-advert drop',
        // IPv6 duplicate address detection and router solicitation before an address is usable
        'ip6 saddr :: icmpv6 type { nd-router-solicit, nd-neighbor-solicit, mld2-listener-report } accept',
      ];
      for (const [mac, ips] of sources) {
        rules.push(
          `ether saddr ${mac} arp saddr ether ${mac} arp saddr ip { ${normalizePrefixes(['0.0.0.0', ...ips.v4], 4).join(', ')} } accept`,
        );
        if (ips.v4.length) rules.push(`ether saddr ${mac} ip saddr { ${ips.v4.join(', ')} } accept`);
        if (ips.v6.length) rules.push(`ether saddr ${mac} ip6 saddr { ${ips.v6.join(', ')} } accept`);
      }
      rules.push('drop');
      chains.push(chain(`spoof_${i}`, undefined, rules));
    }
    const body = [
      chain('l2_pre', 'type filter hook prerouting priority -200; policy accept;', pre),
      '',
      chain('l2_mark', 'type filter hook forward priority -200; policy accept;', fwd),
      ...chains.flatMap((c) => ['', c]),
    ];
    bridgeText = table('bridge', tables.bridge, contentHash(body.join('\n')), body);
  }

  // --- inet table
  let inetText: string | undefined;
  if (secured.length > 0) {
    const zones = new Map<string, number>();
    for (const p of input.ports) {
      const z = zones.get(p.bridge);
      if (z !== undefined && z !== p.zone)
        throw new Error(`bridge ${p.bridge}: conflicting conntrack zones ${z}, ${p.zone}`);
      if (!Number.isInteger(p.zone) || p.zone < 1 || p.zone > 65535)
        throw new Error(`invalid conntrack zone ${p.zone}`);
      zones.set(p.bridge, p.zone);
    }
    const sets: string[] = [];
    for (const g of groups) {
      const idx = groupIndex.get(g.id)!;
      for (const v of [4, 6] as const) {
        const members = normalizePrefixes(g.memberIPs, v);
        const lines = [`\tset ${groupSetName(idx, v)} {`, `\t\ttype ipv${v}_addr`, '\t\tflags interval'];
        if (members.length) lines.push(`\t\telements = { ${members.join(', ')} }`);
        lines.push('\t}');
        sets.push(lines.join('\n'));
      }
    }
    const egressMap: string[] = [];
    const ingressMap: string[] = [];
    const chains: string[] = [];
    for (const p of secured) {
      const i = portIndex[p.port.id]!;
      const pgroups = p.port.securityGroups.map((id) => groupById.get(id)).filter((g) => g !== undefined);
      // A port's groups are all stateful or all stateless (Neutron refuses a mix); any stateful group: stateful.
      const stateful = pgroups.length === 0 || pgroups.some((g) => g.stateful);
      const eg: string[] = [];
      const ing: string[] = [];
      const perm: PortPermissions = { zone: p.zone, ips: hostAddresses(p.port), ingress: [], egress: [] };
      if (stateful) {
        eg.push('ct state established,related return', 'ct state invalid drop');
        ing.push('ct state established,related accept', 'ct state invalid drop');
      }
      // infrastructure traffic Neutron always allows: DHCP to the server, its replies, IPv6 neighbour discovery
      eg.push('meta nfproto ipv4 udp sport 68 udp dport 67 return');
      eg.push('icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } return');
      ing.push('meta nfproto ipv4 udp sport 67 udp dport 68 accept');
      ing.push('icmpv6 type { nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert } accept');
      const seen = { ingress: new Set<string>(), egress: new Set<string>() };
      for (const g of pgroups) {
        for (const r of g.rules) {
          let t: RuleText | undefined;
          try {
            t = renderRuleMatch(r, groupIndex, groupMembers);
          } catch (e) {
            warnings.push(`security group ${g.namespace}/${g.name}: rule skipped: ${(e as Error).message}`);
            continue;
          }
          if (!t || seen[r.direction].has(t.match)) continue;
          seen[r.direction].add(t.match);
          if (r.direction === 'egress') {
            eg.push(`${t.match} return`);
            perm.egress.push(t.key);
          } else {
            ing.push(`${t.match} accept`);
            perm.ingress.push(t.key);
          }
        }
      }
      eg.push('drop');
      ing.push('drop');
      perm.ingress.sort();
      perm.egress.sort();
      permissions[p.port.id] = perm;
      chains.push(chain(`eg_${i}`, undefined, eg), chain(`in_${i}`, undefined, ing));
      egressMap.push(`${hex(MARK.flag | (i << MARK.srcShift))} : jump eg_${i}`);
      ingressMap.push(`${hex(MARK.flag | i)} : jump in_${i}`);
    }
    const zoneElems = [...zones].sort(([a], [b]) => a.localeCompare(b)).map(([b, z]) => `${q(b)} : ${z}`);
    const body = [
      `\tmap zone {\n\t\ttypeof iifname : ct zone\n\t\telements = { ${zoneElems.join(', ')} }\n\t}`,
      ...sets,
      chain('sg_pre', 'type filter hook prerouting priority raw; policy accept;', ['ct zone set iifname map @zone']),
      chain('sg_fwd', 'type filter hook forward priority filter; policy accept;', [
        `meta mark & ${hex(MARK.flag | MARK.srcMask)} vmap { ${egressMap.join(', ')} }`,
        `meta mark & ${hex(MARK.flag | MARK.dstMask)} vmap { ${ingressMap.join(', ')} }`,
      ]),
      ...chains,
    ];
    inetText = table('inet', tables.inet, contentHash(body.join('\n')), body);
  }
  return { tables, bridge: bridgeText, inet: inetText, portIndex, permissions, warnings };
}

/** The hash in a table listing's `comment "stratus:<hash>"`, if any. */
export function tableHash(listing: string): string | undefined {
  return /comment "stratus:([0-9a-f]+)"/.exec(listing)?.[1];
}

/** Whether a listing has exactly the chains of a rendering (catches a table recreated by hand under our comment). */
export function sameChains(listing: string, rendered: string): boolean {
  const names = (t: string) => [...t.matchAll(/^\s*chain (\S+) \{/gm)].map((m) => m[1]).sort();
  return JSON.stringify(names(listing)) === JSON.stringify(names(rendered));
}

/** The nft batch that replaces (or creates) a table atomically. */
export function replaceBatch(family: string, name: string, text: string): string {
  return `add table ${family} ${name}\ndelete table ${family} ${name}\n${text}`;
}

/**
 * The conntrack deletions needed when permissions go from `before` to `after`: for each secured port whose ingress
 * (egress) permissions lost an entry, every entry of its zone towards (from) its addresses. A secured port that
 * disappeared loses every entry of its zone to and from its addresses (Neutron does the same): a zone is per network
 * on the Linux bridge backend, and IPAM hands a released address out again, so a port reusing it must not inherit
 * the old port's established flows. Addresses that a port present before and after still holds (a shared
 * allowed-pair address) are kept. Pure.
 */
export function conntrackDeletions(
  before: Record<string, PortPermissions>,
  after: Record<string, PortPermissions>,
): string[][] {
  const cmds: string[][] = [];
  for (const [id, a] of Object.entries(after).sort(([x], [y]) => x.localeCompare(y))) {
    const b = before[id];
    if (!b) continue;
    const lost = (x: string[], y: string[]) => x.some((k) => !y.includes(k));
    const dirs: ['-d' | '-s', boolean][] = [
      ['-d', lost(b.ingress, a.ingress)],
      ['-s', lost(b.egress, a.egress)],
    ];
    for (const [flag, yes] of dirs) {
      if (!yes) continue;
      for (const ip of a.ips) cmds.push(['-D', '-w', String(a.zone), ...(isIPv6(ip) ? ['-f', 'ipv6'] : []), flag, ip]);
    }
  }
  const kept = new Set(
    Object.entries(after)
      .filter(([id]) => before[id])
      .flatMap(([, a]) => a.ips.map((ip) => `${a.zone} ${ip}`)),
  );
  for (const [id, b] of Object.entries(before).sort(([x], [y]) => x.localeCompare(y))) {
    if (after[id]) continue;
    for (const ip of b.ips) {
      if (kept.has(`${b.zone} ${ip}`)) continue;
      for (const flag of ['-d', '-s']) {
        cmds.push(['-D', '-w', String(b.zone), ...(isIPv6(ip) ? ['-f', 'ipv6'] : []), flag, ip]);
      }
    }
  }
  return cmds;
}

/** Chooses a conntrack zone (1..65535) per network: the VNI when it fits, else a stable free slot. Pure. */
export function zonesForVnis(vnis: readonly number[]): Map<number, number> {
  const out = new Map<number, number>();
  const used = new Set<number>();
  const sorted = [...new Set(vnis)].sort((a, b) => a - b);
  for (const v of sorted)
    if (v >= 1 && v <= 65535) {
      out.set(v, v);
      used.add(v);
    }
  for (const v of sorted) {
    if (out.has(v)) continue;
    let z = (v % 65535) + 1;
    while (used.has(z)) z = (z % 65535) + 1;
    out.set(v, z);
    used.add(z);
  }
  return out;
}

export interface NftManagerOptions {
  exec: Exec;
  logger?: { warn(obj: object, msg?: string): void; info(obj: object, msg?: string): void };
}

/**
 * Applies renderings to the kernel. Keeps the permissions of the last applied rendering in memory to delete the
 * conntrack entries of removed permissions; after an agent restart (no memory) a changed inet table flushes the
 * entries of every secured port whose chains changed (conservative: flows still allowed are re-created by their next
 * packet when TCP loose pickup is on, the default).
 */
export class NftManager {
  readonly #exec: Exec;
  readonly #log: NftManagerOptions['logger'];
  #applied: Record<string, PortPermissions> | undefined;

  constructor(o: NftManagerOptions) {
    this.#exec = o.exec;
    this.#log = o.logger;
  }

  async #listing(family: string, name: string): Promise<string | undefined> {
    try {
      return (await this.#exec.run('nft', ['list', 'table', family, name])).stdout;
    } catch (e) {
      if (e instanceof ExecError && /No such file or directory/.test(e.stderr)) return undefined;
      throw e;
    }
  }

  /** Writes what differs; returns one line per change. A failing batch throws and leaves the old table in place. */
  async apply(r: RenderedRules): Promise<string[]> {
    const changes: string[] = [];
    const inetBefore = await this.#listing('inet', r.tables.inet);
    for (const [family, name, text] of [
      ['bridge', r.tables.bridge, r.bridge],
      ['inet', r.tables.inet, r.inet],
    ] as const) {
      const listing = family === 'inet' ? inetBefore : await this.#listing(family, name);
      if (text === undefined) {
        if (listing !== undefined) {
          await this.#exec.run('nft', ['delete', 'table', family, name]);
          changes.push(`nft: deleted table ${family} ${name}`);
        }
        continue;
      }
      if (listing !== undefined && tableHash(listing) === tableHash(text) && sameChains(listing, text)) continue;
      await this.#exec.run('nft', ['-f', '-'], { input: replaceBatch(family, name, text) });
      changes.push(`nft: ${listing === undefined ? 'created' : 'replaced'} table ${family} ${name}`);
    }
    // conntrack cleanup for removed permissions
    let before = this.#applied;
    if (before === undefined && inetBefore !== undefined && tableHash(inetBefore) !== tableHash(r.inet ?? '')) {
      // unknown previous permissions: treat every permission as possibly removed
      before = Object.fromEntries(
        Object.entries(r.permissions).map(([id, p]) => [id, { ...p, ingress: ['?'], egress: ['?'] }]),
      );
    }
    for (const args of conntrackDeletions(before ?? {}, r.permissions)) {
      try {
        await this.#exec.run('conntrack', args);
        changes.push(`conntrack ${args.join(' ')}`);
      } catch (e) {
        // exit 1 with "0 flow entries have been deleted" is the normal "nothing to delete"
        if (!(e instanceof ExecError && /0 flow entries/.test(e.stderr))) {
          this.#log?.warn({ err: (e as Error).message }, 'conntrack cleanup failed');
        }
      }
    }
    this.#applied = r.permissions;
    return changes;
  }

  /**
   * apply() as a backend needs it: logs the rendering's warnings and marks every secured port of `ports` not ready in
   * `results` when the rules cannot be enforced (`unavailable`, e.g. br_netfilter missing) or the batch fails.
   */
  async applyForPorts(
    r: RenderedRules,
    ports: readonly Pick<PortPlan, 'id' | 'portSecurity'>[],
    results: Record<string, PortResult>,
    unavailable: string | undefined,
  ): Promise<string[]> {
    for (const w of r.warnings) this.#log?.warn({ warning: w }, 'security group rule not rendered');
    let failure = unavailable;
    let changes: string[] = [];
    try {
      changes = await this.apply(r);
    } catch (e) {
      failure = `security group rules: ${(e as Error).message}`;
      this.#log?.warn({ err: (e as Error).message }, 'nft apply failed');
    }
    if (failure) for (const p of ports) if (p.portSecurity) results[p.id] = { ready: false, message: failure };
    return changes;
  }
}
