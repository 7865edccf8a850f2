// Rate limiters for the work queue, modelled on client-go's workqueue limiters as used by controller-runtime.

import { type Clock, systemClock } from './clock.ts';

export interface RateLimiter {
  /** Delay in ms before the item should be processed again; records one more failure for it. */
  when(item: string): number;
  /** Clears the item's failure history. */
  forget(item: string): void;
  /** Failures recorded for the item since the last forget. */
  numRequeues(item: string): number;
}

export interface ExponentialBackoffOptions {
  /** First delay (default 5 ms). */
  baseDelayMs?: number;
  /** Upper bound (default 1000 s). */
  maxDelayMs?: number;
  /** Adds up to this fraction of the delay at random (default 0: exact sequence). */
  jitter?: number;
  random?: () => number;
}

/** Per-item exponential backoff: base * 2^failures, capped at max. */
export class ItemExponentialRateLimiter implements RateLimiter {
  readonly #base: number;
  readonly #max: number;
  readonly #jitter: number;
  readonly #random: () => number;
  readonly #failures = new Map<string, number>();

  constructor(opts: ExponentialBackoffOptions = {}) {
    this.#base = opts.baseDelayMs ?? 5;
    this.#max = opts.maxDelayMs ?? 1_000_000;
    this.#jitter = opts.jitter ?? 0;
    this.#random = opts.random ?? Math.random;
    if (this.#base <= 0 || this.#max < this.#base) throw new Error('backoff needs 0 < baseDelayMs <= maxDelayMs');
  }

  when(item: string): number {
    const exp = this.#failures.get(item) ?? 0;
    this.#failures.set(item, exp + 1);
    const delay = Math.min(this.#base * 2 ** exp, this.#max);
    if (this.#jitter <= 0) return delay;
    return Math.min(delay + delay * this.#jitter * this.#random(), this.#max);
  }

  forget(item: string): void {
    this.#failures.delete(item);
  }

  numRequeues(item: string): number {
    return this.#failures.get(item) ?? 0;
  }
}

export interface TokenBucketOptions {
  /** Tokens added per second (default 10). */
  qps?: number;
  /** Bucket size (default 100). */
  burst?: number;
  clock?: Clock;
}

/**
 * Overall token bucket shared by all items (golang.org/x/time/rate reservation semantics): each call takes a token,
 * the bucket may go into debt, and the returned delay is how long until that token exists.
 */
export class TokenBucketRateLimiter implements RateLimiter {
  readonly #qps: number;
  readonly #burst: number;
  readonly #clock: Clock;
  #tokens: number;
  #last: number;

  constructor(opts: TokenBucketOptions = {}) {
    this.#qps = opts.qps ?? 10;
    this.#burst = opts.burst ?? 100;
    this.#clock = opts.clock ?? systemClock;
    if (this.#qps <= 0 || this.#burst < 1) throw new Error('token bucket needs qps > 0 and burst >= 1');
    this.#tokens = this.#burst;
    this.#last = this.#clock.now();
  }

  when(_item: string): number {
    const now = this.#clock.now();
    this.#tokens = Math.min(this.#burst, this.#tokens + ((now - this.#last) / 1000) * this.#qps);
    this.#last = now;
    this.#tokens -= 1;
    return this.#tokens >= 0 ? 0 : (-this.#tokens / this.#qps) * 1000;
  }

  forget(_item: string): void {}

  numRequeues(_item: string): number {
    return 0;
  }
}

/** Combines limiters: the delay is the largest of theirs. */
export class MaxOfRateLimiter implements RateLimiter {
  readonly #limiters: RateLimiter[];

  constructor(...limiters: RateLimiter[]) {
    if (limiters.length === 0) throw new Error('MaxOfRateLimiter needs at least one limiter');
    this.#limiters = limiters;
  }

  when(item: string): number {
    let delay = 0;
    for (const l of this.#limiters) delay = Math.max(delay, l.when(item));
    return delay;
  }

  forget(item: string): void {
    for (const l of this.#limiters) l.forget(item);
  }

  numRequeues(item: string): number {
    let n = 0;
    for (const l of this.#limiters) n = Math.max(n, l.numRequeues(item));
    return n;
  }
}

export interface DefaultRateLimiterOptions extends ExponentialBackoffOptions, TokenBucketOptions {}

/** controller-runtime's default: per-item 5 ms -> 1000 s backoff, combined with a 10 qps / 100 burst bucket. */
export function defaultControllerRateLimiter(opts: DefaultRateLimiterOptions = {}): RateLimiter {
  return new MaxOfRateLimiter(new ItemExponentialRateLimiter(opts), new TokenBucketRateLimiter(opts));
}
