import { describe, expect, it } from 'vitest';
import { HypervisorKind, ServerGroupKind } from '../api/compute.ts';
import { ComputeFilter } from './filters.ts';
import { freeOf, hostStateFrom, hostStatesFrom, limitsOf } from './host-state.ts';
import { flavorClaim, groupPolicyOf } from './request.ts';
import { claim, host, hypervisor, NOW } from './test-fixtures.ts';

describe('hostStateFrom', () => {
  it('reads labels, architecture, capacity, and the API defaults for reserved and ratios', () => {
    const h = host('hv-a', { labels: { 'topology.kubernetes.io/zone': 'az1' }, arch: 'amd64', accelerator: 'kvm' });
    expect(h).toMatchObject({
      name: 'hv-a',
      labels: { 'topology.kubernetes.io/zone': 'az1' },
      enabled: true,
      alive: true,
      architecture: 'x86_64',
      accelerator: 'kvm',
      capacity: { vcpus: 8, ramMiB: 16384, diskGiB: 100 },
      reserved: { vcpus: 0, ramMiB: 512, diskGiB: 0 },
      ratios: { vcpus: 4000, ramMiB: 1000, diskGiB: 1000 },
      usage: { vcpus: 0, ramMiB: 0, diskGiB: 0, servers: 0 },
    });
    expect(h.problem).toBeUndefined();
    expect(limitsOf(h)).toEqual({ vcpus: 32, ramMiB: 16384 - 512, diskGiB: 100 });
  });

  it('applies spec reserved and ratios exactly (integer thousandths)', () => {
    const h = host('hv', {
      vcpus: 6,
      ram: '8Gi',
      disk: '50Gi',
      spec: {
        cpuAllocationRatio: '1.5',
        ramAllocationRatio: '1.333',
        diskAllocationRatio: '2',
        reserved: { vcpus: 2, ram: '1Gi', disk: '10Gi' },
      },
    });
    // (6-2)*1.5 = 6; (8192-1024)*1.333 = 9555.0.. floored; (50-10)*2 = 80
    expect(limitsOf(h)).toEqual({ vcpus: 6, ramMiB: Math.floor((7168 * 1333) / 1000), diskGiB: 80 });
  });

  it('rounds capacity down and never goes negative when reserved exceeds capacity', () => {
    const h = host('hv', { ram: '1G', vcpus: 1, spec: { reserved: { vcpus: 2, ram: '512Mi', disk: '0' } } });
    expect(h.capacity.ramMiB).toBe(953); // 1e9 bytes = 953.67 MiB
    expect(limitsOf(h).vcpus).toBe(0);
  });

  it('is alive only when the operator judged it up (status.state), whatever time its status carries', () => {
    expect(host('hv').alive).toBe(true);
    expect(host('hv', { state: 'down' }).alive).toBe(false);
    expect(host('hv', { state: null }).alive).toBe(false);
    // A timestamp written from the node's clock (far past or future) plays no part.
    for (const t of ['2000-01-01T00:00:00Z', '2100-01-01T00:00:00Z']) {
      const hv = hypervisor('hv');
      hv.status = {
        ...hv.status,
        conditions: [{ type: 'Ready', status: 'True', reason: 'R', message: '', lastTransitionTime: t }],
      };
      expect(hostStateFrom(hv, [], NOW).alive).toBe(true);
      hv.status = { ...hv.status, state: 'down' };
      expect(hostStateFrom(hv, [], NOW).alive).toBe(false);
    }
  });

  it('sums the claims on the node (ignoring other nodes) and counts group members', () => {
    const h = host('hv', {}, [
      claim('hv', { vcpus: 2, ramMiB: 2048, diskGiB: 20, group: 'ns/g' }),
      claim('hv', { vcpus: 1, ramMiB: 512, diskGiB: 5, group: 'ns/g' }),
      claim('hv', { group: 'ns/other' }),
      claim('elsewhere', { vcpus: 100 }),
    ]);
    expect(h.usage).toEqual({ vcpus: 4, ramMiB: 3584, diskGiB: 35, servers: 3 });
    expect(Object.fromEntries(h.groupMembers)).toEqual({ 'ns/g': 2, 'ns/other': 1 });
    expect(freeOf(h)).toEqual({ vcpus: 28, ramMiB: 16384 - 512 - 3584, diskGiB: 65 });
  });

  it('keeps a hypervisor with unreadable status, marked with a problem ComputeFilter rejects', () => {
    const hv = hypervisor('hv');
    hv.status!.capacity!.ram = 'lots';
    const h = hostStateFrom(hv, [], NOW);
    expect(h.problem).toMatch(/invalid capacity/);
    expect(ComputeFilter(h, { server: 'ns/x', resources: { vcpus: 1, ramMiB: 1, diskGiB: 0 } })).toBe(false);
  });

  it('a hypervisor without reported capacity has none', () => {
    const hv = HypervisorKind.schema.parse({ metadata: { name: 'new' }, spec: {} });
    const h = hostStateFrom(hv, [], NOW);
    expect(h.alive).toBe(false);
    expect(limitsOf(h)).toEqual({ vcpus: 0, ramMiB: 0, diskGiB: 0 });
  });

  it('hostStatesFrom groups claims by node and can exclude the server being scheduled', () => {
    const claims = [claim('a', { server: 'ns/me' }), claim('a', { server: 'ns/x' }), claim('b', { server: 'ns/y' })];
    const [a, b] = hostStatesFrom([hypervisor('a'), hypervisor('b')], claims, NOW, { exclude: 'ns/me' });
    expect(a!.usage.servers).toBe(1);
    expect(b!.usage.servers).toBe(1);
  });
});

