// Volumes through the operator against a real API server (#12): placement on a volume host, the Cinder v3 attachment
// flow driven by Server specs, refusals in Cinder's words, extend, snapshots, deletion (the admission policy refusing
// an attached volume, the finalizer waiting for the volume host), deleteOnTermination and boot from volume. The node
// agents run (FakeDriver) for the servers' lifecycle; their volume side is simulated here by writing what the real
// agent writes, under its field manager: Hypervisor status.volumeBackends, Volume/VolumeSnapshot status.host, Server
// status.compute.volumes.
import { type KubernetesObject, PatchStrategy, type V1ManagedFieldsEntry, Watch } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  NBD_SECRET_NAME,
  NODE_LEASE_NAMESPACE,
  type Volume,
  VolumeKind,
  type VolumeSnapshot,
  VolumeSnapshotKind,
  VolumeTypeKind,
} from '../../src/api/index.ts';
import { gvrOf } from '../../src/controllers/common.ts';
import { isNotFound } from '../../src/runtime/index.ts';
import { ComputeEnv, condition, HYPERVISORS, SERVERS, type Srv, waitFor } from './compute-env.ts';

const VOLUMES = gvrOf(VolumeKind);
const SNAPSHOTS = gvrOf(VolumeSnapshotKind);
const TYPES = gvrOf(VolumeTypeKind);
type Vol = Volume & KubernetesObject;
type Snap = VolumeSnapshot & KubernetesObject;

const env = new ComputeEnv('vol');
let small = '';
let n0 = ''; // local backend only
let n1 = ''; // local and rbd
let n2 = ''; // nothing ok
const agent = (node: string) => `stratus-agent/${node}`;

beforeAll(async () => {
  await env.setup();
  const nodes = await env.startNodes(3, 'n', { slots: 8 });
  [n0, n1, n2] = nodes.map((n) => n.name) as [string, string, string];
  small = await env.flavor('small', 1, 512);
  await env.startOperator();
  await env.waitNodesUp();
  await backends(n0, [{ name: 'local', ok: true }]);
  await backends(n1, [
    { name: 'local', ok: true },
    { name: 'rbd', ok: true },
  ]);
  await backends(n2, [{ name: 'local', ok: false, reason: 'qemu-img not found' }]);
}, 120_000);

afterAll(async () => {
  // Volumes and snapshots first (their finalizers need the operator), then the servers and the rest.
  for (const gvr of [SNAPSHOTS, VOLUMES]) {
    const list = await env.client.list<KubernetesObject>(gvr, { namespace: env.ns }).catch(() => ({ items: [] }));
    for (const o of list.items ?? []) {
      await env.client
        .patch(gvr, o.metadata!.name!, env.ns, { metadata: { finalizers: null } }, PatchStrategy.MergePatch)
        .catch(() => {});
      await env.client.delete(gvr, o.metadata!.name!, env.ns).catch(() => {});
    }
  }
  const types = await env.client.list<KubernetesObject>(TYPES, { labelSelector: `test.stratus.io/cmp=${env.id}` });
  for (const t of types.items ?? []) await env.client.delete(TYPES, t.metadata!.name!).catch(() => {});
  await env.teardown();
});

/** What the agent's backend probes write (status.volumeBackends of its Hypervisor). */
async function backends(node: string, list: Array<{ name: string; ok: boolean; reason?: string }>) {
  await env.client.patch(HYPERVISORS, node, undefined, { status: { volumeBackends: list } }, PatchStrategy.MergePatch, {
    subresource: 'status',
    fieldManager: agent(node),
  });
}

/** What the volume host writes: status.host of a volume (merge patch of that key, its field manager). */
async function hostReport(name: string, host: Record<string, unknown>) {
  const v = await volume(name);
  await env.client.patch(VOLUMES, name, env.ns, { status: { host } }, PatchStrategy.MergePatch, {
    subresource: 'status',
    fieldManager: agent(String(host.node ?? v.status?.node)),
  });
}

/** What the server's agent writes: the volumes of its guest in status.compute.volumes. */
async function guestVolumes(server: string, vols: Array<{ volume: string; device: string; bus?: string }>) {
  const s = await env.server(server);
  const node = s.status?.node ?? '';
  const entries = [];
  for (const v of vols) {
    const vol = await volume(v.volume);
    entries.push({
      volume: v.volume,
      volumeUID: vol.metadata?.uid,
      device: v.device,
      bus: v.bus ?? 'virtio',
      state: 'attached',
    });
  }
  await env.client.patch(
    SERVERS,
    server,
    env.ns,
    { status: { compute: { node, volumes: entries.length > 0 ? entries : null } } },
    PatchStrategy.MergePatch,
    { subresource: 'status', fieldManager: agent(node) },
  );
}

