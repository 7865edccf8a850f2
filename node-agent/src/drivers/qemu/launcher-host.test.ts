// Unit tests of guest placement (docs/design/guest-placement.md): the host launcher's argv, host discovery on fake
// /proc data, cgroup paths from mountinfo samples, the runtime bundle's file list, --launcher=auto.
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { bundleArgv, bundleFiles, bundleOfCmdline, collectBundles, parseDataDirs, parseLddOutput } from './bundle.ts';
import {
  agentPath,
  cgroupMounts,
  createGuestCgroups,
  guestCgroups,
  memoryLimitBytes,
  pruneGuestCgroups,
} from './cgroups.ts';
import { chooseLauncher, findHostNs, hostRootOf, nsenterHost, type ProcNs, parseStatPpid } from './hostns.ts';
import { resetFailedArgv, systemdRunArgv } from './launcher.ts';
import { CGROUP_WRAPPER, hostArgv } from './launcher-host.ts';
import { isGuestCmdline } from './proc.ts';

const A = '3f6a1c2e-8b4d-4e7f-9a1b-2c3d4e5f6a7b';
const STALE_ID = '0badcafe-0000-4000-8000-000000000001';
const BUNDLE = `/var/lib/stratus/runtime/${'ab'.repeat(32)}`;

/** This machine's mountinfo (cgroup v1 hybrid, controllers mounted separately, hugetlb on the unified mount). */
const HYBRID = `22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
`;

const V2_ONLY = `24 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
`;

