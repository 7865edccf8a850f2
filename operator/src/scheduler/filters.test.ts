import { describe, expect, it } from 'vitest';
import {
  AvailabilityZoneFilter,
  ComputeFilter,
  CoreFilter,
  DEFAULT_FILTERS,
  DiskFilter,
  FILTERS,
  IgnoreHostsFilter,
  ImagePropertiesFilter,
  NodeSelectorFilter,
  RamFilter,
  ServerGroupAffinityFilter,
  ServerGroupAntiAffinityFilter,
} from './filters.ts';
import { claim, host, request } from './test-fixtures.ts';

const ram = (ramMiB: number) => request({ resources: { vcpus: 1, ramMiB, diskGiB: 0 } });
const cpus = (vcpus: number) => request({ resources: { vcpus, ramMiB: 1, diskGiB: 0 } });
const disk = (diskGiB: number) => request({ resources: { vcpus: 1, ramMiB: 1, diskGiB } });

describe('ComputeFilter', () => {
  it('passes an enabled host the operator judged up', () => {
    expect(ComputeFilter(host('a'), request())).toBe(true);
  });
  it('refuses a disabled host', () => {
    expect(ComputeFilter(host('a', { enabled: false }), request())).toBe(false);
  });
  it('refuses a host that is down or not judged yet', () => {
    expect(ComputeFilter(host('a', { state: 'down' }), request())).toBe(false);
    expect(ComputeFilter(host('a', { state: null }), request())).toBe(false);
  });
});

describe('RamFilter', () => {
  // 4096 MiB - 512 MiB reserved (API default) = 3584 MiB at ratio 1.0
  const h = host('a', { ram: '4Gi' });
  it('fits exactly a full host and refuses one MiB over', () => {
    expect(RamFilter(h, ram(3584))).toBe(true);
    expect(RamFilter(h, ram(3585))).toBe(false);
  });
  it('subtracts what is placed', () => {
    const used = host('a', { ram: '4Gi' }, [claim('a', { ramMiB: 1000 })]);
    expect(RamFilter(used, ram(2584))).toBe(true);
    expect(RamFilter(used, ram(2585))).toBe(false);
  });
  it('applies reserved and the RAM ratio to (capacity - reserved)', () => {
    const h2 = host('a', { ram: '4Gi', spec: { ramAllocationRatio: '1.5', reserved: { ram: '1Gi' } } });
    expect(RamFilter(h2, ram(4608))).toBe(true); // (4096-1024)*1.5
    expect(RamFilter(h2, ram(4609))).toBe(false);
  });
});

describe('CoreFilter', () => {
  it('CPU ratio 4.0 (the default) allows 4x the vCPUs, not one more', () => {
    const h = host('a', { vcpus: 4 });
    expect(CoreFilter(h, cpus(16))).toBe(true);
    expect(CoreFilter(h, cpus(17))).toBe(false);
  });
  it('reserved CPUs are removed before the ratio; ratio 1.0 is no overcommit', () => {
    expect(CoreFilter(host('a', { vcpus: 4, spec: { reserved: { vcpus: 1 } } }), cpus(12))).toBe(true);
    expect(CoreFilter(host('a', { vcpus: 4, spec: { reserved: { vcpus: 1 } } }), cpus(13))).toBe(false);
    expect(CoreFilter(host('a', { vcpus: 4, spec: { cpuAllocationRatio: '1.0' } }), cpus(5))).toBe(false);
  });
  it('counts vCPUs already placed', () => {
    const h = host('a', { vcpus: 4 }, [claim('a', { vcpus: 10 }), claim('a', { vcpus: 4 })]);
    expect(CoreFilter(h, cpus(2))).toBe(true);
    expect(CoreFilter(h, cpus(3))).toBe(false);
  });
});

describe('DiskFilter', () => {
  it('applies reserved disk and ratio, and fits exactly', () => {
    const h = host('a', { disk: '100Gi', spec: { reserved: { disk: '10Gi' } } }, [claim('a', { diskGiB: 40 })]);
    expect(DiskFilter(h, disk(50))).toBe(true);
    expect(DiskFilter(h, disk(51))).toBe(false);
    const over = host('a', { disk: '100Gi', spec: { diskAllocationRatio: '2.0' } });
    expect(DiskFilter(over, disk(200))).toBe(true);
    expect(DiskFilter(over, disk(201))).toBe(false);
  });
  it('a zero request fits even an over-committed host (placement does not ask for it)', () => {
    const h = host('a', { disk: '10Gi' }, [claim('a', { diskGiB: 20 })]);
    expect(DiskFilter(h, disk(0))).toBe(true);
    expect(DiskFilter(h, disk(1))).toBe(false);
  });
});

describe('AvailabilityZoneFilter', () => {
  const az1 = host('a', { labels: { 'topology.kubernetes.io/zone': 'az1' } });
  const unlabeled = host('b');
  it('a request without zone matches any host', () => {
    expect(AvailabilityZoneFilter(az1, request())).toBe(true);
    expect(AvailabilityZoneFilter(unlabeled, request())).toBe(true);
  });
  it('a zone matches only hosts labelled with it', () => {
    expect(AvailabilityZoneFilter(az1, request({ availabilityZone: 'az1' }))).toBe(true);
    expect(AvailabilityZoneFilter(az1, request({ availabilityZone: 'az2' }))).toBe(false);
    expect(AvailabilityZoneFilter(unlabeled, request({ availabilityZone: 'az1' }))).toBe(false);
  });
  it('unlabelled hosts are in the default zone "nova"', () => {
    expect(AvailabilityZoneFilter(unlabeled, request({ availabilityZone: 'nova' }))).toBe(true);
    expect(AvailabilityZoneFilter(az1, request({ availabilityZone: 'nova' }))).toBe(false);
  });
});

