// The controller runtime against a real kube-apiserver: the informer (events, a real 410 relist, restart after a
// watch error with the store reconciled against the new LIST), server-side apply of /status and finalizer patches,
// and Lease leader election between two electors (one leader; a dead leader is replaced after expiry; release).
import { randomBytes } from 'node:crypto';
import { HttpMethod, type KubernetesObject, PatchStrategy, type V1Lease, Watch } from '@kubernetes/client-node';
import { Registry } from 'prom-client';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { adminKubeConfig, compactEtcd } from '../../../e2e/controlplane/testenv.ts';
import { waitFor as poll } from '../../../e2e/testing/wait.ts';
import {
  addFinalizer,
  type GVR,
  Informer,
  isConflict,
  isInvalid,
  isNotFound,
  isTooManyRequests,
  KubeClient,
  kubeLeaseStore,
  LeaderElector,
  type LeaseStore,
  leaseGVR,
  Manager,
  patchStatus,
  removeFinalizer,
  type WatchLike,
} from '../../src/runtime/index.ts';

const suffix = randomBytes(3).toString('hex');
const NS = `runtime-${suffix}`;
const cmGVR: GVR = { group: '', version: 'v1', plural: 'configmaps' };
const nsGVR: GVR = { group: '', version: 'v1', plural: 'namespaces' };
const crdGVR: GVR = { group: 'apiextensions.k8s.io', version: 'v1', plural: 'customresourcedefinitions' };
const GROUP = `rt${suffix}.stratus.test`;
const widgetGVR: GVR = { group: GROUP, version: 'v1', plural: 'widgets' };

let client: KubeClient;

const waitFor = <T>(
  what: string,
  fn: () => T | undefined | false | Promise<T | undefined | false>,
  timeoutMs = 15_000,
): Promise<T> => poll(what, fn, timeoutMs, 50);

const cm = (name: string, data: Record<string, string> = {}): KubernetesObject & { data: Record<string, string> } => ({
  apiVersion: 'v1',
  kind: 'ConfigMap',
  metadata: { name, namespace: NS, labels: { 'runtime-test': suffix } },
  data,
});

beforeAll(async () => {
  client = new KubeClient(adminKubeConfig());
  await client.create(nsGVR, { apiVersion: 'v1', kind: 'Namespace', metadata: { name: NS } });
});

afterAll(async () => {
  await client?.delete(nsGVR, NS).catch(() => {});
  await client?.delete(crdGVR, `widgets.${GROUP}`).catch(() => {});
});

