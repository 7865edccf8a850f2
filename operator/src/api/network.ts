// network.stratus.io — Neutron: networks with their subnets, ports and security groups.
import { isIP } from 'node:net';
import * as z from 'zod';
import { defineKind } from './kind.ts';
import {
  cel,
  cidrString,
  conditions,
  dnsLabel,
  fixedPresence,
  immutable,
  ipAddress,
  macAddress,
  objectName,
  observedGeneration,
  parseCidr,
} from './meta.ts';

export const NETWORK_GROUP = 'network.stratus.io';

/** Label on Ports (and IP allocations) naming their Network. */
export const NETWORK_LABEL = 'network.stratus.io/network';
/** Label on IP allocations naming the Port that holds them. */
export const PORT_LABEL = 'network.stratus.io/port';
/**
 * Label on a Port naming the Server that uses it (Neutron device_id). The Server controller sets it on the ports it
 * creates and on existing ports a Server references (only when unset: a port serves one server), and removes it
 * from user-created ports when the server goes.
 */
export const PORT_DEVICE_LABEL = 'compute.stratus.io/server';
/** Operator finalizer on Ports: releases the port's address claims before the port goes. */
export const PORT_FINALIZER = 'network.stratus.io/port';
/** Operator finalizer on Networks: releases the segmentation id (VNI) and the DHCP address claims. */
export const NETWORK_FINALIZER = 'network.stratus.io/network';
/** OpenStack's MAC prefix (Neutron base_mac fa:16:3e:00:00:00). */
export const MAC_PREFIX = 'fa:16:3e';
/** Port condition set by the operator: MAC and fixed IPs are claimed and in status. */
export const PORT_READY = 'Ready';
/** Port condition set by the node agent: the port is wired on status.bindingHost. */
export const PORT_BOUND = 'Bound';

/**
 * Name of the Port a Server creates for its `index`-th entry of spec.networks: `<server>-<index>`, cut and given a
 * hash suffix when that would exceed 253 characters.
 */
export function serverPortName(server: string, index: number): string {
  const suffix = `-${index}`;
  if (server.length + suffix.length <= 253) return `${server}${suffix}`;
  let h = 2166136261;
  for (const c of server) h = Math.imul(h ^ c.charCodeAt(0), 16777619) >>> 0;
  return `${server.slice(0, 253 - suffix.length - 9)}-${h.toString(16).padStart(8, '0')}${suffix}`;
}

/** CEL: the integer value of an IPv4 address held in `expr` (a string). */
function celIPv4Int(expr: string): string {
  const octet = (i: number) => `int(${expr}.split('.')[${i}])`;
  return `(${octet(0)} * 16777216 + ${octet(1)} * 65536 + ${octet(2)} * 256 + ${octet(3)})`;
}

/** An address as an unsigned integer (IPv4: 32 bits, IPv6: 128 bits). */
export function ipToBigInt(ip: string): bigint {
  if (isIP(ip) === 4) return ip.split('.').reduce((acc, o) => (acc << 8n) | BigInt(o), 0n);
  const dotted = /^(.*:)(\d+\.\d+\.\d+\.\d+)$/.exec(ip);
  if (dotted) {
    const v4 = ipToBigInt(dotted[2]!);
    return ipToBigInt(`${dotted[1]}${(v4 >> 16n).toString(16)}:${(v4 & 0xffffn).toString(16)}`);
  }
  const [head = '', tail = ''] = ip.split('::');
  const h = head ? head.split(':') : [];
  const t = tail ? tail.split(':') : [];
  const groups = ip.includes('::') ? [...h, ...Array<string>(8 - h.length - t.length).fill('0'), ...t] : h;
  return groups.reduce((acc, g) => (acc << 16n) | BigInt(`0x${g}`), 0n);
}

/** Compares two addresses of one family: negative, zero or positive. */
export function compareIP(a: string, b: string): number {
  const d = ipToBigInt(a) - ipToBigInt(b);
  return d < 0n ? -1 : d > 0n ? 1 : 0;
}

/** Formats an address integer of the given family (IPv6 without zero compression). */
export function bigIntToIP(n: bigint, family: 4 | 6): string {
  if (family === 4) return [24n, 16n, 8n, 0n].map((s) => String((n >> s) & 255n)).join('.');
  const groups = Array.from({ length: 8 }, (_, i) => ((n >> BigInt(112 - 16 * i)) & 0xffffn).toString(16));
  return groups.join(':');
}

