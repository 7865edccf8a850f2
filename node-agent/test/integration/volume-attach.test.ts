// The node agent's block-device side (volumes/attach.ts) and boot from volume (compute.ts) against a real
// kube-apiserver, with the fake driver extended by an in-test recorder of attach/detach/extend/QoS calls. The test plays
// the operator and the volume host by hand: it writes Volume status (node, backend, host report with location and
// exports) and attachments, and checks what the agent does to the guest and reports in status.compute.volumes.
import { randomBytes } from 'node:crypto';
import type { KubernetesObject } from '@kubernetes/client-node';
import { PatchStrategy } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { adminKubeConfig } from '../../../e2e/controlplane/testenv.ts';
import { deleteNamespaceFully } from '../../../e2e/testing/cleanup.ts';
import { waitFor as poll } from '../../../e2e/testing/wait.ts';
import {
  deriveServerState,
  NODE_LEASE_NAMESPACE,
  nodeLeaseName,
  SERVER_FINALIZER,
  SERVER_NODE_LABEL,
  type ServerStatus,
  type Volume,
  type VolumeAttachment,
  type VolumeType,
} from '../../../operator/src/api/index.ts';
import { installCRDs } from '../../../operator/src/crdgen/install.ts';
import { type GVR, KubeClient, leaseGVR, updateStatus } from '../../../operator/src/runtime/index.ts';
import { type RunningAgent, startAgent } from '../../src/agent.ts';
import { SERVERS, type ServerObject } from '../../src/compute.ts';
import {
  type AttachedVolume,
  DriverError,
  GuestNotFoundError,
  type GuestSpec,
  type GuestState,
  type VolumeAttachmentSpec,
  type VolumeConnection,
  type VolumeQos,
  volumeSerial,
} from '../../src/driver.ts';
import { FakeDriver } from '../../src/drivers/fake.ts';
import { agentFieldManager } from '../../src/fieldmanager.ts';
import { HYPERVISORS } from '../../src/hypervisor.ts';
import { NBD_SECRET, type NbdExportRef, type NbdPsk, VOLUME_TYPES, VOLUMES } from '../../src/volumes/attach.ts';
import type { VolumeBackend, VolumeRef } from '../../src/volumes/backend.ts';

const suffix = randomBytes(3).toString('hex');
const NS = `vattach-${suffix}`;
const NODE = `vnode-${suffix}`;
const OTHER = `vother-${suffix}`;
const GOLD = `gold-${suffix}`;
const GiB = 2 ** 30;
const nsGVR: GVR = { group: '', version: 'v1', plural: 'namespaces' };
const SECRETS: GVR = { group: '', version: 'v1', plural: 'secrets' };

type Srv = ServerObject & { status?: ServerStatus & Record<string, unknown> };
type Vol = KubernetesObject & Volume;
type Call = { op: string; id: string; volumeId?: string; arg?: unknown };

/** The fake driver with volumes: what is attached per guest, and every call (HOTPLUG's fake does the same). */
class VolumeDriver extends FakeDriver {
  readonly attached = new Map<string, Map<string, AttachedVolume & { connection: VolumeConnection }>>();
  readonly volumeCalls: Call[] = [];
  readonly spawned: GuestSpec[] = [];
  /** Size of each volume as its backend holds it (what QEMU sees). */
  readonly sizes = new Map<string, number>();
  /** The next attaches that fail. */
  failAttaches = 0;

