// Unit tests of the QEMU driver's pure parts: systemd launcher argv, guest.json, adoption decisions, host facts,
// and driver behaviour that needs no QEMU (adoption scan, spawn failures, unknown ids). Real guests:
// e2e/tests/qemu-driver.test.ts.
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { spawnFailureMessage } from '../compute.ts';
import {
  DriverError,
  GuestNotFoundError,
  type GuestSpec,
  InvalidGuestStateError,
  type VolumeAttachmentSpec,
} from '../driver.ts';
import { type CachedImage, ImageError } from '../images/cache.ts';
import { ExecError } from '../network/exec.ts';
import { noCloudFiles } from '../seed/nocloud.ts';
import { cpuOf, memTotalBytes, qemuVersionOf } from './qemu/host.ts';
import {
  checkNetnsName,
  directArgv,
  type LaunchRequest,
  resetFailedArgv,
  SystemdLauncher,
  systemdRunArgv,
  unitEnded,
  unitName,
} from './qemu/launcher.ts';
import { guestProcess, isGuestCmdline, type ProcReader, parsePid } from './qemu/proc.ts';
import { diskGiBOf, type GuestRecord, guestPaths, readRecord, writeRecord } from './qemu/record.ts';
import {
  acquireLaunchLock,
  bootVolumesOf,
  crashDetail,
  disksOf,
  type ImageOps,
  nicsOf,
  nicsProblem,
  QemuDriver,
  seedNicsOf,
  tapProblem,
} from './qemu.ts';

const A = '6b1c3f0e-5a4d-4e8b-9c2f-1a2b3c4d5e6f';
const B = '7c2d4f1e-6b5e-4f9c-8d3a-2b3c4d5e6f70';
const C = '8d3e5a2f-7c6f-4a0d-9e4b-3c4d5e6f7081';
const D = '9e4f6b3a-8d7a-4b1e-8f5c-4d5e6f708192';

function record(id: string, over: Partial<GuestRecord> = {}): GuestRecord {
  const p = guestPaths('/var/lib/stratus', id);
  return {
    version: 1,
    spec: {
      id,
      name: `srv-${id.slice(0, 4)}`,
      namespace: 'demo',
      vcpus: 2,
      ramMiB: 512,
      disk: { rootGiB: 0, ephemeralGiB: 2, swapMiB: 512 },
      image: 'cirros',
      imageSource: {
        name: 'cirros',
        namespace: 'demo',
        uid: 'img-uid',
        url: 'http://127.0.0.1/cirros.qcow2',
        diskFormat: 'qcow2',
        checksum: { algorithm: 'sha256', value: 'a'.repeat(64) },
      },
      userData: '#cloud-config\n{}\n',
      keyPair: { name: 'k', publicKey: 'ssh-ed25519 AAAA test' },
      hostname: 'h1',
      configDrive: true,
      metadata: { role: 'web' },
      accelerator: 'tcg',
      annotations: { a: 'b' },
    },
    accelerator: 'tcg',
    cache: 'none',
    image: {
      key: 'img-uid-0123',
      path: '/var/lib/stratus/images/img.qcow2',
      format: 'qcow2',
      virtualSize: 5 * 1024 ** 3 + 1,
      sha256: 'f'.repeat(64),
    },
    disks: {
      root: p.root,
      rootBytes: 5 * 1024 ** 3 + 1,
      ephemeral: p.ephemeral,
      swap: p.swap,
      seed: p.seed,
      configDrive: p.configDrive,
    },
    createdAt: '2026-01-01T00:00:00.000Z',
    ...over,
  };
}

/** A /proc and pid-file view from tables. */
function fakeProc(pidFiles: Record<string, string>, procs: Record<number, string[]>): ProcReader {
  return {
    readPidFile: async (path) => pidFiles[path],
    cmdline: async (pid) => procs[pid],
  };
}

describe('systemd launcher', () => {
  const req = {
    id: A,
    name: 'web-1',
    namespace: 'demo',
    binary: 'qemu-system-x86_64',
    args: ['-name', 'guest=demo:web-1', '-uuid', A],
    dir: `/var/lib/stratus/guests/${A}`,
    logFile: `/var/lib/stratus/guests/${A}/qemu.log`,
  };

  it('builds a transient unit per guest, in the host namespaces when asked', () => {
    expect(systemdRunArgv(req, { nsenter: true })).toEqual([
      'nsenter',
      '-t',
      '1',
      '-m',
      '-u',
      '-i',
      '-p',
      '--',
      'systemd-run',
      `--unit=stratus-guest-${A}.service`,
      `--description=Stratus guest demo/web-1 (${A})`,
      '--slice=machine.slice',
      '--collect',
      '--quiet',
      '--property=Type=exec',
      '--property=KillMode=mixed',
      '--property=TimeoutStopSec=30',
      `--property=WorkingDirectory=/var/lib/stratus/guests/${A}`,
      `--property=StandardOutput=append:/var/lib/stratus/guests/${A}/qemu.log`,
      `--property=StandardError=append:/var/lib/stratus/guests/${A}/qemu.log`,
      '--',
      'qemu-system-x86_64',
      '-name',
      'guest=demo:web-1',
      '-uuid',
      A,
    ]);
    const plain = systemdRunArgv(req, { nsenter: false, slice: 'stratus.slice', stopTimeoutSeconds: 5 });
    expect(plain[0]).toBe('systemd-run');
    expect(plain).toContain('--slice=stratus.slice');
    expect(plain).toContain('--property=TimeoutStopSec=5');
    expect(plain.slice(plain.indexOf('--') + 1)).toEqual(['qemu-system-x86_64', ...req.args]);
    expect(unitName(A)).toBe(`stratus-guest-${A}.service`);
    expect(resetFailedArgv(A, false)).toEqual(['systemctl', 'reset-failed', `stratus-guest-${A}.service`]);
    expect(() => systemdRunArgv({ ...req, dir: '/x\ny' }, { nsenter: false })).toThrow(/invalid systemd property/);
  });

  it('clears a failed unit of the same name, then starts the unit', async () => {
    const calls: string[][] = [];
    const l = new SystemdLauncher({
      nsenter: false,
      run: async (argv) => {
        calls.push([...argv]);
        if (argv[1] === 'reset-failed') throw new Error('Unit not loaded');
        if (argv[1] === 'show') return 'ActiveState=failed\nResult=exit-code\nExecMainStatus=1\n';
        return '';
      },
    });
    const launched = await l.launch(req);
    expect(launched.pid).toBeUndefined();
    expect(calls.map((c) => c.slice(0, 2))).toEqual([
      ['systemctl', 'reset-failed'],
      ['systemd-run', `--unit=stratus-guest-${A}.service`],
    ]);
    expect(await launched.ended?.()).toBe('unit failed (result exit-code, exit status 1)');
    expect(calls[2]).toEqual([
      'systemctl',
      'show',
      '--property=ActiveState,Result,ExecMainStatus',
      `stratus-guest-${A}.service`,
    ]);
  });
});

