import { describe, expect, it } from 'vitest';
import type { Hypervisor } from '../api/compute.ts';
import { VolumeBackendFilter } from './filters.ts';
import { hostStateFrom } from './host-state.ts';
import { schedule } from './scheduler.ts';
import * as fx from './test-fixtures.ts';
import { backendReach, placeVolume, type VolumeHost, volumeHostOf } from './volume-placement.ts';
import { VolumeAffinityWeigher } from './weighers.ts';

const host = (name: string, freeGiB: number, o: Partial<VolumeHost> = {}): VolumeHost => ({
  name,
  usable: true,
  zone: 'nova',
  backends: new Map([['local', { ok: true }]]),
  freeDisk: BigInt(freeGiB) * 1024n ** 3n,
  ...o,
});

describe('placeVolume', () => {
  it('picks the usable host with the backend and the most free disk', () => {
    const r = placeVolume({ backend: 'local' }, [host('a', 10), host('b', 50), host('c', 30)]);
    expect(r).toEqual({ ok: true, node: 'b' });
  });
  it('skips hosts down or disabled, in another zone, or without the backend ok', () => {
    const hosts = [
      host('down', 100, { usable: false }),
      host('far', 90, { zone: 'az2' }),
      host('broken', 80, { backends: new Map([['local', { ok: false, reason: 'no qemu-img' }]]) }),
      host('ok', 1),
    ];
    expect(placeVolume({ backend: 'local', availabilityZone: 'nova' }, hosts)).toEqual({ ok: true, node: 'ok' });
  });
  it('rbd: any host that reaches rbd', () => {
    const rbd = new Map([['rbd', { ok: true }]]);
    expect(placeVolume({ backend: 'rbd' }, [host('a', 100), host('b', 1, { backends: rbd })])).toEqual({
      ok: true,
      node: 'b',
    });
  });
  it('a required node (bound server, source snapshot) is used when it qualifies', () => {
    expect(placeVolume({ backend: 'local', node: 'a' }, [host('a', 1), host('b', 100)])).toEqual({
      ok: true,
      node: 'a',
    });
  });
  it('no host: Cinder’s words and why', () => {
    const r = placeVolume({ backend: 'rbd' }, [host('a', 1), host('b', 1, { usable: false })]);
    expect(r.ok).toBe(false);
    expect(!r.ok && r.message).toMatch(
      /^No valid backend was found\. .*1 not up or disabled, 1 cannot reach backend rbd/,
    );
  });
  it('ties break by name (deterministic)', () => {
    expect(placeVolume({ backend: 'local' }, [host('b', 5), host('a', 5)])).toEqual({ ok: true, node: 'a' });
  });
});

describe('volumeHostOf / backendReach', () => {
  const hv = {
    metadata: { name: 'n1', labels: { 'topology.kubernetes.io/zone': 'az1' } },
    spec: { enabled: true },
    status: {
      state: 'up',
      allocatable: { disk: '100Gi' },
      usage: { disk: '30Gi' },
      volumeBackends: [
        { name: 'local', ok: true },
        { name: 'rbd', ok: false, reason: 'no ceph.conf' },
      ],
    },
  } as unknown as Hypervisor;
  it('reads zone, liveness, free disk and backends', () => {
    const h = volumeHostOf(hv);
    expect(h).toMatchObject({ name: 'n1', usable: true, zone: 'az1', freeDisk: 70n * 1024n ** 3n });
    expect(h.backends.get('rbd')).toEqual({ ok: false, reason: 'no ceph.conf' });
  });
  it('says why a node cannot reach a backend', () => {
    expect(backendReach(hv, 'local')).toEqual({ ok: true });
    expect(backendReach(hv, 'rbd')).toEqual({ ok: false, reason: 'no ceph.conf' });
    expect(backendReach(hv, 'nfs').ok).toBe(false);
    expect(backendReach(undefined, 'local').ok).toBe(false);
  });
});

describe('boot from volume in the server scheduler', () => {
  const withBackends = (name: string, backends: string[], o: { ram?: string } = {}) => {
    const hv = fx.hypervisor(name, o);
    hv.status = { ...hv.status, volumeBackends: backends.map((b) => ({ name: b, ok: true })) };
    return hostStateFrom(hv, [], fx.NOW);
  };
  it('VolumeBackendFilter removes hosts that do not reach the boot volume’s backend', () => {
    const hosts = [withBackends('a', ['local']), withBackends('b', ['local', 'rbd'])];
    const r = schedule(fx.request({ volumeBackends: ['rbd'] }), hosts);
    expect(r.ok && r.host).toBe('b');
    expect(VolumeBackendFilter(hosts[0]!, fx.request())).toBe(true);
    const none = schedule(fx.request({ volumeBackends: ['rbd'] }), [hosts[0]!]);
    expect(!none.ok && none.message).toMatch(/VolumeBackendFilter removed 1 \(0 left\)/);
  });
  it('VolumeAffinityWeigher prefers the node holding the local boot volume over freer hosts', () => {
    const hosts = [withBackends('big', ['local'], { ram: '64Gi' }), withBackends('small', ['local'], { ram: '8Gi' })];
    expect(schedule(fx.request(), hosts)).toMatchObject({ ok: true, host: 'big' });
    expect(schedule(fx.request({ volumeHosts: ['small'] }), hosts)).toMatchObject({ ok: true, host: 'small' });
  });
  it('VolumeAffinityWeigher weighs the share of the server’s local volumes a node holds', () => {
    const hosts = [withBackends('a', ['local']), withBackends('b', ['local']), withBackends('c', ['local'])];
    const req = fx.request({ volumeHosts: ['a', 'b', 'b'] });
    expect(hosts.map((h) => VolumeAffinityWeigher(h, req))).toEqual([1 / 3, 2 / 3, 0]);
    expect(schedule(req, hosts)).toMatchObject({ ok: true, host: 'b' });
    expect(VolumeAffinityWeigher(hosts[0]!, fx.request())).toBe(0);
  });
});
