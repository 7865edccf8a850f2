// The volume host (node-agent/src/volumes/host.ts) against the real API server, in-process, with a directory backend
// double (volume-doubles.ts) and a recording NBD exporter. The test plays the operator: it writes the operator's
// Volume/VolumeSnapshot status fields (node, backend, attachments) under the operator's field manager and removes
// the finalizer once the host reported deleted.
import { randomBytes, randomUUID } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, stat, truncate, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { type KubernetesObject, PatchStrategy } from '@kubernetes/client-node';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { adminKubeConfig } from '../../../e2e/controlplane/testenv.ts';
import { type FileServer, start as serveFiles } from '../../../e2e/images/serve.ts';
import { deleteNamespaceFully } from '../../../e2e/testing/cleanup.ts';
import { requireTools } from '../../../e2e/testing/tools.ts';
import { waitFor } from '../../../e2e/testing/wait.ts';
import {
  type Hypervisor,
  ImageKind,
  type VolumeHostReport,
  VolumeKind,
  VolumeSnapshotKind,
  type VolumeType,
  VolumeTypeKind,
} from '../../../operator/src/api/index.ts';
import { installCRDs } from '../../../operator/src/crdgen/install.ts';
import {
  type GVR,
  Informer,
  KubeClient,
  Manager,
  type ManagerOptions,
  silentLogger,
} from '../../../operator/src/runtime/index.ts';
import { createDriver } from '../../src/drivers/index.ts';
import { agentFieldManager } from '../../src/fieldmanager.ts';
import { HYPERVISORS, HypervisorReporter } from '../../src/hypervisor.ts';
import { ImageCache } from '../../src/images/cache.ts';
import { IMAGES } from '../../src/images/source.ts';
import {
  ATTACHED_LOCAL_SNAPSHOT_FAULT,
  exportName,
  VOLUME_SNAPSHOTS,
  VOLUME_TYPES,
  VOLUMES,
  VolumeHost,
  type VolumeHostOptions,
} from '../../src/volumes/host.ts';
import { createBackends, NBD_SECRET_NAME, type RbdTypeOptions, readNbdPsk } from '../../src/volumes/index.ts';
import { DirBackend, RecordingExporter } from './volume-doubles.ts';

requireTools('qemu-img');

const kc = adminKubeConfig();
const client = new KubeClient(kc);
const NS = `vh-${randomBytes(3).toString('hex')}`;
const NAMESPACES: GVR = { group: '', version: 'v1', plural: 'namespaces' };
const FINALIZER = 'storage.stratus.io/volume';
const OPERATOR = 'stratus-operator';
const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

type Report = Partial<VolumeHostReport>;
type Obj = KubernetesObject & { spec?: Record<string, unknown>; status?: Record<string, unknown> & { host?: Report } };

const temps: string[] = [];
const running: { stop(deadlineMs?: number): Promise<void> }[] = [];
let nodeSeq = 0;

async function tempDir(): Promise<string> {
  const d = await mkdtemp(path.join(os.tmpdir(), 'stratus-vh-'));
  temps.push(d);
  return d;
}

interface Node {
  name: string;
  dir: string;
  backend: DirBackend;
  exporter: RecordingExporter;
}

async function newNode(): Promise<Node> {
  const name = `${NS}-n${nodeSeq++}`;
  const dir = await tempDir();
  return { name, dir, backend: new DirBackend(dir, name), exporter: new RecordingExporter() };
}

/** A volume host on its own Manager (as a node agent process would run it). */
async function startHost(n: Node, extra: Partial<VolumeHostOptions> = {}) {
  const manager = new Manager({ kubeConfig: kc, logger: silentLogger(), http: false });
  const host = new VolumeHost({
    manager,
    nodeName: n.name,
    backends: new Map([['local', n.backend]]),
    exporter: n.exporter,
    orphanSweepMs: 3_600_000,
    ...extra,
  });
  await manager.start();
  host.start();
  const h = {
    host,
    manager,
    stop: async (deadlineMs?: number) => {
      host.stop();
      await manager.stop(deadlineMs);
    },
  };
  running.push(h);
  return h;
}

