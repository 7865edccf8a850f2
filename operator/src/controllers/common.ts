// What every Stratus controller shares: addressing kinds through the runtime, status writes,
// the update predicate and condition bookkeeping.
import type { KubernetesObject } from '@kubernetes/client-node';
import type { KindDefinition } from '../api/kind.ts';
import type { Condition } from '../api/meta.ts';
import {
  type ConditionInput,
  type GVR,
  isConflict,
  type KubeClient,
  patchStatus,
  type ReconcileContext,
  type ReconcileResult,
  type Request,
  setCondition,
} from '../runtime/index.ts';

/**
 * The field manager of every operator write (stable across versions so SSA ownership carries over). Node agents use
 * `stratus-agent/<node>` (agentFieldManager in the node agent): managedFields shows who owns each status field.
 */
export const FIELD_MANAGER = 'stratus-operator';

export function gvrOf(k: KindDefinition): GVR {
  return { group: k.group, version: k.version, plural: k.plural };
}

/**
 * Passes updates a reconcile must see: spec (generation), deletion, finalizers, labels and annotations.
 * Status-only writes (our own) are ignored, so writing status does not requeue the object.
 */
export function specOrMetaChanged<T extends KubernetesObject>(oldObj: T, newObj: T): boolean {
  if (oldObj === newObj) return true; // resync
  const a = oldObj.metadata ?? {};
  const b = newObj.metadata ?? {};
  return (
    a.generation !== b.generation ||
    String(a.deletionTimestamp ?? '') !== String(b.deletionTimestamp ?? '') ||
    JSON.stringify(a.finalizers ?? []) !== JSON.stringify(b.finalizers ?? []) ||
    JSON.stringify(a.labels ?? {}) !== JSON.stringify(b.labels ?? {}) ||
    JSON.stringify(a.annotations ?? {}) !== JSON.stringify(b.annotations ?? {})
  );
}

/** Sets conditions on a copy of `current`, keeping lastTransitionTime where the status did not change. */
export function withConditions(
  current: readonly Condition[] | undefined,
  updates: readonly ConditionInput[],
  generation: number | undefined,
  now = new Date(),
): Condition[] {
  let list = [...(current ?? [])] as Condition[];
  for (const u of updates) list = setCondition(list, u, generation, now) as Condition[];
  return list;
}

/** Stable JSON for change detection (key order independent). */
export function canonical(v: unknown): string {
  return JSON.stringify(v, (_k, val: unknown) =>
    val && typeof val === 'object' && !Array.isArray(val)
      ? Object.fromEntries(Object.entries(val as Record<string, unknown>).sort(([x], [y]) => x.localeCompare(y)))
      : val,
  );
}

/** The top-level status fields of a kind (all of them: for kinds whose whole status one writer owns). */
export function statusFields(kind: KindDefinition): string[] {
  const shape = (kind.status as unknown as { shape?: Record<string, unknown> }).shape;
  if (!shape) throw new Error(`${kind.kind}: status schema is not an object`);
  return Object.keys(shape);
}

/**
 * Writes the operator's status fields of an object by server-side apply (field manager `stratus-operator`) when they
 * differ from what the object shows. `owned` lists every status field the operator owns on this kind
 * (docs/design/status-ownership.md). An apply releases the fields its manager owned and omits, so the apply carries
 * all of them: each owned field keeps its current value unless `status` sets it; a key of `status` set to undefined
 * is a field the writer means to clear.
 *
 * The apply is guarded by the resourceVersion of `obj` (pass the freshest object this reconcile holds, e.g. the one
 * a finalizer write returned) and does not force: a status computed from a stale read, or a field another manager
 * owns, fails with 409 (see requeueOnConflict) instead of overwriting. Returns true when a write happened.
 */
export async function applyStatusIfChanged(
  client: KubeClient,
  kind: KindDefinition,
  obj: KubernetesObject & { status?: unknown },
  status: Record<string, unknown>,
  owned: readonly string[] = statusFields(kind),
): Promise<boolean> {
  const current = (obj.status ?? {}) as Record<string, unknown>;
  const full: Record<string, unknown> = {};
  for (const k of owned) if (current[k] !== undefined) full[k] = current[k];
  for (const [k, v] of Object.entries(status)) {
    if (!owned.includes(k)) throw new Error(`${kind.kind} status.${k} is not a field the operator owns`);
    if (v === undefined) delete full[k];
    else full[k] = v;
  }
  const relevant = Object.fromEntries(owned.filter((k) => current[k] !== undefined).map((k) => [k, current[k]]));
  if (canonical(relevant) === canonical(full)) return false;
  await patchStatus(
    client,
    gvrOf(kind),
    { apiVersion: kind.apiVersion, kind: kind.kind, metadata: obj.metadata },
    full,
    { fieldManager: FIELD_MANAGER, force: false, resourceVersion: obj.metadata?.resourceVersion },
  );
  return true;
}

/**
 * A reconcile whose status write met a conflict (the object changed since it was read, or another manager owns a
 * field) is requeued with backoff and recomputed from fresh data; logged at info, with the API server's message (an
 * ownership conflict names the field and its manager).
 */
export function requeueOnConflict(
  reconcile: (req: Request, ctx: ReconcileContext) => Promise<ReconcileResult>,
): (req: Request, ctx: ReconcileContext) => Promise<ReconcileResult> {
  return async (req, ctx) => {
    try {
      return await reconcile(req, ctx);
    } catch (e) {
      if (!isConflict(e)) throw e;
      ctx.log.info({ err: e }, 'write conflict: requeued to recompute from fresh data');
      return { requeue: true };
    }
  };
}