/**
 * Every Cinder status a volume passes through, from a watch (a step the real agent's next report moves on from at
 * once is still seen).
 */
async function recordStatuses(name: string): Promise<{ seen: string[]; stop: () => void }> {
  const seen: string[] = [];
  const req = await new Watch(env.client.kubeConfig).watch(
    `/apis/${VolumeKind.group}/${VolumeKind.version}/namespaces/${env.ns}/volumes`,
    { fieldSelector: `metadata.name=${name}` },
    (_type: string, obj: Vol) => {
      const st = obj.status?.status;
      if (st && seen.at(-1) !== st) seen.push(st);
    },
    () => {},
  );
  return { seen, stop: () => req.abort() };
}

function volume(name: string): Promise<Vol> {
  return env.client.get<Vol>(VOLUMES, name, env.ns);
}

function waitVolume(name: string, what: string, ok: (v: Vol) => boolean, timeoutMs = 30_000): Promise<Vol> {
  let last = '';
  return waitFor(
    `volume ${name}: ${what}`,
    async () => {
      const v = await volume(name);
      last = JSON.stringify(v.status);
      return ok(v) ? v : undefined;
    },
    timeoutMs,
  ).catch((e: unknown) => {
    throw new Error(`${e} (last status ${last})`);
  });
}

async function createVolume(name: string, spec: Record<string, unknown>): Promise<Vol> {
  return env.client.create<Vol>(VOLUMES, {
    apiVersion: VolumeKind.apiVersion,
    kind: 'Volume',
    metadata: { name, namespace: env.ns, labels: env.scopeLabels },
    spec: { size: '1Gi', ...spec },
  } as Vol);
}

async function createType(name: string, spec: Record<string, unknown>): Promise<string> {
  const full = `${env.id}-${name}`;
  await env.client.create(TYPES, {
    apiVersion: VolumeTypeKind.apiVersion,
    kind: 'VolumeType',
    metadata: { name: full, labels: env.scopeLabels },
    spec,
  } as KubernetesObject);
  return full;
}

/** A volume placed and made available by its (simulated) host. */
async function availableVolume(name: string, spec: Record<string, unknown> = {}): Promise<Vol> {
  await createVolume(name, spec);
  const placed = await waitVolume(name, 'placed', (v) => !!v.status?.node);
  await hostReport(name, {
    node: placed.status?.node,
    state: 'available',
    size: String(spec.size ?? '1Gi'),
    location: `local://${placed.status?.node}/${placed.metadata?.uid}`,
  });
  return waitVolume(name, 'available', (v) => v.status?.status === 'available');
}

async function serverWith(name: string, node: string, volumes: Array<Record<string, unknown>>): Promise<Srv> {
  const m = env.manifest(name, { flavor: small, node });
  m.spec = { ...m.spec, volumes } as Srv['spec'];
  await env.client.create<Srv>(SERVERS, m);
  return env.waitServer(name, 'ACTIVE', (s) => s.status?.status === 'ACTIVE' && !s.status.taskState);
}

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

