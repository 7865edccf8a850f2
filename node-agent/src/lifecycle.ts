// The server lifecycle as the node agent sees it, without I/O: from a Server and the guest's observed state, decide
// the next single step; plus the status bookkeeping helpers (actions, conditions, tokens). compute.ts executes the
// steps; this file is tested exhaustively in lifecycle.test.ts. The Server decide() sees is the agent's view
// (compute.ts): its state fields (vmState, taskState, powerState, fault, actions) are the agent's own report
// status.compute, or the operator's fields while an operator request (bind, resize/migrate, confirm, revert) has not
// been taken up (operator/src/api/server-state.ts stateView); the helpers below edit that view, which compute.ts
// writes back into status.compute only.
//
// Order of concerns in decide():
//  1. deletion (destroy the guest, then release the guest finalizer);
//  2. binding (status.node must name this node; otherwise the operator is still at work);
//  3. building (spawn once; adopt a guest that already exists, e.g. after an agent restart);
//  4. a task in status: the agent's own task is stale (every operation runs inside one reconcile, so a task seen
//     at the start of one was left by an interrupted agent) and is recovered; another task is the operator's
//     (rebuild, resize, migrate...) and the agent waits;
//  5. the hypervisor is authoritative: a guest that stopped on its own (exit), or changed state behind our back (sync);
//  6. one-shot triggers (hard reboot, soft reboot), refused per Nova's table;
//  7. the desired power state (spec.powerState), refused per Nova's table;
//  8. otherwise steady: keep powerState and the Ready condition current.
import {
  type DesiredPowerState,
  deriveServerStatus,
  GUEST_FINALIZER,
  type PowerState,
  powerAction,
  refuseAction,
  type Server,
  type ServerActionName,
  type ServerStatus,
  type TaskState,
  type VmState,
} from '../../operator/src/api/index.ts';
import { type Condition, setCondition } from '../../operator/src/runtime/index.ts';
import type { GuestState } from './driver.ts';

export type RebootTrigger = 'softReboot' | 'hardReboot';
export type Trigger = RebootTrigger | 'rebuild';
/** The reboot triggers, in the order they run; rebuild is decided on its own (it also follows spec.image). */
export const TRIGGERS: readonly RebootTrigger[] = ['hardReboot', 'softReboot'];

/** The transitions the agent performs for spec.powerState and triggers. */
export type AgentAction = 'start' | 'stop' | 'pause' | 'unpause' | 'suspend' | 'resume' | 'softReboot' | 'hardReboot';

export interface TransitionInfo {
  /** taskState while it runs. */
  task: TaskState;
  /** vmState when it succeeded. */
  target: VmState;
  /** Reason of the Normal Event on success (the Warning on failure is `<Verb>Failed`). */
  done: string;
  /** Event action (UpperCamelCase verb). */
  verb: string;
}

export const TRANSITIONS: Readonly<Record<AgentAction, TransitionInfo>> = {
  start: { task: 'powering-on', target: 'active', done: 'Started', verb: 'Start' },
  stop: { task: 'powering-off', target: 'stopped', done: 'Stopped', verb: 'Stop' },
  pause: { task: 'pausing', target: 'paused', done: 'Paused', verb: 'Pause' },
  unpause: { task: 'unpausing', target: 'active', done: 'Unpaused', verb: 'Unpause' },
  suspend: { task: 'suspending', target: 'suspended', done: 'Suspended', verb: 'Suspend' },
  resume: { task: 'resuming', target: 'active', done: 'Resumed', verb: 'Resume' },
  softReboot: { task: 'rebooting', target: 'active', done: 'Rebooted', verb: 'Reboot' },
  hardReboot: { task: 'rebooting_hard', target: 'active', done: 'Rebooted', verb: 'Reboot' },
};

/** Task states the agent sets (and therefore may clear when it finds them stale). */
export const AGENT_TASKS: ReadonlySet<TaskState> = new Set<TaskState>([
  'networking',
  'block_device_mapping',
  'spawning',
  ...Object.values(TRANSITIONS).map((t) => t.task),
  'deleting',
]);

