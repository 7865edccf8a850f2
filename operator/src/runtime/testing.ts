// Test helpers shared by the runtime's unit tests (and usable by controller tests elsewhere): an in-memory event
// source, a log capture and a metric reader. Not exported from index.ts.

import { ApiException, type KubernetesObject, type V1Lease } from '@kubernetes/client-node';
import type { Registry } from 'prom-client';
import type { EventHandler, EventSource, WatchLike } from './informer.ts';
import type { LeaseStore } from './leaderelection.ts';
import { createLogger, type Logger } from './log.ts';

/** An EventSource driven by hand. */
export class FakeSource<T extends KubernetesObject> implements EventSource<T> {
  readonly objects = new Map<string, T>();
  readonly #handlers = new Set<EventHandler<T>>();

  addEventHandler(h: EventHandler<T>): () => void {
    for (const o of this.objects.values()) h.onAdd?.(o);
    this.#handlers.add(h);
    return () => {
      this.#handlers.delete(h);
    };
  }

  handlerCount(): number {
    return this.#handlers.size;
  }

  add(obj: T): void {
    this.objects.set(keyOf(obj), obj);
    for (const h of this.#handlers) h.onAdd?.(obj);
  }

  update(obj: T): void {
    const old = this.objects.get(keyOf(obj)) ?? obj;
    this.objects.set(keyOf(obj), obj);
    for (const h of this.#handlers) h.onUpdate?.(old, obj);
  }

  delete(obj: T): void {
    this.objects.delete(keyOf(obj));
    for (const h of this.#handlers) h.onDelete?.(obj);
  }
}

function keyOf(o: KubernetesObject): string {
  return `${o.metadata?.namespace ?? ''}/${o.metadata?.name}`;
}

/** A JSON logger whose parsed lines are collected in `lines`. */
export function captureLogger(level: 'debug' | 'info' = 'debug'): { logger: Logger; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  const destination = {
    write(msg: string) {
      for (const line of msg.split('\n')) if (line) lines.push(JSON.parse(line) as Record<string, unknown>);
    },
  };
  return { logger: createLogger({ level, destination }), lines };
}

/** Value of one series of a metric (counters, gauges; histograms: the _count series). */
export async function metricValue(
  registry: Registry,
  name: string,
  labels: Record<string, string> = {},
): Promise<number | undefined> {
  const metric = registry.getSingleMetric(name);
  if (!metric) return undefined;
  const data = await metric.get();
  const matches = (l: Record<string, unknown>) => Object.entries(labels).every(([k, v]) => l[k] === v);
  const isHistogram = String(data.type) === 'histogram';
  const series = data.values.find(
    (v) => matches(v.labels) && (!isHistogram || (v as { metricName?: string }).metricName === `${name}_count`),
  );
  return series?.value;
}

export interface WatchCall {
  path: string;
  query: Record<string, unknown>;
  cb: (phase: string, obj: unknown) => void;
  done: (err: unknown) => void;
  ended: boolean;
}

/** Behaves like client-node's Watch: aborting the returned controller ends the call with an AbortError. */
export class FakeWatch implements WatchLike {
  calls: WatchCall[] = [];

  async watch(
    path: string,
    query: Record<string, string | number | boolean | undefined>,
    cb: (phase: string, obj: unknown) => void,
    done: (err: unknown) => void,
  ): Promise<AbortController> {
    const call: WatchCall = { path, query, cb, done, ended: false };
    this.calls.push(call);
    const ac = new AbortController();
    ac.signal.addEventListener('abort', () => {
      setImmediate(() => this.end(call, new DOMException('aborted', 'AbortError')));
    });
    return ac;
  }

  get last(): WatchCall {
    return this.calls.at(-1)!;
  }

  emit(type: 'ADDED' | 'MODIFIED' | 'DELETED' | 'ERROR', obj: unknown, call = this.last): void {
    call.cb(type, obj);
  }

  end(call: WatchCall, err: unknown = null): void {
    if (call.ended) return;
    call.ended = true;
    call.done(err);
  }
}

/** An in-memory Lease with API-server semantics: resourceVersion bumps, 409 on a stale replace or a dup create. */
export class FakeLeaseStore implements LeaseStore {
  lease: V1Lease | undefined;
  rv = 100;
  writes: V1Lease[] = [];
  failReplace: ((l: V1Lease) => Error | 'hang' | undefined) | undefined;

  async get(): Promise<V1Lease | undefined> {
    return this.lease && (JSON.parse(JSON.stringify(this.lease)) as V1Lease);
  }

  async create(l: V1Lease): Promise<V1Lease> {
    if (this.lease) throw new ApiException(409, 'exists', { reason: 'AlreadyExists' }, {});
    return this.#store(l);
  }

  async replace(l: V1Lease): Promise<V1Lease> {
    const f = this.failReplace?.(l);
    if (f === 'hang') return new Promise(() => {});
    if (f) throw f;
    if (!this.lease) throw new ApiException(404, 'not found', { reason: 'NotFound' }, {});
    if (l.metadata?.resourceVersion !== this.lease.metadata?.resourceVersion) {
      throw new ApiException(409, 'conflict', { reason: 'Conflict' }, {});
    }
    return this.#store(l);
  }

  /** Another party writes the lease directly. */
  setHolder(holder: string, extra: Partial<V1Lease['spec']> = {}): void {
    this.#store({
      apiVersion: 'coordination.k8s.io/v1',
      kind: 'Lease',
      metadata: { name: 'op', namespace: 'sys' },
      spec: { holderIdentity: holder, leaseDurationSeconds: 15, leaseTransitions: 4, ...extra },
    });
  }

  #store(l: V1Lease): V1Lease {
    // Serialise like the client would (V1MicroTime -> string with 6 fractional digits).
    const json = JSON.parse(JSON.stringify(l)) as V1Lease;
    json.metadata = { ...json.metadata, resourceVersion: String(++this.rv) };
    this.lease = json;
    this.writes.push(json);
    return JSON.parse(JSON.stringify(json)) as V1Lease;
  }
}
