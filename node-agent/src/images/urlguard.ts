// Guards against server-side request forgery for image URLs: the host of every URL the agent fetches (the Image's
// and every redirect's) is resolved once, refused when any of its addresses is in a denied range, and the
// connection is then made to exactly those vetted addresses (pinned: a second DNS answer cannot swap them).
//
// Denied by default: loopback, link-local (169.254.169.254, the cloud metadata address, included) and unspecified
// addresses, also in their IPv4-mapped IPv6 forms. More ranges are denied with denyCidrs (the cluster's service and
// pod ranges: --image-url-deny-cidr); allowCidrs wins over every denied range (--image-url-allow-cidr, e.g.
// 127.0.0.0/8 for a test image server on loopback).
import { lookup as dnsLookup } from 'node:dns/promises';
import { BlockList, isIP } from 'node:net';

export interface ResolvedAddress {
  address: string;
  family: 4 | 6;
}

/** Every address of a host name (default: dns.lookup with all: true, in the resolver's order). */
export type Resolve = (host: string) => Promise<ResolvedAddress[]>;

export interface UrlPolicyOptions {
  /** Ranges fetched even when denied (CIDRs or single addresses). */
  allowCidrs?: readonly string[];
  /** Ranges refused besides the defaults (the cluster's service and pod CIDRs). */
  denyCidrs?: readonly string[];
  /** For tests: resolves host names instead of the system resolver. */
  resolve?: Resolve;
}

/** A URL refused by the policy (the message says which address, why, and the flag that allows it). */
export class UrlRefusedError extends Error {
  override readonly name = 'UrlRefusedError';
}

interface Range {
  cidr: string;
  /** What the range is, for the message ("a loopback address"). */
  what: string;
  list: BlockList;
}

/** The ranges denied unless allowed. */
export const DEFAULT_DENIED_CIDRS: ReadonlyArray<{ cidr: string; what: string }> = [
  { cidr: '127.0.0.0/8', what: 'a loopback address' },
  { cidr: '::1/128', what: 'a loopback address' },
  { cidr: '169.254.0.0/16', what: 'a link-local address' },
  { cidr: 'fe80::/10', what: 'a link-local address' },
  { cidr: '0.0.0.0/8', what: 'an unspecified address' },
  { cidr: '::/128', what: 'an unspecified address' },
];

/** "10.96.0.0/12" or a single address → [address, prefix, family]; throws TypeError when malformed. */
export function parseCidr(cidr: string): { address: string; prefix: number; family: 4 | 6 } {
  const slash = cidr.indexOf('/');
  const address = (slash < 0 ? cidr : cidr.slice(0, slash)).trim();
  const family = isIP(address);
  if (family !== 4 && family !== 6) throw new TypeError(`${JSON.stringify(cidr)} is not a CIDR (address/prefix)`);
  const max = family === 4 ? 32 : 128;
  const prefixText = slash < 0 ? String(max) : cidr.slice(slash + 1).trim();
  const prefix = Number(prefixText);
  if (!/^\d{1,3}$/.test(prefixText) || prefix > max) {
    throw new TypeError(`${JSON.stringify(cidr)}: the prefix length must be 0 to ${max}`);
  }
  return { address, prefix, family };
}

function range(cidr: string, what: string): Range {
  const c = parseCidr(cidr);
  const list = new BlockList();
  list.addSubnet(c.address, c.prefix, c.family === 4 ? 'ipv4' : 'ipv6');
  return { cidr, what, list };
}

/** An IPv4-mapped IPv6 address (::ffff:a.b.c.d, in any spelling) as a.b.c.d; any other address as it is. */
export function unmapIPv4(address: string): string {
  if (isIP(address) !== 6) return address;
  // The URL parser writes IPv6 addresses in their canonical form: ::ffff:7f00:1 for every spelling of ::ffff:127.0.0.1.
  const canonical = new URL(`http://[${address.replace(/%.*$/, '')}]/`).hostname;
  const m = /^\[::ffff:([0-9a-f]{1,4}):([0-9a-f]{1,4})\]$/.exec(canonical);
  if (!m) return address;
  const hi = Number.parseInt(m[1]!, 16);
  const lo = Number.parseInt(m[2]!, 16);
  return `${hi >> 8}.${hi & 0xff}.${lo >> 8}.${lo & 0xff}`;
}

const systemResolve: Resolve = async (host) =>
  (await dnsLookup(host, { all: true, order: 'verbatim' })).map((a) => ({
    address: a.address,
    family: a.family === 6 ? 6 : 4,
  }));

/** The image URL policy of one agent. */
export class UrlGuard {
  readonly #allow: Range[];
  readonly #deny: Range[];
  readonly #resolve: Resolve;

  /** Throws TypeError for a malformed CIDR. */
  constructor(opts: UrlPolicyOptions = {}) {
    this.#allow = (opts.allowCidrs ?? []).map((c) => range(c, 'allowed'));
    this.#deny = [
      ...DEFAULT_DENIED_CIDRS.map((d) => range(d.cidr, d.what)),
      ...(opts.denyCidrs ?? []).map((c) => range(c, `in the denied range ${c} (--image-url-deny-cidr)`)),
    ];
    this.#resolve = opts.resolve ?? systemResolve;
  }

  /** Why `address` may not be fetched ("a loopback address"), or undefined when it may. */
  refusal(address: string): string | undefined {
    const a = unmapIPv4(address.replace(/%.*$/, '')); // without an IPv6 zone (fe80::1%eth0)
    const family = isIP(a);
    if (family === 0) return 'not an IP address';
    const type = family === 4 ? 'ipv4' : 'ipv6';
    if (this.#allow.some((r) => r.list.check(a, type))) return undefined;
    return this.#deny.find((r) => r.list.check(a, type))?.what;
  }

  /**
   * The addresses to connect to for `url` (its host resolved once; an IP literal as it is). Throws
   * UrlRefusedError when any of them is refused, and the resolver's error when the name does not resolve.
   * `via` names the URL that redirected here, for the message.
   */
  async vet(url: URL, via?: string): Promise<ResolvedAddress[]> {
    const host = url.hostname.startsWith('[') ? url.hostname.slice(1, -1) : url.hostname;
    const literal = isIP(host);
    const addrs: ResolvedAddress[] = literal
      ? [{ address: host, family: literal as 4 | 6 }]
      : await this.#resolve(host);
    if (addrs.length === 0) throw new Error(`${host} resolves to no address`);
    for (const { address } of addrs) {
      const why = this.refusal(address);
      if (why !== undefined) {
        throw new UrlRefusedError(
          `image URL ${url.href}${via ? ` (redirected from ${via})` : ''} resolves to ${unmapIPv4(address)}, ${why}; ` +
            'refused (allow it with --image-url-allow-cidr)',
        );
      }
    }
    return addrs;
  }
}
