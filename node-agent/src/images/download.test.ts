// ImageCache downloads against hostile and odd HTTP servers on loopback: pure Node (node:net/node:http servers in
// this process), no external binary. A declared checksum that cannot match stops ensure() right after the
// download, before qemu-img: its ChecksumMismatch message carries the byte count and the sha256 of what was
// downloaded, which is how these tests see a complete, correct download.
import { createHash } from 'node:crypto';
import diagnostics from 'node:diagnostics_channel';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import http from 'node:http';
import net, { type AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { spawnFailureMessage } from '../compute.ts';
import { ImageCache, ImageError, type ImageSource } from './cache.ts';

const BODY = Buffer.alloc(64 * 1024);
for (let i = 0; i < BODY.length; i++) BODY[i] = (i * 31) & 0xff;
const BODY_SHA = createHash('sha256').update(BODY).digest('hex');
const WRONG = '0'.repeat(64);
const LOOPBACK = { allowCidrs: ['127.0.0.0/8'] };

const temps: string[] = [];
const servers: net.Server[] = [];
async function newDir(): Promise<string> {
  const d = await mkdtemp(path.join(os.tmpdir(), 'stratus-dl-'));
  temps.push(d);
  return d;
}

// Every client socket this process opens (both fetch and node:http connect through net), with a promise of its end.
const clientSockets: Array<{ socket: net.Socket; ended: Promise<void> }> = [];
const onClientSocket = (msg: unknown) => {
  const socket = (msg as { socket: net.Socket }).socket;
  // First in line: we see the end of the connection before the HTTP client handles it.
  const ended = new Promise<void>((resolve) => socket.prependListener('end', () => resolve()));
  clientSockets.push({ socket, ended });
};
// Uncaught exceptions would end a node agent; here they are collected (and fail the test).
const uncaught: unknown[] = [];
const onUncaught = (err: unknown) => uncaught.push(err);

beforeAll(() => {
  diagnostics.subscribe('net.client.socket', onClientSocket);
  process.on('uncaughtException', onUncaught);
});
afterAll(async () => {
  diagnostics.unsubscribe('net.client.socket', onClientSocket);
  process.off('uncaughtException', onUncaught);
  for (const s of servers) s.close();
  for (const d of temps) await rm(d, { recursive: true, force: true });
});
afterEach(() => {
  expect(uncaught).toEqual([]);
});

async function listen(server: net.Server): Promise<number> {
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return (server.address() as AddressInfo).port;
}

/** The client end of the connection whose server side is `serverSide`. */
function clientOf(serverSide: net.Socket): { socket: net.Socket; ended: Promise<void> } {
  const c = clientSockets.find((s) => s.socket.localPort === serverSide.remotePort);
  if (!c) throw new Error(`no client socket for port ${serverSide.remotePort}`);
  return c;
}

/**
 * A raw HTTP/1.0 server: on each request it runs `respond` for the connection number n (0, 1, ...). `conns` are
 * the server ends of the connections.
 */
async function rawServer(respond: (sock: net.Socket, n: number) => void) {
  const conns: net.Socket[] = [];
  const server = net.createServer((sock) => {
    const n = conns.length;
    conns.push(sock);
    sock.on('error', () => {});
    sock.once('data', () => respond(sock, n));
  });
  const port = await listen(server);
  return { port, conns, url: `http://127.0.0.1:${port}/image.raw` };
}

let uid = 0;
function source(url: string, checksum = WRONG): ImageSource {
  uid++;
  return {
    name: 'img',
    namespace: 'tenant-a',
    uid: `00000000-0000-4000-8000-${String(uid).padStart(12, '0')}`,
    url,
    diskFormat: 'raw',
    checksum: { algorithm: 'sha256', value: checksum },
  };
}

async function failure(p: Promise<unknown>): Promise<ImageError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(ImageError);
  return err as ImageError;
}

/** The whole BODY was downloaded (see the file comment). */
function downloadedWhole(err: ImageError): void {
  expect(err.reason).toBe('ChecksumMismatch');
  expect(err.message).toContain(`sha256 of the ${BODY.length} bytes downloaded from`);
  expect(err.message).toContain(` is ${BODY_SHA}, expected ${WRONG}`);
}

