import type { KubernetesObject } from '@kubernetes/client-node';
import { Registry } from 'prom-client';
import { describe, expect, it } from 'vitest';
import { FakeClock, flushMicrotasks } from './clock.ts';
import { Controller, generationChanged, type Reconciler, type Request, TerminalError } from './controller.ts';
import { runtimeMetrics } from './metrics.ts';
import { captureLogger, FakeSource, metricValue } from './testing.ts';

const obj = (name: string, namespace = 'ns', extra: Partial<KubernetesObject['metadata']> = {}): KubernetesObject => ({
  apiVersion: 'example.com/v1',
  kind: 'Thing',
  metadata: { name, namespace, resourceVersion: '1', ...extra },
});

function setup(reconcile: Reconciler, opts: { workers?: number; timeoutMs?: number } = {}) {
  const clock = new FakeClock();
  const registry = new Registry();
  const { logger, lines } = captureLogger();
  const source = new FakeSource<KubernetesObject>();
  const c = new Controller({
    name: 'things',
    reconcile,
    clock,
    logger,
    metrics: runtimeMetrics(registry),
    maxConcurrentReconciles: opts.workers ?? 1,
    reconcileTimeoutMs: opts.timeoutMs ?? 0,
  }).for(source);
  const metric = (name: string, labels: Record<string, string> = {}) =>
    metricValue(registry, name, { controller: 'things', ...labels });
  return { clock, registry, lines, source, c, metric };
}

