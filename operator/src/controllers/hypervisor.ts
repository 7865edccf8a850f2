// The Hypervisor controller (Nova's servicegroup API). Liveness comes from node Leases, as kubelets do: each node
// agent renews the Lease nodeLeaseName(node) every heartbeat, and the operator records, in memory and on its own
// monotonic clock, WHEN it observed each renewal (a change of spec.renewTime). The times written in the Lease come
// from the node's clock and are never compared with ours: only their changing counts. A hypervisor is down once no
// renewal was observed for the grace period since the later of its last observed renewal and this controller's
// start (on an operator start the recorded state is kept until a renewal or the grace period decides). Only the
// operator writes status.state and status.status (server-side apply, its own field manager); the agent owns every
// other status field.
import type { V1Lease } from '@kubernetes/client-node';
import {
  type Hypervisor,
  HypervisorKind,
  NODE_LEASE_LABEL,
  NODE_LEASE_NAMESPACE,
  nodeLeaseName,
} from '../api/index.ts';
import { leaseGVR, type Manager, patchStatus, type ReconcileContext, type Request } from '../runtime/index.ts';
import { FIELD_MANAGER, gvrOf } from './common.ts';

export const HYPERVISORS = gvrOf(HypervisorKind);

/**
 * Whether the operator considers the hypervisor up (status.state, written by this controller). The extra
 * arguments are ignored: liveness is no longer computed from a timestamp of the node's clock.
 */
export function isUp(hv: Hypervisor, _now?: number, _graceMs?: number): boolean {
  return hv.status?.state === 'up';
}

export interface LivenessVerdict {
  /** undefined: no evidence either way yet (keep the recorded state). */
  up: boolean | undefined;
  /** When to look again (ms), while the verdict can still change without a new observation. */
  recheckInMs?: number;
}

/** Renewals of node Leases as this process observed them, on its own monotonic clock. Pure; testable. */
export class NodeLiveness {
  readonly graceMs: number;
  readonly #now: () => number;
  /** node -> the last renewal marker seen and when a change of it was last observed */
  readonly #seen = new Map<string, { marker: string; renewedAt: number | undefined }>();
  #startedAt: number | undefined;

  constructor(graceMs: number, now: () => number = () => performance.now()) {
    this.graceMs = graceMs;
    this.#now = now;
  }

  /**
   * Records a sighting of a node's Lease. `baseline` (the initial list) only notes the marker: a Lease that
   * existed before we looked proves nothing about now. A later change of the marker, or a Lease first seen after
   * that, is a renewal observed now. Returns true when it was a renewal.
   */
  observe(node: string, marker: string, baseline: boolean): boolean {
    const prev = this.#seen.get(node);
    if (prev?.marker === marker) return false;
    const renewal = !baseline;
    this.#seen.set(node, { marker, renewedAt: renewal ? this.#now() : prev?.renewedAt });
    return renewal;
  }

  /** Judging starts (the controller runs: leadership acquired); idempotent. */
  start(): void {
    this.#startedAt ??= this.#now();
  }

  verdict(node: string): LivenessVerdict {
    this.start();
    const now = this.#now();
    const renewedAt = this.#seen.get(node)?.renewedAt;
    const since = Math.max(renewedAt ?? Number.NEGATIVE_INFINITY, this.#startedAt ?? now);
    const left = since + this.graceMs - now;
    if (left <= 0) return { up: false };
    return { up: renewedAt === undefined ? undefined : true, recheckInMs: left };
  }
}

/** The renewal marker of a Lease: its renewTime (the holder's clock, compared only for equality). */
export function leaseMarker(lease: V1Lease): string {
  const t = lease.spec?.renewTime as unknown;
  const renew = t instanceof Date ? t.toISOString() : t === undefined ? '' : String(t);
  return `${lease.spec?.holderIdentity ?? ''}|${renew || lease.metadata?.resourceVersion || ''}`;
}

export interface HypervisorControllerOptions {
  heartbeatGraceMs: number;
  /** Namespace of the node Leases (default NODE_LEASE_NAMESPACE). */
  leaseNamespace?: string;
  /** Monotonic milliseconds (default performance.now). */
  now?: () => number;
}

export function registerHypervisorController(mgr: Manager, opts: HypervisorControllerOptions) {
  const hypervisors = mgr.informer<Hypervisor>(HYPERVISORS);
  const leases = mgr.informer<V1Lease>(leaseGVR, {
    namespace: opts.leaseNamespace ?? NODE_LEASE_NAMESPACE,
    labelSelector: NODE_LEASE_LABEL,
  });
  const liveness = new NodeLiveness(opts.heartbeatGraceMs, opts.now);
  const nodeOf = (l: V1Lease): string | undefined => {
    const node = l.metadata?.labels?.[NODE_LEASE_LABEL];
    return node && l.metadata?.name === nodeLeaseName(node) ? node : undefined;
  };
  // Observations are recorded from the start (a standby keeps them warm), before the controller is enqueued.
  const see = (l: V1Lease) => {
    const node = nodeOf(l);
    if (node) liveness.observe(node, leaseMarker(l), !leases.hasSynced());
  };
  leases.addEventHandler({ onAdd: see, onUpdate: (_old, l) => see(l) });

  async function reconcile(req: Request, ctx: ReconcileContext) {
    const hv = hypervisors.get(req.name);
    if (!hv) return undefined;
    const v = liveness.verdict(req.name);
    // No evidence yet and nothing recorded (a new hypervisor whose first renewal has not been seen): leave state
    // unset, so the scheduler waits for it instead of reading "down" (docs/design/compute.md).
    const recorded = hv.status?.state;
    const up = v.up ?? (recorded === undefined ? undefined : recorded === 'up');
    const state = up === undefined ? undefined : up ? 'up' : 'down';
    const enabled = hv.spec?.enabled !== false ? 'enabled' : 'disabled';
    if (hv.status?.state !== state || hv.status?.status !== enabled) {
      await patchStatus(
        mgr.client,
        HYPERVISORS,
        { apiVersion: HypervisorKind.apiVersion, kind: HypervisorKind.kind, metadata: hv.metadata },
        { ...(state ? { state } : {}), status: enabled },
        { fieldManager: FIELD_MANAGER },
      );
      ctx.log.info({ state, status: enabled }, 'hypervisor state changed');
    }
    // Look again just after the grace period would run out without a renewal.
    return v.recheckInMs !== undefined ? { requeueAfter: Math.ceil(v.recheckInMs) + 100 } : undefined;
  }

  const controller = mgr.addController({ name: 'hypervisor', reconcile, maxConcurrentReconciles: 2 });
  controller.for(hypervisors);
  controller.watches(leases, (l) => {
    const node = nodeOf(l);
    return node ? [node] : [];
  });
  return { controller, hypervisors, leases, liveness };
}
