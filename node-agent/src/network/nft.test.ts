import { describe, expect, it } from 'vitest';
import type { SecurityGroupPlan } from './backend.ts';
import {
  conntrackDeletions,
  formatCidr,
  linkLocalFromMac,
  type NftPort,
  normalizePrefixes,
  parseCidr,
  protocolNumber,
  renderRuleMatch,
  renderRules,
  replaceBatch,
  sameChains,
  tableHash,
  zonesForVnis,
} from './nft.ts';

const port = (id: string, device: string, over: Partial<NftPort['port']> = {}, zone = 100): NftPort => ({
  port: {
    id,
    mac: 'fa:16:3e:00:00:01',
    fixedIPs: [{ subnet: 's', ipAddress: '10.0.0.5' }],
    allowedAddressPairs: [],
    portSecurity: true,
    securityGroups: ['g1'],
    ...over,
  },
  device,
  bridge: 'stb-100',
  zone,
});

const group = (over: Partial<SecurityGroupPlan> = {}): SecurityGroupPlan => ({
  id: 'g1',
  name: 'default',
  namespace: 'ns',
  stateful: true,
  rules: [
    { direction: 'egress', ethertype: 'IPv4' },
    { direction: 'ingress', ethertype: 'IPv4', remoteGroupId: 'g1' },
  ],
  memberIPs: ['10.0.0.5', '10.0.0.6'],
  ...over,
});

describe('address helpers', () => {
  it('parses and formats prefixes, clearing host bits', () => {
    expect(formatCidr(parseCidr('10.1.2.3/16'))).toBe('10.1.0.0/16');
    expect(formatCidr(parseCidr('10.1.2.3'))).toBe('10.1.2.3');
    expect(formatCidr(parseCidr('2001:db8:0:0:1::5/64'))).toBe('2001:db8::/64');
    expect(formatCidr(parseCidr('::ffff:10.0.0.1'))).toBe('::ffff:a00:1');
    expect(() => parseCidr('10.0.0.0/33')).toThrow();
    expect(() => parseCidr('nope')).toThrow();
  });

  it('drops duplicates and prefixes covered by others, per IP version', () => {
    expect(normalizePrefixes(['10.0.0.5', '10.0.0.0/24', '10.0.1.1', '10.0.0.5', 'fe80::1', 'bad'], 4)).toEqual([
      '10.0.0.0/24',
      '10.0.1.1',
    ]);
    expect(normalizePrefixes(['0.0.0.0', '0.0.0.0/0', '10.0.0.1'], 4)).toEqual(['0.0.0.0/0']);
    expect(normalizePrefixes(['10.0.0.1', '2001:db8::1', '2001:db8::/32'], 6)).toEqual(['2001:db8::/32']);
  });

  it('derives the EUI-64 link-local address of a MAC', () => {
    expect(linkLocalFromMac('fa:16:3e:00:00:01')).toBe('fe80::f816:3eff:fe00:1');
  });
});

