// A rate-limited, deduplicating work queue over string keys (the semantics of client-go's workqueue):
//  - dirty set: a key waits in the queue at most once however often it is added;
//  - processing set: a key handed out by get() is not handed out again until done(); adds meanwhile are parked
//    and the key is re-queued by done();
//  - addAfter/addRateLimited delay an add; forget clears the key's backoff.
// Unlike client-go, once shut down get() hands out nothing more: queued keys are dropped (the next start
// relists and re-queues everything), only keys already being processed may finish.

import { type Clock, systemClock, type TimerHandle } from './clock.ts';
import { noopQueueMetrics, type QueueMetricsSink, type QueueProgress } from './metrics.ts';
import { defaultControllerRateLimiter, type RateLimiter } from './ratelimit.ts';

export interface WorkQueueOptions {
  name?: string;
  rateLimiter?: RateLimiter;
  clock?: Clock;
  metrics?: QueueMetricsSink;
}

export class WorkQueue implements QueueProgress {
  readonly name: string;
  readonly #limiter: RateLimiter;
  readonly #clock: Clock;
  readonly #metrics: QueueMetricsSink;
  /** Ready keys in FIFO order (a Set keeps insertion order). */
  readonly #queue = new Set<string>();
  readonly #dirty = new Set<string>();
  /** key -> time processing started */
  readonly #processing = new Map<string, number>();
  /** key -> time it was added (for queue duration) */
  readonly #addedAt = new Map<string, number>();
  /** key -> time it becomes ready */
  readonly #waiting = new Map<string, number>();
  #waitTimer: { handle: TimerHandle; at: number } | undefined;
  readonly #getters: Array<(key: string | undefined) => void> = [];
  readonly #drainWaiters: Array<() => void> = [];
  readonly #idleWaiters: Array<() => void> = [];
  #shuttingDown = false;

  constructor(opts: WorkQueueOptions = {}) {
    this.name = opts.name ?? 'queue';
    this.#clock = opts.clock ?? systemClock;
    this.#limiter = opts.rateLimiter ?? defaultControllerRateLimiter({ clock: this.#clock });
    this.#metrics = opts.metrics ?? noopQueueMetrics;
  }

