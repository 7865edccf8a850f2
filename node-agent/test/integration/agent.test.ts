// The node agent against a real kube-apiserver, with the fake driver. The test plays the operator by hand: it creates
// Servers and binds them (label, then status as the scheduler would), and checks that the agent drives each guest
// through the lifecycle contract, keeps its Hypervisor current, and cleans up after deletion, rebinding and orphans.
import { randomBytes } from 'node:crypto';
import type { EventsV1Event, KubernetesObject, V1Lease } from '@kubernetes/client-node';
import { PatchStrategy } from '@kubernetes/client-node';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { adminKubeConfig } from '../../../e2e/controlplane/testenv.ts';
import { waitFor as poll } from '../../../e2e/testing/wait.ts';
import {
  deriveServerState,
  GUEST_FINALIZER,
  type Hypervisor,
  NODE_LEASE_LABEL,
  NODE_LEASE_NAMESPACE,
  nodeLeaseName,
  SERVER_FINALIZER,
  SERVER_NODE_LABEL,
  type ServerStatus,
} from '../../../operator/src/api/index.ts';
import { installCRDs } from '../../../operator/src/crdgen/install.ts';
import {
  createLogger,
  eventGVR,
  type GVR,
  isNotFound,
  KubeClient,
  leaseGVR,
  updateStatus,
} from '../../../operator/src/runtime/index.ts';
import { type RunningAgent, startAgent, startFakeNodes } from '../../src/agent.ts';
import { SERVERS, type ServerObject } from '../../src/compute.ts';
import { FAKE_FAIL_ANNOTATION, FakeDriver } from '../../src/drivers/fake.ts';
import { agentFieldManager } from '../../src/fieldmanager.ts';
import { HYPERVISORS } from '../../src/hypervisor.ts';

const suffix = randomBytes(3).toString('hex');
const NS = `agent-${suffix}`;
const NODE = `node-${suffix}`;
const nsGVR: GVR = { group: '', version: 'v1', plural: 'namespaces' };

type Srv = ServerObject & { status?: ServerStatus & Record<string, unknown> };

let client: KubeClient;
let driver: FakeDriver;
let agent: RunningAgent;
const hypervisors: string[] = [NODE];

const waitFor = <T>(what: string, fn: () => Promise<T | undefined | false>, timeoutMs = 20_000): Promise<T> =>
  poll(what, fn, timeoutMs, 100);

/** The Server as stored. */
const rawServer = (name: string) => client.get<Srv>(SERVERS, name, NS);
/** The Server as the operator shows it (see derived). */
const getServer = async (name: string) => derived(await rawServer(name));

/**
 * The Server as the operator shows it (no operator runs here): its state fields (vmState, taskState, status,
 * powerState, fault, actions) derived from the agent's report status.compute, as the operator writes them.
 */
function derived<T extends { status?: unknown }>(s: T): T {
  const st = structuredClone((s.status ?? {}) as Record<string, unknown>);
  deriveServerState(st);
  return { ...s, status: st };
}

const condition = (s: Srv, type: string) => s.status?.conditions?.find((c) => c.type === type);

async function waitServer(name: string, what: string, ok: (s: Srv) => boolean, timeoutMs?: number): Promise<Srv> {
  return waitFor(
    `${name}: ${what}`,
    async () => {
      const s = await getServer(name);
      return ok(s) ? s : undefined;
    },
    timeoutMs,
  );
}

/**
 * "Nothing more happens" without a sleep: waits until the agent's own informer holds server `name` in a state that
 * satisfies `seen` (so the write under test has reached it), then until every controller of the agent is idle (no key
 * queued, no reconcile in flight).
 */
async function agentSettled(name: string, seen: (s: Srv) => boolean): Promise<void> {
  await waitFor(`the agent to see ${name}`, async () => {
    const s = agent.agent.compute.servers.get(name, NS) as Srv | undefined;
    return s !== undefined && seen(derived(s));
  });
  await agent.manager.idle();
}

async function patchServer(name: string, patch: Record<string, unknown>): Promise<Srv> {
  return client.patch<Srv>(SERVERS, name, NS, patch, PatchStrategy.MergePatch);
}