describe('host launcher argv', () => {
  const procs = [
    '/sys/fs/cgroup/memory/stratus-guests/x/cgroup.procs',
    '/sys/fs/cgroup/unified/stratus-guests/x/cgroup.procs',
  ];

  it('enters the host namespaces of the host pid, then the wrapper, then the command', () => {
    const argv = hostArgv({ hostPid: 4242, dir: '/g', procsFiles: procs, command: ['qemu', '-uuid', A] });
    expect(argv).toEqual([
      'nsenter',
      '-t',
      '4242',
      '-m',
      '-u',
      '-i',
      '-C',
      '--',
      '/bin/sh',
      '-c',
      CGROUP_WRAPPER,
      'sh',
      '/g',
      ...procs,
      '--',
      'qemu',
      '-uuid',
      A,
    ]);
    // A network namespace is entered by its file; never -p (hostPID) nor -n without a name.
    const withNs = hostArgv({ hostPid: 7, netns: 'e2en1', dir: '/g', procsFiles: [], command: ['q'] });
    expect(withNs.slice(0, withNs.indexOf('--'))).toEqual([
      'nsenter',
      '-t',
      '7',
      '-m',
      '-u',
      '-i',
      '-C',
      '--net=/run/netns/e2en1',
    ]);
    expect(withNs).not.toContain('-p');
    expect(() => hostArgv({ netns: '../x', dir: '/g', procsFiles: [], command: ['q'] })).toThrow(
      /invalid network namespace/,
    );
  });

  it('needs no nsenter on the host itself', () => {
    expect(hostArgv({ dir: '/g', procsFiles: procs, command: ['q', '-x'] })).toEqual([
      '/bin/sh',
      '-c',
      CGROUP_WRAPPER,
      'sh',
      '/g',
      ...procs,
      '--',
      'q',
      '-x',
    ]);
    expect(hostArgv({ netns: 'n1', dir: '/g', procsFiles: [], command: ['q'] }).slice(0, 3)).toEqual([
      'nsenter',
      '--net=/run/netns/n1',
      '--',
    ]);
  });

  it('keeps the wrapper a constant: no argument is interpolated into the script', () => {
    const argv = hostArgv({ hostPid: 9, dir: '/g; rm -rf /', procsFiles: ['$(x)'], command: ['`y`'] });
    expect(argv[argv.indexOf('-c') + 1]).toBe(CGROUP_WRAPPER);
    expect(CGROUP_WRAPPER).toContain('exec "$@"');
    expect(nsenterHost(9)).toEqual(['-t', '9', '-m', '-u', '-i', '-C']);
    expect(() => nsenterHost(0)).toThrow(/invalid host pid/);
  });

  it('runs the bundle through its own loader, and adoption still recognises that QEMU', () => {
    const q = bundleArgv({ dir: BUNDLE }, ['-name', 'guest=demo:web-1', '-uuid', A, '-pidfile', '/g/qemu.pid']);
    expect(q.argv.slice(0, 8)).toEqual([
      `${BUNDLE}/lib64/ld-linux-x86-64.so.2`,
      '--library-path',
      `${BUNDLE}/lib`,
      '--argv0',
      'qemu-system-x86_64',
      `${BUNDLE}/bin/qemu-system-x86_64`,
      '-L',
      `${BUNDLE}/share/qemu`,
    ]);
    expect(q.env).toEqual({ QEMU_MODULE_DIR: `${BUNDLE}/lib/x86_64-linux-gnu/qemu` });
    // /proc/<pid>/cmdline of such a QEMU is the loader's full command line (ld.so does not rewrite it).
    expect(isGuestCmdline(q.argv, A)).toBe(true);
    expect(isGuestCmdline(q.argv, '00000000-0000-0000-0000-000000000000')).toBe(false);
    expect(bundleOfCmdline(q.argv, '/var/lib/stratus/runtime')).toBe('ab'.repeat(32));
    expect(bundleOfCmdline(q.argv, '/var/lib/stratus/runtime/')).toBe('ab'.repeat(32));
    expect(bundleOfCmdline(['qemu-system-x86_64', '-uuid', A], '/var/lib/stratus/runtime')).toBeUndefined();
  });

  it('systemd: nsenter into the found host pid, QEMU from the bundle from a container', () => {
    const req = {
      id: A,
      name: 'w',
      namespace: 'd',
      binary: 'qemu-system-x86_64',
      args: ['-uuid', A],
      dir: '/g',
      logFile: '/g/l',
    };
    const argv = systemdRunArgv(req, { nsenter: true, hostPid: 812, bundle: { dir: BUNDLE } });
    expect(argv.slice(0, 8)).toEqual(['nsenter', '-t', '812', '-m', '-u', '-i', '-p', '--']);
    expect(argv).toContain(`--setenv=QEMU_MODULE_DIR=${BUNDLE}/lib/x86_64-linux-gnu/qemu`);
    expect(argv.slice(argv.lastIndexOf('--') + 1)).toEqual(bundleArgv({ dir: BUNDLE }, req.args).argv);
    expect(argv.some((a) => a.startsWith('--property=MemoryMax'))).toBe(false);
    expect(systemdRunArgv({ ...req, memoryMiB: 1024, accelerator: 'kvm' }, { nsenter: false })).toContain(
      `--property=MemoryMax=${memoryLimitBytes(1024, 'kvm')}`,
    );
    expect(resetFailedArgv(A, true, 812).slice(0, 3)).toEqual(['nsenter', '-t', '812']);
    expect(resetFailedArgv(A, true).slice(0, 3)).toEqual(['nsenter', '-t', '1']);
  });
});

/** A fake /proc: mount namespace and parent of each pid. */
function fakeProc(t: Record<string, { ns?: string; ppid?: number }>): ProcNs {
  return {
    mountNs: async (pid) => t[String(pid)]?.ns,
    ppid: async (pid) => t[String(pid)]?.ppid,
  };
}

