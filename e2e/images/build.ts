// Builds the tiny bootable test guest image (qcow2, BIOS/syslinux, Debian cloud kernel + busybox initramfs) from
// Debian packages, deterministically, and caches it outside the clone:
//   ${STRATUS_CACHE_DIR:-~/.cache/stratus}/images/stratus-test-<key>.qcow2
// key = sha256 over the .deb files (name + SHA256 from apt), the host tool versions that shape the bytes, this
// script, cpio.ts and guest/*. No loop devices or mounts: the FAT partition is made with mkfs.vfat -C on a file,
// filled with mtools, made bootable with `syslinux --install`, then placed after an sfdisk-written MBR.
//
// CLI: node e2e/images/build.ts [--force] [--cache-dir DIR] [--verify-determinism]
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, mkdtemp, open, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync, constants as zc } from 'node:zlib';
import { exists, PrerequisiteError, pidAlive, run, which, withLock } from '../controlplane/util.ts';
import { type CpioEntry, cpioNewc } from './cpio.ts';

export interface TestImage {
  path: string;
  sha256: string;
  sha512: string;
  /** Bytes of the qcow2 file. */
  size: number;
  /** Bytes of the virtual disk. */
  virtualSize: number;
  format: 'qcow2';
  /**
   * The image's kernel as a separate file (stratus-test-<key>.vmlinuz beside the image): what the node agents of the
   * e2e tier, the demo and the boot benchmark boot their KVM probe with (--kvm-probe-kernel).
   */
  kernel: string;
}

/** The kernel file kept beside a cached image. */
export function kernelPathOf(image: string): string {
  return image.replace(/\.qcow2$/, '.vmlinuz');
}

export interface BuildOptions {
  /** Defaults to ${STRATUS_CACHE_DIR:-~/.cache/stratus}. */
  cacheDir?: string;
  /** Where the .debs are kept; defaults to <cacheDir>/debs. */
  debDir?: string;
  /** Rebuild even when the cached image exists. */
  force?: boolean;
  log?: (msg: string) => void;
}

const here = path.dirname(fileURLToPath(import.meta.url));
const guestDir = path.join(here, 'guest');

/** Bump to invalidate every cached image when the layout changes in a way the hashed files do not show. */
const FORMAT = 'stratus-test-image/1';
const KERNEL_META = 'linux-image-cloud-amd64';
const BUSYBOX = 'busybox-static';
/** Host packages whose versions shape the image bytes (syslinux embeds ldlinux.sys; qemu-img writes the qcow2). */
const HOST_PACKAGES = ['dosfstools', 'fdisk', 'mtools', 'qemu-utils', 'syslinux', 'syslinux-common'];
const SYSLINUX_MBR = '/usr/lib/syslinux/mbr/mbr.bin';
/** Every FAT timestamp (mtools honours SOURCE_DATE_EPOCH): 2024-01-01T00:00:00Z. FAT cannot store 1970. */
const SOURCE_DATE_EPOCH = '1704067200';
const VOLUME_ID = '53545254'; // "STRT"
const DISK_ID = '0x53545254';
const PART_START_SECTORS = 2048;
/** Cached images kept (the newest ones); older ones are removed after a build. */
const KEEP_IMAGES = 3;
const KERNEL_CMDLINE = 'console=ttyS0,115200 panic=-1 random.trust_cpu=on';

/**
 * Modules the init loads when the cloud kernel has them as modules (builtins are skipped); dependencies are added
 * from each .ko's modinfo and the list is written in load order.
 */
const MODULE_ROOTS = [
  'virtio_pci', // virtio devices on PCI (q35)
  'virtio_blk', // root disk and seed disk
  'virtio_net',
  'virtio_scsi', // a seed attached as a SCSI CD-ROM
  'sr_mod',
  'sd_mod', // SCSI disks: volumes attached on the scsi bus
  'isofs', // NoCloud / config-drive ISO9660 seed
  'vfat', // NoCloud vfat seed
  'nls_cp437', // vfat's default codepage and iocharset
  'nls_ascii',
  'button', // ACPI power button -> KEY_POWER input events
  'evdev', // /dev/input/event* for the power-button watcher
  'pvpanic_mmio', // reports a kernel panic to QEMU's pvpanic device (the driver's crash handling)
];

