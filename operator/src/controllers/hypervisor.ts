// The Hypervisor controller (Nova's servicegroup API): a hypervisor is up while its agent's heartbeat
// is fresher than the grace period, down otherwise. Only the operator writes status.state and
// status.status (server-side apply, its own field manager); the agent owns every other status field.
import { type Hypervisor, HypervisorKind } from '../api/index.ts';
import { type Manager, patchStatus, type ReconcileContext, type Request } from '../runtime/index.ts';
import { FIELD_MANAGER, gvrOf } from './common.ts';

export const HYPERVISORS = gvrOf(HypervisorKind);

/** Milliseconds since the hypervisor's last heartbeat (Infinity when it never reported). */
export function heartbeatAgeMs(hv: Hypervisor, now: number): number {
  const t = hv.status?.lastHeartbeatTime;
  const ms = t ? Date.parse(t) : Number.NaN;
  return Number.isFinite(ms) ? now - ms : Number.POSITIVE_INFINITY;
}

export function isUp(hv: Hypervisor, now: number, graceMs: number): boolean {
  return heartbeatAgeMs(hv, now) <= graceMs;
}

export interface HypervisorControllerOptions {
  heartbeatGraceMs: number;
  now?: () => number;
}

export function registerHypervisorController(mgr: Manager, opts: HypervisorControllerOptions) {
  const hypervisors = mgr.informer<Hypervisor>(HYPERVISORS);
  const now = opts.now ?? Date.now;

  async function reconcile(req: Request, ctx: ReconcileContext) {
    const hv = hypervisors.get(req.name);
    if (!hv) return undefined;
    const t = now();
    const up = isUp(hv, t, opts.heartbeatGraceMs);
    const state = up ? 'up' : 'down';
    const enabled = hv.spec?.enabled !== false ? 'enabled' : 'disabled';
    if (hv.status?.state !== state || hv.status?.status !== enabled) {
      await patchStatus(
        mgr.client,
        HYPERVISORS,
        { apiVersion: HypervisorKind.apiVersion, kind: HypervisorKind.kind, metadata: hv.metadata },
        { state, status: enabled },
        { fieldManager: FIELD_MANAGER },
      );
      ctx.log.info({ state, status: enabled, heartbeatAgeMs: heartbeatAgeMs(hv, t) }, 'hypervisor state changed');
    }
    // Look again just after the heartbeat would go stale.
    return up ? { requeueAfter: opts.heartbeatGraceMs - heartbeatAgeMs(hv, t) + 100 } : undefined;
  }

  const controller = mgr.addController({ name: 'hypervisor', reconcile, maxConcurrentReconciles: 2 });
  controller.for(hypervisors);
  return { controller, hypervisors };
}