function patchStatus(gvr: GVR, name: string, status: Record<string, unknown>) {
  return client.patch<Obj>(gvr, name, NS, { status }, PatchStrategy.MergePatch, {
    subresource: 'status',
    fieldManager: OPERATOR,
  });
}

/** A Volume placed on `node` by "the operator" (status.node, backend). */
async function createVolume(name: string, node: string, spec: Record<string, unknown> = {}): Promise<Obj> {
  await client.create(VOLUMES, {
    apiVersion: VolumeKind.apiVersion,
    kind: 'Volume',
    metadata: { name, namespace: NS, finalizers: [FINALIZER] },
    spec: { size: '1Gi', ...spec },
  } as KubernetesObject);
  return patchStatus(VOLUMES, name, { node, backend: 'local', volumeType: 'local', status: 'creating' });
}

const get = (gvr: GVR, name: string) => client.get<Obj>(gvr, name, NS);

function waitReport(
  gvr: GVR,
  name: string,
  what: string,
  pred: (host: Report, obj: Obj) => boolean,
  timeoutMs = 30_000,
) {
  return waitFor(
    `${name}: ${what}`,
    async () => {
      const o = await get(gvr, name);
      return pred(o.status?.host ?? {}, o) ? o : undefined;
    },
    timeoutMs,
  );
}

/** Deletes a Volume and says deleting, as the operator does once no snapshot of it is left. */
async function deleteVolume(name: string): Promise<void> {
  await client.delete(VOLUMES, name, NS);
  await patchStatus(VOLUMES, name, { status: 'deleting' });
}

/** Deletes an object and, once the host reported deleted, removes the finalizer as the operator does. */
async function deleteAndFinish(gvr: GVR, name: string): Promise<Obj> {
  if (gvr === VOLUMES) await deleteVolume(name);
  else await client.delete(gvr, name, NS);
  const done = await waitReport(gvr, name, 'host deleted', (h) => h.state === 'deleted');
  await client.patch(gvr, name, NS, { metadata: { finalizers: null } }, PatchStrategy.MergePatch);
  return done;
}

/** A Manager whose Volume informer holds a frozen list (a cache that missed the latest writes). */
class StaleVolumesManager extends Manager {
  readonly #items: KubernetesObject[];
  #inf: Informer<KubernetesObject> | undefined;

  constructor(opts: ManagerOptions, items: KubernetesObject[]) {
    super(opts);
    this.#items = items;
  }

