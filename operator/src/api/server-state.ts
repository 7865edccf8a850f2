// One writer per Server state field (docs/design/status-ownership.md): the operator alone writes the user-facing
// vmState, taskState, status, powerState, fault and actions; the node agent of a hypervisor reports what the compute
// host knows in status.compute. These pure functions are the rules both sides share: how the operator derives its
// fields from the report, and the state the agent works from (its report, or the operator's request it has not taken
// up yet). Plain objects in, plain objects out: the operator and the agent apply them to raw status objects.
import { MAX_SERVER_ACTIONS, type ServerStatus } from './compute.ts';
import { deriveServerStatus, type TaskState, type VmState } from './nova-states.ts';

type Action = NonNullable<ServerStatus['actions']>[number];
type Report = NonNullable<ServerStatus['compute']>;
type Status = Record<string, unknown>;

/** The user-facing state fields: written by the operator only. */
export const SERVER_STATE_FIELDS = ['vmState', 'taskState', 'status', 'powerState', 'fault', 'actions'] as const;

/**
 * The operator's requests to the agent of status.node: the action it records InProgress and the task it sets with it
 * (binding: create/spawning; a move placed: resize or migrate/resize_migrated; confirm; revert). The agent carries the
 * request out and finishes that action entry in its report.
 */
export const OPERATOR_REQUESTS: Readonly<Record<string, TaskState>> = {
  create: 'spawning',
  resize: 'resize_migrated',
  migrate: 'resize_migrated',
  confirmResize: 'resize_confirming',
  revertResize: 'resize_reverting',
};

/** Stable JSON for change detection (key order independent). */
function canonical(v: unknown): string {
  return JSON.stringify(v ?? null, (_k, val: unknown) =>
    val && typeof val === 'object' && !Array.isArray(val)
      ? Object.fromEntries(Object.entries(val as Record<string, unknown>).sort(([x], [y]) => x.localeCompare(y)))
      : val,
  );
}

export function sameJSON(a: unknown, b: unknown): boolean {
  return canonical(a) === canonical(b);
}

const keyOf = (a: Action) => `${a.action}@${Date.parse(a.startTime)}`;
const finished = (a: Action) => a.result !== 'InProgress';
const second = (a: Action) => Math.floor(Date.parse(a.startTime) / 1000);

/** The entries of a history with a key each: action, start time and, for equal ones, their rank. */
function keyed(list: readonly Action[]): [string, Action][] {
  const seen = new Map<string, number>();
  return list.map((x) => {
    const base = keyOf(x);
    const n = seen.get(base) ?? 0;
    seen.set(base, n + 1);
    return [`${base}#${n}`, x];
  });
}

/**
 * The union of two action histories (the operator's `a` and a report's `b`), each ordered newest last: one entry per
 * action and start time; of two versions of an entry the finished one wins, else the report's. The order of both
 * lists is kept (entries they share anchor them; entries only one holds go where that list has them, two such runs
 * interleaved by start time), bounded to the newest.
 */
export function mergeActions(a: readonly Action[] | undefined, b: readonly Action[] | undefined): Action[] | undefined {
  const xa = keyed(a ?? []);
  const xb = keyed(b ?? []);
  const inA = new Map(xa);
  const inB = new Map(xb);
  const pick = (k: string): Action => {
    const x = inA.get(k);
    const y = inB.get(k);
    if (!x) return y!;
    if (!y) return x;
    return finished(y) || !finished(x) ? y : x;
  };
  const out: Action[] = [];
  const done = new Set<string>();
  let i = 0;
  let j = 0;
  while (i < xa.length || j < xb.length) {
    const kx = xa[i]?.[0];
    const ky = xb[j]?.[0];
    if (kx !== undefined && done.has(kx)) {
      i++;
      continue;
    }
    if (ky !== undefined && done.has(ky)) {
      j++;
      continue;
    }
    let k: string;
    if (ky === undefined || kx === ky) {
      k = kx!;
      i++;
      if (kx === ky) j++;
    } else if (kx === undefined) {
      k = ky;
      j++;
    } else if (!inB.has(kx) && !inA.has(ky)) {
      // both lists have entries of their own here: the earlier first (the operator's on a tie)
      if (second(xb[j]![1]) < second(xa[i]![1])) {
        k = ky;
        j++;
      } else {
        k = kx;
        i++;
      }
    } else if (!inB.has(kx)) {
      k = kx;
      i++;
    } else {
      k = ky;
      j++;
    }
    done.add(k);
    out.push(pick(k));
  }
  return out.length > 0 ? out.slice(-MAX_SERVER_ACTIONS) : undefined;
}

