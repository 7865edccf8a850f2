// Deterministic OCI image pieces, written without Docker, a registry or an image tool: layer tarballs (tar-stream,
// PAX where ustar cannot hold a name), gzip (node:zlib, no name, mtime 0, fixed level), sha256 (node:crypto), and
// the image config, manifest, index and OCI image layout archive of the OCI image spec v1.1.
// Same inputs, same bytes: entries sorted by path, owners numeric (no user/group names), mtimes clamped to
// SOURCE_DATE_EPOCH, no atime/ctime, JSON with a fixed key order.
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { lstat, open, readdir, readlink, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { PassThrough, Transform, type TransformCallback, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGzip } from 'node:zlib';
import * as tar from 'tar-stream';

export const MEDIA = {
  index: 'application/vnd.oci.image.index.v1+json',
  manifest: 'application/vnd.oci.image.manifest.v1+json',
  config: 'application/vnd.oci.image.config.v1+json',
  layerGzip: 'application/vnd.oci.image.layer.v1.tar+gzip',
} as const;

/** gzip level of every layer: part of the inputs of a digest. */
export const GZIP_LEVEL = 6;

export type EntryType = 'file' | 'directory' | 'symlink' | 'link' | 'character-device' | 'block-device' | 'fifo';

export interface LayerEntry {
  /** Path inside the image, relative (no leading slash): `usr/bin/qemu-img`. */
  path: string;
  type: EntryType;
  mode: number;
  uid: number;
  gid: number;
  /** Seconds since the epoch. */
  mtime: number;
  /** Files: content, from memory or a file on disk. */
  data?: Uint8Array;
  source?: string;
  size?: number;
  /** symlink target, or for `link` (hard link) the path of the first entry of the inode. */
  linkname?: string;
  devmajor?: number;
  devminor?: number;
}

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
  platform?: { architecture: string; os: string };
}

export interface LayerInfo {
  /** sha256 of the gzipped tar (the blob). */
  digest: string;
  /** sha256 of the uncompressed tar (the config's rootfs.diff_ids). */
  diffId: string;
  /** Size of the gzipped blob. */
  size: number;
  /** Size of the uncompressed tar. */
  tarSize: number;
}

/** Byte order of UTF-8 paths: stable across locales; a directory always precedes what it contains. */
export function comparePaths(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'));
}

export function sortEntries(entries: readonly LayerEntry[]): LayerEntry[] {
  const seen = new Set<string>();
  for (const e of entries) {
    if (e.path.startsWith('/') || e.path === '' || e.path.split('/').includes('..')) {
      throw new Error(`invalid layer path ${JSON.stringify(e.path)}`);
    }
    if (seen.has(e.path)) throw new Error(`duplicate layer path ${e.path}`);
    seen.add(e.path);
  }
  return [...entries].sort((a, b) => comparePaths(a.path, b.path));
}

export interface WalkOptions {
  /** Directory inside the image the tree lands in (relative, '' = the root). */
  prefix?: string;
  /** mtimes later than this are clamped to it (SOURCE_DATE_EPOCH). */
  clamp: number;
  /** Force the owner of every entry (app files: root); default the owner on disk. */
  owner?: { uid: number; gid: number };
  /** Relative paths (from root) left out, with everything below them. */
  skip?: (rel: string) => boolean;
}

/** Entries of a directory tree, sorted, hard links as `link` to the first path of the inode. Sockets are dropped. */
export async function walkTree(root: string, o: WalkOptions): Promise<LayerEntry[]> {
  const out: LayerEntry[] = [];
  const inodes = new Map<string, string>();
  const prefix = o.prefix ? o.prefix.replace(/^\/+|\/+$/g, '') : '';
  const at = (rel: string) => (prefix && rel ? `${prefix}/${rel}` : prefix || rel);
  async function visit(rel: string): Promise<void> {
    const abs = rel ? join(root, rel) : root;
    const st = await lstat(abs, { bigint: false });
    const path = at(rel);
    const base = {
      path,
      mode: st.mode & 0o7777,
      uid: o.owner?.uid ?? st.uid,
      gid: o.owner?.gid ?? st.gid,
      mtime: Math.min(Math.floor(st.mtimeMs / 1000), o.clamp),
    };
    if (st.isDirectory()) {
      if (path) out.push({ ...base, type: 'directory' });
      const names = (await readdir(abs)).sort((a, b) => comparePaths(a, b));
      for (const n of names) {
        const r = rel ? `${rel}/${n}` : n;
        if (!o.skip?.(r)) await visit(r);
      }
      return;
    }
    if (st.isSymbolicLink()) {
      out.push({ ...base, type: 'symlink', linkname: await readlink(abs) });
    } else if (st.isFile()) {
      const key = `${st.dev}:${st.ino}`;
      const first = st.nlink > 1 ? inodes.get(key) : undefined;
      if (first !== undefined) out.push({ ...base, type: 'link', linkname: first });
      else {
        if (st.nlink > 1) inodes.set(key, path);
        out.push({ ...base, type: 'file', source: abs, size: st.size });
      }
    } else if (st.isCharacterDevice() || st.isBlockDevice()) {
      out.push({
        ...base,
        type: st.isCharacterDevice() ? 'character-device' : 'block-device',
        devmajor: Number((BigInt(st.rdev) >> 8n) & 0xfffn),
        devminor: Number((BigInt(st.rdev) & 0xffn) | ((BigInt(st.rdev) >> 12n) & 0xfff00n)),
      });
    } else if (st.isFIFO()) {
      out.push({ ...base, type: 'fifo' });
    }
  }
  await visit('');
  return out;
}

