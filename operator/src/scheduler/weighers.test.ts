import { describe, expect, it } from 'vitest';
import { multipliersOf, schedule } from './scheduler.ts';
import { claim, host, request } from './test-fixtures.ts';
import {
  CPUWeigher,
  DiskWeigher,
  normalize,
  RAMWeigher,
  ServerGroupSoftAffinityWeigher,
  ServerGroupSoftAntiAffinityWeigher,
  weighHosts,
} from './weighers.ts';

describe('normalize', () => {
  it('scales to 0..1 between min and max', () => {
    expect(normalize([10, 0, 5])).toEqual([1, 0, 0.5]);
    expect(normalize([-4, -2])).toEqual([0, 1]);
  });
  it('all equal (or one host) gives 0, no division by zero', () => {
    expect(normalize([7, 7, 7])).toEqual([0, 0, 0]);
    expect(normalize([3])).toEqual([0]);
    expect(normalize([])).toEqual([]);
  });
});

describe('resource weighers', () => {
  const busy = host('busy', {}, [claim('busy', { vcpus: 8, ramMiB: 8192, diskGiB: 60 })]);
  const idle = host('idle');
  it('return free amounts after ratios and usage', () => {
    expect(RAMWeigher(busy, request())).toBe(16384 - 512 - 8192);
    expect(CPUWeigher(busy, request())).toBe(32 - 8);
    expect(DiskWeigher(busy, request())).toBe(40);
    expect(RAMWeigher(idle, request())).toBe(16384 - 512);
  });
  it('spread prefers the emptiest host, pack the fullest', () => {
    const half = host('half', {}, [claim('half', { vcpus: 4, ramMiB: 4096, diskGiB: 30 })]);
    const hosts = [busy, half, idle];
    expect(weighHosts(hosts, request(), multipliersOf({ strategy: 'spread' })).map((w) => w.host)).toEqual([
      'idle',
      'half',
      'busy',
    ]);
    expect(weighHosts(hosts, request(), multipliersOf({ strategy: 'pack' })).map((w) => w.host)).toEqual([
      'busy',
      'half',
      'idle',
    ]);
  });
  it('sums multiplier × normalised value per weigher', () => {
    // idle: most free of all three → 1 each; busy: least → 0 each.
    const w = weighHosts([busy, idle], request(), multipliersOf({ multipliers: { CPUWeigher: 2, DiskWeigher: 0 } }));
    expect(w).toEqual([
      { host: 'idle', weight: 3 },
      { host: 'busy', weight: 0 },
    ]);
  });
  it('a multiplier overrides the strategy for its weigher', () => {
    // More RAM free on a, more CPU free on b; pack on CPU with RAM spread at 2 → a wins.
    const a = host('a', { vcpus: 2, ram: '32Gi' });
    const b = host('b', { vcpus: 16, ram: '8Gi' });
    const m = multipliersOf({ strategy: 'pack', multipliers: { RAMWeigher: 2, DiskWeigher: 0 } });
    expect(m).toMatchObject({ RAMWeigher: 2, CPUWeigher: -1, DiskWeigher: 0 });
    expect(weighHosts([a, b], request(), m)[0]!.host).toBe('a');
  });
});

describe('server group soft weighers', () => {
  const g = (n: number, name: string) =>
    host(
      name,
      {},
      Array.from({ length: n }, () => claim(name, { group: 'ns/g', vcpus: 0, ramMiB: 0, diskGiB: 0 })),
    );
  const hosts = [g(2, 'two'), g(0, 'zero'), g(1, 'one')];
  const only = (name: 'ServerGroupSoftAffinityWeigher' | 'ServerGroupSoftAntiAffinityWeigher') => ({
    multipliers: { RAMWeigher: 0, CPUWeigher: 0, DiskWeigher: 0, [name]: 1 },
  });

  it('soft-affinity: more members is better', () => {
    const req = request({ group: { key: 'ns/g', policy: 'soft-affinity' } });
    expect(ServerGroupSoftAffinityWeigher(hosts[0]!, req)).toBe(2);
    const order = weighHosts(hosts, req, multipliersOf(only('ServerGroupSoftAffinityWeigher')));
    expect(order.map((w) => w.host)).toEqual(['two', 'one', 'zero']);
  });
  it('soft-anti-affinity: fewer members is better', () => {
    const req = request({ group: { key: 'ns/g', policy: 'soft-anti-affinity' } });
    expect(ServerGroupSoftAntiAffinityWeigher(hosts[0]!, req)).toBe(-2);
    const order = weighHosts(hosts, req, multipliersOf(only('ServerGroupSoftAntiAffinityWeigher')));
    expect(order.map((w) => w.host)).toEqual(['zero', 'one', 'two']);
  });
  it('weigh nothing for other policies or no group', () => {
    const hard = request({ group: { key: 'ns/g', policy: 'affinity' } });
    expect(ServerGroupSoftAffinityWeigher(hosts[0]!, hard)).toBe(0);
    expect(ServerGroupSoftAntiAffinityWeigher(hosts[0]!, request())).toBe(0);
  });
  it('with default multipliers, soft-anti-affinity decides between hosts of equal free resources', () => {
    // The members consume nothing, so only the group weigher tells the hosts apart.
    const req = request({ group: { key: 'ns/g', policy: 'soft-anti-affinity' } });
    const r = schedule(req, hosts);
    expect(r.ok && r.host).toBe('zero');
  });
});