describe('create', () => {
  it('places a volume on an up node that reaches its backend (built-in local type), then follows the host', async () => {
    await createVolume('v-create', {});
    const placed = await waitVolume('v-create', 'placed', (v) => !!v.status?.node);
    expect([n0, n1]).toContain(placed.status?.node); // n2 cannot run the local backend
    expect(placed.status).toMatchObject({
      status: 'creating',
      backend: 'local',
      volumeType: 'local',
      multiattach: false,
      bootable: false,
    });
    await hostReport('v-create', { node: placed.status?.node, state: 'available', size: '1Gi' });
    const v = await waitVolume('v-create', 'available', (x) => x.status?.status === 'available');
    expect(v.status?.size).toBe('1Gi');
    expect(v.metadata?.finalizers).toContain('storage.stratus.io/volume');
    expect(v.status?.conditions?.find((c) => c.type === 'Ready')?.status).toBe('True');
    // One writer per field: the operator's fields under stratus-operator, host under the agent of the node.
    const o = owners(v);
    expect(o.get('stratus-operator')).toEqual(
      expect.arrayContaining(['status', 'node', 'backend', 'volumeType', 'size', 'conditions']),
    );
    expect(o.get('stratus-operator')).not.toContain('host');
    expect(o.get(agent(placed.status?.node ?? ''))).toEqual(['host']);
  });

  it('an rbd type goes to a node that reaches rbd; a missing type and no backend are errors', async () => {
    const rbd = await createType('rbd', {
      backend: 'rbd',
      rbd: { monitors: ['192.0.2.10:6789'], secretRef: { name: 'ceph', namespace: env.ns } },
    });
    await createVolume('v-rbd', { volumeType: rbd });
    const v = await waitVolume('v-rbd', 'placed', (x) => !!x.status?.node);
    expect(v.status).toMatchObject({ node: n1, backend: 'rbd', volumeType: rbd });

    await createVolume('v-notype', { volumeType: 'nosuchtype' });
    const nt = await waitVolume('v-notype', 'error', (x) => x.status?.status === 'error');
    expect(nt.status?.conditions?.find((c) => c.type === 'Ready')).toMatchObject({
      status: 'False',
      reason: 'VolumeTypeNotFound',
    });

    await createVolume('v-nohost', { availabilityZone: 'nowhere' });
    const nh = await waitVolume('v-nohost', 'error', (x) => x.status?.status === 'error');
    const ready = nh.status?.conditions?.find((c) => c.type === 'Ready');
    expect(ready?.reason).toBe('NoValidHost');
    expect(ready?.message).toMatch(/^No valid backend was found\. /);
  });
});