async function events(name: string): Promise<EventsV1Event[]> {
  const list = await client.list<EventsV1Event & KubernetesObject>(eventGVR, { namespace: NS });
  return (list.items ?? []).filter((e) => e.regarding?.name === name);
}

/** The agent records Events asynchronously: waits for the first one about `name` with `reason`. */
function waitEvent(name: string, reason: string): Promise<EventsV1Event> {
  return waitFor(`${name}: event ${reason}`, async () => (await events(name)).find((e) => e.reason === reason));
}

/** Creates a Server and binds it to `node` as the operator does: label first, then status. */
async function createAndBind(name: string, node = NODE, annotations: Record<string, string> = {}): Promise<Srv> {
  await client.create<Srv>(SERVERS, {
    apiVersion: 'compute.stratus.io/v1alpha1',
    kind: 'Server',
    metadata: { name, namespace: NS, finalizers: [SERVER_FINALIZER], annotations },
    spec: { flavor: 'm1.small', image: 'cirros', powerState: 'Running' },
  });
  const labelled = await patchServer(name, { metadata: { labels: { [SERVER_NODE_LABEL]: node } } });
  return updateStatus(client, SERVERS, labelled, (st) => ({
    ...st,
    node,
    flavor: { name: 'm1.small', vcpus: 2, ram: '2Gi', disk: '20Gi', ephemeral: '0', swap: '0' },
    allocation: { vcpus: 2, ramMiB: 2048, diskGiB: 20 },
    image: 'cirros',
    vmState: 'building',
    taskState: 'spawning',
    status: 'BUILD',
    conditions: [
      {
        type: 'Scheduled',
        status: 'True',
        reason: 'Scheduled',
        message: `placed on ${node}`,
        lastTransitionTime: new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
      },
    ],
  }));
}

/** STRATUS_TEST_LOG=<file> writes the agent's debug log there. */
const logger = process.env.STRATUS_TEST_LOG
  ? createLogger({ level: 'debug', destination: pino.destination({ dest: process.env.STRATUS_TEST_LOG, sync: true }) })
  : undefined;

function start(d: FakeDriver): Promise<RunningAgent> {
  return startAgent({
    ...(logger ? { logger } : {}),
    kubeConfig: adminKubeConfig(),
    nodeName: NODE,
    driver: d,
    labels: { 'topology.kubernetes.io/zone': 'az-test' },
    hostIP: '192.0.2.10',
    heartbeatSeconds: 1,
    powerOffTimeoutSeconds: 1,
    orphanGraceSeconds: 1,
    orphanSweepSeconds: 1,
  });
}

beforeAll(async () => {
  const kc = adminKubeConfig();
  await installCRDs(kc);
  client = new KubeClient(kc);
  await client.create(nsGVR, { apiVersion: 'v1', kind: 'Namespace', metadata: { name: NS } });
  driver = new FakeDriver({ vcpus: 8, ram: '16Gi', disk: '100Gi' });
  agent = await start(driver);
});

afterAll(async () => {
  await agent?.stop();
  if (client) {
    const list = await client.list<Srv>(SERVERS, { namespace: NS }).catch(() => ({ items: [] as Srv[] }));
    for (const s of list.items ?? []) {
      await client
        .patch(SERVERS, s.metadata?.name ?? '', NS, { metadata: { finalizers: null } }, PatchStrategy.MergePatch)
        .catch(() => {});
    }
    await client.delete(nsGVR, NS).catch(() => {});
    for (const h of hypervisors) {
      await client.delete(HYPERVISORS, h).catch(() => {});
      await client.delete(leaseGVR, nodeLeaseName(h), NODE_LEASE_NAMESPACE).catch(() => {});
    }
  }
});

