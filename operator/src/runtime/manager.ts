// The Manager wires the runtime together (controller-runtime's manager): one KubeConfig and client, a metrics
// registry, shared informers (one per resource + namespace + selectors), controllers, the leader elector and the
// HTTP endpoints /metrics, /healthz and /readyz.
//
// start(): HTTP server, informers, wait for every cache to sync, then, with leader election, campaign and start
// the controllers only once leading (standbys keep warm caches). Losing leadership aborts every in-flight
// reconcile (their API calls honour the abort: see runWithSignal) and stops all workers at once, then, once the
// reconciles have settled or (leaseDuration - renewDeadline) / 2 has passed, calls onLeadershipLost (main() should
// exit, as client-go does: the exit fences whatever still runs, before another replica may lead).
// stop(): controllers stop taking work and get the deadline to finish (then are aborted), then informers stop and
// the lease is released — only if every reconcile, abandoned ones included, has settled: otherwise one may still
// write, and the lease is left to expire. Signals are handled only through handleSignals(manager).

import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { KubeConfig, type KubernetesObject } from '@kubernetes/client-node';
import type { Logger } from 'pino';
import { collectDefaultMetrics, Registry } from 'prom-client';
import { type GVR, KubeClient } from './client.ts';
import { type Clock, systemClock, type TimerHandle } from './clock.ts';
import { Controller, type ControllerOptions } from './controller.ts';
import { EventRecorder, type EventRecorderOptions } from './events.ts';
import { Informer, type InformerOptions, type ResourceInformerOptions } from './informer.ts';
import { LeaderElector, type LeadershipEnd, type LeaseStore } from './leaderelection.ts';
import { silentLogger } from './log.ts';
import { type RuntimeMetrics, runtimeMetrics } from './metrics.ts';

export interface LeaderElectionConfig {
  leaseName: string;
  leaseNamespace: string;
  identity?: string;
  leaseDurationMs?: number;
  renewDeadlineMs?: number;
  retryPeriodMs?: number;
  /** Default: the Lease through the manager's client. */
  store?: LeaseStore;
}

export interface ManagerOptions {
  /** Default: KubeConfig.loadFromDefault() (in-cluster or $KUBECONFIG), loaded on first use. */
  kubeConfig?: KubeConfig;
  logger?: Logger;
  /** Default: a new Registry with prom-client's default process metrics. */
  registry?: Registry;
  /** HTTP endpoints; false disables (default port 8080 on all interfaces; port 0 picks a free port). */
  http?: { port: number; host?: string } | false;
  /** Omit or false to run controllers without leader election. */
  leaderElection?: LeaderElectionConfig | false;
  /** start() fails when caches have not synced in time (default 2 min). */
  cacheSyncTimeoutMs?: number;
  /** Default deadline for stop() (default 30 s). */
  gracefulShutdownMs?: number;
  /** Called after leadership was lost and all reconciling stopped. main() should exit the process. */
  onLeadershipLost?: (reason: LeadershipEnd) => void;
  /** Defaults for informers created by informer(). */
  informerDefaults?: InformerOptions;
  clock?: Clock;
}

export type InformerSelector = Pick<ResourceInformerOptions, 'namespace' | 'labelSelector' | 'fieldSelector'>;

export class Manager {
  readonly registry: Registry;
  readonly metrics: RuntimeMetrics;
  readonly logger: Logger;
  readonly #opts: ManagerOptions;
  readonly #clock: Clock;
  readonly #informers = new Map<string, Informer<KubernetesObject>>();
  readonly #controllers: Controller[] = [];
  readonly #recorders: EventRecorder[] = [];
  #kubeConfig: KubeConfig | undefined;
  #client: KubeClient | undefined;
  #server: Server | undefined;
  #elector: LeaderElector | undefined;
  #started = false;
  #stopping = false;
  #leading = false;
  #electedResolve: (() => void) | undefined;
  readonly #elected: Promise<void>;