export function cacheRoot(): string {
  return path.resolve(process.env.STRATUS_CACHE_DIR || path.join(os.homedir(), '.cache', 'stratus'));
}

interface Deb {
  package: string;
  filename: string;
  size: number;
  sha256: string;
}

const APT_HINT = 'run `npm run setup` (installs the build tools and runs apt-get update) or `apt-get update` as root';

/**
 * A fingerprint of apt's view of the archive (package lists and sources): while it is unchanged, the last resolution
 * is reused, because each apt-cache/apt-get call costs about a second here (no pkgcache.bin).
 */
async function aptFingerprint(): Promise<string> {
  const h = createHash('sha256');
  for (const dir of ['/var/lib/apt/lists', '/etc/apt', '/etc/apt/sources.list.d', '/etc/apt/preferences.d']) {
    let names: string[];
    try {
      names = (await readdir(dir)).sort();
    } catch {
      continue;
    }
    for (const name of names) {
      if (name === 'lock' || name === 'partial') continue;
      const st = await stat(path.join(dir, name)).catch(() => undefined);
      if (st?.isFile()) h.update(`${dir}/${name}\0${st.size}\0${st.mtimeMs}\n`);
    }
  }
  return h.digest('hex');
}

/** resolveDebs(), memoised in <images>/apt-resolution.json against aptFingerprint(). */
async function resolveDebsCached(imagesDir: string): Promise<Deb[]> {
  const memo = path.join(imagesDir, 'apt-resolution.json');
  const fingerprint = await aptFingerprint();
  try {
    const saved = JSON.parse(await readFile(memo, 'utf8')) as { fingerprint?: string; debs?: Deb[] };
    if (saved.fingerprint === fingerprint && Array.isArray(saved.debs) && saved.debs.length > 0) return saved.debs;
  } catch {
    // no memo yet
  }
  const debs = await resolveDebs();
  await mkdir(imagesDir, { recursive: true });
  const tmp = `${memo}.${process.pid}.tmp`;
  await writeFile(tmp, `${JSON.stringify({ fingerprint, debs }, null, 2)}\n`);
  await rename(tmp, memo);
  return debs;
}

/** The exact .deb files apt would download now (kernel meta-package resolved to its image package). */
async function resolveDebs(): Promise<Deb[]> {
  if (!(await which('apt-get')) || !(await which('apt-cache'))) {
    throw new PrerequisiteError('apt-get/apt-cache not found: the test image is built from Debian packages');
  }
  let kernelPkg: string | undefined;
  try {
    const { stdout } = await run('apt-cache', ['show', '--no-all-versions', KERNEL_META]);
    kernelPkg = /^Depends:.*?\b(linux-image-[0-9][^\s,(]*)/m.exec(stdout)?.[1];
  } catch (err) {
    throw new PrerequisiteError(`apt-cache show ${KERNEL_META} failed (${APT_HINT}): ${(err as Error).message}`);
  }
  if (!kernelPkg) throw new Error(`cannot find the kernel image package that ${KERNEL_META} depends on`);
  // --print-uris skips files that exist in the working directory, so run it in an empty one.
  const empty = await mkdtemp(path.join(os.tmpdir(), 'stratus-apt-'));
  try {
    const { stdout } = await run('apt-get', ['download', '--print-uris', kernelPkg, BUSYBOX], { cwd: empty });
    const debs: Deb[] = [];
    for (const line of stdout.split('\n')) {
      const m = /^'[^']+' (\S+) (\d+) SHA256:([0-9a-f]{64})$/.exec(line.trim());
      if (!m) continue;
      const filename = m[1]!;
      debs.push({ package: filename.split('_')[0]!, filename, size: Number(m[2]), sha256: m[3]! });
    }
    for (const want of [kernelPkg, BUSYBOX]) {
      if (!debs.some((d) => d.package === want)) throw new Error(`apt-get download --print-uris: no ${want}`);
    }
    return debs.sort((a, b) => a.package.localeCompare(b.package));
  } catch (err) {
    if (err instanceof PrerequisiteError) throw err;
    throw new PrerequisiteError(`cannot resolve ${kernelPkg} and ${BUSYBOX} (${APT_HINT}): ${(err as Error).message}`);
  } finally {
    await rm(empty, { recursive: true, force: true });
  }
}

