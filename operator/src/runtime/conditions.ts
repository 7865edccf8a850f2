// metav1.Condition helpers: the Kubernetes API conventions for status.conditions.

export type ConditionStatus = 'True' | 'False' | 'Unknown';

export interface Condition {
  type: string;
  status: ConditionStatus;
  reason: string;
  message: string;
  /** RFC 3339, second precision; changes only when status changes. */
  lastTransitionTime: string;
  observedGeneration?: number;
}

export interface ConditionInput {
  type: string;
  status: ConditionStatus;
  reason: string;
  message?: string;
}

// Limits and patterns from k8s.io/apimachinery/pkg/apis/meta/v1 types.go (Condition) validation markers.
export const CONDITION_REASON_PATTERN = /^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$/;
export const CONDITION_TYPE_PATTERN =
  /^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$/;
export const CONDITION_TYPE_MAX = 316;
export const CONDITION_REASON_MAX = 1024;
export const CONDITION_MESSAGE_MAX = 32768;

export class InvalidConditionError extends Error {
  override name = 'InvalidConditionError';
}

/** Throws InvalidConditionError when the API server would reject the condition. */
export function validateCondition(c: ConditionInput): void {
  if (c.type.length === 0 || c.type.length > CONDITION_TYPE_MAX || !CONDITION_TYPE_PATTERN.test(c.type)) {
    throw new InvalidConditionError(`invalid condition type ${JSON.stringify(c.type)}`);
  }
  if (c.status !== 'True' && c.status !== 'False' && c.status !== 'Unknown') {
    throw new InvalidConditionError(`invalid condition status ${JSON.stringify(c.status)} for ${c.type}`);
  }
  if (c.reason.length > CONDITION_REASON_MAX || !CONDITION_REASON_PATTERN.test(c.reason)) {
    throw new InvalidConditionError(
      `invalid condition reason ${JSON.stringify(c.reason)} for ${c.type}: must match ${CONDITION_REASON_PATTERN.source}`,
    );
  }
  if ((c.message ?? '').length > CONDITION_MESSAGE_MAX) {
    throw new InvalidConditionError(`condition message for ${c.type} longer than ${CONDITION_MESSAGE_MAX}`);
  }
}

/** metav1.Time text: RFC 3339 in UTC without fractional seconds. */
export function formatTime(d: Date): string {
  return d.toISOString().replace(/\.\d+Z$/, 'Z');
}

/**
 * Returns a new list with the condition set (the input is not modified). lastTransitionTime is kept unless the
 * status changes (or the condition is new); reason, message and observedGeneration always take the new values.
 */
export function setCondition(
  list: readonly Condition[] | undefined,
  input: ConditionInput,
  observedGeneration?: number,
  now: Date = new Date(),
): Condition[] {
  validateCondition(input);
  const existing = list?.find((c) => c.type === input.type);
  const next: Condition = {
    type: input.type,
    status: input.status,
    reason: input.reason,
    message: input.message ?? '',
    lastTransitionTime:
      existing && existing.status === input.status && existing.lastTransitionTime
        ? existing.lastTransitionTime
        : formatTime(now),
  };
  if (observedGeneration !== undefined) next.observedGeneration = observedGeneration;
  if (!existing) return [...(list ?? []), next];
  return (list ?? []).map((c) => (c.type === input.type ? next : c));
}

export function findCondition(list: readonly Condition[] | undefined, type: string): Condition | undefined {
  return list?.find((c) => c.type === type);
}

export function isTrue(list: readonly Condition[] | undefined, type: string): boolean {
  return findCondition(list, type)?.status === 'True';
}

export function isFalse(list: readonly Condition[] | undefined, type: string): boolean {
  return findCondition(list, type)?.status === 'False';
}

export function removeCondition(list: readonly Condition[] | undefined, type: string): Condition[] {
  return (list ?? []).filter((c) => c.type !== type);
}

/** True when both lists hold the same conditions (order-insensitive), so a status write can be skipped. */
export function conditionsEqual(a: readonly Condition[] | undefined, b: readonly Condition[] | undefined): boolean {
  const x = a ?? [];
  const y = b ?? [];
  if (x.length !== y.length) return false;
  return x.every((c) => {
    const d = y.find((o) => o.type === c.type);
    return (
      d !== undefined &&
      d.status === c.status &&
      d.reason === c.reason &&
      d.message === c.message &&
      d.lastTransitionTime === c.lastTransitionTime &&
      d.observedGeneration === c.observedGeneration
    );
  });
}
