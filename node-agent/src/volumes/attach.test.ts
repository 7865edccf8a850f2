import { describe, expect, it } from 'vitest';
import type { AttachedVolume } from '../driver.ts';
import {
  bytesQuantity,
  type DesiredVolume,
  decideAttachments,
  normalizeQos,
  qosKey,
  serverChangedForVolumes,
  type VolumeFault,
  volumeReport,
} from './attach.ts';

const GiB = 2 ** 30;
const want = (uid: string, o: Partial<DesiredVolume> = {}): DesiredVolume => ({
  volume: `vol-${uid}`,
  volumeUID: uid,
  bus: 'virtio',
  boot: false,
  qos: {},
  ...o,
});
const have = (uid: string, sizeBytes?: number): AttachedVolume => ({
  volumeId: uid,
  serial: uid.replaceAll('-', '').slice(0, 20),
  bus: 'virtio',
  device: `d${uid}`,
  ...(sizeBytes !== undefined ? { sizeBytes } : {}),
});
/** QoS already applied for these volumes (as after an attach by this agent). */
const applied = (...uids: string[]) => new Map(uids.map((u) => [u, qosKey({})]));

describe('decideAttachments', () => {
  it('attaches what is desired and missing, and nothing that is already attached (restart: read back)', () => {
    expect(decideAttachments([want('a'), want('b')], [have('a')], { appliedQos: applied('a') })).toEqual([
      { kind: 'attach', volume: want('b') },
    ]);
    expect(decideAttachments([want('a')], [have('a')], { appliedQos: applied('a') })).toEqual([]);
  });

  it('detaches what is attached and no longer desired, first', () => {
    expect(decideAttachments([want('b')], [have('a')], { appliedQos: new Map() })).toEqual([
      { kind: 'detach', volumeId: 'a' },
      { kind: 'attach', volume: want('b') },
    ]);
  });

  it('never hot-plugs nor unplugs the boot volume', () => {
    expect(decideAttachments([want('r', { boot: true, bootIndex: 0 })], [], { appliedQos: new Map() })).toEqual([]);
    expect(decideAttachments([], [have('r')], { bootVolumeUID: 'r', appliedQos: new Map() })).toEqual([
      { kind: 'keep', volumeId: 'r', reason: 'the boot volume goes with the guest' },
    ]);
  });

  it('attaches nothing to a server being deleted, but still detaches', () => {
    expect(decideAttachments([want('b')], [have('a')], { appliedQos: new Map(), deleting: true })).toEqual([
      { kind: 'detach', volumeId: 'a' },
    ]);
  });

  it('extends when the volume is extended beyond the size QEMU sees, once', () => {
    const d = want('a', { extendTo: 2 * GiB });
    expect(decideAttachments([d], [have('a', GiB)], { appliedQos: applied('a') })).toEqual([
      { kind: 'extend', volumeId: 'a', sizeBytes: 2 * GiB },
    ]);
    expect(decideAttachments([d], [have('a', 2 * GiB)], { appliedQos: applied('a') })).toEqual([]);
    // a stopped guest (no size known) needs nothing
    expect(decideAttachments([d], [have('a')], { appliedQos: applied('a') })).toEqual([]);
  });

  it('sets QoS when the type limits differ from those applied (or unknown after a restart)', () => {
    const d = want('a', { qos: { totalBytesSec: 1_000_000 } });
    expect(decideAttachments([d], [have('a')], { appliedQos: applied('a') })).toEqual([
      { kind: 'qos', volumeId: 'a', qos: { totalBytesSec: 1_000_000 } },
    ]);
    expect(decideAttachments([want('a')], [have('a')], { appliedQos: new Map() })).toEqual([
      { kind: 'qos', volumeId: 'a', qos: {} },
    ]);
    expect(
      decideAttachments([d], [have('a')], { appliedQos: new Map([['a', qosKey({ totalBytesSec: 1_000_000 })]]) }),
    ).toEqual([]);
  });
});

describe('volume report', () => {
  const names = (uid: string) => `vol-${uid}`;

  it('reports attached volumes with their size, failed attaches as error with the fault', () => {
    const faults = new Map<string, VolumeFault>([['b', { op: 'attach', message: 'attach failed: boom' }]]);
    expect(volumeReport([want('a'), want('b')], [have('a', GiB)], faults, names)).toEqual([
      { volume: 'vol-a', volumeUID: 'a', serial: 'a', bus: 'virtio', device: 'da', state: 'attached', size: '1Gi' },
      { volume: 'vol-b', volumeUID: 'b', serial: 'b', bus: 'virtio', state: 'error', fault: 'attach failed: boom' },
    ]);
  });

  it('a failed detach stays reported (error); a failed extend keeps the volume attached with the fault', () => {
    const faults = new Map<string, VolumeFault>([
      ['a', { op: 'detach', message: 'detach failed: busy' }],
      ['c', { op: 'extend', message: 'extend failed: no' }],
    ]);
    const out = volumeReport([want('c')], [have('a'), have('c')], faults, names);
    expect(out.map((e) => [e.volumeUID, e.state, e.fault])).toEqual([
      ['a', 'error', 'detach failed: busy'],
      ['c', 'attached', 'extend failed: no'],
    ]);
  });

  it('a volume waiting for its connection is not reported', () => {
    expect(volumeReport([want('a')], [], new Map(), names)).toEqual([]);
  });
});

describe('helpers', () => {
  it('normalizeQos drops unlimited (0) and absent values and sorts keys', () => {
    expect(JSON.stringify(normalizeQos({ writeIopsSec: 5, readBytesSec: 0, totalBytesSec: undefined }))).toBe(
      '{"writeIopsSec":5}',
    );
    expect(qosKey({ readIopsSec: 1, writeIopsSec: 2 })).toBe(qosKey({ writeIopsSec: 2, readIopsSec: 1 }));
  });

  it('bytesQuantity is exact', () => {
    expect(bytesQuantity(GiB)).toBe('1Gi');
    expect(bytesQuantity(1536 * 2 ** 20)).toBe('1536Mi');
    expect(bytesQuantity(1000)).toBe('1000');
    expect(bytesQuantity(0)).toBe('0');
  });
});

describe('serverChangedForVolumes', () => {
  it("ignores the attacher's own report and resourceVersion, not the rest of the report or the spec", () => {
    const a = {
      metadata: { name: 's', resourceVersion: '1' },
      spec: { volumes: [] },
      status: { compute: { node: 'n', vmState: 'building' } },
    };
    const ownWrite = {
      ...a,
      metadata: { name: 's', resourceVersion: '2' },
      status: { compute: { node: 'n', vmState: 'building', volumes: [{ volume: 'v' }] } },
    };
    expect(serverChangedForVolumes(a, ownWrite)).toBe(false);
    expect(serverChangedForVolumes(a, { ...a, status: { compute: { node: 'n', vmState: 'active' } } })).toBe(true);
    expect(serverChangedForVolumes(a, { ...a, spec: { volumes: [{ volume: 'v' }] } })).toBe(true);
  });
});
