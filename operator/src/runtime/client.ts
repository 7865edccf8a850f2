// A small REST client addressed by group/version/plural (core group = ''), built on client-node's KubeConfig
// authentication and HTTP library, plus the helpers controllers need: server-side apply (object and /status),
// finalizers guarded by resourceVersion, owner references, and error classification from ApiException.code.

import {
  ApiException,
  HttpMethod,
  IsomorphicFetchHttpLibrary,
  type KubeConfig,
  type KubernetesListObject,
  type KubernetesObject,
  PatchStrategy,
  RequestContext,
  type V1OwnerReference,
  type V1Status,
} from '@kubernetes/client-node';
import { currentSignal } from './signal.ts';

// Every request also honours the ambient signal of its async context (a reconcile's: see signal.ts).
export { currentSignal, runWithSignal } from './signal.ts';

export interface GVR {
  /** '' for the core group. */
  group: string;
  version: string;
  /** The resource (lowercase plural), e.g. 'configmaps'. */
  plural: string;
}

export function apiVersionOf(gvr: Pick<GVR, 'group' | 'version'>): string {
  return gvr.group ? `${gvr.group}/${gvr.version}` : gvr.version;
}

/** Path of a collection or object: /api/v1[/namespaces/ns]/plural[/name[/sub]] or /apis/g/v/... */
export function resourcePath(gvr: GVR, opts: { namespace?: string; name?: string; subresource?: string } = {}): string {
  let p = gvr.group ? `/apis/${gvr.group}/${gvr.version}` : `/api/${gvr.version}`;
  if (opts.namespace) p += `/namespaces/${encodeURIComponent(opts.namespace)}`;
  p += `/${gvr.plural}`;
  if (opts.name !== undefined) p += `/${encodeURIComponent(opts.name)}`;
  if (opts.subresource) p += `/${opts.subresource}`;
  return p;
}

export interface ListOptions {
  namespace?: string;
  labelSelector?: string;
  fieldSelector?: string;
  limit?: number;
  continue?: string;
  resourceVersion?: string;
}

export interface WriteOptions {
  fieldManager?: string;
  dryRun?: boolean;
  subresource?: string;
}

export interface PatchOptions extends WriteOptions {
  /** SSA only: take ownership of conflicting fields. */
  force?: boolean;
}

export interface DeleteOptions {
  propagationPolicy?: 'Foreground' | 'Background' | 'Orphan';
  gracePeriodSeconds?: number;
  preconditions?: { resourceVersion?: string; uid?: string };
}

type Query = Record<string, string | number | boolean | undefined>;

export class KubeClient {
  readonly kubeConfig: KubeConfig;
  /** Default deadline of one request (list, get, write), in ms. */
  readonly timeoutMs: number;
  readonly #http = new IsomorphicFetchHttpLibrary();

  constructor(kc: KubeConfig, opts: { timeoutMs?: number } = {}) {
    this.kubeConfig = kc;
    this.timeoutMs = opts.timeoutMs ?? 60_000;
  }

  /** Raw request: JSON body in, parsed JSON out; non-2xx throws ApiException whose body is the parsed V1Status. */
  async request<R>(
    method: HttpMethod,
    path: string,
    opts: { query?: Query; body?: unknown; contentType?: string; signal?: AbortSignal; timeoutMs?: number } = {},
  ): Promise<R> {
    const cluster = this.kubeConfig.getCurrentCluster();
    if (!cluster) throw new Error('kubeconfig has no current cluster');
    const url = new URL(cluster.server.replace(/\/+$/, '') + path);
    for (const [k, v] of Object.entries(opts.query ?? {})) if (v !== undefined) url.searchParams.set(k, String(v));
    const ctx = new RequestContext(url.toString(), method);
    ctx.setHeaderParam('Accept', 'application/json');
    if (opts.body !== undefined) {
      ctx.setHeaderParam('Content-Type', opts.contentType ?? 'application/json');
      ctx.setBody(JSON.stringify(opts.body));
    }
    // No request may hang a worker forever (a half-open connection answers nothing): default 60 s.
    const timeout = AbortSignal.timeout(opts.timeoutMs ?? this.timeoutMs);
    const signals = [opts.signal, currentSignal()].filter((s): s is AbortSignal => s !== undefined);
    for (const s of signals) s.throwIfAborted();
    const signal = signals.length > 0 ? AbortSignal.any([...signals, timeout]) : timeout;
    ctx.setSignal(signal);
    await this.kubeConfig.applySecurityAuthentication(ctx);
    // Aborted while authenticating: the request is never sent.
    for (const s of signals) s.throwIfAborted();
    const res = await this.#http.send(ctx).toPromise();
    const text = await res.body.text();
    let parsed: unknown = text;
    try {
      parsed = text ? JSON.parse(text) : undefined;
    } catch {
      // keep text
    }
    if (res.httpStatusCode < 200 || res.httpStatusCode > 299) {
      const message = (parsed as V1Status | undefined)?.message ?? `HTTP ${res.httpStatusCode}`;
      throw new ApiException(res.httpStatusCode, `${method} ${path}: ${message}`, parsed, res.headers);
    }
    return parsed as R;
  }

