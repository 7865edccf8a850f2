// Unit tests: the operator's status apply carries every field it owns (an SSA apply that omits a field removes it),
// is guarded by the resourceVersion it was computed from, never forces, and conflicts requeue.
import { ApiException } from '@kubernetes/client-node';
import { describe, expect, it } from 'vitest';
import { NetworkKind } from '../api/index.ts';
import type { KubeClient, ReconcileContext, Request } from '../runtime/index.ts';
import { applyStatusIfChanged, FIELD_MANAGER, requeueOnConflict, statusFields } from './common.ts';

function recorder() {
  const calls: { body: Record<string, unknown>; opts: Record<string, unknown> }[] = [];
  const client = {
    apply: async (_gvr: unknown, body: Record<string, unknown>, opts: Record<string, unknown>) => {
      calls.push({ body, opts });
      return body;
    },
  } as unknown as KubeClient;
  return { client, calls };
}

const net = (status: Record<string, unknown>) => ({
  apiVersion: NetworkKind.apiVersion,
  kind: 'Network',
  metadata: { name: 'n', namespace: 'ns', resourceVersion: '42', generation: 3 },
  status,
});

const happy = {
  status: 'ACTIVE',
  networkType: 'vxlan',
  segmentationID: 4242,
  mtu: 1450,
  subnets: [{ name: 'v4', cidr: '10.0.0.0/24', ipVersion: 4 }],
  observedGeneration: 3,
  conditions: [{ type: 'Ready', status: 'True', reason: 'Allocated' }],
};

describe('applyStatusIfChanged', () => {
  it('carries the owned fields a path does not set, so an error path keeps what the happy path wrote', async () => {
    const { client, calls } = recorder();
    const conditions = [{ type: 'Ready', status: 'False', reason: 'NetworkInUse' }];
    expect(await applyStatusIfChanged(client, NetworkKind, net(happy), { conditions })).toBe(true);
    expect(calls).toHaveLength(1);
    expect(calls[0]!.body.status).toEqual({ ...happy, conditions });
    expect(calls[0]!.opts).toMatchObject({ fieldManager: FIELD_MANAGER, force: false, subresource: 'status' });
    expect((calls[0]!.body.metadata as Record<string, unknown>).resourceVersion).toBe('42');
  });

  it('clears a field only when the writer says so (undefined), and writes nothing when nothing changed', async () => {
    const { client, calls } = recorder();
    expect(await applyStatusIfChanged(client, NetworkKind, net(happy), { mtu: 1450 })).toBe(false);
    await applyStatusIfChanged(client, NetworkKind, net(happy), { mtu: undefined });
    expect(calls).toHaveLength(1);
    expect(calls[0]!.body.status).not.toHaveProperty('mtu');
    expect(calls[0]!.body.status).toHaveProperty('segmentationID', 4242);
  });

  it('refuses a field the operator does not own on the kind', async () => {
    const { client } = recorder();
    await expect(
      applyStatusIfChanged(client, NetworkKind, net(happy), { bindingHost: 'x' }, ['status', 'conditions']),
    ).rejects.toThrow(/not a field the operator owns/);
    expect(statusFields(NetworkKind)).toEqual(
      expect.arrayContaining(['status', 'networkType', 'segmentationID', 'mtu', 'subnets', 'conditions']),
    );
  });
});

describe('requeueOnConflict', () => {
  const ctx = { log: { info: () => {} } } as unknown as ReconcileContext;
  const req: Request = { name: 'n', namespace: 'ns' };
  it('turns a 409 into a requeue and lets other errors through', async () => {
    const conflict = new ApiException(409, 'Conflict', { reason: 'Conflict' }, {});
    expect(await requeueOnConflict(async () => Promise.reject(conflict))(req, ctx)).toEqual({ requeue: true });
    const gone = new ApiException(500, 'boom', {}, {});
    await expect(requeueOnConflict(async () => Promise.reject(gone))(req, ctx)).rejects.toBe(gone);
    expect(await requeueOnConflict(async () => undefined)(req, ctx)).toBeUndefined();
  });
});
