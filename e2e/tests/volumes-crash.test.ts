// Crash safety of block storage (#12, "Done when": the agent SIGKILLed in the middle of an attach and of a detach
// converges with exactly one attachment or none; the operator SIGKILLed mid-create leaves no orphaned disk).
// An operator process and one QEMU node agent process (TCG, host address 127.0.0.4, the noop network backend), one
// guest booted once (the test image: a busybox shell on its serial console). Each step starts the process with
// STRATUS_CRASH_AT=<point> (operator/src/runtime/crash.ts: the process SIGKILLs itself at that line), triggers the
// operation, waits for the SIGKILL, restarts the process WITHOUT the variable, waits for convergence, and then checks
// against QEMU itself (its QMP socket, read while the agent is stopped: QEMU takes one QMP client at a time), the
// guest, the files and the objects' status:
//  1. volume-host:after-create (backend.create done, not reported): one volume file, no temporary file, available;
//  2. attach:after-blockdev (nodes added, no device): one device d<serial>, one node set, one disk in the guest;
//  3. attach:after-device (device added, the record and the report not written): the same;
//  4. detach:after-device-del (device gone, its nodes not deleted): no device, no v<serial>* node, no tg<serial>;
//     attach:after-blockdev again, the volume taken off the server while the agent is down: nothing of it left;
//  5. operator:after-placement (status.node written, nothing else): the Volume is deleted while the operator is down,
//     the operator restarts: the Volume goes (finalizer honoured) and no file is left on the node.
// Needs root, qemu-system-x86_64, qemu-img, qemu-storage-daemon and genisoimage; skipped (with a message) otherwise.
import { execFileSync } from 'node:child_process';
import { chmod, mkdir, mkdtemp, readdir, readFile, rm, symlink } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { type KubernetesObject, PatchStrategy } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { volumeSerial } from '../../node-agent/src/driver.ts';
import { QmpClient } from '../../node-agent/src/qemu/qmp.ts';
import { NbdExporter } from '../../node-agent/src/volumes/nbd-export.ts';
import { type Volume, VolumeKind } from '../../operator/src/api/index.ts';
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

const log = (m: string) => console.error(`[volumes-crash] ${m}`);

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

const ID = `e2e-volcrash-${process.pid}`;
const LABEL = 'test.stratus.io/e2e';
const labels = { [LABEL]: ID };
const NS = ID;
const FLAVOR = `${ID}-tiny`;
const READY = 'STRATUS-GUEST-READY';
const STATE_TIMEOUT = 180_000;
const VOLUMES = gvrOf(VolumeKind);
const HOST_IP = '127.0.0.4';

type Vol = KubernetesObject & Volume;

/** What QEMU itself has of a volume, read over its QMP socket. */
interface QemuView {
  devices: string[];
  nodes: string[];
  objects: string[];
  blocks: string[];
}

