import { describe, expect, it } from 'vitest';
import { FakeClock } from './clock.ts';
import {
  defaultControllerRateLimiter,
  ItemExponentialRateLimiter,
  MaxOfRateLimiter,
  TokenBucketRateLimiter,
} from './ratelimit.ts';

describe('ItemExponentialRateLimiter', () => {
  it('doubles from 5 ms per failure and caps at 1000 s by default', () => {
    const l = new ItemExponentialRateLimiter();
    const seq = Array.from({ length: 5 }, () => l.when('a'));
    expect(seq).toEqual([5, 10, 20, 40, 80]);
    for (let i = 0; i < 30; i++) l.when('a');
    expect(l.when('a')).toBe(1_000_000);
    expect(l.numRequeues('a')).toBe(36);
  });

  it('tracks items independently and forget resets one item', () => {
    const l = new ItemExponentialRateLimiter({ baseDelayMs: 100, maxDelayMs: 350 });
    expect([l.when('a'), l.when('a'), l.when('a'), l.when('a')]).toEqual([100, 200, 350, 350]);
    expect(l.when('b')).toBe(100);
    l.forget('a');
    expect(l.numRequeues('a')).toBe(0);
    expect(l.when('a')).toBe(100);
    expect(l.numRequeues('b')).toBe(1);
  });

  it('adds bounded jitter when asked', () => {
    const l = new ItemExponentialRateLimiter({ baseDelayMs: 100, jitter: 0.5, random: () => 1 });
    expect(l.when('a')).toBe(150);
    expect(l.when('a')).toBe(300);
  });

  it('rejects nonsensical settings', () => {
    expect(() => new ItemExponentialRateLimiter({ baseDelayMs: 0 })).toThrow();
    expect(() => new ItemExponentialRateLimiter({ baseDelayMs: 10, maxDelayMs: 5 })).toThrow();
  });
});

describe('TokenBucketRateLimiter', () => {
  it('allows a burst, then spaces items at 1/qps, refilling over time', async () => {
    const clock = new FakeClock();
    const l = new TokenBucketRateLimiter({ qps: 10, burst: 3, clock });
    expect([l.when('a'), l.when('b'), l.when('c')]).toEqual([0, 0, 0]);
    // In debt: the 4th token exists in 100 ms, the 5th in 200 ms.
    expect(l.when('d')).toBeCloseTo(100);
    expect(l.when('e')).toBeCloseTo(200);
    await clock.advance(100); // one token repaid: still in debt by one
    expect(l.when('f')).toBeCloseTo(200);
    await clock.advance(10_000); // refilled, but never beyond the burst
    expect([l.when('g'), l.when('h'), l.when('i')]).toEqual([0, 0, 0]);
    expect(l.when('j')).toBeCloseTo(100);
  });
});

describe('MaxOfRateLimiter / default controller limiter', () => {
  it('takes the larger delay: per-item backoff until the bucket runs dry', () => {
    const clock = new FakeClock();
    const l = defaultControllerRateLimiter({ clock });
    expect([l.when('x'), l.when('x'), l.when('x')]).toEqual([5, 10, 20]);
    // Drain the 100-token bucket with other items (each first failure = 5 ms).
    for (let i = 0; i < 97; i++) expect(l.when(`k${i}`)).toBe(5);
    // Bucket empty: a fresh item now waits 1/qps = 100 ms rather than 5 ms.
    expect(l.when('fresh')).toBeCloseTo(100);
    l.forget('x');
    expect(l.numRequeues('x')).toBe(0);
  });

  it('numRequeues is the max over limiters', () => {
    const a = new ItemExponentialRateLimiter();
    const m = new MaxOfRateLimiter(a, new TokenBucketRateLimiter({ clock: new FakeClock() }));
    m.when('k');
    m.when('k');
    expect(m.numRequeues('k')).toBe(2);
    expect(() => new MaxOfRateLimiter()).toThrow();
  });
});
