// The QEMU runtime bundle (docs/design/guest-placement.md): a copy of qemu-system-x86_64, every shared library it
// and its modules load, the dynamic loader, and QEMU's data directories (firmware, option ROMs, keymaps), kept in a
// content-addressed host directory <stateDir>/runtime/<sha256>/. The host launcher starts QEMU from there through the
// bundle's own loader, so a guest's QEMU needs nothing from the agent container's root filesystem, which the
// container runtime removes when the agent pod goes away.
//
// Layout (mirrors the install prefix, /usr on Debian, so QEMU's relocatable paths resolve inside the bundle: QEMU
// finds its data and module directories relative to /proc/self/exe, which is the loader in lib64/):
//   bin/qemu-system-x86_64            the emulator (run as an argument of the loader, never exec'd itself)
//   lib64/ld-linux-x86-64.so.2        the dynamic loader (the process' executable)
//   lib/<soname>                      every library (flat; the loader's --library-path)
//   lib/x86_64-linux-gnu/qemu/*.so    QEMU's modules (accelerators, block and display drivers)
//   share/qemu, share/seabios, lib/ipxe/qemu, …  the data directories `qemu-system-x86_64 -L help` lists
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { chmod, copyFile, mkdir, readdir, readFile, realpath, rename, rm, stat } from 'node:fs/promises';
import { basename, delimiter, dirname, isAbsolute, join, normalize, relative, sep } from 'node:path';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);

/** Where bundles live, under the state directory. */
export const RUNTIME_DIR = 'runtime';
const LOADER_NAME = 'ld-linux-x86-64.so.2';
const HASH_DIR = /^[0-9a-f]{64}$/;

/** One `ld.so --list` (ldd) output: the libraries with a path, the loader, and the names not found. */
export interface LinkList {
  libraries: string[];
  loader?: string;
  missing: string[];
}

/** Parses the output of `ld.so --list <elf>` (the same format as ldd). */
export function parseLddOutput(out: string): LinkList {
  const libraries: string[] = [];
  const missing: string[] = [];
  let loader: string | undefined;
  for (const raw of out.split('\n')) {
    const line = raw.trim();
    if (line === '') continue;
    const arrow = /^(\S+)\s+=>\s+(.*?)\s*(\(0x[0-9a-f]+\))?$/.exec(line);
    if (arrow) {
      const target = arrow[2]!;
      if (target === 'not found') missing.push(arrow[1]!);
      else if (isAbsolute(target)) libraries.push(target);
      continue;
    }
    // "/lib64/ld-linux-x86-64.so.2 (0x…)": the loader; "linux-vdso.so.1 (0x…)": no file.
    const plain = /^(\/\S+)\s+\(0x[0-9a-f]+\)$/.exec(line);
    if (plain) loader = plain[1]!;
  }
  return { libraries, ...(loader ? { loader } : {}), missing };
}

/** Parses `qemu-system-x86_64 -L help`: the data directories QEMU searches, normalised. */
export function parseDataDirs(out: string): string[] {
  return out
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => isAbsolute(l))
    .map((l) => normalize(l));
}

/** A file of the bundle: where it comes from and its path inside the bundle. */
export interface BundleFile {
  source: string;
  path: string;
}

export interface BundleSources {
  /** Real path of the QEMU binary. */
  binary: string;
  /** Real path of the dynamic loader. */
  loader: string;
  /** Libraries of the binary and of the modules. */
  libraries: string[];
  /** The modules directory (absolute) and its .so files, if any. */
  modules?: { dir: string; files: string[] };
  /** Data directories (absolute) with the files under them (absolute, symlinks resolved when copied). */
  data: { dir: string; files: string[] }[];
}

/**
 * The bundle's file list. Paths under the install prefix (the parent of the binary's directory, /usr) keep their
 * place relative to it; libraries go flat into lib/; the loader into lib64/. Data directories outside the prefix
 * are left out (QEMU would not look for them relative to itself anyway).
 */
