// The QEMU command line of a guest, as a pure function of a small typed spec (QEMU 7.2, qemu-system-x86_64).
// The result is an argv array for execFile/spawn: nothing is ever passed through a shell. Values inside QEMU's
// "key=value,key=value" option strings have their commas doubled (QEMU's own escape), so paths with commas work.
//
// Decisions (verified against QEMU 7.2 on the development machines):
//  - Supervision: both `daemonize: false` (default) and `daemonize: true` are supported. Without -daemonize
//    the spawner owns the process; to survive agent restarts it must spawn it detached (own session, stdio to
//    files, unref) in a cgroup the agent's restart does not kill. With -daemonize QEMU forks after init and the
//    parent exits (0 = guest initialised), so the guest is never the agent's child; -pidfile then names it.
//    The catch: the seccomp sandbox is installed before the daemonize fork, so -daemonize is incompatible with
//    spawn=deny (QEMU dies with SIGSYS) and with elevateprivileges=deny|children (setsid is denied: exit 1).
//    -runas is incompatible with elevateprivileges=deny|children too (SIGSYS). sandboxOptions() relaxes exactly
//    those; the full sandbox needs daemonize=false and no runAs (drop privileges in the spawner: uid/gid).
//  - Crashes: a pvpanic device with -action panic=pause, so a guest kernel panic is seen (status guest-panicked)
//    rather than turned into a reboot; the driver then records it and ends QEMU.
//  - No -no-shutdown: a guest poweroff makes QEMU exit (SHUTDOWN event with guest=true, then exit 0), which
//    frees the guest's memory and lets the supervisor see the shutdown as a process exit. Guest reboots stay
//    inside the process (RESET event).
//  - ACPI S3/S4: QEMU 7.2's q35 advertises both to the guest by default (ICH9-LPC disable_s3=0, disable_s4=0,
//    read back with qom-get). A guest could then suspend itself into 'suspended' (only system_wakeup resumes
//    it) or hibernate (QEMU exits). Both are off unless guestPowerManagement is set; Nova's suspend is a
//    save-to-file instead (README.md of this directory).
//  - NICs: vhost=off unless asked for (no vhost-net on the development kernel). A NIC with a pciSlot sits at that
//    fixed slot of pcie.0 (its guest-visible PCI path and so its predictable interface name never move when disks are
//    added or removed); NICs are emitted before the disks so that the auto-assigned slots of the other devices skip
//    them. A NIC without bootIndex gets no option ROM (romfile=): guests boot from disk, and SeaBIOS under TCG then
//    neither loads iPXE nor waits on it.
//  - Disks use -blockdev with explicit node names: a file (protocol) node "<id>-file" under a format node
//    "<id>-fmt", attached by a device with id "<id>". cache=none is cache.direct=on (O_DIRECT: not on tmpfs),
//    writeback is cache.direct=off; both keep flushes (cache.no-flush=off).
//  - Volumes (Cinder) and hot-plug (qemu/volumes.ts): a virtio-scsi controller `scsi0` and `rootPorts` spare
//    pcie-root-ports `rp<n>` come after every other PCI device (rng, balloon), so the slots pcie.0 assigns to the
//    disks and the NICs' fixed slots never move when they are added or their number changes. Each volume is
//    `-object`s (its connection's, then the throttle group), its `-blockdev` tree and throttle filter (JSON), and a
//    device on a root port or scsi0.0; a virtio boot volume (the root disk) sits on pcie.0 where the root disk was.
import { z } from 'zod';
import {
  rootPortId,
  SCSI_CONTROLLER,
  SERIAL_RE,
  throttleBlockdev,
  throttleGroupObject,
  type VolumeSlot,
  volumeBlockdev,
  volumeDevice,
} from './volumes.ts';

const SAFE_PATH = /^\/[^\0\n\r]*$/;
const absPath = (what: string) => z.string().max(4096).regex(SAFE_PATH, `${what} must be an absolute path`);

/** QEMU ids/node-names: a letter, then letters, digits, '-' (we add suffixes, so keep them short). */
const QemuId = z.string().regex(/^[a-z][a-z0-9-]{0,22}$/, 'id: a lower-case letter, then [a-z0-9-], at most 23');

const MacAddress = z
  .string()
  .regex(/^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$/, 'mac must look like fa:16:3e:00:00:01')
  .transform((s) => s.toLowerCase());