/** Formats an address integer: IPv4 dotted quad, IPv6 in RFC 5952 form (lower case, longest zero run as "::"). */
export function formatIP(n: bigint, family: 4 | 6): string {
  if (family === 4) return bigIntToIP(n, 4);
  const groups = bigIntToIP(n, 6).split(':');
  let bestStart = -1;
  let bestLen = 0;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== '0') {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === '0') j++;
    if (j - i > bestLen && j - i >= 2) {
      bestStart = i;
      bestLen = j - i;
    }
    i = j;
  }
  if (bestStart < 0) return groups.join(':');
  return `${groups.slice(0, bestStart).join(':')}::${groups.slice(bestStart + bestLen).join(':')}`;
}

/** The CIDR with host bits cleared, in the same textual style as the input family prints it. */
export function canonicalCidr(cidr: string): string | undefined {
  const c = parseCidr(cidr);
  if (!c) return undefined;
  const shift = BigInt((c.family === 4 ? 32 : 128) - c.prefix);
  const masked = (ipToBigInt(c.address) >> shift) << shift;
  if (masked === ipToBigInt(c.address)) return cidr;
  return `${bigIntToIP(masked, c.family)}/${c.prefix}`;
}

/** Whether two CIDRs share any address. */
export function cidrsOverlap(a: string, b: string): boolean {
  const ca = parseCidr(a);
  const cb = parseCidr(b);
  if (!ca || !cb || ca.family !== cb.family) return false;
  return cidrContains(a, cb.address) || cidrContains(b, ca.address);
}

/** Whether `ip` lies inside `cidr` (and is of its family). */
export function cidrContains(cidr: string, ip: string): boolean {
  const c = parseCidr(cidr);
  if (!c || isIP(ip) !== c.family) return false;
  const shift = BigInt((c.family === 4 ? 32 : 128) - c.prefix);
  return ipToBigInt(ip) >> shift === ipToBigInt(c.address) >> shift;
}

export const AllocationPool = z
  .object({
    start: ipAddress('First address of the pool.'),
    end: ipAddress('Last address of the pool.'),
  })
  .describe('A range of addresses handed out to ports.')
  .meta({
    'x-kubernetes-validations': [
      {
        rule: '!isIP(self.start) || !isIP(self.end) || ip(self.start).family() == ip(self.end).family()',
        message: 'start and end must be of the same IP family',
      },
      {
        rule: `!isIP(self.start) || !isIP(self.end) || ip(self.start).family() != 4 || ip(self.end).family() != 4 || ${celIPv4Int('self.start')} <= ${celIPv4Int('self.end')}`,
        message: 'start must not be after end',
        fieldPath: '.start',
      },
    ],
  })
  .superRefine((p, ctx) => {
    if (isIP(p.start) && isIP(p.start) === isIP(p.end) && compareIP(p.start, p.end) > 0) {
      ctx.addIssue({ code: 'custom', path: ['start'], message: 'start must not be after end' });
    }
  });

export const HostRoute = z
  .object({
    destination: cidrString('Destination prefix.'),
    nexthop: ipAddress('Next hop address.'),
  })
  .describe('A static route pushed to guests by DHCP and cloud-init.');

const IPV6_MODE = z.enum(['slaac', 'dhcpv6-stateful', 'dhcpv6-stateless']);