describe('attach and detach (Cinder v3 attachments)', () => {
  it('reserved → attaching → in-use with the device; removed from the spec → detaching → available', async () => {
    const v0 = await availableVolume('v-att', {});
    const home = v0.status?.node ?? '';
    const other = home === n0 ? n1 : n0;
    await serverWith('vm-att', other, []);
    await env.patchServer('vm-att', { spec: { volumes: [{ volume: 'v-att', bus: 'scsi' }] } });
    const attaching = await waitVolume('v-att', 'attaching', (v) => v.status?.status === 'attaching');
    expect(attaching.status?.attachments).toEqual([
      expect.objectContaining({ server: 'vm-att', node: other, state: 'attaching', bus: 'scsi' }),
    ]);
    // Remote attachment of a local volume: the degraded mode shows.
    expect(attaching.status?.conditions?.find((c) => c.type === 'Degraded')).toMatchObject({
      status: 'True',
      reason: 'RemoteAttachment',
      message: expect.stringContaining(`attached over NBD from ${home}: that node is a single point of failure`),
    });
    await guestVolumes('vm-att', [{ volume: 'v-att', device: 'dabc', bus: 'scsi' }]);
    const inUse = await waitVolume('v-att', 'in-use', (v) => v.status?.status === 'in-use');
    expect(inUse.status?.attachments?.[0]).toMatchObject({ state: 'attached', device: 'dabc', bus: 'scsi' });
    expect(inUse.status?.attachments?.[0]?.attachedAt).toBeDefined();
    const s = await env.waitServer('vm-att', 'volumesAttached', (x) => !!x.status?.volumesAttached?.length);
    expect(s.status?.volumesAttached).toEqual([
      { volume: 'v-att', device: 'dabc', bus: 'scsi', deleteOnTermination: false },
    ]);
    expect(condition(s, 'VolumesAttached')).toMatchObject({ status: 'True', reason: 'Attached' });
    const so = owners(s);
    expect(so.get('stratus-operator')).toContain('volumesAttached');
    expect(so.get('stratus-operator')).not.toContain('compute');
    expect(so.get(agent(other))).toContain('compute');
    expect(so.get(agent(other))).not.toContain('volumesAttached');

    // Delete while attached: the admission policy refuses in Cinder's words.
    const refused = await env.client.delete(VOLUMES, 'v-att', env.ns).then(
      () => undefined,
      (e: unknown) => e as { body?: string; message?: string },
    );
    expect(JSON.stringify(refused)).toContain('Invalid volume: Volume v-att is still attached, detach volume first.');

    const rec = await recordStatuses('v-att');
    await env.patchServer('vm-att', { spec: { volumes: null } });
    // The guest still has it: detaching until the server's agent reports it gone.
    await waitFor('detaching', () => rec.seen.includes('detaching'));
    await guestVolumes('vm-att', []);
    const back = await waitVolume('v-att', 'available', (v) => v.status?.status === 'available');
    rec.stop();
    expect(rec.seen.slice(rec.seen.indexOf('detaching'))).toEqual(['detaching', 'available']);
    expect(back.status?.attachments).toBeUndefined();
    expect(back.status?.conditions?.find((c) => c.type === 'Degraded')?.status).toBe('False');
    await env.waitServer('vm-att', 'volumesAttached gone', (x) => !x.status?.volumesAttached);

    // Detached: the delete goes through the finalizer, which waits for the host to delete it.
    await env.client.delete(VOLUMES, 'v-att', env.ns);
    await waitVolume('v-att', 'deleting', (v) => v.status?.status === 'deleting');
    await hostReport('v-att', { node: home, state: 'deleted' });
    await waitFor('v-att gone', async () =>
      volume('v-att').then(
        () => false,
        (e: unknown) => isNotFound(e),
      ),
    );
  });

  it('a second server is refused a non-multiattach volume; a multiattach type allows it', async () => {
    await availableVolume('v-single', {});
    await serverWith('vm-a', n0, [{ volume: 'v-single' }]);
    await waitVolume('v-single', 'attaching', (v) => v.status?.attachments?.[0]?.state === 'attaching');
    await guestVolumes('vm-a', [{ volume: 'v-single', device: 'd1' }]);
    const inUse = await waitVolume('v-single', 'in-use', (v) => v.status?.status === 'in-use');
    await serverWith('vm-b', n0, [{ volume: 'v-single' }]);
    const b = await env.waitServer('vm-b', 'refused', (s) => condition(s, 'VolumesAttached')?.reason === 'VolumeInUse');
    expect(condition(b, 'VolumesAttached')).toMatchObject({
      status: 'False',
      message: 'Invalid volume: volume v-single already attached to server vm-a and is not multiattach',
    });
    await env.waitEvent('vm-b', 'VolumeInUse', 'Warning');
    const after = await volume('v-single');
    expect(after.status?.attachments).toEqual(inUse.status?.attachments);

    const multi = await createType('multi', { backend: 'local', multiattach: true });
    await availableVolume('v-multi', { volumeType: multi });
    await serverWith('vm-m1', n0, [{ volume: 'v-multi' }]);
    await guestVolumes('vm-m1', [{ volume: 'v-multi', device: 'd2' }]);
    await waitVolume('v-multi', 'in-use', (v) => v.status?.status === 'in-use');
    await serverWith('vm-m2', n0, [{ volume: 'v-multi' }]);
    await guestVolumes('vm-m2', [{ volume: 'v-multi', device: 'd3' }]);
    const both = await waitVolume(
      'v-multi',
      'two attached',
      (v) => (v.status?.attachments ?? []).filter((a) => a.state === 'attached').length === 2,
    );
    expect(both.status?.multiattach).toBe(true);
  });

  it('a server on a node that cannot reach the backend is refused', async () => {
    await availableVolume('v-far', {});
    await serverWith('vm-far', n2, [{ volume: 'v-far' }]);
    const s = await env.waitServer(
      'vm-far',
      'refused',
      (x) => condition(x, 'VolumesAttached')?.reason === 'BackendUnreachable',
    );
    expect(condition(s, 'VolumesAttached')?.message).toBe(
      `Invalid volume: hypervisor ${n2} cannot reach volume backend local: qemu-img not found`,
    );
    await env.waitEvent('vm-far', 'BackendUnreachable', 'Warning');
    expect((await volume('v-far')).status).toMatchObject({ status: 'available' });
    expect((await volume('v-far')).status?.attachments).toBeUndefined();
  });
});

