// Which server actions Nova allows in which vm_state (nova/compute/api.py check_instance_state;
// ../shared/reference/openstack.md §1.2). The operator and the node agent both consult this table,
// so a forbidden transition is refused with the same words wherever it is noticed.
import type { DesiredPowerState, TaskState, VmState } from './nova-states.ts';

export type ServerActionName =
  | 'start'
  | 'stop'
  | 'pause'
  | 'unpause'
  | 'suspend'
  | 'resume'
  | 'softReboot'
  | 'hardReboot'
  | 'resize'
  | 'rebuild'
  | 'migrate';

export const ALLOWED_VM_STATES: Record<ServerActionName, readonly VmState[]> = {
  start: ['stopped'],
  stop: ['active', 'error'],
  pause: ['active'],
  unpause: ['paused'],
  suspend: ['active'],
  resume: ['suspended'],
  softReboot: ['active'],
  hardReboot: ['active', 'stopped', 'paused', 'suspended', 'error'],
  resize: ['active', 'stopped'],
  rebuild: ['active', 'stopped', 'error'],
  migrate: ['active', 'stopped'],
};

/** Task states a hard reboot may interrupt (Nova's ALLOW_REBOOT); every other action needs an idle server. */
const HARD_REBOOT_OVERRIDES: readonly TaskState[] = [
  'rebooting',
  'reboot_pending',
  'reboot_started',
  'resuming',
  'rebooting_hard',
  'unpausing',
  'pausing',
  'suspending',
];

/** Undefined when allowed, else the reason (for a condition message and an Event). */
export function refuseAction(action: ServerActionName, vmState: VmState, taskState?: TaskState): string | undefined {
  if (!ALLOWED_VM_STATES[action].includes(vmState)) {
    return `cannot ${action} a server in vm_state ${vmState} (allowed: ${ALLOWED_VM_STATES[action].join(', ')})`;
  }
  if (taskState && !(action === 'hardReboot' && HARD_REBOOT_OVERRIDES.includes(taskState))) {
    return `cannot ${action} while task ${taskState} is in progress`;
  }
  return undefined;
}

/**
 * The action that moves a server from vmState towards spec.powerState, or undefined when it is
 * already there. Forbidden paths (pause a stopped server, stop a paused one...) return the action
 * anyway so the caller can refuse it with refuseAction's reason instead of silently doing nothing.
 */
export function powerAction(desired: DesiredPowerState, vmState: VmState): ServerActionName | undefined {
  switch (desired) {
    case 'Running':
      if (vmState === 'stopped') return 'start';
      if (vmState === 'paused') return 'unpause';
      if (vmState === 'suspended') return 'resume';
      return undefined;
    case 'Stopped':
      return vmState === 'stopped' ? undefined : 'stop';
    case 'Paused':
      return vmState === 'paused' ? undefined : 'pause';
    case 'Suspended':
      return vmState === 'suspended' ? undefined : 'suspend';
  }
}

/** Nova's refusal of a resize to a smaller root or ephemeral disk (libvirt driver: ResizeError "Unable to resize disk down."). */
export const RESIZE_DOWN_MESSAGE = 'Resize error: Unable to resize disk down.';
/**
 * Nova's API refusal of a rebuild with another image of a server booted from a volume (ImageUnacceptable, before
 * microversion 2.93: the root disk is the volume, which a rebuild does not re-image; nova/compute/api.py rebuild).
 */
export const VOLUME_BACKED_REBUILD_MESSAGE = 'Unable to rebuild with a different image for a volume-backed server.';
/** Nova's API refusal of a resize from a sized root disk to a flavor with disk 0 (CannotResizeDisk). */
export const RESIZE_TO_ZERO_MESSAGE = 'Resize to zero disk flavor is not allowed.';

/**
 * Undefined when the disks of flavor `to` can hold those of flavor `from` (sizes in GiB; root 0 = sized to the
 * image), else Nova's refusal: a resize keeps the disks and never shrinks them.
 */
export function refuseResizeDisks(
  from: { rootGiB: number; ephemeralGiB: number },
  to: { rootGiB: number; ephemeralGiB: number },
): string | undefined {
  if (to.rootGiB === 0 && from.rootGiB !== 0) return RESIZE_TO_ZERO_MESSAGE;
  if ((to.rootGiB !== 0 && to.rootGiB < from.rootGiB) || to.ephemeralGiB < from.ephemeralGiB) {
    return RESIZE_DOWN_MESSAGE;
  }
  return undefined;
}