  get<T extends KubernetesObject>(gvr: GVR, name: string, namespace?: string, subresource?: string): Promise<T> {
    return this.request(HttpMethod.GET, resourcePath(gvr, { namespace, name, subresource }));
  }

  /** One page (or everything when no limit is given). */
  list<T extends KubernetesObject>(gvr: GVR, opts: ListOptions = {}): Promise<KubernetesListObject<T>> {
    return this.request(HttpMethod.GET, resourcePath(gvr, { namespace: opts.namespace }), {
      query: {
        labelSelector: opts.labelSelector,
        fieldSelector: opts.fieldSelector,
        limit: opts.limit,
        continue: opts.continue,
        resourceVersion: opts.resourceVersion,
      },
    });
  }

  /**
   * Every page of a list (pageSize items per request). The result carries the first page's resourceVersion, a
   * consistent snapshot. If the continue token expires (410) it falls back to one unpaginated list.
   */
  async listAll<T extends KubernetesObject>(
    gvr: GVR,
    opts: Omit<ListOptions, 'limit' | 'continue'> = {},
    pageSize = 500,
  ): Promise<KubernetesListObject<T>> {
    // Raw JSON carries `metadata.continue` (the generated models rename it `_continue`).
    const tokenOf = (l: KubernetesListObject<T>): string | undefined =>
      (l.metadata as { continue?: string } | undefined)?.continue || l.metadata?._continue || undefined;
    const first = await this.list<T>(gvr, { ...opts, limit: pageSize });
    const items = [...(first.items ?? [])];
    let token = tokenOf(first);
    try {
      while (token) {
        const page = await this.list<T>(gvr, { ...opts, limit: pageSize, continue: token });
        items.push(...(page.items ?? []));
        token = tokenOf(page);
      }
    } catch (err) {
      if (!isGone(err)) throw err;
      return this.list<T>(gvr, opts);
    }
    return { ...first, metadata: { resourceVersion: first.metadata?.resourceVersion }, items };
  }

  create<T extends KubernetesObject>(gvr: GVR, obj: T, opts: WriteOptions = {}): Promise<T> {
    return this.request(HttpMethod.POST, resourcePath(gvr, { namespace: obj.metadata?.namespace }), {
      query: writeQuery(opts),
      body: obj,
    });
  }

  /** PUT; carries metadata.resourceVersion if set, so a stale object gets 409. */
  replace<T extends KubernetesObject>(gvr: GVR, obj: T, opts: WriteOptions = {}): Promise<T> {
    const { name, namespace } = requireName(obj);
    return this.request(HttpMethod.PUT, resourcePath(gvr, { namespace, name, subresource: opts.subresource }), {
      query: writeQuery(opts),
      body: obj,
    });
  }

  patch<T extends KubernetesObject>(
    gvr: GVR,
    name: string,
    namespace: string | undefined,
    body: unknown,
    strategy: PatchStrategy,
    opts: PatchOptions = {},
  ): Promise<T> {
    return this.request(HttpMethod.PATCH, resourcePath(gvr, { namespace, name, subresource: opts.subresource }), {
      query: { ...writeQuery(opts), force: strategy === PatchStrategy.ServerSideApply ? opts.force : undefined },
      body,
      contentType: strategy,
    });
  }

