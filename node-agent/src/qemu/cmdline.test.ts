import { describe, expect, it } from 'vitest';
import { ZodError } from 'zod';
import { optValue, type QemuSpecInput, qemuArgs, sandboxOptions } from './cmdline.ts';

// A real QEMU started from qemuArgs: node-agent/test/integration/qemu-cmdline.test.ts.

const UUID = '6f1b2f4e-8f5c-4c1e-9c55-3c2b1e0a9d11';

const vol = (serial: string, slot: object) => ({
  serial,
  blockdev: { driver: 'qcow2', file: { driver: 'file', filename: `/v/${serial}.qcow2` } },
  slot,
});

const minimal: QemuSpecInput = {
  name: 'demo-vm1',
  uuid: UUID,
  accelerator: 'tcg',
  vcpus: 1,
  memoryMiB: 256,
  qmpSocket: '/run/stratus/g/qmp.sock',
};

describe('qemuArgs', () => {
  it('minimal TCG guest', () => {
    expect(qemuArgs(minimal)).toEqual([
      '-name',
      'guest=demo-vm1,debug-threads=on',
      '-uuid',
      UUID,
      '-machine',
      'q35,usb=off,dump-guest-core=off',
      '-accel',
      'tcg,thread=multi',
      '-cpu',
      'max',
      '-smp',
      '1,sockets=1,cores=1,threads=1',
      '-m',
      '256M',
      '-nodefaults',
      '-no-user-config',
      '-rtc',
      'base=utc',
      '-boot',
      'strict=on',
      '-msg',
      'timestamp=on',
      '-device',
      'pvpanic',
      '-action',
      'panic=pause',
      '-global',
      'ICH9-LPC.disable_s3=1',
      '-global',
      'ICH9-LPC.disable_s4=1',
      '-sandbox',
      'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny',
      '-display',
      'none',
      '-chardev',
      'socket,id=qmp,path=/run/stratus/g/qmp.sock,server=on,wait=off',
      '-mon',
      'chardev=qmp,mode=control',
      '-device',
      'virtio-rng-pci,id=rng0',
    ]);
  });

  it('full KVM guest: disks, seed cdrom, fd and ifname taps, VNC, serial log, pidfile', () => {
    const args = qemuArgs({
      name: 'ns1.web-0',
      uuid: UUID,
      accelerator: 'kvm',
      vcpus: 4,
      memoryMiB: 4096,
      qmpSocket: '/run/stratus/g/qmp.sock',
      vncSocket: '/run/stratus/g/vnc.sock',
      serial: { socket: '/run/stratus/g/serial.sock', log: '/var/lib/stratus/g/console.log' },
      pidFile: '/run/stratus/g/qemu.pid',
      disks: [
        { id: 'root', path: '/var/lib/stratus/g/root.qcow2', bootIndex: 0, serial: 'root' },
        { id: 'eph0', path: '/var/lib/stratus/g/eph0.raw', format: 'raw', cache: 'writeback', discard: false },
        { id: 'seed', path: '/var/lib/stratus/g/seed.iso', format: 'raw', media: 'cdrom' },
      ],
      nics: [
        { id: 'nic0', mac: 'FA:16:3E:00:00:01', mtu: 1450, tap: { fd: 3 }, bootIndex: 1 },
        { id: 'nic1', mac: 'fa:16:3e:00:00:02', tap: { ifname: 'stt-0123456789a' }, vhost: true, pciSlot: 0x1e },
      ],
      balloon: true,
    });
    expect(args.slice(0, 12)).toEqual([
      '-name',
      'guest=ns1.web-0,debug-threads=on',
      '-uuid',
      UUID,
      '-machine',
      'q35,usb=off,dump-guest-core=off',
      '-accel',
      'kvm',
      '-cpu',
      'host',
      '-smp',
      '4,sockets=4,cores=1,threads=1',
    ]);
    expect(args.slice(args.indexOf('-sandbox'))).toEqual([
      '-sandbox',
      'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny',
      '-pidfile',
      '/run/stratus/g/qemu.pid',
      '-display',
      'none',
      '-vnc',
      'unix:/run/stratus/g/vnc.sock',
      '-device',
      'VGA,id=video0',
      '-chardev',
      'socket,id=qmp,path=/run/stratus/g/qmp.sock,server=on,wait=off',
      '-mon',
      'chardev=qmp,mode=control',
      '-chardev',
      'socket,id=serial0,path=/run/stratus/g/serial.sock,server=on,wait=off,logfile=/var/lib/stratus/g/console.log,logappend=on',
      '-serial',
      'chardev:serial0',
      '-netdev',
      'tap,id=nic0-tap,fd=3,vhost=off',
      '-device',
      'virtio-net-pci,netdev=nic0-tap,id=nic0,mac=fa:16:3e:00:00:01,host_mtu=1450,bootindex=1',
      '-netdev',
      'tap,id=nic1-tap,ifname=stt-0123456789a,script=no,downscript=no,vhost=on',
      '-device',
      'virtio-net-pci,netdev=nic1-tap,id=nic1,mac=fa:16:3e:00:00:02,addr=0x1e,romfile=',
      '-blockdev',
      'driver=file,node-name=root-file,filename=/var/lib/stratus/g/root.qcow2,cache.direct=on,cache.no-flush=off,discard=unmap,read-only=off',
      '-blockdev',
      'driver=qcow2,node-name=root-fmt,file=root-file,cache.direct=on,cache.no-flush=off,discard=unmap,read-only=off',
      '-device',
      'virtio-blk-pci,drive=root-fmt,id=root,bootindex=0,serial=root',
      '-blockdev',
      'driver=file,node-name=eph0-file,filename=/var/lib/stratus/g/eph0.raw,cache.direct=off,cache.no-flush=off,discard=ignore,read-only=off',
      '-blockdev',
      'driver=raw,node-name=eph0-fmt,file=eph0-file,cache.direct=off,cache.no-flush=off,discard=ignore,read-only=off',
      '-device',
      'virtio-blk-pci,drive=eph0-fmt,id=eph0',
      '-blockdev',
      'driver=file,node-name=seed-file,filename=/var/lib/stratus/g/seed.iso,cache.direct=on,cache.no-flush=off,discard=ignore,read-only=on',
      '-blockdev',
      'driver=raw,node-name=seed-fmt,file=seed-file,cache.direct=on,cache.no-flush=off,discard=ignore,read-only=on',
      '-device',
      'ide-cd,bus=ide.0,drive=seed-fmt,id=seed',
      '-device',
      'virtio-rng-pci,id=rng0',
      '-device',
      'virtio-balloon-pci,id=balloon0',
    ]);
  });

  it('daemonized guest with -runas: relaxed sandbox, -daemonize after -pidfile', () => {
    const args = qemuArgs({
      ...minimal,
      daemonize: true,
      runAs: 'stratus-qemu',
      pidFile: '/run/g.pid',
      rng: false,
      guestPowerManagement: true,
      startPaused: true,
      incoming: 'defer',
    });
    expect(args).not.toContain('-global');
    expect(args).not.toContain('virtio-rng-pci,id=rng0');
    const i = args.indexOf('-sandbox');
    expect(args.slice(i, i + 7)).toEqual([
      '-sandbox',
      'on,obsolete=deny,elevateprivileges=allow,spawn=allow,resourcecontrol=deny',
      '-runas',
      'stratus-qemu',
      '-pidfile',
      '/run/g.pid',
      '-daemonize',
    ]);
    expect(args.slice(-3)).toEqual(['-S', '-incoming', 'defer']);
  });

  it('sandbox policy per supervision mode', () => {
    const base = { sandbox: true, daemonize: false, runAs: undefined };
    expect(sandboxOptions(base)).toBe('on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny');
    expect(sandboxOptions({ ...base, runAs: 'qemu' })).toBe(
      'on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny',
    );
    expect(sandboxOptions({ ...base, daemonize: true })).toBe(
      'on,obsolete=deny,elevateprivileges=allow,spawn=allow,resourcecontrol=deny',
    );
    expect(sandboxOptions({ ...base, sandbox: false })).toBeUndefined();
    expect(qemuArgs({ ...minimal, sandbox: false })).not.toContain('-sandbox');
  });

  it('passes paths verbatim (no shell quoting) and doubles commas inside option values', () => {
    const args = qemuArgs({
      ...minimal,
      qmpSocket: '/tmp/a b/q,m p.sock',
      vncSocket: "/tmp/it's/vnc.sock",
      pidFile: '/tmp/a,b/$HOME.pid',
      disks: [{ id: 'root', path: '/var/lib/my disk,1/"root".qcow2' }],
    });
    expect(args).toContain('socket,id=qmp,path=/tmp/a b/q,,m p.sock,server=on,wait=off');
    expect(args).toContain("unix:/tmp/it's/vnc.sock");
    expect(args).toContain('/tmp/a,b/$HOME.pid'); // -pidfile takes a plain path: no option parsing
    expect(args.some((a) => a.includes('filename=/var/lib/my disk,,1/"root".qcow2,'))).toBe(true);
    expect(optValue('a,b,,c')).toBe('a,,b,,,,c');
  });

  it('numbers cdroms onto successive AHCI ports', () => {
    const args = qemuArgs({
      ...minimal,
      disks: [
        { id: 'seed', path: '/s.iso', format: 'raw', media: 'cdrom' },
        { id: 'cfg', path: '/c.iso', format: 'raw', media: 'cdrom', bootIndex: 3 },
      ],
    });
    expect(args.filter((a) => a.startsWith('ide-cd'))).toEqual([
      'ide-cd,bus=ide.0,drive=seed-fmt,id=seed',
      'ide-cd,bus=ide.1,drive=cfg-fmt,id=cfg,bootindex=3',
    ]);
  });

  it('adds the scsi controller and spare root ports after every other PCI device, so existing slots never move', () => {
    const base = {
      ...minimal,
      disks: [
        { id: 'root', path: '/g/root.qcow2', bootIndex: 0 },
        { id: 'seed', path: '/g/seed.iso', format: 'raw' as const, readOnly: true },
      ],
      nics: [{ id: 'net0', mac: 'fa:16:3e:00:00:01', tap: { ifname: 'stt-a' }, pciSlot: 0x0f }],
    };
    const before = qemuArgs(base);
    const after = qemuArgs({ ...base, scsiController: true, rootPorts: 3 });
    // Everything up to the last device of the old command line is unchanged (auto-assigned slots follow the order).
    expect(after.slice(0, before.length)).toEqual(before);
    expect(after.slice(before.length)).toEqual([
      '-device',
      'virtio-scsi-pci,id=scsi0',
      '-device',
      'pcie-root-port,id=rp0,chassis=1,slot=1',
      '-device',
      'pcie-root-port,id=rp1,chassis=2,slot=2',
      '-device',
      'pcie-root-port,id=rp2,chassis=3,slot=3',
    ]);
  });

  it('attaches volumes at boot: objects, named blockdev trees, a throttle filter per volume, devices by serial', () => {
    const S1 = '0123456789abcdef0123';
    const S2 = 'fedcba98765432100000';
    const S3 = 'aaaabbbbccccdddd0000';
    const args = qemuArgs({
      ...minimal,
      disks: [{ id: 'seed', path: '/g/seed.iso', format: 'raw', readOnly: true }],
      scsiController: true,
      rootPorts: 4,
      volumes: [
        {
          serial: S1,
          blockdev: { driver: 'qcow2', file: { driver: 'file', filename: '/v/1.qcow2' } },
          slot: { bus: 'virtio', port: 'pcie.0' },
          bootIndex: 0,
        },
        {
          serial: S2,
          blockdev: { driver: 'raw', file: { driver: 'nbd', server: { type: 'inet', host: 'h', port: '10809' } } },
          objects: [{ 'qom-type': 'tls-creds-psk', id: `tls${S2}`, endpoint: 'client', dir: '/p' }],
          cache: 'writeback',
          qos: { totalBytesSec: 1048576, readIopsSec: 100 },
          slot: { bus: 'virtio', port: 1 },
        },
        {
          serial: S3,
          blockdev: { driver: 'qcow2', file: { driver: 'file', filename: '/v/3.qcow2' } },
          readOnly: true,
          slot: { bus: 'scsi', scsiId: 2 },
        },
      ],
    });
    const zero = {
      'iops-total': 0,
      'iops-total-max': 0,
      'iops-read': 0,
      'iops-read-max': 0,
      'iops-write': 0,
      'iops-write-max': 0,
      'bps-total': 0,
      'bps-total-max': 0,
      'bps-read': 0,
      'bps-read-max': 0,
      'bps-write': 0,
      'bps-write-max': 0,
      'iops-size': 0,
    };
    const i = args.indexOf('-object');
    const json = (k: number) => JSON.parse(args[k]!) as unknown;
    // The root volume comes first (before the other disks, on pcie.0, bootindex 0), then the seed.
    expect(json(i + 1)).toEqual({ 'qom-type': 'throttle-group', id: `tg${S1}`, limits: zero });
    expect(json(i + 3)).toEqual({
      driver: 'qcow2',
      'node-name': `v${S1}`,
      'read-only': false,
      discard: 'unmap',
      file: {
        driver: 'file',
        filename: '/v/1.qcow2',
        'node-name': `v${S1}-f`,
        'read-only': false,
        cache: { direct: true, 'no-flush': false },
        discard: 'unmap',
      },
    });
    expect(json(i + 5)).toEqual({
      driver: 'throttle',
      'node-name': `v${S1}-t`,
      'throttle-group': `tg${S1}`,
      file: `v${S1}`,
      'read-only': false,
    });
    expect(args.slice(i + 6, i + 8)).toEqual([
      '-device',
      `virtio-blk-pci,id=d${S1},drive=v${S1}-t,serial=${S1},bootindex=0`,
    ]);
    expect(args[i + 9]).toContain('node-name=seed-file');
    // After the controller and the ports: the nbd volume (its psk object first, then its group with the QoS) ...
    const rest = args.slice(args.indexOf('pcie-root-port,id=rp3,chassis=4,slot=4') + 1);
    expect(rest[0]).toBe('-object');
    expect(JSON.parse(rest[1]!)).toEqual({
      'qom-type': 'tls-creds-psk',
      id: `tls${S2}`,
      endpoint: 'client',
      dir: '/p',
    });
    expect(JSON.parse(rest[3]!)).toEqual({
      'qom-type': 'throttle-group',
      id: `tg${S2}`,
      limits: { ...zero, 'bps-total': 1048576, 'iops-read': 100 },
    });
    // ... no cache options on a network protocol node ...
    expect(JSON.parse(rest[5]!)).toMatchObject({
      'node-name': `v${S2}`,
      file: { driver: 'nbd', 'node-name': `v${S2}-f` },
    });
    expect(JSON.parse(rest[5]!).file).not.toHaveProperty('cache');
    expect(rest[9]).toBe(`virtio-blk-pci,id=d${S2},drive=v${S2}-t,bus=rp1,serial=${S2}`);
    // ... and the read-only scsi volume on scsi0.0 with its scsi-id.
    expect(JSON.parse(rest[13]!)).toMatchObject({ 'node-name': `v${S3}`, 'read-only': true });
    expect(JSON.parse(rest[13]!)).not.toHaveProperty('discard');
    expect(JSON.parse(rest[15]!)).toMatchObject({ 'node-name': `v${S3}-t`, 'read-only': true });
    expect(rest.slice(16)).toEqual([
      '-device',
      `scsi-hd,id=d${S3},drive=v${S3}-t,bus=scsi0.0,channel=0,scsi-id=2,lun=0,serial=${S3}`,
    ]);
  });

  it.each([
    ['relative path', { qmpSocket: 'qmp.sock' }],
    ['newline in a path', { qmpSocket: '/tmp/a\nb' }],
    ['bad name', { name: 'a,b' }],
    ['bad uuid', { uuid: 'nope' }],
    ['zero vcpus', { vcpus: 0 }],
    ['bad accelerator', { accelerator: 'hvf' }],
    ['daemonize without pidFile', { daemonize: true }],
    [
      'duplicate ids',
      { disks: [{ id: 'a', path: '/a' }], nics: [{ id: 'a', mac: 'fa:16:3e:00:00:01', tap: { fd: 3 } }] },
    ],
    [
      'duplicate boot index',
      {
        disks: [
          { id: 'a', path: '/a', bootIndex: 0 },
          { id: 'b', path: '/b', bootIndex: 0 },
        ],
      },
    ],
    [
      'duplicate mac',
      {
        nics: [
          { id: 'a', mac: 'fa:16:3e:00:00:01', tap: { fd: 3 } },
          { id: 'b', mac: 'FA:16:3E:00:00:01', tap: { fd: 4 } },
        ],
      },
    ],
    ['fd below 3', { nics: [{ id: 'a', mac: 'fa:16:3e:00:00:01', tap: { fd: 1 } }] }],
    ['both fd and ifname', { nics: [{ id: 'a', mac: 'fa:16:3e:00:00:01', tap: { fd: 3, ifname: 'x' } }] }],
    ['ifname too long', { nics: [{ id: 'a', mac: 'fa:16:3e:00:00:01', tap: { ifname: 'kvt-0123456789ab' } }] }],
    [
      'duplicate pciSlot',
      {
        nics: [
          { id: 'a', mac: 'fa:16:3e:00:00:01', tap: { ifname: 'stt-a' }, pciSlot: 16 },
          { id: 'b', mac: 'fa:16:3e:00:00:02', tap: { ifname: 'stt-b' }, pciSlot: 16 },
        ],
      },
    ],
    ['pciSlot of the ICH9 functions', { nics: [{ id: 'a', mac: 'fa:16:3e:00:00:01', tap: { fd: 3 }, pciSlot: 0x1f }] }],
    ['bad incoming', { incoming: 'exec:cat state' }],
    ['uppercase id', { disks: [{ id: 'Root', path: '/a' }] }],
    ['a volume on a port that does not exist', { rootPorts: 1, volumes: [vol('aa', { bus: 'virtio', port: 1 })] }],
    [
      'two volumes on one port',
      { rootPorts: 2, volumes: [vol('aa', { bus: 'virtio', port: 0 }), vol('bb', { bus: 'virtio', port: 0 })] },
    ],
    ['a scsi volume without the controller', { volumes: [vol('aa', { bus: 'scsi', scsiId: 0 })] }],
    [
      'two volumes on one scsi-id',
      {
        scsiController: true,
        volumes: [vol('aa', { bus: 'scsi', scsiId: 0 }), vol('bb', { bus: 'scsi', scsiId: 0 })],
      },
    ],
    [
      'one serial twice',
      { scsiController: true, volumes: [vol('aa', { bus: 'scsi', scsiId: 0 }), vol('aa', { bus: 'scsi', scsiId: 1 })] },
    ],
    ['a serial that is no node name', { scsiController: true, volumes: [vol('AB-1', { bus: 'scsi', scsiId: 0 })] }],
    ['more PCI devices than pcie.0 has slots', { rootPorts: 30 }],
  ])('rejects %s', (_what, patch) => {
    expect(() => qemuArgs({ ...minimal, ...patch } as QemuSpecInput)).toThrow(ZodError);
  });
});
