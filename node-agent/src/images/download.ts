// GET of an image URL with node:http/node:https (not fetch: the undici bundled with Node 24.21 kills the process
// with an uncatchable `assert(!this.paused)` when a server closes the connection after the body while the body is
// paused by backpressure, nodejs/undici#5360, which any HTTP/1.0 or `Connection: close` server does).
//
// Every hop (the URL and each redirect) is vetted by the UrlGuard and connected to the addresses it vetted; every
// error of the request, the socket and the response ends in a rejected promise or an errored body stream, never in
// an uncaught exception.
import http, { type IncomingMessage, type RequestOptions } from 'node:http';
import https from 'node:https';
import type { LookupFunction } from 'node:net';
import type { ResolvedAddress, UrlGuard } from './urlguard.ts';

export interface HttpGetOptions {
  guard: UrlGuard;
  signal: AbortSignal;
  headers?: Record<string, string>;
  /** Redirects followed (default 10). */
  maxRedirects?: number;
  /** The request fails when the server sends nothing for this long, before or during the body (default 300 s). */
  idleTimeoutMs?: number;
}

export interface HttpGetResult {
  /** The final response (2xx or not); its 'error' events are already handled: read it or destroy it. */
  res: IncomingMessage;
  /** The URL that answered (after redirects). */
  url: URL;
}

const REDIRECTS = new Set([301, 302, 303, 307, 308]);

/** A connection pinned to the vetted addresses: the socket connects to them, without another DNS query. */
function pinnedLookup(addrs: ResolvedAddress[]): LookupFunction {
  return (_host, options, callback) => {
    const cb = callback as (err: Error | null, address: unknown, family?: number) => void;
    const wanted =
      options.family === 4 || options.family === 6 ? addrs.filter((a) => a.family === options.family) : addrs;
    if (wanted.length === 0) {
      const err = new Error(`no IPv${options.family} address among the vetted ones`);
      cb(Object.assign(err, { code: 'ENOTFOUND' }), undefined);
    } else if (options.all) {
      cb(
        null,
        wanted.map((a) => ({ address: a.address, family: a.family })),
      );
    } else {
      cb(null, wanted[0]!.address, wanted[0]!.family);
    }
  };
}

function requestOnce(url: URL, addrs: ResolvedAddress[], o: HttpGetOptions): Promise<IncomingMessage> {
  const idle = o.idleTimeoutMs ?? 300_000;
  return new Promise<IncomingMessage>((resolve, reject) => {
    const mod = url.protocol === 'https:' ? https : http;
    // highWaterMark: node:http honours it for the socket and the response (not in @types/node's RequestOptions).
    const options: RequestOptions & { highWaterMark: number } = {
      method: 'GET',
      headers: o.headers ?? {},
      // A connection of its own: no pooled socket that was connected for another lookup.
      agent: false,
      lookup: pinnedLookup(addrs),
      signal: o.signal,
      timeout: idle,
      // Reads ahead up to 1 MiB while the consumer writes to disk (fewer pauses of the socket than the default).
      highWaterMark: 1024 * 1024,
    };
    const req = mod.request(url, options);
    let response: IncomingMessage | undefined;
    // Stays attached for the life of the request: a socket error after the response must not go unhandled.
    req.on('error', reject);
    req.on('timeout', () => {
      const err = new Error(
        `no data from the server for ${idle >= 1000 ? `${Math.round(idle / 1000)} s` : `${idle} ms`}`,
      );
      response?.destroy(err); // the body's reader sees this error rather than "aborted"
      req.destroy(err);
    });
    req.on('response', (res) => {
      response = res;
      // The body is read later (after the space check); its errors are kept by the stream until then.
      res.on('error', () => {});
      resolve(res);
    });
    req.end();
  });
}

/**
 * GET `url`, following redirects; each hop is vetted by `o.guard` (UrlRefusedError) and connected to the vetted
 * addresses. Rejects with the request's error (connection refused, reset, timeout, abort).
 */
export async function httpGet(url: URL, o: HttpGetOptions): Promise<HttpGetResult> {
  const max = o.maxRedirects ?? 10;
  let current = url;
  for (let hop = 0; ; hop++) {
    if (current.protocol !== 'http:' && current.protocol !== 'https:') {
      throw new Error(
        `redirected to ${current.href}: unsupported URL scheme ${current.protocol} (http and https only)`,
      );
    }
    const addrs = await o.guard.vet(current, hop > 0 ? url.href : undefined);
    o.signal.throwIfAborted();
    const res = await requestOnce(current, addrs, o);
    const location = res.headers.location;
    if (!REDIRECTS.has(res.statusCode ?? 0) || !location) return { res, url: current };
    res.destroy();
    if (hop >= max) throw new Error(`more than ${max} redirects (the last to ${location})`);
    try {
      current = new URL(location, current);
    } catch {
      throw new Error(`redirected to an invalid URL ${JSON.stringify(location)}`);
    }
  }
}
