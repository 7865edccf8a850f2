// The network controller's loop with in-memory informers, a fake API client and a scripted backend: debounced and
// serialized applies, port status writes, plug() and its wake-ups, idle filtering and failure handling.
import type { KubernetesObject } from '@kubernetes/client-node';
import { Registry } from 'prom-client';
import { describe, expect, it } from 'vitest';
import { PORT_DEVICE_LABEL, PORT_READY, SERVER_NODE_LABEL } from '../../../operator/src/api/index.ts';
import { FakeClock, type GVR, type Manager, silentLogger } from '../../../operator/src/runtime/index.ts';
import { FakeSource, metricValue } from '../../../operator/src/runtime/testing.ts';
import type { ApplyResult, NetworkBackend, NodeNetworkPlan } from './backend.ts';
import { NetworkController, NetworkNotReadyError } from './controller.ts';
import type { NetworkObj, PortObj, ServerObj } from './plan.ts';

const NODE = 'n1';
const NS = 'p';

class FakeInformer<T extends KubernetesObject> extends FakeSource<T> {
  synced = true;
  list(): T[] {
    return [...this.objects.values()];
  }
  hasSynced(): boolean {
    return this.synced;
  }
}

/** A backend whose applies can be held open and made to fail. */
class ScriptedBackend implements NetworkBackend {
  readonly name = 'noop' as const;
  readonly vifType = 'noop' as const;
  plans: NodeNetworkPlan[] = [];
  hold: Promise<void> | undefined;
  fail: Error | undefined;
  notReady = new Set<string>();
  async init(): Promise<void> {}
  async close(): Promise<void> {}
  async apply(plan: NodeNetworkPlan): Promise<ApplyResult> {
    this.plans.push(plan);
    await this.hold;
    if (this.fail) throw this.fail;
    return {
      ports: Object.fromEntries(
        plan.ports.map((p) => [
          p.id,
          this.notReady.has(p.name) ? { ready: false, message: 'no tap' } : { ready: true },
        ]),
      ),
      changes: [`${plan.ports.length} ports`],
    };
  }
}

function setup(retained?: () => ServerObj[]) {
  const clock = new FakeClock();
  const informers = new Map<string, FakeInformer<KubernetesObject>>();
  const informerFor = (plural: string) => {
    const i = informers.get(plural) ?? new FakeInformer<KubernetesObject>();
    informers.set(plural, i);
    return i;
  };
  const ports = informerFor('ports') as unknown as FakeInformer<PortObj>;
  const networks = informerFor('networks') as unknown as FakeInformer<NetworkObj>;
  const servers = new FakeInformer<ServerObj>();
  let rv = 1;
  const writes: { name: string; status: Record<string, unknown> }[] = [];
  const client = {
    async patch(_gvr: GVR, name: string, ns: string, body: { status: Record<string, unknown> }) {
      const cur = ports.objects.get(`${ns}/${name}`)!;
      const status: Record<string, unknown> = { ...(cur.status ?? {}) };
      for (const [k, v] of Object.entries(body.status)) {
        if (v === null) delete status[k];
        else status[k] = v;
      }
      writes.push({ name, status: body.status });
      const next = { ...cur, metadata: { ...cur.metadata, resourceVersion: String(++rv) }, status } as PortObj;
      ports.update(next);
      return next;
    },
    async get(_gvr: GVR, name: string, ns: string) {
      return ports.objects.get(`${ns}/${name}`);
    },
  };
  const registry = new Registry();
  const manager = {
    client,
    registry,
    logger: silentLogger(),
    informer: (gvr: GVR) => informerFor(gvr.plural),
  } as unknown as Manager;
  const backend = new ScriptedBackend();
  const woken: string[] = [];
  const ctl = new NetworkController({
    manager,
    nodeName: NODE,
    hostIP: '10.9.0.1',
    backend,
    servers: servers as never,
    clock,
    resyncMs: 30_000,
    ...(retained ? { retained } : {}),
  });
  ctl.onWake = (k) => woken.push(k);
  return { clock, ports, networks, servers, backend, ctl, writes, woken, registry, informerFor };
}

