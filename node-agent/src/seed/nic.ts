// A guest NIC as the seeds describe it (cloud-init network-config v2 and OpenStack network_data.json).
import { isIP } from 'node:net';
import { z } from 'zod';
import { parseCidr } from '../../../operator/src/api/meta.ts';
import { formatIP, ipToBigInt } from '../../../operator/src/api/network.ts';

const ip = z.string().refine((v) => isIP(v) !== 0, 'must be an IP address');
const ipv4 = z.string().refine((v) => isIP(v) === 4, 'must be an IPv4 address');
const ipv6 = z.string().refine((v) => isIP(v) === 6, 'must be an IPv6 address');
/** An address with its prefix length ("192.168.100.11/24"); host bits are the address. */
const addressCidr = z.string().refine((v) => parseCidr(v) !== undefined, 'must be address/prefix');

export const GuestRoute = z.object({
  /** Destination prefix, e.g. 10.10.0.0/16 (host bits are cleared). */
  to: addressCidr,
  via: ip,
  metric: z.int().min(0).optional(),
});
export type GuestRoute = z.infer<typeof GuestRoute>;

export const GuestNic = z
  .object({
    mac: z
      .string()
      .regex(/^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$/, 'mac must look like fa:16:3e:00:00:01')
      .transform((s) => s.toLowerCase()),
    mtu: z.int().min(68).max(65535).optional(),
    /** Static addresses with prefix length. None: DHCP (IPv4). */
    addresses: z.array(addressCidr).max(16).default([]),
    /** IPv4 default gateway. */
    gateway: ipv4.optional(),
    /** IPv6 default gateway. */
    gateway6: ipv6.optional(),
    /** Extra routes (Neutron host routes). */
    routes: z.array(GuestRoute).max(32).default([]),
    dns: z.array(ip).max(5).default([]),
    searchDomains: z.array(z.string().min(1).max(253)).max(6).default([]),
    /** Config drive only: the port (network_data.json links[].vif_id). */
    portId: z.string().min(1).optional(),
    /** Config drive only: the network (networks[].network_id). */
    networkId: z.string().min(1).optional(),
    /** Config drive only: the host-side device name (links[].id). Default interface<N>, like Nova without devname. */
    linkName: z.string().min(1).optional(),
  })
  .superRefine((n, ctx) => {
    if (n.gateway && !n.addresses.some((a) => parseCidr(a)?.family === 4)) {
      ctx.addIssue({ code: 'custom', path: ['gateway'], message: 'an IPv4 gateway needs an IPv4 address' });
    }
    if (n.gateway6 && !n.addresses.some((a) => parseCidr(a)?.family === 6)) {
      ctx.addIssue({ code: 'custom', path: ['gateway6'], message: 'an IPv6 gateway needs an IPv6 address' });
    }
  });
export type GuestNic = z.infer<typeof GuestNic>;
export type GuestNicInput = z.input<typeof GuestNic>;

/** Network address, netmask and family of an address/prefix (netmask dotted for IPv4, RFC 5952 for IPv6). */
export function splitCidr(cidr: string): {
  address: string;
  network: string;
  netmask: string;
  prefix: number;
  family: 4 | 6;
} {
  const c = parseCidr(cidr);
  if (!c) throw new Error(`not a CIDR: ${cidr}`);
  const bits = c.family === 4 ? 32 : 128;
  const all = (1n << BigInt(bits)) - 1n;
  const mask = c.prefix === 0 ? 0n : (all >> BigInt(bits - c.prefix)) << BigInt(bits - c.prefix);
  const net = ipToBigInt(c.address) & mask;
  const fmt = (n: bigint) => formatIP(n, c.family);
  return { address: c.address, network: fmt(net), netmask: fmt(mask), prefix: c.prefix, family: c.family };
}