export const Subnet = z
  .object({
    name: dnsLabel('Name of the subnet, unique within the network.'),
    cidr: immutable(
      cidrString('Address range in canonical CIDR form, e.g. 10.0.0.0/24 or fd00:1::/64. Immutable.'),
      'cidr',
    ),
    gatewayIP: ipAddress('Gateway address inside the CIDR. Defaults to the first host address.').optional(),
    disableGateway: z.boolean().default(false).describe('Give the subnet no gateway (Neutron gateway_ip: null).'),
    allocationPools: z
      .array(AllocationPool)
      .max(16)
      .optional()
      .describe('Ranges handed out to ports. Defaults to the whole CIDR minus the gateway (and DHCP) addresses.'),
    dnsNameservers: z.array(ipAddress('A DNS server.')).max(5).optional().describe('DNS servers for guests.'),
    hostRoutes: z.array(HostRoute).max(20).optional().describe('Extra routes for guests.'),
    enableDHCP: z.boolean().default(true).describe('Run a DHCP server with static leases for the ports.'),
    ipv6AddressMode: IPV6_MODE.optional().describe('IPv6 address mode: slaac, dhcpv6-stateful, dhcpv6-stateless.'),
    ipv6RAMode: IPV6_MODE.optional().describe('IPv6 router advertisement mode.'),
  })
  .describe('An IP subnet of the network (Neutron subnet).')
  .meta({
    'x-kubernetes-validations': [
      {
        rule: '!isCIDR(self.cidr) || string(cidr(self.cidr).masked()) == self.cidr',
        message: 'cidr must be in canonical form (host bits zero), e.g. 10.0.0.0/24',
        fieldPath: '.cidr',
      },
      {
        rule: '!has(self.gatewayIP) || !isCIDR(self.cidr) || !isIP(self.gatewayIP) || cidr(self.cidr).containsIP(self.gatewayIP)',
        message: 'gatewayIP must be inside cidr',
        fieldPath: '.gatewayIP',
      },
      {
        rule: '!(has(self.gatewayIP) && self.disableGateway)',
        message: 'gatewayIP and disableGateway are mutually exclusive',
        fieldPath: '.gatewayIP',
      },
      {
        rule: '!has(self.allocationPools) || !isCIDR(self.cidr) || self.allocationPools.all(p, !isIP(p.start) || !isIP(p.end) || (cidr(self.cidr).containsIP(p.start) && cidr(self.cidr).containsIP(p.end)))',
        message: 'allocation pools must be inside cidr',
        fieldPath: '.allocationPools',
      },
      {
        rule: '!has(self.hostRoutes) || !isCIDR(self.cidr) || self.hostRoutes.all(r, !isIP(r.nexthop) || ip(r.nexthop).family() == cidr(self.cidr).ip().family())',
        message: 'host route next hops must be of the subnet IP family',
        fieldPath: '.hostRoutes',
      },
      {
        rule: '!(has(self.ipv6AddressMode) || has(self.ipv6RAMode)) || !isCIDR(self.cidr) || cidr(self.cidr).ip().family() == 6',
        message: 'ipv6AddressMode and ipv6RAMode are only valid on IPv6 subnets',
        fieldPath: '.ipv6AddressMode',
      },
    ],
  })
  .superRefine((s, ctx) => {
    const c = parseCidr(s.cidr);
    if (!c) return;
    if (canonicalCidr(s.cidr) !== s.cidr) {
      ctx.addIssue({ code: 'custom', path: ['cidr'], message: 'cidr must be in canonical form (host bits zero)' });
    }
    if ((s.ipv6AddressMode !== undefined || s.ipv6RAMode !== undefined) && c.family !== 6) {
      ctx.addIssue({ code: 'custom', path: ['ipv6AddressMode'], message: 'only valid on IPv6 subnets' });
    }
    if (s.gatewayIP !== undefined && !cidrContains(s.cidr, s.gatewayIP)) {
      ctx.addIssue({ code: 'custom', path: ['gatewayIP'], message: 'gatewayIP must be inside cidr' });
    }
    if (s.gatewayIP !== undefined && s.disableGateway) {
      ctx.addIssue({ code: 'custom', path: ['gatewayIP'], message: 'gatewayIP and disableGateway are exclusive' });
    }
    for (const [i, p] of (s.allocationPools ?? []).entries()) {
      if (!cidrContains(s.cidr, p.start) || !cidrContains(s.cidr, p.end)) {
        ctx.addIssue({ code: 'custom', path: ['allocationPools', i], message: 'pool must be inside cidr' });
      }
    }
  });

export const NetworkSpec = z
  .object({
    description: z.string().max(1024).optional().describe('Free-form description.'),
    subnets: z
      .array(Subnet)
      .max(16)
      .default([])
      .describe('Subnets of the network. Subnets may be added and removed; a subnet CIDR never changes.')
      .meta({
        'x-kubernetes-list-type': 'map',
        'x-kubernetes-list-map-keys': ['name'],
        'x-kubernetes-validations': [
          {
            rule: 'self.all(a, self.all(b, a.name == b.name || !isCIDR(a.cidr) || !isCIDR(b.cidr) || (!cidr(a.cidr).containsIP(cidr(b.cidr).ip()) && !cidr(b.cidr).containsIP(cidr(a.cidr).ip()))))',
            message: 'subnet CIDRs must not overlap',
          },
        ],
      })
      .superRefine((subnets, ctx) => {
        for (const [i, a] of subnets.entries()) {
          for (const b of subnets.slice(i + 1)) {
            if (cidrsOverlap(a.cidr, b.cidr)) {
              ctx.addIssue({ code: 'custom', message: `subnet CIDRs must not overlap: ${a.cidr} and ${b.cidr}` });
            }
          }
        }
      }),
    mtu: z
      .int()
      .min(68)
      .max(9000)
      .optional()
      .describe('MTU of the network. Defaults to the underlay MTU minus the VXLAN overhead (1450 on a 1500 underlay).'),
    adminStateUp: z.boolean().default(true).describe('Administrative state; a down network forwards nothing.'),
    portSecurityEnabled: z
      .boolean()
      .default(true)
      .describe('Default for the ports of this network: security groups and anti-spoofing on.'),
  })
  .describe('Desired state of the network.');

