// Resize and cold migration keep the guest's disks (issue #10 §4), end to end with QEMU (TCG): an operator process
// and a QEMU node agent process against the local control plane, the test guest image served over loopback.
// The guest's user data (run at every boot by the test image's init) writes a token into a file on its root disk
// (the FAT partition /dev/vda1) and onto its ephemeral disk (/dev/vdb) the first time, and prints what it finds at
// every later boot, with the disks' sizes:
//  1. resize to a bigger flavor: the file and the ephemeral data are read back after the resize, the root disk has
//     grown; VERIFY_RESIZE keeps the old disks until confirmResize; a resize back to the smaller flavor is refused
//     with Nova's words and the guest keeps running.
//  2. cold migration between two simulated nodes (netns, one agent each): the guest reads its file back on the
//     target; revertResize brings it back to the source from its old disks; a second migration confirmed drops the
//     source's copy; no NBD export (qemu-storage-daemon) is left.
// Every Server has a nodeSelector on this run's label, so other hypervisors of the shared cluster are never chosen.
// Needs root, qemu-system-x86_64, qemu-img and genisoimage; skipped (with a message) otherwise.
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, rm, symlink } from 'node:fs/promises';
import path from 'node:path';
import { type KubernetesObject, PatchStrategy } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FlavorKind } from '../../operator/src/api/index.ts';
import { KubeClient } from '../../operator/src/runtime/index.ts';
import { adminKubeConfig, adminKubeconfigFile } from '../controlplane/testenv.ts';
import { ensureTestImage, type TestImage } from '../images/build.ts';
import { type FileServer, start } from '../images/serve.ts';
import {
  consoleText as consoleTextOf,
  deleteIgnore,
  FLAVORS,
  getServer,
  HYPERVISORS,
  IMAGES,
  image,
  isQemuOf,
  LEASES,
  NAMESPACES,
  NodeStack,
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
import { createLab, destroyLab, type NetLab } from '../testing/netlab.ts';
import { missingQemuPrerequisite } from '../testing/qemu.ts';

const log = (m: string) => console.error(`[qemu-disks] ${m}`);

const missing = missingQemuPrerequisite();
if (missing) log(`SKIPPED: ${missing} (needs root, QEMU, qemu-img and genisoimage)`);

const ID = `e2e-disk-${process.pid}`;
const LABEL = 'test.stratus.io/e2e';
const labels = { [LABEL]: ID };
const NS = ID;
const SMALL = `${ID}-small`;
const BIG = `${ID}-big`;
const STATE_TIMEOUT = 180_000;
const GiB_SECTORS = 1024 ** 3 / 512;

/**
 * User data: the first boot writes `token` into /data.txt of the root disk's FAT partition and onto the ephemeral
 * disk; every boot prints what it finds and the disk sizes (in 512-byte sectors).
 */
export function diskProbeUserData(token: string): string {
  return `#!/bin/sh
mkdir -p /mnt/root
if mount -t vfat /dev/vda1 /mnt/root; then
  if [ -f /mnt/root/data.txt ]; then echo "STRATUS-DATA root found $(cat /mnt/root/data.txt)"
  else echo "${token}" >/mnt/root/data.txt && echo "STRATUS-DATA root wrote"; fi
  umount /mnt/root
else echo "STRATUS-DATA root mount failed"; fi
e=$(dd if=/dev/vdb bs=64 count=1 2>/dev/null | tr -d '\\000')
if [ -n "$e" ]; then echo "STRATUS-DATA ephemeral found $e"
else printf '%s' "${token}" | dd of=/dev/vdb conv=fsync 2>/dev/null && echo "STRATUS-DATA ephemeral wrote"; fi
sync
echo "STRATUS-DATA sizes vda=$(cat /sys/block/vda/size) vdb=$(cat /sys/block/vdb/size)"
`;
}

function flavorObj(name: string, disk: string, ram: string): KubernetesObject {
  return {
    apiVersion: FlavorKind.apiVersion,
    kind: 'Flavor',
    metadata: { name, labels },
    spec: { vcpus: 1, ram, disk, ephemeral: '1Gi' },
  } as KubernetesObject;
}

describe.skipIf(missing !== undefined)('Resize and cold migration keep the disks (QEMU, TCG)', () => {
  const client = new KubeClient(adminKubeConfig());
  let img: TestImage;
  let work: string;
  let stateDir: string;
  let files: FileServer;
  let operator: Proc | undefined;
  let agent: Proc | undefined;
  const uids = new Set<string>();

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

  beforeAll(async () => {
    img = await ensureTestImage({ log });
    work = await mkdtemp('/tmp/stratus-e2e-disk-');
    await chmod(work, 0o711); // QEMU drops to --qemu-user and must still reach its guest directory
    stateDir = path.join(work, 'state');
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
    await client.create(FLAVORS, flavorObj(SMALL, '1Gi', '256Mi'));
    await client.create(FLAVORS, flavorObj(BIG, '2Gi', '320Mi'));
    await client.create(IMAGES, image('test', NS, `${files.url}/test.qcow2`, img.sha256, labels));
    agent = startAgentProc({
      kubeconfig: adminKubeconfigFile(),
      nodeName: ID,
      stateDir,
      accelerator: 'tcg',
      labels,
      logFile: path.join(work, 'agent.log'),
    });
    await agent.waitForLog('node agent started', 120_000);
  }, 900_000);

  afterAll(async () => {
    try {
      for (const s of (await client.list<Srv>(SERVERS, { namespace: NS })).items) {
        await deleteIgnore(client, SERVERS, s.metadata!.name!, NS);
      }
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
    for (const uid of uids) {
      const pid = await qemuPid(stateDir, uid);
      if (await isQemuOf(pid, uid)) process.kill(pid, 'SIGKILL');
    }
    await deleteIgnore(client, HYPERVISORS, ID).catch(() => {});
    for (const f of [SMALL, BIG]) await deleteIgnore(client, FLAVORS, f).catch(() => {});
    await deleteIgnore(client, NAMESPACES, NS).catch(() => {});
    await deleteIgnore(client, LEASES, ID, 'stratus-operator-test').catch(() => {});
    await files?.close();
    if (work && !process.env.STRATUS_KEEP_WORK) await rm(work, { recursive: true, force: true });
  }, 180_000);

  it('a resize keeps the root and ephemeral disks (grown); shrinking is refused and the guest keeps running', async () => {
    const name = 'resize-vm';
    const token = `token-${process.pid}-resize`;
    const created = await client.create<Srv>(
      SERVERS,
      server(
        name,
        NS,
        { flavor: SMALL, image: 'test', userData: diskProbeUserData(token), nodeSelector: labels },
        labels,
      ),
    );
    const uid = created.metadata!.uid!;
    uids.add(uid);
    await waitConsole(stateDir, uid, 'STRATUS-DATA root wrote', 1);
    await waitConsole(stateDir, uid, 'STRATUS-DATA ephemeral wrote', 1);
    await waitConsole(stateDir, uid, `STRATUS-DATA sizes vda=${GiB_SECTORS} vdb=${GiB_SECTORS}`, 1);
    await waitStatus(name, 'ACTIVE', 'RUNNING');

    await client.patch(SERVERS, name, NS, { spec: { flavor: BIG } }, PatchStrategy.MergePatch);
    await waitConsole(stateDir, uid, `STRATUS-DATA root found ${token}`, 1);
    await waitConsole(stateDir, uid, `STRATUS-DATA ephemeral found ${token}`, 1);
    const text = await waitConsole(stateDir, uid, `STRATUS-DATA sizes vda=${2 * GiB_SECTORS} vdb=${GiB_SECTORS}`, 1);
    expect(text.split('STRATUS-DATA root wrote').length - 1).toBe(1);
    expect(text.split('STRATUS-DATA ephemeral wrote').length - 1).toBe(1);
    await waitStatus(name, 'VERIFY_RESIZE', 'RUNNING');
    expect(existsSync(path.join(stateDir, 'guests', uid, 'resize-old', 'root.qcow2'))).toBe(true);
    await client.patch(SERVERS, name, NS, { spec: { triggers: { confirmResize: 'c1' } } }, PatchStrategy.MergePatch);
    const resized = await waitStatus(name, 'ACTIVE', 'RUNNING');
    expect(existsSync(path.join(stateDir, 'guests', uid, 'resize-old'))).toBe(false);
    expect(resized.status?.flavor).toMatchObject({ name: BIG, disk: '2Gi' });
    const pid = await qemuPid(stateDir, uid);

    await client.patch(SERVERS, name, NS, { spec: { flavor: SMALL } }, PatchStrategy.MergePatch);
    const refused = await waitFor(
      'shrinking resize refused',
      async () => {
        const s = await getServer(client, NS, name);
        const c = s?.status?.conditions?.find((x) => x.type === 'Resized');
        return c?.status === 'False' && c.observedGeneration === s?.metadata?.generation ? c : undefined;
      },
      60_000,
    );
    expect(refused).toMatchObject({ reason: 'CannotResizeDisk', message: 'Resize error: Unable to resize disk down.' });
    const after = await getServer(client, NS, name);
    expect(after?.status).toMatchObject({ status: 'ACTIVE', flavor: { name: BIG } });
    expect(await qemuPid(stateDir, uid)).toBe(pid);
    expect(await isQemuOf(pid, uid)).toBe(true);
  });

  // Two simulated nodes (network namespaces with their underlay addresses), one QEMU agent each (--netns,
  // --host-ip): the source serves the stopped guest's disks over NBD on its host IP, the target copies them.
  describe('cold migration between two nodes', () => {
    const labPrefix = 'dsk';
    const migLabels = { [LABEL]: `${ID}-m` };
    let lab: NetLab | undefined;
    let stack: NodeStack | undefined;
    const migUids = new Set<string>();

    /** qemu-storage-daemon processes serving a guest directory of this stack (none may be left). */
    const exportProcs = () =>
      readdirSync('/proc')
        .filter((d) => /^\d+$/.test(d))
        .filter((d) => {
          try {
            const argv = readFileSync(`/proc/${d}/cmdline`, 'utf8');
            return argv.includes('qemu-storage-daemon') && argv.includes(work);
          } catch {
            return false;
          }
        });

    beforeAll(async () => {
      lab = createLab(labPrefix, 2, 251);
      stack = new NodeStack({
        id: `${ID}-m`,
        work,
        kubeconfig: adminKubeconfigFile(),
        nodes: lab.nodes,
        networkBackend: 'noop',
        labels: migLabels,
        operator,
      });
      await stack.start();
    }, 300_000);

    afterAll(async () => {
      try {
        for (const s of (await client.list<Srv>(SERVERS, { namespace: NS })).items) {
          if (s.metadata?.labels?.[LABEL] === migLabels[LABEL])
            await deleteIgnore(client, SERVERS, s.metadata.name!, NS);
        }
        await waitFor(
          'migration servers deleted',
          async () =>
            (await client.list<Srv>(SERVERS, { namespace: NS })).items.every(
              (s) => s.metadata?.labels?.[LABEL] !== migLabels[LABEL],
            ),
          60_000,
        ).catch((e: unknown) => log(String(e)));
      } catch (e) {
        log(`cleanup: ${e}`);
      }
      await stack?.stop();
      await stack?.killGuests(migUids);
      for (const pid of exportProcs()) process.kill(Number(pid), 'SIGKILL');
      if (lab) lab.destroy();
      else destroyLab(labPrefix);
      for (const a of stack?.agents ?? []) await deleteIgnore(client, HYPERVISORS, a.nodeName).catch(() => {});
    }, 180_000);

    it('a migrated guest reads back the file written before the move; revert brings it back; no export is left', async () => {
      const name = 'migrate-vm';
      const token = `token-${process.pid}-migrate`;
      const created = await client.create<Srv>(
        SERVERS,
        server(
          name,
          NS,
          { flavor: SMALL, image: 'test', userData: diskProbeUserData(token), nodeSelector: migLabels },
          migLabels,
        ),
      );
      const uid = created.metadata!.uid!;
      migUids.add(uid);
      await waitFor('guest placed', async () => stack!.agentOf(uid), 120_000);
      const source = stack!.agentOf(uid)!;
      const target = stack!.agents.find((a) => a !== source)!;
      await waitConsole(source.stateDir, uid, 'STRATUS-DATA root wrote', 1);
      await waitConsole(source.stateDir, uid, 'STRATUS-DATA ephemeral wrote', 1);
      await waitStatus(name, 'ACTIVE', 'RUNNING');

      const patchTriggers = (triggers: Record<string, string>) =>
        client.patch(SERVERS, name, NS, { spec: { triggers } }, PatchStrategy.MergePatch);
      await patchTriggers({ migrate: 'm1' });
      await waitConsole(target.stateDir, uid, `STRATUS-DATA root found ${token}`, 1);
      await waitConsole(target.stateDir, uid, `STRATUS-DATA ephemeral found ${token}`, 1);
      const v = await waitStatus(name, 'VERIFY_RESIZE', 'RUNNING');
      expect(v.status).toMatchObject({
        node: target.nodeName,
        migration: { source: source.nodeName, target: target.nodeName },
        migrationSource: { node: source.nodeName, guestStoppedAt: expect.any(String) },
      });
      // the export is gone once the target finished (the source agent notices within its requeue)
      await waitFor(
        'export dropped from status',
        async () => !(await getServer(client, NS, name))?.status?.migrationSource?.export,
      );
      await waitFor('export ended', async () => exportProcs().length === 0, 30_000);
      expect(await isQemuOf(await qemuPid(source.stateDir, uid), uid)).toBe(false);
      expect(existsSync(path.join(source.stateDir, 'guests', uid, 'root.qcow2'))).toBe(true);

      // revert: back to the source, from its own (old) disks
      await patchTriggers({ migrate: 'm1', revertResize: 'r1' });
      const before = (await consoleTextOf(source.stateDir, uid)).split(`STRATUS-DATA root found ${token}`).length - 1;
      await waitConsole(source.stateDir, uid, `STRATUS-DATA root found ${token}`, before + 1);
      const r = await waitStatus(name, 'ACTIVE', 'RUNNING');
      expect(r.status?.node).toBe(source.nodeName);
      await waitFor('target copy dropped', async () => !existsSync(path.join(target.stateDir, 'guests', uid)), 60_000);

      // migrate again and confirm: the source's copy goes
      await patchTriggers({ migrate: 'm2', revertResize: 'r1' });
      await waitConsole(target.stateDir, uid, `STRATUS-DATA root found ${token}`, 1);
      await waitStatus(name, 'VERIFY_RESIZE', 'RUNNING');
      await patchTriggers({ migrate: 'm2', revertResize: 'r1', confirmResize: 'c1' });
      const c = await waitStatus(name, 'ACTIVE', 'RUNNING');
      expect(c.status?.node).toBe(target.nodeName);
      await waitFor('source copy dropped', async () => !existsSync(path.join(source.stateDir, 'guests', uid)), 60_000);
      await waitFor('move records dropped', async () => {
        const s = await getServer(client, NS, name);
        return !s?.status?.migration && !s?.status?.resize && !s?.status?.migrationSource;
      });
      expect(exportProcs()).toEqual([]);
    });
  });
});