describe('rule matches', () => {
  const idx = new Map([['g1', 1]]);
  const members = new Map([['g1', ['10.0.0.6', '10.0.0.0/30']]]);

  it('renders protocols, port ranges, ICMP type and code, prefixes and remote groups', () => {
    expect(
      renderRuleMatch(
        { direction: 'ingress', ethertype: 'IPv4', protocol: 'tcp', portRangeMin: 22, portRangeMax: 25 },
        idx,
        members,
      )?.match,
    ).toBe('meta nfproto ipv4 meta l4proto 6 th dport 22-25');
    expect(
      renderRuleMatch({ direction: 'ingress', ethertype: 'IPv4', protocol: 'udp', portRangeMin: 53 }, idx, members)
        ?.match,
    ).toBe('meta nfproto ipv4 meta l4proto 17 th dport 53');
    expect(
      renderRuleMatch(
        { direction: 'egress', ethertype: 'IPv4', protocol: 'icmp', portRangeMin: 8, portRangeMax: 0 },
        idx,
        members,
      )?.match,
    ).toBe('meta nfproto ipv4 meta l4proto 1 icmp type 8 icmp code 0');
    // "icmp" on an IPv6 rule is ICMPv6 (Neutron)
    expect(
      renderRuleMatch({ direction: 'ingress', ethertype: 'IPv6', protocol: 'icmp', portRangeMin: 128 }, idx, members)
        ?.match,
    ).toBe('meta nfproto ipv6 meta l4proto 58 icmpv6 type 128');
    expect(
      renderRuleMatch({ direction: 'egress', ethertype: 'IPv4', remoteIPPrefix: '192.168.0.9/16' }, idx, members)
        ?.match,
    ).toBe('meta nfproto ipv4 ip daddr 192.168.0.0/16');
    expect(
      renderRuleMatch({ direction: 'ingress', ethertype: 'IPv4', remoteIPPrefix: '0.0.0.0/0' }, idx, members)?.match,
    ).toBe('meta nfproto ipv4');
    const rg = renderRuleMatch({ direction: 'ingress', ethertype: 'IPv4', remoteGroupId: 'g1' }, idx, members);
    expect(rg?.match).toBe('meta nfproto ipv4 ip saddr @rg_1_v4');
    // the permission key carries the members, so removing one is a lost permission
    expect(rg?.key).toBe('meta nfproto ipv4 ip saddr {10.0.0.0/30,10.0.0.6}');
    expect(
      renderRuleMatch({ direction: 'ingress', ethertype: 'IPv4', protocol: '132', portRangeMin: 1 }, idx, members)
        ?.match,
    ).toBe('meta nfproto ipv4 meta l4proto 132 th dport 1');
  });

  it('skips rules that can never match and refuses unknown protocols', () => {
    expect(
      renderRuleMatch({ direction: 'ingress', ethertype: 'IPv6', remoteIPPrefix: '10.0.0.0/8' }, idx, members),
    ).toBeUndefined();
    expect(
      renderRuleMatch({ direction: 'ingress', ethertype: 'IPv4', remoteGroupId: 'unknown' }, idx, members),
    ).toBeUndefined();
    expect(() => protocolNumber('bogus', 'IPv4')).toThrow(/unknown protocol/);
    expect(protocolNumber('any', 'IPv4')).toBeUndefined();
    expect(protocolNumber('ICMPV6', 'IPv6')).toBe(58);
  });
});

