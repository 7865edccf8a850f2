// What every Stratus controller shares: addressing kinds through the runtime, status writes,
// the update predicate and condition bookkeeping.
import type { KubernetesObject } from '@kubernetes/client-node';
import type { KindDefinition } from '../api/kind.ts';
import type { Condition } from '../api/meta.ts';
import { type ConditionInput, type GVR, type KubeClient, patchStatus, setCondition } from '../runtime/index.ts';

/** The single field manager of the operator (stable across versions so SSA ownership carries over). */
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

/**
 * Writes status by server-side apply when it differs from what the object already shows.
 * Returns true when a write happened.
 */
export async function applyStatusIfChanged(
  client: KubeClient,
  kind: KindDefinition,
  obj: KubernetesObject & { status?: unknown },
  status: Record<string, unknown>,
): Promise<boolean> {
  const current = (obj.status ?? {}) as Record<string, unknown>;
  const relevant = Object.fromEntries(Object.keys(status).map((k) => [k, current[k]]));
  if (canonical(relevant) === canonical(status)) return false;
  await patchStatus(
    client,
    gvrOf(kind),
    { apiVersion: kind.apiVersion, kind: kind.kind, metadata: obj.metadata },
    status,
    {
      fieldManager: FIELD_MANAGER,
    },
  );
  return true;
}
