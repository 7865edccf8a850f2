import { describe, expect, it } from 'vitest';
import type { Volume, VolumeAttachment, VolumeSnapshot } from '../../../operator/src/api/index.ts';
import {
  ATTACHED_LOCAL_SNAPSHOT_FAULT,
  byteQuantity,
  changedBesidesHost,
  decideSnapshot,
  decideVolume,
  remoteAttachments,
  uidOfLocation,
} from './host.ts';

const ME = 'node-a';
const UID = '0b8e2f4c-1d2a-4c3b-9e8f-7a6b5c4d3e2f';

function volume(o: {
  size?: string;
  status?: Volume['status'];
  deleting?: boolean;
  attachments?: VolumeAttachment[];
}): Volume {
  return {
    apiVersion: 'storage.stratus.io/v1alpha1',
    kind: 'Volume',
    metadata: {
      name: 'v1',
      namespace: 'demo',
      uid: UID,
      ...(o.deleting ? { deletionTimestamp: '2026-01-01T00:00:00Z' } : {}),
    },
    spec: { size: o.size ?? '1Gi' },
    status: {
      node: ME,
      backend: 'local',
      ...o.status,
      ...(o.attachments ? { attachments: o.attachments } : {}),
    },
  } as Volume;
}

const available = (size = '1Gi') => ({ node: ME, state: 'available' as const, location: `local://${ME}/${UID}`, size });
const att = (state: VolumeAttachment['state'], node?: string): VolumeAttachment => ({
  server: `s-${state}-${node ?? 'none'}`,
  state,
  ...(node ? { node } : {}),
});

describe('decideVolume', () => {
  it('leaves volumes of other nodes alone', () => {
    expect(decideVolume(volume({ status: { node: 'other' } }), ME)).toEqual({ kind: 'none' });
  });

  it('creates when there is no report, the report is creating, or a create failed (error without location)', () => {
    expect(decideVolume(volume({}), ME)).toEqual({ kind: 'create' });
    expect(decideVolume(volume({ status: { host: { node: ME, state: 'creating' } } }), ME).kind).toBe('create');
    expect(decideVolume(volume({ status: { host: { node: ME, state: 'error', fault: 'x' } } }), ME).kind).toBe(
      'create',
    );
    // A report about another node is not this node's: it creates (idempotent by uid).
    expect(decideVolume(volume({ status: { host: { ...available(), node: 'other' } } }), ME).kind).toBe('create');
  });

  it('does nothing for an available volume of the asked size', () => {
    expect(decideVolume(volume({ status: { host: available() } }), ME)).toEqual({ kind: 'none' });
    // never shrinks: a report bigger than the spec is fine
    expect(decideVolume(volume({ size: '1Gi', status: { host: available('2Gi') } }), ME)).toEqual({ kind: 'none' });
  });

  it('extends a detached volume whose spec grew (a reserved attachment does not hold the file open)', () => {
    expect(decideVolume(volume({ size: '2Gi', status: { host: available() } }), ME)).toEqual({
      kind: 'extend',
      sizeBytes: 2 * 1024 ** 3,
    });
    expect(
      decideVolume(volume({ size: '2Gi', status: { host: available() }, attachments: [att('reserved', ME)] }), ME).kind,
    ).toBe('extend');
  });

  it('lets QEMU grow an attached local volume (only refreshes the size), but extends an attached rbd one', () => {
    for (const state of ['attaching', 'attached', 'detaching'] as const) {
      expect(
        decideVolume(volume({ size: '2Gi', status: { host: available() }, attachments: [att(state, ME)] }), ME),
      ).toEqual({ kind: 'refresh-size', sizeBytes: 2 * 1024 ** 3 });
    }
    const rbd = volume({
      size: '2Gi',
      status: { backend: 'rbd', host: { ...available(), location: `rbd://f/volumes/volume-${UID}` } },
      attachments: [att('attached', ME)],
    });
    expect(decideVolume(rbd, ME)).toEqual({ kind: 'extend', sizeBytes: 2 * 1024 ** 3 });
  });

  it('keeps extending after a failed extend (state kept available, with a fault)', () => {
    expect(
      decideVolume(volume({ size: '2Gi', status: { host: { ...available(), fault: 'extend failed' } } }), ME).kind,
    ).toBe('extend');
  });

  it('deletes once the operator says deleting and no attachment is left, and stops at deleted', () => {
    const deleting = 'deleting' as const;
    expect(decideVolume(volume({ deleting: true, status: { status: deleting, host: available() } }), ME)).toEqual({
      kind: 'delete',
    });
    expect(decideVolume(volume({ deleting: true, status: { status: deleting } }), ME)).toEqual({ kind: 'delete' });
    expect(
      decideVolume(
        volume({
          deleting: true,
          status: { status: deleting, host: available() },
          attachments: [att('detaching', ME)],
        }),
        ME,
      ).kind,
    ).toBe('wait');
    expect(
      decideVolume(volume({ deleting: true, status: { status: deleting, host: { node: ME, state: 'deleted' } } }), ME),
    ).toEqual({ kind: 'none' });
    // a failed delete (error with a location) is retried
    expect(
      decideVolume(
        volume({
          deleting: true,
          status: { status: 'error_deleting', host: { ...available(), state: 'error', fault: 'x' } },
        }),
        ME,
      ).kind,
    ).toBe('delete');
    // a delete this host began (then crashed) goes on
    expect(
      decideVolume(volume({ deleting: true, status: { host: { ...available(), state: 'deleting' } } }), ME).kind,
    ).toBe('delete');
  });

  it('does not delete a volume the operator still holds (snapshots of it are left: DependentSnapshots)', () => {
    expect(decideVolume(volume({ deleting: true, status: { status: 'available', host: available() } }), ME)).toEqual({
      kind: 'wait',
      reason: 'deletion waits for the operator (status deleting)',
    });
  });
});

