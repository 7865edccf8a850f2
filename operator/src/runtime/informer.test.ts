import type { KubernetesListObject, KubernetesObject } from '@kubernetes/client-node';
import { describe, expect, it } from 'vitest';
import { FakeClock, flushMicrotasks } from './clock.ts';
import { Informer, type InformerOptions, objectKey, ownerUIDs, splitKey } from './informer.ts';
import { FakeWatch } from './testing.ts';

type Obj = KubernetesObject;

const mk = (name: string, rv: string, namespace: string | undefined = 'ns', owner?: string): Obj => ({
  apiVersion: 'v1',
  kind: 'ConfigMap',
  metadata: {
    name,
    resourceVersion: rv,
    ...(namespace ? { namespace } : {}),
    ...(owner ? { ownerReferences: [{ apiVersion: 'v1', kind: 'X', name: owner, uid: `uid-${owner}` }] } : {}),
  },
});

function setup(initial: Obj[], opts: InformerOptions = {}) {
  const clock = new FakeClock();
  const watch = new FakeWatch();
  const state = { items: initial, rv: '10', lists: 0, fail: undefined as Error | undefined, hang: false };
  const list = async (): Promise<KubernetesListObject<Obj>> => {
    state.lists++;
    if (state.hang) return new Promise(() => {});
    if (state.fail) throw state.fail;
    return { metadata: { resourceVersion: state.rv }, items: state.items.map((o) => structuredClone(o)) };
  };
  const inf = new Informer<Obj>(
    { path: '/api/v1/configmaps', list, watch, labelSelector: 'app=x', fieldSelector: 'metadata.name!=y' },
    { clock, resyncPeriodMs: 0, watchdogMs: 0, ...opts },
  );
  const events: string[] = [];
  inf.addEventHandler({
    onAdd: (o) => events.push(`add ${objectKey(o)}@${o.metadata?.resourceVersion}`),
    onUpdate: (old, o) =>
      events.push(`update ${objectKey(o)}@${old.metadata?.resourceVersion}->${o.metadata?.resourceVersion}`),
    onDelete: (o) => events.push(`delete ${objectKey(o)}`),
  });
  return { clock, watch, state, inf, events };
}

