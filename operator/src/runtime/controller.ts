// A controller in the controller-runtime mould: event sources map objects to `namespace/name` keys in a
// deduplicating rate-limited work queue; workers call reconcile(request) for each key, level-triggered.
//   throw            -> requeued with per-key exponential backoff (addRateLimited)
//   TerminalError    -> not retried (until the next event), counted in terminal errors
//   {requeueAfter}   -> backoff forgotten, key re-added after that many ms
//   {requeue: true}  -> requeued with backoff, without counting an error
//   anything else    -> success: backoff forgotten
// A key is never reconciled by two workers at once.

import { randomUUID } from 'node:crypto';
import type { KubernetesObject } from '@kubernetes/client-node';
import type { Logger } from 'pino';
import { controllerOf, runWithSignal } from './client.ts';
import { type Clock, systemClock, type TimerHandle } from './clock.ts';
import { type EventSource, objectKey, splitKey } from './informer.ts';
import { silentLogger } from './log.ts';
import {
  type ControllerMetricsSink,
  noopControllerMetrics,
  type ReconcileResultLabel,
  type RuntimeMetrics,
} from './metrics.ts';
import type { RateLimiter } from './ratelimit.ts';
import { WorkQueue } from './workqueue.ts';

export interface Request {
  namespace?: string;
  name: string;
}

export interface ReconcileContext {
  controller: string;
  /** `namespace/name` (or `name`). */
  key: string;
  reconcileID: string;
  /** Logger carrying controller, key and reconcileID on every line. */
  log: Logger;
  /** Aborted on reconcile timeout, leadership loss or forced stop: pass it to API calls and stop early. */
  signal: AbortSignal;
}

export type ReconcileResult = { requeueAfter?: number; requeue?: boolean } | undefined;

export type Reconciler = (req: Request, ctx: ReconcileContext) => Promise<ReconcileResult | undefined>;

/** An error that retrying cannot fix (e.g. invalid spec): the key is not requeued until its next event. */
export class TerminalError extends Error {
  override name = 'TerminalError';
}

export function isTerminalError(err: unknown): boolean {
  for (let e = err, i = 0; e instanceof Error && i < 10; e = e.cause, i++) {
    if (e instanceof TerminalError) return true;
  }
  return false;
}

export class ReconcileTimeoutError extends Error {
  override name = 'ReconcileTimeoutError';
}

export interface ControllerOptions {
  name: string;
  reconcile: Reconciler;
  /** Workers (default 1). */
  maxConcurrentReconciles?: number;
  /** Abort and count as an error after this long (default 0: no timeout). */
  reconcileTimeoutMs?: number;
  /** Default: 5 ms .. 1000 s per key, 10 qps / 100 burst overall. */
  rateLimiter?: RateLimiter;
  logger?: Logger;
  metrics?: RuntimeMetrics;
  clock?: Clock;
}

export interface ForOptions<T> {
  /** Filters updates (old === new on resyncs); adds and deletes always pass. */
  updatePredicate?: (oldObj: T, newObj: T) => boolean;
}

/** Passes resyncs and updates that changed metadata.generation (i.e. spec), ignoring status-only writes. */
export function generationChanged<T extends KubernetesObject>(oldObj: T, newObj: T): boolean {
  return oldObj === newObj || oldObj.metadata?.generation !== newObj.metadata?.generation;
}

function groupOf(apiVersion: string): string {
  const i = apiVersion.indexOf('/');
  return i < 0 ? '' : apiVersion.slice(0, i);
}

function keyOf(req: Request | string): string {
  if (typeof req === 'string') return req;
  return req.namespace ? `${req.namespace}/${req.name}` : req.name;
}

export class Controller {
  readonly name: string;
  readonly queue: WorkQueue;
  readonly maxConcurrentReconciles: number;
  readonly #reconcile: Reconciler;
  readonly #timeoutMs: number;
  readonly #log: Logger;
  readonly #metrics: ControllerMetricsSink;
  readonly #clock: Clock;
  readonly #unregister: Array<() => void> = [];
  readonly #inflight = new Set<AbortController>();
  /** Every reconcile that has not settled yet, including ones abandoned after a timeout or an abort. */
  readonly #unsettled = new Set<Promise<unknown>>();
  #workers: Promise<void>[] = [];
  #started = false;
  #stopping = false;
  #queueMetricsUnregister: (() => void) | undefined;

