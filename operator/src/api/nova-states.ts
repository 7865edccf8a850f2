// Nova's server state model: three fields and the user-facing status derived from them.
// Values follow nova/compute/{vm_states,task_states,power_state}.py and the API's state map
// (see ../shared/reference/openstack.md §1.1).
import * as z from 'zod';

export const VM_STATES = [
  'active',
  'building',
  'paused',
  'suspended',
  'stopped',
  'rescued',
  'resized',
  'soft-delete',
  'deleted',
  'error',
  'shelved',
  'shelved_offloaded',
] as const;
export const VmState = z.enum(VM_STATES);
export type VmState = z.infer<typeof VmState>;

export const TASK_STATES = [
  'scheduling',
  'block_device_mapping',
  'networking',
  'spawning',
  'image_snapshot',
  'image_snapshot_pending',
  'image_pending_upload',
  'image_uploading',
  'image_backup',
  'updating_password',
  'resize_prep',
  'resize_migrating',
  'resize_migrated',
  'resize_finish',
  'resize_reverting',
  'resize_confirming',
  'rebooting',
  'reboot_pending',
  'reboot_started',
  'rebooting_hard',
  'reboot_pending_hard',
  'reboot_started_hard',
  'pausing',
  'unpausing',
  'suspending',
  'resuming',
  'powering-off',
  'powering-on',
  'rescuing',
  'unrescuing',
  'rebuilding',
  'rebuild_block_device_mapping',
  'rebuild_spawning',
  'migrating',
  'deleting',
  'soft-deleting',
  'restoring',
  'shelving',
  'shelving_image_pending_upload',
  'shelving_image_uploading',
  'shelving_offloading',
  'unshelving',
] as const;
export const TaskState = z.enum(TASK_STATES);
export type TaskState = z.infer<typeof TaskState>;

/** Nova's power states by name (DB integers 0, 1, 3, 4, 6, 7). */
export const POWER_STATES = ['NOSTATE', 'RUNNING', 'PAUSED', 'SHUTDOWN', 'CRASHED', 'SUSPENDED'] as const;
export const PowerState = z.enum(POWER_STATES);
export type PowerState = z.infer<typeof PowerState>;

export const SERVER_STATUSES = [
  'ACTIVE',
  'BUILD',
  'REBUILD',
  'SUSPENDED',
  'PAUSED',
  'RESIZE',
  'VERIFY_RESIZE',
  'REVERT_RESIZE',
  'PASSWORD',
  'REBOOT',
  'HARD_REBOOT',
  'DELETED',
  'UNKNOWN',
  'ERROR',
  'SHUTOFF',
  'MIGRATING',
  'RESCUE',
  'SOFT_DELETED',
  'SHELVED',
  'SHELVED_OFFLOADED',
] as const;
export const ServerStatusValue = z.enum(SERVER_STATUSES);
export type ServerStatusValue = z.infer<typeof ServerStatusValue>;

/** What a user asks for in spec.powerState. */
export const DESIRED_POWER_STATES = ['Running', 'Stopped', 'Paused', 'Suspended'] as const;
export const DesiredPowerState = z.enum(DESIRED_POWER_STATES);
export type DesiredPowerState = z.infer<typeof DesiredPowerState>;

const REBOOT_SOFT: readonly TaskState[] = ['rebooting', 'reboot_pending', 'reboot_started'];
const REBOOT_HARD: readonly TaskState[] = ['rebooting_hard', 'reboot_pending_hard', 'reboot_started_hard'];
const REBUILD: readonly TaskState[] = ['rebuilding', 'rebuild_block_device_mapping', 'rebuild_spawning'];
const RESIZE: readonly TaskState[] = ['resize_prep', 'resize_migrating', 'resize_migrated', 'resize_finish'];

/** The API `status` Nova shows for a vm_state and task_state (nova/api/openstack/common.py). */
export function deriveServerStatus(vmState: VmState | undefined, taskState?: TaskState): ServerStatusValue {
  const t = taskState;
  switch (vmState) {
    case 'active':
      if (t && REBOOT_SOFT.includes(t)) return 'REBOOT';
      if (t && REBOOT_HARD.includes(t)) return 'HARD_REBOOT';
      if (t === 'updating_password') return 'PASSWORD';
      if (t && REBUILD.includes(t)) return 'REBUILD';
      if (t === 'migrating') return 'MIGRATING';
      if (t && RESIZE.includes(t)) return 'RESIZE';
      return 'ACTIVE';
    case 'building':
      return 'BUILD';
    case 'stopped':
      if (t && (RESIZE.includes(t) || t === 'resize_reverting')) return 'RESIZE';
      if (t && REBUILD.includes(t)) return 'REBUILD';
      return 'SHUTOFF';
    case 'resized':
      return t === 'resize_reverting' ? 'REVERT_RESIZE' : 'VERIFY_RESIZE';
    case 'paused':
      return t === 'migrating' ? 'MIGRATING' : 'PAUSED';
    case 'error':
      return t && REBUILD.includes(t) ? 'REBUILD' : 'ERROR';
    case 'suspended':
      return 'SUSPENDED';
    case 'rescued':
      return 'RESCUE';
    case 'deleted':
      return 'DELETED';
    case 'soft-delete':
      return 'SOFT_DELETED';
    case 'shelved':
      return 'SHELVED';
    case 'shelved_offloaded':
      return 'SHELVED_OFFLOADED';
    default:
      return 'UNKNOWN';
  }
}