  constructor(opts: ManagerOptions = {}) {
    this.#opts = opts;
    this.#kubeConfig = opts.kubeConfig;
    this.#clock = opts.clock ?? systemClock;
    this.logger = opts.logger ?? silentLogger();
    if (opts.registry) {
      this.registry = opts.registry;
    } else {
      this.registry = new Registry();
      collectDefaultMetrics({ register: this.registry });
    }
    this.metrics = runtimeMetrics(this.registry);
    this.#elected = new Promise((resolve) => {
      this.#electedResolve = resolve;
    });
  }

  get kubeConfig(): KubeConfig {
    if (!this.#kubeConfig) {
      const kc = new KubeConfig();
      kc.loadFromDefault();
      this.#kubeConfig = kc;
    }
    return this.#kubeConfig;
  }

  get client(): KubeClient {
    this.#client ??= new KubeClient(this.kubeConfig);
    return this.#client;
  }

  /** The shared informer for a resource + namespace + selectors (created on first request). */
  informer<T extends KubernetesObject>(gvr: GVR, selector: InformerSelector = {}): Informer<T> {
    const key = [
      gvr.group,
      gvr.version,
      gvr.plural,
      selector.namespace ?? '',
      selector.labelSelector ?? '',
      selector.fieldSelector ?? '',
    ].join('|');
    let inf = this.#informers.get(key);
    if (!inf) {
      inf = Informer.forResource<KubernetesObject>(this.client, gvr, {
        clock: this.#clock,
        logger: this.logger,
        ...this.#opts.informerDefaults,
        ...selector,
      });
      this.#informers.set(key, inf);
      if (this.#started && !this.#stopping) inf.start();
    }
    return inf as unknown as Informer<T>;
  }

  /** Registers an informer built elsewhere (custom ListerWatcher, tests) so start/stop/health cover it. */
  addInformer<T extends KubernetesObject>(key: string, informer: Informer<T>): Informer<T> {
    if (this.#informers.has(key)) throw new Error(`informer ${key} already registered`);
    this.#informers.set(key, informer as unknown as Informer<KubernetesObject>);
    if (this.#started && !this.#stopping) informer.start();
    return informer;
  }

  addController(opts: Omit<ControllerOptions, 'metrics' | 'clock'>): Controller {
    if (this.#controllers.some((c) => c.name === opts.name)) throw new Error(`controller ${opts.name} exists`);
    const c = new Controller({ logger: this.logger, ...opts, metrics: this.metrics, clock: this.#clock });
    this.#controllers.push(c);
    if (this.#leading && !this.#stopping) c.start();
    return c;
  }

  eventRecorder(opts: Omit<EventRecorderOptions, 'client' | 'clock'> & { client?: KubeClient }): EventRecorder {
    const r = new EventRecorder({
      logger: this.logger,
      clock: this.#clock,
      ...opts,
      ...(opts.sink ? {} : { client: opts.client ?? this.client }),
    });
    this.#recorders.push(r);
    return r;
  }

  /** Resolves once the controllers have started (immediately after sync without leader election). */
  elected(): Promise<void> {
    return this.#elected;
  }

  isLeader(): boolean {
    return this.#leading;
  }

  /** Every informer's cache has synced. */
  isReady(): boolean {
    return [...this.#informers.values()].every((i) => i.hasSynced());
  }

  /** No informer is stuck (silent beyond its watchdog's recovery). */
  isHealthy(): boolean {
    return [...this.#informers.values()].every((i) => i.healthy());
  }

  /**
   * Settle signal for tests and tools: resolves once every running controller is idle at the same time (no key
   * queued, no reconcile in flight; delayed requeues do not count), so work one controller hands another is waited
   * for too. A test that expects "nothing happens" after a write first waits until the informer has seen the write,
   * then awaits idle().
   */
  async idle(): Promise<void> {
    for (;;) {
      const running = this.#controllers.filter((c) => c.isStarted());
      if (running.every((c) => c.queue.isIdle())) return;
      await Promise.all(running.map((c) => c.idle()));
    }
  }

  address(): AddressInfo | undefined {
    const a = this.#server?.address();
    return a && typeof a === 'object' ? a : undefined;
  }

  /**
   * Starts HTTP, informers, waits for caches, then starts controllers (after acquiring leadership if enabled).
   * Resolves once caches are synced and the controllers started or the campaign begun; see elected().
   */
  async start(): Promise<void> {
    if (this.#started) throw new Error('manager already started');
    this.#started = true;
    if (this.#opts.http !== false) await this.#listen(this.#opts.http ?? { port: 8080 });

    for (const inf of this.#informers.values()) inf.start();
    const timeout = this.#opts.cacheSyncTimeoutMs ?? 120_000;
    const results = await Promise.all([...this.#informers].map(async ([k, i]) => [k, await i.waitForSync(timeout)]));
    const unsynced = results.filter(([, ok]) => !ok).map(([k]) => k);
    if (unsynced.length > 0) throw new Error(`caches did not sync within ${timeout} ms: ${unsynced.join(', ')}`);
    if (this.#stopping) return;
    this.logger.info({ informers: results.length }, 'caches synced');

    const le = this.#opts.leaderElection;
    if (!le) {
      this.#startControllers();
      return;
    }
    const elector = new LeaderElector({
      ...le,
      ...(le.store ? { store: le.store } : { client: this.client }),
      clock: this.#clock,
      logger: this.logger,
      metrics: this.metrics,
      onStartedLeading: () => this.#startControllers(),
      onStoppedLeading: () => {
        this.#leading = false;
        // Stop all reconciling at once, before anything else can happen.
        if (!this.#stopping) for (const c of this.#controllers) c.abort('leadership lost');
      },
    });
    this.#elector = elector;
    void elector.run().then(async (reason) => {
      if (this.#stopping || reason === 'stopped' || reason === 'never-acquired') return;
      // Aborted reconciles finish their last awaited call; wait for them (bounded well before anyone may lead).
      const boundMs = Math.max(0, (elector.leaseDurationMs - elector.renewDeadlineMs) / 2);
      const settled = await this.#settled(boundMs);
      if (!settled) this.logger.error({ boundMs }, 'aborted reconciles still running after leadership loss');
      this.logger.error({ reason }, 'leadership lost; reconciling stopped');
      try {
        this.#opts.onLeadershipLost?.(reason);
      } catch (err) {
        this.logger.error({ err }, 'onLeadershipLost threw');
      }
    });
  }

  /**
   * Graceful stop: controllers take no new work and in-flight reconciles get deadlineMs to finish (then are
   * aborted); informers stop; the lease is released; pending events are flushed; the HTTP server closes.
   */
  async stop(deadlineMs = this.#opts.gracefulShutdownMs ?? 30_000): Promise<void> {
    if (this.#stopping) return;
    this.#stopping = true;
    this.logger.info({ deadlineMs }, 'stopping');
    const deadline = this.#clock.now() + deadlineMs;
    const drained = await Promise.all(this.#controllers.map((c) => c.stop(deadlineMs)));
    if (drained.includes(false)) this.logger.warn('some reconciles did not finish before the shutdown deadline');
    // Aborted (or earlier abandoned) reconciles may still have a write in flight: the lease is released only once
    // they all have settled (at least 1 s after the abort, at most until the deadline), else it must expire.
    const settled = await this.#settled(Math.max(1000, deadline - this.#clock.now()));
    await Promise.all([...this.#informers.values()].map((i) => i.stop()));
    if (!settled) this.logger.warn('reconciles still running at the shutdown deadline: the lease is not released');
    await this.#elector?.stop({ release: settled });
    this.#leading = false;
    // Pending Event writes get what is left of the deadline: an unreachable API server must not hold up the exit.
    let timer: TimerHandle | undefined;
    const flushed = await Promise.race([
      Promise.all(this.#recorders.map((r) => r.close())).then(() => true),
      new Promise<boolean>((resolve) => {
        timer = this.#clock.setTimer(() => resolve(false), deadline - this.#clock.now());
      }),
    ]);
    timer?.cancel();
    if (!flushed) this.logger.warn('pending events not written before the shutdown deadline');
    await new Promise<void>((resolve) => {
      if (!this.#server) return resolve();
      this.#server.close(() => resolve());
      this.#server.closeAllConnections();
    });
    this.logger.info('stopped');
  }

  /** True once no reconcile of any controller is running (abandoned ones included), false after timeoutMs. */
  async #settled(timeoutMs: number): Promise<boolean> {
    const results = await Promise.all(this.#controllers.map((c) => c.settled(timeoutMs)));
    return results.every(Boolean);
  }

  #startControllers(): void {
    if (this.#stopping) return;
    this.#leading = true;
    for (const c of this.#controllers) c.start();
    this.#electedResolve?.();
  }

  async #listen(cfg: { port: number; host?: string }): Promise<void> {
    const server = createServer((req, res) => {
      void this.#handle(req, res);
    });
    this.#server = server;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(cfg.port, cfg.host, () => {
        server.off('error', reject);
        resolve();
      });
    });
  }

  async #handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const path = (req.url ?? '/').split('?')[0];
    const reply = (code: number, body: string, type = 'text/plain; charset=utf-8') => {
      res.writeHead(code, { 'Content-Type': type });
      res.end(body);
    };
    try {
      if (req.method !== 'GET' && req.method !== 'HEAD') return reply(405, 'method not allowed\n');
      switch (path) {
        case '/metrics':
          return reply(200, await this.registry.metrics(), this.registry.contentType);
        case '/healthz': {
          const bad = [...this.#informers].filter(([, i]) => !i.healthy()).map(([k]) => k);
          return bad.length === 0 ? reply(200, 'ok\n') : reply(500, `informers not healthy: ${bad.join(', ')}\n`);
        }
        case '/readyz': {
          const bad = [...this.#informers].filter(([, i]) => !i.hasSynced()).map(([k]) => k);
          return bad.length === 0 ? reply(200, 'ok\n') : reply(500, `informers not synced: ${bad.join(', ')}\n`);
        }
        default:
          return reply(404, 'not found\n');
      }
    } catch (err) {
      this.logger.error({ err, path }, 'http handler failed');
      reply(500, 'internal error\n');
    }
  }
}

export interface SignalOptions {
  /** Default process.exit. */
  exit?: (code: number) => void;
  /** Default: the manager's graceful shutdown deadline. */
  deadlineMs?: number;
  signals?: NodeJS.Signals[];
}

/**
 * SIGTERM/SIGINT -> manager.stop() -> exit(0); a second signal exits(1) at once. Returns a function removing the
 * handlers.
 */
export function handleSignals(manager: Manager, opts: SignalOptions = {}): () => void {
  const exit = opts.exit ?? ((code: number) => process.exit(code));
  const signals = opts.signals ?? ['SIGTERM', 'SIGINT'];
  let received = false;
  const handler = (sig: NodeJS.Signals) => {
    if (received) {
      manager.logger.warn({ signal: sig }, 'second signal; exiting now');
      exit(1);
      return;
    }
    received = true;
    manager.logger.info({ signal: sig }, 'signal received; shutting down');
    manager.stop(opts.deadlineMs).then(
      () => exit(0),
      (err: unknown) => {
        manager.logger.error({ err }, 'shutdown failed');
        exit(1);
      },
    );
  };
  for (const s of signals) process.on(s, handler);
  return () => {
    for (const s of signals) process.off(s, handler);
  };
}
