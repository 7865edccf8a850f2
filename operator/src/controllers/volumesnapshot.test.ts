import { describe, expect, it } from 'vitest';
import type { Volume, VolumeSnapshot, VolumeType } from '../api/index.ts';
import { defaultVolumeType } from './volume.ts';
import { deriveSnapshotState } from './volumesnapshot.ts';

const snap = (o: { force?: boolean; status?: VolumeSnapshot['status']; deleting?: boolean } = {}) =>
  ({
    metadata: { name: 's', ...(o.deleting ? { deletionTimestamp: new Date() } : {}) },
    spec: { volume: 'v', force: o.force ?? false },
    status: o.status,
  }) as unknown as VolumeSnapshot;
const vol = (status: string) => ({ metadata: { name: 'v' }, status: { status, node: 'n1', size: '1Gi' } }) as Volume;

describe('deriveSnapshotState', () => {
  it('refuses a missing volume and an in-use one without force, in Cinder’s words', () => {
    expect(deriveSnapshotState(snap(), undefined)).toMatchObject({ status: 'error', reason: 'VolumeNotFound' });
    expect(deriveSnapshotState(snap(), vol('in-use'))).toMatchObject({
      status: 'error',
      reason: 'VolumeInUse',
      message: expect.stringMatching(
        /^Invalid volume: Volume v status must be available, but current status is: in-use/,
      ),
    });
    expect(deriveSnapshotState(snap(), vol('error'))).toMatchObject({ status: 'error', reason: 'VolumeNotAvailable' });
  });
  it('places on the volume’s node (available, or in-use with force); waits while the volume is being made', () => {
    expect(deriveSnapshotState(snap(), vol('available'))).toMatchObject({ status: 'creating', node: 'n1' });
    expect(deriveSnapshotState(snap({ force: true }), vol('in-use'))).toMatchObject({ status: 'creating', node: 'n1' });
    expect(deriveSnapshotState(snap(), vol('creating'))).toMatchObject({ status: 'creating', reason: 'Waiting' });
    expect(deriveSnapshotState(snap(), vol('creating')).node).toBeUndefined();
  });
  it('follows the host report of its node once placed', () => {
    const placed = (host?: object, deleting = false) =>
      deriveSnapshotState(
        snap({ status: { node: 'n1', ...(host ? { host } : {}) } as never, deleting }),
        vol('in-use'),
      );
    expect(placed().status).toBe('creating');
    expect(placed({ node: 'n1', state: 'available' }).status).toBe('available');
    expect(placed({ node: 'n2', state: 'available' }).status).toBe('creating');
    expect(
      placed({ node: 'n1', state: 'error', fault: 'snapshot of an attached local volume is not supported yet' }),
    ).toMatchObject({
      status: 'error',
      message: expect.stringContaining('not supported yet'),
    });
    expect(placed({ node: 'n1', state: 'available' }, true).status).toBe('deleting');
    expect(placed({ node: 'n1', state: 'error' }, true).status).toBe('error_deleting');
  });
});

describe('defaultVolumeType', () => {
  const t = (name: string, isDefault: boolean, created: string) =>
    ({
      metadata: { name, creationTimestamp: created },
      spec: { backend: 'local', isDefault },
    }) as unknown as VolumeType;
  it('the oldest default wins; none without a default', () => {
    expect(
      defaultVolumeType([t('b', true, '2026-01-02'), t('a', true, '2026-01-03'), t('c', false, '2026-01-01')])?.metadata
        ?.name,
    ).toBe('b');
    expect(defaultVolumeType([t('c', false, '2026-01-01')])).toBeUndefined();
  });
});
