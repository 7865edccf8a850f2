// Volumes in the QEMU driver against a real QEMU (TCG), without Kubernetes. Tests 1-5 need no guest OS: the guest boots
// from a blank qcow2 root volume (the firmware finds nothing to boot and waits, which is all these tests need). The
// volumes are plain qcow2 files owned by the QEMU user, as the local backend leaves them
// (connection {driver: qcow2, file: {driver: file, filename}}).
//  1. boot from a root volume: no root.qcow2, no image; the volume is the first disk, bootindex 0, serial = its id;
//  2. scsi hot-plug: the device with its serial shows in query-block under the throttle filter; attaching again
//     changes nothing; extendVolume grows what QEMU sees; setVolumeQos sets the throttle group's limits; detach
//     completes without guest help and leaves no node, group or device;
//  3. virtio hot-plug on a spare root port: with no guest OS to release it, detach fails after its timeout with
//     nothing half removed (device, nodes and group still there); a retry waits for DEVICE_DELETED of that device,
//     which system_reset delivers (storage.md §1.3), then removes everything;
//  4. a half-done attach left by a crash (group and nodes added, no device) is completed once, not duplicated;
//  5. attach to a stopped guest is recorded and plugged at its next boot; a second driver instance (an agent
//     restart) reports the same volumes() and a repeated attach is a no-op; destroy leaves the volume files alone;
//  6. cold migration of a guest booting from a (scsi) volume: exportDisks serves only the ephemeral disk, importDisks
//     copies only that, and the target boots the same volume;
//  7. with a guest OS (the test image): a virtio volume hot-plugged into the running guest appears in it with its
//     serial and size, grows online with extendVolume, and the guest releases it on detach (PCIe hot-plug).
// Needs root, qemu-system-x86_64, qemu-img and genisoimage; skipped (with a message) otherwise.
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, chown, mkdir, mkdtemp, readFile, rm, symlink } from 'node:fs/promises';
import path from 'node:path';
import { Writable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  type AttachedVolume,
  DriverError,
  type GuestSpec,
  type VolumeAttachmentSpec,
  volumeSerial,
} from '../../node-agent/src/driver.ts';
import { resolveQemuUser } from '../../node-agent/src/drivers/qemu/user.ts';
import { QemuDriver } from '../../node-agent/src/drivers/qemu.ts';
import { createLogger } from '../../operator/src/runtime/index.ts';
import { ensureTestImage } from '../images/build.ts';
import { type FileServer, start } from '../images/serve.ts';
import { missingQemuPrerequisite } from '../testing/qemu.ts';
import { waitFor } from '../testing/wait.ts';

const log = (m: string) => console.error(`[qemu-volumes] ${m}`);

const missing = missingQemuPrerequisite();
if (missing) log(`SKIPPED: ${missing} (the QEMU volume test needs root, QEMU, qemu-img and genisoimage)`);

const UID = '7c1d2e3f-4a5b-4c6d-8e7f-901a2b3c4d5e';
const ROOT = 'a0000000-0000-4000-8000-000000000001';
const VOL_SCSI = 'b0000000-0000-4000-8000-000000000002';
const VOL_VIRTIO = 'c0000000-0000-4000-8000-000000000003';
const VOL_CRASH = 'd0000000-0000-4000-8000-000000000004';
const VOL_STOPPED = 'e0000000-0000-4000-8000-000000000005';
const UID_MIG = '9e3f4a5b-6c7d-4e8f-9a01-b2c3d4e5f607';
const ROOT_MIG = 'a1000000-0000-4000-8000-000000000007';
const UID_OS = '8d2e3f4a-5b6c-4d7e-8f90-a1b2c3d4e5f6';
const VOL_OS = 'f0000000-0000-4000-8000-000000000006';
const MiB = 1024 ** 2;
const QEMU_USER = 'stratus-qemu';