export const NetworkStatus = z
  .object({
    status: z.enum(['ACTIVE', 'BUILD', 'DOWN', 'ERROR']).optional().describe('Neutron network status.'),
    networkType: z.enum(['vxlan', 'flat', 'vlan', 'local']).optional().describe('Segmentation type.'),
    segmentationID: z.int().min(1).max(16777215).optional().describe('VXLAN network identifier (VNI).'),
    mtu: z.int().optional().describe('Effective MTU.'),
    subnets: z
      .array(
        z
          .object({
            name: z.string().describe('Subnet name.'),
            cidr: z.string().describe('Subnet CIDR.'),
            ipVersion: z.literal([4, 6]).describe('IP version.'),
            gatewayIP: z.string().optional().describe('Effective gateway address.'),
            dhcpAddress: z
              .string()
              .optional()
              .describe('Address the DHCP server of every node answers from on this subnet (IPv4 with DHCP only).'),
            allocated: z
              .int()
              .min(0)
              .optional()
              .describe('Addresses claimed in the subnet (ports and the DHCP server).'),
            available: z
              .int()
              .min(0)
              .optional()
              .describe('Addresses still free in the pools (capped at 2^53-1 for large IPv6 subnets).'),
          })
          .describe('Effective subnet settings and usage.'),
      )
      .max(16)
      .optional()
      .describe('Effective subnet settings and address usage.'),
    observedGeneration: observedGeneration(),
    conditions: conditions(),
  })
  .describe('Observed state of the network.');

export const NetworkKind = defineKind({
  group: NETWORK_GROUP,
  kind: 'Network',
  plural: 'networks',
  scope: 'Namespaced',
  shortNames: ['net'],
  categories: ['stratus-network'],
  description:
    'A Network (Neutron network with its subnets) is an isolated L2 segment spanning the nodes, carried over VXLAN.',
  spec: NetworkSpec,
  status: NetworkStatus,
  columns: [
    { name: 'Status', type: 'string', jsonPath: '.status.status', description: 'Network status.' },
    { name: 'Subnets', type: 'string', jsonPath: '.spec.subnets[*].cidr', description: 'Subnet CIDRs.' },
    { name: 'VNI', type: 'integer', jsonPath: '.status.segmentationID', description: 'VXLAN id.' },
    { name: 'MTU', type: 'integer', jsonPath: '.status.mtu', description: 'Effective MTU.' },
  ],
});

// ---------------------------------------------------------------------------------------------
// Port

export const FixedIP = z
  .object({
    subnet: z.string().max(63).optional().describe('Subnet (by name) to allocate from.'),
    ipAddress: ipAddress('Address to request.').optional(),
  })
  .describe('A requested address: a subnet, an address, or both.')
  .meta({
    'x-kubernetes-validations': [
      { rule: 'has(self.subnet) || has(self.ipAddress)', message: 'set subnet, ipAddress or both' },
    ],
  });

export const AllowedAddressPair = z
  .object({
    ipAddress: z
      .string()
      .max(49)
      .refine((v) => isIP(v) !== 0 || parseCidr(v) !== undefined, { message: 'must be an IP address or CIDR' })
      .describe('An address or CIDR the port may also send from (e.g. a VRRP virtual IP).')
      .meta({
        'x-kubernetes-validations': [
          { rule: 'isIP(self) || isCIDR(self)', message: 'must be an IP address or a CIDR' },
        ],
      }),
    macAddress: macAddress('MAC that goes with the address; defaults to the port MAC.').optional(),
  })
  .describe('An extra address the port may use (Neutron allowed address pair).');

export const PortSpec = z
  .object({
    network: immutable(objectName('Network of the port. Immutable.'), 'network'),
    description: z.string().max(1024).optional().describe('Free-form description.'),
    fixedIPs: immutable(
      z
        .array(FixedIP)
        .max(16)
        .describe('Requested addresses. Omit for one address from the first subnet of each IP version. Immutable.'),
      'fixedIPs',
    ).optional(),
    macAddress: immutable(
      macAddress('MAC address. Defaults to a unique fa:16:3e:xx:xx:xx. Immutable.'),
      'macAddress',
    ).optional(),
    securityGroups: z
      .array(objectName('A SecurityGroup name.'))
      .max(10)
      .optional()
      .describe('Security groups of the port. Omit for the project default group; [] for none.'),
    portSecurityEnabled: z
      .boolean()
      .optional()
      .describe('Security groups and anti-spoofing; defaults to the network setting. Off requires no groups.'),
    allowedAddressPairs: z.array(AllowedAddressPair).max(10).optional().describe('Extra addresses the port may use.'),
    adminStateUp: z.boolean().default(true).describe('Administrative state; a down port forwards nothing.'),
  })
  .describe('Desired state of the port.')
  .meta({
    'x-kubernetes-validations': [
      fixedPresence('macAddress'),
      fixedPresence('fixedIPs'),
      {
        rule: '!has(self.portSecurityEnabled) || self.portSecurityEnabled || ((!has(self.securityGroups) || size(self.securityGroups) == 0) && !has(self.allowedAddressPairs))',
        message: 'a port without port security can have no security groups and no allowed address pairs',
        fieldPath: '.portSecurityEnabled',
      },
    ],
  })
  .superRefine((p, ctx) => {
    if (p.portSecurityEnabled === false && ((p.securityGroups?.length ?? 0) > 0 || p.allowedAddressPairs)) {
      ctx.addIssue({
        code: 'custom',
        path: ['portSecurityEnabled'],
        message: 'a port without port security can have no security groups and no allowed address pairs',
      });
    }
  });