describe('host discovery', () => {
  it('uses PID 1 when its mount namespace can be read', async () => {
    expect(await findHostNs(fakeProc({ self: { ns: 'mnt:[2]', ppid: 50 }, 1: { ns: 'mnt:[1]' } }))).toEqual({
      pid: 1,
      inContainer: true,
    });
    expect(await findHostNs(fakeProc({ self: { ns: 'mnt:[1]', ppid: 50 }, 1: { ns: 'mnt:[1]' } }))).toEqual({
      inContainer: false,
    });
  });

  it('walks up to the container shim when PID 1 refuses (these VMs)', async () => {
    const proc = fakeProc({
      self: { ns: 'mnt:[9]', ppid: 300 },
      1: {}, // Permission denied
      300: { ns: 'mnt:[9]', ppid: 200 }, // the container's init (same mount namespace)
      200: { ns: 'mnt:[1]', ppid: 1 }, // containerd-shim, on the host
    });
    const h = await findHostNs(proc);
    expect(h).toEqual({ pid: 200, inContainer: true });
    expect(hostRootOf(h)).toBe('/proc/200/root');
  });

  it('is not in a container when no ancestor differs (an agent run on the host)', async () => {
    const proc = fakeProc({
      self: { ns: 'mnt:[1]', ppid: 20 },
      1: {},
      20: { ns: 'mnt:[1]', ppid: 10 },
      10: { ns: 'mnt:[1]', ppid: 1 },
    });
    const h = await findHostNs(proc);
    expect(h).toEqual({ inContainer: false });
    expect(hostRootOf(h)).toBe('');
  });

  it('takes --host-mount-ns-pid as given', async () => {
    const proc = fakeProc({ self: { ns: 'mnt:[9]', ppid: 2 }, 1: { ns: 'mnt:[9]' }, 77: { ns: 'mnt:[1]' } });
    expect(await findHostNs(proc, 77)).toEqual({ pid: 77, inContainer: true });
    await expect(findHostNs(proc, 78)).rejects.toThrow(/--host-mount-ns-pid 78/);
  });

  it('reads the parent from /proc/<pid>/stat whatever the command name', () => {
    expect(parseStatPpid('1234 (containerd-shim) S 1 1234 1234 0 -1 4194560 …')).toBe(1);
    expect(parseStatPpid('55 (a) b) (c) R 42 55 55 0')).toBe(42);
    expect(parseStatPpid('')).toBeUndefined();
  });

  it('auto: systemd on a systemd host, host from a container, direct otherwise', () => {
    expect(chooseLauncher({ requested: 'auto', hostSystemd: true, inContainer: true })).toBe('systemd');
    expect(chooseLauncher({ requested: 'auto', hostSystemd: true, inContainer: false })).toBe('systemd');
    expect(chooseLauncher({ requested: 'auto', hostSystemd: false, inContainer: true })).toBe('host');
    expect(chooseLauncher({ requested: 'auto', hostSystemd: false, inContainer: false })).toBe('direct');
    expect(chooseLauncher({ requested: 'host', hostSystemd: true, inContainer: false })).toBe('host');
  });
});