describe('node agent (fake driver) against kube-apiserver', () => {
  let uid = '';

  it('creates its Hypervisor with labels, capacity and allocatable, and renews its node Lease', async () => {
    const hv = await waitFor('hypervisor status', async () => {
      const h = await client.get<Hypervisor & KubernetesObject>(HYPERVISORS, NODE);
      return h.status?.capacity && h.status.conditions?.some((c) => c.status === 'True') ? h : undefined;
    });
    expect(hv.metadata.labels).toMatchObject({ 'topology.kubernetes.io/zone': 'az-test' });
    expect(hv.spec).toMatchObject({ enabled: true, cpuAllocationRatio: '4.0' });
    expect(hv.status).toMatchObject({
      hostIP: '192.0.2.10',
      driver: 'fake',
      accelerator: 'kvm',
      networkBackend: 'noop',
      capacity: { vcpus: 8, ram: '16Gi', disk: '100Gi' },
      allocatable: { vcpus: 32, ram: '15872Mi', disk: '100Gi' },
      usage: { vcpus: 0, servers: 0 },
    });
    // Liveness is the node Lease, renewed every heartbeat; the status is written only when something changed.
    const lease = await waitFor('the node lease', () =>
      client.get<V1Lease>(leaseGVR, nodeLeaseName(NODE), NODE_LEASE_NAMESPACE).catch(() => undefined),
    );
    expect(lease.spec?.holderIdentity).toBe(NODE);
    expect(lease.metadata?.labels?.[NODE_LEASE_LABEL]).toBe(NODE);
    await waitFor('a later renewal', async () => {
      const l = await client.get<V1Lease>(leaseGVR, nodeLeaseName(NODE), NODE_LEASE_NAMESPACE);
      return String(l.spec?.renewTime) !== String(lease.spec?.renewTime);
    });
    expect(Object.keys(hv.status ?? {})).not.toContain('lastHeartbeatTime');
    // status.state and status.status are the operator's: the agent's field manager never owns them
    type MF = { manager: string; subresource?: string; fieldsV1?: { 'f:status'?: Record<string, unknown> } };
    const mine = (hv.metadata as { managedFields?: MF[] }).managedFields?.find(
      (m) => m.manager === agentFieldManager(NODE) && m.subresource === 'status',
    );
    expect(Object.keys(mine?.fieldsV1?.['f:status'] ?? {})).toEqual(expect.arrayContaining(['f:capacity', 'f:usage']));
    expect(mine?.fieldsV1?.['f:status']).not.toHaveProperty('f:state');
    expect(mine?.fieldsV1?.['f:status']).not.toHaveProperty('f:status');
  });

  it('spawns a bound server: ACTIVE / RUNNING, guest finalizer, create action, usage', async () => {
    await createAndBind('web');
    const s = await waitServer('web', 'ACTIVE', (x) => x.status?.status === 'ACTIVE');
    uid = s.metadata!.uid!;
    expect(s.status).toMatchObject({
      vmState: 'active',
      powerState: 'RUNNING',
      accelerator: 'kvm',
      node: NODE,
      triggers: {},
    });
    expect(s.status?.taskState).toBeUndefined();
    expect(s.status?.launchedAt).toBeTruthy();
    expect(s.metadata?.finalizers).toEqual(expect.arrayContaining([SERVER_FINALIZER, GUEST_FINALIZER]));
    expect(s.status?.actions).toEqual([expect.objectContaining({ action: 'create', result: 'Success' })]);
    expect(condition(s, 'Ready')).toMatchObject({ status: 'True', reason: 'Running' });
    expect(condition(s, 'ActionRefused')).toMatchObject({ status: 'False' });
    expect(condition(s, 'Scheduled')).toMatchObject({ status: 'True' }); // the operator's condition is kept
    expect(await driver.state(uid)).toMatchObject({ powerState: 'RUNNING' });
    await waitFor('usage', async () => {
      const h = await client.get<Hypervisor & KubernetesObject>(HYPERVISORS, NODE);
      return h.status?.usage?.servers === 1 && h.status.usage.vcpus === 2 && h.status.usage.ram === '2048Mi';
    });
    await waitEvent('web', 'Spawned');
  });

  it('Stopped -> SHUTOFF', async () => {
    await patchServer('web', { spec: { powerState: 'Stopped' } });
    const s = await waitServer('web', 'SHUTOFF', (x) => x.status?.status === 'SHUTOFF');
    expect(s.status).toMatchObject({ vmState: 'stopped', powerState: 'SHUTDOWN' });
    expect(s.status?.actions?.at(-1)).toMatchObject({ action: 'stop', result: 'Success' });
    expect(condition(s, 'Ready')).toMatchObject({ status: 'True', reason: 'Stopped' });
    expect(await driver.state(uid)).toMatchObject({ powerState: 'SHUTDOWN' });
    await waitEvent('web', 'Stopped');
  });

  it('Paused from SHUTOFF is refused: ActionRefused, a Warning, nothing attempted', async () => {
    const pausesBefore = driver.calls.filter((c) => c.op === 'pause').length;
    await patchServer('web', { spec: { powerState: 'Paused' } });
    const s = await waitServer('web', 'ActionRefused', (x) => condition(x, 'ActionRefused')?.status === 'True');
    expect(condition(s, 'ActionRefused')?.message).toMatch(/cannot pause a server in vm_state stopped/);
    expect(condition(s, 'Ready')).toMatchObject({ status: 'False', reason: 'ActionRefused' });
    expect(s.status?.status).toBe('SHUTOFF');
    expect(driver.calls.filter((c) => c.op === 'pause').length).toBe(pausesBefore);
    await waitFor('ActionRefused event', async () => {
      const e = (await events('web')).find((x) => x.reason === 'ActionRefused');
      return e?.type === 'Warning';
    });
  });

  it('Running -> ACTIVE, refusal cleared', async () => {
    await patchServer('web', { spec: { powerState: 'Running' } });
    const s = await waitServer('web', 'ACTIVE', (x) => x.status?.status === 'ACTIVE');
    expect(s.status?.powerState).toBe('RUNNING');
    expect(condition(s, 'ActionRefused')).toMatchObject({ status: 'False' });
    expect(s.status?.actions?.at(-1)).toMatchObject({ action: 'start', result: 'Success' });
  });

  it('a hard reboot token is handled exactly once', async () => {
    const pid = (await driver.state(uid))?.pid;
    await patchServer('web', { spec: { triggers: { hardReboot: 't1' } } });
    const s = await waitServer('web', 'token recorded', (x) => x.status?.triggers?.hardReboot === 't1');
    expect(s.status?.status).toBe('ACTIVE');
    expect((await driver.state(uid))?.pid).not.toBe(pid);
    const reboots = () => driver.calls.filter((c) => c.op === 'reboot' && c.id === uid).length;
    expect(reboots()).toBe(1);
    await agentSettled('web', (x) => x.status?.triggers?.hardReboot === 't1');
    expect(reboots()).toBe(1);
    await patchServer('web', { metadata: { annotations: { touch: '1' } } }); // another event: still no second reboot
    await agentSettled('web', (x) => x.metadata?.annotations?.touch === '1');
    expect(reboots()).toBe(1);
    const after = await getServer('web');
    expect(after.status?.actions?.filter((a) => a.action === 'hardReboot')).toEqual([
      expect.objectContaining({ result: 'Success' }),
    ]);
    await waitEvent('web', 'Rebooted');
  });

  it('a crashed guest is recorded and started again (spec.powerState Running)', async () => {
    const startsBefore = driver.calls.filter((c) => c.op === 'powerOn' && c.id === uid).length;
    driver.crash(uid, 'simulated kernel panic');
    const s = await waitServer(
      'web',
      'restarted',
      (x) =>
        x.status?.status === 'ACTIVE' &&
        x.status.actions?.at(-1)?.action === 'start' &&
        x.status.actions.some((a) => a.action === 'exit'),
    );
    expect(s.status?.actions?.find((a) => a.action === 'exit')).toMatchObject({
      result: 'Error',
      message: 'guest crashed: simulated kernel panic',
    });
    expect(await driver.state(uid)).toMatchObject({ powerState: 'RUNNING' });
    expect(driver.calls.filter((c) => c.op === 'powerOn' && c.id === uid).length).toBe(startsBefore + 1);
    const e = await waitEvent('web', 'GuestCrashed');
    expect(e.type).toBe('Warning');
    expect(e.note).toContain('guest crashed: simulated kernel panic; starting it again');
  });

  it('after an agent restart it adopts the running guest (no second guest, no restart)', async () => {
    const before = await driver.state(uid);
    const spawns = driver.calls.filter((c) => c.op === 'spawn').length;
    await agent.stop();
    agent = await start(driver);
    await agentSettled('web', (x) => x.status?.status === 'ACTIVE'); // the restarted agent has reconciled it
    expect(await driver.state(uid)).toEqual(before);
    expect(driver.calls.filter((c) => c.op === 'spawn').length).toBe(spawns);
    expect(driver.size).toBe(1);
    expect((await getServer('web')).status?.status).toBe('ACTIVE');
  });

  it('a failed spawn ends in ERROR with a fault; a hard reboot recreates the guest', async () => {
    await createAndBind('broken', NODE, { [FAKE_FAIL_ANNOTATION]: 'spawn' });
    const s = await waitServer('broken', 'ERROR', (x) => x.status?.status === 'ERROR');
    expect(s.status?.fault).toMatchObject({ code: 500, message: expect.stringContaining('injected failure') });
    expect(s.status).toMatchObject({ vmState: 'error', powerState: 'NOSTATE' });
    expect(s.status?.taskState).toBeUndefined();
    expect(s.status?.actions?.at(-1)).toMatchObject({ action: 'create', result: 'Error' });
    expect(await driver.state(s.metadata!.uid!)).toBeUndefined();
    expect((await waitEvent('broken', 'SpawnFailed')).type).toBe('Warning');
    // late events (finalizer, status) must not retry the spawn
    await agentSettled('broken', (x) => x.status?.status === 'ERROR');
    expect(driver.calls.filter((c) => c.op === 'spawn' && c.id === s.metadata!.uid).length).toBe(1);

    await patchServer('broken', {
      metadata: { annotations: { [FAKE_FAIL_ANNOTATION]: null } },
      spec: { triggers: { hardReboot: 'fix' } },
    });
    const fixed = await waitServer('broken', 'ACTIVE', (x) => x.status?.status === 'ACTIVE');
    expect(fixed.status?.fault).toBeUndefined();
    expect(fixed.status?.triggers?.hardReboot).toBe('fix');
    expect(await driver.state(fixed.metadata!.uid!)).toMatchObject({ powerState: 'RUNNING' });
  });

  it('a changed node label alone keeps the guest (Event, Placement condition); a recorded move removes it', async () => {
    const s = await getServer('broken');
    const id = s.metadata!.uid!;
    // count the orphan sweeps that complete from now on (the settle signal of the "nothing destroyed" check)
    const destroys = () => driver.calls.filter((c) => c.op === 'destroy' && c.id === id).length;
    const destroyed = destroys();
    const compute = agent.agent.compute;
    const sweep = compute.sweepOrphans.bind(compute);
    let sweeps = 0;
    compute.sweepOrphans = async () => {
      const n = await sweep();
      sweeps++;
      return n;
    };
    await patchServer('broken', { metadata: { labels: { [SERVER_NODE_LABEL]: 'elsewhere' } } });
    const kept = await waitServer(
      'broken',
      'Placement False NodeLabelMismatch',
      (x) => condition(x, 'Placement')?.reason === 'NodeLabelMismatch',
    );
    expect(condition(kept, 'Placement')).toMatchObject({ status: 'False' });
    expect(condition(kept, 'Placement')?.message).toMatch(/names elsewhere .* no move away from/);
    await waitFor('a NodeLabelMismatch Event', async () =>
      (await events('broken')).some((e) => e.reason === 'NodeLabelMismatch' && e.type === 'Warning'),
    );
    // orphan sweeps (every second, grace 1 s): the first starts the grace, a later one reads the server and keeps it
    await waitFor('three orphan sweeps', async () => sweeps >= 3);
    compute.sweepOrphans = sweep;
    expect(await driver.state(id)).toMatchObject({ powerState: 'RUNNING' });
    expect(destroys()).toBe(destroyed);

    // the operator records a move away from this node: only now is the guest removed here
    await updateStatus(client, SERVERS, await rawServer('broken'), (st) => ({
      ...st,
      node: 'elsewhere',
      taskState: 'resize_migrated',
      actions: [
        ...((st.actions as unknown[]) ?? []),
        {
          action: 'migrate',
          startTime: new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
          result: 'InProgress',
          message: `${NODE} -> elsewhere`,
        },
      ],
    }));
    await waitFor('guest destroyed', async () => (await driver.state(id)) === undefined);
    // the finalizer is node-agnostic: the agent of the new node owns it now
    expect((await getServer('broken')).metadata?.finalizers).toContain(GUEST_FINALIZER);
  });

  it('a relabelled server that is then deleted loses its guest', async () => {
    const s = await createAndBind('relabel');
    const running = await waitServer('relabel', 'ACTIVE', (x) => x.status?.status === 'ACTIVE');
    const id = running.metadata!.uid!;
    expect(s.metadata?.uid).toBe(id);
    await patchServer('relabel', { metadata: { labels: { [SERVER_NODE_LABEL]: 'elsewhere' } } });
    await waitServer('relabel', 'NodeLabelMismatch', (x) => condition(x, 'Placement')?.reason === 'NodeLabelMismatch');
    expect(await driver.state(id)).toMatchObject({ powerState: 'RUNNING' });
    await client.delete(SERVERS, 'relabel', NS);
    await waitFor('guest destroyed', async () => (await driver.state(id)) === undefined);
    // no agent is bound to it: the one that destroyed the guest releases the guest finalizer
    const gone = await waitServer(
      'relabel',
      'guest finalizer released',
      (x) => !x.metadata?.finalizers?.includes(GUEST_FINALIZER),
    );
    expect(gone.metadata?.finalizers).toEqual([SERVER_FINALIZER]);
  });

  it('destroys orphaned guests after the grace period', async () => {
    await driver.spawn({
      id: `orphan-${suffix}`,
      name: 'ghost',
      namespace: NS,
      vcpus: 1,
      ramMiB: 256,
      disk: { rootGiB: 1, ephemeralGiB: 0, swapMiB: 0 },
      annotations: {},
    });
    await waitFor('orphan destroyed', async () => (await driver.state(`orphan-${suffix}`)) === undefined, 10_000);
    expect(await driver.state(uid)).toBeDefined(); // owned guests are left alone
  });

  it('delete: guest destroyed, guest finalizer released, operator finalizer left', async () => {
    await client.delete(SERVERS, 'web', NS);
    const s = await waitServer(
      'web',
      'guest finalizer released',
      (x) => !x.metadata?.finalizers?.includes(GUEST_FINALIZER),
    );
    expect(s.metadata?.finalizers).toEqual([SERVER_FINALIZER]);
    expect(s.status).toMatchObject({ vmState: 'deleted', powerState: 'NOSTATE', status: 'DELETED' });
    expect(s.status?.actions?.at(-1)).toMatchObject({ action: 'delete', result: 'Success' });
    expect(await driver.state(uid)).toBeUndefined();
    await client.patch(SERVERS, 'web', NS, { metadata: { finalizers: null } }, PatchStrategy.MergePatch);
    await waitFor('server gone', async () => {
      try {
        await getServer('web');
        return false;
      } catch (err) {
        return isNotFound(err);
      }
    });
    await waitFor('usage back to zero', async () => {
      const h = await client.get<Hypervisor & KubernetesObject>(HYPERVISORS, NODE);
      return h.status?.usage?.servers === 0;
    });
  });
});

describe('simulated nodes', () => {
  it('runs several fake nodes in one process, each with its Hypervisor and its own servers', async () => {
    const prefix = `sim-${suffix}`;
    const sim = await startFakeNodes(3, {
      kubeConfig: adminKubeConfig(),
      prefix,
      heartbeatSeconds: 1,
      fake: { vcpus: 4, ram: '8Gi', disk: '50Gi' },
    });
    hypervisors.push(...sim.agents.map((a) => a.nodeName));
    try {
      for (const a of sim.agents) {
        await waitFor(`hypervisor ${a.nodeName}`, async () => {
          const h = await client.get<Hypervisor & KubernetesObject>(HYPERVISORS, a.nodeName);
          return h.status?.capacity?.vcpus === 4 && h.status.conditions !== undefined;
        });
      }
      await createAndBind('sim-server', `${prefix}-1`);
      await waitServer('sim-server', 'ACTIVE', (x) => x.status?.status === 'ACTIVE');
      expect(sim.agents.map((a) => (a.driver as FakeDriver).size)).toEqual([0, 1, 0]);
    } finally {
      await sim.stop();
    }
  });
});
