// A tiny loopback HTTP file server for tests: Image objects download from http://127.0.0.1:<port>/<file>.
// GET and HEAD, Content-Length, single byte ranges (206), and injectable faults per file name:
//   notfound  404 although the file exists
//   corrupt   full length, one byte flipped in the middle (checksum tests)
//   truncate  advertises the full Content-Length, then drops the connection half way
//   error     500
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { Transform } from 'node:stream';

export type Fault = 'notfound' | 'corrupt' | 'truncate' | 'error';

export interface ServeOptions {
  /** Faults keyed by file name (the URL path without its leading slash). */
  faults?: Record<string, Fault>;
}

export interface RequestRecord {
  method: string;
  path: string;
  status: number;
  range?: string;
}

export interface FileServer {
  /** http://127.0.0.1:<port> (no trailing slash). */
  url: string;
  port: number;
  /** Every request answered so far, in order. */
  requests: RequestRecord[];
  /** Sets (or with undefined clears) the fault for one file. */
  setFault(name: string, fault: Fault | undefined): void;
  close(): Promise<void>;
}

function flipMiddle(size: number, start: number): Transform {
  const target = Math.floor(size / 2);
  let pos = start;
  return new Transform({
    transform(chunk: Buffer, _enc, done) {
      if (target >= pos && target < pos + chunk.length) {
        const copy = Buffer.from(chunk);
        copy[target - pos]! ^= 0xff;
        chunk = copy;
      }
      pos += chunk.length;
      done(null, chunk);
    },
  });
}

/** Serves the regular files in `dir` on 127.0.0.1:`port` (0 = any free port). */
export async function start(dir: string, port = 0, opts: ServeOptions = {}): Promise<FileServer> {
  const root = path.resolve(dir);
  const faults = new Map<string, Fault>(Object.entries(opts.faults ?? {}));
  const requests: RequestRecord[] = [];

  const server = http.createServer(async (req, res) => {
    const method = req.method ?? 'GET';
    let name = '';
    const finish = (status: number, body?: string) => {
      requests.push({ method, path: `/${name}`, status, range: req.headers.range });
      res.statusCode = status;
      if (body !== undefined) {
        res.setHeader('Content-Type', 'text/plain; charset=utf-8');
        res.setHeader('Content-Length', Buffer.byteLength(body));
        res.end(method === 'HEAD' ? undefined : body);
      }
    };
    try {
      name = decodeURIComponent(new URL(req.url ?? '/', 'http://x').pathname).replace(/^\/+/, '');
    } catch {
      finish(400, 'bad path\n');
      return;
    }
    if (method !== 'GET' && method !== 'HEAD') {
      res.setHeader('Allow', 'GET, HEAD');
      finish(405, 'method not allowed\n');
      return;
    }
    const file = path.resolve(root, name);
    if (!name || (file !== root && !file.startsWith(`${root}${path.sep}`))) {
      finish(404, 'not found\n');
      return;
    }
    const fault = faults.get(name);
    if (fault === 'notfound') return finish(404, 'not found\n');
    if (fault === 'error') return finish(500, 'injected error\n');
    let size: number;
    let mtime: Date;
    try {
      const st = await stat(file);
      if (!st.isFile()) return finish(404, 'not found\n');
      size = st.size;
      mtime = st.mtime;
    } catch {
      return finish(404, 'not found\n');
    }
    let startAt = 0;
    let end = size - 1;
    let status = 200;
    const range = req.headers.range;
    if (range) {
      const m = /^bytes=(\d*)-(\d*)$/.exec(range.trim());
      if (m && (m[1] || m[2])) {
        if (m[1]) {
          startAt = Number(m[1]);
          if (m[2]) end = Math.min(Number(m[2]), size - 1);
        } else {
          startAt = Math.max(0, size - Number(m[2]));
        }
        if (startAt > end || startAt >= size) {
          res.setHeader('Content-Range', `bytes */${size}`);
          return finish(416, 'range not satisfiable\n');
        }
        status = 206;
        res.setHeader('Content-Range', `bytes ${startAt}-${end}/${size}`);
      }
    }
    const length = size === 0 ? 0 : end - startAt + 1;
    res.setHeader('Content-Type', 'application/octet-stream');
    res.setHeader('Content-Length', length);
    res.setHeader('Accept-Ranges', 'bytes');
    res.setHeader('Last-Modified', mtime.toUTCString());
    finish(status);
    if (method === 'HEAD' || length === 0) {
      res.end();
      return;
    }
    if (fault === 'truncate') {
      const half = Math.max(0, Math.floor(length / 2) - 1);
      const stream = createReadStream(file, { start: startAt, end: startAt + half });
      stream.on('end', () => res.destroy());
      stream.pipe(res, { end: false });
      return;
    }
    const stream = createReadStream(file, { start: startAt, end });
    stream.on('error', () => res.destroy());
    if (fault === 'corrupt') stream.pipe(flipMiddle(size, startAt)).pipe(res);
    else stream.pipe(res);
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => {
      server.off('error', reject);
      resolve();
    });
  });
  const actual = (server.address() as AddressInfo).port;
  return {
    url: `http://127.0.0.1:${actual}`,
    port: actual,
    requests,
    setFault(name, fault) {
      if (fault) faults.set(name, fault);
      else faults.delete(name);
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