/** The vm_states the agent manages a guest in. */
const MANAGED: ReadonlySet<VmState> = new Set<VmState>(['active', 'stopped', 'paused', 'suspended', 'error']);

/** The vm_state a guest's power state corresponds to (undefined for NOSTATE). */
export function guestVmState(p: PowerState): VmState | undefined {
  switch (p) {
    case 'RUNNING':
      return 'active';
    case 'PAUSED':
      return 'paused';
    case 'SUSPENDED':
      return 'suspended';
    case 'SHUTDOWN':
    case 'CRASHED':
      return 'stopped';
    default:
      return undefined;
  }
}

/** The vm_state spec.powerState asks for. */
export function desiredVmState(d: DesiredPowerState): VmState {
  return ({ Running: 'active', Stopped: 'stopped', Paused: 'paused', Suspended: 'suspended' } as const)[d];
}

export interface ReadyInput {
  status: 'True' | 'False';
  reason: string;
  message: string;
}

export type Decision =
  /** Nothing to do and nothing to write (not ours yet, or the operator is at work before binding). */
  | { kind: 'wait'; reason: string; message: string }
  /** Keep status.powerState and Ready current; clear a stale ActionRefused. */
  | { kind: 'steady'; ready: ReadyInput; powerState: PowerState }
  /** The Server is being deleted and its guest exists. */
  | { kind: 'destroy' }
  /** The Server is being deleted, the guest is gone: remove the guest finalizer. */
  | { kind: 'releaseFinalizer' }
  /** Create the guest: the first spawn (building), or a hard reboot of a server whose guest is gone. */
  | { kind: 'spawn'; trigger?: 'hardReboot' }
  /** Building, but the guest already exists (interrupted agent): take it over as it is. */
  | { kind: 'adopt'; vmState: VmState }
  /** An agent task left in status by an interrupted agent: clear it, then decide again. */
  | { kind: 'recover'; task: TaskState }
  /** The guest stopped on its own while the server was active. */
  | { kind: 'exited'; powerState: 'SHUTDOWN' | 'CRASHED' }
  /** The guest is in another state than vmState says (changed outside the agent): follow the hypervisor. */
  | { kind: 'sync'; vmState: VmState; powerState: PowerState }
  /** The server should have a guest here but the hypervisor has none. */
  | { kind: 'missing' }
  | { kind: 'transition'; action: AgentAction; trigger?: RebootTrigger }
  /** A requested action is forbidden from the current state; a trigger's token is consumed. */
  | { kind: 'refuse'; action: ServerActionName; reason: string; trigger?: Trigger }
  /**
   * The operator moved or resized the server onto this node (taskState resize_migrated): resize the guest keeping its
   * disks, or (moved here) create it from the disks the source serves (importFrom); then VERIFY_RESIZE.
   */
  | { kind: 'finishResize'; action: 'resize' | 'migrate'; importFrom?: MoveExport }
  /** VERIFY_RESIZE confirmed (taskState resize_confirming): drop what a revert needed. */
  | { kind: 'confirmResize' }
  /** VERIFY_RESIZE (or a failed move) reverted back onto this node (taskState resize_reverting). */
  | { kind: 'revertResize' }
  /** Re-create the root disk from spec.image (a new triggers.rebuild token or a changed spec.image). */
  | { kind: 'rebuild' };

/** Where the source of a move serves the stopped guest's disks (Server.status.migrationSource.export). */
export type MoveExport = NonNullable<NonNullable<ServerStatus['migrationSource']>['export']>;

/**
 * Fencing rule of a move to another node: the target may start the guest only once the source agent recorded that
 * the guest is stopped there (status.migrationSource.guestStoppedAt, for this move's source), or the operator recorded
 * the source as fenced (status.migration.sourceFenced: down beyond the grace period and fenced by an admin). With
 * local disks the target also needs the disks the source serves; without them it waits (the disks stay on the source).
 */