  constructor(opts: ControllerOptions) {
    if (!opts.name) throw new Error('controller needs a name');
    this.name = opts.name;
    this.#reconcile = opts.reconcile;
    this.maxConcurrentReconciles = Math.max(1, opts.maxConcurrentReconciles ?? 1);
    this.#timeoutMs = opts.reconcileTimeoutMs ?? 0;
    this.#clock = opts.clock ?? systemClock;
    this.#log = (opts.logger ?? silentLogger()).child({ controller: this.name });
    this.#metrics = opts.metrics?.controller(this.name) ?? noopControllerMetrics;
    const qm = opts.metrics?.queue(this.name, this.name, {
      unfinishedWorkSeconds: () => this.queue.unfinishedWorkSeconds(),
      longestRunningProcessorSeconds: () => this.queue.longestRunningProcessorSeconds(),
    });
    this.#queueMetricsUnregister = qm?.unregister;
    this.queue = new WorkQueue({
      name: this.name,
      clock: this.#clock,
      ...(opts.rateLimiter ? { rateLimiter: opts.rateLimiter } : {}),
      ...(qm ? { metrics: qm.sink } : {}),
    });
  }

  /** The primary resource: each object's own key is reconciled. */
  for<T extends KubernetesObject>(source: EventSource<T>, opts: ForOptions<T> = {}): this {
    const pred = opts.updatePredicate;
    this.#unregister.push(
      source.addEventHandler({
        onAdd: (o) => this.queue.add(objectKey(o)),
        onUpdate: (old, o) => {
          if (!pred || pred(old, o)) this.queue.add(objectKey(o));
        },
        onDelete: (o) => this.queue.add(objectKey(o)),
      }),
    );
    return this;
  }

  /**
   * Children: an event on a child enqueues the owner named by its controller ownerReference, if that owner has the
   * given apiVersion's group and kind. Owners are assumed namespaced (in the child's namespace) unless
   * ownerNamespaced is false.
   */
  owns<T extends KubernetesObject>(
    source: EventSource<T>,
    owner: { apiVersion: string; kind: string },
    opts: { ownerNamespaced?: boolean } = {},
  ): this {
    const group = groupOf(owner.apiVersion);
    return this.watches(source, (obj: T) => {
      const ref = controllerOf(obj);
      if (!ref || ref.kind !== owner.kind || groupOf(ref.apiVersion) !== group) return [];
      const namespace = opts.ownerNamespaced === false ? undefined : obj.metadata?.namespace;
      return [{ ...(namespace ? { namespace } : {}), name: ref.name }];
    });
  }

  /** Any source: map each object to the keys to reconcile (on updates, old and new object both map). */
  watches<T extends KubernetesObject>(source: EventSource<T>, map: (obj: T) => ReadonlyArray<Request | string>): this {
    const enqueue = (obj: T) => {
      let reqs: ReadonlyArray<Request | string> = [];
      try {
        reqs = map(obj);
      } catch (err) {
        this.#log.error({ err, object: objectKey(obj) }, 'watch map function threw');
      }
      for (const r of reqs) this.queue.add(keyOf(r));
    };
    this.#unregister.push(
      source.addEventHandler({
        onAdd: enqueue,
        onUpdate: (old, o) => {
          if (old !== o) enqueue(old);
          enqueue(o);
        },
        onDelete: enqueue,
      }),
    );
    return this;
  }

  enqueue(req: Request | string): void {
    this.queue.add(keyOf(req));
  }

  /** Starts the workers (idempotent). */
  start(): void {
    if (this.#started || this.#stopping) return;
    this.#started = true;
    this.#metrics.maxConcurrent(this.maxConcurrentReconciles);
    this.#log.info({ workers: this.maxConcurrentReconciles }, 'starting workers');
    for (let i = 0; i < this.maxConcurrentReconciles; i++) this.#workers.push(this.#worker());
  }

  /**
   * Graceful stop: no new keys are taken, in-flight reconciles get deadlineMs to finish, then they are aborted.
   * Resolves true if they all finished in time.
   */
  async stop(deadlineMs = 30_000): Promise<boolean> {
    this.#beginStop();
    const drained = await this.queue.shutDownWithDrain(deadlineMs);
    if (!drained) this.#abortInflight('controller stop deadline exceeded');
    this.#queueMetricsUnregister?.();
    return drained;
  }

  /** Immediate stop (leadership lost): aborts every in-flight reconcile's signal and stops the workers. */
  abort(reason = 'controller aborted'): void {
    this.#beginStop();
    this.queue.shutDown();
    this.#abortInflight(reason);
    this.#queueMetricsUnregister?.();
  }

  /** Resolves when every worker loop has exited (after stop/abort). */
  async done(): Promise<void> {
    await Promise.all(this.#workers);
  }

  activeReconciles(): number {
    return this.#inflight.size;
  }

  /** Reconciles that have not settled, counting those abandoned after a timeout or an abort. */
  unsettledReconciles(): number {
    return this.#unsettled.size;
  }

  /**
   * Resolves true once no reconcile of this controller is running any more (abandoned ones included), false if
   * some are still running after timeoutMs. Until then an aborted reconcile may still have a write in flight.
   */
  async settled(timeoutMs: number): Promise<boolean> {
    if (this.#unsettled.size === 0) return true;
    let timer: TimerHandle | undefined;
    const timedOut = new Promise<false>((resolve) => {
      timer = this.#clock.setTimer(() => resolve(false), timeoutMs);
    });
    const all = (async () => {
      while (this.#unsettled.size > 0) await Promise.all([...this.#unsettled]);
      return true as const;
    })();
    const ok = await Promise.race([all, timedOut]);
    timer?.cancel();
    return ok;
  }

  isStarted(): boolean {
    return this.#started && !this.#stopping;
  }

  /**
   * Settle signal for tests and tools: resolves once no key is queued and no reconcile is in flight (an abandoned,
   * timed-out reconcile counts until it settles). Delayed requeues (requeueAfter, backoff) are future work and do not
   * count.
   */
  idle(): Promise<void> {
    return this.queue.whenIdle();
  }

  #beginStop(): void {
    if (this.#stopping) return;
    this.#stopping = true;
    for (const u of this.#unregister.splice(0)) u();
  }

  #abortInflight(reason: string): void {
    for (const ac of this.#inflight) ac.abort(new Error(reason));
  }

  async #worker(): Promise<void> {
    for (;;) {
      const key = await this.queue.get();
      if (key === undefined) return;
      await this.#process(key);
    }
  }

  async #process(key: string): Promise<void> {
    const reconcileID = randomUUID();
    const req = splitKey(key);
    const log = this.#log.child({ key, reconcileID });
    const ac = new AbortController();
    this.#inflight.add(ac);
    this.#metrics.activeWorkers(1);
    const start = this.#clock.now();
    const ctx: ReconcileContext = { controller: this.name, key, reconcileID, log, signal: ac.signal };

    type Outcome = { kind: 'ok'; result: ReconcileResult } | { kind: 'err'; err: unknown } | { kind: 'timeout' };
    // Every API call the reconcile makes through KubeClient honours its signal (see runWithSignal).
    const settled: Promise<Outcome> = runWithSignal(ac.signal, async () => this.#reconcile(req, ctx)).then(
      (result) => ({ kind: 'ok', result: result ?? undefined }),
      (err: unknown) => ({ kind: 'err', err }),
    );
    this.#unsettled.add(settled);
    void settled.then(() => this.#unsettled.delete(settled));
    let timer: TimerHandle | undefined;
    const racers: Promise<Outcome>[] = [settled];
    if (this.#timeoutMs > 0) {
      racers.push(
        new Promise<Outcome>((resolve) => {
          timer = this.#clock.setTimer(() => resolve({ kind: 'timeout' }), this.#timeoutMs);
        }),
      );
    }
    const outcome = await Promise.race(racers);
    timer?.cancel();
    const seconds = (this.#clock.now() - start) / 1000;
    let label: ReconcileResultLabel;

    try {
      if (outcome.kind === 'ok') {
        const r = outcome.result;
        if (r?.requeueAfter !== undefined && r.requeueAfter > 0) {
          this.queue.forget(key);
          this.queue.addAfter(key, r.requeueAfter);
          label = 'requeue_after';
          log.debug({ requeueAfterMs: r.requeueAfter }, 'reconcile done, requeueing after delay');
        } else if (r?.requeue) {
          this.queue.addRateLimited(key);
          label = 'requeue';
          log.debug('reconcile done, requeueing');
        } else {
          this.queue.forget(key);
          label = 'success';
          log.debug('reconcile succeeded');
        }
      } else {
        label = 'error';
        this.#metrics.error();
        let err: unknown;
        if (outcome.kind === 'timeout') {
          this.#metrics.timeout();
          err = new ReconcileTimeoutError(`reconcile exceeded ${this.#timeoutMs} ms`);
          ac.abort(err);
        } else {
          err = outcome.err;
          if (!(err instanceof Error)) {
            this.#metrics.panic();
            err = new Error(`reconcile threw a non-Error value: ${String(err)}`, { cause: err });
          }
        }
        if (this.#stopping && ac.signal.aborted) {
          log.info({ err }, 'reconcile aborted while stopping');
        } else if (isTerminalError(err)) {
          this.#metrics.terminalError();
          this.queue.forget(key);
          log.error({ err }, 'reconciler terminal error (not retried)');
        } else {
          this.queue.addRateLimited(key);
          log.error({ err, retries: this.queue.numRequeues(key) }, 'reconciler error');
        }
      }
      this.#metrics.reconcile(label, seconds);
    } finally {
      this.#inflight.delete(ac);
      this.#metrics.activeWorkers(-1);
      if (outcome.kind === 'timeout') {
        // The worker moves on, but the key stays "processing" until the abandoned reconcile settles, so it is
        // never run twice at once; the rate-limited re-add is parked until then.
        void settled.then(() => this.queue.done(key));
      } else {
        this.queue.done(key);
      }
    }
  }
}