const cmdline = async (pid: number) => (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0');

type Block = { qdev?: string; inserted?: { 'node-name'?: string; image?: { 'virtual-size'?: number } } };

describe.skipIf(missing !== undefined)('QEMU driver volumes (real QEMU)', () => {
  let work: string;
  let stateDir: string;
  let volDir: string;
  const drivers: QemuDriver[] = [];
  /** Log lines of the drivers (debug), to see when an unplug has been requested. */
  const lines: string[] = [];
  const logger = createLogger({
    level: 'debug',
    destination: new Writable({
      write(chunk: Buffer, _enc, cb) {
        const text = chunk.toString();
        lines.push(text);
        if (process.env.STRATUS_TEST_LOG === '1') process.stderr.write(text);
        cb();
      },
    }) as never,
  });

  const newDriver = (over: { stateDir?: string; volumeDetachTimeoutMs?: number } = {}) => {
    const d = new QemuDriver(
      {
        stateDir: over.stateDir ?? stateDir,
        imageCacheDir: path.join(work, 'cache'),
        accelerator: 'tcg',
        acceleratorCacheFile: path.join(work, 'kvm-probe.json'),
        qemuUser: QEMU_USER,
        vnc: false,
        volumeDetachTimeoutMs: over.volumeDetachTimeoutMs ?? 3_000,
        imageUrlPolicy: { allowCidrs: ['127.0.0.0/8'] }, // the image server is on loopback
      },
      { logger },
    );
    drivers.push(d);
    return d;
  };

  /** A qcow2 volume file owned by the QEMU user (what LocalBackend leaves) and its attachment. */
  const volume = async (id: string, bus: 'virtio' | 'scsi', sizeMiB = 32): Promise<VolumeAttachmentSpec> => {
    const filename = path.join(volDir, `${id}.qcow2`);
    if (!existsSync(filename)) {
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', filename, `${sizeMiB}M`]);
      const u = await resolveQemuUser(QEMU_USER);
      await chown(filename, u!.uid, u!.gid);
      await chmod(filename, 0o600);
    }
    return {
      connection: {
        volumeId: id,
        serial: volumeSerial(id),
        blockdev: { driver: 'qcow2', file: { driver: 'file', filename } },
      },
      bus,
    };
  };

  const spec = async (): Promise<GuestSpec> => ({
    id: UID,
    name: 'vol-1',
    namespace: 'demo',
    vcpus: 1,
    ramMiB: 256,
    disk: { rootGiB: 0, ephemeralGiB: 0, swapMiB: 0 },
    rootVolume: { ...(await volume(ROOT, 'virtio', 64)), bootIndex: 0 },
    annotations: {},
  });

  const qmp = <T>(d: QemuDriver, command: string, args?: Record<string, unknown>) =>
    d.qmpExecute(UID, command, args) as Promise<T>;
  const nodes = async (d: QemuDriver) =>
    (await qmp<{ 'node-name': string }[]>(d, 'query-named-block-nodes', { flat: true })).map((n) => n['node-name']);
  const peripherals = async (d: QemuDriver) =>
    (await qmp<{ name: string; type: string }[]>(d, 'qom-list', { path: '/machine/peripheral' })).map((p) => p.name);
  const objects = async (d: QemuDriver) =>
    (await qmp<{ name: string }[]>(d, 'qom-list', { path: '/objects' })).map((p) => p.name);
  const ofVolume = (names: string[], id: string) => names.filter((n) => n.includes(volumeSerial(id))).sort();
  const record = async () =>
    JSON.parse(await readFile(path.join(stateDir, 'guests', UID, 'guest.json'), 'utf8')) as {
      volumes?: { connection: { volumeId: string } }[];
    };
  const recorded = async () => ((await record()).volumes ?? []).map((v) => v.connection.volumeId);

  beforeAll(async () => {
    work = await mkdtemp('/tmp/stratus-qv-');
    await chmod(work, 0o711); // QEMU drops to the QEMU user and must reach its guest directory and the volumes
    stateDir = path.join(work, 'state');
    volDir = path.join(work, 'volumes');
    await mkdir(volDir, { mode: 0o711 });
  });

  let server: FileServer | undefined;
  afterAll(async () => {
    for (const [dir, id] of [
      [stateDir, UID],
      [path.join(work, 'state-os'), UID_OS],
      [path.join(work, 'state-src'), UID_MIG],
      [path.join(work, 'state-dst'), UID_MIG],
    ] as const) {
      const pid = Number((await readFile(path.join(dir, 'guests', id, 'qemu.pid'), 'utf8').catch(() => '')).trim());
      if (pid > 0 && (await cmdline(pid)).includes(id)) process.kill(pid, 'SIGKILL');
    }
    await server?.close();
    for (const d of drivers) await d.close().catch(() => {});
    if (work) await rm(work, { recursive: true, force: true });
  });

  let d: QemuDriver;
  const S = (id: string) => volumeSerial(id);

  it('boots from a root volume: no root.qcow2, the volume is the first disk with bootindex 0 and its serial', async () => {
    d = newDriver();
    await d.init();
    const st = await d.spawn(await spec());
    expect(st.powerState).toBe('RUNNING');
    expect(existsSync(path.join(stateDir, 'guests', UID, 'root.qcow2'))).toBe(false);
    const dev = `d${S(ROOT)}`;
    expect(await qmp(d, 'qom-get', { path: `/machine/peripheral/${dev}`, property: 'bootindex' })).toBe(0);
    expect(await qmp(d, 'qom-get', { path: `/machine/peripheral/${dev}`, property: 'serial' })).toBe(S(ROOT));
    expect(ofVolume(await nodes(d), ROOT)).toEqual([`v${S(ROOT)}`, `v${S(ROOT)}-f`, `v${S(ROOT)}-t`]);
    expect(await d.volumes(UID)).toEqual([
      { volumeId: ROOT, serial: S(ROOT), bus: 'virtio', device: dev, sizeBytes: 64 * MiB },
    ]);
    // The spare ports and the scsi controller are there for hot-plug.
    expect(await peripherals(d)).toEqual(expect.arrayContaining(['scsi0', 'rp0', 'rp1', 'rp2']));
  });

  it('scsi: hot-plugs with its serial, is idempotent, extends, takes QoS live, and unplugs without guest help', async () => {
    const att = await volume(VOL_SCSI, 'scsi');
    const dev = `d${S(VOL_SCSI)}`;
    const got = await d.attachVolume(UID, att);
    expect(got).toEqual({ volumeId: VOL_SCSI, serial: S(VOL_SCSI), bus: 'scsi', device: dev, sizeBytes: 32 * MiB });
    const blocks = await qmp<Block[]>(d, 'query-block');
    expect(blocks.find((b) => b.qdev === dev)?.inserted?.['node-name']).toBe(`v${S(VOL_SCSI)}-t`);
    expect(await qmp(d, 'qom-get', { path: `/machine/peripheral/${dev}`, property: 'serial' })).toBe(S(VOL_SCSI));
    expect(await qmp(d, 'qom-get', { path: `/machine/peripheral/${dev}`, property: 'parent_bus' })).toMatch(
      /scsi0\.0$/,
    );
    // Again: the same answer, nothing added twice.
    const before = await nodes(d);
    expect(await d.attachVolume(UID, att)).toEqual(got);
    expect(await nodes(d)).toEqual(before);
    expect(await recorded()).toEqual([VOL_SCSI]);

    await d.extendVolume(UID, VOL_SCSI, 48 * MiB);
    const grown = (await qmp<Block[]>(d, 'query-block')).find((b) => b.qdev === dev);
    expect(grown?.inserted?.image?.['virtual-size']).toBe(48 * MiB);
    expect((await d.volumes(UID)).find((v) => v.volumeId === VOL_SCSI)?.sizeBytes).toBe(48 * MiB);

    await d.setVolumeQos(UID, VOL_SCSI, { totalBytesSec: 1048576, readIopsSec: 100 });
    const limits = await qmp<Record<string, number>>(d, 'qom-get', {
      path: `/objects/tg${S(VOL_SCSI)}`,
      property: 'limits',
    });
    expect(limits).toMatchObject({ 'bps-total': 1048576, 'iops-read': 100, 'iops-total': 0 });
    await d.setVolumeQos(UID, VOL_SCSI, {}); // cleared
    expect(
      await qmp<Record<string, number>>(d, 'qom-get', { path: `/objects/tg${S(VOL_SCSI)}`, property: 'limits' }),
    ).toMatchObject({ 'bps-total': 0, 'iops-read': 0 });

    await d.detachVolume(UID, VOL_SCSI);
    expect(await peripherals(d)).not.toContain(dev);
    expect(ofVolume(await nodes(d), VOL_SCSI)).toEqual([]);
    expect(await objects(d)).not.toContain(`tg${S(VOL_SCSI)}`);
    expect((await d.volumes(UID)).map((v) => v.volumeId)).toEqual([ROOT]);
    expect(await recorded()).toEqual([]);
    await d.detachVolume(UID, VOL_SCSI); // not attached: success
  });

  it('virtio: plugs on a spare root port; detach waits for DEVICE_DELETED of that device (system_reset)', async () => {
    const att = await volume(VOL_VIRTIO, 'virtio');
    const dev = `d${S(VOL_VIRTIO)}`;
    expect(await d.attachVolume(UID, att)).toMatchObject({ bus: 'virtio', device: dev, sizeBytes: 32 * MiB });
    expect(await qmp(d, 'qom-get', { path: `/machine/peripheral/${dev}`, property: 'parent_bus' })).toMatch(
      /\/rp0\/rp0$/,
    );
    // No guest OS answers the PCIe unplug: a DriverError after the timeout, and nothing half removed.
    const err = await d.detachVolume(UID, VOL_VIRTIO).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DriverError);
    expect(String(err)).toMatch(/did not release device/);
    expect(await peripherals(d)).toContain(dev);
    expect(ofVolume(await nodes(d), VOL_VIRTIO)).toHaveLength(3);
    expect(await objects(d)).toContain(`tg${S(VOL_VIRTIO)}`);
    expect((await d.volumes(UID)).map((v) => v.volumeId)).toContain(VOL_VIRTIO);
    // The retry waits for the event; a reset completes the pending unplug (first event: the virtio-backend path).
    const requested = () => lines.filter((l) => l.includes('unplug requested') && l.includes(dev)).length;
    expect(requested()).toBe(1);
    const retry = d.detachVolume(UID, VOL_VIRTIO);
    await waitFor('the retried unplug request', () => requested() === 2);
    await d.qmpExecute(UID, 'system_reset');
    await retry;
    expect(await peripherals(d)).not.toContain(dev);
    expect(ofVolume(await nodes(d), VOL_VIRTIO)).toEqual([]);
    expect(await objects(d)).not.toContain(`tg${S(VOL_VIRTIO)}`);
    expect(await recorded()).toEqual([]);
  });

  it('completes a half-done attach left by a crash (group and nodes, no device) without duplicating it', async () => {
    const att = await volume(VOL_CRASH, 'scsi');
    const s = S(VOL_CRASH);
    await d.qmpExecute(UID, 'object-add', { 'qom-type': 'throttle-group', id: `tg${s}`, limits: {} });
    await d.qmpExecute(UID, 'blockdev-add', {
      driver: 'qcow2',
      'node-name': `v${s}`,
      file: { driver: 'file', 'node-name': `v${s}-f`, filename: path.join(volDir, `${VOL_CRASH}.qcow2`) },
    });
    await d.qmpExecute(UID, 'blockdev-add', {
      driver: 'throttle',
      'node-name': `v${s}-t`,
      'throttle-group': `tg${s}`,
      file: `v${s}`,
    });
    expect(await d.attachVolume(UID, att)).toMatchObject({ device: `d${s}`, bus: 'scsi' });
    expect(ofVolume(await nodes(d), VOL_CRASH)).toEqual([`v${s}`, `v${s}-f`, `v${s}-t`]);
    expect(await peripherals(d)).toContain(`d${s}`);
    await d.detachVolume(UID, VOL_CRASH);
    expect(ofVolume(await nodes(d), VOL_CRASH)).toEqual([]);
  });

  it('attaches to a stopped guest for its next boot; a restarted agent sees the same volumes; attach again is a no-op', async () => {
    await d.powerOff(UID, { graceful: false, timeoutMs: 0 });
    const att = await volume(VOL_STOPPED, 'virtio');
    const dev = `d${S(VOL_STOPPED)}`;
    expect(await d.attachVolume(UID, att)).toEqual({
      volumeId: VOL_STOPPED,
      serial: S(VOL_STOPPED),
      bus: 'virtio',
      device: dev,
    });
    expect((await d.volumes(UID)).map((v) => v.volumeId)).toEqual([ROOT, VOL_STOPPED]);
    await d.powerOn(UID);
    const seen = await d.volumes(UID);
    expect(seen).toEqual([
      { volumeId: ROOT, serial: S(ROOT), bus: 'virtio', device: `d${S(ROOT)}`, sizeBytes: 64 * MiB },
      { volumeId: VOL_STOPPED, serial: S(VOL_STOPPED), bus: 'virtio', device: dev, sizeBytes: 32 * MiB },
    ]);
    // Plugged at boot on a root port (so it can be unplugged later).
    expect(await qmp(d, 'qom-get', { path: `/machine/peripheral/${dev}`, property: 'parent_bus' })).toMatch(
      /\/rp0\/rp0$/,
    );

    await d.close();
    const again = newDriver();
    await again.init();
    d = again;
    expect(await d.volumes(UID)).toEqual(seen);
    const before = await nodes(d);
    const repeated: AttachedVolume = await d.attachVolume(UID, att);
    expect(repeated).toEqual(seen[1]);
    expect(await nodes(d)).toEqual(before);
    expect(await recorded()).toEqual([VOL_STOPPED]);

    const pid = (await d.state(UID))?.pid;
    await d.destroy(UID);
    expect(pid && (await cmdline(pid)).includes(UID)).toBeFalsy();
    expect(await d.volumes(UID)).toEqual([]);
    for (const id of [ROOT, VOL_STOPPED]) expect(existsSync(path.join(volDir, `${id}.qcow2`))).toBe(true);
  });

  it('cold migration of a guest booting from a volume copies only its ephemeral disk; the volume stays where it is', async () => {
    const src = newDriver({ stateDir: path.join(work, 'state-src') });
    await src.init();
    const root = { ...(await volume(ROOT_MIG, 'scsi', 16)), bootIndex: 0 };
    const migSpec: GuestSpec = {
      id: UID_MIG,
      name: 'vol-mig',
      namespace: 'demo',
      vcpus: 1,
      ramMiB: 256,
      disk: { rootGiB: 0, ephemeralGiB: 1, swapMiB: 0 },
      rootVolume: root,
      annotations: {},
    };
    await src.spawn(migSpec);
    expect((await src.volumes(UID_MIG))[0]).toMatchObject({ volumeId: ROOT_MIG, bus: 'scsi', sizeBytes: 16 * MiB });
    await src.powerOff(UID_MIG, { graceful: false, timeoutMs: 0 });
    const served = await src.exportDisks(UID_MIG, '127.0.0.1');
    expect(served.disks).toEqual({ root: '', ephemeral: 'ephemeral' });
    const dst = newDriver({ stateDir: path.join(work, 'state-dst') });
    await dst.init();
    try {
      expect((await dst.importDisks(migSpec, served)).powerState).toBe('SHUTDOWN');
    } finally {
      await src.unexportDisks(UID_MIG);
    }
    const dir = path.join(work, 'state-dst', 'guests', UID_MIG);
    expect(existsSync(path.join(dir, 'root.qcow2'))).toBe(false);
    expect(existsSync(path.join(dir, 'ephemeral.qcow2'))).toBe(true);
    expect((await dst.list())[0]).toMatchObject({ id: UID_MIG, diskGiB: 1 });
    await src.destroy(UID_MIG);
    await dst.powerOn(UID_MIG);
    expect((await dst.volumes(UID_MIG))[0]).toMatchObject({ volumeId: ROOT_MIG, bus: 'scsi', sizeBytes: 16 * MiB });
    await dst.destroy(UID_MIG);
  });

  it('a guest OS sees a hot-plugged virtio volume by serial, sees it grow, and releases it on detach', async () => {
    const image = await ensureTestImage({ log });
    const www = path.join(work, 'www');
    await mkdir(www);
    await symlink(image.path, path.join(www, 'test.qcow2'));
    server = await start(www);
    const osState = path.join(work, 'state-os');
    const g = newDriver({ stateDir: osState, volumeDetachTimeoutMs: 120_000 });
    await g.init();
    const serial = S(VOL_OS);
    // The guest prints the state of the disk with the volume's serial whenever it changes (size in 512-byte sectors).
    const userData = `#!/bin/sh
state() {
  for d in /sys/block/vd*; do
    if [ "$(cat $d/serial 2>/dev/null)" = "${serial}" ]; then echo "present size=$(cat $d/size)"; return; fi
  done
  echo none
}
( last=; while :; do s=$(state); if [ "$s" != "$last" ]; then echo "VOL-STATE $s"; last=$s; fi; sleep 1; done ) &
`;
    await g.spawn({
      id: UID_OS,
      name: 'vol-os',
      namespace: 'demo',
      vcpus: 1,
      ramMiB: 256,
      disk: { rootGiB: 1, ephemeralGiB: 0, swapMiB: 0 },
      image: 'test-image',
      imageSource: {
        name: 'test-image',
        namespace: 'demo',
        uid: 'img-vol',
        url: `${server.url}/test.qcow2`,
        diskFormat: 'qcow2',
        checksum: { algorithm: 'sha256', value: image.sha256 },
      },
      userData,
      annotations: {},
    });
    const consoleLog = path.join(osState, 'guests', UID_OS, 'console.log');
    const seen = (needle: string, times = 1) =>
      waitFor(
        `${JSON.stringify(needle)} x${times} on the guest console`,
        async () => (await readFile(consoleLog, 'utf8').catch(() => '')).split(needle).length - 1 >= times,
        180_000,
      );
    await seen('STRATUS-GUEST-READY');
    await seen('VOL-STATE none');
    const t0 = Date.now();
    await g.attachVolume(UID_OS, await volume(VOL_OS, 'virtio'));
    await seen(`VOL-STATE present size=${(32 * MiB) / 512}`);
    log(`virtio hot-plug seen by the guest after ${Date.now() - t0} ms`);
    await g.extendVolume(UID_OS, VOL_OS, 48 * MiB);
    await seen(`VOL-STATE present size=${(48 * MiB) / 512}`);
    const t1 = Date.now();
    await g.detachVolume(UID_OS, VOL_OS);
    log(`virtio unplug released by the guest after ${Date.now() - t1} ms`);
    await seen('VOL-STATE none', 2);
    expect(await g.volumes(UID_OS)).toEqual([]);
    await g.destroy(UID_OS);
  });
});
