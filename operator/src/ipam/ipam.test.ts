import { describe, expect, it } from 'vitest';
import {
  ipAllocationName,
  ipToBigInt,
  MAX_VNI,
  macAllocationName,
  Subnet,
  segmentAllocationName,
} from '../api/network.ts';
import {
  candidates,
  canonicalIP,
  effectiveSubnet,
  firstFree,
  formatIP,
  inPools,
  isReserved,
  macFromBytes,
  nextVni,
  poolCapacity,
  usage,
  vniStart,
  vxlanMtu,
} from './ipam.ts';

const sub = (o: Record<string, unknown>) => effectiveSubnet(Subnet.parse({ name: 's', ...o }));
const ip = (s: string) => ipToBigInt(s);
const take = (g: Generator<bigint>, n: number) => {
  const out: string[] = [];
  for (const x of g) {
    out.push(formatIP(x, x > 0xffffffffn ? 6 : 4));
    if (out.length === n) break;
  }
  return out;
};

describe('effectiveSubnet', () => {
  it('defaults the gateway to the first host and pools to the rest of the CIDR', () => {
    const s = sub({ cidr: '10.0.0.0/24' });
    expect(formatIP(s.gateway!, 4)).toBe('10.0.0.1');
    expect(s.pools.map((p) => [formatIP(p.start, 4), formatIP(p.end, 4)])).toEqual([['10.0.0.2', '10.0.0.254']]);
    expect(poolCapacity(s)).toBe(253n);
  });

  it('splits the default pool around an explicit gateway', () => {
    const s = sub({ cidr: '10.0.0.0/24', gatewayIP: '10.0.0.100' });
    expect(s.pools.map((p) => [formatIP(p.start, 4), formatIP(p.end, 4)])).toEqual([
      ['10.0.0.1', '10.0.0.99'],
      ['10.0.0.101', '10.0.0.254'],
    ]);
    expect(poolCapacity(s)).toBe(253n);
  });

  it('has no gateway when disabled and hands out the first host', () => {
    const s = sub({ cidr: '192.168.1.0/29', disableGateway: true });
    expect(s.gateway).toBeUndefined();
    expect(
      take(
        candidates(s, () => false),
        10,
      ),
    ).toEqual(['192.168.1.1', '192.168.1.2', '192.168.1.3', '192.168.1.4', '192.168.1.5', '192.168.1.6']);
  });

  it('never hands out network, broadcast or gateway even when a pool covers them', () => {
    const s = sub({ cidr: '10.1.0.0/29', allocationPools: [{ start: '10.1.0.0', end: '10.1.0.7' }] });
    expect(isReserved(s, ip('10.1.0.0'))).toBe(true);
    expect(isReserved(s, ip('10.1.0.1'))).toBe(true);
    expect(isReserved(s, ip('10.1.0.7'))).toBe(true);
    expect(
      take(
        candidates(s, () => false),
        10,
      ),
    ).toEqual(['10.1.0.2', '10.1.0.3', '10.1.0.4', '10.1.0.5', '10.1.0.6']);
    expect(poolCapacity(s)).toBe(5n);
  });

  it('merges overlapping pools and iterates them in order', () => {
    const s = sub({
      cidr: '10.2.0.0/24',
      allocationPools: [
        { start: '10.2.0.50', end: '10.2.0.52' },
        { start: '10.2.0.10', end: '10.2.0.11' },
        { start: '10.2.0.51', end: '10.2.0.53' },
      ],
    });
    expect(
      take(
        candidates(s, () => false),
        10,
      ),
    ).toEqual(['10.2.0.10', '10.2.0.11', '10.2.0.50', '10.2.0.51', '10.2.0.52', '10.2.0.53']);
    expect(inPools(s, ip('10.2.0.12'))).toBe(false);
  });

  it('IPv6: skips the subnet-router anycast address and the gateway, keeps the last address', () => {
    const s = sub({ cidr: 'fd00:1::/64' });
    expect(s.family).toBe(6);
    expect(formatIP(s.gateway!, 6)).toBe('fd00:1::1');
    expect(
      take(
        candidates(s, () => false),
        2,
      ),
    ).toEqual(['fd00:1::2', 'fd00:1::3']);
    expect(isReserved(s, ip('fd00:1::'))).toBe(true);
    expect(isReserved(s, ip('fd00:1::ffff:ffff:ffff:ffff'))).toBe(false);
    expect(usage(s, []).available).toBe(Number.MAX_SAFE_INTEGER);
  });

  it('IPv4 /31 and /32 use every address', () => {
    expect(poolCapacity(sub({ cidr: '10.9.0.0/31', disableGateway: true }))).toBe(2n);
    expect(poolCapacity(sub({ cidr: '10.9.0.5/32', disableGateway: true }))).toBe(1n);
  });
});