  #record(id: string, att: VolumeAttachmentSpec): AttachedVolume {
    let m = this.attached.get(id);
    if (!m) {
      m = new Map();
      this.attached.set(id, m);
    }
    const v = {
      volumeId: att.connection.volumeId,
      serial: att.connection.serial,
      bus: att.bus,
      device: `d${att.connection.serial}`,
      connection: att.connection,
    };
    m.set(v.volumeId, v);
    return v;
  }

  override async spawn(spec: GuestSpec): Promise<GuestState> {
    this.spawned.push(spec);
    const st = await super.spawn(spec);
    if (spec.rootVolume) this.#record(spec.id, spec.rootVolume);
    for (const v of spec.volumes ?? []) this.#record(spec.id, v);
    return st;
  }

  override async destroy(id: string): Promise<void> {
    await super.destroy(id);
    this.attached.delete(id);
  }

  override async attachVolume(id: string, att: VolumeAttachmentSpec): Promise<AttachedVolume> {
    this.volumeCalls.push({ op: 'attach', id, volumeId: att.connection.volumeId, arg: att });
    if (!(await this.state(id))) throw new GuestNotFoundError('attachVolume', id);
    if (this.failAttaches > 0) {
      this.failAttaches--;
      throw new DriverError('attachVolume', id, 'device_add: injected failure');
    }
    return this.attached.get(id)?.get(att.connection.volumeId) ?? this.#record(id, att);
  }

  override async detachVolume(id: string, volumeId: string): Promise<void> {
    this.volumeCalls.push({ op: 'detach', id, volumeId });
    this.attached.get(id)?.delete(volumeId);
  }

  override async volumes(id: string): Promise<AttachedVolume[]> {
    return [...(this.attached.get(id)?.values() ?? [])].map(({ connection: _c, ...v }) => ({
      ...v,
      sizeBytes: this.sizes.get(v.volumeId) ?? GiB,
    }));
  }

  override async extendVolume(id: string, volumeId: string, sizeBytes: number): Promise<void> {
    this.volumeCalls.push({ op: 'extend', id, volumeId, arg: sizeBytes });
    this.sizes.set(volumeId, sizeBytes);
  }

  override async setVolumeQos(id: string, volumeId: string, qos: VolumeQos): Promise<void> {
    this.volumeCalls.push({ op: 'qos', id, volumeId, arg: qos });
  }

  count(op: string, volumeId: string): number {
    return this.volumeCalls.filter((c) => c.op === op && c.volumeId === volumeId).length;
  }
}

/** The local backend as the attacher uses it: connection() of a qcow2 file (the rest is the volume host's). */
const localBackend = {
  name: 'local',
  connection: async (vol: VolumeRef, location: string): Promise<VolumeConnection> => ({
    volumeId: vol.id,
    serial: volumeSerial(vol.id),
    blockdev: { driver: 'qcow2', file: { driver: 'file', filename: location.replace('local://', '/volumes/') } },
  }),
} as unknown as VolumeBackend;

/** The rbd backend factory: one backend per volume type, whose connection() names the pool of the type. */
const rbdCalls: { pool: string | undefined; location: string }[] = [];
const rbd = (type: VolumeType): VolumeBackend =>
  ({
    name: 'rbd',
    connection: async (vol: VolumeRef, location: string): Promise<VolumeConnection> => {
      rbdCalls.push({ pool: type.spec.rbd?.pool, location });
      return {
        volumeId: vol.id,
        serial: volumeSerial(vol.id),
        blockdev: { driver: 'raw', file: { driver: 'rbd', pool: type.spec.rbd?.pool, image: `volume-${vol.id}` } },
      };
    },
  }) as unknown as VolumeBackend;

const nbdCalls: { vol: VolumeRef; exp: NbdExportRef; psk: NbdPsk }[] = [];
const nbd = (vol: VolumeRef, exp: NbdExportRef, psk: NbdPsk): VolumeConnection => {
  nbdCalls.push({ vol, exp, psk });
  return {
    volumeId: vol.id,
    serial: volumeSerial(vol.id),
    blockdev: {
      driver: 'raw',
      file: { driver: 'nbd', server: { type: 'inet', host: exp.host, port: String(exp.port) } },
    },
  };
};

let client: KubeClient;
let driver: VolumeDriver;
let agent: RunningAgent;

const waitFor = <T>(what: string, fn: () => Promise<T | undefined | false>, timeoutMs = 20_000): Promise<T> =>
  poll(what, fn, timeoutMs, 100);

function derived(s: Srv): Srv {
  const st = structuredClone((s.status ?? {}) as Record<string, unknown>);
  deriveServerState(st);
  return { ...s, status: st as Srv['status'] };
}
const getServer = async (name: string) => derived(await client.get<Srv>(SERVERS, name, NS));
const reported = async (name: string) => (await client.get<Srv>(SERVERS, name, NS)).status?.compute?.volumes ?? [];
const volume = (name: string) => client.get<Vol>(VOLUMES, name, NS);

