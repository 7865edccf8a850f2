import { createHash } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type FileServer, start } from './serve.ts';

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

describe('loopback file server', () => {
  let dir: string;
  let srv: FileServer;
  const data = Buffer.alloc(300_000);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;

  beforeAll(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'stratus-serve-'));
    await writeFile(path.join(dir, 'disk.qcow2'), data);
    srv = await start(dir);
  });
  afterAll(async () => {
    await srv.close();
    await rm(dir, { recursive: true, force: true });
  });

  it('serves GET and HEAD with Content-Length on 127.0.0.1', async () => {
    expect(srv.url).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
    const head = await fetch(`${srv.url}/disk.qcow2`, { method: 'HEAD' });
    expect(head.status).toBe(200);
    expect(head.headers.get('content-length')).toBe(String(data.length));
    const get = await fetch(`${srv.url}/disk.qcow2`);
    expect(sha(new Uint8Array(await get.arrayBuffer()))).toBe(sha(data));
  });

  it('answers byte ranges', async () => {
    const res = await fetch(`${srv.url}/disk.qcow2`, { headers: { range: 'bytes=10-19' } });
    expect(res.status).toBe(206);
    expect(res.headers.get('content-range')).toBe(`bytes 10-19/${data.length}`);
    expect(Buffer.from(await res.arrayBuffer())).toEqual(data.subarray(10, 20));
  });

  it('does not leave its directory and 404s missing files', async () => {
    expect((await fetch(`${srv.url}/nope`)).status).toBe(404);
    expect((await fetch(`${srv.url}/..%2f..%2fetc%2fpasswd`)).status).toBe(404);
    expect((await fetch(`${srv.url}/disk.qcow2`, { method: 'POST' })).status).toBe(405);
  });

  it('injects faults', async () => {
    srv.setFault('disk.qcow2', 'notfound');
    expect((await fetch(`${srv.url}/disk.qcow2`)).status).toBe(404);
    srv.setFault('disk.qcow2', 'corrupt');
    const corrupt = Buffer.from(await (await fetch(`${srv.url}/disk.qcow2`)).arrayBuffer());
    expect(corrupt.length).toBe(data.length);
    expect(sha(corrupt)).not.toBe(sha(data));
    srv.setFault('disk.qcow2', 'truncate');
    await expect(fetch(`${srv.url}/disk.qcow2`).then((r) => r.arrayBuffer())).rejects.toThrow();
    srv.setFault('disk.qcow2', undefined);
    expect((await fetch(`${srv.url}/disk.qcow2`)).status).toBe(200);
    expect(srv.requests.filter((r) => r.status === 404).length).toBeGreaterThanOrEqual(2);
  });
});
