// ImageCache against the loopback file server (e2e/images/serve.ts) and real qemu-img.
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { gzipSync } from 'node:zlib';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { type FileServer, start } from '../../../e2e/images/serve.ts';
import { requireTools } from '../../../e2e/testing/tools.ts';
import {
  type CachedImage,
  cacheKey,
  ImageCache,
  ImageError,
  type ImageErrorReason,
  type ImageSource,
} from '../../src/images/cache.ts';
import { createRootDisk, diskInfo } from '../../src/images/disks.ts';

requireTools('qemu-img', 'qemu-io');
const run = promisify(execFile);
/** The test file server listens on loopback, which image URLs may not reach unless allowed. */
const LOOPBACK = { allowCidrs: ['127.0.0.0/8'] };
const MiB = 1024 * 1024;
const sha = (alg: string, b: Uint8Array) => createHash(alg).update(b).digest('hex');

let fixtures: string;
let srv: FileServer;
const digests: Record<string, { sha256: string; sha512: string; size: number }> = {};
const temps: string[] = [];

async function newDir(): Promise<string> {
  const d = await mkdtemp(path.join(os.tmpdir(), 'stratus-imgcache-'));
  temps.push(d);
  return d;
}

beforeAll(async () => {
  fixtures = await newDir();
  const f = (n: string) => path.join(fixtures, n);
  // A qcow2 with some data in it, and the same disk as vmdk and vdi.
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', f('good.qcow2'), '64M']);
  await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 256k', '-c', 'write -P 0xa5 1M 64k', f('good.qcow2')]);
  await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'vmdk', f('good.qcow2'), f('good.vmdk')]);
  await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'vdi', f('good.qcow2'), f('good.vdi')]);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', 'good.qcow2', f('overlay.qcow2')]);
  // A raw disk: binary (zero bytes included) with a boot signature.
  const raw = Buffer.alloc(MiB);
  for (let i = 0; i < 64 * 1024; i++) raw[i] = (i * 7) & 0xff;
  raw[510] = 0x55;
  raw[511] = 0xaa;
  await writeFile(f('disk.raw'), raw);
  await writeFile(f('disk.raw.gz'), gzipSync(raw));
  await writeFile(f('tiny.raw'), raw.subarray(0, 100));
  await writeFile(f('notes.txt'), 'This is not a disk image, just some text.\n'.repeat(100));
  await writeFile(
    f('error.html'),
    `<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>${'<p>nope</p>'.repeat(100)}</body></html>\n`,
  );
  const iso = Buffer.alloc(64 * 1024);
  iso.write('\x01CD001\x01', 0x8000, 'latin1');
  await writeFile(f('cd.iso'), iso);
  for (const name of await readdir(fixtures)) {
    const data = await readFile(f(name));
    digests[name] = { sha256: sha('sha256', data), sha512: sha('sha512', data), size: data.length };
  }
  srv = await start(fixtures);
});

afterAll(async () => {
  await srv?.close();
  for (const d of temps) await rm(d, { recursive: true, force: true });
});

afterEach(() => {
  for (const name of Object.keys(digests)) srv.setFault(name, undefined);
});

let uidCounter = 0;
function source(file: string, diskFormat: string, extra: Partial<ImageSource> = {}): ImageSource {
  uidCounter++;
  return {
    name: file.replace(/\W/g, '-'),
    namespace: 'tenant-a',
    uid: `00000000-0000-4000-8000-${String(uidCounter).padStart(12, '0')}`,
    url: `${srv.url}/${file}`,
    diskFormat,
    checksum: { algorithm: 'sha256', value: digests[file]?.sha256 ?? '0'.repeat(64) },
    ...extra,
  };
}

const gets = (file: string) => srv.requests.filter((r) => r.method === 'GET' && r.path === `/${file}`).length;

async function refusal(p: Promise<unknown>): Promise<{ reason: ImageErrorReason; message: string }> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(ImageError);
  return { reason: (err as ImageError).reason, message: (err as ImageError).message };
}