describe('extend and snapshots', () => {
  it('extending until the host reports the new size', async () => {
    const v = await availableVolume('v-ext', {});
    await env.client.patch(VOLUMES, 'v-ext', env.ns, { spec: { size: '2Gi' } }, PatchStrategy.MergePatch);
    await waitVolume('v-ext', 'extending', (x) => x.status?.status === 'extending');
    await hostReport('v-ext', { node: v.status?.node, state: 'available', size: '2Gi' });
    const done = await waitVolume('v-ext', 'available', (x) => x.status?.status === 'available');
    expect(done.status?.size).toBe('2Gi');
  });

  it('an in-use volume: refused without force, taken with force on the volume’s node', async () => {
    const v = await availableVolume('v-snap', {});
    await serverWith('vm-snap', n0, [{ volume: 'v-snap' }]);
    await guestVolumes('vm-snap', [{ volume: 'v-snap', device: 'd9' }]);
    await waitVolume('v-snap', 'in-use', (x) => x.status?.status === 'in-use');
    const snap = (name: string, force: boolean) =>
      env.client.create(SNAPSHOTS, {
        apiVersion: VolumeSnapshotKind.apiVersion,
        kind: 'VolumeSnapshot',
        metadata: { name, namespace: env.ns, labels: env.scopeLabels },
        spec: { volume: 'v-snap', force },
      } as KubernetesObject);
    const getSnap = (name: string) => env.client.get<Snap>(SNAPSHOTS, name, env.ns);
    await snap('s-noforce', false);
    const refused = await waitFor('s-noforce error', async () => {
      const s = await getSnap('s-noforce');
      return s.status?.status === 'error' ? s : undefined;
    });
    expect(refused.status?.conditions?.find((c) => c.type === 'Ready')?.message).toContain(
      'Invalid volume: Volume v-snap status must be available, but current status is: in-use',
    );
    await snap('s-force', true);
    const creating = await waitFor('s-force placed', async () => {
      const s = await getSnap('s-force');
      return s.status?.node ? s : undefined;
    });
    expect(creating.status).toMatchObject({ status: 'creating', node: v.status?.node, size: '1Gi' });
    await env.client.patch(
      SNAPSHOTS,
      's-force',
      env.ns,
      { status: { host: { node: v.status?.node, state: 'available' } } },
      PatchStrategy.MergePatch,
      { subresource: 'status', fieldManager: agent(v.status?.node ?? '') },
    );
    const avail = await waitFor('s-force available', async () => {
      const x = await getSnap('s-force');
      return x.status?.status === 'available' ? x : undefined;
    });
    expect(owners(avail).get('stratus-operator')).not.toContain('host');
    expect(owners(avail).get(agent(v.status?.node ?? ''))).toEqual(['host']);

    // A volume from the snapshot lives on the snapshot's node (local).
    await createVolume('v-restored', { source: { snapshot: 's-force' } });
    const restored = await waitVolume('v-restored', 'placed', (x) => !!x.status?.node);
    expect(restored.status?.node).toBe(v.status?.node);
  });

  it('a volume with snapshots waits for them when deleted (DependentSnapshots), then goes', async () => {
    const v = await availableVolume('v-dep', {});
    const node = v.status?.node ?? '';
    await env.client.create(SNAPSHOTS, {
      apiVersion: VolumeSnapshotKind.apiVersion,
      kind: 'VolumeSnapshot',
      metadata: { name: 's-dep', namespace: env.ns, labels: env.scopeLabels },
      spec: { volume: 'v-dep' },
    } as KubernetesObject);
    await waitFor('s-dep placed', async () => !!(await env.client.get<Snap>(SNAPSHOTS, 's-dep', env.ns)).status?.node);
    await env.client.delete(VOLUMES, 'v-dep', env.ns);
    const held = await waitVolume(
      'v-dep',
      'DependentSnapshots',
      (x) => x.status?.conditions?.find((c) => c.type === 'Ready')?.reason === 'DependentSnapshots',
    );
    expect(held.status?.status).toBe('available');
    await env.client.delete(SNAPSHOTS, 's-dep', env.ns);
    await env.client.patch(
      SNAPSHOTS,
      's-dep',
      env.ns,
      { status: { host: { node, state: 'deleted' } } },
      PatchStrategy.MergePatch,
      { subresource: 'status', fieldManager: agent(node) },
    );
    await waitFor('s-dep gone', async () =>
      env.client.get(SNAPSHOTS, 's-dep', env.ns).then(
        () => false,
        (e: unknown) => isNotFound(e),
      ),
    );
    await waitVolume('v-dep', 'deleting', (x) => x.status?.status === 'deleting');
    await hostReport('v-dep', { node, state: 'deleted' });
    await waitFor('v-dep gone', async () =>
      volume('v-dep').then(
        () => false,
        (e: unknown) => isNotFound(e),
      ),
    );
  });
});

