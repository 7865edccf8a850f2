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
// Needs root, qemu-system-x86_64, qemu-img, qemu-storage-daemon and genisoimage; skipped (with a message) otherwise.
// Written against the #12 contract before the slices were merged: the lead runs it after the merge.
import { execFileSync } from 'node:child_process';
import { chmod, mkdir, mkdtemp, rm, symlink } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { type KubernetesObject, PatchStrategy } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { volumeSerial } from '../../node-agent/src/driver.ts';
import { NbdExporter } from '../../node-agent/src/volumes/nbd-export.ts';
import { type Volume, VolumeKind, type VolumeSnapshot, VolumeSnapshotKind } from '../../operator/src/api/index.ts';
import { gvrOf } from '../../operator/src/controllers/common.ts';
import { KubeClient } from '../../operator/src/runtime/index.ts';
import { adminKubeConfig, adminKubeconfigFile } from '../controlplane/testenv.ts';
import { ensureTestImage, type TestImage } from '../images/build.ts';
import { type FileServer, start } from '../images/serve.ts';
import {
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
const READY = 'STRATUS-GUEST-READY';
const STATE_TIMEOUT = 180_000;
const VOLUMES = gvrOf(VolumeKind);
const SNAPSHOTS = gvrOf(VolumeSnapshotKind);
const GiB = 2 ** 30;

type Vol = KubernetesObject & Volume;
type Snap = KubernetesObject & VolumeSnapshot;

interface Node {
  name: string;
  hostIP: string;
  stateDir: string;
  proc?: Proc;
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
      n.proc = startAgentProc({
        kubeconfig: adminKubeconfigFile(),
        nodeName: n.name,
        stateDir: n.stateDir,
        accelerator: e2eAccelerator(),
        kvmProbeKernel: img.kernel,
        labels: { ...labels, [NODE_LABEL]: n.name },
        hostIP,
        networkBackend: 'noop',
        logFile: path.join(work, `agent-${'ab'[i]}.log`),
      });
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
});
