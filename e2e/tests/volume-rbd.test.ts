// The rbd volume backend (node-agent/src/volumes/rbd.ts) against a real single-node Ceph cluster (e2e/ceph, shared
// by the e2e files of a run) and a real QEMU:
//  1. probe: the cluster answers for client.stratus and QEMU has its rbd block driver.
//  2. blank volume: a pattern written through QEMU's rbd driver (qemu-io, opening exactly the connection() tree);
//     snapshot; a later write on the volume; a volume cloned from the snapshot holds the snapshot-time data only.
//  3. volume from a qcow2 image file: the data is in the RBD image, which is sparse.
//  4. volume from a volume (Cinder's clone snapshot), extend (never shrink).
//  5. a QEMU (-machine none) does object-add + blockdev-add of exactly what connection() returns.
//  6. a QEMU in a network namespace of the netlab reads a volume through routeLabToCeph (how simulated nodes reach
//     the shared cluster).
//  7. delete of a volume whose snapshot has a clone keeps the data the clone needs (renamed .deleted, not listed);
//     deleting everything leaves the pool without any image of this test.
// Needs root, the Ceph packages, qemu-block-extra, qemu-img, qemu-io and qemu-system-x86_64.
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QmpClient } from '../../node-agent/src/qemu/qmp.ts';
import { RbdBackend } from '../../node-agent/src/volumes/rbd.ts';
import type { CephCluster } from '../ceph/ceph.ts';
import { routeLabToCeph, sharedCeph } from '../ceph/shared.ts';
import { createLab, type NetLab } from '../testing/netlab.ts';
import { waitFor } from '../testing/wait.ts';

const pexec = promisify(execFile);
const MiB = 1 << 20;
const ref = (id: string) => ({ id, name: `rbd-${id.slice(0, 8)}`, namespace: 'e2e' });

/** A blockdev tree as qemu-io's --image-opts dotted keys (lists as .0, .1). */
function dotted(tree: Record<string, unknown>, prefix = ''): string[] {
  const out: string[] = [];
  for (const [k, v] of Object.entries(tree)) {
    const key = `${prefix}${k}`;
    if (Array.isArray(v)) {
      v.forEach((item, i) => {
        if (item && typeof item === 'object') out.push(...dotted(item as Record<string, unknown>, `${key}.${i}.`));
        else out.push(`${key}.${i}=${String(item)}`);
      });
    } else if (v && typeof v === 'object') out.push(...dotted(v as Record<string, unknown>, `${key}.`));
    else out.push(`${key}=${String(v)}`);
  }
  return out;
}