  override informer<T extends KubernetesObject>(gvr: GVR, selector = {}): Informer<T> {
    if (gvr.plural !== VOLUMES.plural) return super.informer<T>(gvr, selector);
    this.#inf ??= new Informer<KubernetesObject>(
      {
        path: '/stale-volumes',
        list: async () => ({ apiVersion: 'v1', kind: 'List', metadata: { resourceVersion: '1' }, items: this.#items }),
        watch: { watch: async () => new AbortController() },
      },
      { resyncPeriodMs: 0, watchdogMs: 0 },
    );
    return this.#inf as unknown as Informer<T>;
  }
}

beforeAll(async () => {
  await installCRDs(kc);
  await client.create(NAMESPACES, { apiVersion: 'v1', kind: 'Namespace', metadata: { name: NS } });
});

afterEach(async () => {
  await Promise.all(running.splice(0).map((h) => h.stop(2000)));
});

afterAll(async () => {
  await deleteNamespaceFully(client, NS);
  await Promise.all(temps.map((d) => rm(d, { recursive: true, force: true })));
});

describe('volume host', () => {
  it('creates a blank volume and reports it available; its agent owns only status.host', async () => {
    const n = await newNode();
    await startHost(n);
    const created = await createVolume('blank', n.name);
    const uid = created.metadata!.uid!;
    const v = await waitReport(VOLUMES, 'blank', 'available', (h) => h.state === 'available');
    expect(v.status!.host).toEqual({
      node: n.name,
      state: 'available',
      location: `local://${n.name}/${uid}`,
      size: '1Gi',
      allocated: expect.any(String),
    });
    expect((await stat(n.backend.pathOf(v.status!.host!.location!))).size).toBe(GiB);
    // The operator's fields are untouched, and the agent's manager owns status.host and nothing else.
    expect(v.status).toMatchObject({ node: n.name, backend: 'local', status: 'creating' });
    const mine = v.metadata!.managedFields!.filter((m) => m.manager === agentFieldManager(n.name));
    expect(mine).toHaveLength(1);
    expect(mine[0]!.subresource).toBe('status');
    const fields = mine[0]!.fieldsV1 as Record<string, Record<string, unknown>>;
    expect(Object.keys(fields)).toEqual(['f:status']);
    expect(Object.keys(fields['f:status']!)).toEqual(['f:host']);
    expect(n.backend.calls.filter((c) => c.op === 'create')).toEqual([{ op: 'create', arg: uid, source: 'blank' }]);
  });

  it('makes a volume from an image pulled through the node image cache', async () => {
    const n = await newNode();
    const files = await tempDir();
    const image = Buffer.alloc(MiB);
    for (let i = 0; i < image.length; i++) image[i] = i % 251;
    await writeFile(path.join(files, 'disk.raw'), image);
    let srv: FileServer | undefined;
    try {
      srv = await serveFiles(files);
      await client.create(IMAGES, {
        apiVersion: ImageKind.apiVersion,
        kind: 'Image',
        metadata: { name: 'img', namespace: NS },
        spec: { source: { url: `${srv.url}/disk.raw` }, diskFormat: 'raw' },
      } as KubernetesObject);
      const images = new ImageCache({ dir: await tempDir(), urlPolicy: { allowCidrs: ['127.0.0.0/8'] } });
      await startHost(n, { images });
      await createVolume('from-image', n.name, { size: '4Mi', source: { image: 'img' } });
      const v = await waitReport(VOLUMES, 'from-image', 'available', (h) => h.state === 'available');
      expect(v.status!.host!.size).toBe('4Mi');
      const data = await readFile(n.backend.pathOf(v.status!.host!.location!));
      expect(data.subarray(0, MiB).equals(image)).toBe(true);
      expect(data.length).toBe(4 * MiB);
      expect(n.backend.calls.find((c) => c.op === 'create')?.source).toBe('image');
      expect(srv.requests.filter((r) => r.method === 'GET' && r.path === '/disk.raw').length).toBeGreaterThan(0);
    } finally {
      await srv?.close();
    }
  });

  it('extends a detached volume; an attached local one is only re-read (QEMU grows it)', async () => {
    const n = await newNode();
    await startHost(n);
    await createVolume('grow', n.name);
    const v = await waitReport(VOLUMES, 'grow', 'available', (h) => h.state === 'available');
    const file = n.backend.pathOf(v.status!.host!.location!);
    await client.patch(VOLUMES, 'grow', NS, { spec: { size: '2Gi' } }, PatchStrategy.MergePatch);
    await waitReport(VOLUMES, 'grow', 'size 2Gi', (h) => h.size === '2Gi' && h.state === 'available');
    expect((await stat(file)).size).toBe(2 * GiB);
    expect(n.backend.calls.filter((c) => c.op === 'extend')).toHaveLength(1);

    // Attached on this node: the host must not touch the file; the server's agent grows it (here: truncate).
    await patchStatus(VOLUMES, 'grow', {
      status: 'in-use',
      attachments: [{ server: 's1', node: n.name, state: 'attached' }],
    });
    const inspects = () => n.backend.calls.filter((c) => c.op === 'inspect').length;
    const before = inspects();
    await client.patch(VOLUMES, 'grow', NS, { spec: { size: '3Gi' } }, PatchStrategy.MergePatch);
    await waitFor('the host read the attached volume back twice', () => inspects() >= before + 2);
    expect((await get(VOLUMES, 'grow')).status!.host!.size).toBe('2Gi');
    await truncate(file, 3 * GiB); // block_resize by the guest's QEMU
    await waitReport(VOLUMES, 'grow', 'size 3Gi read back', (h) => h.size === '3Gi');
    expect(n.backend.calls.filter((c) => c.op === 'extend')).toHaveLength(1);
  });

  it('exports a local volume for attachments on other nodes and removes the export when they go', async () => {
    const n = await newNode();
    await startHost(n);
    const uid = (await createVolume('shared', n.name)).metadata!.uid!;
    await waitReport(VOLUMES, 'shared', 'available', (h) => h.state === 'available');
    const name = exportName(uid);
    // Reserved, and attached on this node: no export.
    await patchStatus(VOLUMES, 'shared', {
      attachments: [
        { server: 'here', node: n.name, state: 'attached' },
        { server: 'soon', node: 'node-x', state: 'reserved' },
      ],
    });
    await patchStatus(VOLUMES, 'shared', {
      attachments: [
        { server: 'here', node: n.name, state: 'attached' },
        { server: 'far', node: 'node-x', state: 'attaching' },
      ],
    });
    const v = await waitReport(VOLUMES, 'shared', 'exported', (h) => h.exports?.length === 1);
    expect(v.status!.host!.exports).toEqual([{ server: 'far', node: 'node-x', host: '127.0.0.1', port: 10809, name }]);
    expect(n.exporter.served.get(name)).toEqual({
      name,
      volumeId: uid,
      blockdev: { driver: 'raw', file: { driver: 'file', filename: n.backend.pathOf(v.status!.host!.location!) } },
      writable: true,
    });
    expect(n.exporter.calls.some((c) => c.op === 'ensure' && c.name !== name)).toBe(false);

    // Detaching: the remote guest may still read it until its agent detached it; the export stays.
    const ensures = () => n.exporter.calls.filter((c) => c.op === 'ensure').length;
    const before = ensures();
    await patchStatus(VOLUMES, 'shared', {
      attachments: [
        { server: 'here', node: n.name, state: 'attached' },
        { server: 'far', node: 'node-x', state: 'detaching' },
      ],
    });
    await waitFor('the detaching attachment reconciled', () => ensures() > before);
    expect(n.exporter.served.has(name)).toBe(true);
    expect(n.exporter.calls.filter((c) => c.op === 'remove')).toEqual([]);

    await patchStatus(VOLUMES, 'shared', { attachments: [{ server: 'here', node: n.name, state: 'attached' }] });
    await waitReport(VOLUMES, 'shared', 'export gone', (h) => h.exports === undefined);
    expect(n.exporter.served.has(name)).toBe(false);
  });

  it('deletes a volume (and its export) and reports deleted', async () => {
    const n = await newNode();
    await startHost(n);
    const uid = (await createVolume('doomed', n.name)).metadata!.uid!;
    const v = await waitReport(VOLUMES, 'doomed', 'available', (h) => h.state === 'available');
    const file = n.backend.pathOf(v.status!.host!.location!);
    expect(existsSync(file)).toBe(true);
    const done = await deleteAndFinish(VOLUMES, 'doomed');
    expect(done.status!.host).toEqual({ node: n.name, state: 'deleted' });
    expect(existsSync(file)).toBe(false);
    expect(n.exporter.calls).toContainEqual({ op: 'remove', name: exportName(uid) });
  });

  it('snapshots a detached volume, refuses an attached local one, restores and deletes', async () => {
    const n = await newNode();
    await startHost(n);
    await createVolume('src', n.name, { size: '8Mi' });
    const v = await waitReport(VOLUMES, 'src', 'available', (h) => h.state === 'available');
    await writeFile(n.backend.pathOf(v.status!.host!.location!), Buffer.alloc(8 * MiB, 7));
    const snapshot = async (name: string) => {
      await client.create(VOLUME_SNAPSHOTS, {
        apiVersion: VolumeSnapshotKind.apiVersion,
        kind: 'VolumeSnapshot',
        metadata: { name, namespace: NS, finalizers: [FINALIZER] },
        spec: { volume: 'src', force: true },
      } as KubernetesObject);
      return patchStatus(VOLUME_SNAPSHOTS, name, { node: n.name, status: 'creating' });
    };
    const snapUid = (await snapshot('s1')).metadata!.uid!;
    const s1 = await waitReport(VOLUME_SNAPSHOTS, 's1', 'available', (h) => h.state === 'available');
    expect(s1.status!.host).toEqual({
      node: n.name,
      state: 'available',
      location: `local://${n.name}/snapshots/${snapUid}`,
    });

    // A volume from the snapshot: the snapshot's location is the source.
    await createVolume('restored', n.name, { size: '8Mi', source: { snapshot: 's1' } });
    const r = await waitReport(VOLUMES, 'restored', 'available', (h) => h.state === 'available');
    expect((await readFile(n.backend.pathOf(r.status!.host!.location!))).equals(Buffer.alloc(8 * MiB, 7))).toBe(true);
    expect(n.backend.calls.filter((c) => c.op === 'create').map((c) => c.source)).toEqual(['blank', 'snapshot']);

    await patchStatus(VOLUMES, 'src', { attachments: [{ server: 's', node: n.name, state: 'attached' }] });
    await snapshot('s2');
    const s2 = await waitReport(VOLUME_SNAPSHOTS, 's2', 'refused', (h) => h.state === 'error');
    expect(s2.status!.host!.fault).toBe(ATTACHED_LOCAL_SNAPSHOT_FAULT);
    expect(n.backend.calls.filter((c) => c.op === 'createSnapshot')).toHaveLength(1);

    const gone = await deleteAndFinish(VOLUME_SNAPSHOTS, 's1');
    expect(gone.status!.host).toEqual({ node: n.name, state: 'deleted' });
    expect(existsSync(n.backend.pathOf(s1.status!.host!.location!))).toBe(false);
  });

  it('reports a failed create as error with the fault and retries; a failed extend keeps available', async () => {
    const n = await newNode();
    n.backend.failNext.set('create', new Error('no space left on device'));
    await startHost(n);
    await createVolume('flaky', n.name);
    const failed = await waitReport(VOLUMES, 'flaky', 'error', (h) => h.state === 'error');
    expect(failed.status!.host).toEqual({
      node: n.name,
      state: 'error',
      fault: 'create failed: no space left on device',
    });
    const ok = await waitReport(VOLUMES, 'flaky', 'available after retry', (h) => h.state === 'available');
    expect(ok.status!.host!.fault).toBeUndefined();

    n.backend.failNext.set('extend', new Error('I/O error'));
    await client.patch(VOLUMES, 'flaky', NS, { spec: { size: '2Gi' } }, PatchStrategy.MergePatch);
    const bad = await waitReport(VOLUMES, 'flaky', 'extend fault', (h) => h.fault !== undefined);
    expect(bad.status!.host).toMatchObject({
      state: 'available',
      size: '1Gi',
      fault: 'extend to 2Gi failed: I/O error',
    });
    const grown = await waitReport(VOLUMES, 'flaky', 'extended after retry', (h) => h.size === '2Gi');
    expect(grown.status!.host!.fault).toBeUndefined();
    expect(grown.status!.host!.state).toBe('available');
  });

  it('converges with exactly one volume when killed between create and report', async () => {
    const n = await newNode();
    n.backend.hangAfterCreate = true;
    const first = await startHost(n);
    const uid = (await createVolume('crash', n.name)).metadata!.uid!;
    await waitFor('the first host created the file', () => existsSync(path.join(n.backend.volumesDir, `${uid}.qcow2`)));
    await first.stop(100); // "killed": its create never returned, nothing was reported
    expect((await get(VOLUMES, 'crash')).status!.host).toEqual({ node: n.name, state: 'creating' });

    const again: Node = { ...n, backend: new DirBackend(n.dir, n.name) };
    await startHost(again);
    const v = await waitReport(VOLUMES, 'crash', 'available', (h) => h.state === 'available');
    expect(v.status!.host!.location!).toBe(`local://${n.name}/${uid}`);
    expect((await again.backend.list()).volumes).toEqual([`local://${n.name}/${uid}`]);
  });

  it('deletes a volume whose create was never reported (found by uid)', async () => {
    const n = await newNode();
    n.backend.hangAfterCreate = true;
    const first = await startHost(n);
    const uid = (await createVolume('crash-delete', n.name)).metadata!.uid!;
    await waitFor('created', () => existsSync(path.join(n.backend.volumesDir, `${uid}.qcow2`)));
    await first.stop(100);
    await deleteVolume('crash-delete');
    const again: Node = { ...n, backend: new DirBackend(n.dir, n.name) };
    await startHost(again);
    await waitReport(VOLUMES, 'crash-delete', 'deleted', (h) => h.state === 'deleted');
    expect((await again.backend.list()).volumes).toEqual([]);
  });

  it('sweeps local volumes and snapshots whose objects are gone, and keeps the others', async () => {
    const n = await newNode();
    const h = await startHost(n);
    await createVolume('kept', n.name, { size: '1Mi' });
    const kept = await waitReport(VOLUMES, 'kept', 'available', (x) => x.state === 'available');
    const orphan = randomUUID();
    const orphanSnap = randomUUID();
    await writeFile(path.join(n.backend.volumesDir, `${orphan}.qcow2`), '');
    await writeFile(path.join(n.backend.volumesDir, 'not-a-volume.qcow2'), '');
    await n.backend.createSnapshot(kept.status!.host!.location!, { id: orphanSnap, name: 'x', namespace: NS });
    const swept = await h.host.sweepOrphans();
    expect(swept.sort()).toEqual([`local://${n.name}/${orphan}`, `local://${n.name}/snapshots/${orphanSnap}`].sort());
    expect((await n.backend.list()).volumes.sort()).toEqual(
      [kept.status!.host!.location!, `local://${n.name}/not-a-volume`].sort(),
    );
    expect((await n.backend.list()).snapshots).toEqual([]);
  });

  it('publishes the backend probes in the Hypervisor status.volumeBackends', async () => {
    const n = await newNode();
    const h = await startHost(n);
    const driver = createDriver('fake', { nodeName: n.name, logger: silentLogger() });
    await driver.init();
    const reporter = new HypervisorReporter({
      client,
      nodeName: n.name,
      driver,
      specDefaults: {},
      labels: {},
      heartbeatSeconds: 60,
      agentVersion: 'test',
      readiness: () => ({ ready: true, message: '' }),
      volumeBackends: () => h.host.probe(),
    });
    try {
      await reporter.ensure();
      await reporter.report();
      const hv = await client.get<Hypervisor & KubernetesObject>(HYPERVISORS, n.name);
      expect(hv.status?.volumeBackends).toEqual([{ name: 'local', ok: true }]);
    } finally {
      await reporter.stop();
      await client.delete(HYPERVISORS, n.name).catch(() => {});
    }
  });

  it('builds the rbd backend of a VolumeType from its options and Secret, and reads the NBD key', async () => {
    const SECRETS: GVR = { group: '', version: 'v1', plural: 'secrets' };
    const b64 = (v: string) => Buffer.from(v).toString('base64');
    await client.create(SECRETS, {
      apiVersion: 'v1',
      kind: 'Secret',
      metadata: { name: 'ceph', namespace: NS },
      data: { key: b64('AQBkey==') },
    } as KubernetesObject);
    const typeName = `${NS}-rbd`;
    await client.create(VOLUME_TYPES, {
      apiVersion: VolumeTypeKind.apiVersion,
      kind: 'VolumeType',
      metadata: { name: typeName },
      spec: {
        backend: 'rbd',
        rbd: { pool: 'vols', monitors: ['10.0.0.1:6789'], secretRef: { name: 'ceph', namespace: NS } },
      },
    } as KubernetesObject);
    try {
      const built: RbdTypeOptions[] = [];
      const dir = await tempDir();
      const reg = createBackends({
        client,
        local: new DirBackend(dir, 'n'),
        rbd: (o) => {
          built.push(o);
          return new DirBackend(dir, `rbd-${built.length}`);
        },
      });
      expect([...reg.byName.keys()]).toEqual(['local']);
      const type = await client.get<VolumeType & KubernetesObject>(VOLUME_TYPES, typeName);
      const first = await reg.rbdFor!(type);
      expect(built).toEqual([
        { type: typeName, pool: 'vols', user: 'stratus', monitors: ['10.0.0.1:6789'], key: 'AQBkey==' },
      ]);
      expect(await reg.rbdFor!(type)).toBe(first);
      // A new key (rotated Secret): a new instance.
      await client.patch(SECRETS, 'ceph', NS, { data: { key: b64('AQBnew==') } }, PatchStrategy.MergePatch);
      expect(await reg.rbdFor!(type)).not.toBe(first);
      expect(built[1]?.key).toBe('AQBnew==');
      expect(createBackends({ client }).rbdFor).toBeUndefined();
    } finally {
      await client.delete(VOLUME_TYPES, typeName).catch(() => {});
    }

    await expect(readNbdPsk(client, NS)).rejects.toThrow(`secret ${NS}/${NBD_SECRET_NAME} not found`);
    const key = 'ab'.repeat(32);
    await client.create(SECRETS, {
      apiVersion: 'v1',
      kind: 'Secret',
      metadata: { name: NBD_SECRET_NAME, namespace: NS },
      data: { identity: b64('stratus'), key: b64(key) },
    } as KubernetesObject);
    expect(await readNbdPsk(client, NS)).toEqual({ identity: 'stratus', key });
  });

  it('does not turn an available report back to creating when it decides on a stale cache', async () => {
    const n = await newNode();
    const first = await startHost(n);
    const stale = await createVolume('stale', n.name); // no report yet: what a lagging cache still shows
    await waitReport(VOLUMES, 'stale', 'available', (h) => h.state === 'available');
    await first.stop();

    const backend = new DirBackend(n.dir, n.name);
    const host = new VolumeHost({
      manager: new StaleVolumesManager({ kubeConfig: kc, logger: silentLogger(), http: false }, [stale]),
      nodeName: n.name,
      backends: new Map([['local', backend]]),
    });
    host.volumes.start();
    try {
      expect(await host.volumes.waitForSync(10_000)).toBe(true);
      expect(host.volumes.get('stale', NS)?.status?.host).toBeUndefined();
      // Decided "create" from the cache; the stored object says available: re-decide, write nothing, create nothing.
      expect(await host.reconcileVolume({ namespace: NS, name: 'stale' })).toEqual({ requeue: true });
      expect(backend.calls.filter((c) => c.op === 'create')).toEqual([]);
      const v = await get(VOLUMES, 'stale');
      expect(v.status!.host!.state).toBe('available');
      expect(v.metadata!.resourceVersion).not.toBe(stale.metadata!.resourceVersion);
    } finally {
      await host.volumes.stop();
    }
  });
});
