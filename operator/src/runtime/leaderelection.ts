// Lease-based leader election (coordination.k8s.io/v1), following client-go's leaderelection semantics
// (reference §2.5):
//  - every retryPeriod read the Lease; create it when absent (a 409 there means another candidate won the race);
//  - a Lease held by someone else counts as expired only when its resourceVersion has not changed for its
//    leaseDuration as measured on the LOCAL clock (no comparison with the holder's timestamps: clocks may skew);
//  - acquire and renew by replacing the Lease carrying the resourceVersion read (409 = someone else wrote it);
//    a takeover sets acquireTime and bumps leaseTransitions; renewTime/acquireTime are MicroTime (6 digits);
//  - a leader that cannot renew for renewDeadline, or sees another holder, stops leading at once. The deadline runs
//    from when the last successful renewal was SENT (the API server may have stored it at once and others count
//    leaseDuration from their observation of it), so a slow response never stretches leadership: with
//    renewDeadline < leaseDuration the old leader has stopped before anyone may take over;
//  - stop() releases the Lease (holderIdentity '', leaseDurationSeconds 1) so a successor need not wait, unless
//    told not to (stop({ release: false }): work begun as leader may still be writing, so the Lease must expire).

import { randomUUID } from 'node:crypto';
import { hostname } from 'node:os';
import { type V1Lease, V1MicroTime } from '@kubernetes/client-node';
import type { Logger } from 'pino';
import { type GVR, isAlreadyExists, isConflict, isNotFound, type KubeClient } from './client.ts';
import { type Clock, sleep, systemClock, type TimerHandle } from './clock.ts';
import { silentLogger } from './log.ts';
import type { RuntimeMetrics } from './metrics.ts';

export const leaseGVR: GVR = { group: 'coordination.k8s.io', version: 'v1', plural: 'leases' };

/** Storage of one Lease. get resolves undefined when it does not exist; create/replace throw ApiException. */
export interface LeaseStore {
  get(signal?: AbortSignal): Promise<V1Lease | undefined>;
  create(lease: V1Lease, signal?: AbortSignal): Promise<V1Lease>;
  replace(lease: V1Lease, signal?: AbortSignal): Promise<V1Lease>;
}

export function kubeLeaseStore(client: KubeClient, namespace: string, name: string): LeaseStore {
  const path = `/apis/coordination.k8s.io/v1/namespaces/${encodeURIComponent(namespace)}/leases`;
  return {
    async get(signal) {
      try {
        return await client.request<V1Lease>('GET', `${path}/${encodeURIComponent(name)}`, { signal });
      } catch (err) {
        if (isNotFound(err)) return undefined;
        throw err;
      }
    },
    create: (lease, signal) => client.request<V1Lease>('POST', path, { body: lease, signal }),
    replace: (lease, signal) =>
      client.request<V1Lease>('PUT', `${path}/${encodeURIComponent(name)}`, { body: lease, signal }),
  };
}

export function defaultIdentity(): string {
  return `${hostname()}_${randomUUID()}`;
}

export interface LeaderElectorOptions {
  /** Lease name (also the metric label). */
  leaseName: string;
  leaseNamespace: string;
  /** Default: hostname + '_' + random UUID. */
  identity?: string;
  leaseDurationMs?: number;
  renewDeadlineMs?: number;
  retryPeriodMs?: number;
  /** Lease storage; default kubeLeaseStore(client, ...). */
  store?: LeaseStore;
  client?: KubeClient;
  clock?: Clock;
  logger?: Logger;
  metrics?: RuntimeMetrics;
  /** Called once leadership is acquired; signal aborts when it is lost or the elector stops. */
  onStartedLeading?: (signal: AbortSignal) => void;
  /** Called when leadership ends (lost, or released by stop()). */
  onStoppedLeading?: () => void;
  /** Called when the observed holder changes. */
  onNewLeader?: (identity: string) => void;
}

export type LeadershipEnd = 'stopped' | 'renew-deadline' | 'taken-over' | 'never-acquired';