describe('NodeSelectorFilter', () => {
  const h = host('a', { labels: { gpu: 'yes', tier: 'gold' } });
  it('needs every selector label with an equal value', () => {
    expect(NodeSelectorFilter(h, request())).toBe(true);
    expect(NodeSelectorFilter(h, request({ nodeSelector: {} }))).toBe(true);
    expect(NodeSelectorFilter(h, request({ nodeSelector: { gpu: 'yes', tier: 'gold' } }))).toBe(true);
    expect(NodeSelectorFilter(h, request({ nodeSelector: { gpu: 'yes', tier: 'silver' } }))).toBe(false);
    expect(NodeSelectorFilter(h, request({ nodeSelector: { ssd: 'yes' } }))).toBe(false);
  });
});

describe('ImagePropertiesFilter', () => {
  const x86 = host('a', { arch: 'x86_64', accelerator: 'tcg' });
  const arm = host('b', { arch: 'arm64', accelerator: 'kvm' });
  const unknown = host('c');
  const arch = (a: string) => request({ imageProperties: { hw_architecture: a } });
  it('an image without hw_architecture runs anywhere', () => {
    expect(ImagePropertiesFilter(x86, request())).toBe(true);
    expect(ImagePropertiesFilter(unknown, request({ imageProperties: { os_distro: 'ubuntu' } }))).toBe(true);
  });
  it('matches the architecture, using canonical names', () => {
    expect(ImagePropertiesFilter(x86, arch('x86_64'))).toBe(true);
    expect(ImagePropertiesFilter(x86, arch('amd64'))).toBe(true);
    expect(ImagePropertiesFilter(x86, arch('aarch64'))).toBe(false);
    expect(ImagePropertiesFilter(arm, arch('aarch64'))).toBe(true);
  });
  it('refuses a host that does not report its architecture when the image needs one', () => {
    expect(ImagePropertiesFilter(unknown, arch('x86_64'))).toBe(false);
  });
  it('img_hv_type kvm needs a KVM host; qemu runs on both', () => {
    const hv = (t: string) => request({ imageProperties: { img_hv_type: t } });
    expect(ImagePropertiesFilter(x86, hv('kvm'))).toBe(false);
    expect(ImagePropertiesFilter(arm, hv('kvm'))).toBe(true);
    expect(ImagePropertiesFilter(x86, hv('qemu'))).toBe(true);
  });
});

describe('ServerGroupAffinityFilter', () => {
  const group = { key: 'ns/g', policy: 'affinity' as const };
  it('without placed members, any host passes', () => {
    expect(ServerGroupAffinityFilter(host('a'), request({ group: { ...group, hosts: [] } }))).toBe(true);
    expect(ServerGroupAffinityFilter(host('a'), request({ group }))).toBe(true);
  });
  it('with members placed, only their hosts pass', () => {
    const req = request({ group: { ...group, hosts: ['b'] } });
    expect(ServerGroupAffinityFilter(host('a'), req)).toBe(false);
    expect(ServerGroupAffinityFilter(host('b'), req)).toBe(true);
  });
  it('ignores other policies', () => {
    const req = request({ group: { ...group, policy: 'soft-affinity', hosts: ['b'] } });
    expect(ServerGroupAffinityFilter(host('a'), req)).toBe(true);
  });
});

describe('ServerGroupAntiAffinityFilter', () => {
  const onA = (n: number) =>
    host(
      'a',
      {},
      Array.from({ length: n }, () => claim('a', { group: 'ns/g' })),
    );
  const anti = (maxServerPerHost?: number) =>
    request({
      group: { key: 'ns/g', policy: 'anti-affinity', ...(maxServerPerHost ? { maxServerPerHost } : {}) },
    });
  it('maxServerPerHost 1 (default): a host with a member is refused', () => {
    expect(ServerGroupAntiAffinityFilter(onA(0), anti())).toBe(true);
    expect(ServerGroupAntiAffinityFilter(onA(1), anti())).toBe(false);
    expect(ServerGroupAntiAffinityFilter(onA(1), anti(1))).toBe(false);
  });
  it('maxServerPerHost 2: one member passes, two are refused', () => {
    expect(ServerGroupAntiAffinityFilter(onA(1), anti(2))).toBe(true);
    expect(ServerGroupAntiAffinityFilter(onA(2), anti(2))).toBe(false);
  });
  it('members of other groups do not count; other policies are ignored', () => {
    const other = host('a', {}, [claim('a', { group: 'ns/other' })]);
    expect(ServerGroupAntiAffinityFilter(other, anti())).toBe(true);
    expect(ServerGroupAntiAffinityFilter(onA(3), request({ group: { key: 'ns/g', policy: 'affinity' } }))).toBe(true);
  });
});

describe('IgnoreHostsFilter', () => {
  it('removes the listed hosts only', () => {
    expect(IgnoreHostsFilter(host('a'), request({ ignoreHosts: ['a'] }))).toBe(false);
    expect(IgnoreHostsFilter(host('b'), request({ ignoreHosts: ['a'] }))).toBe(true);
    expect(IgnoreHostsFilter(host('a'), request())).toBe(true);
  });
});

describe('registry', () => {
  it('every default filter is registered under its own name', () => {
    for (const name of DEFAULT_FILTERS) expect(FILTERS[name]).toBeTypeOf('function');
    expect(new Set(DEFAULT_FILTERS).size).toBe(Object.keys(FILTERS).length);
  });
});
