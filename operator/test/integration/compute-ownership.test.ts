// Status ownership of Ports, Servers and Hypervisors (docs/design/status-ownership.md) through the operator and a fake node agent
// against a real API server: each writer writes under its own field manager (`stratus-operator`,
// `stratus-agent/<node>`; the API server accepts the '/'), and Port.status.status has one writer, the operator,
// which derives ACTIVE from the binding the agent reports. The Server's state fields (vmState, taskState, status,
// powerState, fault, actions) have one writer too, the operator, over a whole lifecycle; the agent writes its report
// status.compute, from which the operator derives them.
import type { KubernetesObject, V1ManagedFieldsEntry } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  deriveServerState,
  NetworkKind,
  PORT_BOUND,
  type Port,
  PortKind,
  SERVER_STATE_FIELDS,
} from '../../src/api/index.ts';
import { gvrOf } from '../../src/controllers/common.ts';
import { ComputeEnv, condition, SERVERS, type Srv, waitFor } from './compute-env.ts';

const PORTS = gvrOf(PortKind);
const NETWORKS = gvrOf(NetworkKind);
const env = new ComputeEnv('own');
let small = '';
let medium = '';
let huge = '';

beforeAll(async () => {
  await env.setup();
  await env.startNodes(1, 'n', { slots: 4 });
  small = await env.flavor('small', 1, 1024);
  medium = await env.flavor('medium', 2, 2048);
  huge = await env.flavor('huge', 1, 64 * 1024);
  await env.client.create(NETWORKS, {
    apiVersion: NetworkKind.apiVersion,
    kind: NetworkKind.kind,
    metadata: { name: 'net', namespace: env.ns, labels: env.scopeLabels },
    spec: { subnets: [{ name: 'v4', cidr: '10.91.0.0/24', enableDHCP: false }] },
  } as KubernetesObject);
  await env.startOperator();
  await env.waitNodesUp();
}, 60_000);

afterAll(async () => {
  await env.teardown();
});

/** Top-level status fields each manager owns on the status subresource. */
function owners(obj: KubernetesObject): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (const m of (obj.metadata?.managedFields ?? []) as V1ManagedFieldsEntry[]) {
    if (m.subresource !== 'status' || !m.manager) continue;
    const st = (m.fieldsV1 as Record<string, Record<string, unknown>> | undefined)?.['f:status'] ?? {};
    const fields = Object.keys(st)
      .filter((k) => k.startsWith('f:'))
      .map((k) => k.slice(2));
    out.set(m.manager, [...(out.get(m.manager) ?? []), ...fields].sort());
  }
  return out;
}

describe('a server with a port on one node', () => {
  it('each writer owns its fields under its own manager; the port status is the operator’s', async () => {
    const m = env.manifest('vm', { flavor: small });
    m.spec = { ...m.spec, networks: [{ network: 'net' }] };
    await env.client.create<Srv>(SERVERS, m);
    const s = await env.waitServer('vm', 'ACTIVE', (x) => x.status?.status === 'ACTIVE' && !x.status.taskState);
    const node = s.status?.node ?? '';
    const agent = `stratus-agent/${node}`;

    const port = await waitFor('port vm-0 ACTIVE', async () => {
      const p = await env.client.get<Port & KubernetesObject>(PORTS, 'vm-0', env.ns);
      return p.status?.status === 'ACTIVE' ? p : undefined;
    });
    expect(port.status?.bindingHost).toBe(node);
    expect(port.status?.conditions?.find((c) => c.type === PORT_BOUND)?.status).toBe('True');
    const portOwners = owners(port);
    expect(portOwners.get(agent)).toEqual(expect.arrayContaining(['bindingHost', 'vifType']));
    expect(portOwners.get(agent)).not.toContain('status');
    expect(portOwners.get('stratus-operator')).toEqual(
      expect.arrayContaining(['fixedIPs', 'macAddress', 'securityGroups', 'status']),
    );
    expect([...portOwners.keys()].sort()).toEqual([agent, 'stratus-operator'].sort());

    const hv = await env.hypervisor(node);
    const hvOwners = owners(hv);
    expect(hvOwners.get('stratus-operator')).toEqual(['state', 'status']);
    expect(hvOwners.get(agent)).toEqual(expect.arrayContaining(['allocatable', 'capacity', 'conditions', 'usage']));
    expect(hvOwners.get(agent)).not.toContain('state');

    const serverOwners = owners(s);
    expect(serverOwners.get('stratus-operator')).toEqual(
      expect.arrayContaining(['allocation', 'node', 'powerState', 'status', 'vmState']),
    );
    expect(serverOwners.get(agent)).toEqual(expect.arrayContaining(['compute', 'launchedAt']));
    expect(serverOwners.get(agent)).not.toContain('vmState');
    expect([...serverOwners.keys()].sort()).toEqual([agent, 'stratus-operator'].sort());
  });
});

/** The managers owning top-level status field `field`. */
function ownersOf(obj: KubernetesObject, field: string): string[] {
  return [...owners(obj)]
    .filter(([, fields]) => fields.includes(field))
    .map(([m]) => m)
    .sort();
}

/**
 * Every state field present is owned by the operator alone, and the agent's report (when there is one) by that
 * agent alone; the report is about the server's node and the operator's fields are derived from it.
 */
function expectOneWriter(s: Srv, agent?: string) {
  const st = (s.status ?? {}) as Record<string, unknown>;
  for (const f of SERVER_STATE_FIELDS) {
    if (st[f] === undefined) continue;
    expect(ownersOf(s, f), `owners of status.${f}`).toEqual(['stratus-operator']);
  }
  if (agent) {
    expect(ownersOf(s, 'compute'), 'owners of status.compute').toEqual([agent]);
    expect(s.status?.compute?.node).toBe(s.status?.node);
  } else {
    expect(s.status?.compute).toBeUndefined();
  }
}

