import { KubeConfig, type KubernetesListObject, type KubernetesObject } from '@kubernetes/client-node';
import { Registry } from 'prom-client';
import { describe, expect, it } from 'vitest';
import { FakeClock, flushMicrotasks, sleep } from './clock.ts';
import { Informer } from './informer.ts';
import { handleSignals, Manager, type ManagerOptions } from './manager.ts';
import { FakeLeaseStore, FakeWatch } from './testing.ts';

const cm = (name: string, rv = '1'): KubernetesObject => ({
  apiVersion: 'v1',
  kind: 'ConfigMap',
  metadata: { name, namespace: 'ns', resourceVersion: rv },
});

function setup(opts: Partial<ManagerOptions> = {}, listHangs = false) {
  const clock = new FakeClock();
  const watch = new FakeWatch();
  const list = async (): Promise<KubernetesListObject<KubernetesObject>> =>
    listHangs ? new Promise(() => {}) : { metadata: { resourceVersion: '5' }, items: [cm('a')] };
  const m = new Manager({
    http: { port: 0, host: '127.0.0.1' },
    clock,
    ...opts,
  });
  const inf = m.addInformer(
    'configmaps',
    new Informer<KubernetesObject>({ path: '/api/v1/configmaps', list, watch }, { clock, watchdogMs: 0 }),
  );
  const seen: string[] = [];
  const signals: AbortSignal[] = [];
  const ctl: { block: boolean; slowMs: number; hold?: Promise<void> } = { block: false, slowMs: 0 };
  const controller = m
    .addController({
      name: 'cms',
      reconcile: async (req, ctx) => {
        seen.push(req.name);
        signals.push(ctx.signal);
        if (ctl.slowMs) await sleep(clock, ctl.slowMs);
        if (ctl.hold) await ctl.hold;
        if (ctl.block) {
          await new Promise((_r, reject) => ctx.signal.addEventListener('abort', () => reject(ctx.signal.reason)));
        }
        return undefined;
      },
    })
    .for(inf);
  const get = async (path: string) => {
    const res = await fetch(`http://127.0.0.1:${m.address()!.port}${path}`);
    return { status: res.status, body: await res.text() };
  };
  return { clock, watch, m, inf, seen, signals, ctl, controller, get };
}

