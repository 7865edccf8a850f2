// Parsers for the JSON the host tools print (`ip -j -d link show`, `ip -j addr show`, `ip -j netns list`,
// `bridge -j fdb show`), validated with zod so a changed output format fails loudly instead of making the reconciler
// see "nothing there" and recreate devices. Only the fields the backends use are declared; the rest passes through.
import * as z from 'zod';

export const Link = z.looseObject({
  ifindex: z.number(),
  ifname: z.string(),
  flags: z.array(z.string()).default([]),
  mtu: z.number(),
  /** Name of the bridge (or bond...) the device is a port of. */
  master: z.string().optional(),
  operstate: z.string().optional(),
  address: z.string().optional(),
  ifalias: z.string().optional(),
  linkinfo: z
    .looseObject({
      info_kind: z.string().optional(),
      info_data: z.record(z.string(), z.unknown()).optional(),
      info_slave_kind: z.string().optional(),
    })
    .optional(),
});
export type Link = z.infer<typeof Link>;

/** `ip -j -d link show` */
export function parseLinks(stdout: string): Link[] {
  return z.array(Link).parse(parseJson(stdout));
}

/** VXLAN attributes of a link (linkinfo.info_data of kind vxlan). */
export const VxlanData = z.looseObject({
  id: z.number(),
  local: z.string().optional(),
  /** Underlay device name. */
  link: z.string().optional(),
  port: z.number(),
  learning: z.boolean().optional(),
});
export type VxlanData = z.infer<typeof VxlanData>;

/** The VXLAN attributes of a link, or undefined if it is not a VXLAN device. */
export function vxlanData(l: Link): VxlanData | undefined {
  if (l.linkinfo?.info_kind !== 'vxlan') return undefined;
  const r = VxlanData.safeParse(l.linkinfo.info_data);
  return r.success ? r.data : undefined;
}

/** Whether a link is a tap (tun driver in tap mode). */
export function isTap(l: Link): boolean {
  return l.linkinfo?.info_kind === 'tun' && (l.linkinfo.info_data as { type?: string } | undefined)?.type === 'tap';
}

export const FdbEntry = z.looseObject({
  mac: z.string(),
  ifname: z.string().optional(),
  dst: z.string().optional(),
  master: z.string().optional(),
  flags: z.array(z.string()).default([]),
  state: z.string().optional(),
});
export type FdbEntry = z.infer<typeof FdbEntry>;

/** `bridge -j fdb show` */
export function parseFdb(stdout: string): FdbEntry[] {
  return z.array(FdbEntry).parse(parseJson(stdout));
}

export const AddrInfo = z.looseObject({
  family: z.string(),
  local: z.string(),
  prefixlen: z.number(),
});
export const LinkAddrs = z.looseObject({
  ifname: z.string(),
  addr_info: z.array(AddrInfo).default([]),
});
export type LinkAddrs = z.infer<typeof LinkAddrs>;

/** `ip -j addr show` */
export function parseAddrs(stdout: string): LinkAddrs[] {
  return z.array(LinkAddrs).parse(parseJson(stdout));
}

export const Netns = z.looseObject({ name: z.string() });

/** `ip -j netns list` (prints nothing at all when there is no namespace). */
export function parseNetnsList(stdout: string): { name: string }[] {
  return stdout
    .trim()
    .split('\n')
    .filter(Boolean)
    .flatMap((line) => z.array(Netns).parse(JSON.parse(line)));
}

/** The device holding an address (for the default underlay device: the one with the node's host IP). */
export function deviceWithAddress(addrs: readonly LinkAddrs[], ip: string): string | undefined {
  return addrs.find((l) => l.addr_info.some((a) => a.local === ip))?.ifname;
}

function parseJson(stdout: string): unknown {
  const t = stdout.trim();
  return t === '' ? [] : JSON.parse(t);
}