async function hostToolVersions(): Promise<string> {
  for (const tool of ['mkfs.vfat', 'mcopy', 'syslinux', 'sfdisk', 'qemu-img', 'dpkg-deb']) {
    if (!(await which(tool)) && !(await exists(`/usr/sbin/${tool}`)) && !(await exists(`/sbin/${tool}`))) {
      throw new PrerequisiteError(
        `${tool} not found: run \`npm run setup\` (Debian packages ${HOST_PACKAGES.join(', ')})`,
      );
    }
  }
  if (!(await exists(SYSLINUX_MBR))) throw new PrerequisiteError(`${SYSLINUX_MBR} not found: install syslinux-common`);
  // biome-ignore lint/suspicious/noTemplateCurlyInString: a dpkg-query format string, not a template
  const { stdout } = await run('dpkg-query', ['-W', '-f=${Package}=${Version}\n', ...HOST_PACKAGES]);
  return stdout;
}

async function guestFiles(): Promise<Map<string, Buffer>> {
  const files = new Map<string, Buffer>();
  for (const name of (await readdir(guestDir)).sort()) files.set(name, await readFile(path.join(guestDir, name)));
  return files;
}

function computeKey(debs: Deb[], hostVersions: string, sources: Map<string, Buffer>): string {
  const h = createHash('sha256');
  const field = (label: string, value: string | Buffer) => {
    h.update(`${label}\0${value.length}\0`);
    h.update(value);
  };
  field('format', FORMAT);
  for (const d of debs) field(`deb:${d.filename}`, d.sha256);
  field('host', hostVersions);
  field('zlib', process.versions.zlib ?? '');
  for (const [name, data] of sources) field(`src:${name}`, data);
  return h.digest('hex').slice(0, 16);
}

/** Downloads (or reuses) the .debs in <cache>/debs, verified against apt's SHA256. */
async function fetchDebs(debs: Deb[], debDir: string, log: (m: string) => void): Promise<string[]> {
  await mkdir(debDir, { recursive: true });
  const missing = [];
  for (const d of debs) {
    const p = path.join(debDir, d.filename);
    if (!(await exists(p)) || (await fileHash(p, 'sha256')) !== d.sha256) missing.push(d);
  }
  if (missing.length > 0) {
    log(`apt-get download ${missing.map((d) => d.package).join(' ')}`);
    const dl = await mkdtemp(path.join(debDir, '.dl-'));
    try {
      await run('apt-get', ['download', '-q', '-o', 'APT::Sandbox::User=root', ...missing.map((d) => d.package)], {
        cwd: dl,
        timeoutMs: 600_000,
      });
      for (const d of missing) {
        const got = path.join(dl, d.filename);
        const sum = await fileHash(got, 'sha256');
        if (sum !== d.sha256) throw new Error(`${d.filename}: sha256 ${sum}, apt said ${d.sha256}`);
        await rename(got, path.join(debDir, d.filename));
      }
    } finally {
      await rm(dl, { recursive: true, force: true });
    }
  }
  return debs.map((d) => path.join(debDir, d.filename));
}

export function fileHash(file: string, algo: 'sha256' | 'sha512'): Promise<string> {
  return new Promise((resolve, reject) => {
    const h = createHash(algo);
    createReadStream(file)
      .on('data', (chunk) => h.update(chunk))
      .on('error', reject)
      .on('end', () => resolve(h.digest('hex')));
  });
}

