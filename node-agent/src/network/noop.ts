// A network backend that wires nothing and reports every port ready: for the fake driver, integration tests and
// scale simulations (hundreds of simulated nodes in one process). It keeps the last plan so tests can look at it.
import type { ApplyResult, NetworkBackend, NodeNetworkPlan } from './backend.ts';

export class NoopBackend implements NetworkBackend {
  readonly name = 'noop' as const;
  readonly vifType = 'noop' as const;
  /** The last plan applied (tests). */
  lastPlan: NodeNetworkPlan | undefined;
  /** Number of apply() calls (tests). */
  applies = 0;
  #ports = new Set<string>();

  async init(): Promise<void> {}

  async apply(plan: NodeNetworkPlan): Promise<ApplyResult> {
    this.applies++;
    this.lastPlan = plan;
    const changes: string[] = [];
    const now = new Set(plan.ports.map((p) => p.id));
    for (const p of plan.ports)
      if (!this.#ports.has(p.id)) changes.push(`port ${p.namespace}/${p.name}: plugged (noop)`);
    for (const id of this.#ports) if (!now.has(id)) changes.push(`port ${id}: unplugged (noop)`);
    this.#ports = now;
    return { ports: Object.fromEntries(plan.ports.map((p) => [p.id, { ready: true }])), changes };
  }

  async close(): Promise<void> {}
}