describe('servers and their volumes', () => {
  it('deleteOnTermination: the volume goes with the server', async () => {
    await availableVolume('v-dot', {});
    await serverWith('vm-dot', n0, [{ volume: 'v-dot', deleteOnTermination: true }]);
    await guestVolumes('vm-dot', [{ volume: 'v-dot', device: 'd5' }]);
    const v = await waitVolume('v-dot', 'in-use', (x) => x.status?.status === 'in-use');
    await env.deleteServer('vm-dot');
    await env.waitServerGone('vm-dot');
    await waitVolume('v-dot', 'deleting', (x) => !!x.metadata?.deletionTimestamp && x.status?.status === 'deleting');
    await hostReport('v-dot', { node: v.status?.node, state: 'deleted' });
    await waitFor('v-dot gone', async () =>
      volume('v-dot').then(
        () => false,
        (e: unknown) => isNotFound(e),
      ),
    );
  });

  it('boot from volume: the server waits for the volume and is placed on its node', async () => {
    // The volume on n0, the busiest node (n1 cannot run the local backend while it is placed): the freer-host
    // weighers alone would put the server on n1 (n2 cannot reach local at all: VolumeBackendFilter).
    await backends(n1, [{ name: 'rbd', ok: true }]);
    const v = await availableVolume('v-boot', {}).finally(() =>
      backends(n1, [
        { name: 'local', ok: true },
        { name: 'rbd', ok: true },
      ]),
    );
    expect(v.status?.node).toBe(n0);
    const m = env.manifest('vm-boot', { flavor: small });
    m.spec = { ...m.spec, image: undefined, bootVolume: 'v-boot' } as Srv['spec'];
    delete (m.spec as { image?: string }).image;
    await env.client.create<Srv>(SERVERS, m);
    const s = await env.waitServer('vm-boot', 'bound', (x) => !!x.status?.node);
    expect(s.status?.node).toBe(v.status?.node);
    const r = await waitVolume('v-boot', 'attaching', (x) => x.status?.attachments?.[0]?.state === 'attaching');
    expect(r.status?.attachments?.[0]).toMatchObject({ server: 'vm-boot', bootIndex: 0, node: v.status?.node });
  });
});

describe('operator restarts', () => {
  it('a volume placed and an attachment requested while the operator is down continue when it is back', async () => {
    await createVolume('v-rs', {});
    const placed = await waitVolume('v-rs', 'placed', (x) => !!x.status?.node);
    await serverWith('vm-rs', n0, []);
    await env.stopOperator();
    try {
      await hostReport('v-rs', { node: placed.status?.node, state: 'available', size: '1Gi' });
      await env.patchServer('vm-rs', { spec: { volumes: [{ volume: 'v-rs' }] } });
    } finally {
      await env.startOperator();
    }
    await waitVolume('v-rs', 'attaching', (x) => x.status?.attachments?.[0]?.state === 'attaching');
    await guestVolumes('vm-rs', [{ volume: 'v-rs', device: 'd7' }]);
    const v = await waitVolume('v-rs', 'in-use', (x) => x.status?.status === 'in-use');
    expect(v.status?.attachments).toHaveLength(1);
  });
});

describe('types and credentials', () => {
  it('the oldest default type is used; a newer default says MultipleDefaults', async () => {
    const first = await createType('default-a', { backend: 'local', isDefault: true });
    await waitFor(`${first} Ready`, async () => {
      const t = await env.client.get<
        KubernetesObject & { status?: { conditions?: { type: string; status: string }[] } }
      >(TYPES, first);
      return t.status?.conditions?.find((c) => c.type === 'Ready')?.status === 'True';
    });
    const second = await createType('default-b', {
      backend: 'rbd',
      isDefault: true,
      rbd: { monitors: ['192.0.2.10:6789'], secretRef: { name: 'ceph', namespace: env.ns } },
    });
    const t = await waitFor(`${second} MultipleDefaults`, async () => {
      const o = await env.client.get<
        KubernetesObject & { status?: { conditions?: { type: string; reason: string; message: string }[] } }
      >(TYPES, second);
      const c = o.status?.conditions?.find((x) => x.type === 'Ready');
      return c?.reason === 'MultipleDefaults' ? c : undefined;
    });
    expect(t.message).toContain(first);
    await createVolume('v-default', {});
    const v = await waitVolume('v-default', 'placed', (x) => !!x.status?.node);
    expect(v.status).toMatchObject({ volumeType: first, backend: 'local' });
  });

  it('the operator made the NBD credentials Secret once (identity stratus, a 64-hex key)', async () => {
    const secret = await env.client.get<KubernetesObject & { data?: Record<string, string> }>(
      { group: '', version: 'v1', plural: 'secrets' },
      NBD_SECRET_NAME,
      NODE_LEASE_NAMESPACE,
    );
    const dec = (k: string) => Buffer.from(secret.data?.[k] ?? '', 'base64').toString();
    expect(dec('identity')).toBe('stratus');
    expect(dec('key')).toMatch(/^[0-9a-f]{64}$/);
  });
});