describe('guest.json', () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'stratus-rec-'));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('round-trips atomically and validates', async () => {
    const r = record(A, { suspended: { stateFile: '/x/state.bin', at: '2026-01-01T00:00:00Z', bytes: 10 } });
    const path = join(dir, 'guest.json');
    await writeRecord(path, r);
    expect(await readRecord(path)).toEqual(r);
    expect(await readdir(dir)).toEqual(['guest.json']); // no temporary file left
    expect(await readRecord(join(dir, 'none.json'))).toBeUndefined();
    await writeFile(path, JSON.stringify({ ...r, accelerator: 'xen' }));
    await expect(readRecord(path)).rejects.toThrow(/invalid guest record/);
    expect(diskGiBOf(r)).toBe(6 + 2 + 1);
  });

  it('orders the disks root, ephemeral, swap, seed, config drive', () => {
    const disks = disksOf(record(A));
    expect(disks.map((d) => [d.id, d.format, d.readOnly, d.bootIndex])).toEqual([
      ['root', 'qcow2', false, 0],
      ['ephemeral0', 'qcow2', false, undefined],
      ['swap', 'qcow2', false, undefined],
      ['seed', 'raw', true, undefined],
      ['config-drive', 'raw', true, undefined],
    ]);
  });
});

describe('adoption decision', () => {
  const pidFile = '/g/qemu.pid';
  const qemu = (id: string) => ['qemu-system-x86_64', '-name', 'guest=demo:x', '-uuid', id, '-m', '512M'];

  it('is running only when the pid is alive and its command line carries the uuid', async () => {
    expect(await guestProcess(fakeProc({ [pidFile]: '4242\n' }, { 4242: qemu(A) }), pidFile, A)).toEqual({
      kind: 'running',
      pid: 4242,
    });
    // pid reused by another guest's QEMU or any other process
    expect(await guestProcess(fakeProc({ [pidFile]: '4242' }, { 4242: qemu(B) }), pidFile, A)).toMatchObject({
      kind: 'stopped',
      why: 'other-process',
    });
    expect(await guestProcess(fakeProc({ [pidFile]: '4242' }, { 4242: ['sleep', A] }), pidFile, A)).toMatchObject({
      kind: 'running',
    });
    expect(await guestProcess(fakeProc({ [pidFile]: '4242' }, { 4242: ['bash'] }), pidFile, A)).toMatchObject({
      kind: 'stopped',
      why: 'other-process',
    });
    // dead, zombie (empty cmdline), no pid file, garbage
    expect(await guestProcess(fakeProc({ [pidFile]: '4242' }, {}), pidFile, A)).toMatchObject({ why: 'dead' });
    expect(await guestProcess(fakeProc({ [pidFile]: '4242' }, { 4242: [] }), pidFile, A)).toMatchObject({
      why: 'dead',
    });
    expect(await guestProcess(fakeProc({}, {}), pidFile, A)).toMatchObject({ why: 'no-pidfile' });
    expect(await guestProcess(fakeProc({ [pidFile]: 'x1' }, {}), pidFile, A)).toMatchObject({ why: 'bad-pidfile' });
  });

  it('parses pids and matches -uuid exactly', () => {
    expect(parsePid(' 17\n')).toBe(17);
    expect(parsePid('0')).toBeUndefined();
    expect(parsePid('-5')).toBeUndefined();
    expect(parsePid('99999999999')).toBeUndefined();
    expect(isGuestCmdline(['q', '-uuid', A.toUpperCase()], A)).toBe(true);
    expect(isGuestCmdline(['q', '-uuid', B, A], A)).toBe(false);
    expect(isGuestCmdline([], A)).toBe(false);
  });
});

describe('host facts', () => {
  it('parses /proc/meminfo, /proc/cpuinfo and qemu --version', () => {
    expect(memTotalBytes('MemTotal:        8140436 kB\nMemFree: 1 kB\n')).toBe(8140436 * 1024);
    expect(memTotalBytes('nothing')).toBeUndefined();
    expect(cpuOf('processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n')).toEqual({
      model: 'AMD EPYC 7B13',
      vendor: 'AMD',
    });
    expect(cpuOf('vendor_id : GenuineIntel\n')).toEqual({ vendor: 'Intel' });
    expect(qemuVersionOf('QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n')).toBe('7.2.22');
  });
});