function start(d: VolumeDriver): Promise<RunningAgent> {
  return startAgent({
    kubeConfig: adminKubeConfig(),
    nodeName: NODE,
    driver: d,
    hostIP: '192.0.2.20',
    heartbeatSeconds: 1,
    powerOffTimeoutSeconds: 1,
    orphanGraceSeconds: 60,
    volumeConnectors: { backends: new Map([['local', localBackend]]), nbd, rbd },
  });
}

/** Nothing more happens: the agent's caches hold `ok` for the server, then every controller is idle. */
async function settled(name: string, ok: (s: Srv) => boolean = () => true): Promise<void> {
  await waitFor(`the agent to see ${name}`, async () => {
    const s = agent.agent.compute.servers.get(name, NS) as Srv | undefined;
    return s !== undefined && ok(s);
  });
  await agent.manager.idle();
}

/** A Volume as the operator and the volume host leave it once created: available on `node`. */
async function createVolume(
  name: string,
  o: { node?: string; type?: string; exports?: NbdExportRef & { server: string; node: string } } = {},
): Promise<Vol> {
  const node = o.node ?? NODE;
  const created = await client.create<Vol>(VOLUMES, {
    apiVersion: 'storage.stratus.io/v1alpha1',
    kind: 'Volume',
    metadata: { name, namespace: NS },
    spec: { size: '1Gi', ...(o.type ? { volumeType: o.type } : {}) },
  });
  const uid = created.metadata!.uid!;
  return updateStatus(client, VOLUMES, created, (st) => ({
    ...st,
    status: 'available',
    volumeType: o.type ?? 'local',
    backend: 'local',
    node,
    size: '1Gi',
    host: { node, state: 'available', location: `local://${node}/${uid}`, size: '1Gi' },
  }));
}

/** The operator's attachment of `volume` to `server` (uid) on NODE in `state`; undefined removes it. */
async function attach(volumeName: string, server: Srv, state: VolumeAttachment['state'] | undefined): Promise<Vol> {
  return updateStatus(client, VOLUMES, await volume(volumeName), (st) => {
    const others = ((st.attachments as VolumeAttachment[] | undefined) ?? []).filter(
      (a) => a.serverUID !== server.metadata!.uid,
    );
    const mine: VolumeAttachment[] = state
      ? [{ server: server.metadata!.name!, serverUID: server.metadata!.uid!, node: NODE, state }]
      : [];
    const attachments = [...others, ...mine];
    return {
      ...st,
      attachments: attachments.length > 0 ? attachments : undefined,
      status: attachments.length > 0 ? 'in-use' : 'available',
    };
  });
}

async function createAndBind(name: string, spec: Record<string, unknown>): Promise<Srv> {
  await client.create<Srv>(SERVERS, {
    apiVersion: 'compute.stratus.io/v1alpha1',
    kind: 'Server',
    metadata: { name, namespace: NS, finalizers: [SERVER_FINALIZER] },
    spec: { flavor: 'm1.small', powerState: 'Running', ...spec },
  });
  const labelled = await client.patch<Srv>(
    SERVERS,
    name,
    NS,
    { metadata: { labels: { [SERVER_NODE_LABEL]: NODE } } },
    PatchStrategy.MergePatch,
  );
  return updateStatus(client, SERVERS, labelled, (st) => ({
    ...st,
    node: NODE,
    flavor: { name: 'm1.small', vcpus: 1, ram: '1Gi', disk: '1Gi', ephemeral: '0', swap: '0' },
    allocation: { vcpus: 1, ramMiB: 1024, diskGiB: 1 },
    ...(typeof spec.image === 'string' ? { image: spec.image } : {}),
    vmState: 'building',
    taskState: 'spawning',
    status: 'BUILD',
  }));
}

async function patchSpec(name: string, spec: Record<string, unknown>): Promise<void> {
  await client.patch(SERVERS, name, NS, { spec }, PatchStrategy.MergePatch);
}

