// The VolumeType controller: Ready, or MultipleDefaults on a default type that is not the oldest default (the
// oldest wins, defaultVolumeType), or MissingRbdSecret-free checks left to the agents' probes. Also the NBD
// credentials every node agent uses for cross-node attachments of local volumes (ensureNbdSecret).
import { randomBytes } from 'node:crypto';
import { NBD_PSK_IDENTITY, NBD_SECRET_NAME, type VolumeType, VolumeTypeKind } from '../api/index.ts';
import {
  type GVR,
  isAlreadyExists,
  isNotFound,
  type KubeClient,
  type Manager,
  type Request,
} from '../runtime/index.ts';
import { applyStatusIfChanged, gvrOf, requeueOnConflict, specOrMetaChanged, withConditions } from './common.ts';

const SECRETS: GVR = { group: '', version: 'v1', plural: 'secrets' };

/**
 * Creates the Secret stratus-volume-nbd (identity, key: 64 random hex chars) in `namespace` unless it exists; it is
 * never rotated by the operator (delete it to rotate: existing exports keep their key until they are re-made).
 */
export async function ensureNbdSecret(client: KubeClient, namespace: string): Promise<void> {
  try {
    await client.get(SECRETS, NBD_SECRET_NAME, namespace);
    return;
  } catch (e) {
    if (!isNotFound(e)) throw e;
  }
  try {
    await client.create(SECRETS, {
      apiVersion: 'v1',
      kind: 'Secret',
      metadata: { name: NBD_SECRET_NAME, namespace, labels: { 'app.kubernetes.io/managed-by': 'stratus-operator' } },
      type: 'Opaque',
      stringData: { identity: NBD_PSK_IDENTITY, key: randomBytes(32).toString('hex') },
    } as never);
  } catch (e) {
    if (!isAlreadyExists(e)) throw e;
  }
}

export function registerVolumeTypeController(mgr: Manager) {
  const types = mgr.informer<VolumeType>(gvrOf(VolumeTypeKind));

  async function reconcile(req: Request) {
    const t = types.get(req.name);
    if (!t || t.metadata.deletionTimestamp) return undefined;
    const gen = t.metadata.generation;
    const older = types
      .list()
      .filter(
        (o) =>
          o.spec?.isDefault &&
          o.metadata.name !== t.metadata.name &&
          !o.metadata.deletionTimestamp &&
          (String(o.metadata.creationTimestamp ?? '').localeCompare(String(t.metadata.creationTimestamp ?? '')) ||
            (o.metadata.name ?? '').localeCompare(t.metadata.name ?? '')) < 0,
      );
    const ready =
      t.spec.isDefault && older.length > 0
        ? {
            type: 'Ready',
            status: 'False' as const,
            reason: 'MultipleDefaults',
            message: `volume type ${older[0]!.metadata.name} is the default already (the oldest default wins); this one is not used as the default`,
          }
        : { type: 'Ready', status: 'True' as const, reason: 'Valid', message: `backend ${t.spec.backend}` };
    await applyStatusIfChanged(mgr.client, VolumeTypeKind, t, {
      observedGeneration: gen,
      conditions: withConditions(t.status?.conditions, [ready], gen),
    });
    return undefined;
  }

  const controller = mgr.addController({
    name: 'volumetype',
    reconcile: requeueOnConflict(reconcile),
    maxConcurrentReconciles: 1,
  });
  controller.for(types, { updatePredicate: specOrMetaChanged });
  // Another type becoming (or ceasing to be) a default revisits every default.
  controller.watches(types, () =>
    types
      .list()
      .filter((o) => o.spec?.isDefault)
      .map((o) => o.metadata?.name ?? ''),
  );
  return { controller };
}
