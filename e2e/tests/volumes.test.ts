// Block storage end to end (#12, "Done when"): an operator process and two QEMU node agent processes (TCG) against
// the local control plane, the test guest image served over loopback. The two agents play two nodes on this host:
// their own state directories and host addresses (127.0.0.2, 127.0.0.3: each node's NBD server listens on its host
// address, port 10809), the noop network backend (the guests need no NICs: the test talks to them on the serial
// console, a busybox shell, see e2e/images/README.md). Guests are booted once for the file:
//   vm-a on node a, vm-b on node b (from the image), and later vm-bfv (from a volume made from the image).
//  1. a blank local volume hot-plugged into vm-a appears in the guest (found by its serial in /sys/block/*/serial),
//     gets a vfat filesystem (busybox mkdosfs, its mkfs.vfat) and a file;
//  2. extended while attached: the guest sees the new size (/sys/block/<dev>/size) without a reboot;
//  3. detached from vm-a and attached to vm-b on the other node (over NBD from node a): the file is there;
//  4. a snapshot, then a volume from it: it holds the snapshot-time data while the original moves on;
//  5. a server boots from a volume made from the image; deleting the server keeps the volume.
//  6. rbd (the shared test Ceph cluster, e2e/ceph; QEMU runs in the root namespace with the agents and reaches its
//     address directly): a volume of an rbd VolumeType is placed on a node reporting rbd ok, hot-plugged into vm-a,
//     gets a filesystem and a file; detached and attached to vm-b on the other node directly (no NBD export, not
//     Degraded); extended while attached; a forced snapshot of the in-use volume, a volume from it holds the
//     snapshot-time data; deleting everything leaves no image of the test in the pool.
//  7. QoS: a volume of a type with qos.totalBytesSec attached to vm-a: the guest's dd rate is logged next to the limit
//     (not asserted); the throttle group in QEMU has the type's limits, and a change of the type changes them live
//     (read over QMP while node a's agent is stopped: QEMU serves one QMP client, the agent).
// Needs root, qemu-system-x86_64, qemu-img, qemu-storage-daemon and genisoimage; skipped (with a message) otherwise.
// Written against the #12 contract before the slices were merged: the lead runs it after the merge.
import { execFile, execFileSync } from 'node:child_process';
import { chmod, mkdir, mkdtemp, readdir, rm, symlink } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import { type KubernetesObject, PatchStrategy } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { volumeSerial } from '../../node-agent/src/driver.ts';
import { QmpClient } from '../../node-agent/src/qemu/qmp.ts';
import { NbdExporter } from '../../node-agent/src/volumes/nbd-export.ts';
import {
  type Hypervisor,
  type Volume,
  VolumeKind,
  type VolumeSnapshot,
  VolumeSnapshotKind,
  VolumeTypeKind,
} from '../../operator/src/api/index.ts';
import { gvrOf } from '../../operator/src/controllers/common.ts';
import { KubeClient } from '../../operator/src/runtime/index.ts';
import type { CephCluster } from '../ceph/ceph.ts';
import { sharedCeph } from '../ceph/shared.ts';
import { adminKubeConfig, adminKubeconfigFile } from '../controlplane/testenv.ts';
import { ensureTestImage, type TestImage } from '../images/build.ts';
import { type FileServer, start } from '../images/serve.ts';
import {
  type AgentProcOptions,
  deleteIgnore,
  FLAVORS,
  flavor,
  getServer,
  guestDir,
  HYPERVISORS,
  IMAGES,
  image,
  isQemuOf,
  LEASES,
  NAMESPACES,
  NODE_LABEL,
  type Proc,
  qemuPid,
  SERVERS,
  type Srv,
  server,
  startAgentProc,
  startOperatorProc,
  waitConsole,
  waitFor,
} from '../stack.ts';
import { e2eAccelerator, missingQemuPrerequisite } from '../testing/qemu.ts';

const log = (m: string) => console.error(`[volumes] ${m}`);

const qsd = (() => {
  try {
    execFileSync('qemu-storage-daemon', ['--version'], { stdio: 'ignore' });
    return undefined;
  } catch {
    return 'no qemu-storage-daemon';
  }
})();
const missing = missingQemuPrerequisite() ?? qsd;
if (missing) log(`SKIPPED: ${missing} (needs root, QEMU, qemu-img, qemu-storage-daemon and genisoimage)`);

const ID = `e2e-vol-${process.pid}`;
const LABEL = 'test.stratus.io/e2e';
const labels = { [LABEL]: ID };
const NS = ID;
const FLAVOR = `${ID}-tiny`;
const CEPH_TYPE = `${ID}-ceph`;
const QOS_TYPE = `${ID}-qos`;
const READY = 'STRATUS-GUEST-READY';
const STATE_TIMEOUT = 180_000;
const VOLUMES = gvrOf(VolumeKind);
const SNAPSHOTS = gvrOf(VolumeSnapshotKind);
const VOLUMETYPES = gvrOf(VolumeTypeKind);
const SECRETS = { group: '', version: 'v1', plural: 'secrets' };
const GiB = 2 ** 30;
const MiB = 2 ** 20;
const pexec = promisify(execFile);