describe('remoteAttachments', () => {
  it('exports local volumes attaching/attached (or still detaching) on other nodes only', () => {
    const v = volume({
      status: { host: available() },
      attachments: [
        att('attached', 'node-b'),
        att('attaching', 'node-c'),
        att('attached', ME),
        att('reserved', 'node-d'),
        att('detaching', 'node-e'),
        att('attaching'),
      ],
    });
    expect(remoteAttachments(v, ME).map((a) => a.node)).toEqual(['node-b', 'node-c', 'node-e']);
    expect(remoteAttachments({ ...v, status: { ...v.status, backend: 'rbd' } }, ME)).toEqual([]);
  });
});

describe('decideSnapshot', () => {
  const SNAP = '11111111-2222-4333-8444-555555555555';
  const snap = (status: VolumeSnapshot['status'], deleting = false): VolumeSnapshot =>
    ({
      apiVersion: 'storage.stratus.io/v1alpha1',
      kind: 'VolumeSnapshot',
      metadata: { name: 's1', namespace: 'demo', uid: SNAP, ...(deleting ? { deletionTimestamp: 'x' } : {}) },
      spec: { volume: 'v1', force: false },
      status: { node: ME, ...status },
    }) as VolumeSnapshot;

  it('takes a snapshot of a detached volume', () => {
    expect(decideSnapshot(snap({}), volume({ status: { host: available() } }), ME)).toEqual({ kind: 'create' });
    expect(decideSnapshot(snap({ node: 'other' }), volume({ status: { host: available() } }), ME).kind).toBe('none');
  });

  it('waits for a volume without a location', () => {
    expect(decideSnapshot(snap({}), undefined, ME).kind).toBe('wait');
    expect(decideSnapshot(snap({}), volume({ status: { host: { node: ME, state: 'creating' } } }), ME).kind).toBe(
      'wait',
    );
  });

  it('refuses an attached local volume with the contract fault; rbd attached is snapshotted', () => {
    const attached = volume({ status: { host: available() }, attachments: [att('attached', ME)] });
    expect(decideSnapshot(snap({}), attached, ME)).toEqual({ kind: 'refuse', fault: ATTACHED_LOCAL_SNAPSHOT_FAULT });
    const rbd = { ...attached, status: { ...attached.status, backend: 'rbd' } } as Volume;
    expect(decideSnapshot(snap({}), rbd, ME).kind).toBe('create');
    // refused, then detached: taken
    expect(
      decideSnapshot(
        snap({ host: { node: ME, state: 'error', fault: ATTACHED_LOCAL_SNAPSHOT_FAULT } }),
        volume({ status: { host: available() } }),
        ME,
      ).kind,
    ).toBe('create');
  });

  it('does nothing once available; deletes on deletion until deleted', () => {
    const ok = { host: { node: ME, state: 'available' as const, location: 'local://a/snapshots/x' } };
    expect(decideSnapshot(snap(ok), volume({ status: { host: available() } }), ME).kind).toBe('none');
    expect(decideSnapshot(snap(ok, true), undefined, ME).kind).toBe('delete');
    expect(decideSnapshot(snap({ host: { node: ME, state: 'deleted' } }, true), undefined, ME).kind).toBe('none');
  });
});

describe('helpers', () => {
  it('uidOfLocation reads the uid a location ends with', () => {
    expect(uidOfLocation(`local://n/${UID}`)).toBe(UID);
    expect(uidOfLocation(`local://n/snapshots/${UID}`)).toBe(UID);
    expect(uidOfLocation(`rbd://fsid/volumes/volume-${UID}`)).toBe(UID);
    expect(uidOfLocation(`rbd://fsid/volumes/volume-x@snapshot-${UID}`)).toBe(UID);
    expect(uidOfLocation('local://n/not-a-uid')).toBeUndefined();
  });

  it('byteQuantity picks the largest exact binary unit', () => {
    expect(byteQuantity(1024 ** 3)).toBe('1Gi');
    expect(byteQuantity(1536 * 1024 ** 2)).toBe('1536Mi');
    expect(byteQuantity(1000)).toBe('1000');
    expect(byteQuantity(0)).toBe('0');
  });

  it('changedBesidesHost ignores the host report and resourceVersion, not the rest', () => {
    const a = { metadata: { name: 'v', resourceVersion: '1' }, spec: { size: '1Gi' }, status: { node: ME } };
    const b = { ...a, metadata: { ...a.metadata, resourceVersion: '2' }, status: { node: ME, host: { x: 1 } } };
    expect(changedBesidesHost(a, b)).toBe(false);
    expect(changedBesidesHost(a, { ...a, spec: { size: '2Gi' } })).toBe(true);
    expect(changedBesidesHost(a, { ...a, status: { node: ME, attachments: [] } })).toBe(true);
    expect(changedBesidesHost(a, a)).toBe(true);
  });
});