const toMicroTime = (ms: number): V1MicroTime => new V1MicroTime(ms);

/** Settles with p, or rejects when signal aborts first (even if the store ignores the signal). */
function abortable<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        resolve(v);
      },
      (e: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(e);
      },
    );
  });
}

export class LeaderElector {
  readonly identity: string;
  readonly leaseName: string;
  readonly leaseDurationMs: number;
  readonly renewDeadlineMs: number;
  readonly retryPeriodMs: number;
  readonly #store: LeaseStore;
  readonly #clock: Clock;
  readonly #log: Logger;
  readonly #opts: LeaderElectorOptions;
  readonly #setMetric: (leader: boolean) => void;
  readonly #stopAc = new AbortController();
  #leading = false;
  #leaderAc: AbortController | undefined;
  #renewDeadlineTimer: TimerHandle | undefined;
  #endReason: LeadershipEnd | undefined;
  #observedRV: string | undefined;
  #observedAt = 0;
  #observedHolder: string | undefined;
  #lease: V1Lease | undefined;
  #running: Promise<LeadershipEnd> | undefined;
  #release = true;
  /** Local time at which the request of the last successful acquire/renewal was sent. */
  #lastRenewSentAt = 0;

  constructor(opts: LeaderElectorOptions) {
    this.#opts = opts;
    this.identity = opts.identity ?? defaultIdentity();
    this.leaseName = opts.leaseName;
    this.leaseDurationMs = opts.leaseDurationMs ?? 15_000;
    this.renewDeadlineMs = opts.renewDeadlineMs ?? 10_000;
    this.retryPeriodMs = opts.retryPeriodMs ?? 2_000;
    if (!(this.leaseDurationMs > this.renewDeadlineMs)) throw new Error('leaseDuration must exceed renewDeadline');
    if (!(this.renewDeadlineMs > this.retryPeriodMs * 1.2))
      throw new Error('renewDeadline must exceed 1.2 x retryPeriod');
    if (!(this.retryPeriodMs > 0)) throw new Error('retryPeriod must be positive');
    if (!this.identity) throw new Error('identity must not be empty');
    const store = opts.store ?? (opts.client && kubeLeaseStore(opts.client, opts.leaseNamespace, opts.leaseName));
    if (!store) throw new Error('LeaderElector needs a store or a client');
    this.#store = store;
    this.#clock = opts.clock ?? systemClock;
    this.#log = (opts.logger ?? silentLogger()).child({ lease: `${opts.leaseNamespace}/${opts.leaseName}` });
    this.#setMetric = opts.metrics?.leader(opts.leaseName) ?? (() => {});
  }

  isLeader(): boolean {
    return this.#leading;
  }

  /** The holder seen on the last read of the Lease. */
  observedLeader(): string | undefined {
    return this.#observedHolder;
  }

  /**
   * Campaigns until leadership is acquired, leads until it is lost or stop() is called, and resolves with why it
   * ended. Calling it twice returns the same promise; an elector is not reusable after it ends.
   */
  run(): Promise<LeadershipEnd> {
    this.#running ??= this.#run();
    return this.#running;
  }

  /**
   * Stops campaigning/leading and resolves when run() has finished. A held Lease is released unless release is
   * false (then it simply expires, leaseDuration after the last renewal).
   */
  async stop(opts: { release?: boolean } = {}): Promise<void> {
    if (opts.release === false) this.#release = false;
    this.#stopAc.abort(new Error('leader elector stopped'));
    await this.#running;
  }