describe('QemuDriver without QEMU', () => {
  let stateDir: string;
  beforeEach(async () => {
    stateDir = await mkdtemp(join(tmpdir(), 'stratus-qd-'));
  });
  afterEach(async () => {
    await rm(stateDir, { recursive: true, force: true });
  });

  const image: CachedImage = {
    key: 'k',
    path: '/cache/k.qcow2',
    format: 'qcow2',
    virtualSize: 1024 ** 3,
    size: 1000,
    sha256: 'f'.repeat(64),
    sourceFormat: 'qcow2',
  };

  function driver(proc: ProcReader, images: Partial<ImageOps> = {}) {
    return new QemuDriver(
      { stateDir, accelerator: 'tcg' },
      {
        proc,
        qemuVersion: async () => '7.2.0',
        detectAccelerator: async () => ({ accelerator: 'tcg', reason: 'configured: tcg' }),
        images: {
          ensure: async () => image,
          createRootDisk: async () => {},
          createBlankDisk: async () => {},
          ...images,
        },
      },
    );
  }

  const spec = (over: Partial<GuestSpec> = {}): GuestSpec => ({
    id: A,
    name: 'web',
    namespace: 'demo',
    vcpus: 1,
    ramMiB: 128,
    disk: { rootGiB: 1, ephemeralGiB: 0, swapMiB: 0 },
    image: 'cirros',
    imageSource: { name: 'cirros', namespace: 'demo', uid: 'u', url: 'http://x/c.qcow2', diskFormat: 'qcow2' },
    annotations: {},
    ...over,
  });

  it('adopts from guest.json and qemu.pid: running, dead, pid reused, suspended; drops unfinished spawns', async () => {
    const put = async (r: GuestRecord, pid?: number) => {
      const p = guestPaths(stateDir, r.spec.id);
      await mkdir(p.dir, { recursive: true });
      await writeRecord(p.record, r);
      if (pid) await writeFile(p.pidFile, `${pid}\n`);
    };
    await put(record(A), 101); // alive, QMP socket missing: state unknown
    await put(record(B), 102); // dead
    await put(record(C), 103); // pid now belongs to something else
    await put(record(D, { suspended: { stateFile: 'x', at: 'y', bytes: 1 } }));
    const leftover = guestPaths(stateDir, '0a0b0c0d-1111-4222-8333-444455556666').dir;
    await mkdir(leftover, { recursive: true });
    await writeFile(join(leftover, 'root.qcow2'), 'partial');
    const procs: Record<number, string[]> = { 101: ['qemu', '-uuid', A], 103: ['nginx'] };
    const pidFiles: Record<string, string> = {};
    for (const [id, pid] of [
      [A, '101'],
      [B, '102'],
      [C, '103'],
    ] as const) {
      pidFiles[guestPaths(stateDir, id).pidFile] = pid;
    }
    const d = driver(fakeProc(pidFiles, procs));
    await d.init();
    expect((await readdir(join(stateDir, 'guests'))).sort()).toEqual([A, B, C, D].sort());
    expect(await d.state(A)).toMatchObject({ powerState: 'NOSTATE', pid: 101 });
    expect(await d.state(B)).toMatchObject({ powerState: 'SHUTDOWN' });
    expect((await d.state(B))?.pid).toBeUndefined();
    expect(await d.state(C)).toMatchObject({ powerState: 'SHUTDOWN' });
    expect(await d.state(D)).toMatchObject({ powerState: 'SUSPENDED' });
    expect(await d.state('0f0f0f0f-1111-4222-8333-444455556666')).toBeUndefined();
    const list = await d.list();
    expect(list).toHaveLength(4);
    expect(list[0]).toMatchObject({ name: 'srv-6b1c', namespace: 'demo', vcpus: 2, ramMiB: 512, diskGiB: 9 });
    expect(await d.imagesInUse()).toEqual(new Set(['img-uid-0123']));
    expect((await d.hostInfo()).accelerator).toBe('tcg');
    await d.close();
  });

  it('fails a spawn cleanly: unresolved image, ImageError, disk failure', async () => {
    const none = fakeProc({}, {});
    const d = driver(none);
    await d.init();
    const { imageSource: _, ...noSource } = spec();
    await expect(d.spawn(noSource)).rejects.toThrow(/image cirros was not found in namespace demo/);
    const bad = driver(none, {
      ensure: async () => {
        throw new ImageError('ChecksumMismatch', 'sha256 of the data is 00…, expected aa…');
      },
    });
    await bad.init();
    const err = await bad.spawn(spec()).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ImageError);
    expect(spawnFailureMessage(err, 'cirros')).toBe(
      'image cirros unusable: checksum mismatch: sha256 of the data is 00…, expected aa…',
    );
    const tooBig = driver(none, {
      createRootDisk: async () => {
        throw new ImageError('TooBig', 'virtual size 2 GiB is larger than the root disk of 1 GiB');
      },
    });
    await tooBig.init();
    await expect(tooBig.spawn(spec())).rejects.toMatchObject({ reason: 'TooBig' });
    expect(await readdir(join(stateDir, 'guests'))).toEqual([]);
    await expect(d.spawn(spec({ id: 'not-a-uuid' }))).rejects.toThrow(DriverError);
  });

  it('resizes a stopped guest keeping its disks: grows root and ephemeral, refuses shrinking, confirm and revert', async () => {
    const GiB = 1024 ** 3;
    const p = guestPaths(stateDir, A);
    await mkdir(p.dir, { recursive: true });
    const rec = record(A, {
      spec: { ...record(A).spec, disk: { rootGiB: 6, ephemeralGiB: 2, swapMiB: 512 } },
      disks: { ...record(A).disks, root: p.root, rootBytes: 6 * GiB, ephemeral: p.ephemeral, swap: p.swap },
    });
    await writeRecord(p.record, rec);
    await writeFile(p.root, 'root data');
    await writeFile(p.ephemeral, 'ephemeral data');
    const calls: string[] = [];
    const d = driver(fakeProc({}, {}), {
      createRootDisk: async () => {
        calls.push('createRootDisk');
      },
      createBlankDisk: async (o) => {
        calls.push(`blank ${o.path.split('/').pop()} ${o.sizeBytes}`);
        await writeFile(o.path, '');
      },
      growDisk: async (o) => {
        calls.push(`grow ${o.path.split('/').pop()} ${o.sizeBytes}`);
        await writeFile(o.path, `${await readFile(o.path, 'utf8')} grown`);
      },
      copyDisk: async (o) => writeFile(o.to, await readFile(o.from)),
    });
    await d.init();
    const bigger = spec({ vcpus: 2, ramMiB: 1024, disk: { rootGiB: 10, ephemeralGiB: 3, swapMiB: 0 } });
    const off = { graceful: true, timeoutMs: 1000 };

    const shrink = spec({ vcpus: 2, ramMiB: 1024, disk: { rootGiB: 5, ephemeralGiB: 2, swapMiB: 0 } });
    await expect(d.resize(A, shrink, off)).rejects.toThrow('Resize error: Unable to resize disk down.');
    const lessEphemeral = spec({ disk: { rootGiB: 6, ephemeralGiB: 1, swapMiB: 512 } });
    await expect(d.resize(A, lessEphemeral, off)).rejects.toThrow('Resize error: Unable to resize disk down.');
    expect(calls).toEqual([]);

    await d.resize(A, bigger, off);
    expect(calls).toEqual([`grow root.qcow2 ${10 * GiB}`, `grow ephemeral.qcow2 ${3 * GiB}`]);
    expect(await readFile(p.root, 'utf8')).toBe('root data grown'); // the same disk, grown: no new root disk
    expect(await readFile(p.ephemeral, 'utf8')).toBe('ephemeral data grown');
    const after = (await readRecord(p.record))!;
    expect(after.spec).toMatchObject({ vcpus: 2, ramMiB: 1024, disk: { rootGiB: 10, ephemeralGiB: 3, swapMiB: 0 } });
    expect(after.disks.rootBytes).toBe(10 * GiB);
    expect(after.disks.swap).toBeUndefined();
    expect(after.resizePending).toBeDefined();
    expect((await d.list())[0]).toMatchObject({ vcpus: 2, ramMiB: 1024, diskGiB: 13, powerState: 'SHUTDOWN' });
    await d.resize(A, bigger, off); // repeated while unconfirmed: nothing more
    expect(calls).toHaveLength(2);

    await d.revertResize(A, off);
    expect(await readFile(p.root, 'utf8')).toBe('root data');
    expect(await readFile(p.ephemeral, 'utf8')).toBe('ephemeral data');
    expect(calls.at(-1)).toBe(`blank swap.qcow2 ${512 * 1024 ** 2}`);
    const reverted = (await readRecord(p.record))!;
    expect(reverted.spec.disk).toEqual({ rootGiB: 6, ephemeralGiB: 2, swapMiB: 512 });
    expect(reverted.resizePending).toBeUndefined();
    expect(await readdir(p.dir)).not.toContain('resize-old');

    await d.resize(A, bigger, off);
    await d.confirmResize(A);
    expect(await readdir(p.dir)).not.toContain('resize-old');
    expect((await readRecord(p.record))!.resizePending).toBeUndefined();
    expect(await readFile(p.root, 'utf8')).toBe('root data grown');
    await d.revertResize(A, off); // confirmed: nothing left to revert
    expect((await readRecord(p.record))!.spec.vcpus).toBe(2);
    await d.confirmResize(B); // unknown id
  });

  const att = (serial: string, bus: 'virtio' | 'scsi' = 'virtio'): VolumeAttachmentSpec => ({
    connection: {
      volumeId: `vol-${serial}`,
      serial,
      blockdev: { driver: 'qcow2', file: { driver: 'file', filename: `/v/${serial}.qcow2` } },
    },
    bus,
  });

  it('keeps the volumes of a stopped guest in guest.json: attach once, detach, extend and QoS recorded', async () => {
    const p = guestPaths(stateDir, A);
    await mkdir(p.dir, { recursive: true });
    await writeRecord(p.record, record(A));
    const d = driver(fakeProc({}, {}));
    await d.init();
    const v = await d.attachVolume(A, att('aa11', 'scsi'));
    expect(v).toEqual({ volumeId: 'vol-aa11', serial: 'aa11', bus: 'scsi', device: 'daa11' });
    expect(await d.attachVolume(A, att('aa11', 'scsi'))).toEqual(v);
    await d.attachVolume(A, att('bb22'));
    expect((await readRecord(p.record))!.volumes?.map((x) => x.connection.volumeId)).toEqual(['vol-aa11', 'vol-bb22']);
    expect(await d.volumes(A)).toEqual([v, { volumeId: 'vol-bb22', serial: 'bb22', bus: 'virtio', device: 'dbb22' }]);
    await d.extendVolume(A, 'vol-aa11', 2 * 1024 ** 3); // stopped: QEMU reads the size at the next boot
    await expect(d.extendVolume(A, 'vol-zz', 1)).rejects.toBeInstanceOf(DriverError);
    await d.setVolumeQos(A, 'vol-bb22', { totalIopsSec: 50 });
    expect((await readRecord(p.record))!.volumes?.[1]?.qos).toEqual({ totalIopsSec: 50 });
    await d.detachVolume(A, 'vol-aa11');
    await d.detachVolume(A, 'vol-aa11');
    await d.detachVolume(B, 'vol-aa11'); // unknown guest
    expect((await d.volumes(A)).map((x) => x.volumeId)).toEqual(['vol-bb22']);
    await expect(d.attachVolume(A, att('BAD-1'))).rejects.toThrow(/serial/);
    await writeRecord(p.record, {
      ...(await readRecord(p.record))!,
      suspended: { stateFile: '/x', at: 'now', bytes: 1 },
    });
    await expect(d.attachVolume(A, att('cc33'))).rejects.toBeInstanceOf(InvalidGuestStateError);
    await expect(d.attachVolume(C, att('cc33'))).rejects.toBeInstanceOf(GuestNotFoundError);
  });

  it('boots a root volume on pcie.0 and the others on root ports or scsi-ids; spare ports for hot-plug', () => {
    const rv = (a: VolumeAttachmentSpec, over: object = {}) => ({ ...a, connection: { ...a.connection }, ...over });
    const r = record(A, {
      spec: { ...record(A).spec, rootVolume: rv(att('root1'), { bootIndex: 0 }) },
      disks: { ...record(A).disks, root: undefined, rootBytes: 0 },
      volumes: [rv(att('v1')), rv(att('s1', 'scsi')), rv(att('v2')), rv(att('gone'), { pending: 'detach' })],
    });
    expect(disksOf(r).map((x) => x.id)).toEqual(['ephemeral0', 'swap', 'seed', 'config-drive']);
    const { volumes, rootPorts } = bootVolumesOf(r);
    expect(volumes.map((v) => [v.serial, v.slot, v.bootIndex])).toEqual([
      ['root1', { bus: 'virtio', port: 'pcie.0' }, 0],
      ['v1', { bus: 'virtio', port: 0 }, undefined],
      ['s1', { bus: 'scsi', scsiId: 0 }, undefined],
      ['v2', { bus: 'virtio', port: 1 }, undefined],
    ]);
    expect(rootPorts).toBe(2 + 3); // 512 MiB of RAM: 3 spare (6 above 2 GiB)
    expect(bootVolumesOf(record(A, { spec: { ...record(A).spec, ramMiB: 4096 } })).rootPorts).toBe(6);
    // pcie.0 has 30 slots: 16 NICs, 5 disks, rng, scsi0 and VGA leave 6 for virtio volumes.
    const nics = Array.from({ length: 16 }, (_, i) => ({
      device: `stt-${i}`,
      mac: `fa:16:3e:00:00:${(i + 16).toString(16)}`,
      addresses: [],
      routes: [],
      dns: [],
      searchDomains: [],
    }));
    const crowded = (n: number) =>
      bootVolumesOf(
        record(A, {
          spec: { ...record(A).spec, nics },
          volumes: Array.from({ length: n }, (_, i) => rv(att(`x${i}`))),
        }),
      );
    expect(crowded(6)).toMatchObject({ rootPorts: 6, fits: true });
    expect(crowded(7).fits).toBe(false);
  });

  it('resizes a guest booting from a volume without copying or growing the volume; volumes stay attached', async () => {
    const p = guestPaths(stateDir, A);
    await mkdir(p.dir, { recursive: true });
    const base = record(A);
    await writeRecord(p.record, {
      ...base,
      image: undefined,
      spec: { ...base.spec, disk: { rootGiB: 0, ephemeralGiB: 2, swapMiB: 0 }, rootVolume: att('root1') },
      disks: { seed: base.disks.seed, rootBytes: 0, ephemeral: p.ephemeral },
    });
    await writeFile(p.ephemeral, 'e');
    const calls: string[] = [];
    const d = driver(fakeProc({}, {}), {
      growDisk: async (o) => {
        calls.push(`grow ${o.path.split('/').pop()}`);
      },
      copyDisk: async (o) => {
        calls.push(`copy ${o.from.split('/').pop()}`);
        await writeFile(o.to, await readFile(o.from));
      },
    });
    await d.init();
    await d.attachVolume(A, att('dd44'));
    const off = { graceful: true, timeoutMs: 1000 };
    await d.resize(A, spec({ disk: { rootGiB: 20, ephemeralGiB: 3, swapMiB: 0 }, rootVolume: att('root1') }), off);
    expect(calls).toEqual(['copy ephemeral.qcow2', 'grow ephemeral.qcow2']);
    const after = (await readRecord(p.record))!;
    expect(after.disks.root).toBeUndefined();
    expect(after.disks.rootBytes).toBe(0);
    expect(after.spec.rootVolume?.connection.volumeId).toBe('vol-root1');
    expect((await d.list())[0]).toMatchObject({ diskGiB: 3 });
    await d.attachVolume(A, att('ee55'));
    await d.revertResize(A, off);
    expect((await d.volumes(A)).map((v) => v.volumeId)).toEqual(['vol-root1', 'vol-dd44', 'vol-ee55']);
  });

  it('exports only the ephemeral disk of a guest booting from a volume (cold migration)', async () => {
    const p = guestPaths(stateDir, A);
    await mkdir(p.dir, { recursive: true });
    const base = record(A);
    await writeRecord(p.record, {
      ...base,
      image: undefined,
      spec: { ...base.spec, disk: { rootGiB: 0, ephemeralGiB: 2, swapMiB: 0 }, rootVolume: att('root1') },
      disks: { seed: base.disks.seed, rootBytes: 0, ephemeral: p.ephemeral },
    });
    const runs: string[][] = [];
    const exec = {
      run: async (cmd: string, args: readonly string[]) => {
        runs.push([cmd, ...args]);
        return { stdout: '', stderr: '' };
      },
      argv: (cmd: string, args: readonly string[]) => [cmd, ...args],
    };
    const d = new QemuDriver(
      { stateDir, accelerator: 'tcg' },
      {
        proc: fakeProc({}, {}),
        exec,
        qemuVersion: async () => '7.2.0',
        detectAccelerator: async () => ({ accelerator: 'tcg', reason: 'configured: tcg' }),
        images: {
          ensure: async () => {
            throw new Error('no image is needed');
          },
          createRootDisk: async () => {},
          createBlankDisk: async () => {},
        },
      },
    );
    await d.init();
    const served = await d.exportDisks(A, '192.0.2.1');
    expect(served).toEqual({
      host: '192.0.2.1',
      port: expect.any(Number),
      disks: { root: '', ephemeral: 'ephemeral' },
    });
    const qsd = runs.find((r) => r[0] === 'qemu-storage-daemon')!;
    expect(qsd.join(' ')).not.toContain('root.qcow2');
    expect(qsd.join(' ')).toContain('ephemeral.qcow2');

    // importDisks of such a guest copies only the ephemeral disk (it writes seeds: e2e/integration tiers).
  });

  it('treats unknown ids as the interface says', async () => {
    const d = driver(fakeProc({}, {}));
    await d.init();
    await d.destroy(A);
    await d.destroy('not-a-uuid');
    await expect(d.powerOn(A)).rejects.toBeInstanceOf(GuestNotFoundError);
    await expect(d.pause('nope')).rejects.toBeInstanceOf(GuestNotFoundError);
    expect(await d.list()).toEqual([]);
  });
});

