// Servers end to end: an operator process and a QEMU node agent process (TCG) against the local control plane,
// the test guest image served over loopback.
//  1. one Server through its life: boot (READY + user data on the serial console), stop, start, soft and hard
//     reboot, pause, unpause, delete (QEMU gone, guest directory removed, finalizers released);
//  2. three running guests survive a SIGKILL of the agent; a new agent adopts them (same pids, no new boot);
//  3. bad images (checksum mismatch, not a disk image, bigger than the flavor, a URL the image URL guard refuses)
//     put the Server in ERROR with a fault naming the reason, and leave no guest directory; an HTTP/1.0 server
//     that closes the connection after the body leaves the agent process running.
// Every Server has a nodeSelector on this run's label, so other hypervisors of the shared cluster are never chosen.
// Needs root, qemu-system-x86_64, qemu-img and genisoimage; skipped (with a message) otherwise.
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { type AddressInfo, createServer as createNetServer } from 'node:net';
import path from 'node:path';
import { type KubernetesObject, PatchStrategy } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KubeClient } from '../../operator/src/runtime/index.ts';
import { adminKubeConfig, adminKubeconfigFile } from '../controlplane/testenv.ts';
import { ensureTestImage, type TestImage } from '../images/build.ts';
import { type FileServer, start } from '../images/serve.ts';
import {
  consoleText,
  count,
  deleteIgnore,
  FLAVORS,
  flavor,
  getServer,
  guestDir,
  HYPERVISORS,
  IMAGES,
  image,
  isQemuOf,
  KEYPAIRS,
  keyPair,
  LEASES,
  NAMESPACES,
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

const log = (m: string) => console.error(`[qemu-server] ${m}`);

const missing = missingQemuPrerequisite();
if (missing) log(`SKIPPED: ${missing} (needs root, QEMU, qemu-img and genisoimage)`);

const ID = `e2e-qemu-${process.pid}`;
const LABEL = 'test.stratus.io/e2e';
const labels = { [LABEL]: ID };
const NS = ID;
const FLAVOR = `${ID}-tiny`;
const READY = 'STRATUS-GUEST-READY';
const STATE_TIMEOUT = 180_000;

describe.skipIf(missing !== undefined)('Servers on QEMU through operator and node agent', () => {
  const client = new KubeClient(adminKubeConfig());
  let img: TestImage;
  let work: string;
  let stateDir: string;
  let files: FileServer;
  let operator: Proc | undefined;
  let agent: Proc | undefined;
  let agents = 0;
  /** Every guest uid this run created (to kill leftovers by pid, never anything else). */
  const uids = new Set<string>();

  const newAgent = async () => {
    agents++;
    const a = startAgentProc({
      kubeconfig: adminKubeconfigFile(),
      nodeName: ID,
      stateDir,
      accelerator: e2eAccelerator(),
      kvmProbeKernel: img.kernel,
      labels,
      logFile: path.join(work, `agent-${agents}.log`),
    });
    await a.waitForLog('node agent started', 120_000);
    return a;
  };

  const create = async (name: string, img: string, extra: Partial<Srv['spec']> = {}) => {
    const s = await client.create<Srv>(
      SERVERS,
      server(
        name,
        NS,
        {
          flavor: FLAVOR,
          image: img,
          keyPair: 'key',
          userData: '#!/bin/sh\necho USERDATA-MARKER-$((6*7))\n',
          nodeSelector: labels,
          ...extra,
        },
        labels,
      ),
    );
    uids.add(s.metadata!.uid!);
    return s.metadata!.uid!;
  };
  const patchSpec = (name: string, spec: Record<string, unknown>) =>
    client.patch(SERVERS, name, NS, { spec }, PatchStrategy.MergePatch);
  const waitStatus = (name: string, status: string, powerState?: string) =>
    waitFor(
      `server ${name} ${status}/${powerState ?? '*'}`,
      async () => {
        const s = await getServer(client, NS, name);
        if (s?.status?.status === 'ERROR') throw new Error(`server ${name} in ERROR: ${s.status.fault?.message}`);
        return s?.status?.status === status &&
          (powerState === undefined || s.status.powerState === powerState) &&
          s.status.taskState === undefined
          ? s
          : undefined;
      },
      STATE_TIMEOUT,
    );
  const ready = (name: string, uid: string) => `${READY} hostname=${name} instance-id=${uid}\n`;

  beforeAll(async () => {
    const t0 = Date.now();
    img = await ensureTestImage({ log });
    log(`test image ready in ${Date.now() - t0} ms`);
    work = await mkdtemp('/tmp/stratus-e2e-qemu-');
    await chmod(work, 0o711); // QEMU drops to --qemu-user and must still reach its guest directory
    stateDir = path.join(work, 'state');
    const www = path.join(work, 'www');
    await mkdir(www);
    await symlink(img.path, path.join(www, 'test.qcow2'));
    await writeFile(path.join(www, 'text.qcow2'), 'this is a text file, not a disk image\n'.repeat(100));
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(www, 'big.qcow2'), '4G']);
    files = await start(www);

    operator = startOperatorProc({
      kubeconfig: adminKubeconfigFile(),
      leaseName: ID,
      logFile: path.join(work, 'operator.log'),
    });
    await operator.waitForLog('leading: controllers started', 120_000);
    await client.create(NAMESPACES, { apiVersion: 'v1', kind: 'Namespace', metadata: { name: NS, labels } });
    await client.create(FLAVORS, flavor(FLAVOR, labels));
    await client.create(KEYPAIRS, keyPair('key', NS, labels));
    await client.create(IMAGES, image('test', NS, `${files.url}/test.qcow2`, img.sha256, labels));
    agent = await newAgent();
  }, 900_000);

  afterAll(async () => {
    // Servers first, while operator and agent run (they release the finalizers and destroy the guests).
    try {
      const list = await client.list<Srv>(SERVERS, { namespace: NS });
      for (const s of list.items) await deleteIgnore(client, SERVERS, s.metadata!.name!, NS);
      if (agent?.running && operator?.running) {
        await waitFor(
          'servers deleted',
          async () => (await client.list(SERVERS, { namespace: NS })).items.length === 0,
          60_000,
        ).catch((e: unknown) => log(String(e)));
      }
      for (const s of (await client.list<Srv>(SERVERS, { namespace: NS })).items) {
        await client
          .patch(SERVERS, s.metadata!.name!, NS, { metadata: { finalizers: null } }, PatchStrategy.MergePatch)
          .catch(() => {});
      }
    } catch (e) {
      log(`cleanup: ${e}`);
    }
    await agent?.stop('SIGKILL');
    await operator?.stop('SIGTERM');
    // Never leave a guest behind: kill only QEMUs of this run's guests.
    for (const uid of uids) {
      const pid = await qemuPid(stateDir, uid);
      if (await isQemuOf(pid, uid)) process.kill(pid, 'SIGKILL');
    }
    await deleteIgnore(client, HYPERVISORS, ID).catch(() => {});
    await deleteIgnore(client, FLAVORS, FLAVOR).catch(() => {});
    await deleteIgnore(client, NAMESPACES, NS).catch(() => {});
    await deleteIgnore(client, LEASES, ID, 'stratus-operator-test').catch(() => {});
    await files?.close();
    if (work && !process.env.STRATUS_KEEP_WORK) await rm(work, { recursive: true, force: true });
  }, 180_000);

  it('boots a Server and drives it through stop, start, reboots, pause and delete', async () => {
    const name = 'vm1';
    const t0 = Date.now();
    const uid = await create(name, 'test');
    let text = await waitConsole(stateDir, uid, READY, 1);
    log(`create -> READY: ${Date.now() - t0} ms`);
    expect(text).toContain(ready(name, uid));
    text = await waitConsole(stateDir, uid, 'USERDATA-MARKER-42\n', 1, 30_000);
    const s = await waitStatus(name, 'ACTIVE', 'RUNNING');
    // Whatever the agent chose on this host (auto: KVM only if a kernel really boots under it), the guest runs on it.
    const hv = await client.get<{ status?: { accelerator?: string; acceleratorReason?: string } } & KubernetesObject>(
      HYPERVISORS,
      ID,
    );
    log(`accelerator: ${hv.status?.accelerator} (${hv.status?.acceleratorReason})`);
    expect(hv.status?.accelerator).toMatch(/^(kvm|tcg)$/);
    expect(s.status).toMatchObject({ node: ID, accelerator: hv.status?.accelerator, vmState: 'active' });
    const argv = (await readFile(`/proc/${await qemuPid(stateDir, uid)}/cmdline`, 'utf8')).split('\0');
    expect(argv[argv.indexOf('-accel') + 1]).toBe(hv.status?.accelerator === 'kvm' ? 'kvm' : 'tcg,thread=multi');
    let pid = await qemuPid(stateDir, uid);
    expect(await isQemuOf(pid, uid)).toBe(true);

    let t = Date.now();
    await patchSpec(name, { powerState: 'Stopped' });
    await waitStatus(name, 'SHUTOFF', 'SHUTDOWN');
    log(`stop -> SHUTOFF: ${Date.now() - t} ms`);
    expect(await isQemuOf(pid, uid)).toBe(false);

    t = Date.now();
    await patchSpec(name, { powerState: 'Running' });
    await waitStatus(name, 'ACTIVE', 'RUNNING');
    await waitConsole(stateDir, uid, READY, 2);
    log(`start -> READY: ${Date.now() - t} ms`);
    pid = await qemuPid(stateDir, uid);
    expect(await isQemuOf(pid, uid)).toBe(true);

    t = Date.now();
    await patchSpec(name, { triggers: { softReboot: 'soft-1' } });
    await waitConsole(stateDir, uid, READY, 3);
    await waitFor('soft reboot acted on', async () => {
      const v = await getServer(client, NS, name);
      return v?.status?.triggers?.softReboot === 'soft-1' && v.status.status === 'ACTIVE';
    });
    log(`soft reboot -> READY: ${Date.now() - t} ms`);

    t = Date.now();
    await patchSpec(name, { triggers: { softReboot: 'soft-1', hardReboot: 'hard-1' } });
    await waitConsole(stateDir, uid, READY, 4);
    await waitFor('hard reboot acted on', async () => {
      const v = await getServer(client, NS, name);
      return v?.status?.triggers?.hardReboot === 'hard-1' && v.status.status === 'ACTIVE';
    });
    log(`hard reboot -> READY: ${Date.now() - t} ms`);
    pid = await qemuPid(stateDir, uid);

    await patchSpec(name, { powerState: 'Paused' });
    await waitStatus(name, 'PAUSED', 'PAUSED');
    expect(await isQemuOf(pid, uid)).toBe(true);
    await patchSpec(name, { powerState: 'Running' });
    await waitStatus(name, 'ACTIVE', 'RUNNING');
    expect(await qemuPid(stateDir, uid)).toBe(pid);
    expect(count(await consoleText(stateDir, uid), READY)).toBe(4);

    t = Date.now();
    await client.delete(SERVERS, name, NS);
    await waitFor('server object gone', async () => (await getServer(client, NS, name)) === undefined, 60_000);
    log(`delete -> gone: ${Date.now() - t} ms`);
    expect(await isQemuOf(pid, uid)).toBe(false);
    expect(existsSync(guestDir(stateDir, uid))).toBe(false);
  });

  it('three guests survive a SIGKILL of the agent; a new agent adopts them', async () => {
    const names = ['adopt-a', 'adopt-b', 'adopt-c'];
    const ids = await Promise.all(names.map((n) => create(n, 'test')));
    await Promise.all(ids.map((uid) => waitConsole(stateDir, uid, READY, 1)));
    await Promise.all(names.map((n) => waitStatus(n, 'ACTIVE', 'RUNNING')));
    const pids = await Promise.all(ids.map((uid) => qemuPid(stateDir, uid)));
    for (const [i, uid] of ids.entries()) expect(await isQemuOf(pids[i]!, uid)).toBe(true);

    await agent!.stop('SIGKILL');
    for (const [i, uid] of ids.entries()) expect(await isQemuOf(pids[i]!, uid)).toBe(true);

    const t = Date.now();
    agent = await newAgent();
    log(`new agent started in ${Date.now() - t} ms`);
    // Wait until it has reconciled every server (its metrics count them), then check nothing was respawned.
    const started = await agent.waitForLog('node agent started', 10_000, (l) => l.address !== undefined);
    const port = (started.address as { port: number }).port;
    await waitFor(
      'the new agent reconciled the three servers',
      async () => {
        const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
        const total = text
          .split('\n')
          .filter((l) => l.startsWith('controller_runtime_reconcile_total{') && l.includes(`compute/${ID}`))
          .reduce((sum, l) => sum + Number(l.split(' ').pop()), 0);
        return total >= names.length;
      },
      60_000,
    );
    for (const n of names) await waitStatus(n, 'ACTIVE', 'RUNNING');
    for (const [i, uid] of ids.entries()) {
      expect(await qemuPid(stateDir, uid)).toBe(pids[i]);
      expect(await isQemuOf(pids[i]!, uid)).toBe(true);
      expect(count(await consoleText(stateDir, uid), READY)).toBe(1);
    }
    for (const n of names) await client.delete(SERVERS, n, NS);
    await waitFor(
      'servers gone',
      async () => (await Promise.all(names.map((n) => getServer(client, NS, n)))).every((s) => s === undefined),
      60_000,
    );
    for (const [i, uid] of ids.entries()) expect(await isQemuOf(pids[i]!, uid)).toBe(false);
  });

  it('bad images put the Server in ERROR with a fault naming the reason and leave no guest directory', async () => {
    await client.create(IMAGES, image('bad-sum', NS, `${files.url}/test.qcow2`, '0'.repeat(64), labels));
    await client.create(IMAGES, image('not-disk', NS, `${files.url}/text.qcow2`, undefined, labels));
    await client.create(IMAGES, image('too-big', NS, `${files.url}/big.qcow2`, undefined, labels));
    // The agent allows 127.0.0.0/8 (the image server), not the link-local metadata address.
    const metadata = 'http://169.254.169.254/latest/meta-data/';
    await client.create(IMAGES, image('metadata', NS, metadata, undefined, labels));
    // An HTTP/1.0 server that closes the connection after the body (as python3 -m http.server does; the agent's
    // former fetch client could end the agent process on it, nodejs/undici#5360). The wrong checksum stops the
    // spawn right after a complete download.
    const agentPid = agent!.pid;
    const data = await readFile(img.path);
    const http10 = createNetServer((sock) => {
      sock.on('error', () => {});
      sock.once('data', () => {
        sock.write(`HTTP/1.0 200 OK\r\nContent-Length: ${data.length}\r\nConnection: close\r\n\r\n`);
        sock.end(data);
      });
    });
    await new Promise<void>((r) => http10.listen(0, '127.0.0.1', r));
    const http10Url = `http://127.0.0.1:${(http10.address() as AddressInfo).port}/test.qcow2`;
    await client.create(IMAGES, image('http10', NS, http10Url, '0'.repeat(64), labels));
    const cases = [
      { name: 'bad-sum', reason: /checksum mismatch/i },
      { name: 'not-disk', reason: /not a disk image/i },
      { name: 'too-big', reason: /too big/i },
      { name: 'http10', reason: `sha256 of the ${data.length} bytes downloaded from ${http10Url} is ${img.sha256}` },
      {
        name: 'metadata',
        reason: `download failed: image ${NS}/metadata: image URL ${metadata} resolves to 169.254.169.254, a link-local address; refused (allow it with --image-url-allow-cidr)`,
      },
    ];
    const ids = await Promise.all(cases.map((c) => create(`srv-${c.name}`, c.name)));
    for (const [i, c] of cases.entries()) {
      const s = await waitFor(
        `srv-${c.name} in ERROR`,
        async () => {
          const v = await getServer(client, NS, `srv-${c.name}`);
          return v?.status?.status === 'ERROR' ? v : undefined;
        },
        STATE_TIMEOUT,
      );
      log(`${c.name}: ${s.status?.fault?.message}`);
      expect(s.status?.fault?.message).toMatch(c.reason);
      expect(s.status?.fault?.message).toContain(c.name);
      expect(existsSync(guestDir(stateDir, ids[i]!))).toBe(false);
    }
    expect(await readdir(path.join(stateDir, 'guests')).catch(() => [])).toEqual([]);
    expect(agent!.running).toBe(true);
    expect(agent!.pid).toBe(agentPid);
    http10.close();
  });
});