  /** Server-side apply of obj (apiVersion, kind, metadata.name[, namespace] required). */
  apply<T extends KubernetesObject>(gvr: GVR, obj: T, opts: PatchOptions & { fieldManager: string }): Promise<T> {
    const { name, namespace } = requireName(obj);
    return this.patch<T>(gvr, name, namespace, obj, PatchStrategy.ServerSideApply, opts);
  }

  delete(gvr: GVR, name: string, namespace?: string, opts: DeleteOptions = {}): Promise<unknown> {
    const body =
      opts.propagationPolicy || opts.gracePeriodSeconds !== undefined || opts.preconditions
        ? { apiVersion: 'v1', kind: 'DeleteOptions', ...opts }
        : undefined;
    return this.request(HttpMethod.DELETE, resourcePath(gvr, { namespace, name }), { body });
  }
}

function writeQuery(opts: WriteOptions): Query {
  return { fieldManager: opts.fieldManager, dryRun: opts.dryRun ? 'All' : undefined };
}

function requireName(obj: KubernetesObject): { name: string; namespace: string | undefined } {
  const name = obj.metadata?.name;
  if (!name) throw new Error('object has no metadata.name');
  return { name, namespace: obj.metadata?.namespace || undefined };
}

// ---- error classification ----

export function statusCode(err: unknown): number | undefined {
  if (err instanceof ApiException) return err.code;
  const e = err as { code?: unknown; statusCode?: unknown } | undefined;
  if (typeof e?.code === 'number') return e.code;
  if (typeof e?.statusCode === 'number') return e.statusCode;
  return undefined;
}

/** metav1.Status reason of an ApiException (body parsed or, from generated clients, JSON text). */
export function statusReason(err: unknown): string | undefined {
  if (!(err instanceof ApiException)) return undefined;
  let body: unknown = err.body;
  if (typeof body === 'string') {
    try {
      body = JSON.parse(body);
    } catch {
      return undefined;
    }
  }
  const reason = (body as V1Status | undefined)?.reason;
  return typeof reason === 'string' ? reason : undefined;
}

export const isNotFound = (err: unknown): boolean => statusCode(err) === 404;
/** 409 other than AlreadyExists: a stale resourceVersion or an SSA field conflict. */
export const isConflict = (err: unknown): boolean => statusCode(err) === 409 && statusReason(err) !== 'AlreadyExists';
export const isAlreadyExists = (err: unknown): boolean =>
  statusCode(err) === 409 && statusReason(err) === 'AlreadyExists';
export const isGone = (err: unknown): boolean => statusCode(err) === 410;
export const isInvalid = (err: unknown): boolean => statusCode(err) === 422;
export const isForbidden = (err: unknown): boolean => statusCode(err) === 403;
export const isUnauthorized = (err: unknown): boolean => statusCode(err) === 401;
export const isTooManyRequests = (err: unknown): boolean => statusCode(err) === 429;
export const isServerError = (err: unknown): boolean => (statusCode(err) ?? 0) >= 500;

/** Retry-After of a 429/503 in seconds, if present. */
export function retryAfterSeconds(err: unknown): number | undefined {
  if (!(err instanceof ApiException)) return undefined;
  const h = err.headers?.['retry-after'] ?? err.headers?.['Retry-After'];
  const n = h === undefined ? Number.NaN : Number(h);
  return Number.isFinite(n) ? n : undefined;
}

// ---- helpers ----

export interface ObjectHeader {
  apiVersion?: string;
  kind?: string;
  metadata?: { name?: string; namespace?: string };
}

/**
 * Server-side apply of status on the /status subresource: sends only apiVersion, kind, name, namespace and status,
 * with a stable field manager. An apply sets exactly the fields it carries for its manager: a field the manager owned
 * and this apply omits is removed, so `status` must be everything the manager owns. `force` (default true) takes
 * fields over from other managers: only for fields no other writer has. With `resourceVersion` the apply is a
 * precondition on that version of the object (409 when it changed since it was read), so a status computed from a
 * stale read is never written.
 */
