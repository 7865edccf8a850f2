import { describe, expect, it } from 'vitest';
import { ZodError } from 'zod';
import { optValue, type QemuSpecInput, qemuArgs, sandboxOptions } from './cmdline.ts';

// A real QEMU started from qemuArgs: node-agent/test/integration/qemu-cmdline.test.ts.

const UUID = '6f1b2f4e-8f5c-4c1e-9c55-3c2b1e0a9d11';

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
  ])('rejects %s', (_what, patch) => {
    expect(() => qemuArgs({ ...minimal, ...patch } as QemuSpecInput)).toThrow(ZodError);
  });
});
