// The node agent's field manager: `stratus-agent/<node>`, so managedFields shows which node's agent owns a status
// field (the operator writes as `stratus-operator`). Ownership of every status field: docs/design/status-ownership.md.
import { createHash } from 'node:crypto';

/** The API server refuses field managers longer than this (bytes). */
const MAX_MANAGER = 128;
const PREFIX = 'stratus-agent/';

/**
 * Field manager of the agent of `nodeName`. A node name is at most 253 characters: names that do not fit are
 * shortened and end in a hash of the whole name, so every node keeps a distinct, stable manager.
 */
export function agentFieldManager(nodeName: string): string {
  const full = `${PREFIX}${nodeName}`;
  if (Buffer.byteLength(full) <= MAX_MANAGER) return full;
  const hash = createHash('sha256').update(nodeName).digest('hex').slice(0, 8);
  return `${PREFIX}${nodeName.slice(0, MAX_MANAGER - PREFIX.length - hash.length - 1)}-${hash}`;
}