beforeAll(async () => {
  const kc = adminKubeConfig();
  await installCRDs(kc);
  client = new KubeClient(kc);
  await client.create(nsGVR, { apiVersion: 'v1', kind: 'Namespace', metadata: { name: NS } });
  await client
    .create(nsGVR, { apiVersion: 'v1', kind: 'Namespace', metadata: { name: NODE_LEASE_NAMESPACE } })
    .catch(() => {});
  driver = new VolumeDriver({ vcpus: 8, ram: '16Gi', disk: '100Gi' });
  agent = await start(driver);
});

afterAll(async () => {
  await agent?.stop();
  if (client) {
    await deleteNamespaceFully(client, NS);
    await client.delete(VOLUME_TYPES, GOLD).catch(() => {});
    await client.delete(SECRETS, NBD_SECRET, NODE_LEASE_NAMESPACE).catch(() => {});
    await client.delete(HYPERVISORS, NODE).catch(() => {});
    await client.delete(leaseGVR, nodeLeaseName(NODE), NODE_LEASE_NAMESPACE).catch(() => {});
  }
});

describe('volume attachments on the server node (fake driver) against kube-apiserver', () => {
  let web: Srv;
  let dataUID = '';

  it('attaches a volume once its attachment is attaching, on the bus of spec.volumes, and reports it', async () => {
    await createAndBind('web', { image: 'cirros', volumes: [{ volume: 'data', bus: 'scsi' }] });
    web = await waitFor('web ACTIVE', async () => {
      const s = await getServer('web');
      return s.status?.status === 'ACTIVE' ? s : undefined;
    });
    const data = await createVolume('data');
    dataUID = data.metadata!.uid!;
    await settled('web');
    expect(driver.count('attach', dataUID)).toBe(0); // no attachment yet: nothing to do
    await attach('data', web, 'reserved');
    await settled('web');
    expect(driver.count('attach', dataUID)).toBe(0); // reserved is not attaching
    await attach('data', web, 'attaching');
    const vols = await waitFor('data reported attached', async () => {
      const v = await reported('web');
      return v.some((x) => x.volumeUID === dataUID && x.state === 'attached') ? v : undefined;
    });
    expect(vols).toEqual([
      {
        volume: 'data',
        volumeUID: dataUID,
        serial: volumeSerial(dataUID),
        bus: 'scsi',
        device: `d${volumeSerial(dataUID)}`,
        state: 'attached',
        size: '1Gi',
      },
    ]);
    expect(driver.count('attach', dataUID)).toBe(1);
    const call = driver.volumeCalls.find((c) => c.op === 'attach' && c.volumeId === dataUID)!
      .arg as VolumeAttachmentSpec;
    expect(call.bus).toBe('scsi');
    expect(call.connection.blockdev).toEqual({
      driver: 'qcow2',
      file: { driver: 'file', filename: `/volumes/${NODE}/${dataUID}` },
    });
    // the compute report keeps the volumes through the compute controller's own writes (a stop and start)
    await patchSpec('web', { powerState: 'Stopped' });
    await waitFor('web SHUTOFF', async () =>
      (await getServer('web')).status?.status === 'SHUTOFF' ? true : undefined,
    );
    await patchSpec('web', { powerState: 'Running' });
    await waitFor('web ACTIVE', async () => ((await getServer('web')).status?.status === 'ACTIVE' ? true : undefined));
    expect((await reported('web')).map((v) => v.volumeUID)).toEqual([dataUID]);
  });

  it('after an agent restart (a new attacher) the attachment is read back from the driver, never attached twice', async () => {
    await agent.stop();
    agent = await start(driver);
    await settled('web');
    await attach('data', web, 'attached'); // the operator's next step: a Volume change the new attacher sees
    await settled('web');
    expect(driver.count('attach', dataUID)).toBe(1);
    expect((await reported('web')).map((v) => [v.volumeUID, v.state])).toEqual([[dataUID, 'attached']]);
  });

  it('an attach error is reported (state error, fault) and retried until it works', async () => {
    const logs = await createVolume('logs');
    const uid = logs.metadata!.uid!;
    await patchSpec('web', { volumes: [{ volume: 'data', bus: 'scsi' }, { volume: 'logs' }] });
    driver.failAttaches = Number.POSITIVE_INFINITY; // failing until the test has seen the fault
    await attach('logs', web, 'attaching');
    const failed = await waitFor('logs reported in error', async () =>
      (await reported('web')).find((v) => v.volumeUID === uid && v.state === 'error'),
    );
    expect(failed.fault).toContain('device_add: injected failure');
    const failures = driver.count('attach', uid);
    driver.failAttaches = 0;
    const ok = await waitFor('logs attached after the retry', async () =>
      (await reported('web')).find((v) => v.volumeUID === uid && v.state === 'attached'),
    );
    expect(ok.fault).toBeUndefined();
    expect(driver.count('attach', uid)).toBe(failures + 1); // retried until one call succeeded, then never again
  });

  it('detaches a volume whose attachment is detaching and drops it from the report', async () => {
    const logs = await volume('logs');
    await patchSpec('web', { volumes: [{ volume: 'data', bus: 'scsi' }] });
    await attach('logs', web, 'detaching');
    await waitFor('logs gone from the report', async () =>
      (await reported('web')).every((v) => v.volumeUID !== logs.metadata!.uid) ? true : undefined,
    );
    expect(driver.count('detach', logs.metadata!.uid!)).toBe(1);
    expect((await driver.volumes(web.metadata!.uid!)).map((v) => v.volumeId)).toEqual([dataUID]);
  });

  it('extends through the guest QEMU once the volume is extending (local: block_resize to spec.size)', async () => {
    await client.patch(VOLUMES, 'data', NS, { spec: { size: '2Gi' } }, PatchStrategy.MergePatch);
    await settled('web');
    expect(driver.count('extend', dataUID)).toBe(0); // the operator has not started the extend
    await updateStatus(client, VOLUMES, await volume('data'), (st) => ({ ...st, status: 'extending' }));
    await waitFor('size 2Gi reported', async () =>
      (await reported('web')).find((v) => v.volumeUID === dataUID && v.size === '2Gi'),
    );
    expect(driver.volumeCalls.filter((c) => c.op === 'extend')).toEqual([
      { op: 'extend', id: web.metadata!.uid, volumeId: dataUID, arg: 2 * GiB },
    ]);
  });

  it('QoS comes from the volume type, and a changed type is applied live', async () => {
    await client.create(VOLUME_TYPES, {
      apiVersion: 'storage.stratus.io/v1alpha1',
      kind: 'VolumeType',
      metadata: { name: GOLD },
      spec: { backend: 'local', qos: { totalBytesSec: 10_485_760, readIopsSec: 0 } },
    });
    const fast = await createVolume('fast', { type: GOLD });
    const uid = fast.metadata!.uid!;
    await patchSpec('web', { volumes: [{ volume: 'data', bus: 'scsi' }, { volume: 'fast' }] });
    await waitFor('the type in the attacher cache', async () => agent.agent.volumes.volumeTypes.get(GOLD));
    await attach('fast', web, 'attaching');
    await waitFor('fast attached', async () =>
      (await reported('web')).find((v) => v.volumeUID === uid && v.state === 'attached'),
    );
    const call = driver.volumeCalls.find((c) => c.op === 'attach' && c.volumeId === uid)!.arg as VolumeAttachmentSpec;
    expect(call.qos).toEqual({ totalBytesSec: 10_485_760 });
    await client.patch(
      VOLUME_TYPES,
      GOLD,
      undefined,
      { spec: { qos: { totalBytesSec: 5_242_880 } } },
      PatchStrategy.MergePatch,
    );
    await waitFor('the new QoS set', async () =>
      driver.volumeCalls.find(
        (c) => c.op === 'qos' && c.volumeId === uid && (c.arg as VolumeQos).totalBytesSec === 5_242_880,
      ),
    );
  });

  it('a volume held on another node waits for its NBD export (nothing reported), then attaches over NBD', async () => {
    const remote = await createVolume('remote', { node: OTHER });
    const uid = remote.metadata!.uid!;
    await patchSpec('web', { volumes: [{ volume: 'data', bus: 'scsi' }, { volume: 'fast' }, { volume: 'remote' }] });
    await attach('remote', web, 'attaching');
    await settled('web');
    expect(driver.count('attach', uid)).toBe(0);
    expect((await reported('web')).some((v) => v.volumeUID === uid)).toBe(false);
    // the volume host of OTHER exports it for this server; the credentials are the operator's Secret (an operator of
    // an earlier test file may have made one: this test's key replaces it)
    await client.delete(SECRETS, NBD_SECRET, NODE_LEASE_NAMESPACE).catch(() => {});
    await client.create(SECRETS, {
      apiVersion: 'v1',
      kind: 'Secret',
      metadata: { name: NBD_SECRET, namespace: NODE_LEASE_NAMESPACE },
      stringData: { identity: 'stratus', key: 'ab'.repeat(32) },
    });
    await updateStatus(client, VOLUMES, await volume('remote'), (st) => ({
      ...st,
      host: {
        ...(st.host as object),
        exports: [{ server: 'web', node: NODE, host: '192.0.2.99', port: 10809, name: `vol-${uid}` }],
      },
    }));
    await waitFor('remote attached', async () =>
      (await reported('web')).find((v) => v.volumeUID === uid && v.state === 'attached'),
    );
    expect(nbdCalls.at(-1)).toEqual({
      vol: { id: uid, name: 'remote', namespace: NS },
      exp: { host: '192.0.2.99', port: 10809, name: `vol-${uid}` },
      psk: { identity: 'stratus', key: 'ab'.repeat(32) },
    });
  });

  it('the agent writes only status.compute of a Server, and nothing of a Volume', async () => {
    const manager = agentFieldManager(NODE);
    const vol = await volume('data');
    expect((vol.metadata?.managedFields ?? []).map((m) => m.manager)).not.toContain(manager);
    const s = await client.get<Srv>(SERVERS, 'web', NS);
    const mine = (s.metadata?.managedFields ?? []).filter((m) => m.manager === manager);
    const status = mine.map((m) => (m.fieldsV1 as Record<string, Record<string, unknown>>)['f:status'] ?? {});
    expect(status.some((f) => 'f:volumes' in ((f['f:compute'] as object | undefined) ?? {}))).toBe(true);
    for (const f of status) {
      for (const k of ['f:volumesAttached', 'f:vmState', 'f:status', 'f:taskState', 'f:powerState']) {
        expect(f).not.toHaveProperty(k);
      }
    }
  });

  it('deleting the server destroys the guest and drops the volumes from the report', async () => {
    await client.delete(SERVERS, 'web', NS);
    const s = await waitFor('web deleted, report without volumes', async () => {
      const x = await getServer('web');
      return x.status?.vmState === 'deleted' && x.status.compute?.volumes === undefined ? x : undefined;
    });
    expect(s.status?.compute?.node).toBe(NODE);
    expect(driver.attached.get(web.metadata!.uid!)).toBeUndefined();
    expect(driver.count('detach', dataUID)).toBe(0); // the guest took its devices with it
  });
});