describe('Informer against kube-apiserver', () => {
  it('delivers add/update/delete with the old object and honours the label selector', async () => {
    const inf = Informer.forResource<KubernetesObject & { data?: unknown }>(client, cmGVR, {
      namespace: NS,
      labelSelector: `runtime-test=${suffix}`,
      resyncPeriodMs: 0,
    });
    const events: string[] = [];
    inf.addEventHandler({
      onAdd: (o) => events.push(`add ${o.metadata?.name}`),
      onUpdate: (old, o) => events.push(`update ${o.metadata?.name} ${JSON.stringify([old.data, o.data])}`),
      onDelete: (o) => events.push(`delete ${o.metadata?.name}`),
    });
    await client.create(cmGVR, cm('pre'));
    inf.start();
    expect(await inf.waitForSync(10_000)).toBe(true);
    expect(events).toEqual(['add pre']);
    await client.create(cmGVR, cm('a', { k: '1' }));
    await client.create(cmGVR, { ...cm('unlabelled'), metadata: { name: 'unlabelled', namespace: NS } });
    await waitFor('add a', () => inf.get('a', NS));
    await client.replace(cmGVR, { ...cm('a', { k: '2' }), metadata: { ...inf.get('a', NS)!.metadata } });
    await waitFor('update a', () => events.find((e) => e.startsWith('update a')));
    await client.delete(cmGVR, 'a', NS);
    await waitFor('delete a', () => events.includes('delete a'));
    expect(events).toEqual(['add pre', 'add a', 'update a [{"k":"1"},{"k":"2"}]', 'delete a']);
    expect(inf.get('unlabelled', NS)).toBeUndefined();
    expect(inf.healthy()).toBe(true);
    await inf.stop();
  });

  it('relists after a real 410 Gone from the API server (client-node handles it)', async () => {
    let lists = 0;
    let sabotaged = false;
    const real = new Watch(client.kubeConfig);
    // The first watch asks for a resourceVersion long compacted away: the server answers 410.
    const watch: WatchLike = {
      watch: (path, query, cb, done) => {
        if (!sabotaged) {
          sabotaged = true;
          return real.watch(path, { ...query, resourceVersion: '1' }, cb, done);
        }
        return real.watch(path, query, cb, done);
      },
    };
    // Make revision 1 really compacted away, however young the cluster is.
    await client.create(cmGVR, cm('before-compaction'));
    await compactEtcd();
    const inf = new Informer<KubernetesObject>(
      {
        path: `/api/v1/namespaces/${NS}/configmaps`,
        list: () => {
          lists++;
          return client.listAll(cmGVR, { namespace: NS });
        },
        watch,
      },
      { resyncPeriodMs: 0 },
    );
    inf.start();
    await inf.waitForSync(10_000);
    await waitFor('relist after 410', () => lists >= 2);
    expect(inf.restarts).toBe(0);
    await client.create(cmGVR, cm('after-410'));
    await waitFor('event after relist', () => inf.get('after-410', NS));
    await inf.stop();
  });

  it('restarts after a watch error and reconciles changes made while it was down', async () => {
    const real = new Watch(client.kubeConfig);
    const dones: Array<(err: unknown) => void> = [];
    const controllers: AbortController[] = [];
    const watch: WatchLike = {
      watch: async (path, query, cb, done) => {
        dones.push(done);
        const ac = await real.watch(path, query, cb, done);
        controllers.push(ac);
        return ac;
      },
    };
    await client.create(cmGVR, cm('keep', { v: '1' }));
    await client.create(cmGVR, cm('change', { v: '1' }));
    await client.create(cmGVR, cm('remove'));
    const inf = new Informer<KubernetesObject>(
      {
        path: `/api/v1/namespaces/${NS}/configmaps`,
        list: () => client.listAll(cmGVR, { namespace: NS }),
        watch,
      },
      { resyncPeriodMs: 0, restartBackoff: { baseMs: 2000, maxMs: 2000 } },
    );
    const events: string[] = [];
    inf.start();
    await inf.waitForSync(10_000);
    inf.addEventHandler({
      onUpdate: (_o, n) => events.push(`update ${n.metadata?.name}`),
      onDelete: (o) => events.push(`delete ${o.metadata?.name}`),
      onAdd: (o) => events.push(`add ${o.metadata?.name}`),
    });
    events.length = 0;
    // Kill the live watch with a non-retryable error, as a connection reset would: client-node stops the informer.
    controllers.at(-1)!.abort();
    dones.at(-1)!(Object.assign(new Error('read ECONNRESET'), { code: 'ECONNRESET' }));
    // While nothing watches: change one, delete one, create one.
    const change = await client.get<KubernetesObject>(cmGVR, 'change', NS);
    await client.replace(cmGVR, { ...change, data: { v: '2' } } as KubernetesObject);
    await client.delete(cmGVR, 'remove', NS);
    await client.create(cmGVR, cm('new'));
    // kube-root-ca.crt belongs to the controller manager (it may be re-created at any time): not ours to count.
    const ours = () => events.filter((e) => !e.endsWith('kube-root-ca.crt'));
    await waitFor('restart', () => inf.restarts >= 1 && ours().length >= 3, 20_000);
    expect(ours().sort()).toEqual(['add new', 'delete remove', 'update change']);
    await client.create(cmGVR, cm('after-restart'));
    await waitFor('watching again', () => inf.get('after-restart', NS));
    await inf.stop();
  });
});