/** The agent's report when it is about `node` (by default the server's current node), else undefined. */
export function reportFor(st: ServerStatus | Status, node = (st as ServerStatus).node): Report | undefined {
  const r = (st as ServerStatus).compute;
  return node && r?.node === node ? r : undefined;
}

/**
 * The operator's request the agent of status.node has not taken up yet: taskState is a request's task, the newest
 * entry of that request's action is InProgress, and the report of that node does not hold the entry. While it is
 * pending, the operator's vmState/taskState/fault stand, and the agent works from them.
 */
export function pendingRequest(st: ServerStatus | Status): Action | undefined {
  const s = st as ServerStatus;
  const task = s.taskState;
  if (!task || !s.node) return undefined;
  const entry = [...(s.actions ?? [])].reverse().find((a) => OPERATOR_REQUESTS[a.action] === task);
  if (entry?.result !== 'InProgress') return undefined;
  const r = reportFor(s);
  return r?.actions?.some((a) => keyOf(a) === keyOf(entry)) ? undefined : entry;
}

/**
 * The state fields as the agent of `node` works from them: its report (when it is about `node`), except vmState,
 * taskState and fault while an operator request is pending (those of the operator's fields); the operator's fields
 * when there is no report for `node`. Actions are the union of both histories.
 */
export function stateView(
  st: ServerStatus | Status,
  node: string,
): Partial<Record<(typeof SERVER_STATE_FIELDS)[number], unknown>> {
  const s = st as ServerStatus;
  const view: Record<string, unknown> = {
    vmState: s.vmState,
    taskState: s.taskState,
    powerState: s.powerState,
    fault: s.fault,
    actions: s.actions,
  };
  const r = reportFor(s, node);
  if (r && s.node === node) {
    view.actions = mergeActions(s.actions, r.actions);
    if (r.powerState !== undefined) view.powerState = r.powerState;
    if (!pendingRequest(s) && r.vmState !== undefined) {
      view.vmState = r.vmState;
      view.taskState = r.taskState;
      view.fault = r.fault;
    }
  }
  view.status = view.vmState
    ? deriveServerStatus(view.vmState as VmState, view.taskState as TaskState | undefined)
    : s.status;
  return view;
}

/**
 * The operator's derivation, applied to a status object in place: for a bound server, the state fields follow the
 * report of status.node (stateView), and powerState is NOSTATE while the HypervisorUp condition is False (node
 * down). An unbound server keeps the operator's own values (scheduling, no valid host, build abort). Only fields
 * whose value changes are assigned. Returns whether anything changed.
 */
export function deriveServerState(st: Status): boolean {
  const s = st as ServerStatus;
  if (!s.node) return false;
  const view = stateView(s, s.node);
  const down = s.conditions?.some((c) => c.type === 'HypervisorUp' && c.status === 'False');
  if (down) view.powerState = 'NOSTATE';
  let changed = false;
  for (const k of SERVER_STATE_FIELDS) {
    const v = view[k];
    if (sameJSON(st[k], v)) continue;
    changed = true;
    if (v === undefined) delete st[k];
    else st[k] = v;
  }
  return changed;
}

/**
 * The agent's write: `st` is the status as stored, `view` the same status after the agent's step changed its state
 * view and its own fields. Returns `st` with the agent's own fields taken from `view`, the user-facing state fields
 * left as stored (the operator's), and the view's state written into the report status.compute for `node` (as a merge
 * patch of that one top-level key: a field that goes is sent as null). The report is only replaced when it changes.
 * The report's volumes (written by the volume attacher) are carried over from view.compute while it is about `node`.
 */
export function withReport(st: Status, view: Status, node: string): Status {
  const fixed = new Set<string>([...SERVER_STATE_FIELDS, 'compute']);
  for (const k of new Set([...Object.keys(st), ...Object.keys(view)])) {
    if (fixed.has(k)) continue;
    if (view[k] === undefined) delete st[k];
    else st[k] = view[k];
  }
  const next: Status = { node };
  for (const k of ['vmState', 'taskState', 'powerState', 'fault', 'actions'] as const) {
    if (view[k] !== undefined) next[k] = view[k];
  }
  // status.compute.volumes (the volume attacher's part of the report) is kept while the report is about `node`; the
  // view drops it by setting view.compute.volumes to null.
  const carried = view.compute as Status | undefined;
  if (carried?.node === node && carried.volumes !== undefined) next.volumes = carried.volumes;
  const prev = (st.compute as Status | undefined) ?? {};
  if (sameJSON(prev, next)) return st;
  for (const k of Object.keys(prev)) if (next[k] === undefined) next[k] = null;
  st.compute = next;
  return st;
}
