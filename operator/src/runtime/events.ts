// An EventRecorder writing events.k8s.io/v1 Events. Repeats of the same event (same object, type, reason, action,
// note) seen again within seriesWindowMs of the previous occurrence become a series on the first Event: the count
// is kept in memory and written (merge patch of `series`) at most once per seriesFlushMs, so bursts cost one
// create plus one patch per flush interval. Writing never throws: failures are logged.

import { type EventsV1Event, type KubernetesObject, PatchStrategy, V1MicroTime } from '@kubernetes/client-node';
import type { Logger } from 'pino';
import type { GVR, KubeClient } from './client.ts';
import { type Clock, systemClock, type TimerHandle } from './clock.ts';
import { silentLogger } from './log.ts';

export const eventGVR: GVR = { group: 'events.k8s.io', version: 'v1', plural: 'events' };

export interface EventSink {
  create(namespace: string, event: EventsV1Event): Promise<unknown>;
  /** JSON merge patch of an existing Event. */
  patch(namespace: string, name: string, patch: Record<string, unknown>): Promise<unknown>;
}

export function kubeEventSink(client: KubeClient): EventSink {
  return {
    create: (_namespace, event) => client.create(eventGVR, event),
    patch: (namespace, name, patch) => client.patch(eventGVR, name, namespace, patch, PatchStrategy.MergePatch),
  };
}

export type EventType = 'Normal' | 'Warning';

export interface EventInput {
  type: EventType;
  /** UpperCamelCase, why the action was taken (e.g. 'FailedScheduling'). */
  reason: string;
  /** UpperCamelCase, what was done / failed (e.g. 'Schedule'). */
  action: string;
  /** Human readable; truncated to 1 kB. */
  note?: string;
  related?: KubernetesObject;
}

export interface EventRecorderOptions {
  /** e.g. 'stratus.io/server-controller' (max 128 chars). */
  reportingController: string;
  /** e.g. the pod name (max 128 chars). */
  reportingInstance: string;
  sink?: EventSink;
  client?: KubeClient;
  logger?: Logger;
  clock?: Clock;
  /** A repeat within this long of the previous occurrence joins the series (default 6 min, as client-go). */
  seriesWindowMs?: number;
  /** Series counts are written at most this often (default 30 s). */
  seriesFlushMs?: number;
}

interface SeriesEntry {
  namespace: string;
  /** Resolves to the created Event's name, or undefined if the create failed. */
  created: Promise<string | undefined>;
  count: number;
  lastObservedAt: number;
  flushTimer: TimerHandle | undefined;
  written: number;
}

const NOTE_MAX = 1024;

function truncateUtf8(s: string, maxBytes: number): string {
  if (Buffer.byteLength(s) <= maxBytes) return s;
  let out = s.slice(0, maxBytes);
  while (Buffer.byteLength(out) > maxBytes - 3) out = out.slice(0, -1);
  return `${out}...`;
}

function objectRef(o: KubernetesObject) {
  return {
    apiVersion: o.apiVersion,
    kind: o.kind,
    name: o.metadata?.name,
    namespace: o.metadata?.namespace,
    uid: o.metadata?.uid,
    resourceVersion: o.metadata?.resourceVersion,
  };
}

export class EventRecorder {
  readonly #sink: EventSink;
  readonly #opts: EventRecorderOptions;
  readonly #log: Logger;
  readonly #clock: Clock;
  readonly #window: number;
  readonly #flushMs: number;
  readonly #series = new Map<string, SeriesEntry>();
  readonly #pending = new Set<Promise<unknown>>();
  #seq = 0;
  #closed = false;

  constructor(opts: EventRecorderOptions) {
    const sink = opts.sink ?? (opts.client && kubeEventSink(opts.client));
    if (!sink) throw new Error('EventRecorder needs a sink or a client');
    this.#sink = sink;
    this.#opts = opts;
    this.#log = (opts.logger ?? silentLogger()).child({ component: 'events' });
    this.#clock = opts.clock ?? systemClock;
    this.#window = opts.seriesWindowMs ?? 6 * 60_000;
    this.#flushMs = opts.seriesFlushMs ?? 30_000;
  }

  normal(regarding: KubernetesObject, reason: string, action: string, note?: string): void {
    this.event(regarding, { type: 'Normal', reason, action, ...(note !== undefined ? { note } : {}) });
  }

  warning(regarding: KubernetesObject, reason: string, action: string, note?: string): void {
    this.event(regarding, { type: 'Warning', reason, action, ...(note !== undefined ? { note } : {}) });
  }

