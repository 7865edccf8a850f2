// A shared informer for any resource, wrapping client-node's ListWatch and adding what it lacks
// (reference §2.3): restart with backoff after the errors that stop it, a watchdog for silent watches, periodic
// resync, handlers that see the old object on update, indexers, sync tracking and an activity timestamp.
//
// Each (re)start runs a fresh ListWatch generation; callbacks of older generations are ignored. The informer keeps
// its own store: a new generation's initial LIST is diffed against it, so handlers see `update` only for objects
// whose resourceVersion changed and `delete` for objects that vanished while the watch was down. 410 Gone (HTTP or
// in-stream) is handled inside a generation by ListWatch itself: it clears the resourceVersion and relists.
//
// A watch is kept open continuously (reference §2.3): client-node 2.0.1 aborts a quiet watch after 30 s (its
// inactivity timeout, re-watched at once), but when the server or a proxy ends a watch cleanly ListWatch waits
// 1 s, 2 s, ... up to 30 s before re-watching a resource that had no event since, so an event landing in that
// gap would wait for it. Here every watch asks for
// bookmarks (allowWatchBookmarks, which also advance the resourceVersion) and a watch that ended after running
// for a while is resumed at once from the last resourceVersion, without a relist; only watches that end right
// after they began (minWatchLifetimeMs) get client-node's growing delay, so a server that refuses watches is
// not hammered.

import {
  type KubernetesListObject,
  type KubernetesObject,
  type ListPromise,
  ListWatch,
  Watch,
} from '@kubernetes/client-node';
import type { Logger } from 'pino';
import { type GVR, type KubeClient, resourcePath, runWithSignal } from './client.ts';
import { type Clock, sleep, systemClock, type TimerHandle } from './clock.ts';
import { silentLogger } from './log.ts';

export interface EventHandler<T> {
  onAdd?(obj: T): void;
  /** For periodic resyncs oldObj === newObj. */
  onUpdate?(oldObj: T, newObj: T): void;
  /** The last known state of the object. */
  onDelete?(obj: T): void;
}

/** Anything that delivers object events: an Informer, or a fake in tests. */
export interface EventSource<T> {
  /** Registers h; objects already known are delivered to h as adds first. Returns an unregister function. */
  addEventHandler(h: EventHandler<T>): () => void;
}

/** The shape of client-node's Watch that ListWatch uses. */
export interface WatchLike {
  watch(
    path: string,
    queryParams: Record<string, string | number | boolean | undefined>,
    callback: (phase: string, apiObj: unknown, watchObj?: unknown) => void,
    done: (err: unknown) => void,
  ): Promise<AbortController>;
}

export interface ListerWatcher<T extends KubernetesObject> {
  /** Collection path to watch, e.g. /api/v1/namespaces/x/configmaps. */
  path: string;
  list: ListPromise<T>;
  watch: WatchLike;
  labelSelector?: string;
  fieldSelector?: string;
}

export interface InformerOptions {
  /** For logs. */
  name?: string;
  /** Re-deliver every cached object as an update this often (default 10 min; 0 = never). */
  resyncPeriodMs?: number;
  /** Restart list+watch when nothing (list, event, watch established) happened for this long (default 2 min; 0 = off). */
  watchdogMs?: number;
  /** healthy() turns false after this long without activity (default 3 x watchdogMs). */
  unhealthyAfterMs?: number;
  /** Restart delay after an error: base doubling up to max (default 1 s .. 30 s). */
  restartBackoff?: { baseMs?: number; maxMs?: number };
  /** A watch that ended after at least this long (or after an event) is resumed at once (default 1 s). */
  minWatchLifetimeMs?: number;
  clock?: Clock;
  logger?: Logger;
}

export interface ResourceInformerOptions extends InformerOptions {
  /** Watch one namespace only. */
  namespace?: string;
  labelSelector?: string;
  fieldSelector?: string;
  /** LIST page size (default 500). */
  pageSize?: number;
}

/** `namespace/name`, or `name` for cluster-scoped objects. */
export function objectKey(obj: KubernetesObject): string {
  const ns = obj.metadata?.namespace;
  const name = obj.metadata?.name ?? '';
  return ns ? `${ns}/${name}` : name;
}

export function splitKey(key: string): { namespace?: string; name: string } {
  const i = key.indexOf('/');
  return i < 0 ? { name: key } : { namespace: key.slice(0, i), name: key.slice(i + 1) };
}

type IndexFunc<T> = (obj: T) => readonly string[];