export function moveGuard(
  st: ServerStatus,
): { ok: true; from: MoveExport } | { ok: false; reason: string; message: string } {
  const mig = st.migration;
  if (!mig) return { ok: false, reason: 'NotMoving', message: 'no move in status.migration' };
  const src = st.migrationSource?.node === mig.source ? st.migrationSource : undefined;
  const stopped = !!src?.guestStoppedAt;
  const fenced = !!mig.sourceFenced;
  if (!stopped && !fenced) {
    return {
      ok: false,
      reason: 'WaitingForSource',
      message: `waiting for ${mig.source} to confirm that the guest is stopped there (or for the source to be fenced)`,
    };
  }
  if (!src?.export) {
    return {
      ok: false,
      reason: 'WaitingForSourceDisks',
      message: stopped
        ? `waiting for ${mig.source} to serve the guest's disks`
        : `${mig.source} is fenced but never served the guest's disks: they stay there (revert, or delete the server)`,
    };
  }
  return { ok: true, from: src.export };
}

/** Nova's refusal of a rebuild of a volume-backed server (before the reimage of API 2.93). */
export const VOLUME_BACKED_REBUILD = 'Unable to rebuild with a different image for a volume-backed server.';

function wait(reason: string, message: string): Decision {
  return { kind: 'wait', reason, message };
}

/** The trigger tokens in spec that differ from those already handled (hard reboot first). */
export function pendingTriggers(server: Server): RebootTrigger[] {
  const spec = server.spec.triggers ?? {};
  const done = server.status?.triggers ?? {};
  return TRIGGERS.filter((t) => spec[t] !== undefined && spec[t] !== done[t]);
}