describe('flavorClaim', () => {
  const flavor = { vcpus: 2, ram: '4Gi', disk: '20Gi', ephemeral: '5Gi', swap: '512Mi', isPublic: true };

  it('counts root + ephemeral + swap, each rounded up to GiB, and RAM in MiB', () => {
    expect(flavorClaim(flavor)).toEqual({ vcpus: 2, ramMiB: 4096, diskGiB: 26 });
    expect(flavorClaim({ ...flavor, ram: '1G', disk: '1G', ephemeral: '0', swap: '0' })).toEqual({
      vcpus: 2,
      ramMiB: 954,
      diskGiB: 1,
    });
  });

  it('sizes a disk-0 flavor to the image: minDisk, or its virtual size when larger, else 0', () => {
    const f0 = { ...flavor, disk: '0', ephemeral: '0', swap: '0' };
    expect(flavorClaim(f0).diskGiB).toBe(0);
    expect(flavorClaim(f0, { spec: { minDisk: 8 } }).diskGiB).toBe(8);
    expect(flavorClaim(f0, { spec: { minDisk: 1 }, status: { virtualSize: 2 * 1024 ** 3 + 1 } }).diskGiB).toBe(3);
    // A sized flavor ignores the image.
    expect(flavorClaim({ ...f0, disk: '10Gi' }, { spec: { minDisk: 40 } }).diskGiB).toBe(10);
  });

  it('does not count the root disk when booting from a volume', () => {
    expect(flavorClaim(flavor, undefined, { bootFromVolume: true }).diskGiB).toBe(6);
  });
});

describe('groupPolicyOf', () => {
  const sg = (spec: unknown) => ServerGroupKind.schema.parse({ metadata: { namespace: 'ns', name: 'g' }, spec });

  it('keys by namespace/name; anti-affinity defaults to one member per host', () => {
    expect(groupPolicyOf(sg({ policy: 'anti-affinity' }))).toEqual({
      key: 'ns/g',
      policy: 'anti-affinity',
      maxServerPerHost: 1,
    });
    expect(groupPolicyOf(sg({ policy: 'anti-affinity', rules: { maxServerPerHost: 2 } })).maxServerPerHost).toBe(2);
    expect(groupPolicyOf(sg({ policy: 'soft-affinity' }))).toEqual({ key: 'ns/g', policy: 'soft-affinity' });
  });
});