export const DiskSpec = z.object({
  /** Device id; node names derive from it. */
  id: QemuId,
  path: absPath('disk path'),
  format: z.enum(['qcow2', 'raw']).default('qcow2'),
  /** disk: virtio-blk-pci; cdrom: ide-cd on the q35 AHCI controller (always read-only). */
  media: z.enum(['disk', 'cdrom']).default('disk'),
  readOnly: z.boolean().default(false),
  cache: z.enum(['none', 'writeback']).default('none'),
  /** Pass guest discards (TRIM) down to the image (discard=unmap). */
  discard: z.boolean().default(true),
  bootIndex: z.int().min(0).max(99).optional(),
  /** virtio-blk serial (visible in /dev/disk/by-id), at most 20 characters. */
  serial: z
    .string()
    .regex(/^[A-Za-z0-9_.-]{1,20}$/)
    .optional(),
});
export type DiskSpec = z.infer<typeof DiskSpec>;

export const NicSpec = z.object({
  id: QemuId,
  mac: MacAddress,
  /** Guest MTU advertised by virtio-net (host_mtu); match the tap/bridge MTU. */
  mtu: z.int().min(68).max(65535).optional(),
  /** The tap: an open fd inherited by QEMU (made by the agent), or a persistent tap QEMU opens by name. */
  tap: z.union([
    z.object({ fd: z.int().min(3).max(65535) }).strict(),
    z.object({ ifname: z.string().regex(/^[A-Za-z0-9_.-]{1,15}$/, 'ifname: 1-15 characters [A-Za-z0-9_.-]') }).strict(),
  ]),
  bootIndex: z.int().min(0).max(99).optional(),
  /** Use the kernel's vhost-net for the tap (needs /dev/vhost-net). Default off. */
  vhost: z.boolean().default(false),
  /** Fixed slot on the q35 root bus (pcie.0): 2-0x1e (0 is the host bridge, 0x1f the ICH9 functions). */
  pciSlot: z.int().min(2).max(0x1e).optional(),
});
export type NicSpec = z.infer<typeof NicSpec>;

/** A volume attached at boot (see qemu/volumes.ts for the graph and names). */
export const VolumeSpec = z.object({
  serial: z.string().regex(SERIAL_RE, 'serial: 1-20 of [a-z0-9]'),
  /** The connection's blockdev tree, without node names. */
  blockdev: z.record(z.string(), z.unknown()),
  /** QOM objects the tree refers to (each with qom-type and id). */
  objects: z.array(z.record(z.string(), z.unknown())).default([]),
  readOnly: z.boolean().default(false),
  cache: z.enum(['none', 'writeback']).default('none'),
  /** Cinder QoS (driver.ts VolumeQos); absent: unlimited. */
  qos: z.record(z.string(), z.number().min(0)).optional(),
  slot: z.union([
    z.object({ bus: z.literal('virtio'), port: z.union([z.int().min(0).max(29), z.literal('pcie.0')]) }).strict(),
    z.object({ bus: z.literal('scsi'), scsiId: z.int().min(0).max(255) }).strict(),
  ]),
  bootIndex: z.int().min(0).max(99).optional(),
});
export type VolumeSpec = z.infer<typeof VolumeSpec>;