/** What to do next for `server`, given the guest the driver reports for its uid on `nodeName`. */
export function decide(server: Server, guest: GuestState | undefined, nodeName: string): Decision {
  const st = server.status ?? {};
  const meta = server.metadata;

  // 1. deletion
  if (meta.deletionTimestamp) {
    if (guest) return { kind: 'destroy' };
    if (meta.finalizers?.includes(GUEST_FINALIZER)) return { kind: 'releaseFinalizer' };
    return wait('Deleting', 'guest gone; waiting for the operator to finish the deletion');
  }

  // 2. binding
  if (st.node !== nodeName) return wait('NotBound', `status.node is ${st.node ?? 'unset'}, not ${nodeName}`);
  const vm = st.vmState;
  const task = st.taskState;
  if (vm === undefined) return wait('NotBound', 'status.vmState is not set yet');

  // 3. building
  if (vm === 'building') {
    // networking / block_device_mapping: the agent waits for the server's ports, or its boot volume's attachment,
    // before spawning (set by the agent, see compute.ts)
    if (task !== 'spawning' && task !== 'networking' && task !== 'block_device_mapping') {
      return wait('Building', `waiting for the operator (task ${task ?? 'none'})`);
    }
    if (!st.flavor) return wait('Building', 'status.flavor is not set yet');
    if (guest) return { kind: 'adopt', vmState: guestVmState(guest.powerState) ?? 'active' };
    return { kind: 'spawn' };
  }

  // 4. tasks
  if (task === 'resize_migrated' && (vm === 'active' || vm === 'stopped')) {
    const last = [...(st.actions ?? [])].reverse().find((a) => a.action === 'resize' || a.action === 'migrate');
    const action = last?.action === 'migrate' ? 'migrate' : 'resize';
    const mig = st.migration;
    if (mig && mig.source !== nodeName && !guest) {
      // Moved here: never start the guest while the source may still run it.
      const g = moveGuard(st);
      if (!g.ok) return wait(g.reason, g.message);
      return { kind: 'finishResize', action, importFrom: g.from };
    }
    return { kind: 'finishResize', action };
  }
  if (task === 'resize_confirming' && vm === 'resized') return { kind: 'confirmResize' };
  if (task === 'resize_reverting' && (vm === 'resized' || vm === 'error')) return { kind: 'revertResize' };
  if (vm === 'resized' && task === undefined) {
    return {
      kind: 'steady',
      ready: {
        status: 'True',
        reason: 'VerifyResize',
        message: 'resized: confirm or revert (spec.triggers.confirmResize or revertResize)',
      },
      powerState: guest?.powerState ?? 'NOSTATE',
    };
  }
  if (task !== undefined) {
    if (AGENT_TASKS.has(task)) return { kind: 'recover', task };
    const t = pendingTriggers(server)[0];
    if (t) return { kind: 'refuse', action: t, trigger: t, reason: refuseAction(t, vm, task) ?? `task ${task}` };
    return {
      kind: 'steady',
      ready: { status: 'False', reason: 'TaskInProgress', message: `task ${task} in progress` },
      powerState: guest?.powerState ?? 'NOSTATE',
    };
  }
  if (!MANAGED.has(vm)) return wait('Unmanaged', `vm_state ${vm} is not handled by the node agent`);

  // 5. the hypervisor is authoritative (an ERROR server stays ERROR until an action clears it)
  if (guest && vm !== 'error') {
    const observed = guestVmState(guest.powerState);
    if (observed === undefined) return wait('GuestStateUnknown', `guest power state ${guest.powerState}`);
    if (observed !== vm) {
      if (vm === 'active' && (guest.powerState === 'SHUTDOWN' || guest.powerState === 'CRASHED')) {
        return { kind: 'exited', powerState: guest.powerState };
      }
      return { kind: 'sync', vmState: observed, powerState: guest.powerState };
    }
  }

  // 6. rebuild: a new token, or spec.image differs from the image the root disk was built from
  const rebuildToken = server.spec.triggers?.rebuild;
  const rebuildAsked = rebuildToken !== undefined && rebuildToken !== st.triggers?.rebuild;
  const imageChanged = !!server.spec.image && !!st.image && server.spec.image !== st.image;
  if (rebuildAsked || imageChanged) {
    const refused = server.spec.bootVolume ? VOLUME_BACKED_REBUILD : refuseAction('rebuild', vm);
    if (refused)
      return { kind: 'refuse', action: 'rebuild', reason: refused, ...(rebuildAsked ? { trigger: 'rebuild' } : {}) };
    return { kind: 'rebuild' };
  }

  // 7. reboot triggers
  for (const t of pendingTriggers(server)) {
    const refused =
      refuseAction(t, vm) ?? (!guest && t === 'softReboot' ? 'the guest does not exist on this hypervisor' : undefined);
    if (refused) return { kind: 'refuse', action: t, reason: refused, trigger: t };
    return guest ? { kind: 'transition', action: t, trigger: t } : { kind: 'spawn', trigger: 'hardReboot' };
  }

  // 8. desired power state
  if (!guest) {
    if (vm === 'error') return steadyError(server, 'NOSTATE');
    return { kind: 'missing' };
  }
  const desired = server.spec.powerState;
  const action = powerAction(desired, vm);
  if (action) {
    const refused = refuseAction(action, vm);
    if (refused) return { kind: 'refuse', action, reason: refused };
    return { kind: 'transition', action: action as AgentAction };
  }

  // 9. steady
  if (vm === 'error') return steadyError(server, guest.powerState);
  return {
    kind: 'steady',
    ready: { status: 'True', reason: desired, message: `guest is ${guest.powerState}` },
    powerState: guest.powerState,
  };
}

function steadyError(server: Server, powerState: PowerState): Decision {
  const fault = server.status?.fault?.message;
  return {
    kind: 'steady',
    ready: {
      status: 'False',
      reason: 'Error',
      message: fault ? `server is in ERROR: ${fault}` : 'server is in ERROR (a hard reboot may recover it)',
    },
    powerState,
  };
}

// ---------------------------------------------------------------------------------------------
// Status bookkeeping (pure functions on a status object)

export type ServerAction = NonNullable<ServerStatus['actions']>[number];
export const MAX_ACTIONS = 20;

/** Appends an action entry, keeping the newest MAX_ACTIONS. */
export function appendAction(actions: readonly ServerAction[] | undefined, entry: ServerAction): ServerAction[] {
  return [...(actions ?? []), entry].slice(-MAX_ACTIONS);
}

