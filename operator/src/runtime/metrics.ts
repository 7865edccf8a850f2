// Prometheus metrics with controller-runtime's names (pkg/internal/controller/metrics, pkg/metrics/workqueue.go,
// leader election). One RuntimeMetrics per prom-client Registry: metric names can be registered once per registry.

import { Counter, Gauge, Histogram, type Registry } from 'prom-client';

const reconcileBuckets = [
  0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 1.25, 1.5, 1.75, 2,
  2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 9, 10, 15, 20, 25, 30, 40, 50, 60,
];
// prometheus.ExponentialBuckets(10e-9, 10, 12)
const queueBuckets = Array.from({ length: 12 }, (_, i) => Number((1e-8 * 10 ** i).toPrecision(1)));

/** What a work queue reports. Seconds are floating point. */
export interface QueueMetricsSink {
  add(): void;
  depth(n: number): void;
  queueDuration(seconds: number): void;
  workDuration(seconds: number): void;
  retry(): void;
}

/** Polled on scrape for the two "in progress" gauges. */
export interface QueueProgress {
  unfinishedWorkSeconds(): number;
  longestRunningProcessorSeconds(): number;
}

export const noopQueueMetrics: QueueMetricsSink = {
  add() {},
  depth() {},
  queueDuration() {},
  workDuration() {},
  retry() {},
};

export type ReconcileResultLabel = 'success' | 'error' | 'requeue' | 'requeue_after';

export interface ControllerMetricsSink {
  reconcile(result: ReconcileResultLabel, seconds: number): void;
  error(): void;
  terminalError(): void;
  panic(): void;
  timeout(): void;
  maxConcurrent(n: number): void;
  activeWorkers(delta: number): void;
}

export const noopControllerMetrics: ControllerMetricsSink = {
  reconcile() {},
  error() {},
  terminalError() {},
  panic() {},
  timeout() {},
  maxConcurrent() {},
  activeWorkers() {},
};

export class RuntimeMetrics {
  readonly reconcileTotal: Counter<'controller' | 'result'>;
  readonly reconcileErrors: Counter<'controller'>;
  readonly terminalReconcileErrors: Counter<'controller'>;
  readonly reconcilePanics: Counter<'controller'>;
  readonly reconcileTimeouts: Counter<'controller'>;
  readonly reconcileTime: Histogram<'controller'>;
  readonly maxConcurrentReconciles: Gauge<'controller'>;
  readonly activeWorkers: Gauge<'controller'>;
  readonly queueDepth: Gauge<'name' | 'controller'>;
  readonly queueAdds: Counter<'name' | 'controller'>;
  readonly queueRetries: Counter<'name' | 'controller'>;
  readonly queueLatency: Histogram<'name' | 'controller'>;
  readonly workDuration: Histogram<'name' | 'controller'>;
  readonly unfinishedWork: Gauge<'name' | 'controller'>;
  readonly longestRunning: Gauge<'name' | 'controller'>;
  readonly leaderStatus: Gauge<'name'>;
  readonly #queues = new Map<string, { labels: { name: string; controller: string }; progress: QueueProgress }>();