describe('boot from volume', () => {
  it('the spawn waits in block_device_mapping until the boot volume is attaching, then boots from it', async () => {
    const root = await createVolume('root');
    const rootUID = root.metadata!.uid!;
    const extra = await createVolume('extra');
    const extraUID = extra.metadata!.uid!;
    const bfv = await createAndBind('bfv', { bootVolume: 'root', volumes: [{ volume: 'extra' }] });
    await attach('extra', bfv, 'attaching'); // ready before the guest exists: given at first boot
    const waiting = await waitFor('bfv waiting for its boot volume', async () => {
      const s = await getServer('bfv');
      return s.status?.taskState === 'block_device_mapping' ? s : undefined;
    });
    expect(waiting.status?.status).toBe('BUILD');
    expect(waiting.status?.conditions?.find((c) => c.type === 'Ready')).toMatchObject({
      status: 'False',
      reason: 'WaitingForVolume',
    });
    expect(await driver.state(bfv.metadata!.uid!)).toBeUndefined();
    await attach('root', bfv, 'attaching');
    await waitFor('bfv ACTIVE', async () => ((await getServer('bfv')).status?.status === 'ACTIVE' ? true : undefined));
    const spec = driver.spawned.find((g) => g.id === bfv.metadata!.uid)!;
    expect(spec.image).toBeUndefined();
    expect(spec.rootVolume).toMatchObject({ bus: 'virtio', bootIndex: 0, connection: { volumeId: rootUID } });
    expect(spec.volumes?.map((v) => v.connection.volumeId)).toEqual([extraUID]);
    await waitFor('extra reported', async () =>
      (await reported('bfv')).find((v) => v.volumeUID === extraUID && v.state === 'attached'),
    );
    expect(driver.count('attach', extraUID)).toBe(0); // there at first boot, never hot-plugged
    // the boot volume is attached by the spawn, never hot-plugged, and reported
    await waitFor('root reported', async () =>
      (await reported('bfv')).find((v) => v.volumeUID === rootUID && v.state === 'attached'),
    );
    expect(driver.count('attach', rootUID)).toBe(0);
    // an attachment that goes (the operator's detaching of a running guest's boot volume) never unplugs it
    await attach('root', bfv, 'detaching');
    await settled('bfv');
    expect(driver.count('detach', rootUID)).toBe(0);
  });
});