/** Path, checksums and sizes of a qcow2 file (virtual size from its header). */
export async function describeImage(file: string): Promise<TestImage> {
  const fh = await open(file, 'r');
  let virtualSize: number;
  try {
    const head = Buffer.alloc(32);
    await fh.read(head, 0, 32, 0);
    if (head.readUInt32BE(0) !== 0x514649fb) throw new Error(`${file} is not a qcow2 image`);
    virtualSize = Number(head.readBigUInt64BE(24));
  } finally {
    await fh.close();
  }
  const [sha256, sha512, st] = await Promise.all([fileHash(file, 'sha256'), fileHash(file, 'sha512'), stat(file)]);
  return { path: file, sha256, sha512, size: st.size, virtualSize, format: 'qcow2', kernel: kernelPathOf(file) };
}

/** The modinfo `depends=` list of a .ko file. */
function moduleDepends(ko: Buffer): string[] {
  let at = 0;
  for (;;) {
    const i = ko.indexOf('depends=', at, 'latin1');
    if (i < 0) return [];
    if (i === 0 || ko[i - 1] === 0) {
      const end = ko.indexOf(0, i);
      const list = ko.toString('latin1', i + 'depends='.length, end);
      return list ? list.split(',') : [];
    }
    at = i + 1;
  }
}

const modName = (file: string) => path.basename(file, '.ko').replaceAll('-', '_');

async function walk(dir: string, out: string[] = []): Promise<string[]> {
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) await walk(p, out);
    else out.push(p);
  }
  return out;
}

/** Resolves MODULE_ROOTS to .ko files in load order (dependencies first), skipping builtins. */
async function selectModules(modDir: string): Promise<{ name: string; data: Buffer }[]> {
  const builtin = new Set(
    (await readFile(path.join(modDir, 'modules.builtin'), 'utf8'))
      .split('\n')
      .filter(Boolean)
      .map((l) => modName(l)),
  );
  const files = new Map<string, string>();
  for (const f of await walk(path.join(modDir, 'kernel'))) if (f.endsWith('.ko')) files.set(modName(f), f);
  const order: { name: string; data: Buffer }[] = [];
  const seen = new Set<string>();
  const visit = async (name: string, chain: string[]) => {
    if (seen.has(name) || builtin.has(name)) return;
    if (chain.includes(name)) throw new Error(`module dependency cycle: ${[...chain, name].join(' -> ')}`);
    const file = files.get(name);
    if (!file) throw new Error(`kernel module ${name} is neither built in nor in ${modDir}`);
    const data = await readFile(file);
    for (const dep of moduleDepends(data).sort()) await visit(dep, [...chain, name]);
    seen.add(name);
    order.push({ name, data });
  };
  for (const root of MODULE_ROOTS) await visit(root, []);
  return order;
}

