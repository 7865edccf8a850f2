// Status ownership of Ports, Servers and Hypervisors (docs/design/status-ownership.md) through the operator and a fake node agent
// against a real API server: each writer writes under its own field manager (`stratus-operator`,
// `stratus-agent/<node>`; the API server accepts the '/'), and Port.status.status has one writer, the operator,
// which derives ACTIVE from the binding the agent reports.
import type { KubernetesObject, V1ManagedFieldsEntry } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NetworkKind, PORT_BOUND, type Port, PortKind } from '../../src/api/index.ts';
import { gvrOf } from '../../src/controllers/common.ts';
import { ComputeEnv, SERVERS, type Srv, waitFor } from './compute-env.ts';

const PORTS = gvrOf(PortKind);
const NETWORKS = gvrOf(NetworkKind);
const env = new ComputeEnv('own');
let small = '';

beforeAll(async () => {
  await env.setup();
  await env.startNodes(1, 'n', { slots: 4 });
  small = await env.flavor('small', 1, 1024);
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
    expect(serverOwners.get('stratus-operator')).toEqual(expect.arrayContaining(['allocation', 'node']));
    expect(serverOwners.get(agent)).toEqual(expect.arrayContaining(['launchedAt', 'powerState', 'vmState']));
    expect([...serverOwners.keys()].sort()).toEqual([agent, 'stratus-operator'].sort());
  });
});