describe('guest cgroups', () => {
  it('one directory per hierarchy of a v1 hybrid host, the unified one included', () => {
    const mounts = cgroupMounts(HYBRID);
    expect(mounts.map((m) => m.mountPoint)).toEqual([
      '/sys/fs/cgroup/cpu',
      '/sys/fs/cgroup/cpuacct',
      '/sys/fs/cgroup/cpuset',
      '/sys/fs/cgroup/memory',
      '/sys/fs/cgroup/devices',
      '/sys/fs/cgroup/freezer',
      '/sys/fs/cgroup/blkio',
      '/sys/fs/cgroup/pids',
      '/sys/fs/cgroup/systemd',
      '/sys/fs/cgroup/unified',
    ]);
    expect(mounts.find((m) => m.mountPoint.endsWith('systemd'))!.controllers).toEqual(['name=systemd']);
    expect(mounts.at(-1)).toEqual({ mountPoint: '/sys/fs/cgroup/unified', version: 2, controllers: [] });
    // The chart's mount of the host's /sys/fs/cgroup.
    const cgs = guestCgroups(mounts, { hostCgroupRoot: '/host/sys/fs/cgroup' }, A);
    expect(cgs.find((c) => c.mount.controllers.includes('memory'))).toMatchObject({
      hostDir: `/sys/fs/cgroup/memory/stratus-guests/${A}`,
      agentDir: `/host/sys/fs/cgroup/memory/stratus-guests/${A}`,
    });
    expect(cgs).toHaveLength(10);
    // No mount: through the host process' root.
    expect(guestCgroups(mounts, { hostRoot: '/proc/200/root' }, A)[0]!.agentDir).toBe(
      `/proc/200/root/sys/fs/cgroup/cpu/stratus-guests/${A}`,
    );
    expect(guestCgroups(mounts, {}, A)[0]!.agentDir).toBe(`/sys/fs/cgroup/cpu/stratus-guests/${A}`);
  });

  it('one path on a cgroup v2-only host', () => {
    const mounts = cgroupMounts(V2_ONLY);
    expect(mounts).toEqual([{ mountPoint: '/sys/fs/cgroup', version: 2, controllers: [] }]);
    expect(guestCgroups(mounts, { hostCgroupRoot: '/host/cgroup' }, A)).toEqual([
      { mount: mounts[0], hostDir: `/sys/fs/cgroup/stratus-guests/${A}`, agentDir: `/host/cgroup/stratus-guests/${A}` },
    ]);
  });

  it("ignores a container's bind of its own sub-cgroup and a second mount of a hierarchy", () => {
    const text = `${HYBRID}50 31 0:32 /kubepods/pod1 /run/x rw - cgroup cgroup rw,memory
51 31 0:29 / /mnt/cpu-again rw - cgroup cgroup rw,cpu
52 31 0:99 / /weird\\040dir rw - cgroup cgroup rw,pids,release_agent=/x
`;
    const mounts = cgroupMounts(text);
    expect(mounts.map((m) => m.mountPoint)).not.toContain('/run/x');
    expect(mounts.map((m) => m.mountPoint)).not.toContain('/mnt/cpu-again');
    expect(mounts.at(-1)).toEqual({ mountPoint: '/weird dir', version: 1, controllers: ['pids'] });
    // Outside /sys/fs/cgroup, a --host-cgroup-root mount cannot reach it: left out.
    expect(agentPath({ hostCgroupRoot: '/host/cg' }, '/weird dir')).toBeUndefined();
    expect(() => guestCgroups(mounts, {}, '../x')).toThrow(/invalid guest id/);
  });

  it('limits memory to the guest RAM plus QEMU overhead (plus TCG translation cache)', () => {
    const MiB = 1024 ** 2;
    expect(memoryLimitBytes(2048, 'kvm')).toBe((2048 + 256 + 64) * MiB);
    expect(memoryLimitBytes(2048, 'tcg')).toBe((2048 + 256 + 64 + 1024) * MiB);
    expect(memoryLimitBytes(100)).toBe((100 + 256 + 4) * MiB);
  });
});

describe('runtime bundle', () => {
  const LDD = `	linux-vdso.so.1 (0x00007ffd4b3f2000)
	libpixman-1.so.0 => /lib/x86_64-linux-gnu/libpixman-1.so.0 (0x00007f8d47f55000)
	libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f8d491ca000)
	libgone.so.3 => not found
	libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f8d47400000)
	/lib64/ld-linux-x86-64.so.2 (0x00007f8d49232000)
`;

  it('reads libraries, the loader and missing names from ld.so --list (ldd) output', () => {
    expect(parseLddOutput(LDD)).toEqual({
      libraries: [
        '/lib/x86_64-linux-gnu/libpixman-1.so.0',
        '/lib/x86_64-linux-gnu/libz.so.1',
        '/lib/x86_64-linux-gnu/libc.so.6',
      ],
      loader: '/lib64/ld-linux-x86-64.so.2',
      missing: ['libgone.so.3'],
    });
    expect(parseLddOutput('\tstatically linked\n')).toEqual({ libraries: [], missing: [] });
  });

  it('reads the data directories of -L help', () => {
    expect(parseDataDirs('/usr/bin/../share/qemu\n/usr/bin/../share/seabios\n/usr/bin/../lib/ipxe/qemu\n')).toEqual([
      '/usr/share/qemu',
      '/usr/share/seabios',
      '/usr/lib/ipxe/qemu',
    ]);
  });

  it('lays files out like the install prefix, libraries flat, the loader in lib64', () => {
    const files = bundleFiles({
      binary: '/usr/bin/qemu-system-x86_64',
      loader: '/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2',
      libraries: ['/lib/x86_64-linux-gnu/libz.so.1', '/usr/lib/x86_64-linux-gnu/libz.so.1'],
      modules: { dir: '/usr/lib/x86_64-linux-gnu/qemu', files: ['/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so'] },
      data: [
        { dir: '/usr/share/qemu', files: ['/usr/share/qemu/kvmvapic.bin', '/usr/share/qemu/keymaps/en-us'] },
        { dir: '/usr/share/seabios', files: ['/usr/share/seabios/bios-256k.bin'] },
        { dir: '/opt/elsewhere', files: ['/opt/elsewhere/x.rom'] },
      ],
    });
    expect(files).toEqual([
      { path: 'bin/qemu-system-x86_64', source: '/usr/bin/qemu-system-x86_64' },
      { path: 'lib/libz.so.1', source: '/lib/x86_64-linux-gnu/libz.so.1' },
      {
        path: 'lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so',
        source: '/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so',
      },
      { path: 'lib64/ld-linux-x86-64.so.2', source: '/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2' },
      { path: 'share/qemu/keymaps/en-us', source: '/usr/share/qemu/keymaps/en-us' },
      { path: 'share/qemu/kvmvapic.bin', source: '/usr/share/qemu/kvmvapic.bin' },
      { path: 'share/seabios/bios-256k.bin', source: '/usr/share/seabios/bios-256k.bin' },
    ]);
  });
});