export function bundleFiles(s: BundleSources): BundleFile[] {
  const prefix = dirname(dirname(s.binary));
  const files = new Map<string, string>();
  const add = (path: string, source: string) => {
    if (!files.has(path)) files.set(path, source);
  };
  add(`bin/${basename(s.binary)}`, s.binary);
  add(`lib64/${LOADER_NAME}`, s.loader);
  for (const lib of s.libraries) add(`lib/${basename(lib)}`, lib);
  const under = (p: string) => {
    const r = relative(prefix, p);
    return r !== '' && !r.startsWith('..') && !isAbsolute(r) ? r.split(sep).join('/') : undefined;
  };
  for (const group of [...(s.modules ? [s.modules] : []), ...s.data]) {
    if (under(group.dir) === undefined) continue;
    for (const f of group.files) {
      const r = under(f);
      if (r !== undefined) add(r, f);
    }
  }
  return [...files.entries()]
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([path, source]) => ({ path, source }));
}

/** The install prefix's module directory relative to it, as Debian and upstream lay it out. */
const MODULE_DIRS = ['lib/x86_64-linux-gnu/qemu', 'lib64/qemu', 'lib/qemu'];

/** A bundle on disk. */
export interface Bundle {
  /** <stateDir>/runtime/<hash> */
  dir: string;
  hash: string;
}

/** The argv and environment that run `args` with the bundle's QEMU through its own loader. */
export function bundleArgv(
  b: Pick<Bundle, 'dir'>,
  args: readonly string[],
): { argv: string[]; env: Record<string, string> } {
  return {
    argv: [
      `${b.dir}/lib64/${LOADER_NAME}`,
      '--library-path',
      `${b.dir}/lib`,
      '--argv0',
      'qemu-system-x86_64',
      `${b.dir}/bin/qemu-system-x86_64`,
      '-L',
      `${b.dir}/share/qemu`,
      ...args,
    ],
    env: { QEMU_MODULE_DIR: `${b.dir}/lib/x86_64-linux-gnu/qemu` },
  };
}

/** The bundle hash a command line runs from (a path <runtimeDir>/<hash>/ in it), if any. */
export function bundleOfCmdline(argv: readonly string[], runtimeDir: string): string | undefined {
  const prefix = `${runtimeDir.replace(/\/+$/, '')}/`;
  for (const a of argv) {
    if (!a.startsWith(prefix)) continue;
    const hash = a.slice(prefix.length).split('/')[0]!;
    if (HASH_DIR.test(hash)) return hash;
  }
  return undefined;
}

async function run(bin: string, args: string[]): Promise<string> {
  const { stdout } = await execFileP(bin, args, { timeout: 60_000, maxBuffer: 16 * 1024 * 1024 });
  return stdout;
}

async function which(bin: string): Promise<string> {
  if (bin.includes('/')) return realpath(bin);
  for (const d of (process.env.PATH ?? '/usr/local/bin:/usr/bin:/bin').split(delimiter)) {
    if (!d) continue;
    try {
      const p = join(d, bin);
      if ((await stat(p)).isFile()) return await realpath(p);
    } catch {
      // next
    }
  }
  throw new Error(`${bin} not found in PATH`);
}

async function walk(dir: string): Promise<string[]> {
  const out: string[] = [];
  let entries: import('node:fs').Dirent[];
  try {
    entries = await readdir(dir, { withFileTypes: true });
  } catch {
    return out;
  }
  for (const e of entries) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...(await walk(p)));
    else if (e.isFile()) out.push(p);
    else if (e.isSymbolicLink()) {
      // Followed (copied as a file); a link to a directory is walked; a dangling one is skipped.
      const st = await stat(p).catch(() => undefined);
      if (st?.isFile()) out.push(p);
      else if (st?.isDirectory()) out.push(...(await walk(p)));
    }
  }
  return out;
}

/** Finds everything the bundle of `qemuBinary` holds, with the system's loader (`ld.so --list`) and `-L help`. */
export async function findBundleSources(qemuBinary: string, loader = `/lib64/${LOADER_NAME}`): Promise<BundleSources> {
  const binary = await which(qemuBinary);
  const prefix = dirname(dirname(binary));
  const main = parseLddOutput(await run(loader, ['--list', binary]));
  if (main.missing.length > 0)
    throw new Error(`${binary} needs libraries that are missing: ${main.missing.join(', ')}`);
  const libraries = new Set(main.libraries);
  let modules: BundleSources['modules'];
  for (const rel of MODULE_DIRS) {
    const dir = join(prefix, rel);
    const files = (await walk(dir)).filter((f) => f.endsWith('.so'));
    if (files.length === 0) continue;
    modules = { dir, files: [] };
    for (const f of files) {
      // A module whose libraries are not installed would not load in the container either: left out.
      const l = parseLddOutput(await run(loader, ['--list', f]).catch(() => 'x => not found'));
      if (l.missing.length > 0) continue;
      modules.files.push(f);
      for (const lib of l.libraries) libraries.add(lib);
    }
    break;
  }
  const dataDirs = parseDataDirs(await run(binary, ['-L', 'help']));
  const data: BundleSources['data'] = [];
  for (const dir of dataDirs) data.push({ dir, files: await walk(dir) });
  return {
    binary,
    loader: await realpath(main.loader ?? loader),
    libraries: [...libraries],
    ...(modules ? { modules } : {}),
    data,
  };
}