export class Informer<T extends KubernetesObject> implements EventSource<T> {
  readonly name: string;
  readonly #lw: ListerWatcher<T>;
  readonly #clock: Clock;
  readonly #log: Logger;
  readonly #resyncMs: number;
  readonly #watchdogMs: number;
  readonly #unhealthyMs: number;
  readonly #backoffBase: number;
  readonly #backoffMax: number;
  readonly #minWatchLifetimeMs: number;
  /** namespace ('' for cluster-scoped) -> name -> object */
  readonly #store = new Map<string, Map<string, T>>();
  readonly #handlers = new Set<EventHandler<T>>();
  readonly #indexers = new Map<string, { fn: IndexFunc<T>; values: Map<string, Set<string>> }>();
  readonly #syncWaiters: Array<() => void> = [];
  #gen = 0;
  #current: ListWatch<T> | undefined;
  #started = false;
  #stopped = false;
  #synced = false;
  #syncedAt = 0;
  #failures = 0;
  #lastEventAt = 0;
  #lastRestartAt = 0;
  #restartTimer: TimerHandle | undefined;
  #watchdogTimer: TimerHandle | undefined;
  #resyncTimer: TimerHandle | undefined;
  /** Restarts after errors or watchdog trips. */
  restarts = 0;
  watchdogTrips = 0;
  lastError: unknown;

  constructor(lw: ListerWatcher<T>, opts: InformerOptions = {}) {
    this.#lw = lw;
    this.name = opts.name ?? lw.path;
    this.#clock = opts.clock ?? systemClock;
    this.#log = (opts.logger ?? silentLogger()).child({ informer: this.name });
    this.#resyncMs = opts.resyncPeriodMs ?? 600_000;
    this.#watchdogMs = opts.watchdogMs ?? 120_000;
    this.#unhealthyMs = opts.unhealthyAfterMs ?? 3 * this.#watchdogMs;
    this.#backoffBase = opts.restartBackoff?.baseMs ?? 1000;
    this.#backoffMax = opts.restartBackoff?.maxMs ?? 30_000;
    this.#minWatchLifetimeMs = opts.minWatchLifetimeMs ?? 1000;
  }

  /** An informer for a resource by group/version/plural through client's KubeConfig. */
  static forResource<T extends KubernetesObject>(
    client: KubeClient,
    gvr: GVR,
    opts: ResourceInformerOptions = {},
  ): Informer<T> {
    const { namespace, labelSelector, fieldSelector } = opts;
    const path = resourcePath(gvr, { namespace });
    const list = (): Promise<KubernetesListObject<T>> =>
      client.listAll<T>(gvr, { namespace, labelSelector, fieldSelector }, opts.pageSize ?? 500);
    return new Informer<T>(
      { path, list, watch: new Watch(client.kubeConfig), labelSelector, fieldSelector },
      { name: informerName(gvr, opts), ...opts },
    );
  }

  /** Starts listing and watching; returns at once (see waitForSync). */
  start(): void {
    if (this.#started) return;
    this.#started = true;
    this.#lastEventAt = this.#clock.now();
    // Started from inside a reconcile (a lazily created informer), its requests must not inherit that reconcile's
    // abort signal: they outlive it.
    runWithSignal(undefined, () => {
      this.#runGeneration();
      this.#armWatchdog();
      this.#armResync();
    });
  }

  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    this.#gen++;
    this.#restartTimer?.cancel();
    this.#watchdogTimer?.cancel();
    this.#resyncTimer?.cancel();
    const lw = this.#current;
    this.#current = undefined;
    await lw?.stop();
  }

  hasSynced(): boolean {
    return this.#synced;
  }