describe('candidates and usage', () => {
  it('skips taken addresses and reports exhaustion', () => {
    const s = sub({ cidr: '10.3.0.0/29' }); // pool .2-.6
    const taken = new Set([ip('10.3.0.2'), ip('10.3.0.3')]);
    expect(formatIP(firstFree(s, (n) => taken.has(n))!, 4)).toBe('10.3.0.4');
    for (const a of ['10.3.0.4', '10.3.0.5', '10.3.0.6']) taken.add(ip(a));
    expect(firstFree(s, (n) => taken.has(n))).toBeUndefined();
  });

  it('counts claims in the subnet and free pool addresses', () => {
    const s = sub({ cidr: '10.4.0.0/24', allocationPools: [{ start: '10.4.0.10', end: '10.4.0.19' }] });
    // one in the pool, one outside the pool but in the subnet, one outside the subnet (ignored), one duplicate
    const u = usage(s, [ip('10.4.0.10'), ip('10.4.0.200'), ip('10.5.0.1'), ip('10.4.0.10')]);
    expect(u).toEqual({ allocated: 2, available: 9 });
  });
});

describe('addresses and names', () => {
  it('formats IPv6 in RFC 5952 form', () => {
    expect(canonicalIP('FD00:0001:0000:0000:0000:0000:0000:0005')).toBe('fd00:1::5');
    expect(canonicalIP('2001:db8:0:0:1:0:0:1')).toBe('2001:db8::1:0:0:1');
    expect(canonicalIP('2001:db8:0:1:1:1:1:1')).toBe('2001:db8:0:1:1:1:1:1');
    expect(canonicalIP('::')).toBe('::');
    expect(canonicalIP('::1')).toBe('::1');
    expect(canonicalIP('10.0.0.1')).toBe('10.0.0.1');
  });

  it('names a claim once per address, whatever its spelling', () => {
    expect(ipAllocationName('net1', 'v4', '10.0.0.5')).toBe('net1.v4.10-0-0-5');
    expect(ipAllocationName('net1', 'v6', 'fd00:1::5')).toBe('net1.v6.fd00-1-0-0-0-0-0-5');
    expect(ipAllocationName('net1', 'v6', 'fd00:1:0:0::5')).toBe(ipAllocationName('net1', 'v6', 'fd00:1::5'));
    expect(macAllocationName('net1', 'FA:16:3E:00:AB:01')).toBe('net1.mac.fa-16-3e-00-ab-01');
    expect(segmentAllocationName(42)).toBe('vxlan-42');
  });

  it('keeps names within 253 characters and distinct for long network names', () => {
    const long = `${'a'.repeat(62)}.${'b'.repeat(62)}.${'c'.repeat(62)}.${'d'.repeat(62)}`;
    const other = `${long.slice(0, 250)}zz`;
    const a = ipAllocationName(long, 'subnet-with-a-long-name', 'fd00:ffff:ffff:ffff:ffff:ffff:ffff:ffff');
    const b = ipAllocationName(other, 'subnet-with-a-long-name', 'fd00:ffff:ffff:ffff:ffff:ffff:ffff:ffff');
    expect(a.length).toBeLessThanOrEqual(253);
    expect(a).not.toBe(b);
    expect(a).toMatch(/^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/);
    expect(macAllocationName(long, 'fa:16:3e:00:00:01').length).toBeLessThanOrEqual(253);
  });

  it('builds fa:16:3e MACs', () => {
    expect(macFromBytes([0, 171, 255])).toBe('fa:16:3e:00:ab:ff');
  });
});

describe('VNIs and MTU', () => {
  it('starts from a stable hash of the uid inside the VNI range and wraps', () => {
    const uid = '6f1c1f0e-8b55-4d4e-9b7b-0c8f5b0e1a2b';
    expect(vniStart(uid)).toBe(vniStart(uid));
    expect(vniStart(uid)).not.toBe(vniStart('another-uid'));
    for (const u of ['a', 'b', 'c', uid]) {
      expect(vniStart(u)).toBeGreaterThanOrEqual(1);
      expect(vniStart(u)).toBeLessThanOrEqual(MAX_VNI);
    }
    expect(nextVni(7)).toBe(8);
    expect(nextVni(MAX_VNI)).toBe(1);
  });

  it('subtracts the VXLAN overhead', () => {
    expect(vxlanMtu(1500)).toBe(1450);
    expect(vxlanMtu(9000)).toBe(8950);
  });
});
