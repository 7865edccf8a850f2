import { describe, expect, it } from 'vitest';
import { hostStatesFrom, limitsOf } from './host-state.ts';
import { ClaimLedger } from './ledger.ts';
import { schedule } from './scheduler.ts';
import { hypervisor, NOW, request } from './test-fixtures.ts';

const c = (server: string, node: string, n = 1, group?: string) => ({
  server,
  node,
  vcpus: n,
  ramMiB: n * 1024,
  diskGiB: n * 10,
  ...(group ? { group } : {}),
});

describe('ClaimLedger', () => {
  it('assuming the same server twice does not double count', () => {
    const l = new ClaimLedger();
    l.assume(c('ns/a', 'hv1', 2));
    l.assume(c('ns/a', 'hv1', 2));
    expect(l.usageOf('hv1')).toEqual({ vcpus: 2, ramMiB: 2048, diskGiB: 20, servers: 1 });
    expect(l.size).toBe(1);
  });

  it('assuming on another node moves the claim (and a resize replaces it)', () => {
    const l = new ClaimLedger();
    l.assume(c('ns/a', 'hv1', 2));
    l.assume(c('ns/a', 'hv2', 4));
    expect(l.usageOf('hv1')).toEqual({ vcpus: 0, ramMiB: 0, diskGiB: 0, servers: 0 });
    expect(l.usageOf('hv2').vcpus).toBe(4);
    expect(l.claimsOn('hv1')).toEqual([]);
    expect(l.claimsOn('hv2').map((x) => x.server)).toEqual(['ns/a']);
  });

  it('confirm marks a claim seen; forget drops it; both report whether it existed', () => {
    const l = new ClaimLedger();
    l.assume(c('ns/a', 'hv1'));
    expect(l.stateOf('ns/a')).toBe('assumed');
    expect(l.confirm('ns/a')).toBe(true);
    expect(l.stateOf('ns/a')).toBe('confirmed');
    expect(l.confirm('ns/nope')).toBe(false);
    expect(l.forget('ns/a')).toBe(true);
    expect(l.forget('ns/a')).toBe(false);
    expect(l.usageOf('hv1').servers).toBe(0);
    expect(l.get('ns/a')).toBeUndefined();
  });

  it('copies claims, so a caller mutating its object cannot change the book', () => {
    const l = new ClaimLedger();
    const claim = c('ns/a', 'hv1');
    l.assume(claim);
    claim.vcpus = 99;
    expect(l.usageOf('hv1').vcpus).toBe(1);
  });

  it('rebuild replaces the book with the API view, keeping bindings still in flight', () => {
    const l = new ClaimLedger();
    l.assume(c('ns/inflight', 'hv1'));
    l.assume(c('ns/bound', 'hv1'));
    l.assume(c('ns/stale', 'hv2'));
    l.confirm('ns/stale');
    l.rebuild([c('ns/bound', 'hv2', 3), c('ns/other', 'hv1', 2, 'ns/g')]);
    expect(
      l
        .claims()
        .map((x) => x.server)
        .sort(),
    ).toEqual(['ns/bound', 'ns/inflight', 'ns/other']);
    expect(l.stateOf('ns/bound')).toBe('confirmed');
    expect(l.stateOf('ns/inflight')).toBe('assumed');
    expect(l.usageOf('hv1')).toEqual({ vcpus: 3, ramMiB: 3072, diskGiB: 30, servers: 2 });
    expect(l.usageOf('hv2').vcpus).toBe(3);
    expect(l.hostsOfGroup('ns/g')).toEqual(['hv1']);
  });

  it('hostsOfGroup lists the distinct hosts of a group, sorted', () => {
    const l = new ClaimLedger();
    l.assume(c('ns/1', 'b', 1, 'ns/g'));
    l.assume(c('ns/2', 'a', 1, 'ns/g'));
    l.assume(c('ns/3', 'a', 1, 'ns/g'));
    l.assume(c('ns/4', 'c', 1, 'ns/h'));
    expect(l.hostsOfGroup('ns/g')).toEqual(['a', 'b']);
  });

  it('a burst of schedule + assume never exceeds any host, then reports NoValidHost', () => {
    // Three hosts of different sizes; each decision sees the earlier assumptions, none is bound yet.
    const hvs = [
      hypervisor('hv1', { vcpus: 2, ram: '4Gi', disk: '40Gi' }),
      hypervisor('hv2', { vcpus: 4, ram: '8Gi', disk: '100Gi' }),
      hypervisor('hv3', { vcpus: 1, ram: '2560Mi', disk: '20Gi' }),
    ];
    const l = new ClaimLedger();
    const req = (i: number) => request({ server: `ns/s${i}`, resources: { vcpus: 1, ramMiB: 1024, diskGiB: 5 } });
    let placed = 0;
    let refused = 0;
    for (let i = 0; i < 50; i++) {
      const r = schedule(req(i), hostStatesFrom(hvs, l.claims(), NOW));
      if (!r.ok) {
        refused += 1;
        continue;
      }
      l.assume({ server: `ns/s${i}`, node: r.host, ...req(i).resources });
      placed += 1;
    }
    // RAM is the bound: (4096-512)/1024 = 3, (8192-512)/1024 = 7, (2560-512)/1024 = 2 → 12 servers.
    expect(placed).toBe(12);
    expect(refused).toBe(38);
    for (const h of hostStatesFrom(hvs, l.claims(), NOW)) {
      const lim = limitsOf(h);
      expect(h.usage.ramMiB).toBeLessThanOrEqual(lim.ramMiB);
      expect(h.usage.vcpus).toBeLessThanOrEqual(lim.vcpus);
      expect(h.usage.diskGiB).toBeLessThanOrEqual(lim.diskGiB);
      expect(l.usageOf(h.name)).toEqual(h.usage);
    }
  });
});