async function initramfs(kernelRoot: string, busyboxRoot: string, sources: Map<string, Buffer>): Promise<Buffer> {
  const [modVersion] = await readdir(path.join(kernelRoot, 'lib', 'modules'));
  if (!modVersion) throw new Error('no lib/modules/<version> in the kernel package');
  const modules = await selectModules(path.join(kernelRoot, 'lib', 'modules', modVersion));
  const busybox = path.join(busyboxRoot, 'bin', 'busybox');
  const applets = (await run(busybox, ['--list-full'])).stdout.split('\n').filter(Boolean);
  const src = (name: string) => {
    const data = sources.get(name);
    if (!data) throw new Error(`missing ${path.join(guestDir, name)}`);
    return data;
  };
  const entries: CpioEntry[] = [];
  const dirs = new Set<string>();
  const dir = (p: string, mode = 0o755) => {
    for (let d = p; d !== '.' && !dirs.has(d); d = path.dirname(d)) {
      dirs.add(d);
      entries.push({ path: d, type: 'dir', mode: d === 'tmp' ? 0o1777 : d === 'root' ? 0o700 : mode });
    }
  };
  for (const d of ['bin', 'dev', 'etc/stratus', 'lib/modules', 'mnt', 'proc', 'root', 'run', 'sbin', 'sys', 'tmp']) {
    dir(d);
  }
  for (const d of ['usr/bin', 'usr/sbin', 'var/log']) dir(d);
  entries.push({ path: 'dev/console', type: 'char', mode: 0o600, major: 5, minor: 1 });
  entries.push({ path: 'bin/busybox', type: 'file', mode: 0o755, data: await readFile(busybox) });
  for (const a of applets) {
    const rel = a.replace(/^\/+/, '');
    if (rel === 'bin/busybox' || rel === 'linuxrc') continue;
    dir(path.dirname(rel));
    entries.push({ path: rel, type: 'symlink', target: '/bin/busybox' });
  }
  entries.push({ path: 'init', type: 'file', mode: 0o755, data: src('init') });
  entries.push({ path: 'etc/inittab', type: 'file', data: src('inittab') });
  entries.push({ path: 'etc/stratus/yaml.awk', type: 'file', data: src('yaml.awk') });
  entries.push({ path: 'etc/stratus/udhcpc.script', type: 'file', mode: 0o755, data: src('udhcpc.script') });
  entries.push({ path: 'etc/passwd', type: 'file', data: 'root:x:0:0:root:/root:/bin/sh\n' });
  entries.push({ path: 'etc/group', type: 'file', data: 'root:x:0:\ntty:x:5:\n' });
  entries.push({ path: 'etc/shadow', type: 'file', mode: 0o600, data: 'root:*:19723:0:99999:7:::\n' });
  entries.push({
    path: 'etc/os-release',
    type: 'file',
    data: 'NAME="Stratus test guest"\nID=stratus-test\nPRETTY_NAME="Stratus test guest (busybox)"\n',
  });
  for (const m of modules) entries.push({ path: `lib/modules/${m.name}.ko`, type: 'file', data: m.data });
  entries.push({ path: 'lib/modules/load.list', type: 'file', data: `${modules.map((m) => m.name).join('\n')}\n` });
  return gzipSync(cpioNewc(entries), { level: zc.Z_BEST_COMPRESSION });
}

const MiB = 1024 * 1024;

/** Builds the raw disk: MBR (syslinux mbr.bin + one bootable FAT16 partition at 1 MiB) holding kernel + initramfs. */
async function buildDisk(work: string, kernel: Buffer, initrd: Buffer, log: (m: string) => void): Promise<string> {
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    SOURCE_DATE_EPOCH,
    TZ: 'UTC',
    LC_ALL: 'C',
    MTOOLS_SKIP_CHECK: '1',
    MTOOLSRC: '/dev/null',
  };
  const cfg = [
    'SERIAL 0 115200',
    'DEFAULT stratus',
    'PROMPT 0',
    'TIMEOUT 0',
    'LABEL stratus',
    '  LINUX /vmlinuz',
    '  INITRD /initrd.img',
    `  APPEND ${KERNEL_CMDLINE}`,
    '',
  ].join('\n');
  const files: [string, Buffer | string][] = [
    ['syslinux.cfg', cfg],
    ['vmlinuz', kernel],
    ['initrd.img', initrd],
  ];
  for (const [name, data] of files) await writeFile(path.join(work, name), data);
  // FAT16 with room to spare, in whole MiB so the partition stays aligned.
  const partMiB = Math.max(32, Math.ceil((kernel.length + initrd.length) / MiB) + 8);
  const part = path.join(work, 'part.img');
  log(`mkfs.vfat ${partMiB} MiB; syslinux; mcopy`);
  await run(
    'mkfs.vfat',
    ['--invariant', '-F', '16', '-i', VOLUME_ID, '-n', 'STRATUSBOOT', '-h', String(PART_START_SECTORS)].concat([
      '-C',
      part,
      String(partMiB * 1024),
    ]),
    { env },
  );
  await run('syslinux', ['--install', part], { env });
  await run('mcopy', ['-i', part, ...files.map(([name]) => path.join(work, name)), '::/'], { env });
  const disk = path.join(work, 'disk.raw');
  const diskBytes = PART_START_SECTORS * 512 + partMiB * MiB;
  const fh = await open(disk, 'w');
  try {
    await fh.truncate(diskBytes);
  } finally {
    await fh.close();
  }
  const layout = [
    'label: dos',
    `label-id: ${DISK_ID}`,
    'unit: sectors',
    '',
    `start=${PART_START_SECTORS}, size=${partMiB * 2048}, type=e, bootable`,
    '',
  ].join('\n');
  await run('sfdisk', ['--no-reread', '--no-tell-kernel', '--quiet', disk], { env, input: layout });
  const out = await open(disk, 'r+');
  try {
    const mbr = await readFile(SYSLINUX_MBR);
    if (mbr.length > 440) throw new Error(`${SYSLINUX_MBR} is ${mbr.length} bytes (> 440)`);
    await out.write(mbr, 0, mbr.length, 0);
    const partData = await readFile(part);
    await out.write(partData, 0, partData.length, PART_START_SECTORS * 512);
  } finally {
    await out.close();
  }
  return disk;
}