describe('ImageCache.ensure', () => {
  it('downloads a good image once for 5 concurrent ensures, then serves it from the cache', async () => {
    const dir = await newDir();
    let now = 1_000;
    const cache = new ImageCache({ urlPolicy: LOOPBACK, dir, now: () => now });
    const src = source('good.qcow2', 'qcow2');
    const before = gets('good.qcow2');
    const results = await Promise.all(Array.from({ length: 5 }, () => cache.ensure(src)));
    expect(gets('good.qcow2') - before).toBe(1);
    const img = results[0]!;
    for (const r of results) expect(r).toEqual(img);
    expect(img).toEqual({
      key: cacheKey(src),
      path: path.join(dir, `${cacheKey(src)}.qcow2`),
      format: 'qcow2',
      virtualSize: 64 * MiB,
      size: digests['good.qcow2']!.size,
      sha256: digests['good.qcow2']!.sha256,
      sourceFormat: 'qcow2',
    });
    expect(sha('sha256', await readFile(img.path))).toBe(img.sha256);
    expect((await readdir(dir)).sort()).toEqual([`${img.key}.json`, `${img.key}.qcow2`]);
    const meta = JSON.parse(await readFile(path.join(dir, `${img.key}.json`), 'utf8'));
    expect(meta).toMatchObject({ lastUsed: 1_000, source: { uid: src.uid, url: src.url, diskFormat: 'qcow2' } });

    now = 5_000;
    expect(await cache.ensure(src)).toEqual(img);
    expect(gets('good.qcow2') - before).toBe(1);
    expect(JSON.parse(await readFile(path.join(dir, `${img.key}.json`), 'utf8')).lastUsed).toBe(5_000);

    // A restarted agent (new instance) reuses it and removes a leftover temporary file.
    await writeFile(path.join(dir, `.dl-${img.key}-deadbeef`), 'partial');
    const again = new ImageCache({ urlPolicy: LOOPBACK, dir });
    expect(await again.ensure(src)).toEqual(img);
    expect(gets('good.qcow2') - before).toBe(1);
    expect(await readdir(dir)).not.toContain(`.dl-${img.key}-deadbeef`);
    expect(await again.list()).toEqual([img]);
  });

  it('downloads again when the cached file was altered', async () => {
    const dir = await newDir();
    const cache = new ImageCache({ urlPolicy: LOOPBACK, dir });
    const src = source('disk.raw', 'raw');
    const img = await cache.ensure(src);
    expect(img).toMatchObject({ format: 'raw', sourceFormat: 'raw', virtualSize: MiB });
    await truncate(img.path, 4096);
    const before = gets('disk.raw');
    expect(await cache.ensure(src)).toEqual(img);
    expect(gets('disk.raw') - before).toBe(1);
  });

  it('verifies sha512 and works without a checksum (key from the URL)', async () => {
    const cache = new ImageCache({ urlPolicy: LOOPBACK, dir: await newDir() });
    const src512 = source('disk.raw', 'raw', {
      checksum: { algorithm: 'sha512', value: digests['disk.raw']!.sha512 },
    });
    expect((await cache.ensure(src512)).sha256).toBe(digests['disk.raw']!.sha256);
    const none = source('disk.raw', 'raw', { checksum: undefined });
    expect((await cache.ensure(none)).key).toBe(cacheKey({ uid: none.uid, url: none.url }));
    const wrong = { ...src512, checksum: { algorithm: 'sha512' as const, value: 'ab'.repeat(64) } };
    expect((await refusal(cache.ensure(wrong))).reason).toBe('ChecksumMismatch');
  });

  it('refuses a checksum mismatch and shows expected vs actual', async () => {
    const dir = await newDir();
    const cache = new ImageCache({ urlPolicy: LOOPBACK, dir });
    srv.setFault('good.qcow2', 'corrupt');
    const src = source('good.qcow2', 'qcow2');
    const { reason, message } = await refusal(cache.ensure(src));
    expect(reason).toBe('ChecksumMismatch');
    expect(message).toContain(`expected ${digests['good.qcow2']!.sha256}`);
    expect(message).toMatch(
      /^image tenant-a\/good-qcow2: sha256 of the \d+ bytes downloaded from http:\S+ is [0-9a-f]{64}/,
    );
    expect(await readdir(dir)).toEqual([]);
  });

  it('refuses a text file declared qcow2 and an HTML page declared raw as NotADiskImage', async () => {
    const dir = await newDir();
    const cache = new ImageCache({ urlPolicy: LOOPBACK, dir });
    const text = await refusal(cache.ensure(source('notes.txt', 'qcow2')));
    expect(text).toEqual({
      reason: 'NotADiskImage',
      message: expect.stringMatching(/^image tenant-a\/notes-txt: the data is text \(it starts with "This is not/),
    });
    const html = await refusal(cache.ensure(source('error.html', 'raw')));
    expect(html.reason).toBe('NotADiskImage');
    expect(html.message).toContain('an HTML or XML document (it starts with "<!DOCTYPE html>.<html>');
    const tiny = await refusal(cache.ensure(source('tiny.raw', 'raw')));
    expect(tiny).toMatchObject({ reason: 'NotADiskImage', message: expect.stringMatching(/only 100 bytes/) });
    const gz = await refusal(cache.ensure(source('disk.raw.gz', 'raw')));
    expect(gz).toMatchObject({ reason: 'NotADiskImage', message: expect.stringMatching(/gzip-compressed data/) });
    expect(await readdir(dir)).toEqual([]);
  });

  it('refuses format mismatches both ways, and ISO unless declared iso', async () => {
    const dir = await newDir();
    const cache = new ImageCache({ urlPolicy: LOOPBACK, dir });
    expect(await refusal(cache.ensure(source('disk.raw', 'qcow2')))).toEqual({
      reason: 'FormatMismatch',
      message:
        'image tenant-a/disk-raw: declared diskFormat qcow2, but the data is raw data (no qcow2, vmdk, vdi, vhd or vhdx header)',
    });
    expect(await refusal(cache.ensure(source('good.qcow2', 'raw')))).toEqual({
      reason: 'FormatMismatch',
      message: 'image tenant-a/good-qcow2: declared diskFormat raw, but the data is qcow2',
    });
    expect((await refusal(cache.ensure(source('good.vmdk', 'qcow2')))).message).toMatch(
      /declared diskFormat qcow2, but the data is vmdk/,
    );
    expect((await refusal(cache.ensure(source('cd.iso', 'raw')))).message).toMatch(/the data is an ISO 9660 image/);
    expect(await readdir(dir)).toEqual([]);
    const iso = await cache.ensure(source('cd.iso', 'iso'));
    expect(iso).toMatchObject({ format: 'raw', sourceFormat: 'iso', virtualSize: 64 * 1024 });
  });

  it('refuses an image with a backing file, and aki before downloading', async () => {
    const dir = await newDir();
    const cache = new ImageCache({ urlPolicy: LOOPBACK, dir });
    const { reason, message } = await refusal(cache.ensure(source('overlay.qcow2', 'qcow2')));
    expect(reason).toBe('NotADiskImage');
    expect(message).toMatch(/has a backing file \(".*good\.qcow2"\); images must be self-contained/);
    const before = gets('disk.raw');
    expect((await refusal(cache.ensure(source('disk.raw', 'aki')))).reason).toBe('NotADiskImage');
    expect(gets('disk.raw')).toBe(before);
    expect(await readdir(dir)).toEqual([]);
  });

  it('fails 404, 500 and unreachable servers with DownloadFailed', async () => {
    const dir = await newDir();
    const cache = new ImageCache({ urlPolicy: LOOPBACK, dir });
    srv.setFault('good.qcow2', 'notfound');
    expect(await refusal(cache.ensure(source('good.qcow2', 'qcow2')))).toEqual({
      reason: 'DownloadFailed',
      message: expect.stringMatching(
        /^image tenant-a\/good-qcow2: GET http:\S+\/good\.qcow2 answered HTTP 404 Not Found$/,
      ),
    });
    srv.setFault('good.qcow2', 'error');
    expect((await refusal(cache.ensure(source('good.qcow2', 'qcow2')))).message).toMatch(/answered HTTP 500/);
    const closed = http.createServer();
    await new Promise<void>((r) => closed.listen(0, '127.0.0.1', r));
    const port = (closed.address() as AddressInfo).port;
    await new Promise((r) => closed.close(r));
    const dead = source('good.qcow2', 'qcow2', { url: `http://127.0.0.1:${port}/good.qcow2` });
    expect((await refusal(cache.ensure(dead))).message).toBe(
      `image tenant-a/good-qcow2: GET http://127.0.0.1:${port}/good.qcow2 failed: connect ECONNREFUSED 127.0.0.1:${port}`,
    );
    expect(await readdir(dir)).toEqual([]);
  });

  it('fails a truncated download (Content-Length larger than the body) and leaves no partial file', async () => {
    const dir = await newDir();
    const cache = new ImageCache({ urlPolicy: LOOPBACK, dir });
    srv.setFault('good.qcow2', 'truncate');
    const { reason, message } = await refusal(cache.ensure(source('good.qcow2', 'qcow2')));
    expect(reason).toBe('DownloadFailed');
    expect(message).toMatch(/downloading http:\S+ (failed after \d+ of \d+ bytes|ended after)/);
    expect(await readdir(dir)).toEqual([]);
  });

  it('follows redirects', async () => {
    const redirector = http.createServer((req, res) => {
      res.writeHead(302, { location: `${srv.url}${req.url}` }).end();
    });
    await new Promise<void>((r) => redirector.listen(0, '127.0.0.1', r));
    try {
      const port = (redirector.address() as AddressInfo).port;
      const cache = new ImageCache({ urlPolicy: LOOPBACK, dir: await newDir() });
      const img = await cache.ensure(source('disk.raw', 'raw', { url: `http://127.0.0.1:${port}/disk.raw` }));
      expect(img.sha256).toBe(digests['disk.raw']!.sha256);
      srv.setFault('disk.raw', 'notfound');
      const err = await refusal(cache.ensure(source('disk.raw', 'raw', { url: `http://127.0.0.1:${port}/disk.raw` })));
      expect(err.message).toMatch(/redirected to http:\S+\/disk\.raw\) answered HTTP 404/);
    } finally {
      redirector.closeAllConnections();
      await new Promise((r) => redirector.close(r));
    }
  });

  it('refuses to download without space: minFreeBytes, and Content-Length against statfs', async () => {
    const dir = await newDir();
    const huge = new ImageCache({ urlPolicy: LOOPBACK, dir, minFreeBytes: Number.MAX_SAFE_INTEGER });
    const a = await refusal(huge.ensure(source('good.qcow2', 'qcow2')));
    expect(a.reason).toBe('NoSpace');
    expect(a.message).toMatch(/not enough disk space in .* kept free \(minFreeBytes\)/);
    const small = new ImageCache({ urlPolicy: LOOPBACK, dir, minFreeBytes: 1000, freeBytes: async () => 100 * 1024 });
    const b = await refusal(small.ensure(source('good.qcow2', 'qcow2')));
    expect(b.reason).toBe('NoSpace');
    expect(b.message).toContain(`for the ${digests['good.qcow2']!.size} bytes of`);
    expect(b.message).toContain('100.0 KiB free');
    expect(await readdir(dir)).toEqual([]);
  });

  it('converts vmdk and vdi to qcow2, with the same disk contents', async () => {
    const dir = await newDir();
    const cache = new ImageCache({ urlPolicy: LOOPBACK, dir });
    for (const [file, fmt, detected] of [
      ['good.vmdk', 'vmdk', 'vmdk'],
      ['good.vdi', 'vdi', 'vdi'],
    ] as const) {
      const img = await cache.ensure(source(file, fmt));
      expect(img).toMatchObject({ format: 'qcow2', sourceFormat: detected, virtualSize: 64 * MiB });
      expect(img.path.endsWith('.qcow2')).toBe(true);
      expect(img.sha256).toBe(digests[file]!.sha256);
      expect((await diskInfo(img.path)).format).toBe('qcow2');
      await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', path.join(fixtures, 'good.qcow2'), img.path]);
    }
    expect((await readdir(dir)).filter((n) => n.startsWith('.'))).toEqual([]);
  });

  it('honours abort: a shared download survives one caller aborting, stops when all have', async () => {
    // A server that sends 64 KiB of a 1 MiB body and then stalls (or, for /short, ends the connection).
    const stalled: http.ServerResponse[] = [];
    const stalling = http.createServer((req, res) => {
      res.writeHead(200, { 'content-length': String(MiB) });
      if (req.url === '/short') {
        res.write(new Uint8Array(64 * 1024), () => res.socket?.end());
        return;
      }
      stalled.push(res);
      res.write(new Uint8Array(64 * 1024));
    });
    await new Promise<void>((r) => stalling.listen(0, '127.0.0.1', r));
    const base = `http://127.0.0.1:${(stalling.address() as AddressInfo).port}`;
    const dir = await newDir();
    const cache = new ImageCache({ urlPolicy: LOOPBACK, dir });
    const src = source('disk.raw', 'raw', { url: `${base}/disk.raw` });
    const a = new AbortController();
    const b = new AbortController();
    const pa = cache.ensure(src, { signal: a.signal });
    const pb = cache.ensure(src, { signal: b.signal });
    await vi.waitFor(async () => expect((await readdir(dir)).some((n) => n.startsWith('.dl-'))).toBe(true));
    a.abort(new Error('a gave up'));
    await expect(pa).rejects.toThrow('a gave up');
    expect(await readdir(dir)).not.toEqual([]); // b still downloading
    b.abort(new Error('b gave up'));
    await expect(pb).rejects.toThrow('b gave up');
    await vi.waitFor(async () => expect(await readdir(dir)).toEqual([]));
    expect(stalled).toHaveLength(1);
    // A body that ends early (the connection closed cleanly) is a failed download.
    const err = await refusal(
      new ImageCache({ urlPolicy: LOOPBACK, dir }).ensure(source('disk.raw', 'raw', { url: `${base}/short` })),
    );
    expect(err).toMatchObject({
      reason: 'DownloadFailed',
      message: expect.stringMatching(
        /(ended after 65536 bytes, but Content-Length is 1048576|failed after \d+ of 1048576 bytes: aborted)$/,
      ),
    });
    expect(await readdir(dir)).toEqual([]);
    stalling.closeAllConnections();
    await new Promise((r) => stalling.close(r));
    // The next ensure of the same image (same key) starts afresh.
    const real = new ImageCache({ urlPolicy: LOOPBACK, dir });
    expect((await real.ensure({ ...src, url: `${srv.url}/disk.raw` })).format).toBe('raw');
  });
});

describe('ImageCache.evict', () => {
  it('removes unused images oldest first, protects inUse (keys or paths) and honours the age and the target', async () => {
    const dir = await newDir();
    let now = 1_000;
    let free = 1e12;
    const cache = new ImageCache({ urlPolicy: LOOPBACK, dir, now: () => now, freeBytes: async () => free });
    const imgs: CachedImage[] = [];
    for (const t of [3_000, 1_000, 2_000, 4_000]) {
      now = t;
      imgs.push(await cache.ensure(source('disk.raw', 'raw')));
    }
    const [c, a, b, d] = imgs as [CachedImage, CachedImage, CachedImage, CachedImage]; // lastUsed a < b < c < d
    now = 10_000;
    expect(await cache.evict({ inUse: new Set([b.path, d.key]), maxUnusedAgeMs: 8_500 })).toEqual([a.path]);
    expect(await cache.evict({ inUse: new Set([b.path, d.key]), maxUnusedAgeMs: 8_500 })).toEqual([]);
    // A target that is already met removes nothing.
    expect(await cache.evict({ inUse: new Set(), targetFreeBytes: 1e12 })).toEqual([]);
    free = 0;
    expect(await cache.evict({ inUse: new Set([d.path]) })).toEqual([b.path, c.path]);
    expect((await cache.list()).map((i) => i.key)).toEqual([d.key]);
    expect(await readdir(dir)).toEqual([`${d.key}.json`, `${d.key}.raw`].sort());

    // Target: stops as soon as enough is free.
    free = 1e12;
    const more: CachedImage[] = [];
    for (const t of [20_000, 21_000, 22_000]) {
      now = t;
      more.push(await cache.ensure(source('disk.raw', 'raw')));
    }
    const counting = new ImageCache({
      urlPolicy: LOOPBACK,
      dir,
      now: () => now,
      freeBytes: async () => (4 - (await readdir(dir)).filter((n) => n.endsWith('.raw')).length) * MiB,
    });
    expect(await counting.evict({ inUse: new Set(), targetFreeBytes: 2 * MiB })).toEqual([d.path, more[0]!.path]);
    expect((await counting.list()).map((i) => i.key).sort()).toEqual([more[1]!.key, more[2]!.key].sort());
  });
});

describe('cache + root disk', () => {
  it('an overlay on a converted image reads the image', async () => {
    const dir = await newDir();
    const cache = new ImageCache({ urlPolicy: LOOPBACK, dir });
    const img = await cache.ensure(source('good.vdi', 'vdi'));
    const disk = path.join(await newDir(), 'vm', 'root.qcow2');
    await createRootDisk({ base: img, path: disk, sizeBytes: 0 });
    expect(await diskInfo(disk)).toMatchObject({ format: 'qcow2', virtualSize: 64 * MiB, backingFile: img.path });
    expect(await cache.evict({ inUse: new Set([img.path]) })).toEqual([]);
    const { stdout } = await run('qemu-io', ['-f', 'qcow2', '-r', '-c', 'read -P 0xa5 1M 64k', disk]);
    expect(stdout).toMatch(/read 65536\/65536 bytes/);
  });
});
