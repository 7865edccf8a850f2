import { describe, expect, it } from 'vitest';
import { FakeClock, flushMicrotasks } from './clock.ts';
import type { QueueMetricsSink } from './metrics.ts';
import { ItemExponentialRateLimiter } from './ratelimit.ts';
import { WorkQueue } from './workqueue.ts';

function recordingMetrics() {
  const m = { adds: 0, retries: 0, depth: [] as number[], queue: [] as number[], work: [] as number[] };
  const sink: QueueMetricsSink = {
    add: () => m.adds++,
    retry: () => m.retries++,
    depth: (n) => m.depth.push(n),
    queueDuration: (s) => m.queue.push(s),
    workDuration: (s) => m.work.push(s),
  };
  return { m, sink };
}

/** Resolves the value of a promise if it settled already, else 'pending'. */
async function peek<T>(p: Promise<T>): Promise<T | 'pending'> {
  return Promise.race([p, flushMicrotasks().then(() => 'pending' as const)]);
}

describe('WorkQueue', () => {
  it('deduplicates: a key is queued once however many adds', async () => {
    const q = new WorkQueue({ clock: new FakeClock() });
    q.add('a');
    q.add('b');
    q.add('a');
    q.add('a');
    expect(q.len()).toBe(2);
    expect(await q.get()).toBe('a');
    expect(await q.get()).toBe('b');
    expect(q.len()).toBe(0);
  });

  it('never hands one key to two workers; an add while processing is parked and re-queued on done', async () => {
    const q = new WorkQueue({ clock: new FakeClock() });
    q.add('a');
    expect(await q.get()).toBe('a');
    q.add('a'); // parked: a is being processed
    q.add('a');
    expect(q.len()).toBe(0);
    const second = q.get();
    expect(await peek(second)).toBe('pending');
    q.add('b');
    expect(await second).toBe('b'); // another key is not blocked
    q.done('a');
    expect(q.len()).toBe(1);
    expect(await q.get()).toBe('a');
    q.done('a');
    q.done('b');
    expect(q.len()).toBe(0);
    expect(q.processingLen()).toBe(0);
  });

  it('get waits for an add and hands distinct keys to concurrent getters', async () => {
    const q = new WorkQueue({ clock: new FakeClock() });
    const g1 = q.get();
    const g2 = q.get();
    expect(await peek(g1)).toBe('pending');
    q.add('x');
    q.add('x');
    q.add('y');
    expect(await g1).toBe('x');
    expect(await g2).toBe('y');
  });

  it('addAfter delivers in due-time order, keeps the earlier time, and dedups with add', async () => {
    const clock = new FakeClock();
    const q = new WorkQueue({ clock });
    q.addAfter('late', 300);
    q.addAfter('early', 100);
    q.addAfter('mid', 200);
    q.addAfter('mid', 250); // later request: earlier time wins
    q.addAfter('late', 150); // earlier request replaces
    expect(q.len()).toBe(0);
    expect(q.waitingLen()).toBe(3);
    await clock.advance(99);
    expect(q.len()).toBe(0);
    await clock.advance(1);
    expect(q.len()).toBe(1);
    await clock.advance(100);
    expect(q.len()).toBe(3);
    expect([await q.get(), await q.get(), await q.get()]).toEqual(['early', 'late', 'mid']);
    q.addAfter('now', 0);
    expect(q.len()).toBe(1);
  });

  it('addRateLimited backs off per key until forget, counting retries', async () => {
    const clock = new FakeClock();
    const { m, sink } = recordingMetrics();
    const q = new WorkQueue({ clock, metrics: sink, rateLimiter: new ItemExponentialRateLimiter({ baseDelayMs: 10 }) });
    const readyAfter = async (key: string): Promise<number> => {
      const start = clock.now();
      q.addRateLimited(key);
      while (q.len() === 0) await clock.advance(1);
      const k = await q.get();
      q.done(k!);
      return clock.now() - start;
    };
    expect([await readyAfter('a'), await readyAfter('a'), await readyAfter('a')]).toEqual([10, 20, 40]);
    expect(q.numRequeues('a')).toBe(3);
    q.forget('a');
    expect(await readyAfter('a')).toBe(10);
    expect(m.retries).toBe(4);
  });

  it('reports adds, depth, queue and work durations, unfinished work and longest processor', async () => {
    const clock = new FakeClock();
    const { m, sink } = recordingMetrics();
    const q = new WorkQueue({ clock, metrics: sink });
    q.add('a');
    q.add('a');
    q.add('b');
    expect(m.adds).toBe(2);
    expect(m.depth.at(-1)).toBe(2);
    await clock.advance(500);
    await q.get();
    expect(m.queue).toEqual([0.5]);
    await clock.advance(1000);
    await q.get();
    await clock.advance(2000);
    expect(q.longestRunningProcessorSeconds()).toBe(3);
    expect(q.unfinishedWorkSeconds()).toBe(5); // a: 3 s, b: 2 s
    q.done('a');
    expect(m.work).toEqual([3]);
    expect(m.depth.at(-1)).toBe(0);
  });

  it('shutDown drops queued keys, ignores adds and releases blocked getters', async () => {
    const clock = new FakeClock();
    const q = new WorkQueue({ clock });
    const blocked = q.get();
    q.shutDown();
    expect(await blocked).toBeUndefined();
    q.add('a');
    q.addAfter('b', 10);
    q.addRateLimited('c');
    await clock.advance(1000);
    expect(q.len()).toBe(0);
    expect(await q.get()).toBeUndefined();
  });

  it('shutDownWithDrain waits for in-flight keys, and gives up at the deadline', async () => {
    const clock = new FakeClock();
    const q = new WorkQueue({ clock });
    q.add('a');
    q.add('b');
    q.add('c');
    await q.get();
    await q.get();
    const drain = q.shutDownWithDrain(5000);
    expect(q.len()).toBe(0); // c was dropped
    expect(await peek(drain)).toBe('pending');
    q.done('a');
    expect(await peek(drain)).toBe('pending');
    q.done('b');
    expect(await drain).toBe(true);

    const q2 = new WorkQueue({ clock });
    q2.add('x');
    await q2.get();
    const drain2 = q2.shutDownWithDrain(5000);
    await clock.advance(4999);
    expect(await peek(drain2)).toBe('pending');
    await clock.advance(1);
    expect(await drain2).toBe(false);
    expect(await new WorkQueue({ clock }).shutDownWithDrain(1)).toBe(true);
  });

  it('a key parked during shutdown is not re-queued by done', async () => {
    const q = new WorkQueue({ clock: new FakeClock() });
    q.add('a');
    await q.get();
    q.add('a');
    q.shutDown();
    q.done('a');
    expect(q.len()).toBe(0);
    expect(q.processingLen()).toBe(0);
  });
});