describe('Manager', () => {
  it('serves health, readiness and metrics, and reconciles only once leading', async () => {
    const store = new FakeLeaseStore();
    store.setHolder('other');
    const lost: string[] = [];
    const { clock, watch, m, seen, signals, ctl, get } = setup({
      leaderElection: { leaseName: 'op', leaseNamespace: 'sys', identity: 'me', store },
      onLeadershipLost: (r) => lost.push(r),
    });
    await m.start();
    expect((await get('/readyz')).status).toBe(200);
    expect((await get('/healthz')).status).toBe(200);
    expect((await get('/nope')).status).toBe(404);
    await clock.advance(10_000);
    expect(m.isLeader()).toBe(false);
    expect(seen).toEqual([]); // caches warm, but a standby does not reconcile

    await clock.advance(6000); // the other holder's lease expired on our clock
    expect(m.isLeader()).toBe(true);
    await m.elected();
    expect(seen).toEqual(['a']);
    const metrics = (await get('/metrics')).body;
    expect(metrics).toContain('leader_election_master_status{name="op"} 1');
    expect(metrics).toContain('controller_runtime_reconcile_total{controller="cms",result="success"} 1');
    expect(metrics).toContain('workqueue_depth{name="cms",controller="cms"} 0');
    expect(metrics).toContain('process_cpu_user_seconds_total');

    // Leadership lost while a reconcile is in flight: it is aborted at once and nothing more runs.
    ctl.block = true;
    watch.emit('MODIFIED', cm('a', '2'));
    await flushMicrotasks();
    expect(seen).toEqual(['a', 'a']);
    store.failReplace = () => {
      store.failReplace = undefined;
      store.setHolder('usurper');
      return undefined;
    };
    await clock.advance(2000);
    expect(m.isLeader()).toBe(false);
    expect(signals[1]!.aborted).toBe(true);
    expect(lost).toEqual(['taken-over']);
    watch.emit('MODIFIED', cm('a', '3'));
    await clock.advance(1000);
    expect(seen).toHaveLength(2);
    await m.stop(1000);
  });

  it('stop() lets in-flight reconciles finish, stops informers and releases the lease', async () => {
    const store = new FakeLeaseStore();
    const { clock, m, inf, seen, ctl, controller } = setup({
      leaderElection: { leaseName: 'op', leaseNamespace: 'sys', identity: 'me', store },
    });
    ctl.slowMs = 500;
    await m.start();
    await m.elected();
    await flushMicrotasks();
    expect(seen).toEqual(['a']);
    expect(controller.activeReconciles()).toBe(1);
    const stopping = m.stop(5000);
    await clock.advance(500);
    await stopping;
    expect(controller.activeReconciles()).toBe(0);
    expect(store.lease?.spec?.holderIdentity).toBe('');
    expect(inf.healthy()).toBe(true);
    expect(m.address()).toBeUndefined();
  });

  it('stop() does not release the lease while an aborted reconcile may still write', async () => {
    const store = new FakeLeaseStore();
    const { clock, m, seen, ctl, controller } = setup({
      leaderElection: { leaseName: 'op', leaseNamespace: 'sys', identity: 'me', store },
    });
    // A reconcile that ignores its abort signal: it is still running when the deadline passes.
    let finish: (() => void) | undefined;
    ctl.hold = new Promise<void>((resolve) => {
      finish = resolve;
    });
    await m.start();
    await m.elected();
    await flushMicrotasks();
    expect(seen).toEqual(['a']);
    let stopped = false;
    const stopping = m.stop(1000).then(() => {
      stopped = true;
    });
    await clock.advance(5000);
    await stopping;
    expect(stopped).toBe(true);
    expect(controller.unsettledReconciles()).toBe(1);
    expect(store.lease?.spec?.holderIdentity).toBe('me'); // not released: it expires on its own
    finish?.();
  });

  it('stop() releases the lease once the aborted reconciles have settled', async () => {
    const store = new FakeLeaseStore();
    const { clock, m, ctl, controller } = setup({
      leaderElection: { leaseName: 'op', leaseNamespace: 'sys', identity: 'me', store },
    });
    ctl.block = true; // honours its signal: ends when aborted at the deadline
    await m.start();
    await m.elected();
    await flushMicrotasks();
    const stopping = m.stop(1000);
    await clock.advance(1000);
    await stopping;
    expect(controller.unsettledReconciles()).toBe(0);
    expect(store.lease?.spec?.holderIdentity).toBe('');
  });

  it('stop() waits for pending Event writes only until the deadline (API server unreachable)', async () => {
    const { clock, m } = setup({ http: false });
    const hang = () => new Promise<never>(() => {});
    const events = m.eventRecorder({
      reportingController: 'test',
      reportingInstance: 'me',
      sink: { create: hang, patch: hang },
    });
    await m.start();
    events.normal(cm('a'), 'Created', 'Create', 'never written');
    let stopped = false;
    const stopping = m.stop(1000).then(() => {
      stopped = true;
    });
    await clock.advance(999);
    expect(stopped).toBe(false);
    await clock.advance(1);
    await stopping;
    expect(stopped).toBe(true);
  });

  it('without leader election starts controllers right after sync; fails start when caches do not sync', async () => {
    const { m, seen } = setup({ http: false });
    await m.start();
    await flushMicrotasks();
    expect(seen).toEqual(['a']);
    await m.stop();

    const slow = setup({ http: false, cacheSyncTimeoutMs: 1000 }, true);
    const started = slow.m.start();
    const assertion = expect(started).rejects.toThrow(/did not sync within 1000 ms: configmaps/);
    await slow.clock.advance(1000);
    await assertion;
    expect(slow.m.isReady()).toBe(false);
    expect(slow.seen).toEqual([]);
    await slow.m.stop();
  });

  it('handleSignals stops the manager then exits 0; a second signal exits 1; dispose removes handlers', async () => {
    const { m } = setup({ http: false });
    await m.start();
    const codes: number[] = [];
    let bothExited: (() => void) | undefined;
    const exited = new Promise<void>((r) => {
      bothExited = r;
    });
    const dispose = handleSignals(m, {
      exit: (c) => {
        if (codes.push(c) === 2) bothExited?.();
      },
      signals: ['SIGUSR2'],
    });
    process.emit('SIGUSR2', 'SIGUSR2');
    process.emit('SIGUSR2', 'SIGUSR2');
    await exited;
    expect(codes).toEqual([1, 0]);
    dispose();
    expect(process.listenerCount('SIGUSR2')).toBe(0);
  });

  it('shares one informer per resource and selector', () => {
    const kc = new KubeConfig();
    kc.loadFromOptions({
      clusters: [{ name: 'c', server: 'https://127.0.0.1:1' }],
      users: [{ name: 'u' }],
      contexts: [{ name: 'x', cluster: 'c', user: 'u' }],
      currentContext: 'x',
    });
    const m = new Manager({ registry: new Registry(), http: false, kubeConfig: kc });
    const gvr = { group: '', version: 'v1', plural: 'configmaps' };
    expect(m.informer(gvr)).toBe(m.informer(gvr));
    expect(m.informer(gvr, { labelSelector: 'a=b' })).not.toBe(m.informer(gvr));
    expect(m.informer(gvr, { namespace: 'x' }).name).toBe('configmaps/v1 ns=x');
  });
});
