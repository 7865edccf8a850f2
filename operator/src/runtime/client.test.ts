import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { ApiException, KubeConfig, type KubernetesObject } from '@kubernetes/client-node';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  addFinalizer,
  applyObject,
  currentSignal,
  isAlreadyExists,
  isConflict,
  isGone,
  isNotFound,
  KubeClient,
  ownerReference,
  patchStatus,
  removeFinalizer,
  resourcePath,
  retryAfterSeconds,
  runWithSignal,
} from './client.ts';
import { systemClock } from './clock.ts';

interface Seen {
  method: string;
  url: string;
  contentType: string | undefined;
  body: unknown;
}

/** A scripted API server: each request is recorded and answered by the next queued responder. */
let server: Server;
let seen: Seen[] = [];
let responders: Array<(r: Seen) => [number, unknown]> = [];
let client: KubeClient;

async function readBody(req: IncomingMessage): Promise<unknown> {
  let data = '';
  for await (const chunk of req) data += chunk;
  return data ? JSON.parse(data) : undefined;
}

beforeAll(async () => {
  server = createServer(async (req, res) => {
    const r: Seen = {
      method: req.method!,
      url: req.url!,
      contentType: req.headers['content-type'],
      body: await readBody(req),
    };
    seen.push(r);
    const [code, body] = responders.shift()?.(r) ?? [500, { message: 'no responder' }];
    res.writeHead(code, { 'Content-Type': 'application/json', 'Retry-After': '7' });
    res.end(JSON.stringify(body));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const kc = new KubeConfig();
  kc.loadFromOptions({
    clusters: [
      { name: 'c', server: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, skipTLSVerify: true },
    ],
    users: [{ name: 'u', token: 't0k3n' }],
    contexts: [{ name: 'x', cluster: 'c', user: 'u' }],
    currentContext: 'x',
  });
  client = new KubeClient(kc);
});

afterAll(() => new Promise<void>((resolve) => server.close(() => resolve())));

beforeEach(() => {
  seen = [];
  responders = [];
});

const thing = (rv: string, finalizers?: string[]): KubernetesObject => ({
  apiVersion: 'example.com/v1',
  kind: 'Thing',
  metadata: { name: 'a', namespace: 'ns', resourceVersion: rv, ...(finalizers ? { finalizers } : {}) },
});
const gvr = { group: 'example.com', version: 'v1', plural: 'things' };

describe('resourcePath', () => {
  it('builds core and group paths, namespaced or not, with subresources', () => {
    expect(resourcePath({ group: '', version: 'v1', plural: 'configmaps' }, { namespace: 'n', name: 'x' })).toBe(
      '/api/v1/namespaces/n/configmaps/x',
    );
    expect(resourcePath(gvr, { name: 'x', subresource: 'status' })).toBe('/apis/example.com/v1/things/x/status');
    expect(resourcePath(gvr)).toBe('/apis/example.com/v1/things');
  });
});

describe('ambient reconcile signal', () => {
  it('follows the reconcile through awaits; timer callbacks (work it schedules) run outside it', async () => {
    const ac = new AbortController();
    let inTimer: AbortSignal | undefined | null = null;
    await runWithSignal(ac.signal, async () => {
      await new Promise<void>((resolve) => {
        systemClock.setTimer(() => {
          inTimer = currentSignal();
          resolve();
        }, 0);
      });
      expect(currentSignal()).toBe(ac.signal);
    });
    expect(inTimer).toBeUndefined();
    expect(currentSignal()).toBeUndefined();
  });
});

describe('KubeClient helpers against a scripted API server', () => {
  it('every request made under runWithSignal honours that signal: none is sent once it has aborted', async () => {
    const ac = new AbortController();
    responders.push(() => [200, thing('1')]);
    const first = await runWithSignal(ac.signal, async () => {
      const got = await client.get(gvr, 'a', 'ns');
      ac.abort(new Error('leadership lost'));
      // A reconcile going on after the abort: its next writes fail before reaching the server.
      await expect(patchStatus(client, gvr, thing('1'), { phase: 'Late' }, { fieldManager: 'm' })).rejects.toThrow(
        'leadership lost',
      );
      await expect(addFinalizer(client, gvr, 'a', 'ns', 'f')).rejects.toThrow('leadership lost');
      return got;
    });
    expect(first.metadata?.resourceVersion).toBe('1');
    expect(seen.map((r) => r.method)).toEqual(['GET']);
    // Outside it, requests are unaffected.
    responders.push(() => [200, thing('2')]);
    await client.get(gvr, 'a', 'ns');
    expect(seen).toHaveLength(2);
  });

  it('patchStatus: server-side apply on /status with field manager and force, only status in the body', async () => {
    responders.push(() => [200, thing('2')]);
    await patchStatus(
      client,
      gvr,
      { ...thing('1'), spec: { big: true } } as KubernetesObject,
      { phase: 'Ready' },
      {
        fieldManager: 'stratus-things',
      },
    );
    const r = seen[0]!;
    expect(r.method).toBe('PATCH');
    expect(r.url).toBe('/apis/example.com/v1/namespaces/ns/things/a/status?fieldManager=stratus-things&force=true');
    expect(r.contentType).toBe('application/apply-patch+yaml');
    expect(r.body).toEqual({
      apiVersion: 'example.com/v1',
      kind: 'Thing',
      metadata: { name: 'a', namespace: 'ns' },
      status: { phase: 'Ready' },
    });
  });

  it('applyObject strips server-owned metadata', async () => {
    responders.push(() => [200, thing('2')]);
    const o = { ...thing('1'), metadata: { ...thing('1').metadata, uid: 'u', managedFields: [], labels: { a: 'b' } } };
    await applyObject(client, gvr, o, { fieldManager: 'm' });
    expect(seen[0]!.body).toEqual({
      apiVersion: 'example.com/v1',
      kind: 'Thing',
      metadata: { name: 'a', namespace: 'ns', labels: { a: 'b' } },
    });
    expect(seen[0]!.url).toContain('force=true');
  });

  it('addFinalizer: JSON patch guarded by a resourceVersion test, re-read and retried after a 422', async () => {
    responders.push(() => [200, thing('1')]);
    responders.push(() => [422, { kind: 'Status', reason: 'Invalid', message: 'test failed' }]);
    responders.push(() => [200, thing('2', ['x/other'])]);
    responders.push(() => [200, thing('3', ['x/other', 'x/mine'])]);
    const out = await addFinalizer(client, gvr, 'a', 'ns', 'x/mine');
    expect(out.metadata?.finalizers).toEqual(['x/other', 'x/mine']);
    expect(seen.map((s) => s.method)).toEqual(['GET', 'PATCH', 'GET', 'PATCH']);
    expect(seen[1]!.contentType).toBe('application/json-patch+json');
    expect(seen[1]!.body).toEqual([
      { op: 'test', path: '/metadata/resourceVersion', value: '1' },
      { op: 'add', path: '/metadata/finalizers', value: ['x/mine'] },
    ]);
    expect(seen[3]!.body).toEqual([
      { op: 'test', path: '/metadata/resourceVersion', value: '2' },
      { op: 'add', path: '/metadata/finalizers/-', value: 'x/mine' },
    ]);
  });

  it('addFinalizer is a no-op when present; removeFinalizer removes by index with tests', async () => {
    responders.push(() => [200, thing('4', ['x/mine'])]);
    await addFinalizer(client, gvr, 'a', 'ns', 'x/mine');
    expect(seen).toHaveLength(1);
    responders.push(() => [200, thing('4', ['x/other', 'x/mine'])]);
    responders.push(() => [200, thing('5', ['x/other'])]);
    await removeFinalizer(client, gvr, 'a', 'ns', 'x/mine');
    expect(seen[2]!.body).toEqual([
      { op: 'test', path: '/metadata/resourceVersion', value: '4' },
      { op: 'test', path: '/metadata/finalizers/1', value: 'x/mine' },
      { op: 'remove', path: '/metadata/finalizers/1' },
    ]);
  });

  it('gives up after the attempts and surfaces ApiException with classification', async () => {
    for (let i = 0; i < 2; i++) {
      responders.push(() => [200, thing('1')]);
      responders.push(() => [409, { kind: 'Status', reason: 'Conflict', message: 'changed' }]);
    }
    const err = await addFinalizer(client, gvr, 'a', 'ns', 'x/mine', { attempts: 2 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ApiException);
    expect(isConflict(err)).toBe(true);
    expect(isAlreadyExists(err)).toBe(false);
    expect(retryAfterSeconds(err)).toBe(7);
    expect(seen).toHaveLength(4);

    responders.push(() => [409, { kind: 'Status', reason: 'AlreadyExists' }]);
    const exists = await client.create(gvr, thing('')).catch((e: unknown) => e);
    expect(isAlreadyExists(exists)).toBe(true);
    expect(isConflict(exists)).toBe(false);
    responders.push(() => [404, { kind: 'Status', reason: 'NotFound' }]);
    expect(isNotFound(await client.get(gvr, 'zz', 'ns').catch((e: unknown) => e))).toBe(true);
    expect(isGone({ statusCode: 410 })).toBe(true);
  });

  it('listAll follows continue tokens and keeps the first resourceVersion', async () => {
    responders.push(() => [200, { metadata: { resourceVersion: '9', continue: 'tok' }, items: [thing('1')] }]);
    responders.push(() => [200, { metadata: { resourceVersion: '9' }, items: [thing('2')] }]);
    const l = await client.listAll(gvr, { namespace: 'ns', labelSelector: 'a=b' }, 1);
    expect(l.items).toHaveLength(2);
    expect(l.metadata?.resourceVersion).toBe('9');
    expect(seen[0]!.url).toBe('/apis/example.com/v1/namespaces/ns/things?labelSelector=a%3Db&limit=1');
    expect(seen[1]!.url).toContain('continue=tok');
  });
});

describe('ownerReference', () => {
  it('builds a controller reference and requires uid', () => {
    const owner = { ...thing('1'), metadata: { ...thing('1').metadata, uid: 'u-1' } };
    expect(ownerReference(owner)).toEqual({
      apiVersion: 'example.com/v1',
      kind: 'Thing',
      name: 'a',
      uid: 'u-1',
      controller: true,
      blockOwnerDeletion: true,
    });
    expect(ownerReference(owner, { controller: false }).controller).toBe(false);
    expect(() => ownerReference(thing('1'))).toThrow(/uid/);
  });
});