describe('launch lock', () => {
  it('is exclusive while its holder lives and taken over when it is stale', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'stratus-lock-'));
    try {
      const path = join(dir, 'launch.lock');
      await writeFile(path, '999999\n'); // dead holder
      const release = await acquireLaunchLock(path, fakeProc({}, {}));
      await release();
      await writeFile(path, '4242\n'); // live holder
      await expect(acquireLaunchLock(path, fakeProc({}, { 4242: ['node'] }), 200)).rejects.toThrow(
        /held by process 4242/,
      );
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('systemd unit state', () => {
  it('tells an ended unit from a running one', () => {
    expect(unitEnded('ActiveState=active\nResult=success\nExecMainStatus=0\n')).toBeUndefined();
    expect(unitEnded('ActiveState=activating\n')).toBeUndefined();
    expect(unitEnded('')).toBeUndefined();
    expect(unitEnded('ActiveState=failed\nResult=exit-code\nExecMainStatus=1\n')).toBe(
      'unit failed (result exit-code, exit status 1)',
    );
    expect(unitEnded('ActiveState=inactive\nResult=success\nExecMainStatus=0')).toBe(
      'unit inactive (result success, exit status 0)',
    );
  });
});

describe('NICs and network namespaces', () => {
  const nic0 = {
    device: 'stt-0123456789a',
    mac: 'FA:16:3E:00:00:01',
    mtu: 1450,
    addresses: ['10.1.0.11/24'],
    gateway: '10.1.0.1',
    dns: ['10.1.0.2'],
    portId: 'port-uid-0',
    networkId: 'net-uid-a',
  };
  const nic1 = { device: 'stt-bbbbbbbbbbb', mac: 'fa:16:3e:00:00:02', mtu: 1450, addresses: ['10.2.0.11/24'] };

  it('plugs the recorded taps by name at fixed PCI slots, vhost only when asked', () => {
    const r = record(A);
    expect(nicsOf(r, { vhost: false })).toEqual([]);
    r.spec.nics = [nic0, nic1].map((n) => ({ ...n, mac: n.mac.toLowerCase(), routes: [], dns: [], searchDomains: [] }));
    expect(nicsOf(r, { vhost: false })).toEqual([
      {
        id: 'net0',
        mac: 'fa:16:3e:00:00:01',
        mtu: 1450,
        tap: { ifname: 'stt-0123456789a' },
        vhost: false,
        pciSlot: 0x0f,
      },
      {
        id: 'net1',
        mac: 'fa:16:3e:00:00:02',
        mtu: 1450,
        tap: { ifname: 'stt-bbbbbbbbbbb' },
        vhost: false,
        pciSlot: 0x10,
      },
    ]);
    expect(nicsOf(r, { vhost: true }).map((n) => n.vhost)).toEqual([true, true]);
  });

  it('gives the seeds everything but the device, which names the config drive link', () => {
    const seed = seedNicsOf([nic0, { ...nic1, linkName: 'eth-b' }]);
    expect(seed[0]).toEqual({ ...nic0, device: undefined, linkName: 'stt-0123456789a' });
    expect(seed[0]).not.toHaveProperty('device');
    expect(seed[1]?.linkName).toBe('eth-b');
    const files = noCloudFiles({ instanceId: A, hostname: 'h', nics: seed });
    expect(files['network-config']).toContain('macaddress: "fa:16:3e:00:00:01"');
    expect(files['network-config']).toContain('- "10.1.0.11/24"');
    expect(files['network-config']).toContain('set-name: "eth1"');
    expect(seedNicsOf(undefined)).toEqual([]);
  });

  it('refuses NIC lists that cannot be plugged', () => {
    expect(nicsProblem([nic0, nic1])).toBeUndefined();
    expect(nicsProblem([])).toBeUndefined();
    expect(nicsProblem([nic0, { ...nic1, device: nic0.device }])).toMatch(/tap stt-0123456789a is used twice/);
    expect(nicsProblem([nic0, { ...nic1, mac: 'fa:16:3e:00:00:01' }])).toMatch(/MAC fa:16:3e:00:00:01 is used twice/);
    expect(nicsProblem([{ ...nic0, device: 'stt-0123456789ab' }])).toMatch(/invalid nics/);
    expect(nicsProblem([{ ...nic0, mac: 'nope' }])).toMatch(/invalid nics/);
  });

  it('tells a tap from a missing device or another kind of link', () => {
    const link = (kind: string, type?: string) =>
      JSON.stringify([{ ifname: 'stt-x', linkinfo: { info_kind: kind, ...(type ? { info_data: { type } } : {}) } }]);
    expect(tapProblem(link('tun', 'tap'), 'stt-x')).toBeUndefined();
    expect(tapProblem(link('tun', 'tun'), 'stt-x')).toMatch(/stt-x is not a tap \(tun\/tun\)/);
    expect(tapProblem(link('veth'), 'stt-x', ' in network namespace n1')).toBe(
      'stt-x in network namespace n1 is not a tap (veth)',
    );
    expect(tapProblem('[]', 'stt-x')).toMatch(/does not exist/);
    expect(tapProblem('garbage', 'stt-x')).toMatch(/cannot parse/);
  });

  it('launches through ip netns exec (same pid) or a systemd NetworkNamespacePath', () => {
    const req = { binary: 'qemu-system-x86_64', args: ['-uuid', A] };
    expect(directArgv(req)).toEqual(['qemu-system-x86_64', '-uuid', A]);
    expect(directArgv({ ...req, netns: 'e2en1' })).toEqual([
      'ip',
      'netns',
      'exec',
      'e2en1',
      'qemu-system-x86_64',
      '-uuid',
      A,
    ]);
    expect(() => directArgv({ ...req, netns: '../x' })).toThrow(/invalid network namespace/);
    expect(() => checkNetnsName('a b')).toThrow(/invalid network namespace/);
    const full = { ...req, id: A, name: 'n', namespace: 'ns', dir: '/d', logFile: '/d/qemu.log' };
    const argv = systemdRunArgv({ ...full, netns: 'e2en1' }, { nsenter: false });
    expect(argv).toContain('--property=NetworkNamespacePath=/run/netns/e2en1');
    expect(argv.indexOf('--property=NetworkNamespacePath=/run/netns/e2en1')).toBeLessThan(argv.indexOf('--'));
    expect(systemdRunArgv(full, { nsenter: false }).some((a) => a.includes('NetworkNamespacePath'))).toBe(false);
  });

  describe('driver', () => {
    let stateDir: string;
    beforeEach(async () => {
      stateDir = await mkdtemp(join(tmpdir(), 'stratus-qd-nic-'));
    });
    afterEach(async () => {
      await rm(stateDir, { recursive: true, force: true });
    });

    /** A driver whose launcher records requests and whose QEMU "exits" at once; `links` are the taps that exist. */
    function driver(links: Record<string, string>, netns = 'e2en1') {
      const launches: LaunchRequest[] = [];
      const execs: string[][] = [];
      const hooks: string[] = [];
      const d = new QemuDriver(
        { stateDir, accelerator: 'tcg', netns },
        {
          proc: fakeProc({}, {}),
          qemuVersion: async () => '7.2.0',
          detectAccelerator: async () => ({ accelerator: 'tcg', reason: 'configured: tcg' }),
          launcher: {
            name: 'direct',
            init: async () => {
              hooks.push('init');
            },
            launch: async (req) => {
              launches.push(req);
              return { exited: Promise.resolve({ code: 1, signal: null }) };
            },
            release: async (id) => {
              hooks.push(`release ${id}`);
            },
          },
          exec: {
            netns,
            argv: (cmd, args) => ['ip', 'netns', 'exec', netns, cmd, ...args],
            run: async (cmd, args) => {
              execs.push([cmd, ...args]);
              const dev = args.at(-1)!;
              const kind = links[dev];
              if (!kind) throw new ExecError([cmd, ...args], 1, `Device "${dev}" does not exist.\n`);
              const [info_kind, type] = kind.split('/');
              return {
                stdout: JSON.stringify([{ ifname: dev, linkinfo: { info_kind, info_data: { type } } }]),
                stderr: '',
              };
            },
          },
        },
      );
      return { d, launches, execs, hooks };
    }

    const withNics = () => {
      const r = record(A);
      r.spec.nics = [nic0, nic1].map((n) => ({
        ...n,
        mac: n.mac.toLowerCase(),
        routes: [],
        dns: [],
        searchDomains: [],
      }));
      return r;
    };
    const put = async (r: GuestRecord) => {
      const p = guestPaths(stateDir, r.spec.id);
      await mkdir(p.dir, { recursive: true });
      await writeRecord(p.record, { ...r, disks: { ...r.disks, root: p.root, seed: p.seed } });
    };

    it('starts a recorded guest in its netns with its recorded taps', async () => {
      await put(withNics());
      const { d, launches, execs } = driver({ 'stt-0123456789a': 'tun/tap', 'stt-bbbbbbbbbbb': 'tun/tap' });
      await d.init();
      expect(d.netns).toBe('e2en1');
      await expect(d.powerOn(A)).rejects.toThrow(/QEMU exited during start-up/);
      expect(execs).toEqual([
        ['ip', '-d', '-j', 'link', 'show', 'dev', 'stt-0123456789a'],
        ['ip', '-d', '-j', 'link', 'show', 'dev', 'stt-bbbbbbbbbbb'],
      ]);
      expect(launches).toHaveLength(1);
      const req = launches[0]!;
      expect(req.netns).toBe('e2en1');
      const devs = req.args.filter((_, i) => req.args[i - 1] === '-netdev' || req.args[i - 1] === '-device');
      expect(devs).toContain('tap,id=net0-tap,ifname=stt-0123456789a,script=no,downscript=no,vhost=off');
      expect(devs).toContain(
        'virtio-net-pci,netdev=net0-tap,id=net0,mac=fa:16:3e:00:00:01,host_mtu=1450,addr=0xf,romfile=',
      );
      expect(devs).toContain(
        'virtio-net-pci,netdev=net1-tap,id=net1,mac=fa:16:3e:00:00:02,host_mtu=1450,addr=0x10,romfile=',
      );
      // the record keeps its NICs for the next start
      expect((await readRecord(guestPaths(stateDir, A).record))?.spec.nics?.map((n) => n.device)).toEqual([
        'stt-0123456789a',
        'stt-bbbbbbbbbbb',
      ]);
    });

    it('gives the launcher the guest memory and accelerator, initialises it once and releases a destroyed guest', async () => {
      await put(withNics());
      const { d, launches, hooks } = driver({ 'stt-0123456789a': 'tun/tap', 'stt-bbbbbbbbbbb': 'tun/tap' });
      await d.init();
      await d.init();
      expect(hooks).toEqual(['init']);
      await expect(d.powerOn(A)).rejects.toThrow(/QEMU exited during start-up/);
      expect(launches[0]).toMatchObject({ memoryMiB: withNics().spec.ramMiB, accelerator: 'tcg' });
      await d.destroy(A);
      expect(hooks).toEqual(['init', `release ${A}`]);
    });

    it('refuses to start a guest whose tap is missing or not a tap, without launching QEMU', async () => {
      await put(withNics());
      const { d, launches } = driver({ 'stt-0123456789a': 'veth/' });
      await d.init();
      const err = await d.powerOn(A).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(DriverError);
      expect(String(err)).toMatch(/stt-0123456789a in network namespace e2en1 is not a tap \(veth\)/);
      expect(String(err)).toMatch(/tap stt-bbbbbbbbbbb does not exist in network namespace e2en1/);
      expect(launches).toEqual([]);
    });

    it('refuses a spawn with unpluggable NICs before creating anything', async () => {
      const { d, launches } = driver({});
      await d.init();
      const spec: GuestSpec = {
        id: B,
        name: 'web',
        namespace: 'demo',
        vcpus: 1,
        ramMiB: 128,
        disk: { rootGiB: 1, ephemeralGiB: 0, swapMiB: 0 },
        imageSource: { name: 'c', namespace: 'demo', uid: 'u', url: 'http://x/c.qcow2', diskFormat: 'qcow2' },
        annotations: {},
        nics: [nic0, { ...nic1, device: nic0.device }],
      };
      await expect(d.spawn(spec)).rejects.toThrow(/tap stt-0123456789a is used twice/);
      expect(await readdir(join(stateDir, 'guests'))).toEqual([]);
      expect(launches).toEqual([]);
    });
  });
});

describe('crashDetail (what QEMU said when it stopped a guest)', () => {
  it('names a KVM internal error without the register dump', () => {
    const log = [
      "2026-12-03T10:00:00.000000Z qemu-system-x86_64: warning: host doesn't support requested feature",
      'KVM internal error. Suberror: 1',
      'extra data[0]: 0x0000000000000000',
      'emulation failure',
      'EAX=00000000 EBX=00000000 ECX=00000000 EDX=000806f8',
      'ESI=00000000 EDI=00000000 EBP=00000000 ESP=00000000',
      'CS =f000 ffff0000 0000ffff 00009b00',
      'SS =0000 00000000 0000ffff 00009300',
      'LDT=0000 00000000 0000ffff 00008200',
      'TR =0000 00000000 0000ffff 00008b00',
      'DR6=00000000ffff0ff0 DR7=0000000000000400',
      'EFER=0000000000000000',
      'GDT=     00000000 0000ffff',
      'CR0=60000010 CR2=00000000 CR3=00000000 CR4=00000000',
      'Code=00 00 00 <00> 00',
    ].join('\n');
    expect(crashDetail(log)).toBe('KVM internal error. Suberror: 1; emulation failure');
  });

  it('says nothing for a log without an error at its end (a killed QEMU)', () => {
    expect(crashDetail('qemu-system-x86_64: -vnc unix:/x: warning: something\n')).toBeUndefined();
    const old = ['qemu-system-x86_64: error: an old run', ...Array.from({ length: 8 }, (_, i) => `line ${i}`)];
    expect(crashDetail(old.join('\n'))).toBeUndefined();
  });
});