export function patchStatus<T extends KubernetesObject>(
  client: KubeClient,
  gvr: GVR,
  obj: ObjectHeader,
  status: unknown,
  opts: { fieldManager: string; force?: boolean; resourceVersion?: string },
): Promise<T> {
  const name = obj.metadata?.name;
  if (!name) throw new Error('patchStatus: object has no metadata.name');
  const body = {
    apiVersion: obj.apiVersion ?? apiVersionOf(gvr),
    kind: obj.kind,
    metadata: {
      name,
      ...(obj.metadata?.namespace ? { namespace: obj.metadata.namespace } : {}),
      ...(opts.resourceVersion ? { resourceVersion: opts.resourceVersion } : {}),
    },
    status,
  };
  if (!body.kind) throw new Error('patchStatus: object has no kind');
  return client.apply<T>(gvr, body as unknown as T, {
    fieldManager: opts.fieldManager,
    force: opts.force ?? true,
    subresource: 'status',
  });
}

/**
 * Server-side apply of a complete intent (fields this manager omits are released). Server-populated metadata
 * (managedFields, resourceVersion, uid, ...) is stripped; force defaults to true.
 */
export function applyObject<T extends KubernetesObject>(
  client: KubeClient,
  gvr: GVR,
  obj: T,
  opts: { fieldManager: string; force?: boolean; dryRun?: boolean },
): Promise<T> {
  const { managedFields, resourceVersion, uid, creationTimestamp, generation, selfLink, ...metadata } =
    obj.metadata ?? {};
  const body = { ...obj, apiVersion: obj.apiVersion ?? apiVersionOf(gvr), metadata };
  return client.apply<T>(gvr, body, {
    fieldManager: opts.fieldManager,
    force: opts.force ?? true,
    dryRun: opts.dryRun,
  });
}

export interface FinalizerOptions {
  /** Attempts when the object changed between read and patch (default 5). */
  attempts?: number;
  /** The object as last seen (e.g. from an informer cache): the first attempt patches it without a GET. */
  current?: KubernetesObject;
}

async function patchFinalizers<T extends KubernetesObject>(
  client: KubeClient,
  gvr: GVR,
  name: string,
  namespace: string | undefined,
  build: (obj: T) => unknown[] | undefined,
  attempts: number,
  current?: KubernetesObject,
): Promise<T> {
  for (let i = 1; ; i++) {
    const cached = i === 1 && current?.metadata?.resourceVersion !== undefined;
    const obj = cached ? (current as T) : await client.get<T>(gvr, name, namespace);
    const ops = build(obj);
    if (!ops) {
      if (cached) continue; // a cached "nothing to do" is confirmed against the live object
      return obj;
    }
    const rv = obj.metadata?.resourceVersion;
    try {
      return await client.patch<T>(
        gvr,
        name,
        namespace,
        [{ op: 'test', path: '/metadata/resourceVersion', value: rv }, ...ops],
        PatchStrategy.JsonPatch,
      );
    } catch (err) {
      // A failed `test` op is 422; a write racing inside the server is 409. Both: re-read and retry.
      if (i >= attempts || !(isConflict(err) || isInvalid(err))) throw err;
    }
  }
}

/** Adds finalizer unless present (JSON patch guarded by a resourceVersion test; retried on conflict). */
export function addFinalizer<T extends KubernetesObject>(
  client: KubeClient,
  gvr: GVR,
  name: string,
  namespace: string | undefined,
  finalizer: string,
  opts: FinalizerOptions = {},
): Promise<T> {
  return patchFinalizers<T>(
    client,
    gvr,
    name,
    namespace,
    (obj) => {
      const list = obj.metadata?.finalizers;
      if (list?.includes(finalizer)) return undefined;
      return list
        ? [{ op: 'add', path: '/metadata/finalizers/-', value: finalizer }]
        : [{ op: 'add', path: '/metadata/finalizers', value: [finalizer] }];
    },
    opts.attempts ?? 5,
    opts.current,
  );
}