const net: NetworkObj = {
  metadata: { name: 'net', namespace: NS, uid: 'net-uid' },
  spec: { subnets: [{ name: 'v4', cidr: '10.0.0.0/24' }] },
  status: {
    segmentationID: 7,
    mtu: 1450,
    subnets: [{ name: 'v4', cidr: '10.0.0.0/24', ipVersion: 4, gatewayIP: '10.0.0.1' }],
  },
};

function port(name: string, server: string, o: { host?: string; ip?: string } = {}): PortObj {
  return {
    metadata: {
      name,
      namespace: NS,
      uid: `uid-${name}`,
      resourceVersion: '1',
      labels: { [PORT_DEVICE_LABEL]: server },
    },
    spec: { network: 'net', securityGroups: [] },
    status: {
      macAddress: 'fa:16:3e:00:00:01',
      fixedIPs: [{ subnet: 'v4', ipAddress: o.ip ?? '10.0.0.5' }],
      conditions: [{ type: PORT_READY, status: 'True' }],
      ...(o.host ? { bindingHost: o.host } : {}),
    },
  };
}

/** The Bound condition the agent wrote (status.status is the operator's, derived from it). */
const boundOf = (p: PortObj) =>
  p.status?.conditions?.find((c) => c.type === 'Bound') as { status: string; reason: string } | undefined;

function server(name: string): ServerObj {
  return {
    metadata: { name, namespace: NS, uid: `srv-${name}`, labels: { [SERVER_NODE_LABEL]: NODE } },
    spec: { networks: [{ network: 'net' }] },
    status: { node: NODE },
  };
}