  constructor(registry: Registry) {
    const registers = [registry];
    const queues = this.#queues;
    this.reconcileTotal = new Counter({
      name: 'controller_runtime_reconcile_total',
      help: 'Total number of reconciliations per controller',
      labelNames: ['controller', 'result'],
      registers,
    });
    this.reconcileErrors = new Counter({
      name: 'controller_runtime_reconcile_errors_total',
      help: 'Total number of reconciliation errors per controller',
      labelNames: ['controller'],
      registers,
    });
    this.terminalReconcileErrors = new Counter({
      name: 'controller_runtime_terminal_reconcile_errors_total',
      help: 'Total number of terminal reconciliation errors per controller',
      labelNames: ['controller'],
      registers,
    });
    this.reconcilePanics = new Counter({
      name: 'controller_runtime_reconcile_panics_total',
      help: 'Total number of reconciliation panics (non-Error values thrown) per controller',
      labelNames: ['controller'],
      registers,
    });
    this.reconcileTimeouts = new Counter({
      name: 'controller_runtime_reconcile_timeouts_total',
      help: 'Total number of reconciliation timeouts per controller',
      labelNames: ['controller'],
      registers,
    });
    this.reconcileTime = new Histogram({
      name: 'controller_runtime_reconcile_time_seconds',
      help: 'Length of time per reconciliation per controller',
      labelNames: ['controller'],
      buckets: reconcileBuckets,
      registers,
    });
    this.maxConcurrentReconciles = new Gauge({
      name: 'controller_runtime_max_concurrent_reconciles',
      help: 'Maximum number of concurrent reconciles per controller',
      labelNames: ['controller'],
      registers,
    });
    this.activeWorkers = new Gauge({
      name: 'controller_runtime_active_workers',
      help: 'Number of currently used workers per controller',
      labelNames: ['controller'],
      registers,
    });
    const qLabels = ['name', 'controller'] as const;
    this.queueDepth = new Gauge({
      name: 'workqueue_depth',
      help: 'Current depth of workqueue',
      labelNames: qLabels,
      registers,
    });
    this.queueAdds = new Counter({
      name: 'workqueue_adds_total',
      help: 'Total number of adds handled by workqueue',
      labelNames: qLabels,
      registers,
    });
    this.queueRetries = new Counter({
      name: 'workqueue_retries_total',
      help: 'Total number of retries handled by workqueue',
      labelNames: qLabels,
      registers,
    });
    this.queueLatency = new Histogram({
      name: 'workqueue_queue_duration_seconds',
      help: 'How long in seconds an item stays in workqueue before being requested',
      labelNames: qLabels,
      buckets: queueBuckets,
      registers,
    });
    this.workDuration = new Histogram({
      name: 'workqueue_work_duration_seconds',
      help: 'How long in seconds processing an item from workqueue takes',
      labelNames: qLabels,
      buckets: queueBuckets,
      registers,
    });
    this.unfinishedWork = new Gauge({
      name: 'workqueue_unfinished_work_seconds',
      help: 'How many seconds of work has been done that is in progress and has not been observed by work_duration',
      labelNames: qLabels,
      registers,
      collect() {
        this.reset();
        for (const q of queues.values()) this.set(q.labels, q.progress.unfinishedWorkSeconds());
      },
    });
    this.longestRunning = new Gauge({
      name: 'workqueue_longest_running_processor_seconds',
      help: 'How many seconds has the longest running processor for workqueue been running',
      labelNames: qLabels,
      registers,
      collect() {
        this.reset();
        for (const q of queues.values()) this.set(q.labels, q.progress.longestRunningProcessorSeconds());
      },
    });
    this.leaderStatus = new Gauge({
      name: 'leader_election_master_status',
      help: 'Gauge of if the reporting system is master of the relevant lease, 0 indicates backup, 1 indicates master',
      labelNames: ['name'],
      registers,
    });
  }

  /** Sink for one queue; progress is polled on scrape until the returned unregister is called. */
  queue(name: string, controller: string, progress?: QueueProgress): { sink: QueueMetricsSink; unregister(): void } {
    const labels = { name, controller };
    const id = `${name}\u0000${controller}`;
    if (progress) this.#queues.set(id, { labels, progress });
    this.queueAdds.inc(labels, 0);
    this.queueRetries.inc(labels, 0);
    this.queueDepth.set(labels, 0);
    return {
      sink: {
        add: () => this.queueAdds.inc(labels),
        depth: (n) => this.queueDepth.set(labels, n),
        queueDuration: (s) => this.queueLatency.observe(labels, s),
        workDuration: (s) => this.workDuration.observe(labels, s),
        retry: () => this.queueRetries.inc(labels),
      },
      unregister: () => {
        this.#queues.delete(id);
      },
    };
  }

  controller(controller: string): ControllerMetricsSink {
    const labels = { controller };
    // Pre-create series so dashboards see zeros before the first event.
    for (const result of ['success', 'error', 'requeue', 'requeue_after'] as const) {
      this.reconcileTotal.inc({ controller, result }, 0);
    }
    this.reconcileErrors.inc(labels, 0);
    this.terminalReconcileErrors.inc(labels, 0);
    this.reconcilePanics.inc(labels, 0);
    this.reconcileTimeouts.inc(labels, 0);
    this.activeWorkers.set(labels, 0);
    return {
      reconcile: (result, seconds) => {
        this.reconcileTotal.inc({ controller, result });
        this.reconcileTime.observe(labels, seconds);
      },
      error: () => this.reconcileErrors.inc(labels),
      terminalError: () => this.terminalReconcileErrors.inc(labels),
      panic: () => this.reconcilePanics.inc(labels),
      timeout: () => this.reconcileTimeouts.inc(labels),
      maxConcurrent: (n) => this.maxConcurrentReconciles.set(labels, n),
      activeWorkers: (delta) => this.activeWorkers.inc(labels, delta),
    };
  }

  leader(name: string): (isLeader: boolean) => void {
    this.leaderStatus.set({ name }, 0);
    return (isLeader) => this.leaderStatus.set({ name }, isLeader ? 1 : 0);
  }
}

const byRegistry = new WeakMap<Registry, RuntimeMetrics>();

/** The RuntimeMetrics of a registry, created on first use. */
export function runtimeMetrics(registry: Registry): RuntimeMetrics {
  let m = byRegistry.get(registry);
  if (!m) {
    m = new RuntimeMetrics(registry);
    byRegistry.set(registry, m);
  }
  return m;
}