/** Removes finalizer if present (same guard and retry as addFinalizer). */
export function removeFinalizer<T extends KubernetesObject>(
  client: KubeClient,
  gvr: GVR,
  name: string,
  namespace: string | undefined,
  finalizer: string,
  opts: FinalizerOptions = {},
): Promise<T> {
  return patchFinalizers<T>(
    client,
    gvr,
    name,
    namespace,
    (obj) => {
      const idx = obj.metadata?.finalizers?.indexOf(finalizer) ?? -1;
      if (idx < 0) return undefined;
      const path = `/metadata/finalizers/${idx}`;
      return [
        { op: 'test', path, value: finalizer },
        { op: 'remove', path },
      ];
    },
    opts.attempts ?? 5,
    opts.current,
  );
}

export function hasFinalizer(obj: KubernetesObject, finalizer: string): boolean {
  return obj.metadata?.finalizers?.includes(finalizer) ?? false;
}

/** An ownerReference to owner (which must carry apiVersion, kind, name and uid). */
export function ownerReference(
  owner: KubernetesObject,
  opts: { controller?: boolean; blockOwnerDeletion?: boolean } = {},
): V1OwnerReference {
  const { apiVersion, kind } = owner;
  const name = owner.metadata?.name;
  const uid = owner.metadata?.uid;
  if (!apiVersion || !kind || !name || !uid) {
    throw new Error('ownerReference: owner needs apiVersion, kind, metadata.name and metadata.uid');
  }
  return {
    apiVersion,
    kind,
    name,
    uid,
    controller: opts.controller ?? true,
    blockOwnerDeletion: opts.blockOwnerDeletion ?? true,
  };
}

/** The ownerReference with controller: true, if any. */
export function controllerOf(obj: KubernetesObject): V1OwnerReference | undefined {
  return obj.metadata?.ownerReferences?.find((r) => r.controller === true);
}

/**
 * The JSON merge patch that turns status `from` into `to`, top-level keys only: changed keys carry their new
 * value whole, removed keys null. Undefined when nothing changed.
 */
export function statusMergePatch(
  from: Record<string, unknown> | undefined,
  to: Record<string, unknown>,
): Record<string, unknown> | undefined {
  const patch: Record<string, unknown> = {};
  const old = from ?? {};
  for (const k of new Set([...Object.keys(old), ...Object.keys(to)])) {
    const next = to[k];
    if (next === undefined) {
      if (old[k] !== undefined) patch[k] = null;
    } else if (JSON.stringify(old[k]) !== JSON.stringify(next)) {
      patch[k] = next;
    }
  }
  return Object.keys(patch).length > 0 ? patch : undefined;
}

/**
 * Read-modify-write of the status subresource for objects with several status writers (e.g. the operator and a
 * node agent): `mutate` edits a copy of the current status; the difference is sent as a merge patch carrying
 * metadata.resourceVersion, so a concurrent write makes it fail with 409 instead of being lost. On conflict the
 * object is read again and `mutate` re-applied (it must be a function of the object, not of stale state).
 * `fieldManager` names the writer in managedFields (each writer its own; without it the API server derives one from
 * the user agent). Returns the updated object, or the current one when nothing changed.
 */
export async function updateStatus<T extends KubernetesObject & { status?: unknown }>(
  client: KubeClient,
  gvr: GVR,
  obj: T,
  mutate: (status: Record<string, unknown>, obj: T) => Record<string, unknown> | undefined,
  opts: { attempts?: number; fieldManager?: string } = {},
): Promise<T> {
  let current = obj;
  const name = obj.metadata?.name;
  if (!name) throw new Error('updateStatus: object has no metadata.name');
  const namespace = obj.metadata?.namespace;
  for (let i = 1; ; i++) {
    const before = (current.status ?? {}) as Record<string, unknown>;
    const after = mutate(structuredClone(before), current);
    const patch = after && statusMergePatch(before, after);
    if (!patch) return current;
    try {
      return await client.patch<T>(
        gvr,
        name,
        namespace,
        { metadata: { resourceVersion: current.metadata?.resourceVersion }, status: patch },
        PatchStrategy.MergePatch,
        { subresource: 'status', fieldManager: opts.fieldManager },
      );
    } catch (err) {
      if (i >= (opts.attempts ?? 5) || !isConflict(err)) throw err;
      current = await client.get<T>(gvr, name, namespace);
    }
  }
}