describe.skipIf(missing !== undefined)('Volumes: crash safety of the agent and the operator (SIGKILL)', () => {
  const client = new KubeClient(adminKubeConfig());
  let img: TestImage;
  let work: string;
  let files: FileServer;
  let operator: Proc | undefined;
  let agent: Proc | undefined;
  let stateDir = '';
  const nodeName = `${ID}-a`;
  let vmUID = '';
  const uids = new Map<string, string>();
  let starts = 0; // one log file per process start: a log line of an earlier run is never taken for this one's

  const startOperator = async (crashAt?: string) => {
    if (operator?.running) await operator.stop('SIGTERM');
    operator = startOperatorProc({
      kubeconfig: adminKubeconfigFile(),
      leaseName: ID,
      logFile: path.join(work, `operator-${++starts}.log`),
      ...(crashAt ? { env: { STRATUS_CRASH_AT: crashAt } } : {}),
    });
    await operator.waitForLog('leading: controllers started', 120_000);
  };
  const startAgent = async (crashAt?: string) => {
    if (agent?.running) await agent.stop('SIGTERM');
    log(`agent ${crashAt ? `with STRATUS_CRASH_AT=${crashAt}` : 'without a crash point'}`);
    agent = startAgentProc({
      kubeconfig: adminKubeconfigFile(),
      nodeName,
      stateDir,
      accelerator: e2eAccelerator(),
      kvmProbeKernel: img.kernel,
      labels: { ...labels, [NODE_LABEL]: nodeName },
      hostIP: HOST_IP,
      networkBackend: 'noop',
      logFile: path.join(work, `agent-${++starts}.log`),
      ...(crashAt ? { env: { STRATUS_CRASH_AT: crashAt } } : {}),
    });
    await agent.waitForLog('node agent started', 120_000);
  };
  /** The process dies by its own SIGKILL at the crash point (not by an error, not by a signal of ours). */
  const killedAt = async (p: Proc, point: string) => {
    await waitFor(`${p.name} killed at ${point}`, () => !p.running, STATE_TIMEOUT);
    expect(p.child.signalCode).toBe('SIGKILL');
    expect(await p.log()).toContain(`crash point ${point}: SIGKILL`);
  };

  const patchSpec = (name: string, spec: Record<string, unknown>) =>
    client.patch(SERVERS, name, NS, { spec }, PatchStrategy.MergePatch);
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
  const createVolume = async (name: string) => {
    const v = await client.create<Vol>(VOLUMES, {
      apiVersion: VolumeKind.apiVersion,
      kind: 'Volume',
      metadata: { name, namespace: NS, labels },
      spec: { size: '1Gi' },
    } as unknown as Vol);
    uids.set(name, v.metadata!.uid!);
    return v;
  };
  const serialOf = (vol: string) => volumeSerial(uids.get(vol)!);

  /** Everything the operator and the agent report agrees: the Volume in-use by vm (or available), the server's view. */
  const waitAttached = async (vol: string) => {
    await waitVolume(
      vol,
      'in-use by vm',
      (v) =>
        v.status?.status === 'in-use' &&
        v.status.attachments?.length === 1 &&
        v.status.attachments[0]!.server === 'vm' &&
        v.status.attachments[0]!.state === 'attached',
    );
    await waitFor(
      `vm reports ${vol} attached`,
      async () => {
        const s = await getServer(client, NS, 'vm');
        const mine = (s?.status?.compute?.volumes ?? []).filter((x) => x.volume === vol);
        return (
          mine.length === 1 &&
          mine[0]!.state === 'attached' &&
          (s?.status?.volumesAttached ?? []).filter((x) => x.volume === vol).length === 1
        );
      },
      STATE_TIMEOUT,
    );
  };
  const waitDetached = async (vol: string) => {
    await waitVolume(vol, 'available', (v) => v.status?.status === 'available' && !v.status.attachments?.length);
    await waitFor(
      `vm reports ${vol} gone`,
      async () => {
        const s = await getServer(client, NS, 'vm');
        return (
          !(s?.status?.compute?.volumes ?? []).some((x) => x.volume === vol) &&
          !(s?.status?.volumesAttached ?? []).some((x) => x.volume === vol)
        );
      },
      STATE_TIMEOUT,
    );
  };

  let marks = 0;
  /** A shell line in the guest (serial console, a busybox shell), as in volumes.test.ts. */
  const sh = async (cmd: string, timeoutMs = 60_000): Promise<string> => {
    const n = ++marks;
    const line = `echo "R""${n}:$( { ${cmd} ; } 2>&1 | tr '\\n' ' ' )" ":R""${n}"`;
    const sock = net.connect(path.join(guestDir(stateDir, vmUID), 'console.sock'));
    await new Promise<void>((resolve, reject) => {
      sock.once('connect', () => resolve());
      sock.once('error', reject);
    });
    try {
      sock.write(`\n${line}\n`);
      const text = await waitConsole(stateDir, vmUID, `:R${n}`, 1, timeoutMs);
      const m = new RegExp(`R${n}:(.*) :R${n}`).exec(text);
      if (!m) throw new Error(`no output of ${cmd} in the console`);
      return m[1]!.trim();
    } finally {
      sock.destroy();
    }
  };
  /** The guest's disks whose serial is that of `vol` (virtio-blk /sys/block/vd*\/serial). */
  const guestDisks = async (vol: string) => {
    const out = await sh(
      `for d in /sys/block/*; do [ "$(cat $d/serial 2>/dev/null)" = ${serialOf(vol)} ] && echo \${d##*/}; done`,
    );
    return out.split(/\s+/).filter(Boolean);
  };

  /** QEMU's own view, over its QMP socket: the agent is stopped first (QEMU serves one QMP client at a time). */
  const qemuView = async (): Promise<QemuView> => {
    if (agent?.running) await agent.stop('SIGTERM');
    const qmp = await QmpClient.connect(path.join(guestDir(stateDir, vmUID), 'qmp.sock'), { timeoutMs: 10_000 });
    try {
      const names = async (p: string) =>
        ((await qmp.execute('qom-list', { path: p })) as { name: string }[]).map((x) => x.name);
      return {
        devices: await names('/machine/peripheral'),
        objects: await names('/objects'),
        nodes: ((await qmp.execute('query-named-block-nodes', { flat: true })) as { 'node-name': string }[]).map(
          (x) => x['node-name'],
        ),
        blocks: ((await qmp.execute('query-block')) as { qdev?: string }[]).map((b) => b.qdev ?? ''),
      };
    } finally {
      await qmp.close();
    }
  };
  const ofSerial = (names: string[], prefix: string, serial: string) =>
    names.filter((n) => n === `${prefix}${serial}` || n.startsWith(`${prefix}${serial}-`)).sort();
  /** Exactly one device and one node set of the volume (the nodes the driver names: v, v-f, v-t; the group tg). */
  const expectOnce = (q: QemuView, vol: string) => {
    const s = serialOf(vol);
    expect(q.devices.filter((d) => d === `d${s}`)).toEqual([`d${s}`]);
    expect(q.blocks.filter((b) => b.endsWith(`d${s}`) || b.includes(`/d${s}/`))).toHaveLength(1); // scsi-hd, virtio
    const nodes = ofSerial(q.nodes, 'v', s);
    expect(nodes).toContain(`v${s}`);
    expect(nodes).toContain(`v${s}-t`);
    expect(nodes.every((n) => [`v${s}`, `v${s}-f`, `v${s}-t`].includes(n))).toBe(true);
    expect(new Set(nodes).size).toBe(nodes.length);
    expect(q.objects.filter((o) => o === `tg${s}`)).toEqual([`tg${s}`]);
  };
  const expectNone = (q: QemuView, vol: string) => {
    const s = serialOf(vol);
    expect(q.devices.filter((d) => d.includes(s))).toEqual([]);
    expect(q.blocks.filter((b) => b.includes(s))).toEqual([]);
    expect(ofSerial(q.nodes, 'v', s)).toEqual([]);
    expect(q.objects.filter((o) => o.includes(s))).toEqual([]);
  };
  /** The node's volume directory: regular files only (snapshots/ is a directory), temporary ones included. */
  const volumeFiles = async () =>
    (await readdir(path.join(stateDir, 'volumes'), { withFileTypes: true }).catch(() => []))
      .filter((e) => e.isFile())
      .map((e) => e.name)
      .sort();

  beforeAll(async () => {
    img = await ensureTestImage({ log });
    work = await mkdtemp('/tmp/stratus-e2e-volcrash-');
    await chmod(work, 0o711); // QEMU drops to --qemu-user and must still reach its guest directory
    stateDir = path.join(work, 's-a');
    const www = path.join(work, 'www');
    await mkdir(www);
    await symlink(img.path, path.join(www, 'test.qcow2'));
    files = await start(www);
    await startOperator();
    await client.create(NAMESPACES, { apiVersion: 'v1', kind: 'Namespace', metadata: { name: NS, labels } });
    await client.create(FLAVORS, flavor(FLAVOR, labels));
    await client.create(IMAGES, image('test', NS, `${files.url}/test.qcow2`, img.sha256, labels));
  }, 900_000);

  afterAll(async () => {
    // Servers and volumes first, while operator and agent run (they detach, destroy and release finalizers).
    try {
      if (!operator?.running) await startOperator();
      if (!agent?.running) await startAgent();
      for (const s of (await client.list<Srv>(SERVERS, { namespace: NS })).items) {
        await deleteIgnore(client, SERVERS, s.metadata!.name!, NS);
      }
      await waitFor(
        'servers deleted',
        async () => (await client.list(SERVERS, { namespace: NS })).items.length === 0,
        120_000,
      ).catch((e: unknown) => log(String(e)));
      for (const o of (await client.list<KubernetesObject>(VOLUMES, { namespace: NS })).items) {
        await deleteIgnore(client, VOLUMES, o.metadata!.name!, NS);
      }
      await waitFor(
        'volumes deleted',
        async () => (await client.list(VOLUMES, { namespace: NS })).items.length === 0,
        120_000,
      ).catch((e: unknown) => log(String(e)));
      for (const gvr of [SERVERS, VOLUMES]) {
        for (const o of (await client.list<KubernetesObject>(gvr, { namespace: NS })).items) {
          await client
            .patch(gvr, o.metadata!.name!, NS, { metadata: { finalizers: null } }, PatchStrategy.MergePatch)
            .catch(() => {});
        }
      }
    } catch (e) {
      log(`cleanup: ${e}`);
    }
    await agent?.stop('SIGTERM');
    await operator?.stop('SIGTERM');
    if (vmUID) {
      const pid = await qemuPid(stateDir, vmUID).catch(() => 0);
      if (pid && (await isQemuOf(pid, vmUID))) process.kill(pid, 'SIGKILL');
    }
    // The node's NBD daemon outlives its agent by design: end it with the run.
    if (stateDir) {
      await new NbdExporter({ stateDir, hostIP: HOST_IP, psk: { identity: 'stratus', key: '0'.repeat(64) } })
        .stop()
        .catch((e: unknown) => log(`nbd daemon: ${e}`));
    }
    await deleteIgnore(client, HYPERVISORS, nodeName).catch(() => {});
    await deleteIgnore(client, LEASES, nodeName, 'stratus-operator-test').catch(() => {});
    await deleteIgnore(client, FLAVORS, FLAVOR).catch(() => {});
    await deleteIgnore(client, NAMESPACES, NS).catch(() => {});
    await deleteIgnore(client, LEASES, ID, 'stratus-operator-test').catch(() => {});
    await files?.close();
    if (work && !process.env.STRATUS_KEEP_WORK) await rm(work, { recursive: true, force: true });
  }, 300_000);

  it('volume host killed after backend.create, before its report: one volume file, reported available', async () => {
    await startAgent('volume-host:after-create');
    const v = await createVolume('v1');
    await killedAt(agent!, 'volume-host:after-create');
    // Killed after the file was made and before any report of it: the Volume still says creating.
    const killed = await client.get<Vol>(VOLUMES, 'v1', NS);
    expect(killed.status?.host?.state).toBe('creating');
    expect(await volumeFiles()).toEqual([`${v.metadata!.uid}.qcow2`]);
    await startAgent();
    const ok = await waitVolume('v1', 'available', (x) => x.status?.status === 'available');
    expect(ok.status?.host).toEqual(
      expect.objectContaining({ state: 'available', location: `local://${nodeName}/${v.metadata!.uid}`, size: '1Gi' }),
    );
    expect(await volumeFiles()).toEqual([`${v.metadata!.uid}.qcow2`]);
    // The guest the attach and detach steps use (booted once).
    const s = await client.create<Srv>(
      SERVERS,
      server('vm', NS, { flavor: FLAVOR, image: 'test', nodeSelector: { ...labels, [NODE_LABEL]: nodeName } }, labels),
    );
    vmUID = s.metadata!.uid!;
    await createVolume('v2');
    await waitVolume('v2', 'available', (x) => x.status?.status === 'available');
    await waitConsole(stateDir, vmUID, READY, 1, STATE_TIMEOUT);
    await waitFor(
      'vm ACTIVE',
      async () => {
        const x = await getServer(client, NS, 'vm');
        return x?.status?.status === 'ACTIVE' && x.status.taskState === undefined;
      },
      STATE_TIMEOUT,
    );
  });

  it('agent killed in an attach after blockdev-add, before device_add: exactly one attachment', async () => {
    await startAgent('attach:after-blockdev');
    await patchSpec('vm', { volumes: [{ volume: 'v1' }] });
    await killedAt(agent!, 'attach:after-blockdev');
    await startAgent();
    await waitAttached('v1');
    expect(await guestDisks('v1')).toHaveLength(1);
    expectOnce(await qemuView(), 'v1');
  });

  it('agent killed in an attach after device_add, before its record and report: exactly one attachment', async () => {
    await startAgent('attach:after-device');
    await patchSpec('vm', { volumes: [{ volume: 'v1' }, { volume: 'v2' }] });
    await killedAt(agent!, 'attach:after-device');
    await startAgent();
    await waitAttached('v2');
    await waitAttached('v1');
    expect(await guestDisks('v2')).toHaveLength(1);
    expect(await guestDisks('v1')).toHaveLength(1);
    const q = await qemuView();
    expectOnce(q, 'v1');
    expectOnce(q, 'v2');
  });

  it('agent killed in a detach after DEVICE_DELETED, before blockdev-del: no attachment, nothing left in QEMU', async () => {
    await startAgent('detach:after-device-del');
    await patchSpec('vm', { volumes: [{ volume: 'v1' }] });
    await killedAt(agent!, 'detach:after-device-del');
    await startAgent();
    await waitDetached('v2');
    await waitAttached('v1');
    expect(await guestDisks('v2')).toEqual([]);
    // Converged: the agent has reconciled since its restart (the report is fresh), then QEMU is read.
    const q = await qemuView();
    expectNone(q, 'v2');
    expectOnce(q, 'v1');
  });

  it('agent killed in an attach after blockdev-add, the volume taken off the server while it is down: none left', async () => {
    await startAgent('attach:after-blockdev');
    await patchSpec('vm', { volumes: [{ volume: 'v1' }, { volume: 'v2' }] });
    await killedAt(agent!, 'attach:after-blockdev');
    await patchSpec('vm', { volumes: [{ volume: 'v1' }] });
    // The operator drops the attachment by itself (the report never had it): only the agent's record says the
    // restarted agent has looked at the guest since (the interrupted attach is out of guest.json).
    await waitDetached('v2');
    await startAgent();
    const record = path.join(guestDir(stateDir, vmUID), 'guest.json');
    await waitFor(
      'the interrupted attach of v2 out of guest.json',
      async () => !(await readFile(record, 'utf8')).includes(uids.get('v2')!),
      STATE_TIMEOUT,
    );
    expect(await guestDisks('v2')).toEqual([]);
    const q = await qemuView();
    expectNone(q, 'v2');
    expectOnce(q, 'v1');
  });

  it('operator killed right after placing a volume, the volume deleted meanwhile: it goes, no file is left', async () => {
    await startAgent();
    await startOperator('operator:after-placement');
    const v = await createVolume('v3');
    const uid = v.metadata!.uid!;
    await killedAt(operator!, 'operator:after-placement');
    const placed = await client.get<Vol>(VOLUMES, 'v3', NS);
    expect(placed.status?.node).toBe(nodeName);
    expect(placed.metadata?.finalizers).toContain('storage.stratus.io/volume');
    // The volume host goes on without the operator: the disk is made while nobody reports it to the user.
    await waitVolume('v3', 'made on the node', (x) => x.status?.host?.state === 'available');
    expect(await volumeFiles()).toContain(`${uid}.qcow2`);
    await client.delete(VOLUMES, 'v3', NS);
    await startOperator();
    await waitFor(
      'v3 gone',
      async () => !(await client.list<Vol>(VOLUMES, { namespace: NS })).items.some((x) => x.metadata?.name === 'v3'),
      STATE_TIMEOUT,
    );
    expect(await volumeFiles()).toEqual([`${uids.get('v1')}.qcow2`, `${uids.get('v2')}.qcow2`].sort());
  });
});