describe('NetworkController', () => {
  it('waits in plug() until the port is wired, wakes the server, binds the port', async () => {
    const t = setup();
    t.networks.add(net);
    t.ctl.start();
    t.servers.add(server('web'));
    await expect(t.ctl.plug(server('web'))).rejects.toThrow(/port web-0 does not exist yet/);
    await t.clock.advance(100);
    expect(t.woken).toEqual([]);

    t.ports.add(port('web-0', 'web'));
    await expect(t.ctl.plug(server('web'))).rejects.toBeInstanceOf(NetworkNotReadyError); // not applied yet
    await t.clock.advance(100);
    expect(t.woken).toEqual([`${NS}/web`]);
    const nics = await t.ctl.plug(server('web'));
    expect(nics).toEqual([
      expect.objectContaining({ device: 'stt-uidweb0', mac: 'fa:16:3e:00:00:01', addresses: ['10.0.0.5/24'] }),
    ]);
    const p = t.ports.objects.get(`${NS}/web-0`)!;
    expect(p.status).toMatchObject({ bindingHost: NODE, vifType: 'noop' });
    expect(boundOf(p)).toMatchObject({ status: 'True', reason: 'Wired' });
    expect(await metricValue(t.registry, 'stratus_agent_network_apply_duration_seconds')).toBeGreaterThan(0);
    await t.ctl.stop();
  });

  it('debounces bursts and serializes applies (changes during an apply cause exactly one more)', async () => {
    const t = setup();
    t.networks.add(net);
    t.ctl.start();
    await t.clock.advance(100);
    const before = t.backend.plans.length;
    for (let i = 0; i < 5; i++) t.servers.add(server(`s${i}`));
    for (let i = 0; i < 5; i++) t.ports.add(port(`s${i}-0`, `s${i}`, { ip: `10.0.0.${10 + i}` }));
    await t.clock.advance(100);
    expect(t.backend.plans.length).toBe(before + 1);
    expect(t.backend.plans.at(-1)!.ports).toHaveLength(5);

    let release!: () => void;
    t.backend.hold = new Promise((r) => {
      release = r;
    });
    t.servers.delete(server('s0'));
    await t.clock.advance(100); // apply #2 starts and hangs
    t.servers.delete(server('s1'));
    await t.clock.advance(100);
    t.servers.delete(server('s2'));
    await t.clock.advance(100);
    expect(t.backend.plans.length).toBe(before + 2);
    t.backend.hold = undefined;
    release();
    await t.clock.advance(100);
    expect(t.backend.plans.length).toBe(before + 3);
    expect(t.backend.plans.at(-1)!.ports.map((p) => p.name)).toEqual(['s3-0', 's4-0']);
    // the ports of deleted servers were bound here: unbound now
    for (const n of ['s0-0', 's1-0', 's2-0']) {
      expect(boundOf(t.ports.objects.get(`${NS}/${n}`)!)).toMatchObject({ status: 'False', reason: 'Unbound' });
      expect(t.ports.objects.get(`${NS}/${n}`)!.status?.bindingHost).toBeUndefined();
    }
    await t.ctl.stop();
  });

  it('does not call the backend for an unchanged plan, except on the periodic resync', async () => {
    const t = setup();
    t.networks.add(net);
    t.servers.add(server('web'));
    t.ports.add(port('web-0', 'web'));
    t.ctl.start();
    await t.clock.advance(100);
    const n = t.backend.plans.length;
    t.servers.update({ ...server('web'), metadata: { ...server('web').metadata, annotations: { x: 'y' } } });
    await t.clock.advance(100);
    expect(t.backend.plans.length).toBe(n);
    await t.clock.advance(30_000);
    expect(t.backend.plans.length).toBe(n + 1);
    await t.ctl.stop();
  });

  it('an idle node ignores other nodes’ objects but still unbinds ports bound to it', async () => {
    const t = setup();
    t.networks.add(net);
    t.ctl.start();
    await t.clock.advance(100);
    const n = t.ctl.rebuilds;
    t.ports.add(port('far-0', 'far', { host: 'n2' }));
    t.networks.update({ ...net, spec: { ...net.spec, adminStateUp: false } });
    await t.clock.advance(100);
    expect(t.ctl.rebuilds).toBe(n);
    t.ports.add(port('stale-0', 'gone', { host: NODE }));
    await t.clock.advance(100);
    expect(boundOf(t.ports.objects.get(`${NS}/stale-0`)!)).toMatchObject({ status: 'False', reason: 'Unbound' });
    expect(t.ports.objects.get(`${NS}/far-0`)!.status?.bindingHost).toBe('n2');
    await t.ctl.stop();
  });

  it('a network whose status loses its VNI, MTU and subnets (NetworkInUse write) keeps the ports wired', async () => {
    const t = setup();
    t.networks.add(net);
    t.ctl.start();
    t.servers.add(server('web'));
    t.ports.add(port('web-0', 'web'));
    await t.clock.advance(100);
    const wired = t.ctl.lastPlan;
    expect(wired?.ports).toHaveLength(1);
    const applies = t.backend.plans.length;
    t.networks.update({
      ...net,
      metadata: { ...net.metadata, deletionTimestamp: new Date() },
      status: { conditions: [{ type: 'Ready', status: 'False' }] },
    });
    await t.clock.advance(100);
    expect(t.ctl.lastPlan).toEqual(wired);
    expect(t.backend.plans.length).toBe(applies); // nothing to apply
    expect(await t.ctl.plug(server('web'))).toHaveLength(1);
    await t.ctl.stop();
  });

  it('a server that left the informer but whose guest is retained keeps its ports until released', async () => {
    let retained: ServerObj[] = [];
    const t = setup(() => retained);
    t.networks.add(net);
    t.ctl.start();
    const web = server('web');
    t.servers.add(web);
    t.ports.add(port('web-0', 'web'));
    await t.clock.advance(100);
    expect(t.ctl.lastPlan?.ports.map((p) => p.name)).toEqual(['web-0']);
    // kubectl label: the server leaves the informer; the compute service keeps its guest and retains it
    retained = [{ ...web, metadata: { ...web.metadata, labels: { [SERVER_NODE_LABEL]: 'n2' } } }];
    t.servers.delete(web);
    await t.clock.advance(100);
    expect(t.ctl.lastPlan?.ports.map((p) => p.name)).toEqual(['web-0']);
    expect(boundOf(t.ports.objects.get(`${NS}/web-0`)!)).toMatchObject({ status: 'True', reason: 'Wired' });
    // the guest is destroyed (server deleted or moved): released
    retained = [];
    t.ctl.refresh();
    await t.clock.advance(100);
    expect(t.ctl.lastPlan?.ports).toEqual([]);
    expect(boundOf(t.ports.objects.get(`${NS}/web-0`)!)).toMatchObject({ status: 'False', reason: 'Unbound' });
    await t.ctl.stop();
  });

  it('a failed apply keeps wired ports ready, leaves the status of ports it never wired alone, and retries', async () => {
    const t = setup();
    t.networks.add(net);
    t.servers.add(server('a'));
    t.ports.add(port('a-0', 'a'));
    t.ctl.start();
    await t.clock.advance(100);
    t.backend.fail = new Error('bridge exploded');
    t.servers.add(server('b'));
    t.ports.add(port('b-0', 'b', { ip: '10.0.0.6' }));
    await t.clock.advance(100);
    expect(boundOf(t.ports.objects.get(`${NS}/a-0`)!)).toMatchObject({ status: 'True', reason: 'Wired' });
    expect(t.ports.objects.get(`${NS}/b-0`)!.status?.bindingHost).toBeUndefined();
    await expect(t.ctl.plug(server('b'))).rejects.toThrow(/not wired on this node yet: apply failed: bridge exploded/);
    expect(await t.ctl.plug(server('a'))).toHaveLength(1);
    expect(await metricValue(t.registry, 'stratus_agent_network_apply_errors_total', { backend: 'noop' })).toBe(1);
    t.backend.fail = undefined;
    await t.clock.advance(5000);
    expect(boundOf(t.ports.objects.get(`${NS}/b-0`)!)).toMatchObject({ status: 'True', reason: 'Wired' });
    expect(t.woken).toContain(`${NS}/b`);
    await t.ctl.stop();
  });

  it('after a restart, a failing first apply does not flip ports bound here to BUILD', async () => {
    const t = setup();
    t.networks.add(net);
    t.servers.add(server('a'));
    const bound = port('a-0', 'a', { host: NODE });
    bound.status = { ...bound.status, status: 'ACTIVE', vifType: 'noop' };
    t.ports.add(bound);
    t.backend.fail = new Error('nft busy');
    t.ctl.start();
    await t.clock.advance(100);
    expect(t.ports.objects.get(`${NS}/a-0`)!.status).toMatchObject({ status: 'ACTIVE', bindingHost: NODE });
    expect(boundOf(t.ports.objects.get(`${NS}/a-0`)!)).toBeUndefined(); // no Bound False (the operator's BUILD)
    t.backend.fail = undefined;
    await t.clock.advance(5000);
    expect(t.ports.objects.get(`${NS}/a-0`)!.status).toMatchObject({ status: 'ACTIVE', bindingHost: NODE });
    expect(boundOf(t.ports.objects.get(`${NS}/a-0`)!)).toMatchObject({ status: 'True', reason: 'Wired' });
    expect(await t.ctl.plug(server('a'))).toHaveLength(1);
    await t.ctl.stop();
  });

  it('a port the backend reports not ready stays BUILD with the reason, and the server keeps waiting', async () => {
    const t = setup();
    t.networks.add(net);
    t.servers.add(server('web'));
    t.ports.add(port('web-0', 'web'));
    t.backend.notReady.add('web-0');
    t.ctl.start();
    await t.clock.advance(100);
    const p = t.ports.objects.get(`${NS}/web-0`)!;
    expect(p.status?.status).toBeUndefined(); // the operator's field: it shows BUILD, derived from Bound False
    expect(p.status?.conditions?.find((c) => c.type === 'Bound')).toMatchObject({
      status: 'False',
      reason: 'WiringFailed',
      message: expect.stringContaining('no tap'),
    });
    await expect(t.ctl.plug(server('web'))).rejects.toThrow(/no tap/);
    const writes = t.writes.length;
    await t.clock.advance(30_000); // resync: same result, no new write
    expect(t.writes.length).toBe(writes);
    await t.ctl.stop();
  });

  it('does nothing until the caches are synced', async () => {
    const t = setup();
    t.networks.add(net);
    (t.informerFor('hypervisors') as FakeInformer<KubernetesObject>).synced = false;
    t.ctl.start();
    await t.clock.advance(1000);
    expect(t.backend.plans).toEqual([]);
    await expect(t.ctl.plug(server('web'))).rejects.toThrow(/not synced/);
    (t.informerFor('hypervisors') as FakeInformer<KubernetesObject>).synced = true;
    await t.clock.advance(300);
    expect(t.backend.plans).toHaveLength(1);
    await t.ctl.stop();
  });
});