describe('server-side apply of status and finalizers', () => {
  beforeAll(async () => {
    await client.create(crdGVR, {
      apiVersion: 'apiextensions.k8s.io/v1',
      kind: 'CustomResourceDefinition',
      metadata: { name: `widgets.${GROUP}` },
      spec: {
        group: GROUP,
        scope: 'Namespaced',
        names: { plural: 'widgets', singular: 'widget', kind: 'Widget', listKind: 'WidgetList' },
        versions: [
          {
            name: 'v1',
            served: true,
            storage: true,
            subresources: { status: {} },
            schema: {
              openAPIV3Schema: {
                type: 'object',
                properties: {
                  spec: { type: 'object', 'x-kubernetes-preserve-unknown-fields': true },
                  status: { type: 'object', 'x-kubernetes-preserve-unknown-fields': true },
                },
              },
            },
          },
        ],
      },
    } as KubernetesObject);
    await waitFor(
      'the Widget CRD served',
      () =>
        client.list(widgetGVR, { namespace: NS }).then(
          () => true,
          (err: unknown) => {
            if (isNotFound(err) || isTooManyRequests(err)) return false;
            throw err;
          },
        ),
      20_000,
    );
  });

  it('patchStatus applies only status through /status, owned by a stable field manager', async () => {
    const w = await client.create<KubernetesObject>(widgetGVR, {
      apiVersion: `${GROUP}/v1`,
      kind: 'Widget',
      metadata: { name: 'w1', namespace: NS },
      spec: { size: 1 },
    } as KubernetesObject);
    const out = await patchStatus<KubernetesObject & { status: unknown; spec: unknown }>(
      client,
      widgetGVR,
      w,
      { phase: 'Ready', conditions: [{ type: 'Ready', status: 'True' }] },
      { fieldManager: 'stratus-runtime-test' },
    );
    expect(out.status).toEqual({ phase: 'Ready', conditions: [{ type: 'Ready', status: 'True' }] });
    expect(out.spec).toEqual({ size: 1 });
    const mf = out.metadata?.managedFields?.find((m) => m.manager === 'stratus-runtime-test');
    expect(mf).toMatchObject({ operation: 'Apply', subresource: 'status' });
    // The full intent each time: a field left out is released (removed).
    const again = await patchStatus<KubernetesObject & { status: unknown }>(
      client,
      widgetGVR,
      w,
      { phase: 'Degraded' },
      { fieldManager: 'stratus-runtime-test' },
    );
    expect(again.status).toEqual({ phase: 'Degraded' });
    // Without force, another manager's apply of a field we own is a 409 conflict; with force it takes the field,
    // and our next (forced) apply takes it back.
    const conflict = await patchStatus(
      client,
      widgetGVR,
      w,
      { phase: 'Other' },
      { fieldManager: 'someone-else', force: false },
    ).catch((e: unknown) => e);
    expect(isConflict(conflict)).toBe(true);
    await patchStatus(client, widgetGVR, w, { phase: 'Other' }, { fieldManager: 'someone-else' });
    const back = await patchStatus<KubernetesObject & { status: unknown }>(
      client,
      widgetGVR,
      w,
      { phase: 'Ready' },
      { fieldManager: 'stratus-runtime-test' },
    );
    expect(back.status).toEqual({ phase: 'Ready' });
  });

  it('finalizers: add/remove by guarded JSON patch; a stale resourceVersion test fails with 422', async () => {
    await client.create(widgetGVR, {
      apiVersion: `${GROUP}/v1`,
      kind: 'Widget',
      metadata: { name: 'w2', namespace: NS, finalizers: ['other.io/keep'] },
    } as KubernetesObject);
    const added = await addFinalizer(client, widgetGVR, 'w2', NS, 'stratus.io/test');
    expect(added.metadata?.finalizers).toEqual(['other.io/keep', 'stratus.io/test']);
    const again = await addFinalizer(client, widgetGVR, 'w2', NS, 'stratus.io/test');
    expect(again.metadata?.resourceVersion).toBe(added.metadata?.resourceVersion);
    const stale = await client
      .patch(
        widgetGVR,
        'w2',
        NS,
        [
          { op: 'test', path: '/metadata/resourceVersion', value: '1' },
          { op: 'add', path: '/metadata/labels', value: { x: 'y' } },
        ],
        PatchStrategy.JsonPatch,
      )
      .catch((e: unknown) => e);
    expect(isInvalid(stale)).toBe(true);
    const removed = await removeFinalizer(client, widgetGVR, 'w2', NS, 'stratus.io/test');
    expect(removed.metadata?.finalizers).toEqual(['other.io/keep']);
  });
});