/** Counts bytes and hashes what flows through. */
class Digester extends Transform {
  readonly hash = createHash('sha256');
  bytes = 0;
  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.hash.update(chunk);
    this.bytes += chunk.length;
    cb(null, chunk);
  }
}

function header(e: LayerEntry): Partial<tar.Header> & { name: string } {
  const h: Partial<tar.Header> & { name: string } = {
    name: e.path,
    type: e.type,
    mode: e.mode,
    uid: e.uid,
    gid: e.gid,
    uname: '',
    gname: '',
    mtime: new Date(e.mtime * 1000),
  };
  if (e.type === 'file') h.size = e.data ? e.data.byteLength : (e.size ?? 0);
  if (e.linkname !== undefined) h.linkname = e.linkname;
  if (e.devmajor !== undefined) h.devmajor = e.devmajor;
  if (e.devminor !== undefined) h.devminor = e.devminor;
  return h;
}

/** Writes the entries (sorted here) as a tar stream into `sink`; file contents streamed from disk. */
export async function writeTar(entries: readonly LayerEntry[], sink: NodeJS.WritableStream): Promise<void> {
  const pack = tar.pack();
  const done = pipeline(pack, sink as Writable);
  try {
    for (const e of sortEntries(entries)) {
      if (e.type === 'file' && e.data === undefined && e.source !== undefined) {
        const entry = pack.entry(header(e));
        await pipeline(createReadStream(e.source), entry);
      } else {
        await new Promise<void>((resolve, reject) => {
          const cb = (err?: Error | null) => (err ? reject(err) : resolve());
          if (e.type === 'file') pack.entry(header(e), e.data ?? new Uint8Array(), cb);
          else pack.entry(header(e), cb);
        });
      }
    }
    pack.finalize();
  } catch (err) {
    pack.destroy(err as Error);
  }
  await done;
}

/** Writes a gzipped layer blob to `file` and returns its digests. */
export async function writeLayer(entries: readonly LayerEntry[], file: string): Promise<LayerInfo> {
  const raw = new Digester();
  const gz = new Digester();
  const tmp = `${file}.tmp-${process.pid}`;
  const fh = await open(tmp, 'w');
  try {
    const writing = pipeline(raw, createGzip({ level: GZIP_LEVEL }), gz, fh.createWriteStream());
    await writeTar(entries, raw);
    await writing;
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  } finally {
    await fh.close().catch(() => undefined);
  }
  await rename(tmp, file);
  return {
    digest: `sha256:${gz.hash.digest('hex')}`,
    diffId: `sha256:${raw.hash.digest('hex')}`,
    size: gz.bytes,
    tarSize: raw.bytes,
  };
}

/** The bytes of a tar of the entries (tests, small layers). */
export async function tarBytes(entries: readonly LayerEntry[]): Promise<Buffer> {
  const chunks: Buffer[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      chunks.push(chunk);
      cb();
    },
  });
  await writeTar(entries, sink);
  return Buffer.concat(chunks);
}

export function sha256(data: Uint8Array | string): string {
  return `sha256:${createHash('sha256').update(data).digest('hex')}`;
}

/** JSON with sorted object keys, no whitespace: canonical bytes for digests. */
export function canonicalJson(v: unknown): string {
  return JSON.stringify(v, (_k, val: unknown) => {
    if (val && typeof val === 'object' && !Array.isArray(val)) {
      return Object.fromEntries(Object.entries(val as Record<string, unknown>).sort(([a], [b]) => comparePaths(a, b)));
    }
    return val;
  });
}

export interface ConfigInput {
  created: number;
  user: string;
  entrypoint: readonly string[];
  cmd?: readonly string[];
  env: readonly string[];
  workingDir?: string;
  labels: Record<string, string>;
  diffIds: readonly string[];
}

