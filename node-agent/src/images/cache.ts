// The node's image cache: Images downloaded once per (uid, checksum), verified, inspected, converted to qcow2
// when needed, and kept as the read-only backing files of the guests' root disks (see README.md).
//
// Layout of `dir` (one ImageCache per directory; nothing else writes there):
//   <key>.qcow2 | <key>.raw      the image (committed by an atomic rename: never a partial file under this name)
//   <key>.json                   its metadata (source, sha256, sizes, lastUsed); written before the image's rename
//   .dl-<key>-<rand>/            a download or conversion in progress (removed on failure, and at startup); with a
//                                `user`, owned by it: untrusted data is inspected and converted as that user
//   .meta-<key>-<rand>.json      a metadata update in progress
import { createHash, randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { chmod, chown, mkdir, open, readdir, readFile, rename, rm, stat, statfs } from 'node:fs/promises';
import type { IncomingMessage } from 'node:http';
import { join, resolve } from 'node:path';
import { pipeline } from 'node:stream/promises';
import type { Logger } from 'pino';
import * as z from 'zod';
import { httpGet } from './download.ts';
import { ImageError } from './errors.ts';
import { checkDeclaredFormat, HEAD_BYTES, judge } from './inspect.ts';
import { QemuImgError, qemuImg, qemuImgInfo } from './qemuimg.ts';
import { UrlGuard, type UrlPolicyOptions, UrlRefusedError } from './urlguard.ts';

export { ImageError, type ImageErrorReason } from './errors.ts';
export type { UrlPolicyOptions } from './urlguard.ts';

export interface ImageSource {
  /** The Image object. */
  name: string;
  namespace: string;
  uid: string;
  /** http(s) */
  url: string;
  /** Declared Glance disk_format: raw, qcow2, vmdk, vdi, vhd, vhdx, iso, ploop, ami (aki and ari are refused). */
  diskFormat: string;
  checksum?: { algorithm: 'sha256' | 'sha512'; value: string };
}

export interface CachedImage {
  key: string;
  /** Absolute path of the cached file: a guest disk's backing file. */
  path: string;
  /** Format of the cached file (what createRootDisk passes as -F). ISO images are kept as raw. */
  format: 'qcow2' | 'raw';
  /** Bytes of the virtual disk. */
  virtualSize: number;
  /** Bytes of the data as downloaded (Glance's size; before any conversion). */
  size: number;
  /** sha256 of the data as downloaded (Glance's os_hash_value for sha256). */
  sha256: string;
  /** The downloaded data's format as detected: a qemu-img format name (qcow2, raw, vmdk, vdi, vpc, vhdx, parallels) or iso. */
  sourceFormat?: string;
}

export interface ImageCacheOptions {
  dir: string;
  logger?: Logger;
  /** Bytes that must stay free in `dir` after a download (NoSpace otherwise). Default 0. */
  minFreeBytes?: number;
  /**
   * Which hosts image URLs may reach (see urlguard.ts). Default: loopback, link-local and unspecified addresses are
   * refused; the agent adds --image-url-allow-cidr and --image-url-deny-cidr.
   */
  urlPolicy?: UrlPolicyOptions;
  /** A download fails when the server sends nothing for this long (default 300 s). */
  idleTimeoutMs?: number;
  /**
   * The unprivileged user (the QEMU user) that runs qemu-img on downloaded data; undefined: the agent's own user.
   * The cache directory is then 0711 (the user may enter it, not list it) and each download gets a work directory
   * of the user's; the cached files are root's again.
   */
  user?: { uid: number; gid: number };
  now?: () => number;
  /** Free bytes of the filesystem holding `dir`; default statfs (bavail × bsize). For tests. */
  freeBytes?: (dir: string) => Promise<number>;
}

export interface EvictOptions {
  /** Images that must stay: cache keys or cache paths (CachedImage.key or .path; either matches). */
  inUse: ReadonlySet<string>;
  /** Only images unused (no ensure()) for longer than this. Default: any age. */
  maxUnusedAgeMs?: number;
  /** Stop once this many bytes are free in the cache's filesystem. Default: remove every eligible image. */
  targetFreeBytes?: number;
}

const Checksum = z.object({ algorithm: z.enum(['sha256', 'sha512']), value: z.string() });
const Meta = z.object({
  version: z.literal(1),
  key: z.string(),
  /** File name of the image in the cache directory. */
  file: z.string(),
  format: z.enum(['qcow2', 'raw']),
  sourceFormat: z.string(),
  virtualSize: z.number().int().nonnegative(),
  size: z.number().int().nonnegative(),
  /** Bytes of the cached file (a cheap integrity check on reuse). */
  fileSize: z.number().int().nonnegative(),
  sha256: z.string(),
  source: z.object({
    name: z.string(),
    namespace: z.string(),
    uid: z.string(),
    url: z.string(),
    diskFormat: z.string(),
    checksum: Checksum.optional(),
  }),
  downloadedAt: z.number(),
  lastUsed: z.number(),
});
type Meta = z.infer<typeof Meta>;

interface Entry {
  meta: Meta;
  path: string;
}

interface Flight {
  promise: Promise<CachedImage>;
  controller: AbortController;
  /** Callers still waiting that could abort; the download is aborted when the last of them does. */
  abortable: number;
  /** Some caller waits without a signal: never abort. */
  pinned: boolean;
}

const TEMP_PREFIXES = ['.dl-', '.meta-'];
/** Free space is re-checked every this many bytes while streaming. */
const SPACE_CHECK_INTERVAL = 64 * 1024 * 1024;

/** The cache key of an image: its uid plus a digest of its checksum (or of its URL when it has none). */
export function cacheKey(src: Pick<ImageSource, 'uid' | 'url' | 'checksum'>): string {
  const uid = src.uid.replace(/[^A-Za-z0-9_-]/g, '_').slice(0, 64);
  if (!uid) throw new TypeError('ImageSource.uid is empty');
  const ident = src.checksum ? `${src.checksum.algorithm}:${src.checksum.value.toLowerCase()}` : `url:${src.url}`;
  return `${uid}-${createHash('sha256').update(ident).digest('hex').slice(0, 16)}`;
}

export function formatBytes(n: number): string {
  const units = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = n;
  let u = 0;
  while (Math.abs(v) >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${n} bytes` : `${v.toFixed(1)} ${units[u]}`;
}

/** "fetch failed (connect ECONNREFUSED ...)": the message and its causes. */
function describeError(err: unknown): string {
  const parts: string[] = [];
  let e: unknown = err;
  for (let i = 0; e && i < 4; i++) {
    const msg = e instanceof Error ? e.message : String(e);
    if (msg && !parts.includes(msg)) parts.push(msg);
    e = e instanceof Error ? e.cause : undefined;
  }
  return parts.length > 1 ? `${parts[0]} (${parts.slice(1).join(': ')})` : (parts[0] ?? 'unknown error');
}

function isNoSpace(err: unknown): boolean {
  if ((err as NodeJS.ErrnoException | undefined)?.code === 'ENOSPC') return true;
  return err instanceof QemuImgError && /No space left on device/i.test(err.stderr);
}

async function fsyncPath(p: string): Promise<void> {
  const fh = await open(p, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

async function readHead(p: string): Promise<Buffer> {
  const fh = await open(p, 'r');
  try {
    const buf = Buffer.alloc(HEAD_BYTES);
    const { bytesRead } = await fh.read(buf, 0, HEAD_BYTES, 0);
    return buf.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

export class ImageCache {
  readonly dir: string;
  private readonly log: Logger | undefined;
  private readonly minFreeBytes: number;
  private readonly guard: UrlGuard;
  private readonly idleTimeoutMs: number | undefined;
  private readonly user: { uid: number; gid: number } | undefined;
  private readonly now: () => number;
  private readonly freeBytesFn: (dir: string) => Promise<number>;
  private readonly flights = new Map<string, Flight>();
  private ready: Promise<void> | undefined;

  constructor(opts: ImageCacheOptions) {
    this.dir = resolve(opts.dir);
    this.log = opts.logger?.child({ component: 'image-cache' });
    this.minFreeBytes = opts.minFreeBytes ?? 0;
    this.guard = new UrlGuard(opts.urlPolicy);
    this.idleTimeoutMs = opts.idleTimeoutMs;
    this.user = opts.user;
    this.now = opts.now ?? Date.now;
    this.freeBytesFn =
      opts.freeBytes ??
      (async (dir) => {
        const s = await statfs(dir);
        return s.bavail * s.bsize;
      });
  }

  /**
   * The cached image for `src`, downloading, verifying and converting it first when needed. Concurrent calls for
   * one key share one download; `signal` abandons this call (the download stops when every caller that is
   * waiting for it has aborted). Throws ImageError for anything wrong with the image or the node's space.
   */
  async ensure(src: ImageSource, opts: { signal?: AbortSignal } = {}): Promise<CachedImage> {
    const signal = opts.signal;
    signal?.throwIfAborted();
    const key = cacheKey(src);
    await this.init();
    signal?.throwIfAborted();
    let flight = this.flights.get(key);
    if (!flight || flight.controller.signal.aborted) {
      const controller = new AbortController();
      const f: Flight = { controller, abortable: 0, pinned: false, promise: undefined as never };
      f.promise = this.load(src, key, controller.signal).finally(() => {
        if (this.flights.get(key) === f) this.flights.delete(key);
      });
      this.flights.set(key, f);
      flight = f;
    }
    if (!signal) {
      flight.pinned = true;
      return flight.promise;
    }
    const f = flight;
    f.abortable++;
    return new Promise<CachedImage>((resolvePromise, reject) => {
      const onAbort = () => {
        reject(signal.reason);
        if (--f.abortable === 0 && !f.pinned) f.controller.abort(signal.reason);
      };
      signal.addEventListener('abort', onAbort, { once: true });
      f.promise.then(
        (img) => {
          signal.removeEventListener('abort', onAbort);
          resolvePromise(img);
        },
        (err: unknown) => {
          signal.removeEventListener('abort', onAbort);
          reject(err);
        },
      );
    });
  }

  /** Every complete cached image, by key. */
  async list(): Promise<CachedImage[]> {
    await this.init();
    return (await this.entries()).map((e) => this.toImage(e));
  }

  /**
   * Removes cached images that are not in `inUse` (keys or paths), not being ensured right now, and unused for
   * longer than `maxUnusedAgeMs`: least recently used first, until `targetFreeBytes` are free (without a target:
   * all of them). Returns the image paths removed. The caller must count every image some disk on the node is
   * backed by as in use (running or not): removing a backing file destroys those disks.
   */
  async evict(opts: EvictOptions): Promise<string[]> {
    await this.init();
    const now = this.now();
    const protectedKey = (e: Entry) =>
      opts.inUse.has(e.meta.key) || opts.inUse.has(e.path) || this.flights.has(e.meta.key);
    const candidates = (await this.entries())
      .filter((e) => !protectedKey(e))
      .filter((e) => opts.maxUnusedAgeMs === undefined || now - e.meta.lastUsed > opts.maxUnusedAgeMs)
      .sort((a, b) => a.meta.lastUsed - b.meta.lastUsed || a.meta.key.localeCompare(b.meta.key));
    const removed: string[] = [];
    for (const e of candidates) {
      if (opts.targetFreeBytes !== undefined && (await this.freeBytesFn(this.dir)) >= opts.targetFreeBytes) break;
      if (protectedKey(e)) continue; // an ensure() started meanwhile
      await rm(e.path, { force: true });
      await rm(this.metaPath(e.meta.key), { force: true });
      removed.push(e.path);
      this.log?.info(
        { key: e.meta.key, path: e.path, lastUsed: new Date(e.meta.lastUsed).toISOString() },
        'evicted cached image',
      );
    }
    return removed;
  }

  // --- internals ---

  /** Creates the directory and removes what a previous process left half done (once per instance). */
  private init(): Promise<void> {
    this.ready ??= (async () => {
      await mkdir(this.dir, { recursive: true });
      if (this.user) await chmod(this.dir, 0o711);
      for (const name of await readdir(this.dir)) {
        if (TEMP_PREFIXES.some((p) => name.startsWith(p))) {
          await rm(join(this.dir, name), { force: true, recursive: true });
          this.log?.info({ file: name }, 'removed leftover temporary file');
        }
      }
    })();
    this.ready.catch(() => {
      this.ready = undefined; // retry next time (e.g. the directory could not be created yet)
    });
    return this.ready;
  }

  private metaPath(key: string): string {
    return join(this.dir, `${key}.json`);
  }

  private toImage(e: Entry): CachedImage {
    const m = e.meta;
    return {
      key: m.key,
      path: e.path,
      format: m.format,
      virtualSize: m.virtualSize,
      size: m.size,
      sha256: m.sha256,
      sourceFormat: m.sourceFormat,
    };
  }

  /** The complete entry for `key`, or undefined (missing, unreadable metadata, or image file missing/altered). */
  private async lookup(key: string): Promise<Entry | undefined> {
    let raw: string;
    try {
      raw = await readFile(this.metaPath(key), 'utf8');
    } catch {
      return undefined;
    }
    let meta: Meta;
    try {
      meta = Meta.parse(JSON.parse(raw));
    } catch (err) {
      this.log?.warn({ key, err: describeError(err) }, 'unreadable image metadata; downloading again');
      return undefined;
    }
    if (meta.key !== key || meta.file.includes('/')) return undefined;
    const path = join(this.dir, meta.file);
    const st = await stat(path).catch(() => undefined);
    if (!st?.isFile()) return undefined;
    if (st.size !== meta.fileSize) {
      this.log?.warn({ key, path, size: st.size, expected: meta.fileSize }, 'cached image altered; downloading again');
      return undefined;
    }
    return { meta, path };
  }

  private async entries(): Promise<Entry[]> {
    const out: Entry[] = [];
    for (const name of (await readdir(this.dir)).sort()) {
      if (name.startsWith('.') || !name.endsWith('.json')) continue;
      const entry = await this.lookup(name.slice(0, -'.json'.length));
      if (entry) out.push(entry);
    }
    return out;
  }

  private async writeMeta(meta: Meta): Promise<void> {
    const tmp = join(this.dir, `.meta-${meta.key}-${randomBytes(4).toString('hex')}.json`);
    try {
      await open(tmp, 'wx', 0o644).then(async (fh) => {
        try {
          await fh.writeFile(`${JSON.stringify(meta, null, 2)}\n`);
          await fh.sync();
        } finally {
          await fh.close();
        }
      });
      await rename(tmp, this.metaPath(meta.key));
    } finally {
      await rm(tmp, { force: true });
    }
  }

  private async load(src: ImageSource, key: string, signal: AbortSignal): Promise<CachedImage> {
    const hit = await this.lookup(key);
    if (hit) {
      hit.meta.lastUsed = this.now();
      // Best effort: a full disk must not stop guests booting from images already here.
      await this.writeMeta(hit.meta).catch((err: unknown) =>
        this.log?.warn({ key, err: describeError(err) }, 'could not record lastUsed'),
      );
      return this.toImage(hit);
    }
    return this.fetchImage(src, key, signal);
  }

  private async checkSpace(need: number, purpose: string, what: string): Promise<void> {
    const free = await this.freeBytesFn(this.dir);
    if (free - need < this.minFreeBytes) {
      throw new ImageError(
        'NoSpace',
        `${what}: not enough disk space in ${this.dir} ${purpose}: ${formatBytes(free)} free, ` +
          `${formatBytes(need)} needed and ${formatBytes(this.minFreeBytes)} kept free (minFreeBytes)`,
      );
    }
  }

  private async fetchImage(src: ImageSource, key: string, signal: AbortSignal): Promise<CachedImage> {
    const what = `image ${src.namespace}/${src.name}`;
    checkDeclaredFormat(src.diskFormat, what);
    let url: URL;
    try {
      url = new URL(src.url);
    } catch {
      throw new ImageError('DownloadFailed', `${what}: invalid URL ${JSON.stringify(src.url)}`);
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') {
      throw new ImageError('DownloadFailed', `${what}: unsupported URL scheme ${url.protocol} (http and https only)`);
    }
    const work = join(this.dir, `.dl-${key}-${randomBytes(4).toString('hex')}`);
    const tmp = join(work, 'data');
    const converted = join(work, 'data.qcow2');
    const user = this.user;
    const started = this.now();
    let metaWritten = false;
    this.log?.info({ key, url: src.url, diskFormat: src.diskFormat }, 'downloading image');
    try {
      await mkdir(work, { mode: 0o700 });
      if (user) await chown(work, user.uid, user.gid);
      const dl = await this.download(src, url, tmp, signal, what);
      if (user) await chown(tmp, user.uid, user.gid);
      if (src.checksum) {
        const expected = src.checksum.value.toLowerCase();
        if (dl.declared !== expected) {
          throw new ImageError(
            'ChecksumMismatch',
            `${what}: ${src.checksum.algorithm} of the ${dl.bytes} bytes downloaded from ${src.url} is ${dl.declared}, expected ${expected}`,
          );
        }
      }
      const head = await readHead(tmp);
      let info: Awaited<ReturnType<typeof qemuImgInfo>>;
      try {
        info = await qemuImgInfo(tmp, { untrusted: true, signal, ...(user ? { user } : {}) });
      } catch (err) {
        if (signal.aborted || !(err instanceof QemuImgError)) throw err;
        throw new ImageError(
          'NotADiskImage',
          `${what}: qemu-img cannot read the data from ${src.url}: ${err.stderr || err.message}`,
          { cause: err },
        );
      }
      const judged = judge(src.diskFormat, info, head, dl.bytes, what);
      let file = tmp;
      let format: 'qcow2' | 'raw' = judged.format === 'qcow2' ? 'qcow2' : 'raw';
      let virtualSize = judged.virtualSize;
      if (judged.format !== 'qcow2' && judged.format !== 'raw' && judged.format !== 'iso') {
        // The converted file is about as big as the allocated data; the download's size is the estimate.
        await this.checkSpace(dl.bytes, `to convert it from ${judged.format} to qcow2`, what);
        try {
          await qemuImg(['convert', '-q', '-f', judged.format, '-O', 'qcow2', tmp, converted], {
            signal,
            ...(user ? { user } : {}),
          });
        } catch (err) {
          if (signal.aborted || isNoSpace(err) || !(err instanceof QemuImgError)) throw err;
          throw new ImageError(
            'NotADiskImage',
            `${what}: converting the ${judged.format} data to qcow2 failed: ${err.stderr || err.message}`,
            { cause: err },
          );
        }
        await rm(tmp, { force: true });
        file = converted;
        format = 'qcow2';
        virtualSize = (await qemuImgInfo(converted, { format: 'qcow2', signal }))['virtual-size'];
      }
      if (user) {
        await chown(file, 0, 0);
        await chmod(file, 0o644);
      }
      await fsyncPath(file);
      const fileSize = (await stat(file)).size;
      const now = this.now();
      const meta: Meta = {
        version: 1,
        key,
        file: `${key}.${format}`,
        format,
        sourceFormat: judged.format,
        virtualSize,
        size: dl.bytes,
        fileSize,
        sha256: dl.sha256,
        source: {
          name: src.name,
          namespace: src.namespace,
          uid: src.uid,
          url: src.url,
          diskFormat: src.diskFormat,
          ...(src.checksum ? { checksum: { ...src.checksum } } : {}),
        },
        downloadedAt: now,
        lastUsed: now,
      };
      signal.throwIfAborted();
      await this.writeMeta(meta);
      metaWritten = true;
      const finalPath = join(this.dir, meta.file);
      await rename(file, finalPath);
      await fsyncPath(this.dir);
      await rm(work, { recursive: true, force: true });
      this.log?.info(
        {
          key,
          path: finalPath,
          sourceFormat: judged.format,
          format,
          size: dl.bytes,
          virtualSize,
          ms: this.now() - started,
        },
        'image cached',
      );
      return this.toImage({ meta, path: finalPath });
    } catch (err) {
      await rm(work, { recursive: true, force: true });
      if (metaWritten) await rm(this.metaPath(key), { force: true });
      if (signal.aborted) throw signal.reason;
      if (err instanceof ImageError) {
        this.log?.warn({ key, url: src.url, reason: err.reason, err: err.message }, 'image refused');
        throw err;
      }
      if (isNoSpace(err)) {
        throw new ImageError('NoSpace', `${what}: the disk holding ${this.dir} is full (${describeError(err)})`, {
          cause: err,
        });
      }
      throw err;
    }
  }

  /** Streams the body of `url` into `tmp` (created exclusively), hashing as it goes. */
  private async download(
    src: ImageSource,
    url: URL,
    tmp: string,
    signal: AbortSignal,
    what: string,
  ): Promise<{ bytes: number; sha256: string; declared: string }> {
    let res: IncomingMessage;
    let from = src.url;
    try {
      const got = await httpGet(url, {
        guard: this.guard,
        signal,
        headers: { 'accept-encoding': 'identity', 'user-agent': 'stratus-node-agent' },
        ...(this.idleTimeoutMs !== undefined ? { idleTimeoutMs: this.idleTimeoutMs } : {}),
      });
      res = got.res;
      if (got.url.href !== url.href) from = `${src.url} (redirected to ${got.url.href})`;
    } catch (err) {
      if (signal.aborted) throw signal.reason;
      if (err instanceof UrlRefusedError) throw new ImageError('DownloadFailed', `${what}: ${err.message}`);
      throw new ImageError('DownloadFailed', `${what}: GET ${src.url} failed: ${describeError(err)}`, {
        cause: err,
      });
    }
    const status = res.statusCode ?? 0;
    if (status < 200 || status > 299 || status === 204 || status === 205) {
      res.destroy();
      throw new ImageError(
        'DownloadFailed',
        status < 300
          ? `${what}: GET ${from} answered ${status} without a body`
          : `${what}: GET ${from} answered HTTP ${status}${res.statusMessage ? ` ${res.statusMessage}` : ''}`,
      );
    }
    const lengthHeader = res.headers['content-length'];
    const length = lengthHeader && /^\d+$/.test(lengthHeader) ? Number(lengthHeader) : undefined;
    try {
      await this.checkSpace(length ?? 0, `for the ${length === undefined ? '' : `${length} `}bytes of ${from}`, what);
    } catch (err) {
      res.destroy();
      throw err;
    }
    const body = res;
    const sha256 = createHash('sha256');
    const other = src.checksum?.algorithm === 'sha512' ? createHash('sha512') : undefined;
    let bytes = 0;
    let nextSpaceCheck = SPACE_CHECK_INTERVAL;
    const checkSpace = (need: number, purpose: string) => this.checkSpace(need, purpose, what);
    try {
      await pipeline(
        async function* () {
          for await (const chunk of body) {
            sha256.update(chunk);
            other?.update(chunk);
            bytes += chunk.length;
            if (bytes >= nextSpaceCheck) {
              nextSpaceCheck = bytes + SPACE_CHECK_INTERVAL;
              await checkSpace(0, `while downloading ${from} (${bytes} bytes so far)`);
            }
            yield chunk;
          }
        },
        createWriteStream(tmp, { flags: 'wx', mode: 0o644 }),
        { signal },
      );
    } catch (err) {
      res.destroy();
      if (signal.aborted) throw signal.reason;
      if (err instanceof ImageError || isNoSpace(err)) throw err;
      throw new ImageError(
        'DownloadFailed',
        `${what}: downloading ${from} failed after ${bytes}${length === undefined ? '' : ` of ${length}`} bytes: ${describeError(err)}`,
        { cause: err },
      );
    }
    if (!res.complete || (length !== undefined && bytes !== length)) {
      throw new ImageError(
        'DownloadFailed',
        length === undefined
          ? `${what}: downloading ${from} ended after ${bytes} bytes, before the end of the body`
          : `${what}: downloading ${from} ended after ${bytes} bytes, but Content-Length is ${length}`,
      );
    }
    const hex = sha256.digest('hex');
    return { bytes, sha256: hex, declared: other ? other.digest('hex') : hex };
  }
}