describe('renderRules', () => {
  it('renders anti-spoofing, marks, zones and per-port chains', () => {
    const r = renderRules({
      ports: [
        port('p2', 'stt-b', { mac: 'fa:16:3e:00:00:02', fixedIPs: [{ subnet: 's', ipAddress: '10.0.0.6' }] }),
        port('p1', 'stt-a', {
          allowedAddressPairs: [
            { ipAddress: '10.0.9.0/24', macAddress: '' },
            { ipAddress: '10.0.8.1', macAddress: 'fa:16:3e:00:00:aa' },
          ],
        }),
        port('p3', 'stt-c', { portSecurity: false }),
      ],
      securityGroups: [group()],
      l2Drops: [{ device: 'stx-100', mac: '02:73:64:00:00:64' }],
    });
    // indexes by device order; the port without port security has none
    expect(r.portIndex).toEqual({ p1: 1, p2: 2 });
    const br = r.bridge!;
    expect(br).toContain('table bridge stratus_l2 {');
    expect(br).toContain('iifname "stt-a" jump spoof_1');
    expect(br).not.toContain('stt-c');
    expect(br).toContain('iifname "stt-a" meta mark set meta mark | 0x10010000');
    expect(br).toContain('oifname "stt-b" meta mark set meta mark | 0x10000002');
    expect(br).toContain('ether saddr != { fa:16:3e:00:00:01, fa:16:3e:00:00:aa } drop');
    expect(br).toContain('ether saddr fa:16:3e:00:00:01 ip saddr { 10.0.0.5, 10.0.9.0/24 } accept');
    expect(br).toContain('ether saddr fa:16:3e:00:00:aa ip saddr { 10.0.8.1 } accept');
    expect(br).toContain(
      'ether saddr fa:16:3e:00:00:01 arp saddr ether fa:16:3e:00:00:01 arp saddr ip { 0.0.0.0, 10.0.0.5, 10.0.9.0/24 } accept',
    );
    expect(br).toContain('iifname "stx-100" ether saddr 02:73:64:00:00:64 drop');
    expect(br).toContain('oifname "stx-100" ether saddr 02:73:64:00:00:64 drop');
    const inet = r.inet!;
    expect(inet).toContain('elements = { "stb-100" : 100 }');
    expect(inet).toContain('elements = { 10.0.0.5, 10.0.0.6 }');
    expect(inet).toContain('meta mark & 0x1fff0000 vmap { 0x10010000 : jump eg_1, 0x10020000 : jump eg_2 }');
    expect(inet).toContain('meta mark & 0x10000fff vmap { 0x10000001 : jump in_1, 0x10000002 : jump in_2 }');
    expect(inet).toMatch(/chain in_1 \{\n\t\tct state established,related accept\n\t\tct state invalid drop\n/);
    expect(inet).toContain('meta nfproto ipv4 ip saddr @rg_1_v4 accept');
    expect(inet).toMatch(/chain eg_1 \{[\s\S]*?\n\t\tmeta nfproto ipv4 return\n\t\tdrop\n\t\}/);
    // nft 1.0.6 pitfalls: never a rule and `}` on one line, never the `fwd` keyword as a name
    expect(`${br}${inet}`).not.toMatch(/\}[ \t]*\}|(drop|accept|return|@\w+)[ \t]*\}/);
    expect(`${br}${inet}`).not.toMatch(/chain fwd\b/);
    expect(r.permissions.p1).toEqual({
      zone: 100,
      ips: ['10.0.0.5', '10.0.8.1'],
      ingress: ['meta nfproto ipv4 ip saddr {10.0.0.5,10.0.0.6}'],
      egress: ['meta nfproto ipv4'],
    });
  });

  it('is deterministic: the same plan in another order renders the same text (and hash)', () => {
    const ports = [port('p1', 'stt-a'), port('p2', 'stt-b', { mac: 'fa:16:3e:00:00:02' })];
    const g2 = group({ id: 'g2', memberIPs: [] });
    const a = renderRules({ ports, securityGroups: [group(), g2] });
    const b = renderRules({
      ports: [...ports].reverse(),
      securityGroups: [g2, group({ memberIPs: ['10.0.0.6', '10.0.0.5'] })],
    });
    expect(a.inet).toBe(b.inet);
    expect(a.bridge).toBe(b.bridge);
    expect(tableHash(a.inet!)).toMatch(/^[0-9a-f]{16}$/);
    const c = renderRules({ ports, securityGroups: [group({ memberIPs: ['10.0.0.5'] }), g2] });
    expect(tableHash(c.inet!)).not.toBe(tableHash(a.inet!));
    // an empty group renders a set without elements (not `elements = { }`)
    expect(a.inet).toMatch(/set rg_2_v4 \{\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\}/);
  });

  it('renders stateless groups without the conntrack shortcut', () => {
    const r = renderRules({ ports: [port('p1', 'stt-a')], securityGroups: [group({ stateful: false })] });
    expect(r.inet).not.toContain('ct state');
  });

  it('renders nothing for ports without port security, and refuses conflicting zones', () => {
    const r = renderRules({ ports: [port('p1', 'stt-a', { portSecurity: false })], securityGroups: [] });
    expect(r.bridge).toBeUndefined();
    expect(r.inet).toBeUndefined();
    expect(() =>
      renderRules({ ports: [port('p1', 'stt-a'), port('p2', 'stt-b', {}, 7)], securityGroups: [group()] }),
    ).toThrow(/conflicting conntrack zones/);
  });

  it('reports unrenderable rules as warnings and renders the rest', () => {
    const r = renderRules({
      ports: [port('p1', 'stt-a')],
      securityGroups: [group({ rules: [{ direction: 'ingress', ethertype: 'IPv4', protocol: 'bogus' }] })],
    });
    expect(r.warnings).toEqual(['security group ns/default: rule skipped: unknown protocol bogus']);
    expect(r.inet).toContain('chain in_1');
  });

  it('compares the chains of a listing with a rendering', () => {
    const r = renderRules({ ports: [port('p1', 'stt-a')], securityGroups: [group()] });
    expect(sameChains(r.inet!, r.inet!)).toBe(true);
    expect(sameChains(r.inet!.replace('chain in_1 {', 'chain other {'), r.inet!)).toBe(false);
  });

  it('builds an atomic replace batch', () => {
    expect(replaceBatch('inet', 't', 'table inet t {\n}\n')).toBe(
      'add table inet t\ndelete table inet t\ntable inet t {\n}\n',
    );
  });
});