describe('rbd volumes', () => {
  it('connect through the rbd backend of the volume type, and follow the size the backend reports', async () => {
    const RBD_TYPE = `ceph-${suffix}`;
    await client.create(VOLUME_TYPES, {
      apiVersion: 'storage.stratus.io/v1alpha1',
      kind: 'VolumeType',
      metadata: { name: RBD_TYPE },
      spec: {
        backend: 'rbd',
        rbd: { pool: 'vols', monitors: ['192.0.2.5:6789'], secretRef: { name: 'ceph', namespace: NS } },
      },
    });
    try {
      const srv = await createAndBind('rbd-user', { image: 'cirros', volumes: [{ volume: 'cephvol' }] });
      await waitFor('rbd-user ACTIVE', async () =>
        (await getServer('rbd-user')).status?.status === 'ACTIVE' ? true : undefined,
      );
      await waitFor('the type in the attacher cache', async () => agent.agent.volumes.volumeTypes.get(RBD_TYPE));
      const created = await client.create<Vol>(VOLUMES, {
        apiVersion: 'storage.stratus.io/v1alpha1',
        kind: 'Volume',
        metadata: { name: 'cephvol', namespace: NS },
        spec: { size: '1Gi', volumeType: RBD_TYPE },
      });
      const uid = created.metadata!.uid!;
      await updateStatus(client, VOLUMES, created, (st) => ({
        ...st,
        status: 'available',
        volumeType: RBD_TYPE,
        backend: 'rbd',
        node: OTHER, // the node running backend operations: rbd is reached directly from every node
        size: '1Gi',
        host: { node: OTHER, state: 'available', location: `rbd://fsid/vols/volume-${uid}`, size: '1Gi' },
      }));
      await attach('cephvol', srv, 'attaching');
      await waitFor('cephvol attached', async () =>
        (await reported('rbd-user')).find((v) => v.volumeUID === uid && v.state === 'attached'),
      );
      expect(rbdCalls).toEqual([{ pool: 'vols', location: `rbd://fsid/vols/volume-${uid}` }]);
      // the volume host grew the image (host.size): the guest's QEMU is told
      await updateStatus(client, VOLUMES, await volume('cephvol'), (st) => ({
        ...st,
        status: 'extending',
        host: { ...(st.host as object), size: '3Gi' },
      }));
      await waitFor('3Gi reported', async () =>
        (await reported('rbd-user')).find((v) => v.volumeUID === uid && v.size === '3Gi'),
      );
      expect(driver.volumeCalls.filter((c) => c.op === 'extend' && c.volumeId === uid)).toEqual([
        { op: 'extend', id: srv.metadata!.uid, volumeId: uid, arg: 3 * GiB },
      ]);
    } finally {
      await client.delete(VOLUME_TYPES, RBD_TYPE).catch(() => {});
    }
  });
});