/** OCI image config (image-spec config.md). */
export function imageConfig(c: ConfigInput): Record<string, unknown> {
  const config: Record<string, unknown> = {
    User: c.user,
    Env: [...c.env],
    Entrypoint: [...c.entrypoint],
    Labels: c.labels,
  };
  if (c.cmd) config.Cmd = [...c.cmd];
  if (c.workingDir) config.WorkingDir = c.workingDir;
  return {
    created: new Date(c.created * 1000).toISOString(),
    architecture: 'amd64',
    os: 'linux',
    config,
    rootfs: { type: 'layers', diff_ids: [...c.diffIds] },
    history: c.diffIds.map(() => ({
      created: new Date(c.created * 1000).toISOString(),
      created_by: 'stratus containers/build.ts',
    })),
  };
}

/** OCI image manifest (image-spec manifest.md). */
export function imageManifest(config: Descriptor, layers: readonly Descriptor[], annotations?: Record<string, string>) {
  return {
    schemaVersion: 2,
    mediaType: MEDIA.manifest,
    config,
    layers: [...layers],
    ...(annotations ? { annotations } : {}),
  };
}

/** index.json of an OCI image layout naming one image: containerd takes io.containerd.image.name as the reference. */
export function imageIndex(manifest: Descriptor, ref: string): Record<string, unknown> {
  const colon = ref.lastIndexOf(':');
  const tag = colon > ref.lastIndexOf('/') ? ref.slice(colon + 1) : 'latest';
  return {
    schemaVersion: 2,
    mediaType: MEDIA.index,
    manifests: [
      {
        ...manifest,
        platform: { architecture: 'amd64', os: 'linux' },
        annotations: { 'io.containerd.image.name': ref, 'org.opencontainers.image.ref.name': tag },
      },
    ],
  };
}

export interface Blob {
  digest: string;
  /** In memory (JSON) or a file (layers). */
  data?: Uint8Array;
  file?: string;
}

/** An OCI image layout as one tar: oci-layout, index.json, blobs/sha256/<hex> (what `ctr images import` and
 * `kind load image-archive` read). */
export async function writeOciArchive(
  out: string,
  index: Record<string, unknown>,
  blobs: readonly Blob[],
  mtime: number,
): Promise<void> {
  const entry = (path: string, type: EntryType, extra: Partial<LayerEntry> = {}): LayerEntry => ({
    path,
    type,
    mode: type === 'directory' ? 0o755 : 0o644,
    uid: 0,
    gid: 0,
    mtime,
    ...extra,
  });
  const entries: LayerEntry[] = [
    entry('oci-layout', 'file', { data: Buffer.from(canonicalJson({ imageLayoutVersion: '1.0.0' })) }),
    entry('index.json', 'file', { data: Buffer.from(canonicalJson(index)) }),
    entry('blobs', 'directory'),
    entry('blobs/sha256', 'directory'),
  ];
  const seen = new Set<string>();
  for (const b of blobs) {
    if (seen.has(b.digest)) continue;
    seen.add(b.digest);
    const path = `blobs/sha256/${b.digest.replace(/^sha256:/, '')}`;
    if (b.data) entries.push(entry(path, 'file', { data: b.data }));
    else if (b.file) entries.push(entry(path, 'file', { source: b.file, size: (await stat(b.file)).size }));
    else throw new Error(`blob ${b.digest} has no content`);
  }
  const tmp = `${out}.tmp-${process.pid}`;
  const fh = await open(tmp, 'w');
  try {
    await writeTar(entries, fh.createWriteStream());
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  } finally {
    await fh.close().catch(() => undefined);
  }
  await rename(tmp, out);
}

/** Reads a tar (uncompressed or gzipped) into memory: name → header and content (tests, checks of small archives). */
export async function readTar(data: Uint8Array): Promise<Map<string, { header: tar.Header; data: Buffer }>> {
  const { gunzipSync } = await import('node:zlib');
  const bytes = data[0] === 0x1f && data[1] === 0x8b ? gunzipSync(data) : Buffer.from(data);
  const extract = tar.extract();
  const out = new Map<string, { header: tar.Header; data: Buffer }>();
  const input = new PassThrough();
  const reading = new Promise<void>((resolve, reject) => {
    extract.on('entry', (h, stream, next) => {
      const chunks: Buffer[] = [];
      stream.on('data', (c: unknown) => chunks.push(c as Buffer));
      stream.on('end', () => {
        out.set(h.name, { header: h, data: Buffer.concat(chunks) });
        next();
      });
      stream.resume();
    });
    extract.on('finish', resolve);
    extract.on('error', reject);
  });
  input.pipe(extract);
  input.end(bytes);
  await reading;
  return out;
}