describe('Controller', () => {
  it('retries a failing key with growing delays, visible in metrics, then forgets it on success', async () => {
    const attempts: number[] = [];
    const { clock, source, c, metric } = setup(async () => {
      attempts.push(clock.now());
      if (attempts.length <= 3) throw new Error('boom');
      return undefined;
    });
    c.start();
    source.add(obj('a'));
    await clock.advance(1000);
    expect(attempts.length).toBe(4);
    const gaps = attempts.slice(1).map((t, i) => t - attempts[i]!);
    expect(gaps).toEqual([5, 10, 20]);
    expect(await metric('controller_runtime_reconcile_total', { result: 'error' })).toBe(3);
    expect(await metric('controller_runtime_reconcile_total', { result: 'success' })).toBe(1);
    expect(await metric('controller_runtime_reconcile_errors_total')).toBe(3);
    expect(await metric('workqueue_retries_total', { name: 'things' })).toBe(3);
    expect(await metric('workqueue_adds_total', { name: 'things' })).toBe(4);
    expect(await metric('controller_runtime_reconcile_time_seconds')).toBe(4);
    expect(c.queue.numRequeues('ns/a')).toBe(0);
  });

  it('does not retry a TerminalError (also when wrapped as a cause)', async () => {
    let calls = 0;
    const { clock, source, c, metric } = setup(async (req) => {
      calls++;
      if (req.name === 'wrapped') throw new Error('outer', { cause: new TerminalError('bad spec') });
      throw new TerminalError('bad spec');
    });
    c.start();
    source.add(obj('a'));
    source.add(obj('wrapped'));
    await clock.advance(60_000);
    expect(calls).toBe(2);
    expect(await metric('controller_runtime_terminal_reconcile_errors_total')).toBe(2);
    expect(await metric('controller_runtime_reconcile_errors_total')).toBe(2);
    expect(await metric('workqueue_retries_total', { name: 'things' })).toBe(0);
    source.update(obj('a', 'ns', { resourceVersion: '2' })); // a new event reconciles again
    await clock.advance(1);
    expect(calls).toBe(3);
  });

  it('one failing key does not block others', async () => {
    const done: string[] = [];
    const { clock, source, c } = setup(async (req) => {
      if (req.name === 'bad') throw new Error('always');
      done.push(req.name);
      return undefined;
    });
    c.start();
    source.add(obj('bad'));
    source.add(obj('good1'));
    await clock.advance(50);
    source.add(obj('good2'));
    await clock.advance(50);
    expect(done).toEqual(['good1', 'good2']);
    expect(c.queue.numRequeues('ns/bad')).toBeGreaterThanOrEqual(4);
  });

  it('requeueAfter re-runs the key after the delay and resets backoff; requeue uses backoff', async () => {
    const times: number[] = [];
    const { clock, source, c, metric } = setup(async () => {
      times.push(clock.now());
      return times.length === 1 ? { requeueAfter: 30_000 } : times.length === 2 ? { requeue: true } : undefined;
    });
    c.start();
    const t0 = clock.now();
    source.add(obj('a'));
    await clock.advance(40_000);
    expect(times.map((t) => t - t0)).toEqual([0, 30_000, 30_005]);
    expect(await metric('controller_runtime_reconcile_total', { result: 'requeue_after' })).toBe(1);
    expect(await metric('controller_runtime_reconcile_total', { result: 'requeue' })).toBe(1);
    expect(await metric('controller_runtime_reconcile_total', { result: 'success' })).toBe(1);
  });

  it('runs different keys concurrently up to the limit, never one key twice at once', async () => {
    const running = new Set<string>();
    let maxParallel = 0;
    let overlapSameKey = false;
    const release: Array<() => void> = [];
    const { clock, source, c, metric } = setup(
      async (req) => {
        if (running.has(req.name)) overlapSameKey = true;
        running.add(req.name);
        maxParallel = Math.max(maxParallel, running.size);
        await new Promise<void>((r) => release.push(r));
        running.delete(req.name);
        return undefined;
      },
      { workers: 2 },
    );
    c.start();
    expect(await metric('controller_runtime_max_concurrent_reconciles')).toBe(2);
    for (const n of ['a', 'b', 'c']) source.add(obj(n));
    await flushMicrotasks();
    source.update(obj('a', 'ns', { resourceVersion: '2' })); // parked while a runs
    await flushMicrotasks();
    expect(running.size).toBe(2);
    expect(await metric('controller_runtime_active_workers')).toBe(2);
    while (release.length > 0) {
      release.shift()!();
      await clock.advance(1);
    }
    expect(maxParallel).toBe(2);
    expect(overlapSameKey).toBe(false);
    expect(await metric('controller_runtime_reconcile_total', { result: 'success' })).toBe(4);
    expect(await metric('controller_runtime_active_workers')).toBe(0);
  });

  it('logs controller, key and a fresh reconcileID on every reconcile line', async () => {
    const { clock, source, c, lines } = setup(async (_req, ctx) => {
      ctx.log.info('working');
      throw new Error('x');
    });
    c.start();
    source.add(obj('a'));
    await clock.advance(6);
    const work = lines.filter((l) => l.msg === 'working');
    expect(work.length).toBe(2);
    for (const l of lines.filter((l) => l.key !== undefined)) {
      expect(l).toMatchObject({ controller: 'things', key: 'ns/a' });
      expect(l.reconcileID).toMatch(/^[0-9a-f-]{36}$/);
    }
    expect(work[0]!.reconcileID).not.toBe(work[1]!.reconcileID);
    const err = lines.find((l) => l.msg === 'reconciler error');
    expect(err).toMatchObject({ level: 'error', controller: 'things', key: 'ns/a', reconcileID: work[0]!.reconcileID });
  });

  it('times out a hung reconcile: aborts its signal, retries, but never overlaps the same key', async () => {
    let calls = 0;
    let firstSignal: AbortSignal | undefined;
    let finishFirst: (() => void) | undefined;
    const { clock, source, c, metric } = setup(
      async (_req, ctx) => {
        calls++;
        if (calls === 1) {
          firstSignal = ctx.signal;
          await new Promise<void>((r) => {
            finishFirst = r;
          }); // ignores the signal
        }
        return undefined;
      },
      { timeoutMs: 1000 },
    );
    c.start();
    source.add(obj('a'));
    await clock.advance(1000);
    expect(firstSignal?.aborted).toBe(true);
    expect(await metric('controller_runtime_reconcile_timeouts_total')).toBe(1);
    expect(await metric('controller_runtime_reconcile_total', { result: 'error' })).toBe(1);
    await clock.advance(10_000);
    expect(calls).toBe(1); // retry parked: the abandoned reconcile still holds the key
    finishFirst!();
    await clock.advance(10);
    expect(calls).toBe(2);
  });

  it('counts a thrown non-Error as a panic and retries it', async () => {
    let calls = 0;
    const { clock, source, c, metric } = setup(async () => {
      calls++;
      if (calls === 1) throw 'a string';
      return undefined;
    });
    c.start();
    source.add(obj('a'));
    await clock.advance(10);
    expect(await metric('controller_runtime_reconcile_panics_total')).toBe(1);
    expect(calls).toBe(2);
  });

  it('abort() aborts in-flight reconciles at once and stops the workers; stop() drains', async () => {
    let signal: AbortSignal | undefined;
    const { source, c } = setup(async (_req, ctx) => {
      signal = ctx.signal;
      await new Promise((_r, reject) => ctx.signal.addEventListener('abort', () => reject(ctx.signal.reason)));
      return undefined;
    });
    c.start();
    source.add(obj('a'));
    await flushMicrotasks();
    expect(c.activeReconciles()).toBe(1);
    c.abort('leadership lost');
    expect(signal?.aborted).toBe(true);
    await c.done();
    expect(source.handlerCount()).toBe(0);
    source.add(obj('b'));
    expect(c.queue.len()).toBe(0);

    let finished = false;
    let release: (() => void) | undefined;
    const g = setup(async () => {
      await new Promise<void>((r) => {
        release = r;
      });
      finished = true;
      return undefined;
    });
    g.c.start();
    g.source.add(obj('a'));
    await flushMicrotasks();
    const stopping = g.c.stop(1000);
    expect(finished).toBe(false);
    release?.(); // the in-flight reconcile finishes after the stop began
    expect(await stopping).toBe(true);
    expect(finished).toBe(true);
  });

  it('owns() maps a child to its controller owner; watches() maps anything', async () => {
    const seen: Request[] = [];
    const { clock, c } = setup(async (req) => {
      seen.push(req);
      return undefined;
    });
    const children = new FakeSource<KubernetesObject>();
    const others = new FakeSource<KubernetesObject>();
    const ref = (kind: string, apiVersion: string, name: string, controller = true) => ({
      ownerReferences: [{ apiVersion, kind, name, uid: `uid-${name}`, controller }],
    });
    c.owns(children, { apiVersion: 'example.com/v1', kind: 'Thing' });
    c.watches(others, (o) => [{ name: `from-${o.metadata?.name}` }, 'ns/direct']);
    c.start();
    children.add(obj('c1', 'ns', ref('Thing', 'example.com/v2', 'owner1'))); // version ignored, group matches
    children.add(obj('c2', 'ns', ref('Other', 'example.com/v1', 'x'))); // other kind
    children.add(obj('c3', 'ns', ref('Thing', 'other.io/v1', 'y'))); // other group
    children.add(obj('c4', 'ns', ref('Thing', 'example.com/v1', 'z', false))); // not the controller
    others.add(obj('o1'));
    await clock.advance(1);
    expect(seen).toEqual([
      { namespace: 'ns', name: 'owner1' },
      { name: 'from-o1' },
      { namespace: 'ns', name: 'direct' },
    ]);
  });

  it('an update predicate filters status-only updates but passes resyncs', async () => {
    let calls = 0;
    const clock = new FakeClock();
    const source = new FakeSource<KubernetesObject>();
    const c = new Controller({
      name: 'p',
      clock,
      reconcile: async () => {
        calls++;
        return undefined;
      },
    }).for(source, { updatePredicate: generationChanged });
    c.start();
    const o = obj('a', 'ns', { generation: 1 });
    source.add(o);
    await clock.advance(1);
    source.update(obj('a', 'ns', { generation: 1, resourceVersion: '2' }));
    await clock.advance(1);
    expect(calls).toBe(1);
    source.update(obj('a', 'ns', { generation: 2, resourceVersion: '3' }));
    await clock.advance(1);
    expect(calls).toBe(2);
  });
});
