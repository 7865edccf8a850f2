// When may a node agent destroy a guest whose Server is no longer bound to its node? (pure, unit-tested)
//
// The node label compute.stratus.io/node is what the agent's informer selects on, so a `kubectl label` edit or a
// bad patch makes a Server vanish from it exactly as a real move does. Destroying the guest then would take the
// guest and its disks with it, so the agent destroys a guest only when
//  - the Server is gone (NotFound, or its name now belongs to a new object with another uid), or being deleted;
//  - or the operator has recorded a move away from this node: status.node names another node, the label agrees,
//    and the newest resize/migrate/revertResize action is `<this node> -> <that node>` and did not fail (the
//    operator's record, operator/src/controllers/server.ts resizeOrMigrate and revertMove: a reverted move away from
//    its source is a move away from the target).
// Anything else keeps the guest running and is reported: an Event and the Server condition Placement False
// NodeLabelMismatch (see docs/design/networking.md and node-agent.md).
import { SERVER_NODE_LABEL } from '../../operator/src/api/index.ts';

/** A Server as read from the API (raw JSON; every field may be missing). */
export interface PlacedServer {
  metadata?: { uid?: string; deletionTimestamp?: unknown; labels?: Record<string, string> };
  status?:
    | { node?: string; actions?: { action: string; result?: string; message?: string }[] }
    | Record<string, unknown>;
}

/** Condition type the agent sets on a Server whose guest it keeps although the Server is not bound here. */
export const PLACEMENT_CONDITION = 'Placement';
export const NODE_LABEL_MISMATCH = 'NodeLabelMismatch';

export type GuestVerdict =
  | { destroy: true; reason: string }
  /** The Server is bound here after all (the cache is behind): nothing to do. */
  | { destroy: false; boundHere: true; reason: string }
  | { destroy: false; boundHere: false; reason: string };

/** The newest resize/migrate/revertResize action recorded on a Server's status. */
function lastMove(server: PlacedServer): { action: string; result?: string; message?: string } | undefined {
  const actions = (server.status as { actions?: unknown } | undefined)?.actions;
  if (!Array.isArray(actions)) return undefined;
  for (let i = actions.length - 1; i >= 0; i--) {
    const a = actions[i] as { action?: unknown; result?: unknown; message?: unknown };
    if (a?.action === 'resize' || a?.action === 'migrate' || a?.action === 'revertResize') {
      return {
        action: a.action,
        ...(typeof a.result === 'string' ? { result: a.result } : {}),
        ...(typeof a.message === 'string' ? { message: a.message } : {}),
      };
    }
  }
  return undefined;
}

/**
 * Whether the guest `guestId` on `nodeName` may be destroyed, given the live Server of its name (undefined when
 * NotFound).
 */
export function guestVerdict(live: PlacedServer | undefined, guestId: string, nodeName: string): GuestVerdict {
  if (!live) return { destroy: true, reason: 'the server is deleted' };
  if (live.metadata?.uid !== guestId) return { destroy: true, reason: 'the server is deleted (its name is reused)' };
  if (live.metadata?.deletionTimestamp) return { destroy: true, reason: 'the server is being deleted' };
  const label = live.metadata?.labels?.[SERVER_NODE_LABEL];
  if (label === nodeName) return { destroy: false, boundHere: true, reason: 'the server is bound here' };
  const node = (live.status as { node?: unknown } | undefined)?.node;
  const move = lastMove(live);
  if (
    typeof node === 'string' &&
    node !== '' &&
    node !== nodeName &&
    label === node &&
    move &&
    move.result !== 'Error' &&
    move.message === `${nodeName} -> ${node}`
  ) {
    return { destroy: true, reason: `the server moved to ${node} (${move.action})` };
  }
  const labelText = label ? `names ${label}` : 'is missing';
  const nodeText = typeof node === 'string' && node ? node : '(none)';
  return {
    destroy: false,
    boundHere: false,
    reason:
      `the node label ${SERVER_NODE_LABEL} ${labelText} (status.node ${nodeText}) but no move away from ` +
      `${nodeName} is recorded: the guest keeps running here until the server is deleted or moved`,
  };
}
