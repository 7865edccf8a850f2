// The VolumeSnapshot controller (cinder-api for snapshots): refuses a snapshot of an in-use volume without force (in
// Cinder's words), places it on its volume's host (status.node), derives its status from the volume host's report
// (status.host) and releases it through its finalizer once the host deleted it.
import {
  sameJSON,
  VOLUME_SNAPSHOT_FINALIZER,
  type Volume,
  VolumeKind,
  type VolumeSnapshot,
  VolumeSnapshotKind,
} from '../api/index.ts';
import {
  addFinalizer,
  hasFinalizer,
  isNotFound,
  type Manager,
  objectKey,
  type ReconcileContext,
  type Request,
  removeFinalizer,
} from '../runtime/index.ts';
import { applyStatusIfChanged, gvrOf, requeueOnConflict, specOrMetaChanged, withConditions } from './common.ts';

const SNAPSHOTS = gvrOf(VolumeSnapshotKind);
/** The status fields of a VolumeSnapshot the operator owns (the volume host owns `host`). */
export const SNAPSHOT_OPERATOR_FIELDS = ['status', 'size', 'node', 'observedGeneration', 'conditions'];

type SnapStatus = NonNullable<NonNullable<VolumeSnapshot['status']>['status']>;

/**
 * The snapshot's status (pure): refusals first (volume missing, in-use without force, volume not usable), then
 * from the host report of status.node.
 */
export function deriveSnapshotState(
  snap: Pick<VolumeSnapshot, 'spec' | 'status' | 'metadata'>,
  vol: Pick<Volume, 'status' | 'metadata'> | undefined,
): { status: SnapStatus; reason: string; message: string; node?: string | undefined } {
  const st = snap.status ?? {};
  const deleting = !!snap.metadata?.deletionTimestamp;
  const host = st.node && st.host?.node === st.node ? st.host : undefined;
  if (st.node) {
    if (host?.state === 'error') {
      return {
        status: deleting ? 'error_deleting' : 'error',
        reason: 'BackendError',
        message: host.fault ?? 'error',
        node: st.node,
      };
    }
    if (deleting) return { status: 'deleting', reason: 'Deleting', message: 'deleting', node: st.node };
    if (host?.state === 'available')
      return { status: 'available', reason: 'Available', message: `available on ${st.node}`, node: st.node };
    return { status: 'creating', reason: 'Creating', message: `creating on ${st.node}`, node: st.node };
  }
  if (deleting) return { status: 'deleting', reason: 'Deleting', message: 'deleting' };
  const name = snap.spec.volume;
  if (!vol) return { status: 'error', reason: 'VolumeNotFound', message: `Volume ${name} could not be found.` };
  const vs = vol.status?.status;
  if (vs === 'in-use' && !snap.spec.force) {
    return {
      status: 'error',
      reason: 'VolumeInUse',
      message: `Invalid volume: Volume ${name} status must be available, but current status is: in-use (use force to snapshot an in-use volume)`,
    };
  }
  if (vs !== 'available' && vs !== 'in-use') {
    // Not ready yet (creating) or not usable (error...): Cinder refuses anything but available/in-use.
    if (
      vs === 'creating' ||
      vs === 'downloading' ||
      vs === 'reserved' ||
      vs === 'attaching' ||
      vs === 'detaching' ||
      vs === undefined
    ) {
      return { status: 'creating', reason: 'Waiting', message: `volume ${name} is ${vs ?? 'not placed'}` };
    }
    return {
      status: 'error',
      reason: 'VolumeNotAvailable',
      message: `Invalid volume: Volume ${name} status must be available, but current status is: ${vs}`,
    };
  }
  return { status: 'creating', reason: 'Creating', message: `creating on ${vol.status?.node}`, node: vol.status?.node };
}

export function registerVolumeSnapshotController(mgr: Manager) {
  const snapshots = mgr.informer<VolumeSnapshot>(SNAPSHOTS);
  const volumes = mgr.informer<Volume>(gvrOf(VolumeKind));
  const client = mgr.client;

  async function reconcile(req: Request, ctx: ReconcileContext) {
    let snap = snapshots.get(req.name, req.namespace);
    if (!snap) return undefined;
    const deleting = !!snap.metadata.deletionTimestamp;
    if (deleting && !hasFinalizer(snap, VOLUME_SNAPSHOT_FINALIZER)) return undefined;
    if (!deleting && !hasFinalizer(snap, VOLUME_SNAPSHOT_FINALIZER)) {
      snap = await addFinalizer<VolumeSnapshot>(client, SNAPSHOTS, req.name, req.namespace, VOLUME_SNAPSHOT_FINALIZER, {
        current: snap,
      });
    }
    const st = snap.status ?? {};
    const gen = snap.metadata.generation;
    const vol = volumes.get(snap.spec.volume, req.namespace);
    // A refused snapshot stays refused (Cinder's snapshot went to error at the API); the user deletes it.
    const refused = st.status === 'error' && !st.node;
    const d = refused
      ? {
          status: 'error' as const,
          reason: st.conditions?.find((c) => c.type === 'Ready')?.reason ?? 'Error',
          message: st.conditions?.find((c) => c.type === 'Ready')?.message ?? 'error',
          node: undefined,
        }
      : deriveSnapshotState(snap, vol);
    const ready = d.status === 'available';
    await applyStatusIfChanged(
      client,
      VolumeSnapshotKind,
      snap,
      {
        status: d.status,
        node: d.node ?? st.node,
        size: st.size ?? (d.node ? (vol?.status?.size ?? vol?.spec.size) : undefined),
        observedGeneration: gen,
        conditions: withConditions(
          st.conditions,
          [{ type: 'Ready', status: ready ? 'True' : 'False', reason: d.reason, message: d.message }],
          gen,
        ),
      },
      SNAPSHOT_OPERATOR_FIELDS,
    );
    if (deleting) {
      const host = st.node && st.host?.node === st.node ? st.host : undefined;
      if (!st.node || !host || host.state === 'deleted') {
        try {
          await removeFinalizer(client, SNAPSHOTS, req.name, req.namespace, VOLUME_SNAPSHOT_FINALIZER, {
            current: snap,
          });
        } catch (e) {
          if (!isNotFound(e)) throw e;
        }
        ctx.log.info('snapshot released');
      }
    }
    return undefined;
  }

  const controller = mgr.addController({
    name: 'volumesnapshot',
    reconcile: requeueOnConflict(reconcile),
    maxConcurrentReconciles: 2,
  });
  controller.for(snapshots, {
    updatePredicate: (a, b) => specOrMetaChanged(a, b) || !sameJSON(a.status?.host, b.status?.host),
  });
  snapshots.addIndex('byVolume', (s: VolumeSnapshot) => [`${s.metadata.namespace}/${s.spec?.volume}`]);
  // The source volume's status (placed, available, in-use) decides a snapshot that is not placed yet.
  controller.watches(volumes, (v) =>
    snapshots
      .byIndex('byVolume', objectKey(v))
      .filter((s) => !s.status?.node)
      .map(objectKey),
  );
  return { controller };
}