  /** Resolves true once the first LIST has been applied, false after timeoutMs. */
  waitForSync(timeoutMs: number): Promise<boolean> {
    if (this.#synced) return Promise.resolve(true);
    return new Promise((resolve) => {
      const timer = this.#clock.setTimer(() => resolve(false), timeoutMs);
      this.#syncWaiters.push(() => {
        timer.cancel();
        resolve(true);
      });
    });
  }

  /** Time (ms since epoch) of the last successful list, watch event or established watch request. */
  get lastEventAt(): number {
    return this.#lastEventAt;
  }

  /** False when the informer has been silent for unhealthyAfterMs even though the watchdog restarts it. */
  healthy(): boolean {
    if (!this.#started || this.#stopped || this.#watchdogMs <= 0) return true;
    return this.#clock.now() - this.#lastEventAt <= this.#unhealthyMs;
  }

  get(name: string, namespace?: string): T | undefined {
    return this.#store.get(namespace ?? '')?.get(name);
  }

  getByKey(key: string): T | undefined {
    const { namespace, name } = splitKey(key);
    return this.get(name, namespace);
  }

  list(namespace?: string): T[] {
    if (namespace !== undefined) return [...(this.#store.get(namespace)?.values() ?? [])];
    const all: T[] = [];
    for (const m of this.#store.values()) all.push(...m.values());
    return all;
  }

  /** Adds a named index (e.g. 'byOwnerUID'); fn returns the index values of an object. */
  addIndex(name: string, fn: IndexFunc<T>): void {
    if (this.#indexers.has(name)) throw new Error(`index ${name} already exists`);
    const idx = { fn, values: new Map<string, Set<string>>() };
    this.#indexers.set(name, idx);
    for (const obj of this.list()) this.#indexOne(idx, obj);
  }

  byIndex(name: string, value: string): T[] {
    const idx = this.#indexers.get(name);
    if (!idx) throw new Error(`no index ${name}`);
    const out: T[] = [];
    for (const key of idx.values.get(value) ?? []) {
      const obj = this.getByKey(key);
      if (obj) out.push(obj);
    }
    return out;
  }

  addEventHandler(h: EventHandler<T>): () => void {
    for (const obj of this.list()) this.#call(() => h.onAdd?.(obj));
    this.#handlers.add(h);
    return () => {
      this.#handlers.delete(h);
    };
  }

  /** Re-delivers every cached object to the handlers as an update (old === new). */
  resync(): void {
    for (const obj of this.list()) for (const h of this.#handlers) this.#call(() => h.onUpdate?.(obj, obj));
  }

  // ---- internals ----

  #runGeneration(): void {
    const gen = ++this.#gen;
    let listed = false;
    const list: ListPromise<T> = async () => {
      const result = await this.#lw.list();
      if (gen === this.#gen) {
        listed = true;
        this.#touch();
      }
      return result;
    };
    // A watch request that got its response (not an error) counts as activity: a quiet but healthy watch is
    // re-established about every 30 s (client-node's inactivity timeout), and bookmarks count too.
    // lastWatch: when the latest watch request was sent and whether it ended after a useful life (see delay).
    let lastWatch = { sentAt: 0, useful: false };
    const watch: WatchLike = {
      watch: async (path, query, cb, done) => {
        let failed = false;
        const w = { sentAt: this.#clock.now(), useful: false };
        lastWatch = w;
        const ac = await this.#lw.watch.watch(
          path,
          { ...query, allowWatchBookmarks: true },
          (phase, obj, watchObj) => {
            if (phase !== 'ERROR') w.useful = true;
            if (phase === 'BOOKMARK' && gen === this.#gen) this.#touch();
            cb(phase, obj, watchObj);
          },
          (err) => {
            if (err) failed = true;
            if (this.#clock.now() - w.sentAt >= this.#minWatchLifetimeMs) w.useful = true;
            done(err);
          },
        );
        if (!failed && gen === this.#gen) this.#touch();
        return ac;
      },
    };
    // ListWatch calls delayFn only before re-watching after a watch ended without an error (it backs off while
    // watches bring no event). Resume at once unless the last watch ended as soon as it began.
    const delay = (ms: number): Promise<void> => (lastWatch.useful ? Promise.resolve() : sleep(this.#clock, ms));
    const lw = new ListWatch<T>(
      this.#lw.path,
      watch as unknown as Watch,
      list,
      false,
      this.#lw.labelSelector,
      this.#lw.fieldSelector,
      { delayFn: delay },
    );
    // A stale generation's callbacks are ignored; they also stop it again, in case its watch connected after stop().
    const live = (): boolean => {
      if (gen === this.#gen && !this.#stopped) return true;
      void lw.stop();
      return false;
    };
    lw.on('add', (o) => live() && this.#upsert(o));
    lw.on('update', (o) => live() && this.#upsert(o));
    lw.on('delete', (o) => live() && this.#remove(o));
    lw.on('connect', () => live());
    lw.on('error', (err) => live() && this.#onError(err, lw));
    this.#current = lw;
    lw.start().then(
      () => {
        if (gen !== this.#gen || this.#stopped || !listed) return;
        // Objects deleted while no watch was running: in our store, absent from this generation's LIST.
        for (const obj of this.list()) {
          if (!lw.get(obj.metadata?.name ?? '', obj.metadata?.namespace || undefined)) this.#remove(obj);
        }
        this.#syncedAt = this.#clock.now();
        if (!this.#synced) {
          this.#synced = true;
          this.#log.debug({ objects: this.list().length }, 'informer synced');
          for (const w of this.#syncWaiters.splice(0)) w();
        }
      },
      (err: unknown) => live() && this.#onError(err, lw),
    );
  }

  #onError(err: unknown, lw: ListWatch<T>): void {
    this.lastError = err;
    this.#gen++; // invalidate the failed generation
    void lw.stop();
    // A generation that ran fine for a while resets the backoff.
    if (this.#syncedAt > 0 && this.#clock.now() - this.#syncedAt >= this.#backoffMax) this.#failures = 0;
    this.#failures++;
    const delay = Math.min(this.#backoffBase * 2 ** (this.#failures - 1), this.#backoffMax);
    this.#log.warn({ err, delayMs: delay, failures: this.#failures }, 'informer stopped by an error; restarting');
    this.#scheduleRestart(delay);
  }

  #scheduleRestart(delayMs: number): void {
    this.#restartTimer?.cancel();
    this.#restartTimer = this.#clock.setTimer(() => {
      this.#restartTimer = undefined;
      if (this.#stopped) return;
      this.restarts++;
      this.#lastRestartAt = this.#clock.now();
      this.#runGeneration();
    }, delayMs);
  }

  #armWatchdog(): void {
    if (this.#watchdogMs <= 0) return;
    const period = Math.max(1, Math.floor(this.#watchdogMs / 4));
    this.#watchdogTimer = this.#clock.setTimer(() => {
      if (this.#stopped) return;
      const now = this.#clock.now();
      const silentFor = now - this.#lastEventAt;
      if (now - Math.max(this.#lastEventAt, this.#lastRestartAt) > this.#watchdogMs && !this.#restartTimer) {
        this.watchdogTrips++;
        this.#log.warn({ silentForMs: silentFor }, 'watch silent too long; restarting list+watch');
        const lw = this.#current;
        this.#gen++;
        void lw?.stop();
        this.restarts++;
        this.#lastRestartAt = now;
        this.#runGeneration();
      }
      this.#armWatchdog();
    }, period);
  }

  #armResync(): void {
    if (this.#resyncMs <= 0) return;
    this.#resyncTimer = this.#clock.setTimer(() => {
      if (this.#stopped) return;
      if (this.#synced) this.resync();
      this.#armResync();
    }, this.#resyncMs);
  }

  #touch(): void {
    this.#lastEventAt = this.#clock.now();
  }

  #upsert(obj: T): void {
    this.#touch();
    const ns = obj.metadata?.namespace ?? '';
    const name = obj.metadata?.name ?? '';
    let m = this.#store.get(ns);
    if (!m) {
      m = new Map();
      this.#store.set(ns, m);
    }
    const old = m.get(name);
    const rv = obj.metadata?.resourceVersion;
    if (old && rv !== undefined && old.metadata?.resourceVersion === rv) return;
    m.set(name, obj);
    if (old) this.#unindex(old);
    for (const idx of this.#indexers.values()) this.#indexOne(idx, obj);
    for (const h of this.#handlers) {
      this.#call(() => (old ? h.onUpdate?.(old, obj) : h.onAdd?.(obj)));
    }
  }

  #remove(obj: T): void {
    this.#touch();
    const ns = obj.metadata?.namespace ?? '';
    const name = obj.metadata?.name ?? '';
    const m = this.#store.get(ns);
    const old = m?.get(name);
    if (!m || !old) return;
    m.delete(name);
    if (m.size === 0) this.#store.delete(ns);
    this.#unindex(old);
    for (const h of this.#handlers) this.#call(() => h.onDelete?.(obj));
  }

  #indexOne(idx: { fn: IndexFunc<T>; values: Map<string, Set<string>> }, obj: T): void {
    const key = objectKey(obj);
    let values: readonly string[] = [];
    try {
      values = idx.fn(obj);
    } catch (err) {
      this.#log.error({ err, key }, 'index function threw');
    }
    for (const v of values) {
      let keys = idx.values.get(v);
      if (!keys) {
        keys = new Set();
        idx.values.set(v, keys);
      }
      keys.add(key);
    }
  }

  #unindex(obj: T): void {
    const key = objectKey(obj);
    for (const idx of this.#indexers.values()) {
      let values: readonly string[] = [];
      try {
        values = idx.fn(obj);
      } catch {
        // already logged when indexed
      }
      for (const v of values) {
        const keys = idx.values.get(v);
        keys?.delete(key);
        if (keys?.size === 0) idx.values.delete(v);
      }
    }
  }

  #call(fn: () => void): void {
    try {
      fn();
    } catch (err) {
      this.#log.error({ err }, 'informer event handler threw');
    }
  }
}

function informerName(gvr: GVR, opts: ResourceInformerOptions): string {
  const parts = [`${gvr.plural}${gvr.group ? `.${gvr.group}` : ''}/${gvr.version}`];
  if (opts.namespace) parts.push(`ns=${opts.namespace}`);
  if (opts.labelSelector) parts.push(`labels=${opts.labelSelector}`);
  if (opts.fieldSelector) parts.push(`fields=${opts.fieldSelector}`);
  return parts.join(' ');
}

/** Index function: UIDs of an object's owners (use with addIndex('byOwnerUID', ownerUIDs)). */
export function ownerUIDs(obj: KubernetesObject): string[] {
  return (obj.metadata?.ownerReferences ?? []).map((r) => r.uid);
}