/** No task, and the operator's fields caught up with the agent's report. */
const settled = (s: Srv) =>
  s.status?.taskState === undefined && !deriveServerState(structuredClone(s.status ?? {}) as Record<string, unknown>);

describe('the Server state fields over a lifecycle', () => {
  const VM = 'life';
  let agent = '';

  async function step(what: string, ok: (s: Srv) => boolean): Promise<Srv> {
    const s = await env.waitServer(VM, what, (x) => ok(x) && settled(x));
    expectOneWriter(s, agent);
    return s;
  }

  it('create: ACTIVE / RUNNING, derived from the report of the node', async () => {
    await env.createServer(VM, { flavor: small });
    const s = await env.waitServer(VM, 'ACTIVE', (x) => x.status?.status === 'ACTIVE' && settled(x));
    agent = `stratus-agent/${s.status?.node}`;
    expectOneWriter(s, agent);
    expect(s.status).toMatchObject({ vmState: 'active', powerState: 'RUNNING' });
    expect(s.status?.compute).toMatchObject({ node: s.status?.node, vmState: 'active', powerState: 'RUNNING' });
    expect(s.status?.compute?.taskState).toBeUndefined();
    expect(s.status?.actions).toEqual([expect.objectContaining({ action: 'create', result: 'Success' })]);
    expect(ownersOf(s, 'node')).toEqual(['stratus-operator']);
  });

  it('stop and start: SHUTOFF / SHUTDOWN, then ACTIVE / RUNNING', async () => {
    await env.patchServer(VM, { spec: { powerState: 'Stopped' } });
    let s = await step('SHUTOFF', (x) => x.status?.status === 'SHUTOFF');
    expect(s.status).toMatchObject({ vmState: 'stopped', powerState: 'SHUTDOWN' });
    expect(s.status?.actions?.at(-1)).toMatchObject({ action: 'stop', result: 'Success' });
    await env.patchServer(VM, { spec: { powerState: 'Running' } });
    s = await step('ACTIVE', (x) => x.status?.status === 'ACTIVE');
    expect(s.status).toMatchObject({ vmState: 'active', powerState: 'RUNNING' });
    expect(s.status?.actions?.at(-1)).toMatchObject({ action: 'start', result: 'Success' });
  });

  it('a hard reboot: back to ACTIVE, the action recorded once', async () => {
    await env.patchServer(VM, { spec: { triggers: { hardReboot: 'own-1' } } });
    const s = await step('rebooted', (x) => x.status?.triggers?.hardReboot === 'own-1' && x.status.status === 'ACTIVE');
    expect(s.status?.actions?.filter((a) => a.action === 'hardReboot')).toEqual([
      expect.objectContaining({ result: 'Success' }),
    ]);
  });

  it('resize in place: VERIFY_RESIZE, then confirmed back to ACTIVE', async () => {
    await env.patchServer(VM, { spec: { flavor: medium } });
    let s = await step(
      'VERIFY_RESIZE',
      (x) => x.status?.flavor?.name === medium && x.status.status === 'VERIFY_RESIZE',
    );
    expect(s.status).toMatchObject({ vmState: 'resized', powerState: 'RUNNING' });
    await env.patchServer(VM, { spec: { triggers: { confirmResize: 'own-confirm' } } });
    s = await step(
      'confirmed',
      (x) => x.status?.triggers?.confirmResize === 'own-confirm' && x.status.status === 'ACTIVE' && !x.status.resize,
    );
    expect(s.status).toMatchObject({ vmState: 'active', powerState: 'RUNNING' });
    expect(s.status?.actions?.filter((a) => a.action === 'resize' || a.action === 'confirmResize')).toEqual([
      expect.objectContaining({ action: 'resize', result: 'Success' }),
      expect.objectContaining({ action: 'confirmResize', result: 'Success' }),
    ]);
  });

  it('no valid host: ERROR with a fault, every field the operator’s, no report', async () => {
    await env.createServer('nohost', { flavor: huge });
    const s = await env.waitServer('nohost', 'ERROR', (x) => x.status?.status === 'ERROR');
    expect(s.status).toMatchObject({ vmState: 'error', fault: { code: 500 } });
    expect(s.status?.fault?.message).toMatch(/No valid host was found/);
    expect(s.status?.actions?.at(-1)).toMatchObject({ action: 'create', result: 'Error' });
    expectOneWriter(s);
    expect([...owners(s).keys()]).toEqual(['stratus-operator']);
  });

  it('node down: powerState NOSTATE (the operator’s), the real one once the agent reports again', async () => {
    const node = env.node((await env.server(VM)).status?.node);
    await node.stop();
    let s = await env.waitServer(
      VM,
      'NOSTATE',
      (x) => x.status?.powerState === 'NOSTATE' && condition(x, 'HypervisorUp')?.status === 'False',
      60_000,
    );
    expectOneWriter(s, agent);
    expect(s.status?.compute?.powerState).toBe('RUNNING'); // the agent's last report stays as it was
    await node.start();
    s = await step(
      'RUNNING again',
      (x) => x.status?.powerState === 'RUNNING' && condition(x, 'HypervisorUp')?.status === 'True',
    );
    expect(s.status?.status).toBe('ACTIVE');
  });

  it('delete: the agent reports deleting, the server goes', async () => {
    await env.deleteServer(VM);
    await env.waitServerGone(VM);
  });
});