export const PortStatus = z
  .object({
    status: z.enum(['ACTIVE', 'DOWN', 'BUILD', 'ERROR']).optional().describe('ACTIVE once wired on its host.'),
    macAddress: z.string().optional().describe('Effective MAC address.'),
    fixedIPs: z
      .array(
        z
          .object({
            subnet: z.string().describe('Subnet name.'),
            ipAddress: z.string().describe('Allocated address.'),
          })
          .describe('An allocated address.'),
      )
      .max(16)
      .optional()
      .describe('Allocated addresses.'),
    securityGroups: z
      .array(z.string())
      .max(10)
      .optional()
      .describe('Effective security groups: spec.securityGroups, or [default] when omitted; [] without port security.'),
    deviceOwner: z.string().optional().describe('What uses the port, e.g. compute:nova-style "compute:<zone>".'),
    deviceID: z.string().optional().describe('Name of the server using the port.'),
    bindingHost: z.string().optional().describe('Hypervisor the port is wired on (binding:host_id).'),
    vifType: z.string().optional().describe('How it is wired: bridge, ovs, unbound, binding_failed.'),
    observedGeneration: observedGeneration(),
    conditions: conditions(),
  })
  .describe('Observed state of the port.');

export const PortKind = defineKind({
  group: NETWORK_GROUP,
  kind: 'Port',
  plural: 'ports',
  scope: 'Namespaced',
  shortNames: [],
  categories: ['stratus-network'],
  description: 'A Port (Neutron port) is one NIC on a network: MAC, fixed IPs, security groups.',
  spec: PortSpec,
  status: PortStatus,
  columns: [
    { name: 'Status', type: 'string', jsonPath: '.status.status', description: 'Port status.' },
    { name: 'Network', type: 'string', jsonPath: '.spec.network', description: 'Network.' },
    { name: 'IPs', type: 'string', jsonPath: '.status.fixedIPs[*].ipAddress', description: 'Addresses.' },
    { name: 'MAC', type: 'string', jsonPath: '.status.macAddress', description: 'MAC address.' },
    { name: 'Device', type: 'string', jsonPath: '.status.deviceID', description: 'Server using it.' },
    { name: 'Host', type: 'string', jsonPath: '.status.bindingHost', description: 'Bound host.', priority: 1 },
  ],
});

// ---------------------------------------------------------------------------------------------
// SecurityGroup

const PORT_PROTOCOLS = ['tcp', 'udp', 'sctp', 'udplite', 'dccp'];
const ICMP_PROTOCOLS = ['icmp', 'icmpv6', 'ipv6-icmp'];