describe('Informer', () => {
  it('lists, syncs, then watches from the list resourceVersion with the selectors', async () => {
    const { clock, watch, inf, events } = setup([mk('a', '1'), mk('b', '2', 'other'), mk('c', '3', '')]);
    expect(inf.hasSynced()).toBe(false);
    const synced = inf.waitForSync(1000);
    inf.start();
    expect(await synced).toBe(true);
    expect(events).toEqual(['add ns/a@1', 'add other/b@2', 'add c@3']);
    expect(watch.last.query).toMatchObject({
      resourceVersion: '10',
      labelSelector: 'app=x',
      fieldSelector: 'metadata.name!=y',
    });
    expect(inf.get('a', 'ns')?.metadata?.resourceVersion).toBe('1');
    expect(inf.get('c')?.metadata?.name).toBe('c');
    expect(inf.list('other').map((o) => o.metadata?.name)).toEqual(['b']);
    expect(inf.list()).toHaveLength(3);
    await clock.advance(5000);
    watch.emit('MODIFIED', mk('a', '11'));
    watch.emit('ADDED', mk('d', '12'));
    watch.emit('DELETED', mk('b', '13', 'other'));
    watch.emit('MODIFIED', mk('a', '11')); // same resourceVersion: no event
    expect(events.slice(3)).toEqual(['update ns/a@1->11', 'add ns/d@12', 'delete other/b']);
    expect(inf.lastEventAt).toBe(clock.now());
    await inf.stop();
  });

  it('waitForSync times out when the list never completes, and healthz turns bad', async () => {
    const { clock, inf, state } = setup([], { watchdogMs: 10_000, unhealthyAfterMs: 30_000 });
    state.hang = true;
    inf.start();
    const synced = inf.waitForSync(5000);
    await clock.advance(5000);
    expect(await synced).toBe(false);
    expect(inf.healthy()).toBe(true);
    await clock.advance(40_000);
    expect(inf.watchdogTrips).toBeGreaterThanOrEqual(1); // the watchdog retried the hung list
    expect(state.lists).toBeGreaterThanOrEqual(2);
    expect(inf.healthy()).toBe(false);
    await inf.stop();
  });

  it('relists on an in-stream 410 Gone (client-node), deleting vanished objects', async () => {
    const { watch, inf, state, events } = setup([mk('a', '1'), mk('b', '2')]);
    inf.start();
    await inf.waitForSync(1000);
    state.items = [mk('a', '5'), mk('c', '6')];
    state.rv = '20';
    watch.emit('ERROR', { code: 410, reason: 'Expired' });
    watch.end(watch.last);
    await flushMicrotasks();
    expect(state.lists).toBe(2);
    expect(events.slice(2).sort()).toEqual(['add ns/c@6', 'delete ns/b', 'update ns/a@1->5']);
    expect(watch.last.query.resourceVersion).toBe('20');
    await inf.stop();
  });

  it('keeps a watch open through a quiet period: each ended watch is resumed at once from the last resourceVersion', async () => {
    const { clock, watch, inf, state, events } = setup([mk('a', '1')]);
    inf.start();
    await inf.waitForSync(1000);
    expect(watch.calls).toHaveLength(1);
    expect(watch.last.query).toMatchObject({ resourceVersion: '10', allowWatchBookmarks: true });
    watch.emit('MODIFIED', mk('a', '11'));
    // 90 s of quiet: the server (or a proxy) ends each watch after 30 s without an error. At no moment may the
    // resource go unwatched, and nothing is relisted.
    for (let i = 0; i < 3; i++) {
      await clock.advance(30_000);
      const ended = watch.last;
      watch.end(ended);
      await flushMicrotasks(); // no clock advance: a re-watch that waits for a timer fails here
      expect(watch.calls).toHaveLength(2 + i);
      expect(watch.last).not.toBe(ended);
      expect(watch.last.ended).toBe(false);
      expect(watch.last.query).toMatchObject({ resourceVersion: '11', allowWatchBookmarks: true });
    }
    // A bookmark moves the resourceVersion the next watch resumes from (and counts as activity).
    await clock.advance(20_000);
    watch.last.cb('BOOKMARK', { metadata: { resourceVersion: '15' } });
    expect(inf.lastEventAt).toBe(clock.now());
    await clock.advance(10_000);
    watch.end(watch.last);
    await flushMicrotasks();
    expect(watch.last.query).toMatchObject({ resourceVersion: '15' });
    // An event 60 s into a quiet period reaches the handlers on the watch that is open at that moment.
    watch.emit('MODIFIED', mk('a', '16'));
    expect(events.at(-1)).toBe('update ns/a@11->16');
    expect(state.lists).toBe(1);
    await inf.stop();
  });

  it('backs off re-watching only when watches end as soon as they begin', async () => {
    const { clock, watch, inf, state } = setup([mk('a', '1')], { minWatchLifetimeMs: 1000 });
    inf.start();
    await inf.waitForSync(1000);
    await clock.advance(30_000);
    watch.end(watch.last); // a long-lived watch ended: resumed at once
    await flushMicrotasks();
    expect(watch.calls).toHaveLength(2);
    watch.end(watch.last); // this one ended immediately: client-node's delay applies
    await flushMicrotasks();
    expect(watch.calls).toHaveLength(2);
    await clock.advance(2000);
    expect(watch.calls).toHaveLength(3);
    expect(watch.last.query).toMatchObject({ resourceVersion: '10' });
    expect(state.lists).toBe(1);
    await inf.stop();
  });

  it('relists on an HTTP 410 from the watch request', async () => {
    const { watch, inf, state } = setup([mk('a', '1')]);
    inf.start();
    await inf.waitForSync(1000);
    watch.end(watch.last, Object.assign(new Error('Gone'), { statusCode: 410 }));
    await flushMicrotasks();
    expect(state.lists).toBe(2);
    expect(inf.restarts).toBe(0); // handled inside the generation, no restart
    await inf.stop();
  });

  it('restarts after an error with backoff and reconciles the store against the new list', async () => {
    const { clock, watch, inf, state, events } = setup([mk('a', '1'), mk('b', '2'), mk('c', '3')], {
      restartBackoff: { baseMs: 1000, maxMs: 8000 },
    });
    inf.start();
    await inf.waitForSync(1000);
    const firstCall = watch.last;
    watch.end(firstCall, Object.assign(new Error('read ECONNRESET'), { code: 'ECONNRESET' }));
    // While down: b deleted, c changed, d created.
    state.items = [mk('a', '1'), mk('c', '30'), mk('d', '31')];
    state.fail = new Error('connection refused');
    const times: number[] = [];
    const t0 = clock.now();
    for (let i = 0; i < 3; i++) {
      const before = state.lists;
      while (state.lists === before) await clock.advance(100);
      times.push(clock.now() - t0);
    }
    expect(times).toEqual([1000, 3000, 7000]); // 1 s, 2 s, 4 s
    state.fail = undefined;
    await clock.advance(8000);
    expect(inf.restarts).toBe(4);
    expect(events.slice(3).sort()).toEqual(['add ns/d@31', 'delete ns/b', 'update ns/c@3->30']);
    // Events from the dead generation's watch are ignored.
    watch.emit('ADDED', mk('ghost', '99'), firstCall);
    expect(inf.get('ghost', 'ns')).toBeUndefined();
    await inf.stop();
  });

  it('a watchdog restarts a silent watch', async () => {
    const { clock, watch, inf, state } = setup([mk('a', '1')], { watchdogMs: 60_000 });
    inf.start();
    await inf.waitForSync(1000);
    const calls = watch.calls.length;
    await clock.advance(59_000);
    watch.emit('MODIFIED', mk('a', '2')); // activity resets the timer
    await clock.advance(59_000);
    expect(inf.watchdogTrips).toBe(0);
    await clock.advance(20_000);
    expect(inf.watchdogTrips).toBe(1);
    expect(state.lists).toBe(2);
    expect(watch.calls.length).toBe(calls + 1);
    expect(inf.healthy()).toBe(true);
    await inf.stop();
  });

  it('resyncs every cached object to handlers periodically', async () => {
    const { clock, inf, events } = setup([mk('a', '1'), mk('b', '2')], { resyncPeriodMs: 30_000 });
    inf.start();
    await inf.waitForSync(1000);
    await clock.advance(29_999);
    expect(events).toHaveLength(2);
    await clock.advance(1);
    expect(events.slice(2)).toEqual(['update ns/a@1->1', 'update ns/b@2->2']);
    await clock.advance(30_000);
    expect(events).toHaveLength(6);
    await inf.stop();
  });

  it('maintains indexes across add, update and delete', async () => {
    const { watch, inf } = setup([mk('a', '1', 'ns', 'o1'), mk('b', '2', 'ns', 'o1')]);
    inf.addIndex('byOwnerUID', ownerUIDs);
    inf.start();
    await inf.waitForSync(1000);
    const names = (v: string) =>
      inf
        .byIndex('byOwnerUID', v)
        .map((o) => o.metadata?.name)
        .sort();
    expect(names('uid-o1')).toEqual(['a', 'b']);
    watch.emit('MODIFIED', mk('b', '3', 'ns', 'o2'));
    expect(names('uid-o1')).toEqual(['a']);
    expect(names('uid-o2')).toEqual(['b']);
    watch.emit('DELETED', mk('a', '4', 'ns', 'o1'));
    expect(names('uid-o1')).toEqual([]);
    inf.addIndex('byName', (o) => [o.metadata?.name ?? '']);
    expect(names('uid-o2')).toEqual(['b']);
    expect(inf.byIndex('byName', 'b')).toHaveLength(1);
    expect(() => inf.byIndex('nope', 'x')).toThrow();
    await inf.stop();
  });

  it('replays known objects to a late handler and survives a throwing handler', async () => {
    const { watch, inf } = setup([mk('a', '1')]);
    inf.start();
    await inf.waitForSync(1000);
    inf.addEventHandler({
      onAdd: () => {
        throw new Error('bad handler');
      },
    });
    const late: string[] = [];
    const off = inf.addEventHandler({ onAdd: (o) => late.push(o.metadata!.name!) });
    expect(late).toEqual(['a']);
    watch.emit('ADDED', mk('b', '2'));
    expect(late).toEqual(['a', 'b']);
    off();
    watch.emit('ADDED', mk('c', '3'));
    expect(late).toEqual(['a', 'b']);
    await inf.stop();
  });

  it('splits keys', () => {
    expect(splitKey('ns/a')).toEqual({ namespace: 'ns', name: 'a' });
    expect(splitKey('a')).toEqual({ name: 'a' });
  });
});