export const QemuSpec = z
  .object({
    /** Guest name (-name guest=…), shown in ps and thread names. */
    name: z.string().regex(/^[A-Za-z0-9_.:-]{1,128}$/, 'name: 1-128 characters [A-Za-z0-9_.:-]'),
    /** SMBIOS system UUID; use the Server uid. */
    uuid: z.uuid(),
    accelerator: z.enum(['kvm', 'tcg']),
    /** -cpu value. Default: host with KVM, max with TCG (max enables x86-64-v2+ features that RHEL 9 needs). */
    cpuModel: z
      .string()
      .regex(/^[A-Za-z0-9_.-]+(,[+-]?[A-Za-z0-9_.=-]+)*$/)
      .optional(),
    vcpus: z.int().min(1).max(255),
    memoryMiB: z
      .int()
      .min(16)
      .max(16 * 1024 * 1024),
    /** QMP monitor socket (QEMU listens). */
    qmpSocket: absPath('qmpSocket'),
    /** VNC server on a UNIX socket (adds a VGA adapter). Omit for no display at all. */
    vncSocket: absPath('vncSocket').optional(),
    /** First serial port: a socket for interactive access plus a log file that survives reconnects. */
    serial: z
      .object({ socket: absPath('serial.socket'), log: absPath('serial.log') })
      .strict()
      .optional(),
    pidFile: absPath('pidFile').optional(),
    daemonize: z.boolean().default(false),
    /** -runas <user>: QEMU drops to this user after init. Prefer spawning as that user (keeps the full sandbox). */
    /** -runas: a user name or uid:gid (QEMU 7.2 takes both). */
    runAs: z
      .string()
      .regex(/^([a-z_][a-z0-9_-]{0,31}|\d+:\d+)$/)
      .optional(),
    /** seccomp sandbox (-sandbox on,…); see sandboxOptions(). */
    sandbox: z.boolean().default(true),
    disks: z.array(DiskSpec).max(16).default([]),
    nics: z.array(NicSpec).max(16).default([]),
    /** Volumes attached at boot. */
    volumes: z.array(VolumeSpec).max(64).default([]),
    /** The virtio-scsi controller scsi0 (scsi volumes, hot-plug without guest help). */
    scsiController: z.boolean().default(false),
    /** Spare pcie-root-ports rp0..rp<n-1> (virtio volumes at boot and hot-plug). */
    rootPorts: z.int().min(0).max(30).default(0),
    /** virtio-rng-pci (builtin backend: QEMU's getrandom). */
    rng: z.boolean().default(true),
    balloon: z.boolean().default(false),
    /** Let the guest see ACPI S3/S4 (suspend to RAM / hibernate). Off by default. */
    guestPowerManagement: z.boolean().default(false),
    /** Start with the vCPUs stopped (-S): QEMU waits for QMP cont. */
    startPaused: z.boolean().default(false),
    /** Restore a saved state: 'defer' (then QMP migrate-incoming), 'fd:<n>' (inherited fd) or 'unix:<path>'. */
    incoming: z
      .string()
      .regex(/^(defer|fd:\d+|unix:\/[^\0\n\r]*)$/)
      .optional(),
  })
  .superRefine((s, ctx) => {
    const ids = new Set<string>();
    for (const [kind, list] of [
      ['disks', s.disks],
      ['nics', s.nics],
    ] as const) {
      list.forEach((d, i) => {
        if (ids.has(d.id)) ctx.addIssue({ code: 'custom', path: [kind, i, 'id'], message: `duplicate id ${d.id}` });
        ids.add(d.id);
      });
    }
    const boot = new Set<number>();
    for (const [kind, list] of [
      ['disks', s.disks],
      ['nics', s.nics],
      ['volumes', s.volumes],
    ] as const) {
      list.forEach((d, i) => {
        if (d.bootIndex === undefined) return;
        if (boot.has(d.bootIndex)) {
          ctx.addIssue({ code: 'custom', path: [kind, i, 'bootIndex'], message: `duplicate bootIndex ${d.bootIndex}` });
        }
        boot.add(d.bootIndex);
      });
    }
    const macs = new Set<string>();
    s.nics.forEach((n, i) => {
      if (macs.has(n.mac))
        ctx.addIssue({ code: 'custom', path: ['nics', i, 'mac'], message: `duplicate mac ${n.mac}` });
      macs.add(n.mac);
    });
    const slots = new Set<number>();
    s.nics.forEach((n, i) => {
      if (n.pciSlot === undefined) return;
      if (slots.has(n.pciSlot)) {
        ctx.addIssue({ code: 'custom', path: ['nics', i, 'pciSlot'], message: `duplicate pciSlot ${n.pciSlot}` });
      }
      slots.add(n.pciSlot);
    });
    const fds = new Set<number>();
    s.nics.forEach((n, i) => {
      if (!('fd' in n.tap)) return;
      if (fds.has(n.tap.fd)) ctx.addIssue({ code: 'custom', path: ['nics', i, 'tap', 'fd'], message: 'duplicate fd' });
      fds.add(n.tap.fd);
    });
    const serials = new Set<string>();
    const ports = new Set<number | string>();
    const scsiIds = new Set<number>();
    s.volumes.forEach((v, i) => {
      const at = (message: string) => ctx.addIssue({ code: 'custom', path: ['volumes', i], message });
      if (serials.has(v.serial)) at(`duplicate volume serial ${v.serial}`);
      serials.add(v.serial);
      if (v.slot.bus === 'virtio') {
        if (ports.has(v.slot.port)) at(`port ${v.slot.port} used twice`);
        ports.add(v.slot.port);
        if (v.slot.port !== 'pcie.0' && v.slot.port >= s.rootPorts) at(`no root port rp${v.slot.port}`);
      } else {
        if (!s.scsiController) at('a scsi volume needs the scsi controller');
        if (scsiIds.has(v.slot.scsiId)) at(`scsi-id ${v.slot.scsiId} used twice`);
        scsiIds.add(v.slot.scsiId);
      }
    });
    // pcie.0 has 30 usable slots (1-0x1e; 0 is the host bridge, 0x1f the ICH9 functions).
    const slotsUsed =
      (s.vncSocket ? 1 : 0) +
      s.disks.filter((d) => d.media === 'disk').length +
      s.nics.length +
      (s.rng ? 1 : 0) +
      (s.balloon ? 1 : 0) +
      (s.scsiController ? 1 : 0) +
      s.rootPorts +
      s.volumes.filter((v) => v.slot.bus === 'virtio' && v.slot.port === 'pcie.0').length;
    if (slotsUsed > 30) {
      ctx.addIssue({ code: 'custom', path: ['rootPorts'], message: `${slotsUsed} PCI devices do not fit pcie.0 (30)` });
    }
    const cdroms = s.disks.filter((d) => d.media === 'cdrom').length;
    if (cdroms > 6) ctx.addIssue({ code: 'custom', path: ['disks'], message: 'at most 6 cdroms (q35 AHCI ports)' });
    if (s.daemonize && !s.pidFile) {
      ctx.addIssue({ code: 'custom', path: ['pidFile'], message: 'daemonize needs a pidFile to find the guest' });
    }
  });