  async #run(): Promise<LeadershipEnd> {
    const stop = this.#stopAc.signal;
    this.#log.info({ identity: this.identity }, 'attempting to acquire leader lease');
    while (!stop.aborted) {
      // An acquisition answered only after the renew deadline has passed is no leadership: renew first.
      if ((await this.#tryAcquireOrRenew()) && this.#clock.now() - this.#lastRenewSentAt < this.renewDeadlineMs) break;
      if (!(await this.#sleep(this.retryPeriodMs))) break;
    }
    if (stop.aborted) return 'never-acquired';

    this.#becomeLeader();
    while (this.#leading && !stop.aborted) {
      if (!(await this.#sleep(this.retryPeriodMs))) break;
      if (!this.#leading) break;
      if (await this.#tryAcquireOrRenew()) this.#armRenewDeadline();
    }
    if (this.#leading) {
      // stop() while leading: stop leading first (abort the leader's work), then release if allowed.
      const release = this.#release;
      this.#endLeadership('stopped');
      if (release) await this.#releaseLease();
      else this.#log.info('not releasing the lease: it expires on its own');
    }
    return this.#endReason ?? 'stopped';
  }

  #becomeLeader(): void {
    this.#leading = true;
    this.#endReason = undefined;
    this.#leaderAc = new AbortController();
    this.#setMetric(true);
    this.#armRenewDeadline();
    this.#log.info({ identity: this.identity }, 'successfully acquired lease');
    try {
      this.#opts.onStartedLeading?.(this.#leaderAc.signal);
    } catch (err) {
      this.#log.error({ err }, 'onStartedLeading threw');
    }
  }

  #endLeadership(reason: LeadershipEnd): void {
    if (!this.#leading) return;
    this.#leading = false;
    this.#endReason = reason;
    this.#renewDeadlineTimer?.cancel();
    this.#setMetric(false);
    if (reason === 'stopped') this.#log.info('leadership released');
    else this.#log.error({ reason }, 'leader election lost');
    this.#leaderAc?.abort(new Error(`leadership ended: ${reason}`));
    try {
      this.#opts.onStoppedLeading?.();
    } catch (err) {
      this.#log.error({ err }, 'onStoppedLeading threw');
    }
  }

  /** Leadership ends renewDeadline after the last successful renewal was sent (not answered). */
  #armRenewDeadline(): void {
    this.#renewDeadlineTimer?.cancel();
    const remaining = this.#lastRenewSentAt + this.renewDeadlineMs - this.#clock.now();
    const expire = () => {
      this.#log.error({ renewDeadlineMs: this.renewDeadlineMs }, 'failed to renew lease within the renew deadline');
      this.#endLeadership('renew-deadline');
    };
    if (remaining <= 0) {
      expire();
      return;
    }
    this.#renewDeadlineTimer = this.#clock.setTimer(expire, remaining);
  }

  /** Sleeps; false if stop() or loss of leadership interrupted. */
  async #sleep(ms: number): Promise<boolean> {
    const signals = [this.#stopAc.signal];
    if (this.#leading && this.#leaderAc) signals.push(this.#leaderAc.signal);
    try {
      await sleep(this.#clock, ms, AbortSignal.any(signals));
      return true;
    } catch {
      return false;
    }
  }

  #observe(lease: V1Lease): void {
    const rv = lease.metadata?.resourceVersion;
    const holder = lease.spec?.holderIdentity ?? '';
    if (rv !== this.#observedRV) {
      this.#observedRV = rv;
      this.#observedAt = this.#clock.now();
    }
    if (holder !== this.#observedHolder) {
      this.#observedHolder = holder;
      if (holder) {
        this.#log.info({ leader: holder }, 'new leader observed');
        try {
          this.#opts.onNewLeader?.(holder);
        } catch (err) {
          this.#log.error({ err }, 'onNewLeader threw');
        }
      }
    }
    this.#lease = lease;
  }

  #spec(now: number, previous: V1Lease | undefined): V1Lease['spec'] {
    const old = previous?.spec;
    const mine = old?.holderIdentity === this.identity;
    return {
      holderIdentity: this.identity,
      leaseDurationSeconds: Math.ceil(this.leaseDurationMs / 1000),
      acquireTime: mine && old?.acquireTime ? old.acquireTime : toMicroTime(now),
      renewTime: toMicroTime(now),
      leaseTransitions: mine ? (old?.leaseTransitions ?? 0) : (old?.leaseTransitions ?? 0) + (previous ? 1 : 0),
    };
  }

  async #tryAcquireOrRenew(): Promise<boolean> {
    // While leading, losing leadership (renew deadline) also cancels the request in flight.
    const signal =
      this.#leading && this.#leaderAc
        ? AbortSignal.any([this.#stopAc.signal, this.#leaderAc.signal])
        : this.#stopAc.signal;
    let lease: V1Lease | undefined;
    try {
      lease = await abortable(this.#store.get(signal), signal);
    } catch (err) {
      this.#log.warn({ err }, 'error reading lease');
      return false;
    }
    const now = this.#clock.now();
    if (!lease) {
      const body: V1Lease = {
        apiVersion: 'coordination.k8s.io/v1',
        kind: 'Lease',
        metadata: { name: this.leaseName, namespace: this.#opts.leaseNamespace },
        spec: this.#spec(now, undefined),
      };
      const sentAt = this.#clock.now();
      try {
        this.#observe(await abortable(this.#store.create(body, signal), signal));
        this.#lastRenewSentAt = sentAt;
        return true;
      } catch (err) {
        if (isAlreadyExists(err) || isConflict(err)) this.#log.info('lost the race to create the lease');
        else this.#log.warn({ err }, 'error creating lease');
        return false;
      }
    }

    this.#observe(lease);
    const holder = lease.spec?.holderIdentity ?? '';
    if (holder && holder !== this.identity) {
      const durationMs = (lease.spec?.leaseDurationSeconds ?? this.leaseDurationMs / 1000) * 1000;
      if (now < this.#observedAt + durationMs) {
        if (this.#leading) this.#endLeadership('taken-over');
        return false;
      }
      this.#log.info({ previous: holder }, 'lease expired; taking over');
    }

    const body: V1Lease = { ...lease, spec: this.#spec(now, lease) };
    const sentAt = this.#clock.now();
    try {
      this.#observe(await abortable(this.#store.replace(body, signal), signal));
      this.#lastRenewSentAt = sentAt;
      return true;
    } catch (err) {
      if (!isConflict(err)) {
        this.#log.warn({ err }, 'error updating lease');
        return false;
      }
      if (!this.#leading) {
        this.#log.info('lost the race to acquire the lease');
        return false;
      }
      // A renewal conflict: someone else wrote the Lease. Re-read at once: another holder means we have lost.
      try {
        const current = await abortable(this.#store.get(signal), signal);
        if (current) this.#observe(current);
        if (current?.spec?.holderIdentity !== this.identity) this.#endLeadership('taken-over');
      } catch (readErr) {
        this.#log.warn({ err: readErr }, 'error re-reading lease after conflict');
      }
      return false;
    }
  }

  async #releaseLease(): Promise<void> {
    // Bounded: a hung API call must not block shutdown.
    const ac = new AbortController();
    const timer = this.#clock.setTimer(() => ac.abort(new Error('lease release timed out')), this.renewDeadlineMs);
    try {
      for (let attempt = 0; attempt < 2; attempt++) {
        const lease = this.#lease;
        if (!lease || lease.spec?.holderIdentity !== this.identity) return;
        const now = this.#clock.now();
        const released: V1Lease = {
          ...lease,
          spec: {
            holderIdentity: '',
            leaseDurationSeconds: 1,
            leaseTransitions: lease.spec?.leaseTransitions ?? 0,
            acquireTime: toMicroTime(now),
            renewTime: toMicroTime(now),
          },
        };
        try {
          this.#observe(await abortable(this.#store.replace(released, ac.signal), ac.signal));
          return;
        } catch (err) {
          if (!isConflict(err)) {
            this.#log.warn({ err }, 'failed to release lease');
            return;
          }
          const current = await abortable(this.#store.get(ac.signal), ac.signal).catch(() => undefined);
          if (!current) return;
          this.#observe(current);
        }
      }
    } finally {
      timer.cancel();
    }
  }
}