export const SecurityGroupRule = z
  .object({
    description: z.string().max(255).optional().describe('Free-form description.'),
    direction: z.enum(['ingress', 'egress']).describe('ingress (to the port) or egress (from the port).'),
    ethertype: z.enum(['IPv4', 'IPv6']).default('IPv4').describe('IP family the rule applies to.'),
    protocol: z
      .string()
      .max(16)
      .regex(
        /^(any|tcp|udp|icmp|icmpv6|ipv6-icmp|sctp|udplite|dccp|gre|esp|ah|[0-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-5])$/,
      )
      .optional()
      .describe('Protocol name (tcp, udp, icmp, icmpv6, sctp...) or number 0-255; omit for any.'),
    portRangeMin: z
      .int()
      .min(0)
      .max(65535)
      .optional()
      .describe('Lowest destination port (tcp/udp/sctp), or the ICMP type.'),
    portRangeMax: z
      .int()
      .min(0)
      .max(65535)
      .optional()
      .describe('Highest destination port (tcp/udp/sctp), or the ICMP code.'),
    remoteIPPrefix: cidrString('Peer address range; omit (and remoteGroup) for any peer.').optional(),
    remoteGroup: objectName('Peers are the ports in this security group.').optional(),
  })
  .describe('An allow rule. Rules are additive across all groups of a port; what no rule allows is dropped.')
  .meta({
    'x-kubernetes-validations': [
      {
        rule: '!(has(self.remoteIPPrefix) && has(self.remoteGroup))',
        message: 'remoteIPPrefix and remoteGroup are mutually exclusive',
      },
      {
        rule: `!(has(self.portRangeMin) || has(self.portRangeMax)) || (has(self.protocol) && self.protocol in ${JSON.stringify([...PORT_PROTOCOLS, ...ICMP_PROTOCOLS]).replaceAll('"', "'")})`,
        message: 'port ranges need protocol tcp, udp, sctp, udplite, dccp or icmp/icmpv6',
        fieldPath: '.protocol',
      },
      {
        rule: `!has(self.protocol) || !(self.protocol in ${JSON.stringify(PORT_PROTOCOLS).replaceAll('"', "'")}) || !has(self.portRangeMin) || !has(self.portRangeMax) || self.portRangeMin <= self.portRangeMax`,
        message: 'portRangeMin must be less than or equal to portRangeMax',
        fieldPath: '.portRangeMin',
      },
      {
        rule: `!has(self.protocol) || !(self.protocol in ${JSON.stringify(ICMP_PROTOCOLS).replaceAll('"', "'")}) || ((!has(self.portRangeMin) || self.portRangeMin <= 255) && (!has(self.portRangeMax) || (self.portRangeMax <= 255 && has(self.portRangeMin))))`,
        message: 'for ICMP, portRangeMin is the type and portRangeMax the code (0-255; a code needs a type)',
        fieldPath: '.portRangeMin',
      },
      {
        rule: "!has(self.remoteIPPrefix) || !isCIDR(self.remoteIPPrefix) || cidr(self.remoteIPPrefix).ip().family() == (self.ethertype == 'IPv4' ? 4 : 6)",
        message: 'remoteIPPrefix must match ethertype',
        fieldPath: '.remoteIPPrefix',
      },
    ],
  })
  .superRefine((r, ctx) => {
    if (r.remoteIPPrefix !== undefined && r.remoteGroup !== undefined) {
      ctx.addIssue({ code: 'custom', message: 'remoteIPPrefix and remoteGroup are mutually exclusive' });
    }
    const ranged = r.portRangeMin !== undefined || r.portRangeMax !== undefined;
    if (ranged && (r.protocol === undefined || ![...PORT_PROTOCOLS, ...ICMP_PROTOCOLS].includes(r.protocol))) {
      ctx.addIssue({ code: 'custom', path: ['protocol'], message: 'port ranges need a port protocol or ICMP' });
    }
    const prefix = r.remoteIPPrefix === undefined ? undefined : parseCidr(r.remoteIPPrefix);
    if (prefix && prefix.family !== (r.ethertype === 'IPv4' ? 4 : 6)) {
      ctx.addIssue({ code: 'custom', path: ['remoteIPPrefix'], message: 'remoteIPPrefix must match ethertype' });
    }
    const ports = r.protocol !== undefined && PORT_PROTOCOLS.includes(r.protocol);
    if (ports && r.portRangeMin !== undefined && r.portRangeMax !== undefined && r.portRangeMin > r.portRangeMax) {
      ctx.addIssue({ code: 'custom', path: ['portRangeMin'], message: 'portRangeMin must be <= portRangeMax' });
    }
  });

/** The rules OpenStack gives every new security group: egress to anywhere, IPv4 and IPv6. */
export const EGRESS_ANY_RULES: readonly { direction: 'egress'; ethertype: 'IPv4' | 'IPv6' }[] = [
  { direction: 'egress', ethertype: 'IPv4' },
  { direction: 'egress', ethertype: 'IPv6' },
];

/** Name of the security group every project has and ports get when they name none (Neutron's `default`). */
export const DEFAULT_SECURITY_GROUP = 'default';

/**
 * The rules of a project's `default` group, as Neutron creates them: all egress, and ingress from the other members
 * of the group (IPv4 and IPv6).
 */
export function defaultSecurityGroupRules(): SecurityGroupRule[] {
  return [
    { direction: 'egress', ethertype: 'IPv4' },
    { direction: 'egress', ethertype: 'IPv6' },
    { direction: 'ingress', ethertype: 'IPv4', remoteGroup: DEFAULT_SECURITY_GROUP },
    { direction: 'ingress', ethertype: 'IPv6', remoteGroup: DEFAULT_SECURITY_GROUP },
  ];
}