export type QemuSpec = z.infer<typeof QemuSpec>;
export type QemuSpecInput = z.input<typeof QemuSpec>;

/** Escape a value for QEMU's "k=v,k=v" option syntax: commas are doubled. */
export function optValue(v: string): string {
  return v.replaceAll(',', ',,');
}

/** Join key/value pairs (undefined values dropped) into a QEMU option string. */
function opts(first: string | undefined, pairs: [string, string | number | undefined][]): string {
  const parts = first === undefined ? [] : [first];
  for (const [k, v] of pairs) if (v !== undefined) parts.push(`${k}=${typeof v === 'number' ? v : optValue(v)}`);
  return parts.join(',');
}

const onOff = (b: boolean) => (b ? 'on' : 'off');

/**
 * The -sandbox option for a spec, or undefined when the sandbox is off. QEMU 7.2 installs the seccomp filter
 * before it daemonizes or drops privileges, so: spawn=deny only without daemonize (the fork), and
 * elevateprivileges=deny only without daemonize (setsid) and without runAs (setuid/setgid).
 */
export function sandboxOptions(spec: Pick<QemuSpec, 'sandbox' | 'daemonize' | 'runAs'>): string | undefined {
  if (!spec.sandbox) return undefined;
  const elevate = !spec.daemonize && spec.runAs === undefined ? 'deny' : 'allow';
  const spawn = spec.daemonize ? 'allow' : 'deny';
  return `on,obsolete=deny,elevateprivileges=${elevate},spawn=${spawn},resourcecontrol=deny`;
}

