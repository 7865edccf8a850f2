// One owner per status field (docs/design/status-ownership.md), against a real API server with the operator
// in-process: every condition and error path of a kind (in use, invalid, conflicting, terminating) keeps the status
// fields the happy path set, and managedFields names the operator's field manager as their owner.
//
// (A spec that the API server accepts and the operator's schema refuses, InvalidSpec, cannot be written today: the
// CRD schemas refuse all of it. Those paths share the status write of the paths tested here.)
import type { KubernetesObject, V1ManagedFieldsEntry } from '@kubernetes/client-node';
import { PatchStrategy } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Project, ProjectKind } from '../../src/api/index.ts';
import { gvrOf } from '../../src/controllers/common.ts';
import { PROJECT_LABEL } from '../../src/controllers/project.ts';
import { cond, NAMESPACES, NETWORKS, type Net, NetEnv, PORTS, waitFor } from './network-env.ts';

const PROJECTS = gvrOf(ProjectKind);
const env = new NetEnv('own');

beforeAll(async () => {
  await env.setup(1);
  await env.startOperator();
}, 60_000);

afterAll(async () => {
  await env.teardown();
}, 120_000);

/** The status fields (top level) a manager owns on the status subresource, e.g. ['conditions', 'mtu']. */
function statusFieldsOf(obj: KubernetesObject, manager: string): string[] {
  const entries = (obj.metadata?.managedFields ?? []).filter(
    (m: V1ManagedFieldsEntry) => m.manager === manager && m.subresource === 'status',
  );
  const out = new Set<string>();
  for (const m of entries) {
    const st = (m.fieldsV1 as Record<string, Record<string, unknown>> | undefined)?.['f:status'] ?? {};
    for (const k of Object.keys(st)) if (k.startsWith('f:')) out.add(k.slice(2));
  }
  return [...out].sort();
}

const merge = (gvr: typeof NETWORKS, name: string, ns: string | undefined, body: unknown) =>
  env.client.patch(gvr, name, ns, body, PatchStrategy.MergePatch);

describe('Network status', () => {
  const kept = (n: Net) => {
    const { networkType, segmentationID, mtu, subnets } = n.status ?? {};
    return { networkType, segmentationID, mtu, subnets };
  };

  it('an invalid MTU keeps the segment, MTU and subnets (the agents keep the data plane)', async () => {
    await env.createNetwork('inv', { subnets: [{ name: 'v4', cidr: '10.81.0.0/24', enableDHCP: true }] } as never);
    const happy = await env.waitNetwork('inv', 'ACTIVE', (n) => n.status?.status === 'ACTIVE' && !!n.status.subnets);
    const before = kept(happy);
    expect(before.segmentationID).toBeGreaterThan(0);
    expect(before.subnets?.[0]?.dhcpAddress).toBeDefined();

    await merge(NETWORKS, 'inv', env.ns, { spec: { mtu: 9000 } });
    const mtu = await env.waitNetwork('inv', 'InvalidMtu', (n) => cond(n, 'Ready')?.reason === 'InvalidMtu');
    expect(mtu.status?.status).toBe('ERROR');
    expect(kept(mtu)).toEqual(before);
    expect(statusFieldsOf(mtu, 'stratus-operator')).toEqual(
      expect.arrayContaining(['conditions', 'mtu', 'networkType', 'segmentationID', 'status', 'subnets']),
    );

    await merge(NETWORKS, 'inv', env.ns, { spec: { mtu: null } });
    const back = await env.waitNetwork(
      'inv',
      'ACTIVE again',
      (n) => n.status?.status === 'ACTIVE' && n.status.observedGeneration === n.metadata?.generation,
    );
    expect(kept(back)).toEqual(before);
  });

  it('delete while a port uses it: NetworkInUse keeps segmentationID, mtu, networkType and subnets', async () => {
    await env.createNetwork('used', { subnets: [{ name: 'v4', cidr: '10.82.0.0/24', enableDHCP: true }] } as never);
    await env.createPort('p', { network: 'used' });
    await env.waitPort('p', 'allocated', (p) => cond(p, 'Ready')?.status === 'True');
    const happy = await env.waitNetwork(
      'used',
      'ACTIVE with the port counted',
      (n) => n.status?.subnets?.[0]?.allocated === 2,
    );
    const before = kept(happy);
    expect(before.segmentationID).toBeGreaterThan(0);

    await env.delete(NETWORKS, 'used');
    const inUse = await env.waitNetwork('used', 'NetworkInUse', (n) => cond(n, 'Ready')?.reason === 'NetworkInUse');
    expect(inUse.metadata?.deletionTimestamp).toBeDefined();
    expect(kept(inUse)).toEqual(before);
    expect(inUse.status?.status).toBe('ACTIVE');
    // One owner, named: the operator's manager owns every status field; nobody else owns any.
    expect(statusFieldsOf(inUse, 'stratus-operator')).toEqual(
      expect.arrayContaining(['conditions', 'mtu', 'networkType', 'segmentationID', 'status', 'subnets']),
    );
    const others = (inUse.metadata?.managedFields ?? []).filter(
      (m) => m.subresource === 'status' && m.manager !== 'stratus-operator',
    );
    expect(others).toEqual([]);

    await env.delete(PORTS, 'p');
    await env.waitGone(NETWORKS, 'used');
  });
});