/**
 * Completes the newest InProgress entry of `action` (or appends a completed one when there is none). A failure
 * repeating the previous entry (same action, Error, same message) replaces it, so a retried failure does not flood
 * the history.
 */
export function finishAction(
  actions: readonly ServerAction[] | undefined,
  action: string,
  result: 'Success' | 'Error',
  now: string,
  message?: string,
): ServerAction[] {
  const list = [...(actions ?? [])];
  const msg = message === undefined ? {} : { message: message.slice(0, 1024) };
  for (let i = list.length - 1; i >= 0; i--) {
    const a = list[i]!;
    if (a.action === action && a.result === 'InProgress') {
      const prev = list[i - 1];
      const repeat =
        result === 'Error' &&
        i === list.length - 1 &&
        prev?.action === action &&
        prev.result === 'Error' &&
        prev.message === msg.message;
      const done = { ...a, finishTime: now, result, ...msg };
      if (repeat) {
        list.splice(i - 1, 2, done);
      } else {
        list[i] = done;
      }
      return list.slice(-MAX_ACTIONS);
    }
  }
  return appendAction(list, { action, startTime: now, finishTime: now, result, ...msg });
}

/** Starts an entry (InProgress) unless the newest entry already is this action in progress. */
export function startAction(actions: readonly ServerAction[] | undefined, action: string, now: string): ServerAction[] {
  const last = actions?.at(-1);
  if (last && last.action === action && last.result === 'InProgress') return [...(actions ?? [])];
  return appendAction(actions, { action, startTime: now, result: 'InProgress' });
}

/** Marks every InProgress entry as interrupted. */
export function interruptActions(actions: readonly ServerAction[] | undefined, now: string): ServerAction[] {
  return (actions ?? []).map((a) =>
    a.result === 'InProgress'
      ? { ...a, result: 'Error' as const, finishTime: now, message: 'interrupted: the node agent restarted' }
      : a,
  );
}

type Status = Record<string, unknown>;

/** Sets vmState/taskState (undefined clears) and the derived status on a status object. */
export function setStates(st: Status, vmState: VmState | undefined, taskState: TaskState | undefined): Status {
  if (vmState !== undefined) st.vmState = vmState;
  if (taskState === undefined) delete st.taskState;
  else st.taskState = taskState;
  st.status = deriveServerStatus(st.vmState as VmState | undefined, taskState);
  return st;
}

/** Sets conditions on a status object (keeping lastTransitionTime when the status is unchanged). */
export interface ConditionUpdate {
  type: string;
  status: 'True' | 'False' | 'Unknown';
  reason: string;
  message: string;
}

export function setConditions(
  st: Status,
  updates: readonly ConditionUpdate[],
  generation: number | undefined,
  now: Date,
): Status {
  let list = (st.conditions as Condition[] | undefined) ?? [];
  for (const u of updates) list = setCondition(list, u, generation, now);
  st.conditions = list;
  return st;
}

export const NOT_REFUSED: ConditionUpdate = {
  type: 'ActionRefused',
  status: 'False',
  reason: 'NoRefusal',
  message: '',
};

/**
 * Whether a True ActionRefused may be cleared: only once the spec changed since the refusal (a refused trigger
 * stays visible until the user asks for something else).
 */
export function refusalIsStale(conditions: readonly Condition[] | undefined, generation: number | undefined): boolean {
  const c = conditions?.find((x) => x.type === 'ActionRefused');
  if (!c) return true;
  return c.status !== 'True' || c.observedGeneration !== generation;
}

/** Marks the given triggers' current spec tokens as handled. */
export function recordTriggers(st: Status, server: Server, triggers: readonly Trigger[]): Status {
  const spec = server.spec.triggers ?? {};
  const done = { ...((st.triggers as Record<string, string> | undefined) ?? {}) };
  for (const t of triggers) if (spec[t] !== undefined) done[t] = spec[t];
  st.triggers = done;
  return st;
}