describe('on disk (a fake cgroup tree and runtime directory)', () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'stratus-place-'));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('makes the guest cgroups with the parent cpuset and the memory limit, and prunes the empty ones', async () => {
    const root = join(dir, 'cg');
    for (const h of ['cpuset', 'memory', 'unified']) await mkdir(join(root, h), { recursive: true });
    await writeFile(join(root, 'cpuset', 'cpuset.cpus'), '0-1\n');
    await writeFile(join(root, 'cpuset', 'cpuset.mems'), '0\n');
    // A new v1 cpuset comes with empty cpuset files; plain directories do not, so they are made empty here.
    for (const d of ['stratus-guests', `stratus-guests/${A}`]) {
      await mkdir(join(root, 'cpuset', d), { recursive: true });
      for (const f of ['cpuset.cpus', 'cpuset.mems']) await writeFile(join(root, 'cpuset', d, f), '');
    }
    const mounts = cgroupMounts(HYBRID).filter((m) => /cpuset|memory|unified/.test(m.mountPoint));
    const cgs = guestCgroups(mounts, { hostCgroupRoot: root }, A);
    await createGuestCgroups(cgs, memoryLimitBytes(512, 'kvm'));
    expect(await readFile(join(root, 'cpuset', 'stratus-guests', A, 'cpuset.cpus'), 'utf8')).toBe('0-1');
    expect(await readFile(join(root, 'cpuset', 'stratus-guests', 'cpuset.mems'), 'utf8')).toBe('0');
    expect(await readFile(join(root, 'memory', 'stratus-guests', A, 'memory.limit_in_bytes'), 'utf8')).toBe(
      String(memoryLimitBytes(512, 'kvm')),
    );
    // The unified hierarchy of a hybrid host has no memory controller: no limit there.
    expect(await readdir(join(root, 'unified', 'stratus-guests', A))).toEqual([]);
    // Prune: a busy cgroup (here: not empty) stays, an empty one goes.
    const stale = join(root, 'unified', 'stratus-guests', STALE_ID);
    await mkdir(stale);
    const pruned = await pruneGuestCgroups(mounts, { hostCgroupRoot: root });
    expect(pruned).toContain(stale);
    expect(pruned).toContain(join(root, 'unified', 'stratus-guests', A));
    expect(pruned).not.toContain(join(root, 'memory', 'stratus-guests', A));
  });

  it('removes bundles no running process uses, keeps the current one and the ones in use', async () => {
    const runtime = join(dir, 'runtime');
    const [cur, old, unused] = ['aa', 'bb', 'cc'].map((x) => x.repeat(32));
    for (const n of [cur, old, unused, '.tmp-123', 'notes']) await mkdir(join(runtime, n!), { recursive: true });
    const removed = await collectBundles({
      runtimeDir: runtime,
      keep: cur!,
      cmdlines: async () => [
        [`${runtime}/${old}/lib64/ld-linux-x86-64.so.2`, '--library-path', `${runtime}/${old}/lib`, '-uuid', A],
        ['bash'],
      ],
    });
    expect(removed.sort()).toEqual(['.tmp-123', unused].sort());
    expect((await readdir(runtime)).sort()).toEqual([cur, old, 'notes'].sort());
  });
});