export const SecurityGroupSpec = z
  .object({
    description: z.string().max(1024).optional().describe('Free-form description.'),
    stateful: z
      .boolean()
      .default(true)
      .describe('Stateful groups allow replies to allowed traffic; stateless ones need explicit rules both ways.'),
    rules: z
      .array(SecurityGroupRule)
      .max(100)
      .default(() => EGRESS_ANY_RULES.map((r) => ({ ...r })))
      .describe(
        'Allow rules. Omitted, a new group allows all egress (IPv4 and IPv6) and no ingress, as OpenStack creates ' +
          'new groups; [] allows nothing.',
      ),
  })
  .describe('Desired state of the security group.');

export const SecurityGroupKind = defineKind({
  group: NETWORK_GROUP,
  kind: 'SecurityGroup',
  plural: 'securitygroups',
  scope: 'Namespaced',
  shortNames: ['secgroup', 'sg'],
  categories: ['stratus-network'],
  description:
    'A SecurityGroup (Neutron security group) is a set of allow rules applied, statefully, to the ports that name it.',
  spec: SecurityGroupSpec,
  status: z
    .object({
      observedGeneration: observedGeneration(),
      conditions: conditions(),
    })
    .describe('Observed state of the security group.'),
  columns: [
    { name: 'Stateful', type: 'boolean', jsonPath: '.spec.stateful', description: 'Stateful.' },
    { name: 'Description', type: 'string', jsonPath: '.spec.description', description: 'Description.' },
  ],
});

// ---------------------------------------------------------------------------------------------
// IPAllocation and SegmentAllocation: the IPAM claims. One object per claimed address, MAC or VNI; creating it
// is the atomic claim (a second claimant gets AlreadyExists), deleting it the release. The API server is the only
// record of what is taken.

/** FNV-1a (32 bit) of a string, as 8 hex digits. */
function fnv32(s: string): string {
  let h = 2166136261;
  for (const c of s) h = Math.imul(h ^ c.charCodeAt(0), 16777619) >>> 0;
  return h.toString(16).padStart(8, '0');
}

/**
 * `prefix` + `rest`, where prefix (an object name) is cut and given a hash of itself when the whole would exceed 253
 * characters. The cut keeps the result a DNS-1123 subdomain.
 */
function boundedName(prefix: string, rest: string): string {
  if (prefix.length + rest.length <= 253) return `${prefix}${rest}`;
  const keep = prefix.slice(0, 253 - rest.length - 9).replace(/[-.]+$/, '');
  return `${keep}-${fnv32(prefix)}${rest}`;
}

/** An address in canonical name form: IPv4 dotted, IPv6 as eight hex groups without zero compression. */
export function ipNamePart(ip: string): string {
  const family = isIP(ip);
  if (family === 0) throw new Error(`not an IP address: ${ip}`);
  return bigIntToIP(ipToBigInt(ip), family as 4 | 6).replace(/[.:]/g, '-');
}

/**
 * Name of the IPAllocation claiming `ip` in subnet `subnet` of network `network`:
 * `<network>.<subnet>.<ip with '.' and ':' as '-'>` (IPv6 in full eight-group form, so each address has one name).
 */
export function ipAllocationName(network: string, subnet: string, ip: string): string {
  return boundedName(network, `.${subnet}.${ipNamePart(ip)}`);
}

/** Name of the IPAllocation claiming MAC `mac` in network `network`: `<network>.mac.<fa-16-3e-..-..-..>`. */
export function macAllocationName(network: string, mac: string): string {
  return boundedName(network, `.mac.${mac.toLowerCase().replaceAll(':', '-')}`);
}

/** Name of the SegmentAllocation claiming VXLAN id `vni`. */
export function segmentAllocationName(vni: number): string {
  return `vxlan-${vni}`;
}

/** Highest VXLAN network identifier (24 bits). */
export const MAX_VNI = 16777215;

export const IPAllocationSpec = cel(
  z
    .object({
      network: objectName('Network the claim is in.'),
      subnet: dnsLabel('Subnet (by name) of the claimed address; required with ipAddress.').optional(),
      ipAddress: ipAddress('The claimed address (exclusive with macAddress).').optional(),
      macAddress: z
        .string()
        .max(17)
        .regex(/^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/)
        .optional()
        .describe('The claimed MAC address, lower case (exclusive with ipAddress).'),
      port: objectName('Port holding the claim, if a port holds it.').optional(),
      purpose: z
        .enum(['port', 'dhcp'])
        .default('port')
        .describe("What the claim is for: a port's address or MAC, or the network's DHCP server address."),
    })
    .describe('The claimed address. Immutable: a claim is released by deleting it.'),
  { rule: 'self == oldSelf', message: 'spec is immutable' },
  { rule: 'has(self.ipAddress) != has(self.macAddress)', message: 'set exactly one of ipAddress and macAddress' },
  { rule: '!has(self.ipAddress) || has(self.subnet)', message: 'an ipAddress claim needs its subnet' },
).superRefine((a, ctx) => {
  if ((a.ipAddress === undefined) === (a.macAddress === undefined)) {
    ctx.addIssue({ code: 'custom', message: 'set exactly one of ipAddress and macAddress' });
  }
  if (a.ipAddress !== undefined && a.subnet === undefined) {
    ctx.addIssue({ code: 'custom', path: ['subnet'], message: 'an ipAddress claim needs its subnet' });
  }
});