describe('ImageCache download: servers that close or reset the connection', () => {
  it('survives a Connection: close (HTTP/1.0) server that closes after the body while the body waits unread', async () => {
    // The server sends headers, the whole body and FIN at once. The consumer is held until the connection has
    // ended on the client side, so the body sits unread (backpressure) when the close arrives: the undici of Node
    // 24.21 (fetch) threw `assert(!this.paused)` from the socket's 'end' handler here (nodejs/undici#5360; 64 KiB
    // fills its body buffer). The node:http client reads ahead 1 MiB, so its socket reaches the end.
    for (const withLength of [true, false]) {
      const srv = await rawServer((sock) => {
        const length = withLength ? `Content-Length: ${BODY.length}\r\n` : '';
        sock.write(`HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n${length}Connection: close\r\n\r\n`);
        sock.write(BODY);
        sock.end();
      });
      const dir = await newDir();
      const cache = new ImageCache({
        dir,
        urlPolicy: LOOPBACK,
        // Called once the response headers are in, before the body is read: the slow consumer.
        freeBytes: async () => {
          await clientOf(srv.conns[0]!).ended;
          return 1e12;
        },
      });
      downloadedWhole(await failure(cache.ensure(source(srv.url))));
      expect(await readdir(dir)).toEqual([]);
    }
  });

  it('fails a download whose server resets the connection mid-body, and the next attempt succeeds', async () => {
    const srv = await rawServer((sock, n) => {
      sock.write(`HTTP/1.0 200 OK\r\nContent-Length: ${BODY.length}\r\nConnection: close\r\n\r\n`);
      if (n === 0) {
        sock.write(BODY.subarray(0, BODY.length / 2), () => sock.resetAndDestroy());
      } else {
        sock.end(BODY);
      }
    });
    const dir = await newDir();
    const cache = new ImageCache({ dir, urlPolicy: LOOPBACK });
    const src = source(srv.url);
    const err = await failure(cache.ensure(src));
    expect(err.reason).toBe('DownloadFailed');
    expect(err.message).toMatch(
      new RegExp(
        `^image tenant-a/img: downloading ${srv.url} (failed after \\d+ of ${BODY.length} bytes: .*(ECONNRESET|aborted|socket hang up)|ended after \\d+ bytes, but Content-Length is ${BODY.length})`,
      ),
    );
    expect(await readdir(dir)).toEqual([]);
    // The same Image again, now that the server behaves.
    downloadedWhole(await failure(cache.ensure(src)));
    expect(srv.conns).toHaveLength(2);
  });

  it('fails a download whose server resets the connection before any byte of the body', async () => {
    const srv = await rawServer((sock) => {
      sock.write(`HTTP/1.0 200 OK\r\nContent-Length: ${BODY.length}\r\n\r\n`, () => sock.resetAndDestroy());
    });
    const err = await failure(new ImageCache({ dir: await newDir(), urlPolicy: LOOPBACK }).ensure(source(srv.url)));
    expect(err.reason).toBe('DownloadFailed');
    expect(err.message).toContain(`image tenant-a/img: `);
  });

  it('survives a 1 MiB body sent with Connection: close to a consumer that reads it slowly', async () => {
    const big = Buffer.alloc(1024 * 1024, 0x5a);
    const srv = await rawServer((sock) => {
      sock.write(`HTTP/1.0 200 OK\r\nContent-Length: ${big.length}\r\nConnection: close\r\n\r\n`);
      sock.end(big);
    });
    let calls = 0;
    const cache = new ImageCache({
      dir: await newDir(),
      urlPolicy: LOOPBACK,
      freeBytes: async () => {
        // Before the body: wait until the server has handed every byte and its FIN to the kernel.
        if (calls++ === 0) {
          const s = srv.conns[0]!;
          if (!s.writableFinished) await new Promise((r) => s.once('finish', r));
        }
        return 1e12;
      },
    });
    const err = await failure(cache.ensure(source(srv.url)));
    expect(err.reason).toBe('ChecksumMismatch');
    expect(err.message).toContain(`is ${createHash('sha256').update(big).digest('hex')}`);
  });
});

describe('ImageCache download: HTTP behaviour kept from the fetch-based client', () => {
  it('follows redirects and fails non-2xx answers with the status', async () => {
    const server = http.createServer((req, res) => {
      if (req.url === '/old') res.writeHead(301, { location: '/new' }).end();
      else if (req.url === '/new') res.writeHead(200, { 'content-length': BODY.length }).end(BODY);
      else if (req.url === '/gone') res.writeHead(302, { location: `http://127.0.0.1:${port}/missing` }).end();
      else res.writeHead(404).end('nope');
    });
    const port = await listen(server);
    const cache = new ImageCache({ dir: await newDir(), urlPolicy: LOOPBACK });
    downloadedWhole(await failure(cache.ensure(source(`http://127.0.0.1:${port}/old`))));
    const missing = await failure(cache.ensure(source(`http://127.0.0.1:${port}/missing`)));
    expect(missing.message).toBe(
      `image tenant-a/img: GET http://127.0.0.1:${port}/missing answered HTTP 404 Not Found`,
    );
    const gone = await failure(cache.ensure(source(`http://127.0.0.1:${port}/gone`)));
    expect(gone.message).toBe(
      `image tenant-a/img: GET http://127.0.0.1:${port}/gone (redirected to http://127.0.0.1:${port}/missing) answered HTTP 404 Not Found`,
    );
  });

  it('ends a stalled download after the idle timeout, and on abort', async () => {
    const srv = await rawServer((sock) => {
      sock.write(`HTTP/1.0 200 OK\r\nContent-Length: ${BODY.length}\r\n\r\n`);
      sock.write(BODY.subarray(0, 1000)); // then nothing
    });
    const dir = await newDir();
    const idle = new ImageCache({ dir, urlPolicy: LOOPBACK, idleTimeoutMs: 50 });
    const err = await failure(idle.ensure(source(srv.url)));
    expect(err.reason).toBe('DownloadFailed');
    expect(err.message).toMatch(/failed after \d+ of 65536 bytes: no data from the server for 50 ms$/);
    const ac = new AbortController();
    const aborting = new ImageCache({ dir, urlPolicy: LOOPBACK });
    const p = aborting.ensure(source(srv.url), { signal: ac.signal });
    await vi.waitFor(() => expect(srv.conns).toHaveLength(2));
    ac.abort(new Error('caller gave up'));
    await expect(p).rejects.toThrow('caller gave up');
    // The caller is answered at once; the download's partial file goes right after.
    await vi.waitFor(async () => expect(await readdir(dir)).toEqual([]));
  });
});