describe('conntrackDeletions', () => {
  const perm = (ingress: string[], egress: string[]) => ({ zone: 5, ips: ['10.0.0.5', 'fd00::5'], ingress, egress });
  it('deletes the flows of a direction that lost a permission', () => {
    expect(conntrackDeletions({ p: perm(['a', 'b'], ['x']) }, { p: perm(['a'], ['x', 'y']) })).toEqual([
      ['-D', '-w', '5', '-d', '10.0.0.5'],
      ['-D', '-w', '5', '-f', 'ipv6', '-d', 'fd00::5'],
    ]);
    expect(conntrackDeletions({ p: perm(['a'], ['x']) }, { p: perm(['a'], []) })).toEqual([
      ['-D', '-w', '5', '-s', '10.0.0.5'],
      ['-D', '-w', '5', '-f', 'ipv6', '-s', 'fd00::5'],
    ]);
  });
  it('deletes nothing when permissions only grow or ports are new', () => {
    expect(conntrackDeletions({ p: perm(['a'], []) }, { p: perm(['a', 'b'], ['x']), q: perm([], []) })).toEqual([]);
  });
  it('deletes the flows of a secured port that went, except addresses a remaining port still holds', () => {
    const gone = { zone: 5, ips: ['10.0.0.7', '10.0.0.100'], ingress: ['a'], egress: [] };
    const vip = { zone: 5, ips: ['10.0.0.5', '10.0.0.100'], ingress: ['a'], egress: [] };
    // q reuses the released address 10.0.0.7 in the same zone: it must not inherit the old flows
    const reuse = { zone: 5, ips: ['10.0.0.7'], ingress: [], egress: [] };
    expect(conntrackDeletions({ p: gone, v: vip }, { v: vip, q: reuse })).toEqual([
      ['-D', '-w', '5', '-d', '10.0.0.7'],
      ['-D', '-w', '5', '-s', '10.0.0.7'],
    ]);
  });
});

describe('zonesForVnis', () => {
  it('uses the VNI when it fits and a free stable slot otherwise', () => {
    const z = zonesForVnis([100, 65536 + 100, 65536 + 99, 5]);
    expect(z.get(100)).toBe(100);
    expect(z.get(5)).toBe(5);
    const big = [z.get(65636)!, z.get(65635)!];
    expect(new Set([...z.values()]).size).toBe(4);
    for (const v of big) expect(v).toBeGreaterThanOrEqual(1);
    for (const v of big) expect(v).toBeLessThanOrEqual(65535);
    expect(zonesForVnis([65636, 65635])).toEqual(zonesForVnis([65635, 65636]));
  });
});
