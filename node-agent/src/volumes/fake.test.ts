import { describe, expect, it } from 'vitest';
import { volumeSerial } from '../driver.ts';
import { FAKE_IMAGES, FakeExporter, FakeVolumeBackend, fakeNbdConnection } from './fake.ts';

const vol = (id: string) => ({ id, name: id, namespace: 'ns' });
const GiB = 2 ** 30;

describe('FakeVolumeBackend (simulated nodes)', () => {
  it('creates idempotently, extends but never shrinks, snapshots and restores, lists and forgets', async () => {
    const b = new FakeVolumeBackend({ node: 'sim-0' });
    expect(await b.probe()).toEqual({ ok: true });
    const v = await b.create(vol('u1'), GiB, { kind: 'blank' });
    expect(v.location).toBe('local://sim-0/u1');
    expect(await b.create(vol('u1'), 2 * GiB, { kind: 'blank' })).toMatchObject({ sizeBytes: GiB });
    await expect(b.extend(v.location, GiB / 2)).rejects.toThrow(RangeError);
    expect((await b.extend(v.location, 2 * GiB)).sizeBytes).toBe(2 * GiB);
    const s = await b.createSnapshot(v.location, { id: 's1', name: 's1', namespace: 'ns' });
    await expect(b.create(vol('u2'), GiB, { kind: 'snapshot', location: s.location })).rejects.toThrow(RangeError);
    const r = await b.create(vol('u2'), 2 * GiB, { kind: 'snapshot', location: s.location });
    expect(await b.list()).toEqual({ volumes: [v.location, r.location], snapshots: [s.location] });
    const c = await b.connection(vol('u2'), r.location);
    expect(c).toEqual({ volumeId: 'u2', serial: volumeSerial('u2'), blockdev: { driver: 'null-co', size: 2 * GiB } });
    await b.delete(v.location);
    await b.deleteSnapshot(s.location);
    expect(await b.inspect(v.location)).toBeUndefined();
    await expect(b.connection(vol('u1'), v.location)).rejects.toThrow(/no volume/);
  });

  it('takes an image at its declared checksum, with no data', async () => {
    const img = await FAKE_IMAGES.ensure({
      url: 'http://x/i.qcow2',
      checksum: { algorithm: 'sha256', value: 'ab'.repeat(32) },
    } as never);
    expect(img).toMatchObject({ format: 'raw', virtualSize: 0, sha256: 'ab'.repeat(32) });
    const b = new FakeVolumeBackend({ node: 'sim-0' });
    expect((await b.create(vol('u3'), GiB, { kind: 'image', image: img })).sizeBytes).toBe(GiB);
  });

  it('exports and unexports by name; the remote side opens a null-co blockdev', async () => {
    const e = new FakeExporter({ host: '10.0.0.1' });
    const req = { name: 'vol-u1', volumeId: 'u1', blockdev: {}, writable: true };
    expect(await e.ensureExport(req)).toEqual({ host: '10.0.0.1', port: 10809, name: 'vol-u1' });
    await e.ensureExport(req);
    expect(await e.exports()).toEqual(['vol-u1']);
    await e.removeExport('vol-u1');
    await e.removeExport('vol-u1');
    expect(await e.exports()).toEqual([]);
    expect(fakeNbdConnection(vol('u1'))).toEqual({
      volumeId: 'u1',
      serial: volumeSerial('u1'),
      blockdev: { driver: 'null-co' },
    });
  });
});