async function build(debFiles: string[], sources: Map<string, Buffer>, dest: string, log: (m: string) => void) {
  // Work directories of builds that died (killed mid-way) are removed; the pid in the name tells whose it is.
  for (const name of await readdir(path.dirname(dest))) {
    const pid = /^\.work-(\d+)-/.exec(name)?.[1];
    if (pid && !(await pidAlive(Number(pid))))
      await rm(path.join(path.dirname(dest), name), { recursive: true, force: true });
  }
  const work = await mkdtemp(path.join(path.dirname(dest), `.work-${process.pid}-`));
  try {
    const kernelRoot = path.join(work, 'kernel');
    const busyboxRoot = path.join(work, 'busybox');
    for (const deb of debFiles) {
      const root = path.basename(deb).startsWith(`${BUSYBOX}_`) ? busyboxRoot : kernelRoot;
      await run('dpkg-deb', ['-x', deb, root], { timeoutMs: 300_000 });
    }
    const vmlinuz = (await readdir(path.join(kernelRoot, 'boot'))).find((f) => f.startsWith('vmlinuz-'));
    if (!vmlinuz) throw new Error('no boot/vmlinuz-* in the kernel package');
    log(`initramfs (${vmlinuz})`);
    const initrd = await initramfs(kernelRoot, busyboxRoot, sources);
    const kernel = await readFile(path.join(kernelRoot, 'boot', vmlinuz));
    const disk = await buildDisk(work, kernel, initrd, log);
    const tmpOut = path.join(work, 'out.qcow2');
    log('qemu-img convert -O qcow2');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'compat=1.1', disk, tmpOut]);
    // The kernel first: an image on disk always has its kernel beside it.
    await writeFile(path.join(work, 'vmlinuz'), kernel);
    await rename(path.join(work, 'vmlinuz'), kernelPathOf(dest));
    await rename(tmpOut, dest);
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/** Returns the cached test image, building it first when it is missing (or `force`). */
export async function ensureTestImage(opts: BuildOptions = {}): Promise<TestImage> {
  const log = opts.log ?? (() => {});
  const cache = opts.cacheDir ? path.resolve(opts.cacheDir) : cacheRoot();
  const imagesDir = path.join(cache, 'images');
  const debDir = opts.debDir ? path.resolve(opts.debDir) : path.join(cache, 'debs');
  for (let attempt = 1; ; attempt++) {
    const [debs, hostVersions, sources] = await Promise.all([
      resolveDebsCached(imagesDir),
      hostToolVersions(),
      guestFiles(),
    ]);
    sources.set('build.ts', await readFile(fileURLToPath(import.meta.url)));
    sources.set('cpio.ts', await readFile(path.join(here, 'cpio.ts')));
    const key = computeKey(debs, hostVersions, sources);
    const dest = path.join(imagesDir, `stratus-test-${key}.qcow2`);
    if (!opts.force && (await exists(dest)) && (await exists(kernelPathOf(dest)))) return describeImage(dest);
    await mkdir(imagesDir, { recursive: true });
    let debFiles: string[];
    try {
      debFiles = await fetchDebs(debs, debDir, log);
    } catch (err) {
      // Stale package lists: the archive has moved on (e.g. a kernel security update removed the old .deb).
      if (attempt > 1 || process.getuid?.() !== 0) {
        throw new PrerequisiteError(
          `downloading ${debs.map((d) => d.filename).join(', ')} failed (${APT_HINT}): ${err}`,
        );
      }
      log('download failed: apt-get update, then resolve again');
      await run('apt-get', ['update', '-q'], { timeoutMs: 600_000 });
      continue;
    }
    await withLock(
      path.join(imagesDir, `.stratus-test-${key}.lock`),
      300_000,
      async () => {
        if (!opts.force && (await exists(dest)) && (await exists(kernelPathOf(dest)))) return;
        const started = Date.now();
        log(`building ${dest}`);
        await build(debFiles, sources, dest, log);
        log(`built in ${((Date.now() - started) / 1000).toFixed(1)} s`);
        await prune(imagesDir, debDir, dest, debs, log);
      },
      (holder) => log(`waiting for pid ${holder}, which is building the same image`),
    );
    return describeImage(dest);
  }
}

