import { describe, expect, it } from 'vitest';
import { hostStatesFrom } from './host-state.ts';
import { ClaimLedger } from './ledger.ts';
import { noValidHostMessage, type ScheduleResult, schedule } from './scheduler.ts';
import { claim, host, hypervisor, NOW, request } from './test-fixtures.ts';

function hostOf(r: ScheduleResult): string {
  if (!r.ok) throw new Error(r.message);
  return r.host;
}

describe('schedule: NoValidHost', () => {
  it('names each filter that removed hosts, in order, and stops at zero', () => {
    const hosts = [host('a', { enabled: false }), host('b', { ram: '2Gi' }), host('c', { ram: '2Gi' }), host('d')];
    const r = schedule(request({ resources: { vcpus: 64, ramMiB: 15873, diskGiB: 10 } }), hosts);
    expect(r).toMatchObject({
      ok: false,
      reason: 'NoValidHost',
      message: 'No valid host was found: 4 hosts; ComputeFilter removed 1 (3 left), RamFilter removed 3 (0 left)',
    });
    // CoreFilter (vcpus 64 would fail too) never ran: filters stop at zero candidates.
    expect(r.steps.map((s) => s.filter)).toEqual([
      'ComputeFilter',
      'IgnoreHostsFilter',
      'AvailabilityZoneFilter',
      'NodeSelectorFilter',
      'ImagePropertiesFilter',
      'RamFilter',
    ]);
  });

  it('with no hosts at all', () => {
    const r = schedule(request(), []);
    expect(r).toMatchObject({ ok: false, message: 'No valid host was found: 0 hosts', steps: [] });
  });

  it('formats one host and several filters', () => {
    expect(noValidHostMessage(1, [{ filter: 'ComputeFilter', removed: 1, left: 0 }])).toBe(
      'No valid host was found: 1 host; ComputeFilter removed 1 (0 left)',
    );
    const r = schedule(request({ availabilityZone: 'az1', nodeSelector: { ssd: 'yes' } }), [
      host('a', { labels: { 'topology.kubernetes.io/zone': 'az1' } }),
      host('b', { labels: { 'topology.kubernetes.io/zone': 'az2' } }),
      host('c', { state: 'down' }),
    ]);
    expect(!r.ok && r.message).toBe(
      'No valid host was found: 3 hosts; ComputeFilter removed 1 (2 left), AvailabilityZoneFilter removed 1 (1 left), NodeSelectorFilter removed 1 (0 left)',
    );
  });

  it('runs the configured filters only, and refuses an unknown one', () => {
    const small = host('a', { ram: '1Gi' });
    expect(schedule(request(), [small]).ok).toBe(false);
    expect(schedule(request(), [small], { filters: ['ComputeFilter'] }).ok).toBe(true);
    expect(() => schedule(request(), [small], { filters: ['NoSuchFilter' as 'RamFilter'] })).toThrow(/unknown/);
  });
});

describe('schedule: choice', () => {
  it('returns the best host and the weights of all candidates, best first', () => {
    const r = schedule(request(), [host('full', {}, [claim('full', { vcpus: 16, ramMiB: 8192 })]), host('empty')]);
    expect(r.ok && r.host).toBe('empty');
    expect(r.ok && r.weights.map((w) => w.host)).toEqual(['empty', 'full']);
    expect(r.ok && r.weights[0]!.weight).toBe(3);
  });

  it('pack picks the fullest host that still fits', () => {
    const hosts = [
      host('empty'),
      host('full', {}, [claim('full', { ramMiB: 16384 - 512 })]),
      host('half', {}, [claim('half', { ramMiB: 8000 })]),
    ];
    expect(hostOf(schedule(request(), hosts, { strategy: 'pack' }))).toBe('half');
    expect(hostOf(schedule(request(), hosts, { strategy: 'spread' }))).toBe('empty');
  });

  it('is deterministic: equal hosts tie-break by name whatever the input order', () => {
    const names = ['hv-c', 'hv-a', 'hv-d', 'hv-b'];
    for (let i = 0; i < names.length; i++) {
      const rotated = [...names.slice(i), ...names.slice(0, i)].map((n) => host(n));
      const r = schedule(request(), rotated);
      expect(hostOf(r)).toBe('hv-a');
      expect(r.ok && r.weights.map((w) => w.host)).toEqual(['hv-a', 'hv-b', 'hv-c', 'hv-d']);
    }
  });

  it('random picks among the top hostSubsetSize only', () => {
    const hosts = ['a', 'b', 'c', 'd'].map((n) => host(n));
    expect(hostOf(schedule(request(), hosts, { random: () => 0.99 }))).toBe('a'); // subset 1
    expect(hostOf(schedule(request(), hosts, { random: () => 0.99, hostSubsetSize: 3 }))).toBe('c');
    expect(hostOf(schedule(request(), hosts, { random: () => 0, hostSubsetSize: 3 }))).toBe('a');
    expect(hostOf(schedule(request(), hosts, { random: () => 0.5, hostSubsetSize: 3 }))).toBe('b');
    expect(hostOf(schedule(request(), hosts, { random: () => 0.99, hostSubsetSize: 10 }))).toBe('d');
  });

  it('ignoreHosts moves a migrating server off its host', () => {
    const hosts = [host('a'), host('b', {}, [claim('b', { vcpus: 30 })])];
    expect(hostOf(schedule(request({ ignoreHosts: ['a'] }), hosts))).toBe('b');
  });
});

