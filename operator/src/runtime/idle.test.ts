import { KubeConfig } from '@kubernetes/client-node';
import { Registry } from 'prom-client';
import { describe, expect, it } from 'vitest';
import { FakeClock, flushMicrotasks } from './clock.ts';
import { Manager } from './manager.ts';
import { WorkQueue } from './workqueue.ts';

/** A promise the test resolves by hand. */
function deferred() {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

/** Tracks whether a promise has settled, without awaiting it. */
function track(p: Promise<void>) {
  const t = { done: false };
  void p.then(() => {
    t.done = true;
  });
  return t;
}

describe('WorkQueue.whenIdle', () => {
  it('resolves once nothing is queued or processing; delayed keys do not count', async () => {
    const clock = new FakeClock();
    const q = new WorkQueue({ clock });
    expect(q.isIdle()).toBe(true);
    await q.whenIdle();

    q.add('a');
    const idle = track(q.whenIdle());
    await flushMicrotasks();
    expect(idle.done).toBe(false); // queued
    expect(await q.get()).toBe('a');
    q.add('a'); // parked while processing: re-queued by done()
    await flushMicrotasks();
    expect(idle.done).toBe(false);
    q.done('a');
    await flushMicrotasks();
    expect(idle.done).toBe(false); // 'a' is queued again
    expect(await q.get()).toBe('a');
    q.addAfter('b', 1000);
    q.done('a');
    await flushMicrotasks();
    expect(idle.done).toBe(true); // 'b' waits for its time: future work, not pending work
    expect(q.waitingLen()).toBe(1);
  });

  it('resolves on shutDown', async () => {
    const q = new WorkQueue({ clock: new FakeClock() });
    q.add('a');
    const idle = track(q.whenIdle());
    q.shutDown();
    await flushMicrotasks();
    expect(idle.done).toBe(true);
  });
});

describe('Manager.idle', () => {
  it('waits for work one controller hands to another, and for in-flight reconciles', async () => {
    const kc = new KubeConfig();
    kc.loadFromOptions({
      clusters: [{ name: 'c', server: 'https://127.0.0.1:1' }],
      users: [{ name: 'u' }],
      contexts: [{ name: 'x', cluster: 'c', user: 'u' }],
      currentContext: 'x',
    });
    const m = new Manager({ registry: new Registry(), http: false, kubeConfig: kc, clock: new FakeClock() });
    const gateA = deferred();
    const gateB = deferred();
    const seen: string[] = [];
    const b = m.addController({
      name: 'b',
      reconcile: async (req) => {
        seen.push(`b:${req.name}`);
        await gateB.promise;
      },
    });
    const a = m.addController({
      name: 'a',
      reconcile: async (req) => {
        seen.push(`a:${req.name}`);
        await gateA.promise;
        b.enqueue(req.name); // hands work on
      },
    });
    a.start();
    b.start();
    await m.idle(); // nothing to do

    a.enqueue('x');
    const idle = track(m.idle());
    await flushMicrotasks();
    expect(seen).toEqual(['a:x']);
    expect(idle.done).toBe(false);
    gateA.resolve(); // a finishes and enqueues into b: still not idle
    await flushMicrotasks();
    expect(seen).toEqual(['a:x', 'b:x']);
    expect(a.queue.isIdle()).toBe(true);
    expect(idle.done).toBe(false);
    gateB.resolve();
    await flushMicrotasks();
    expect(idle.done).toBe(true);
    await a.stop(0);
    await b.stop(0);
  });
});