export const IPAllocationKind = defineKind({
  group: NETWORK_GROUP,
  kind: 'IPAllocation',
  plural: 'ipallocations',
  scope: 'Namespaced',
  shortNames: ['ipalloc'],
  categories: ['stratus-network'],
  description:
    'An IPAllocation is the claim of one IP or MAC address in a network, written by the operator (Neutron IPAM ' +
    'allocation). Creating it claims the address: its name is derived from the address (<network>.<subnet>.<address ' +
    "with '-' for '.' and ':'>, or <network>.mac.<mac>), so a second claim of the same address is refused by the " +
    'API server. The holder (Port or Network) is its controller owner; deleting the claim releases the address. A claim without an owner is a manual reservation.',
  spec: IPAllocationSpec,
  status: z.object({}).describe('Claims have no observed state.'),
  columns: [
    { name: 'Network', type: 'string', jsonPath: '.spec.network', description: 'Network.' },
    { name: 'Subnet', type: 'string', jsonPath: '.spec.subnet', description: 'Subnet.' },
    { name: 'Address', type: 'string', jsonPath: '.spec.ipAddress', description: 'Claimed IP address.' },
    { name: 'MAC', type: 'string', jsonPath: '.spec.macAddress', description: 'Claimed MAC address.' },
    { name: 'Port', type: 'string', jsonPath: '.spec.port', description: 'Holding port.' },
    { name: 'Purpose', type: 'string', jsonPath: '.spec.purpose', description: 'port or dhcp.' },
  ],
});

export const SegmentAllocationSpec = cel(
  z
    .object({
      vni: z.int().min(1).max(MAX_VNI).describe('The claimed VXLAN network identifier.'),
      network: z
        .object({
          namespace: dnsLabel('Namespace of the network.'),
          name: objectName('Name of the network.'),
          uid: z.string().max(64).describe('UID of the network (a recreated network is another holder).'),
        })
        .describe('The Network holding the claim.'),
    })
    .describe('The claimed segment. Immutable: a claim is released by deleting it.'),
  { rule: 'self == oldSelf', message: 'spec is immutable' },
);

export const SegmentAllocationKind = defineKind({
  group: NETWORK_GROUP,
  kind: 'SegmentAllocation',
  plural: 'segmentallocations',
  scope: 'Cluster',
  shortNames: ['segalloc'],
  categories: ['stratus-network'],
  description:
    'A SegmentAllocation is the claim of one VXLAN network identifier (VNI) by a Network, written by the operator ' +
    '(Neutron ml2_vxlan_allocations). The operator names it vxlan-<vni>, so each VNI can be claimed once cluster-wide.',
  spec: SegmentAllocationSpec,
  status: z.object({}).describe('Claims have no observed state.'),
  columns: [
    { name: 'VNI', type: 'integer', jsonPath: '.spec.vni', description: 'VXLAN id.' },
    { name: 'Namespace', type: 'string', jsonPath: '.spec.network.namespace', description: 'Network namespace.' },
    { name: 'Network', type: 'string', jsonPath: '.spec.network.name', description: 'Network name.' },
  ],
});

export type IPAllocationSpec = z.infer<typeof IPAllocationSpec>;
export type IPAllocation = z.infer<typeof IPAllocationKind.schema>;
export type SegmentAllocationSpec = z.infer<typeof SegmentAllocationSpec>;
export type SegmentAllocation = z.infer<typeof SegmentAllocationKind.schema>;

export type Subnet = z.infer<typeof Subnet>;
export type NetworkSpec = z.infer<typeof NetworkSpec>;
export type NetworkStatus = z.infer<typeof NetworkStatus>;
export type Network = z.infer<typeof NetworkKind.schema>;
export type PortSpec = z.infer<typeof PortSpec>;
export type PortStatus = z.infer<typeof PortStatus>;
export type Port = z.infer<typeof PortKind.schema>;
export type SecurityGroupRule = z.infer<typeof SecurityGroupRule>;
export type SecurityGroupSpec = z.infer<typeof SecurityGroupSpec>;
export type SecurityGroup = z.infer<typeof SecurityGroupKind.schema>;