describe('rbd volume backend on a real Ceph cluster', () => {
  let ceph: CephCluster;
  let rbd: RbdBackend;
  let work: string;
  let keyFile: string;
  const ids = Array.from({ length: 6 }, () => randomUUID());
  const [blankId, fromSnapId, fromImageId, fromVolId, qemuId, snapId] = ids as [
    string,
    string,
    string,
    string,
    string,
    string,
  ];
  let qemu: ChildProcess | undefined;
  let lab: NetLab | undefined;

  /**
   * Runs qemu-io commands on a volume through the rbd block driver, opening the backend's connection() tree (in a
   * network namespace when given: a simulated node).
   */
  async function qemuIo(id: string, location: string, cmds: string[], netns?: string): Promise<string> {
    const conn = await rbd.connection(ref(id), location);
    const secret = conn.objects?.[0] as { id: string };
    const args = ['--object', `secret,id=${secret.id},file=${keyFile},format=base64`, '--image-opts'];
    for (const c of cmds) args.push('-c', c);
    args.push(dotted(conn.blockdev).join(','));
    const argv = netns ? ['ip', 'netns', 'exec', netns, 'qemu-io', ...args] : ['qemu-io', ...args];
    const { stdout } = await pexec(argv[0] as string, argv.slice(1), { encoding: 'utf8' });
    if (/fail|error|Pattern verification/i.test(stdout)) throw new Error(`qemu-io ${cmds.join('; ')}: ${stdout}`);
    return stdout;
  }

  const adminRbd = async (args: string[]) =>
    (await pexec('rbd', [...ceph.adminArgs(), ...args], { encoding: 'utf8' })).stdout;
  const ourImages = async () =>
    (JSON.parse(await adminRbd(['ls', '-l', '--format', 'json', 'volumes'])) as { image: string; snapshot?: string }[])
      .map((r) => (r.snapshot ? `${r.image}@${r.snapshot}` : r.image))
      .filter((n) => ids.some((id) => n.includes(id)));

  beforeAll(async () => {
    ceph = await sharedCeph();
    work = await mkdtemp(path.join(tmpdir(), 'stratus-rbd-e2e-'));
    keyFile = path.join(work, 'key');
    await writeFile(keyFile, ceph.key, { mode: 0o600 });
    rbd = new RbdBackend({ pool: ceph.pools.volumes, user: ceph.user, key: ceph.key, monitors: ceph.monitors });
  });

  afterAll(async () => {
    if (qemu?.exitCode === null) qemu.kill('SIGKILL');
    lab?.destroy();
    // Whatever a failed test left: removed as admin (snapshots unprotected, clones first).
    if (ceph) {
      for (const l of [...ids].reverse())
        for (const img of [`volume-${l}`, `volume-${l}.creating`])
          await rbd.delete(`rbd://${ceph.fsid}/volumes/${img}`).catch(() => {});
      await rbd?.close();
    }
    if (work) await rm(work, { recursive: true, force: true });
  });

  it('reuses the running cluster instead of starting a second one', async () => {
    const again = await sharedCeph();
    expect(again).toMatchObject({ started: false, fsid: ceph.fsid, monHost: ceph.monHost, key: ceph.key });
  });

  it('probes the cluster and the QEMU rbd driver', async () => {
    expect(await rbd.probe()).toEqual({ ok: true });
    expect(await rbd.getFsid()).toBe(ceph.fsid);
  });

  let blank: string;
  let snap: string;
  it('snapshot and clone: the clone holds the snapshot-time data, not later writes', async () => {
    const v = await rbd.create(ref(blankId), 64 * MiB, { kind: 'blank' });
    blank = v.location;
    expect(v).toMatchObject({ location: `rbd://${ceph.fsid}/volumes/volume-${blankId}`, sizeBytes: 64 * MiB });
    expect(await rbd.create(ref(blankId), 64 * MiB, { kind: 'blank' })).toMatchObject({ location: blank });
    await qemuIo(blankId, blank, ['write -P 0xaa 0 1M', 'write -P 0x11 8M 1M']);

    const s = await rbd.createSnapshot(blank, ref(snapId));
    snap = s.location;
    expect(s).toEqual({ location: `${blank}@snapshot-${snapId}`, sizeBytes: 64 * MiB });
    await qemuIo(blankId, blank, ['write -P 0xbb 0 1M']);

    const c = await rbd.create(ref(fromSnapId), 128 * MiB, { kind: 'snapshot', location: snap });
    expect(c.sizeBytes).toBe(128 * MiB);
    await qemuIo(fromSnapId, c.location, ['read -P 0xaa 0 1M', 'read -P 0x11 8M 1M', 'read -P 0 64M 1M']);
    await qemuIo(blankId, blank, ['read -P 0xbb 0 1M']);
    const info = JSON.parse(await adminRbd(['info', '--format', 'json', `volumes/volume-${fromSnapId}`])) as {
      parent?: { image: string; snapshot: string };
    };
    expect(info.parent).toMatchObject({ image: `volume-${blankId}`, snapshot: `snapshot-${snapId}` });
  });

  it('a volume from a qcow2 image file holds its data and is sparse', async () => {
    const img = path.join(work, 'src.qcow2');
    await pexec('qemu-img', ['create', '-f', 'qcow2', img, '48M']);
    await pexec('qemu-io', ['-c', 'write -P 0xcc 1M 2M', img]);
    const v = await rbd.create(ref(fromImageId), 32 * MiB, {
      kind: 'image',
      image: { key: 'test', path: img, format: 'qcow2', virtualSize: 48 * MiB, size: 0, sha256: '' },
    });
    expect(v.sizeBytes).toBe(48 * MiB);
    await qemuIo(fromImageId, v.location, ['read -P 0 0 1M', 'read -P 0xcc 1M 2M', 'read -P 0 3M 45M']);
    expect(v.allocatedBytes).toBeLessThanOrEqual(8 * MiB);
  });

  it('a volume from a volume, extend, never shrink', async () => {
    const v = await rbd.create(ref(fromVolId), 64 * MiB, { kind: 'volume', location: blank });
    await qemuIo(fromVolId, v.location, ['read -P 0xbb 0 1M']);
    const e = await rbd.extend(v.location, 96 * MiB);
    expect(e.sizeBytes).toBe(96 * MiB);
    expect((await rbd.inspect(v.location))?.sizeBytes).toBe(96 * MiB);
    await expect(rbd.extend(v.location, 64 * MiB)).rejects.toThrow(RangeError);
    await qemuIo(fromVolId, v.location, ['read -P 0xbb 0 1M', 'read -P 0 90M 1M']);
  });

  it('QEMU opens exactly what connection() returns (object-add + blockdev-add)', async () => {
    const v = await rbd.create(ref(qemuId), 16 * MiB, { kind: 'blank' });
    const sock = path.join(work, 'qmp.sock');
    const proc = spawn(
      'qemu-system-x86_64',
      ['-machine', 'none', '-nodefaults', '-display', 'none', '-S', '-qmp', `unix:${sock},server=on,wait=off`],
      { stdio: 'ignore' },
    );
    qemu = proc;
    const qmp = await waitFor('QMP', () => QmpClient.connect(sock));
    try {
      const conn = await rbd.connection(ref(qemuId), v.location);
      for (const o of conn.objects ?? []) await qmp.execute('object-add', o);
      const node = `v${conn.serial}`;
      await qmp.execute('blockdev-add', { ...conn.blockdev, 'node-name': node });
      const nodes =
        await qmp.execute<{ 'node-name': string; file: string; image: { 'virtual-size': number } }[]>(
          'query-named-block-nodes',
        );
      const top = nodes.find((n) => n['node-name'] === node);
      expect(top?.image['virtual-size']).toBe(16 * MiB);
      expect(top?.file).toContain(`"image": "volume-${qemuId}"`);
      expect(top?.file).toContain('"driver": "rbd"');
      await qmp.execute('blockdev-del', { 'node-name': node });
      for (const o of conn.objects ?? []) await qmp.execute('object-del', { id: (o as { id: string }).id });
      await qmp.execute('quit').catch(() => {});
    } finally {
      await qmp.close();
      // QEMU must not hold the image open (watchers) for the deletes below.
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
    }
    await waitFor('QEMU exit', () => proc.exitCode !== null || proc.signalCode !== null);
  });

  it('a QEMU in a simulated node (network namespace of the lab) reaches the cluster through routeLabToCeph', async () => {
    lab = createLab('rbdl', 1, 247);
    const node = lab.nodes[0] as NetLab['nodes'][number];
    routeLabToCeph(lab, ceph);
    await qemuIo(fromSnapId, `rbd://${ceph.fsid}/volumes/volume-${fromSnapId}`, ['read -P 0xaa 0 1M'], node.netns);
    lab.destroy();
    lab = undefined;
  });

  it('delete keeps what clones need, then leaves nothing', async () => {
    // The snapshot has a clone (fromSnap) and the volume a clone snapshot (fromVol): renamed .deleted, not listed.
    await rbd.delete(blank);
    expect(await rbd.inspect(blank)).toBeUndefined();
    const listed = await rbd.list();
    expect(listed.volumes).not.toContain(blank);
    expect(listed.snapshots).toContain(snap);
    expect(await ourImages()).toContain(`volume-${blankId}.deleted`);
    // Its clones still read their data.
    await qemuIo(fromSnapId, `rbd://${ceph.fsid}/volumes/volume-${fromSnapId}`, ['read -P 0xaa 0 1M']);
    // Deleting the snapshot flattens its clone; the .deleted volume stays for fromVol's clone snapshot.
    await rbd.deleteSnapshot(snap);
    await rbd.deleteSnapshot(snap);
    await qemuIo(fromSnapId, `rbd://${ceph.fsid}/volumes/volume-${fromSnapId}`, ['read -P 0xaa 0 1M']);
    expect(await ourImages()).toContain(`volume-${blankId}.deleted`);
    for (const id of [fromSnapId, fromImageId, fromVolId, qemuId]) {
      await rbd.delete(`rbd://${ceph.fsid}/volumes/volume-${id}`);
      await rbd.delete(`rbd://${ceph.fsid}/volumes/volume-${id}`);
    }
    expect(await ourImages()).toEqual([]);
    const after = await rbd.list();
    expect([...after.volumes, ...after.snapshots].filter((l) => ids.some((id) => l.includes(id)))).toEqual([]);
  });
});