  /** Queues key unless it is already queued; parked until done() if it is being processed. */
  add(key: string): void {
    if (this.#shuttingDown || this.#dirty.has(key)) return;
    this.#metrics.add();
    this.#dirty.add(key);
    if (!this.#addedAt.has(key)) this.#addedAt.set(key, this.#clock.now());
    if (this.#processing.has(key)) return;
    this.#enqueue(key);
  }

  /** Adds key after ms; if it is already waiting, the earlier time wins. */
  addAfter(key: string, ms: number): void {
    if (this.#shuttingDown) return;
    if (!(ms > 0)) {
      this.add(key);
      return;
    }
    const at = this.#clock.now() + ms;
    const existing = this.#waiting.get(key);
    if (existing !== undefined && existing <= at) return;
    this.#waiting.set(key, at);
    this.#armWaitTimer();
  }

  /** Adds key after the rate limiter's delay for it (its backoff grows until forget). */
  addRateLimited(key: string): void {
    if (this.#shuttingDown) return;
    this.#metrics.retry();
    this.addAfter(key, this.#limiter.when(key));
  }

  forget(key: string): void {
    this.#limiter.forget(key);
  }

  numRequeues(key: string): number {
    return this.#limiter.numRequeues(key);
  }

  /** Next key to process, waiting if none is ready; undefined once the queue is shut down. */
  get(): Promise<string | undefined> {
    if (this.#shuttingDown) return Promise.resolve(undefined);
    const key = this.#pop();
    if (key !== undefined) return Promise.resolve(key);
    return new Promise((resolve) => this.#getters.push(resolve));
  }

  /** Marks key processed: a parked add re-queues it. */
  done(key: string): void {
    const started = this.#processing.get(key);
    if (started === undefined) return;
    this.#processing.delete(key);
    this.#metrics.workDuration((this.#clock.now() - started) / 1000);
    if (this.#shuttingDown) {
      if (this.#processing.size === 0) for (const w of this.#drainWaiters.splice(0)) w();
      this.#notifyIdle();
      return;
    }
    if (this.#dirty.has(key)) this.#enqueue(key);
    this.#notifyIdle();
  }

  /** Stops intake: adds are ignored, queued and waiting keys dropped, blocked get() calls resolve undefined. */
  shutDown(): void {
    if (this.#shuttingDown) return;
    this.#shuttingDown = true;
    this.#waitTimer?.handle.cancel();
    this.#waitTimer = undefined;
    this.#waiting.clear();
    for (const key of this.#queue) this.#addedAt.delete(key);
    this.#queue.clear();
    this.#dirty.clear();
    this.#metrics.depth(0);
    for (const g of this.#getters.splice(0)) g(undefined);
    if (this.#processing.size === 0) for (const w of this.#drainWaiters.splice(0)) w();
    this.#notifyIdle();
  }

  /** shutDown, then wait until every key being processed is done() or deadlineMs passes; true if drained. */
  async shutDownWithDrain(deadlineMs: number): Promise<boolean> {
    this.shutDown();
    if (this.#processing.size === 0) return true;
    let timer: TimerHandle | undefined;
    const drained = await Promise.race([
      new Promise<boolean>((resolve) => this.#drainWaiters.push(() => resolve(true))),
      new Promise<boolean>((resolve) => {
        timer = this.#clock.setTimer(() => resolve(false), deadlineMs);
      }),
    ]);
    timer?.cancel();
    return drained;
  }

  isShuttingDown(): boolean {
    return this.#shuttingDown;
  }

  /** Keys ready to be handed out. */
  len(): number {
    return this.#queue.size;
  }

  /** Keys waiting for addAfter/addRateLimited. */
  waitingLen(): number {
    return this.#waiting.size;
  }

  processingLen(): number {
    return this.#processing.size;
  }

  isProcessing(key: string): boolean {
    return this.#processing.has(key);
  }

  unfinishedWorkSeconds(): number {
    const now = this.#clock.now();
    let total = 0;
    for (const started of this.#processing.values()) total += now - started;
    return total / 1000;
  }

  longestRunningProcessorSeconds(): number {
    const now = this.#clock.now();
    let longest = 0;
    for (const started of this.#processing.values()) longest = Math.max(longest, now - started);
    return longest / 1000;
  }

  /**
   * Nothing is ready to be handed out and nothing is being processed. Keys delayed by addAfter/addRateLimited are
   * future work and do not count (see waitingLen()).
   */
  isIdle(): boolean {
    return this.#queue.size === 0 && this.#processing.size === 0;
  }

  /** Resolves once isIdle() holds (at once if it does now). */
  whenIdle(): Promise<void> {
    if (this.isIdle()) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  #notifyIdle(): void {
    if (this.#idleWaiters.length > 0 && this.isIdle()) for (const w of this.#idleWaiters.splice(0)) w();
  }

  #enqueue(key: string): void {
    const getter = this.#getters.shift();
    if (getter) {
      this.#queue.add(key);
      getter(this.#pop());
      return;
    }
    this.#queue.add(key);
    this.#metrics.depth(this.#queue.size);
  }

  #pop(): string | undefined {
    const next = this.#queue.values().next();
    if (next.done) return undefined;
    const key = next.value;
    this.#queue.delete(key);
    this.#dirty.delete(key);
    const now = this.#clock.now();
    this.#processing.set(key, now);
    const added = this.#addedAt.get(key);
    this.#addedAt.delete(key);
    if (added !== undefined) this.#metrics.queueDuration((now - added) / 1000);
    this.#metrics.depth(this.#queue.size);
    return key;
  }

  #armWaitTimer(): void {
    let earliest = Number.POSITIVE_INFINITY;
    for (const at of this.#waiting.values()) earliest = Math.min(earliest, at);
    if (earliest === Number.POSITIVE_INFINITY) {
      this.#waitTimer?.handle.cancel();
      this.#waitTimer = undefined;
      return;
    }
    if (this.#waitTimer && this.#waitTimer.at <= earliest) return;
    this.#waitTimer?.handle.cancel();
    const handle = this.#clock.setTimer(() => this.#fireWaiting(), earliest - this.#clock.now());
    this.#waitTimer = { handle, at: earliest };
  }

  #fireWaiting(): void {
    this.#waitTimer = undefined;
    if (this.#shuttingDown) return;
    const now = this.#clock.now();
    const ready = [...this.#waiting].filter(([, at]) => at <= now).sort((a, b) => a[1] - b[1]);
    for (const [key] of ready) {
      this.#waiting.delete(key);
      this.add(key);
    }
    this.#armWaitTimer();
  }
}