describe('leader election against a real Lease', () => {
  const timing = { leaseDurationMs: 3000, renewDeadlineMs: 2000, retryPeriodMs: 500 };

  /** A Lease store that can be cut off, like a crashed or partitioned replica. */
  function killable(store: LeaseStore): LeaseStore & { kill(): void } {
    let dead = false;
    const guard = <T>(f: () => Promise<T>) => (dead ? new Promise<T>(() => {}) : f());
    return {
      get: (s) => guard(() => store.get(s)),
      create: (l, s) => guard(() => store.create(l, s)),
      replace: (l, s) => guard(() => store.replace(l, s)),
      kill: () => {
        dead = true;
      },
    };
  }

  it('two electors: exactly one leads; the other takes over after the dead leader lease expires; release', async () => {
    const leaseName = `runtime-${suffix}`;
    const stores = [killable(kubeLeaseStore(client, NS, leaseName)), killable(kubeLeaseStore(client, NS, leaseName))];
    // Leadership transitions in order: never two leaders at once.
    const transitions: string[] = [];
    let leaders = 0;
    let maxLeaders = 0;
    const electors = stores.map(
      (store, i) =>
        new LeaderElector({
          leaseName,
          leaseNamespace: NS,
          identity: `cand-${i}`,
          store,
          ...timing,
          onStartedLeading: () => {
            transitions.push(`start ${i}`);
            maxLeaders = Math.max(maxLeaders, ++leaders);
          },
          onStoppedLeading: () => {
            transitions.push(`stop ${i}`);
            leaders--;
          },
        }),
    );
    const runs = electors.map((e) => e.run());
    await waitFor('a leader', () => electors.some((e) => e.isLeader()));
    // Several renewals by the leader while the other candidate keeps trying: still exactly one leader.
    const firstRV = (await client.get<V1Lease>(leaseGVR, leaseName, NS)).metadata?.resourceVersion;
    const rvs = new Set([firstRV]);
    await waitFor('three renewals', async () => {
      rvs.add((await client.get<V1Lease>(leaseGVR, leaseName, NS)).metadata?.resourceVersion);
      return rvs.size >= 4;
    });
    expect(electors.filter((e) => e.isLeader())).toHaveLength(1);
    const li = electors[0]!.isLeader() ? 0 : 1;
    const leader = electors[li]!;
    const follower = electors[1 - li]!;
    const before = await client.get<V1Lease>(leaseGVR, leaseName, NS);
    expect(before.spec?.holderIdentity).toBe(leader.identity);
    expect(String(before.spec?.renewTime)).toMatch(/\.\d{6}Z$/);

    stores[li]!.kill();
    await waitFor('takeover', () => follower.isLeader(), 15_000);
    // The dead leader gave up (renew deadline) before the other could lead; timings: the fake-clock unit tests.
    expect(transitions).toEqual([`start ${li}`, `stop ${li}`, `start ${1 - li}`]);
    expect(maxLeaders).toBe(1);
    expect(leader.isLeader()).toBe(false);
    expect(await runs[li]).toBe('renew-deadline');
    const after = await client.get<V1Lease>(leaseGVR, leaseName, NS);
    expect(after.spec?.holderIdentity).toBe(follower.identity);
    expect(after.spec?.leaseTransitions).toBe((before.spec?.leaseTransitions ?? 0) + 1);

    await follower.stop();
    expect(await runs[1 - li]).toBe('stopped');
    const released = await client.get<V1Lease>(leaseGVR, leaseName, NS);
    expect(released.spec?.holderIdentity ?? '').toBe('');
  });

  it('losing leadership aborts a reconcile blocked in an API call, and its later writes never reach the server', async () => {
    const leaseName = `runtime-abort-${suffix}`;
    const store = killable(kubeLeaseStore(client, NS, leaseName));
    const lost: string[] = [];
    const mgr = new Manager({
      kubeConfig: adminKubeConfig(),
      http: false,
      registry: new Registry(),
      leaderElection: { leaseName, leaseNamespace: NS, identity: 'abort-test', store, ...timing },
      onLeadershipLost: (r) => lost.push(r),
    });
    const inf = mgr.informer(cmGVR, { namespace: NS, labelSelector: `abort-test=${suffix}` });
    let blocked = false;
    let outcome: unknown;
    let settled = false;
    mgr
      .addController({
        name: 'blocker',
        reconcile: async (req) => {
          blocked = true;
          try {
            // The API server answers this only after 5 minutes: a watch of something that never changes.
            await mgr.client.request(HttpMethod.GET, `/api/v1/namespaces/${NS}/configmaps`, {
              query: { watch: 'true', timeoutSeconds: 300, fieldSelector: 'metadata.name=never-there' },
            });
            outcome = 'answered';
          } catch (err) {
            outcome = err;
          }
          // A careless reconcile that goes on writing after its call failed.
          await mgr.client.create(cmGVR, cm(`late-${req.name}`)).catch(() => {});
          settled = true;
          return undefined;
        },
      })
      .for(inf);
    await mgr.start();
    await mgr.elected();
    await client.create(cmGVR, {
      ...cm('trigger'),
      metadata: { name: 'trigger', namespace: NS, labels: { 'abort-test': suffix } },
    });
    await waitFor('the reconcile blocked in its API call', () => blocked);
    store.kill(); // renewals hang from now on: the renew deadline ends leadership
    await waitFor('leadership lost and the reconcile settled', () => lost.length > 0 && settled);
    expect(lost).toEqual(['renew-deadline']);
    expect(String(outcome)).toContain('leadership lost');
    expect(isNotFound(await client.get(cmGVR, 'late-trigger', NS).catch((e: unknown) => e))).toBe(true);
    await mgr.stop(1000);
  });
});