  /** Records an event about regarding; returns at once (see flush). */
  event(regarding: KubernetesObject, e: EventInput): void {
    if (this.#closed) return;
    const note = truncateUtf8(e.note ?? '', NOTE_MAX);
    const meta = regarding.metadata ?? {};
    const namespace = meta.namespace || 'default';
    const key = [
      meta.uid ?? `${meta.namespace}/${meta.name}`,
      e.type,
      e.reason,
      e.action,
      note,
      e.related?.metadata?.uid ?? '',
    ].join('\u0000');
    const now = this.#clock.now();

    const entry = this.#series.get(key);
    if (entry && now - entry.lastObservedAt < this.#window) {
      entry.count++;
      entry.lastObservedAt = now;
      entry.flushTimer ??= this.#clock.setTimer(() => {
        entry.flushTimer = undefined;
        this.#track(this.#writeSeries(entry));
      }, this.#flushMs);
      return;
    }
    if (entry?.flushTimer) {
      entry.flushTimer.cancel();
      entry.flushTimer = undefined;
      this.#track(this.#writeSeries(entry));
    }
    this.#sweep(now);

    const name = `${meta.name ?? 'object'}.${(BigInt(now) * 1_000_000n + BigInt(this.#seq++ % 1_000_000)).toString(16)}`;
    const event: EventsV1Event = {
      apiVersion: 'events.k8s.io/v1',
      kind: 'Event',
      metadata: { name, namespace },
      eventTime: new V1MicroTime(now),
      type: e.type,
      reason: e.reason,
      action: e.action,
      note,
      reportingController: this.#opts.reportingController,
      reportingInstance: this.#opts.reportingInstance,
      regarding: objectRef(regarding),
      ...(e.related ? { related: objectRef(e.related) } : {}),
    };
    const created = this.#sink.create(namespace, event).then(
      () => name,
      (err: unknown) => {
        // An object in a namespace being deleted still reconciles (its finalizers run), but the namespace takes no
        // new content: nothing is wrong, and the event has no reader left (client-go's recorder drops these too).
        const level = namespaceTerminating(err) ? 'debug' : 'warn';
        this.#log[level](
          { err, reason: e.reason, object: `${meta.namespace ?? ''}/${meta.name}` },
          'failed to write event',
        );
        return undefined;
      },
    );
    this.#track(created);
    this.#series.set(key, { namespace, created, count: 1, lastObservedAt: now, flushTimer: undefined, written: 1 });
  }

  /** Resolves when every write started so far has finished. */
  async flush(): Promise<void> {
    while (this.#pending.size > 0) await Promise.all([...this.#pending]);
  }

  /** Writes pending series counts now, then stops recording. */
  async close(): Promise<void> {
    for (const entry of this.#series.values()) {
      if (entry.flushTimer) {
        entry.flushTimer.cancel();
        entry.flushTimer = undefined;
        this.#track(this.#writeSeries(entry));
      }
    }
    this.#closed = true;
    await this.flush();
  }

  async #writeSeries(entry: SeriesEntry): Promise<void> {
    const name = await entry.created;
    if (!name || entry.count === entry.written) return;
    const count = entry.count;
    try {
      await this.#sink.patch(entry.namespace, name, {
        series: { count, lastObservedTime: new V1MicroTime(entry.lastObservedAt) },
      });
      entry.written = count;
    } catch (err) {
      this.#log.warn({ err, event: name }, 'failed to update event series');
    }
  }

  #track(p: Promise<unknown>): void {
    this.#pending.add(p);
    void p.finally(() => this.#pending.delete(p));
  }

  #sweep(now: number): void {
    if (this.#series.size < 256) return;
    for (const [k, e] of this.#series) {
      if (now - e.lastObservedAt >= this.#window && !e.flushTimer) this.#series.delete(k);
    }
  }
}

/** A write refused because its namespace is being deleted (status cause NamespaceTerminating). */
export function namespaceTerminating(err: unknown): boolean {
  const body = (err as { body?: unknown } | undefined)?.body;
  const parsed = typeof body === 'string' ? safeJson(body) : body;
  const causes = (parsed as { details?: { causes?: Array<{ reason?: string }> } } | undefined)?.details?.causes;
  return Array.isArray(causes) && causes.some((c) => c.reason === 'NamespaceTerminating');
}

function safeJson(s: string): unknown {
  try {
    return JSON.parse(s);
  } catch {
    return undefined;
  }
}