/** argv (without the binary) for qemu-system-x86_64. Validates the spec; throws a ZodError if invalid. */
export function qemuArgs(input: QemuSpecInput): string[] {
  const spec = QemuSpec.parse(input);
  const a: string[] = [];
  const cpu = spec.cpuModel ?? (spec.accelerator === 'kvm' ? 'host' : 'max');

  a.push(
    '-name',
    opts(undefined, [
      ['guest', spec.name],
      ['debug-threads', 'on'],
    ]),
  );
  a.push('-uuid', spec.uuid);
  a.push('-machine', 'q35,usb=off,dump-guest-core=off');
  a.push('-accel', spec.accelerator === 'kvm' ? 'kvm' : 'tcg,thread=multi');
  a.push('-cpu', cpu);
  a.push('-smp', `${spec.vcpus},sockets=${spec.vcpus},cores=1,threads=1`);
  a.push('-m', `${spec.memoryMiB}M`);
  a.push('-nodefaults', '-no-user-config');
  a.push('-rtc', 'base=utc');
  a.push('-boot', 'strict=on');
  a.push('-msg', 'timestamp=on');
  // A guest kernel panic (pvpanic, ACPI QEMU0001) stops the VM in 'guest-panicked' with QEMU alive instead of a
  // silent reboot: the driver records the fault, ends QEMU and reports the crash (as for a KVM internal error).
  a.push('-device', 'pvpanic', '-action', 'panic=pause');
  if (!spec.guestPowerManagement) {
    a.push('-global', 'ICH9-LPC.disable_s3=1', '-global', 'ICH9-LPC.disable_s4=1');
  }
  const sandbox = sandboxOptions(spec);
  if (sandbox) a.push('-sandbox', sandbox);
  if (spec.runAs) a.push('-runas', spec.runAs);
  if (spec.pidFile) a.push('-pidfile', spec.pidFile);
  if (spec.daemonize) a.push('-daemonize');

  a.push('-display', 'none');
  if (spec.vncSocket) {
    a.push('-vnc', `unix:${optValue(spec.vncSocket)}`);
    a.push('-device', 'VGA,id=video0');
  }
  a.push(
    '-chardev',
    opts('socket', [
      ['id', 'qmp'],
      ['path', spec.qmpSocket],
      ['server', 'on'],
      ['wait', 'off'],
    ]),
    '-mon',
    'chardev=qmp,mode=control',
  );
  if (spec.serial) {
    a.push(
      '-chardev',
      opts('socket', [
        ['id', 'serial0'],
        ['path', spec.serial.socket],
        ['server', 'on'],
        ['wait', 'off'],
        ['logfile', spec.serial.log],
        ['logappend', 'on'],
      ]),
      '-serial',
      'chardev:serial0',
    );
  }

  for (const n of spec.nics) {
    const tap: [string, string | number][] =
      'fd' in n.tap
        ? [['fd', n.tap.fd]]
        : [
            ['ifname', n.tap.ifname],
            ['script', 'no'],
            ['downscript', 'no'],
          ];
    a.push('-netdev', opts('tap', [['id', `${n.id}-tap`], ...tap, ['vhost', onOff(n.vhost)]]));
    a.push(
      '-device',
      opts('virtio-net-pci', [
        ['netdev', `${n.id}-tap`],
        ['id', n.id],
        ['mac', n.mac],
        ['host_mtu', n.mtu],
        ['addr', n.pciSlot === undefined ? undefined : `0x${n.pciSlot.toString(16)}`],
        ['bootindex', n.bootIndex],
        ['romfile', n.bootIndex === undefined ? '' : undefined],
      ]),
    );
  }

  const volumeDevices = (list: VolumeSpec[]) => {
    for (const v of list) {
      for (const o of v.objects) a.push('-object', JSON.stringify(o));
      a.push('-object', JSON.stringify(throttleGroupObject(v.serial, v.qos)));
      a.push('-blockdev', JSON.stringify(volumeBlockdev({ ...v, readOnly: v.readOnly }, v.cache)));
      a.push('-blockdev', JSON.stringify(throttleBlockdev(v.serial, v.readOnly)));
      const dev = volumeDevice(v.serial, v.slot as VolumeSlot, v.bootIndex);
      const { driver, ...props } = dev;
      a.push('-device', opts(String(driver), Object.entries(props) as [string, string | number][]));
    }
  };
  const onRoot = (v: VolumeSpec) => v.slot.bus === 'virtio' && v.slot.port === 'pcie.0';
  volumeDevices(spec.volumes.filter(onRoot));

  let ahciPort = 0;
  for (const d of spec.disks) {
    const readOnly = d.readOnly || d.media === 'cdrom';
    const cache: [string, string][] = [
      ['cache.direct', onOff(d.cache === 'none')],
      ['cache.no-flush', 'off'],
    ];
    const discard: [string, string] = ['discard', d.discard && !readOnly ? 'unmap' : 'ignore'];
    a.push(
      '-blockdev',
      opts(undefined, [
        ['driver', 'file'],
        ['node-name', `${d.id}-file`],
        ['filename', d.path],
        ...cache,
        discard,
        ['read-only', onOff(readOnly)],
      ]),
    );
    a.push(
      '-blockdev',
      opts(undefined, [
        ['driver', d.format],
        ['node-name', `${d.id}-fmt`],
        ['file', `${d.id}-file`],
        ...cache,
        discard,
        ['read-only', onOff(readOnly)],
      ]),
    );
    if (d.media === 'cdrom') {
      a.push(
        '-device',
        opts('ide-cd', [
          ['bus', `ide.${ahciPort++}`],
          ['drive', `${d.id}-fmt`],
          ['id', d.id],
          ['bootindex', d.bootIndex],
        ]),
      );
    } else {
      a.push(
        '-device',
        opts('virtio-blk-pci', [
          ['drive', `${d.id}-fmt`],
          ['id', d.id],
          ['bootindex', d.bootIndex],
          ['serial', d.serial],
        ]),
      );
    }
  }

  if (spec.rng) a.push('-device', 'virtio-rng-pci,id=rng0');
  if (spec.balloon) a.push('-device', 'virtio-balloon-pci,id=balloon0');
  if (spec.scsiController) a.push('-device', `virtio-scsi-pci,id=${SCSI_CONTROLLER}`);
  for (let i = 0; i < spec.rootPorts; i++) {
    a.push('-device', `pcie-root-port,id=${rootPortId(i)},chassis=${i + 1},slot=${i + 1}`);
  }
  volumeDevices(spec.volumes.filter((v) => !onRoot(v)));
  if (spec.startPaused) a.push('-S');
  if (spec.incoming) a.push('-incoming', spec.incoming);
  return a;
}