async function sha256File(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(path)) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** The content hash of a file list: paths, executable bits and contents. */
export async function bundleHash(files: readonly BundleFile[]): Promise<string> {
  const h = createHash('sha256');
  for (const f of files) {
    const exec = ((await stat(f.source)).mode & 0o111) !== 0;
    h.update(`${f.path}\0${exec ? 'x' : '-'}\0${await sha256File(f.source)}\n`);
  }
  return h.digest('hex');
}

/**
 * Makes sure the bundle of `qemuBinary` exists under `runtimeDir` (once per content: an existing directory of that
 * hash is used as it is). Copies into a temporary directory and renames it into place, so a bundle directory is
 * either complete or absent.
 */
export async function ensureBundle(o: { qemuBinary: string; runtimeDir: string; loader?: string }): Promise<Bundle> {
  const files = bundleFiles(await findBundleSources(o.qemuBinary, o.loader));
  const hash = await bundleHash(files);
  const dir = join(o.runtimeDir, hash);
  await mkdir(o.runtimeDir, { recursive: true, mode: 0o755 });
  await chmod(o.runtimeDir, 0o755);
  if (await stat(join(dir, 'bin', 'qemu-system-x86_64')).catch(() => undefined)) return { dir, hash };
  const tmp = join(o.runtimeDir, `.tmp-${randomBytes(6).toString('hex')}`);
  try {
    for (const f of files) {
      const to = join(tmp, f.path);
      await mkdir(dirname(to), { recursive: true, mode: 0o755 });
      await copyFile(f.source, to);
      const exec = ((await stat(f.source)).mode & 0o111) !== 0;
      await chmod(to, exec ? 0o755 : 0o644);
    }
    // The emulator is named qemu-system-x86_64 in the bundle whatever the source's name (bundleArgv relies on it).
    const bin = files.find((f) => f.path.startsWith('bin/'))!;
    if (bin.path !== 'bin/qemu-system-x86_64')
      await rename(join(tmp, bin.path), join(tmp, 'bin', 'qemu-system-x86_64'));
    try {
      await rename(tmp, dir);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== 'EEXIST' && code !== 'ENOTEMPTY') throw err;
      // Another agent made the same bundle meanwhile.
    }
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
  return { dir, hash };
}

/**
 * Removes bundles (and interrupted copies) other than `keep` that no running process uses: a process uses a bundle
 * when its command line names a path in it (the loader, the binary). Returns the removed hashes.
 */
export async function collectBundles(o: {
  runtimeDir: string;
  keep: string;
  /** Command lines of all processes (default: every /proc/<pid>/cmdline). */
  cmdlines?: () => Promise<string[][]>;
}): Promise<string[]> {
  let names: string[];
  try {
    names = await readdir(o.runtimeDir);
  } catch {
    return [];
  }
  const inUse = new Set<string>();
  for (const argv of await (o.cmdlines ?? allCmdlines)()) {
    const h = bundleOfCmdline(argv, o.runtimeDir);
    if (h) inUse.add(h);
  }
  const removed: string[] = [];
  for (const n of names) {
    if (n === o.keep || inUse.has(n)) continue;
    if (!HASH_DIR.test(n) && !n.startsWith('.tmp-')) continue;
    await rm(join(o.runtimeDir, n), { recursive: true, force: true });
    removed.push(n);
  }
  return removed;
}

async function allCmdlines(): Promise<string[][]> {
  const out: string[][] = [];
  for (const d of await readdir('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    const raw = await readFile(`/proc/${d}/cmdline`, 'utf8').catch(() => '');
    if (raw) out.push(raw.split('\0'));
  }
  return out;
}