describe('Project status', () => {
  it('NamespaceConflict and Terminating keep status.namespace', async () => {
    const name = `${env.id}-proj`;
    await env.client.create(PROJECTS, {
      apiVersion: ProjectKind.apiVersion,
      kind: 'Project',
      metadata: { name, labels: env.labels },
      spec: {},
    } as KubernetesObject);
    const get = () => env.client.get<Project & KubernetesObject>(PROJECTS, name);
    const wait = (what: string, ok: (p: Project & KubernetesObject) => boolean) =>
      waitFor(`project ${name}: ${what}`, async () => {
        const p = await get();
        return ok(p) ? p : undefined;
      });
    const current = (p: Project & KubernetesObject) => p.status?.observedGeneration === p.metadata?.generation;
    try {
      const active = await wait('Active', (p) => p.status?.phase === 'Active');
      expect(active.status?.namespace).toBe(name);

      // Someone hands the namespace to another project; the next reconcile (a spec change) finds the conflict.
      await merge(NAMESPACES, name, undefined, { metadata: { labels: { [PROJECT_LABEL]: 'someone-else' } } });
      await merge(PROJECTS, name, undefined, { spec: { description: 'conflict' } });
      const conflict = await wait(
        'NamespaceConflict',
        (p) => current(p) && cond(p, 'Ready')?.reason === 'NamespaceConflict',
      );
      expect(conflict.status?.phase).toBe('Failed');
      expect(conflict.status?.namespace).toBe(name);
      expect(statusFieldsOf(conflict, 'stratus-operator')).toEqual(
        expect.arrayContaining(['conditions', 'namespace', 'observedGeneration', 'phase']),
      );

      await merge(NAMESPACES, name, undefined, { metadata: { labels: { [PROJECT_LABEL]: name } } });
      await merge(PROJECTS, name, undefined, { spec: { description: null } });
      await wait('Active again', (p) => current(p) && p.status?.phase === 'Active');

      // A finalizer of the test's own holds the namespace, so the project stays Terminating while the test looks.
      await merge(NAMESPACES, name, undefined, {
        metadata: { finalizers: ['test.stratus.io/hold'] },
      });
      await env.client.delete(PROJECTS, name);
      const terminating = await wait('Terminating', (p) => p.status?.phase === 'Terminating');
      expect(terminating.status?.namespace).toBe(name);
    } finally {
      await merge(NAMESPACES, name, undefined, {
        metadata: { finalizers: null },
      }).catch(() => {});
      await env.client.delete(PROJECTS, name).catch(() => {});
      await env.waitGone(PROJECTS, name, undefined, 60_000).catch(() => {});
    }
  });
});