describe('ImageCache download: URL guard (server-side request forgery)', () => {
  const refusedBody = (url: string, address: string, what: string, via?: string) =>
    `image URL ${url}${via ? ` (redirected from ${via})` : ''} resolves to ${address}, ${what}; refused (allow it with --image-url-allow-cidr)`;

  it('refuses a loopback URL by default, before connecting, with the reason the Server shows', async () => {
    const srv = await rawServer((sock) => sock.end(`HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n`));
    const dir = await newDir();
    const err = await failure(new ImageCache({ dir }).ensure(source(srv.url)));
    expect(err.reason).toBe('DownloadFailed');
    expect(err.message).toBe(`image tenant-a/img: ${refusedBody(srv.url, '127.0.0.1', 'a loopback address')}`);
    expect(srv.conns).toHaveLength(0);
    expect(await readdir(dir)).toEqual([]);
    // What the agent writes into the Server's fault and SpawnFailed condition.
    expect(spawnFailureMessage(err, 'tenant-a/img')).toBe(
      `image tenant-a/img unusable: download failed: image tenant-a/img: ${refusedBody(srv.url, '127.0.0.1', 'a loopback address')}`,
    );
  });

  it('checks every redirect hop: a redirect to a denied address is refused without connecting to it', async () => {
    const requests: string[] = [];
    const server = http.createServer((req, res) => {
      requests.push(`${req.headers.host}${req.url}`);
      if (req.url === '/to-loopback') res.writeHead(302, { location: `http://127.0.0.2:${port}/x` }).end();
      else if (req.url === '/to-metadata') {
        res.writeHead(307, { location: 'http://metadata.test/latest/meta-data/' }).end();
      } else res.writeHead(200, { 'content-length': BODY.length }).end(BODY);
    });
    const port = await listen(server);
    const calls: string[] = [];
    const cache = new ImageCache({
      dir: await newDir(),
      urlPolicy: {
        allowCidrs: ['127.0.0.1/32'], // only the server's own address
        resolve: async (host) => {
          calls.push(host);
          if (host === 'metadata.test') return [{ address: '169.254.169.254', family: 4 }];
          throw new Error(`getaddrinfo ENOTFOUND ${host}`);
        },
      },
    });
    const first = `http://127.0.0.1:${port}/to-loopback`;
    expect((await failure(cache.ensure(source(first)))).message).toBe(
      `image tenant-a/img: ${refusedBody(`http://127.0.0.2:${port}/x`, '127.0.0.2', 'a loopback address', first)}`,
    );
    const second = `http://127.0.0.1:${port}/to-metadata`;
    expect((await failure(cache.ensure(source(second)))).message).toBe(
      `image tenant-a/img: ${refusedBody('http://metadata.test/latest/meta-data/', '169.254.169.254', 'a link-local address', second)}`,
    );
    expect(requests).toEqual([`127.0.0.1:${port}/to-loopback`, `127.0.0.1:${port}/to-metadata`]);
    expect(calls).toEqual(['metadata.test']);
  });

  it('connects to the address it vetted (pinned), without asking DNS again', async () => {
    const hosts: string[] = [];
    const server = http.createServer((req, res) => {
      hosts.push(req.headers.host ?? '');
      res.writeHead(200, { 'content-length': BODY.length }).end(BODY);
    });
    const port = await listen(server);
    const calls: string[] = [];
    // images.stratus.invalid exists only in this resolver (.invalid never resolves in DNS): the download can only
    // reach the server if the connection uses the address the guard vetted.
    const cache = new ImageCache({
      dir: await newDir(),
      urlPolicy: {
        allowCidrs: ['127.0.0.0/8'],
        resolve: async (host) => {
          calls.push(host);
          return [{ address: '127.0.0.1', family: 4 }];
        },
      },
    });
    downloadedWhole(await failure(cache.ensure(source(`http://images.stratus.invalid:${port}/img.raw`))));
    expect(calls).toEqual(['images.stratus.invalid']);
    expect(hosts).toEqual([`images.stratus.invalid:${port}`]);
  });
});