/** Keeps the KEEP_IMAGES newest images (always the current one) and only the .debs the current build uses. */
async function prune(imagesDir: string, debDir: string, current: string, debs: Deb[], log: (m: string) => void) {
  const images = [];
  for (const name of await readdir(imagesDir)) {
    if (!/^stratus-test-[0-9a-f]+\.qcow2$/.test(name)) continue;
    const p = path.join(imagesDir, name);
    if (p !== current) images.push({ p, mtime: (await stat(p)).mtimeMs });
  }
  images.sort((a, b) => b.mtime - a.mtime);
  for (const old of images.slice(KEEP_IMAGES - 1)) {
    log(`removing old ${path.basename(old.p)}`);
    await rm(old.p, { force: true });
    await rm(kernelPathOf(old.p), { force: true });
  }
  const wanted = new Set(debs.map((d) => d.filename));
  for (const name of await readdir(debDir).catch(() => [] as string[])) {
    if (name.endsWith('.deb') && !wanted.has(name)) await rm(path.join(debDir, name), { force: true });
  }
}

async function main(argv: string[]): Promise<void> {
  const force = argv.includes('--force');
  const verify = argv.includes('--verify-determinism');
  const cacheAt = argv.indexOf('--cache-dir');
  const cacheDir = cacheAt >= 0 ? argv[cacheAt + 1] : undefined;
  const log = (m: string) => process.stderr.write(`[image] ${m}\n`);
  const print = (img: TestImage) => {
    process.stdout.write(
      `${img.path}\nformat ${img.format}\nsize ${img.size}\nvirtual-size ${img.virtualSize}\n` +
        `sha256 ${img.sha256}\nsha512 ${img.sha512}\nkernel ${img.kernel}\n`,
    );
  };
  if (!verify) {
    print(await ensureTestImage({ cacheDir, force, log }));
    return;
  }
  // Two cold builds, each in its own fresh cache directory (its own apt download too), compared byte for byte.
  const base = await mkdtemp(path.join(os.tmpdir(), 'stratus-image-determinism-'));
  try {
    const results: TestImage[] = [];
    for (const n of [1, 2]) {
      results.push(await ensureTestImage({ cacheDir: path.join(base, String(n)), force: true, log }));
    }
    for (const r of results) print(r);
    const same = results[0]!.sha256 === results[1]!.sha256;
    process.stdout.write(same ? 'deterministic: identical sha256\n' : 'NOT deterministic: sha256 differs\n');
    if (!same) process.exitCode = 1;
  } finally {
    await rm(base, { recursive: true, force: true });
  }
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main(process.argv.slice(2)).catch((err: unknown) => {
    process.stderr.write(`${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = 1;
  });
}