type Vol = KubernetesObject & Volume;
type Snap = KubernetesObject & VolumeSnapshot;

interface Node {
  name: string;
  hostIP: string;
  stateDir: string;
  proc?: Proc;
  /** How its agent was started (restarted with these, on a new log file). */
  opts?: AgentProcOptions;
}

describe.skipIf(missing !== undefined)('Volumes on QEMU guests through operator and node agents', () => {
  const client = new KubeClient(adminKubeConfig());
  let img: TestImage;
  let work: string;
  let files: FileServer;
  let operator: Proc | undefined;
  const nodes: Node[] = [];
  /** Guest uid → the node that runs it (console and pid files are in that node's state directory). */
  const guests = new Map<string, Node>();
  const uidOf = new Map<string, string>();

  const node = (i: 0 | 1) => nodes[i]!;
  const create = async (name: string, on: Node, spec: Partial<Srv['spec']>) => {
    const s = await client.create<Srv>(
      SERVERS,
      server(name, NS, { flavor: FLAVOR, nodeSelector: { ...labels, [NODE_LABEL]: on.name }, ...spec }, labels),
    );
    guests.set(s.metadata!.uid!, on);
    uidOf.set(name, s.metadata!.uid!);
    return s.metadata!.uid!;
  };
  const patchSpec = (gvr: typeof SERVERS, name: string, spec: Record<string, unknown>) =>
    client.patch(gvr, name, NS, { spec }, PatchStrategy.MergePatch);
  const waitServer = (name: string, status: string) =>
    waitFor(
      `server ${name} ${status}`,
      async () => {
        const s = await getServer(client, NS, name);
        if (s?.status?.status === 'ERROR') throw new Error(`server ${name} in ERROR: ${s.status.fault?.message}`);
        return s?.status?.status === status && s.status.taskState === undefined ? s : undefined;
      },
      STATE_TIMEOUT,
    );
  const waitVolume = (name: string, what: string, ok: (v: Vol) => boolean) =>
    waitFor(
      `volume ${name} ${what}`,
      async () => {
        const v = await client.get<Vol>(VOLUMES, name, NS);
        if (v.status?.status?.startsWith('error')) throw new Error(`volume ${name} in ${v.status.status}`);
        return ok(v) ? v : undefined;
      },
      STATE_TIMEOUT,
    );
  const createVolume = async (name: string, spec: Record<string, unknown>) => {
    await client.create<Vol>(VOLUMES, {
      apiVersion: VolumeKind.apiVersion,
      kind: 'Volume',
      metadata: { name, namespace: NS, labels },
      spec,
    } as unknown as Vol);
    return waitVolume(name, 'available', (v) => v.status?.status === 'available');
  };
  /** Attached to `srv` as the operator reports it (Volume in-use, the server's volumesAttached). */
  const waitAttached = async (vol: string, srv: string) => {
    await waitVolume(vol, `in-use by ${srv}`, (v) =>
      (v.status?.attachments ?? []).some((a) => a.server === srv && a.state === 'attached'),
    );
    return waitFor(
      `${srv} volumesAttached ${vol}`,
      async () => (await getServer(client, NS, srv))?.status?.volumesAttached?.some((a) => a.volume === vol),
      STATE_TIMEOUT,
    );
  };

  let marks = 0;
  /**
   * Runs a shell line in the guest (its serial console: a busybox shell) and returns what it printed between two
   * markers. The markers are split in the typed line (`"R""7:"`) so the echo of the line itself never matches.
   */
  const sh = async (srv: string, cmd: string, timeoutMs = 60_000): Promise<string> => {
    const uid = uidOf.get(srv)!;
    const on = guests.get(uid)!;
    const n = ++marks;
    const line = `echo "R""${n}:$( { ${cmd} ; } 2>&1 | tr '\\n' ' ' )" ":R""${n}"`;
    const sock = net.connect(path.join(guestDir(on.stateDir, uid), 'console.sock'));
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', () => resolve());
      sock.once('error', reject);
    });
    // QEMU feeds the UART only as fast as the guest reads and a closed socket drops unread input (qemu-driver.test.ts).
    try {
      sock.write(`\n${line}\n`);
      const text = await waitConsole(on.stateDir, uid, `:R${n}`, 1, timeoutMs);
      const m = new RegExp(`R${n}:(.*) :R${n}`).exec(text);
      if (!m) throw new Error(`no output of ${cmd} in the console of ${srv}`);
      return m[1]!.trim();
    } finally {
      sock.destroy();
    }
  };
  /** The guest's block device of a volume: found by its serial (virtio-blk /sys/block/vd*\/serial). */
  const deviceOf = async (srv: string, volumeUID: string): Promise<string> => {
    const serial = volumeSerial(volumeUID);
    return waitFor(
      `${srv}: a disk with serial ${serial}`,
      async () => {
        const out = await sh(
          srv,
          `for d in /sys/block/*; do [ "$(cat $d/serial 2>/dev/null)" = ${serial} ] && echo \${d##*/}; done`,
        );
        return out || undefined;
      },
      STATE_TIMEOUT,
    );
  };
  const sectors = async (srv: string, dev: string) => Number(await sh(srv, `cat /sys/block/${dev}/size`));

  beforeAll(async () => {
    img = await ensureTestImage({ log });
    work = await mkdtemp('/tmp/stratus-e2e-vol-');
    await chmod(work, 0o711); // QEMU drops to --qemu-user and must still reach its guest directory
    const www = path.join(work, 'www');
    await mkdir(www);
    await symlink(img.path, path.join(www, 'test.qcow2'));
    files = await start(www);
    operator = startOperatorProc({
      kubeconfig: adminKubeconfigFile(),
      leaseName: ID,
      logFile: path.join(work, 'operator.log'),
    });
    await operator.waitForLog('leading: controllers started', 120_000);
    await client.create(NAMESPACES, { apiVersion: 'v1', kind: 'Namespace', metadata: { name: NS, labels } });
    await client.create(FLAVORS, flavor(FLAVOR, labels));
    await client.create(IMAGES, image('test', NS, `${files.url}/test.qcow2`, img.sha256, labels));
    for (const [i, hostIP] of ['127.0.0.2', '127.0.0.3'].entries()) {
      const n: Node = { name: `${ID}-${'ab'[i]}`, hostIP, stateDir: path.join(work, `s-${'ab'[i]}`) };
      n.opts = {
        kubeconfig: adminKubeconfigFile(),
        nodeName: n.name,
        stateDir: n.stateDir,
        accelerator: e2eAccelerator(),
        kvmProbeKernel: img.kernel,
        labels: { ...labels, [NODE_LABEL]: n.name },
        hostIP,
        networkBackend: 'noop',
        logFile: path.join(work, `agent-${'ab'[i]}.log`),
      };
      n.proc = startAgentProc(n.opts);
      nodes.push(n);
    }
    for (const n of nodes) await n.proc!.waitForLog('node agent started', 120_000);
  }, 900_000);

  afterAll(async () => {
    // Servers and volumes first, while operator and agents run (they detach, destroy and release finalizers).
    try {
      for (const s of (await client.list<Srv>(SERVERS, { namespace: NS })).items) {
        await deleteIgnore(client, SERVERS, s.metadata!.name!, NS);
      }
      await waitFor(
        'servers deleted',
        async () => (await client.list(SERVERS, { namespace: NS })).items.length === 0,
        120_000,
      ).catch((e: unknown) => log(String(e)));
      for (const gvr of [SNAPSHOTS, VOLUMES]) {
        for (const o of (await client.list<KubernetesObject>(gvr, { namespace: NS })).items) {
          await deleteIgnore(client, gvr, o.metadata!.name!, NS);
        }
      }
      await waitFor(
        'volumes deleted',
        async () => (await client.list(VOLUMES, { namespace: NS })).items.length === 0,
        120_000,
      ).catch((e: unknown) => log(String(e)));
      for (const gvr of [SERVERS, SNAPSHOTS, VOLUMES]) {
        for (const o of (await client.list<KubernetesObject>(gvr, { namespace: NS })).items) {
          await client
            .patch(gvr, o.metadata!.name!, NS, { metadata: { finalizers: null } }, PatchStrategy.MergePatch)
            .catch(() => {});
        }
      }
    } catch (e) {
      log(`cleanup: ${e}`);
    }
    for (const n of nodes) await n.proc?.stop('SIGTERM');
    await operator?.stop('SIGTERM');
    // Never leave a guest behind: kill only QEMUs of this run's guests.
    for (const [uid, n] of guests) {
      const pid = await qemuPid(n.stateDir, uid);
      if (await isQemuOf(pid, uid)) process.kill(pid, 'SIGKILL');
    }
    // Each node's NBD daemon outlives its agent by design (guests on other nodes read through it): end it with the run.
    for (const n of nodes) {
      await new NbdExporter({
        stateDir: n.stateDir,
        hostIP: n.hostIP,
        psk: { identity: 'stratus', key: '0'.repeat(64) },
      })
        .stop()
        .catch((e: unknown) => log(`nbd daemon of ${n.name}: ${e}`));
    }
    for (const n of nodes) {
      await deleteIgnore(client, HYPERVISORS, n.name).catch(() => {});
      await deleteIgnore(client, LEASES, n.name, 'stratus-operator-test').catch(() => {});
    }
    await deleteIgnore(client, FLAVORS, FLAVOR).catch(() => {});
    for (const t of [CEPH_TYPE, QOS_TYPE]) await deleteIgnore(client, VOLUMETYPES, t).catch(() => {});
    await deleteIgnore(client, NAMESPACES, NS).catch(() => {});
    await deleteIgnore(client, LEASES, ID, 'stratus-operator-test').catch(() => {});
    await files?.close();
    if (work && !process.env.STRATUS_KEEP_WORK) await rm(work, { recursive: true, force: true });
  }, 300_000);

  let dataUID = '';
  let devA = '';

  it('a blank volume hot-plugged into a running guest appears, gets a filesystem and a file', async () => {
    const a = await create('vm-a', node(0), { image: 'test' });
    const b = await create('vm-b', node(1), { image: 'test' });
    await waitConsole(node(0).stateDir, a, READY, 1, STATE_TIMEOUT);
    await waitConsole(node(1).stateDir, b, READY, 1, STATE_TIMEOUT);
    await waitServer('vm-a', 'ACTIVE');
    await waitServer('vm-b', 'ACTIVE');
    const data = await createVolume('data', { size: '1Gi' });
    dataUID = data.metadata!.uid!;
    await patchSpec(SERVERS, 'vm-a', { volumes: [{ volume: 'data' }] });
    await waitAttached('data', 'vm-a');
    devA = await deviceOf('vm-a', dataUID);
    expect(await sectors('vm-a', devA)).toBe(GiB / 512);
    expect(
      await sh(
        'vm-a',
        `mkdosfs /dev/${devA} >/dev/null && mkdir -p /mnt/d && mount -t vfat /dev/${devA} /mnt/d && ` +
          `echo hello-from-a > /mnt/d/a.txt && sync && cat /mnt/d/a.txt`,
      ),
    ).toBe('hello-from-a');
  });

  it('extended while attached, the guest sees the new size without a reboot', async () => {
    await client.patch(VOLUMES, 'data', NS, { spec: { size: '2Gi' } }, PatchStrategy.MergePatch);
    await waitVolume('data', 'extended to 2Gi', (v) => v.status?.size === '2Gi' && v.status.status === 'in-use');
    await waitFor('vm-a sees 2 GiB', async () => (await sectors('vm-a', devA)) === (2 * GiB) / 512, STATE_TIMEOUT);
    expect(await sh('vm-a', 'cat /mnt/d/a.txt')).toBe('hello-from-a');
  });

  it('detached and attached to a server on another node (NBD), the file is there', async () => {
    await sh('vm-a', 'umount /mnt/d && echo unmounted');
    await patchSpec(SERVERS, 'vm-a', { volumes: [] });
    await waitVolume('data', 'available', (v) => v.status?.status === 'available');
    await waitFor('the disk gone from vm-a', async () => (await sh('vm-a', `ls /sys/block`)).includes(devA) === false);
    await patchSpec(SERVERS, 'vm-b', { volumes: [{ volume: 'data' }] });
    await waitAttached('data', 'vm-b');
    const v = await client.get<Vol>(VOLUMES, 'data', NS);
    // held on node a, used on node b: exported over NBD by node a for vm-b
    expect(v.status?.node).toBe(node(0).name);
    expect(v.status?.host?.exports).toEqual([expect.objectContaining({ server: 'vm-b', node: node(1).name })]);
    const devB = await deviceOf('vm-b', dataUID);
    expect(await sectors('vm-b', devB)).toBe((2 * GiB) / 512);
    expect(await sh('vm-b', `mkdir -p /mnt/d && mount -t vfat /dev/${devB} /mnt/d && cat /mnt/d/a.txt`)).toBe(
      'hello-from-a',
    );
    await sh('vm-b', 'umount /mnt/d && echo unmounted');
    await patchSpec(SERVERS, 'vm-b', { volumes: [] });
    await waitVolume('data', 'available', (x) => x.status?.status === 'available' && !x.status.host?.exports?.length);
  });

  it('a volume from a snapshot holds the snapshot-time data while the original moves on', async () => {
    await client.create<Snap>(SNAPSHOTS, {
      apiVersion: VolumeSnapshotKind.apiVersion,
      kind: 'VolumeSnapshot',
      metadata: { name: 'snap1', namespace: NS, labels },
      spec: { volume: 'data', force: false },
    } as Snap);
    await waitFor(
      'snap1 available',
      async () => (await client.get<Snap>(SNAPSHOTS, 'snap1', NS)).status?.status === 'available',
      STATE_TIMEOUT,
    );
    // the original moves on
    await patchSpec(SERVERS, 'vm-a', { volumes: [{ volume: 'data' }] });
    await waitAttached('data', 'vm-a');
    devA = await deviceOf('vm-a', dataUID);
    await sh('vm-a', `mount -t vfat /dev/${devA} /mnt/d && echo after > /mnt/d/b.txt && sync && umount /mnt/d && ls`);
    // a volume from the snapshot, attached to vm-a too: only the snapshot-time file
    const restored = await createVolume('restored', { size: '2Gi', source: { snapshot: 'snap1' } });
    await patchSpec(SERVERS, 'vm-a', { volumes: [{ volume: 'data' }, { volume: 'restored' }] });
    await waitAttached('restored', 'vm-a');
    const devR = await deviceOf('vm-a', restored.metadata!.uid!);
    expect(await sh('vm-a', `mkdir -p /mnt/r && mount -t vfat /dev/${devR} /mnt/r && ls /mnt/r`)).toBe('a.txt');
    expect(await sh('vm-a', `mount -t vfat /dev/${devA} /mnt/d && ls /mnt/d`)).toBe('a.txt b.txt');
    await sh('vm-a', 'umount /mnt/r && umount /mnt/d && echo unmounted');
  });

  it('a server boots from a volume made from the image; deleting the server keeps the volume; a new server boots from it with the data', async () => {
    const boot = await createVolume('bootvol', { size: '1Gi', source: { image: 'test' } });
    expect(boot.status?.bootable).toBe(true);
    const bootUID = boot.metadata!.uid!;
    const uid = await create('vm-bfv', node(0), { bootVolume: 'bootvol' });
    await waitConsole(node(0).stateDir, uid, `${READY} hostname=vm-bfv`, 1, STATE_TIMEOUT);
    const s = await waitServer('vm-bfv', 'ACTIVE');
    expect(s.status?.volumesAttached).toEqual([expect.objectContaining({ volume: 'bootvol', bootIndex: 0 })]);
    // Data on the boot volume, past the image's partition (the test guest's root file system is its initramfs).
    const dev = await deviceOf('vm-bfv', bootUID);
    await sh(
      'vm-bfv',
      `echo bfv-data-${uid.slice(0, 8)} | dd of=/dev/${dev} bs=1M seek=512 conv=fsync 2>/dev/null; echo ok`,
    );
    await client.delete(SERVERS, 'vm-bfv', NS);
    await waitFor('vm-bfv gone', async () => (await getServer(client, NS, 'vm-bfv')) === undefined, STATE_TIMEOUT);
    const v = await waitVolume('bootvol', 'available after the server went', (x) => x.status?.status === 'available');
    expect(v.status?.attachments ?? []).toEqual([]);
    // A new server, on the other node (the volume is reached over NBD), boots from it and finds the data.
    const uid2 = await create('vm-bfv2', node(1), { bootVolume: 'bootvol' });
    await waitConsole(node(1).stateDir, uid2, `${READY} hostname=vm-bfv2`, 1, STATE_TIMEOUT);
    await waitServer('vm-bfv2', 'ACTIVE');
    const dev2 = await deviceOf('vm-bfv2', bootUID);
    expect(await sh('vm-bfv2', `dd if=/dev/${dev2} bs=1M skip=512 count=1 2>/dev/null | head -c 17`)).toBe(
      `bfv-data-${uid.slice(0, 8)}`,
    );
  });

  // --- rbd: the shared test Ceph cluster -------------------------------------------------------------------------
  let ceph: CephCluster | undefined;
  /** uids of this file's rbd volumes and snapshots: none of their images may be left in the pool. */
  const rbdIds: string[] = [];
  const poolImages = async () =>
    (
      JSON.parse(
        (await pexec('rbd', [...ceph!.adminArgs(), 'ls', '-l', '--format', 'json', 'volumes'], { encoding: 'utf8' }))
          .stdout,
      ) as { image: string; snapshot?: string }[]
    )
      .map((r) => (r.snapshot ? `${r.image}@${r.snapshot}` : r.image))
      .filter((n) => rbdIds.some((id) => n.includes(id)));
  const backendsOf = async (n: Node) =>
    (await client.get<KubernetesObject & Hypervisor>(HYPERVISORS, n.name)).status?.volumeBackends ?? [];
  const rbdOk = async (n: Node) => (await backendsOf(n)).some((b) => b.name === 'rbd' && b.ok);
  const waitSnapshot = (name: string) =>
    waitFor(
      `snapshot ${name} available`,
      async () => {
        const x = await client.get<Snap>(SNAPSHOTS, name, NS);
        if (x.status?.status === 'error') throw new Error(`snapshot ${name} in error: ${x.status.host?.fault}`);
        return x.status?.status === 'available' ? x : undefined;
      },
      STATE_TIMEOUT,
    );
  /** Server `srv`'s volumes list set to `vols`; waits for the ones removed to be available again. */
  const setVolumes = async (srv: string, vols: string[], removed: string[] = []) => {
    await patchSpec(SERVERS, srv, { volumes: vols.map((volume) => ({ volume })) });
    for (const r of removed)
      await waitVolume(r, `detached from ${srv}`, (v) => !(v.status?.attachments ?? []).some((a) => a.server === srv));
  };

  it('rbd: a volume is placed on a node with rbd, hot-plugged, gets a filesystem and a file', async () => {
    ceph = await sharedCeph(log);
    await client.create(SECRETS, {
      apiVersion: 'v1',
      kind: 'Secret',
      metadata: { name: 'ceph-key', namespace: NS, labels },
      stringData: { key: ceph.key },
    } as KubernetesObject);
    await client.create(VOLUMETYPES, {
      apiVersion: VolumeTypeKind.apiVersion,
      kind: 'VolumeType',
      metadata: { name: CEPH_TYPE, labels },
      spec: {
        backend: 'rbd',
        rbd: {
          pool: 'volumes',
          user: ceph.user,
          monitors: [ceph.monHost],
          secretRef: { name: 'ceph-key', namespace: NS },
        },
      },
    } as KubernetesObject);
    for (const n of nodes) await waitFor(`${n.name} reports rbd ok`, () => rbdOk(n), STATE_TIMEOUT);
    // vm-a gives its local volumes back first (its spare root ports are few).
    await sh('vm-a', 'umount /mnt/d /mnt/r 2>/dev/null; echo ok');
    await setVolumes('vm-a', [], ['data', 'restored']);
    const v = await createVolume('rbdvol', { size: '1Gi', volumeType: CEPH_TYPE });
    const uid = v.metadata!.uid!;
    rbdIds.push(uid);
    expect(v.status?.backend).toBe('rbd');
    expect(nodes.map((n) => n.name)).toContain(v.status?.node);
    expect(await rbdOk(nodes.find((n) => n.name === v.status?.node)!)).toBe(true);
    expect(v.status?.host?.location).toBe(`rbd://${ceph.fsid}/volumes/volume-${uid}`);
    await setVolumes('vm-a', ['rbdvol']);
    await waitAttached('rbdvol', 'vm-a');
    const dev = await deviceOf('vm-a', uid);
    expect(await sectors('vm-a', dev)).toBe(GiB / 512);
    expect(
      await sh(
        'vm-a',
        `mkdosfs /dev/${dev} >/dev/null && mkdir -p /mnt/c && mount -t vfat /dev/${dev} /mnt/c && ` +
          `echo rbd-from-a > /mnt/c/a.txt && sync && umount /mnt/c && echo done`,
      ),
    ).toBe('done');
  });

  let rbdDevB = '';
  it('rbd: detached and attached to a server on another node directly (no NBD export), the file is there', async () => {
    const uid = rbdIds[0]!;
    await setVolumes('vm-a', [], ['rbdvol']);
    await waitVolume('rbdvol', 'available', (v) => v.status?.status === 'available');
    await setVolumes('vm-b', ['rbdvol']);
    await waitAttached('rbdvol', 'vm-b');
    const v = await client.get<Vol>(VOLUMES, 'rbdvol', NS);
    expect(v.status?.host?.exports ?? []).toEqual([]);
    expect(v.status?.conditions?.find((c) => c.type === 'Degraded')?.status).not.toBe('True');
    rbdDevB = await deviceOf('vm-b', uid);
    expect(await sh('vm-b', `mkdir -p /mnt/c && mount -t vfat /dev/${rbdDevB} /mnt/c && cat /mnt/c/a.txt`)).toBe(
      'rbd-from-a',
    );
  });

  it('rbd: extended while attached, the guest sees the new size', async () => {
    await client.patch(VOLUMES, 'rbdvol', NS, { spec: { size: '2Gi' } }, PatchStrategy.MergePatch);
    await waitVolume('rbdvol', 'extended to 2Gi', (v) => v.status?.size === '2Gi' && v.status.status === 'in-use');
    await waitFor('vm-b sees 2 GiB', async () => (await sectors('vm-b', rbdDevB)) === (2 * GiB) / 512, STATE_TIMEOUT);
    expect(await sh('vm-b', 'cat /mnt/c/a.txt')).toBe('rbd-from-a');
  });

  it('rbd: a forced snapshot of the in-use volume; a volume from it holds the snapshot-time data', async () => {
    await sh('vm-b', 'sync && echo synced');
    const snap = await client.create<Snap>(SNAPSHOTS, {
      apiVersion: VolumeSnapshotKind.apiVersion,
      kind: 'VolumeSnapshot',
      metadata: { name: 'rbdsnap', namespace: NS, labels },
      spec: { volume: 'rbdvol', force: true },
    } as Snap);
    rbdIds.push(snap.metadata!.uid!);
    const s = await waitSnapshot('rbdsnap');
    expect(s.status?.host?.location).toBe(
      `rbd://${ceph!.fsid}/volumes/volume-${rbdIds[0]}@snapshot-${snap.metadata!.uid}`,
    );
    expect(await sh('vm-b', 'echo later > /mnt/c/b.txt && sync && ls /mnt/c')).toBe('a.txt b.txt');
    const r = await createVolume('rbdrestored', {
      size: '2Gi',
      volumeType: CEPH_TYPE,
      source: { snapshot: 'rbdsnap' },
    });
    rbdIds.push(r.metadata!.uid!);
    await setVolumes('vm-b', ['rbdvol', 'rbdrestored']);
    await waitAttached('rbdrestored', 'vm-b');
    const dev = await deviceOf('vm-b', r.metadata!.uid!);
    expect(await sh('vm-b', `mkdir -p /mnt/s && mount -t vfat -o ro /dev/${dev} /mnt/s && ls /mnt/s`)).toBe('a.txt');
    expect(await sh('vm-b', 'ls /mnt/c')).toBe('a.txt b.txt');
  });

  it('rbd: attach to a server on a node that cannot reach the backend is refused, the volume untouched', async () => {
    // Node c: an agent whose PATH has every tool of this host but the rbd CLI (its probe reports rbd not ok).
    const noRbd = path.join(work, 'path-no-rbd');
    await mkdir(noRbd);
    for (const dir of (process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin').split(':')) {
      for (const f of await readdir(dir).catch(() => [] as string[])) {
        if (f !== 'rbd') await symlink(path.join(dir, f), path.join(noRbd, f)).catch(() => {});
      }
    }
    const c: Node = { name: `${ID}-c`, hostIP: '127.0.0.4', stateDir: path.join(work, 's-c') };
    c.opts = { ...node(0).opts!, nodeName: c.name, stateDir: c.stateDir, hostIP: c.hostIP };
    c.opts.labels = { ...labels, [NODE_LABEL]: c.name };
    c.opts.logFile = path.join(work, 'agent-c.log');
    c.opts.env = { PATH: noRbd };
    c.proc = startAgentProc(c.opts);
    nodes.push(c);
    await c.proc.waitForLog('node agent started', 120_000);
    const why = await waitFor(
      `${c.name} reports rbd not ok`,
      async () => (await backendsOf(c)).find((b) => b.name === 'rbd' && !b.ok),
      STATE_TIMEOUT,
    );
    log(`node c: rbd ${JSON.stringify(why)}`);
    const v = await createVolume('rbdc', { size: '1Gi', volumeType: CEPH_TYPE });
    rbdIds.push(v.metadata!.uid!);
    expect(v.status?.node).not.toBe(c.name);
    await create('vm-c', c, { image: 'test' });
    await waitFor(
      'vm-c bound to node c',
      async () => (await getServer(client, NS, 'vm-c'))?.status?.node === c.name,
      STATE_TIMEOUT,
    );
    await setVolumes('vm-c', ['rbdc']);
    const cond = await waitFor(
      'vm-c VolumesAttached False',
      async () =>
        (await getServer(client, NS, 'vm-c'))?.status?.conditions?.find(
          (x) => x.type === 'VolumesAttached' && x.status === 'False' && /cannot reach/.test(x.message ?? ''),
        ),
      STATE_TIMEOUT,
    );
    expect(cond.message).toContain(`Invalid volume: hypervisor ${c.name} cannot reach volume backend rbd`);
    const after = await client.get<Vol>(VOLUMES, 'rbdc', NS);
    expect(after.status?.status).toBe('available');
    expect(after.status?.attachments ?? []).toEqual([]);
    await client.delete(SERVERS, 'vm-c', NS);
    await waitFor('vm-c gone', async () => (await getServer(client, NS, 'vm-c')) === undefined, STATE_TIMEOUT);
  });

  it('rbd: deleting everything leaves no image of the test in the pool', async () => {
    await sh('vm-b', 'umount /mnt/s; umount /mnt/c; echo unmounted');
    await setVolumes('vm-b', [], ['rbdvol', 'rbdrestored']);
    for (const n of ['rbdrestored', 'rbdvol', 'rbdc']) await deleteIgnore(client, VOLUMES, n, NS);
    // The volume waits for its snapshot (Cinder refuses; here a finalizer waits), and its volume host leaves it alone.
    await waitVolume('rbdvol', 'held for its snapshot', (x) =>
      (x.status?.conditions ?? []).some((c) => c.type === 'Ready' && c.reason === 'DependentSnapshots'),
    );
    expect(await poolImages()).toContain(`volume-${rbdIds[0]}`);
    expect((await client.get<Vol>(VOLUMES, 'rbdvol', NS)).status?.host?.state).toBe('available');
    await client.delete(SNAPSHOTS, 'rbdsnap', NS);
    await waitFor(
      'rbd volumes and snapshot gone',
      async () =>
        (await client.list<Vol>(VOLUMES, { namespace: NS })).items.every((x) => !x.metadata!.name!.startsWith('rbd')) &&
        (await client.list<Snap>(SNAPSHOTS, { namespace: NS })).items.every((x) => x.metadata!.name !== 'rbdsnap'),
      STATE_TIMEOUT,
    );
    expect(await poolImages()).toEqual([]);
  });

  // --- QoS ----------------------------------------------------------------------------------------------------------
  /** The limits of a volume's throttle group in node a's QEMU of vm-a, read with node a's agent stopped (it is the
   *  QEMU's one QMP client); the agent is started again on a new log file. */
  const throttleLimitsInQemu = async (volumeUID: string) => {
    const a = node(0);
    await a.proc!.stop('SIGTERM');
    let limits: Record<string, number>;
    const qmp = await QmpClient.connect(path.join(guestDir(a.stateDir, uidOf.get('vm-a')!), 'qmp.sock'));
    try {
      limits = await qmp.execute<Record<string, number>>('qom-get', {
        path: `/objects/tg${volumeSerial(volumeUID)}`,
        property: 'limits',
      });
    } finally {
      await qmp.close();
    }
    a.opts = { ...a.opts!, logFile: `${a.opts!.logFile.replace(/(-\d+)?\.log$/, '')}-${Date.now()}.log` };
    a.proc = startAgentProc(a.opts);
    await a.proc.waitForLog('node agent started', 120_000);
    return limits;
  };

  it('QoS: a guest dd on a volume with totalBytesSec is throttled (measured, logged); the limits follow the type live', async () => {
    const limit = 8 * MiB;
    await client.create(VOLUMETYPES, {
      apiVersion: VolumeTypeKind.apiVersion,
      kind: 'VolumeType',
      metadata: { name: QOS_TYPE, labels },
      spec: { backend: 'local', qos: { totalBytesSec: limit } },
    } as KubernetesObject);
    // Listed by vm-a before it exists (Nova's "a new volume for this server"): placed on vm-a's node, attached there
    // without NBD, so the rate measured is QEMU's throttle on a local file.
    await setVolumes('vm-a', ['qosvol']);
    await client.create<Vol>(VOLUMES, {
      apiVersion: VolumeKind.apiVersion,
      kind: 'Volume',
      metadata: { name: 'qosvol', namespace: NS, labels },
      spec: { size: '1Gi', volumeType: QOS_TYPE },
    } as unknown as Vol);
    await waitAttached('qosvol', 'vm-a');
    const v = await client.get<Vol>(VOLUMES, 'qosvol', NS);
    expect(v.status?.node).toBe(node(0).name);
    expect(v.status?.host?.exports ?? []).toEqual([]);
    const uid = v.metadata!.uid!;
    const dev = await deviceOf('vm-a', uid);
    const count = 48;
    const out = await sh(
      'vm-a',
      // the guest's uptime clock (1/100 s) around the write; busybox dd prints no rate of its own
      `read t0 x < /proc/uptime; dd if=/dev/zero of=/dev/${dev} bs=1M count=${count} oflag=direct; ` +
        `read t1 x < /proc/uptime; echo T=$t0,$t1`,
      180_000,
    );
    const [t0, t1] = (/T=([\d.]+),([\d.]+)/.exec(out) ?? []).slice(1).map(Number);
    const secs = t0 !== undefined && t1 !== undefined ? t1 - t0 : Number.NaN;
    log(
      `qos: measured ${secs > 0 ? (count / secs).toFixed(2) : '?'} MiB/s, limit ${limit / MiB} MiB/s ` +
        `(${count} MiB written with O_DIRECT in ${secs.toFixed(2)} s by the guest clock; dd: ${out.replace(/ T=.*$/, '')})`,
    );
    expect(await throttleLimitsInQemu(uid)).toMatchObject({ 'bps-total': limit, 'iops-total': 0 });
    // A change of the type's qos reaches the running guest's throttle group.
    await client.patch(
      VOLUMETYPES,
      QOS_TYPE,
      undefined,
      { spec: { qos: { totalBytesSec: 2 * limit, totalIopsSec: 500 } } },
      PatchStrategy.MergePatch,
    );
    await node(0).proc!.waitForLog('volume qos set', STATE_TIMEOUT);
    expect(await throttleLimitsInQemu(uid)).toMatchObject({ 'bps-total': 2 * limit, 'iops-total': 500 });
  });
});