describe('schedule: server groups end to end', () => {
  const hvs = ['a', 'b', 'c'].map((n) => hypervisor(n));

  it('hard affinity: the first member goes anywhere, the next ones follow it', () => {
    const ledger = new ClaimLedger();
    // Load a, so the first member goes to b (tie with c broken by name).
    ledger.assume({ server: 'ns/x', node: 'a', vcpus: 8, ramMiB: 4096, diskGiB: 10 });
    const group = { key: 'ns/g', policy: 'affinity' as const };
    const first = hostOf(schedule(request({ server: 'ns/m1', group }), hostStatesFrom(hvs, ledger.claims(), NOW)));
    expect(first).toBe('b');
    ledger.assume({ server: 'ns/m1', node: first, vcpus: 1, ramMiB: 8000, diskGiB: 10, group: 'ns/g' });
    const r = schedule(request({ server: 'ns/m2', group }), hostStatesFrom(hvs, ledger.claims(), NOW));
    expect(hostOf(r)).toBe('b'); // although c is emptier
    expect(r.steps.find((s) => s.filter === 'ServerGroupAffinityFilter')).toEqual({
      filter: 'ServerGroupAffinityFilter',
      removed: 2,
      left: 1,
    });
  });

  it('hard affinity with the members host gone (hosts given by the ledger) finds no host', () => {
    const group = { key: 'ns/g', policy: 'affinity' as const, hosts: ['deleted-hv'] };
    const r = schedule(request({ group }), hostStatesFrom(hvs, [], NOW));
    expect(!r.ok && r.message).toBe('No valid host was found: 3 hosts; ServerGroupAffinityFilter removed 3 (0 left)');
  });

  it('hard anti-affinity spreads members one per host, then refuses', () => {
    const ledger = new ClaimLedger();
    const group = { key: 'ns/g', policy: 'anti-affinity' as const, maxServerPerHost: 1 };
    const got: string[] = [];
    for (let i = 1; i <= 4; i++) {
      const r = schedule(request({ server: `ns/m${i}`, group }), hostStatesFrom(hvs, ledger.claims(), NOW));
      if (!r.ok) {
        expect(i).toBe(4);
        expect(r.message).toBe('No valid host was found: 3 hosts; ServerGroupAntiAffinityFilter removed 3 (0 left)');
        break;
      }
      got.push(r.host);
      ledger.assume({ server: `ns/m${i}`, node: r.host, vcpus: 1, ramMiB: 1024, diskGiB: 10, group: 'ns/g' });
    }
    expect(got.sort()).toEqual(['a', 'b', 'c']);
  });

  it('anti-affinity with maxServerPerHost 2 places two per host', () => {
    const ledger = new ClaimLedger();
    const group = { key: 'ns/g', policy: 'anti-affinity' as const, maxServerPerHost: 2 };
    let placed = 0;
    for (let i = 1; i <= 7; i++) {
      const r = schedule(request({ server: `ns/m${i}`, group }), hostStatesFrom(hvs, ledger.claims(), NOW));
      if (!r.ok) break;
      placed += 1;
      ledger.assume({ server: `ns/m${i}`, node: r.host, vcpus: 1, ramMiB: 1024, diskGiB: 10, group: 'ns/g' });
    }
    expect(placed).toBe(6);
    for (const n of ['a', 'b', 'c']) expect(ledger.usageOf(n).servers).toBe(2);
  });

  it('a retried request does not count its own assumed claim (exclude)', () => {
    const ledger = new ClaimLedger();
    const hv = [hypervisor('only', { ram: '2560Mi' })]; // room for 2 × 1024 MiB
    ledger.assume({ server: 'ns/me', node: 'only', vcpus: 1, ramMiB: 2048, diskGiB: 10 });
    const req = request({ server: 'ns/me', resources: { vcpus: 1, ramMiB: 2048, diskGiB: 10 } });
    expect(schedule(req, hostStatesFrom(hv, ledger.claims(), NOW)).ok).toBe(false);
    expect(hostOf(schedule(req, hostStatesFrom(hv, ledger.claims(), NOW, { exclude: 'ns/me' })))).toBe('only');
  });
});
