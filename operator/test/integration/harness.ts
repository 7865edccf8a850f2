// Harness for the operator-process integration tests: starts `node operator/src/main.ts` as a child process against
// the local control plane, captures its JSON log lines, signals it, scrapes /metrics, /healthz and /readyz; plus
// helpers for Projects (bulk create, readiness, cleanup), Leases, Prometheus text and a connection-holding proxy.
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer, connect as netConnect, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { type KubeConfig, PatchStrategy, type V1Lease, type V1Namespace, Watch } from '@kubernetes/client-node';
import { adminKubeconfigFile } from '../../../e2e/controlplane/testenv.ts';
import { waitFor } from '../../../e2e/testing/wait.ts';
import { type Project, ProjectKind } from '../../src/api/index.ts';
import { gvrOf } from '../../src/controllers/common.ts';
import { PROJECT_FINALIZER, PROJECT_LABEL } from '../../src/controllers/project.ts';
import { type GVR, isAlreadyExists, isNotFound, type KubeClient } from '../../src/runtime/index.ts';

export { PROJECT_FINALIZER, PROJECT_LABEL };

const root = resolve(import.meta.dirname, '../../..');
const MAIN = join(root, 'operator/src/main.ts');

/** Namespace of every test Lease (created by the operator when missing). */
export const LEASE_NAMESPACE = 'stratus-operator-test';
export const PROJECTS: GVR = gvrOf(ProjectKind);
export const NAMESPACES: GVR = { group: '', version: 'v1', plural: 'namespaces' };
/** Label put on every Project a test creates: its value is the test's run id, for listing and cleanup. */
export const RUN_LABEL = 'test.stratus.io/run';

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** A short random id for unique Lease and Project names. */
export function runId(prefix: string): string {
  return `${prefix}-${randomBytes(3).toString('hex')}`;
}

export { waitFor };

/** Runs fn over items with at most `concurrency` calls in flight. */
export async function pool<T>(items: readonly T[], concurrency: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, items.length) }, worker));
}

/** A TCP port free right now on 127.0.0.1. */
export async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as { port: number }).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

// ---------------------------------------------------------------------------------------------------------------
// Operator processes
// ---------------------------------------------------------------------------------------------------------------

/** One parsed JSON log line; `t` is its own timestamp (ms), `at` when the harness read it. */
export interface LogLine {
  level: string;
  time: string;
  msg: string;
  t: number;
  at: number;
  key?: string;
  reconcileID?: string;
  [field: string]: unknown;
}

export interface ExitInfo {
  code: number | null;
  signal: NodeJS.Signals | null;
  at: number;
}

export interface OperatorOptions {
  leaseName: string;
  leaseNamespace?: string;
  identity?: string;
  /** Default: the admin kubeconfig of the local control plane. */
  kubeconfig?: string;
  leaderElect?: boolean;
  leaseDurationSeconds?: number;
  renewDeadlineSeconds?: number;
  retryPeriodSeconds?: number;
  gracefulShutdownSeconds?: number;
  logLevel?: 'debug' | 'info' | 'warn';
  projectConcurrency?: number;
  extraArgs?: readonly string[];
}

type Waiter = { pred: (l: LogLine) => boolean; resolve: (l: LogLine) => void };

const running = new Set<OperatorProcess>();

export class OperatorProcess {
  readonly identity: string;
  readonly port: number;
  readonly child: ChildProcess;
  readonly lines: LogLine[] = [];
  /** Non-JSON stdout lines and all of stderr. */
  readonly otherOutput: string[] = [];
  readonly exited: Promise<ExitInfo>;
  readonly startedAt = Date.now();
  exitInfo: ExitInfo | undefined;
  readonly #waiters = new Set<Waiter>();

  constructor(child: ChildProcess, identity: string, port: number) {
    this.child = child;
    this.identity = identity;
    this.port = port;
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        this.exitInfo = { code, signal, at: Date.now() };
        running.delete(this);
        resolve(this.exitInfo);
      });
    });
    createInterface({ input: child.stdout! }).on('line', (text) => this.#onLine(text));
    createInterface({ input: child.stderr! }).on('line', (text) => this.otherOutput.push(text));
  }

  #onLine(text: string): void {
    let line: LogLine;
    try {
      const parsed = JSON.parse(text) as LogLine;
      line = { ...parsed, t: Date.parse(parsed.time), at: Date.now() };
    } catch {
      this.otherOutput.push(text);
      return;
    }
    this.lines.push(line);
    for (const w of this.#waiters) {
      if (w.pred(line)) {
        this.#waiters.delete(w);
        w.resolve(line);
      }
    }
  }

  get running(): boolean {
    return this.exitInfo === undefined;
  }

  /** Log lines matching a message (string: exact) or predicate. */
  logs(match: string | ((l: LogLine) => boolean)): LogLine[] {
    const pred = typeof match === 'string' ? (l: LogLine) => l.msg === match : match;
    return this.lines.filter(pred);
  }

  /** Resolves with the first line (already logged or future) matching; rejects on timeout or process exit. */
  waitForLog(match: string | ((l: LogLine) => boolean), timeoutMs = 30_000): Promise<LogLine> {
    const pred = typeof match === 'string' ? (l: LogLine) => l.msg === match : match;
    const found = this.lines.find(pred);
    if (found) return Promise.resolve(found);
    return new Promise<LogLine>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiters.delete(waiter);
        reject(new Error(`${this.identity}: no log line ${String(match)} within ${timeoutMs} ms\n${this.tail()}`));
      }, timeoutMs);
      const waiter: Waiter = {
        pred,
        resolve: (l) => {
          clearTimeout(timer);
          resolve(l);
        },
      };
      this.#waiters.add(waiter);
      void this.exited.then((e) => {
        if (!this.#waiters.has(waiter)) return;
        this.#waiters.delete(waiter);
        clearTimeout(timer);
        reject(
          new Error(`${this.identity} exited (${e.code ?? e.signal}) before logging ${String(match)}\n${this.tail()}`),
        );
      });
    });
  }

  /** The last lines of output, for failure messages. */
  tail(n = 15): string {
    const json = this.lines.slice(-n).map((l) => `${l.time} ${l.level} ${l.msg} ${l.key ?? ''}`);
    return [...json, ...this.otherOutput.slice(-n)].join('\n');
  }

  url(path: string): string {
    return `http://127.0.0.1:${this.port}${path}`;
  }

  async http(path: string): Promise<{ status: number; body: string }> {
    const res = await fetch(this.url(path), { signal: AbortSignal.timeout(5000) });
    return { status: res.status, body: await res.text() };
  }

  async metrics(): Promise<Metrics> {
    const r = await this.http('/metrics');
    if (r.status !== 200) throw new Error(`/metrics answered ${r.status}: ${r.body}`);
    return new Metrics(r.body);
  }

  /**
   * Waits until a controller is idle: empty queue, no active worker and no reconcile for quietMs. Returns the metrics
   * then (a baseline for deltas).
   */
  async settle(controller = 'project', quietMs = 1500, timeoutMs = 60_000): Promise<Metrics> {
    let last = -1;
    let since = Date.now();
    return waitFor(
      `${this.identity}: controller ${controller} to go idle`,
      async () => {
        const m = await this.metrics();
        const total = m.sum('controller_runtime_reconcile_total', { controller });
        const busy =
          m.sum('workqueue_depth', { name: controller }) > 0 ||
          m.sum('controller_runtime_active_workers', { controller }) > 0;
        if (busy || total !== last) {
          last = total;
          since = Date.now();
          return undefined;
        }
        return Date.now() - since >= quietMs ? m : undefined;
      },
      timeoutMs,
      250,
    );
  }

  /** Sends a signal; returns the time right after it was sent (after a SIGKILL, the process runs no more code). */
  signal(sig: NodeJS.Signals): number {
    this.child.kill(sig);
    return Date.now();
  }

  /** SIGKILL and wait for the exit; returns the time the signal was sent. */
  async kill(): Promise<number> {
    if (!this.running) return this.exitInfo!.at;
    const at = this.signal('SIGKILL');
    await this.exited;
    return at;
  }

  /** SIGTERM and wait for the exit (SIGKILL after timeoutMs). */
  async terminate(timeoutMs = 40_000): Promise<ExitInfo> {
    if (!this.running) return this.exitInfo!;
    this.signal('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), timeoutMs);
    const e = await this.exited;
    clearTimeout(timer);
    return e;
  }
}

/**
 * Starts an operator process (`node operator/src/main.ts ...`) on a free metrics port. Resolves once the process has
 * spawned; wait for 'operator started' (caches synced) or 'leading: controllers started' as needed.
 */
export async function startOperator(opts: OperatorOptions): Promise<OperatorProcess> {
  const port = await freePort();
  const identity = opts.identity ?? `${opts.leaseName}-${randomBytes(2).toString('hex')}`;
  const args = [
    MAIN,
    '--kubeconfig',
    opts.kubeconfig ?? adminKubeconfigFile(),
    '--metrics-host',
    '127.0.0.1',
    '--metrics-port',
    String(port),
    '--lease-namespace',
    opts.leaseNamespace ?? LEASE_NAMESPACE,
    '--lease-name',
    opts.leaseName,
    '--identity',
    identity,
    '--log-level',
    opts.logLevel ?? 'info',
  ];
  if (opts.leaderElect === false) args.push('--no-leader-elect');
  const num = (flag: string, v: number | undefined) => v !== undefined && args.push(flag, String(v));
  num('--lease-duration-seconds', opts.leaseDurationSeconds);
  num('--renew-deadline-seconds', opts.renewDeadlineSeconds);
  num('--retry-period-seconds', opts.retryPeriodSeconds);
  num('--graceful-shutdown-seconds', opts.gracefulShutdownSeconds);
  num('--project-concurrency', opts.projectConcurrency);
  args.push(...(opts.extraArgs ?? []));
  // Only the flags configure it: STRATUS_* variables of the test environment would be read as settings.
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('STRATUS_')));
  const child = spawn(process.execPath, args, { cwd: root, env, stdio: ['ignore', 'pipe', 'pipe'] });
  await new Promise<void>((res, rej) => {
    child.once('spawn', res);
    child.once('error', rej);
  });
  const op = new OperatorProcess(child, identity, port);
  running.add(op);
  return op;
}

/** SIGKILLs every operator process still running (afterAll safety net). */
export async function killAllOperators(): Promise<void> {
  await Promise.all([...running].map((op) => op.kill()));
}

// ---------------------------------------------------------------------------------------------------------------
// Prometheus text format
// ---------------------------------------------------------------------------------------------------------------

export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

export function parseMetrics(text: string): Sample[] {
  const out: Sample[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$/.exec(line);
    if (!m) throw new Error(`unparsable metrics line: ${line}`);
    const labels: Record<string, string> = {};
    for (const lm of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      labels[lm[1]!] = lm[2]!.replace(/\\(.)/g, (_s, c: string) => (c === 'n' ? '\n' : c));
    }
    const v = m[3]!;
    out.push({ name: m[1]!, labels, value: v === '+Inf' ? Infinity : v === '-Inf' ? -Infinity : Number(v) });
  }
  return out;
}

export class Metrics {
  readonly text: string;
  readonly samples: Sample[];

  constructor(text: string) {
    this.text = text;
    this.samples = parseMetrics(text);
  }

  /** Samples of a metric whose labels include all of `labels`. */
  find(name: string, labels: Record<string, string> = {}): Sample[] {
    return this.samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
  }

  /** Sum over the matching samples (0 when none). */
  sum(name: string, labels: Record<string, string> = {}): number {
    return this.find(name, labels).reduce((a, s) => a + s.value, 0);
  }

  /** The single matching sample's value; throws unless exactly one matches. */
  value(name: string, labels: Record<string, string> = {}): number {
    const f = this.find(name, labels);
    if (f.length !== 1) throw new Error(`${f.length} samples of ${name}${JSON.stringify(labels)}`);
    return f[0]!.value;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Projects, namespaces, Leases
// ---------------------------------------------------------------------------------------------------------------

export function projectManifest(name: string, run: string, spec: Partial<Project['spec']> = {}): Project {
  return {
    apiVersion: ProjectKind.apiVersion,
    kind: ProjectKind.kind,
    metadata: { name, labels: { [RUN_LABEL]: run } },
    spec,
  } as Project;
}

export function readyCondition(p: Project) {
  return p.status?.conditions?.find((c) => c.type === 'Ready');
}

export function isReady(p: Project): boolean {
  return readyCondition(p)?.status === 'True';
}

/** Creates Projects, `concurrency` at a time. With retryUntil, failed creates are retried until that time
 *  (an AlreadyExists on a retry counts as created: the first attempt may have landed). */
export async function createProjects(
  client: KubeClient,
  names: readonly string[],
  run: string,
  opts: { concurrency?: number; retryUntil?: number; onCreated?: (name: string) => void; onError?: () => void } = {},
): Promise<void> {
  await pool(names, opts.concurrency ?? 25, async (name) => {
    for (let attempt = 0; ; attempt++) {
      try {
        await client.create(PROJECTS, projectManifest(name, run));
        break;
      } catch (e) {
        if (attempt > 0 && isAlreadyExists(e)) break;
        if (opts.retryUntil === undefined || Date.now() > opts.retryUntil) throw e;
        opts.onError?.();
        await sleep(250);
      }
    }
    opts.onCreated?.(name);
  });
}

export async function listProjects(client: KubeClient, run: string): Promise<Project[]> {
  return (await client.listAll<Project>(PROJECTS, { labelSelector: `${RUN_LABEL}=${run}` })).items;
}

/** Namespaces labelled as owned by one of the given projects. */
export async function projectNamespaces(client: KubeClient, projects: ReadonlySet<string>): Promise<V1Namespace[]> {
  const all = (await client.listAll<V1Namespace>(NAMESPACES, { labelSelector: PROJECT_LABEL })).items;
  return all.filter((ns) => projects.has(ns.metadata?.labels?.[PROJECT_LABEL] ?? ''));
}

/**
 * Waits until every named Project is Ready and its namespace exists with the project label; returns the Projects.
 */
export async function waitProjectsReady(
  client: KubeClient,
  run: string,
  names: readonly string[],
  timeoutMs: number,
): Promise<Project[]> {
  const want = new Set(names);
  let missing: string[] = [];
  try {
    return await waitFor(
      `${names.length} projects of run ${run} to be Ready`,
      async () => {
        const items = (await listProjects(client, run)).filter((p) => want.has(p.metadata.name!));
        const ready = items.filter(isReady);
        missing = names.filter((n) => !ready.some((p) => p.metadata.name === n));
        if (missing.length > 0) return undefined;
        const nss = await projectNamespaces(client, want);
        const owned = new Set(nss.map((ns) => ns.metadata?.labels?.[PROJECT_LABEL]));
        missing = names.filter((n) => !owned.has(n));
        return missing.length === 0 ? items : undefined;
      },
      timeoutMs,
      500,
    );
  } catch (e) {
    throw new Error(`${String(e)}; not ready: ${missing.slice(0, 10).join(', ')} (${missing.length})`);
  }
}

/**
 * Deletes a run's Projects (stripping their finalizers) and their namespaces, so nothing is left for a later test's
 * operator. The namespaces lose the project label first: while the namespace controller empties them (which takes a
 * while), their updates must not reach later operators' namespace informers as events about projects.
 */
export async function cleanupProjects(client: KubeClient, run: string): Promise<void> {
  const items = await listProjects(client, run);
  const names = new Set(items.map((p) => p.metadata.name!));
  const ignoreNotFound = (e: unknown) => {
    if (!isNotFound(e)) throw e;
  };
  await pool(await projectNamespaces(client, names), 25, async (ns) => {
    const name = ns.metadata!.name!;
    await client
      .patch(NAMESPACES, name, undefined, { metadata: { labels: { [PROJECT_LABEL]: null } } }, PatchStrategy.MergePatch)
      .catch(ignoreNotFound);
    await client.delete(NAMESPACES, name).catch(ignoreNotFound);
  });
  await pool(items, 25, async (p) => {
    await client.delete(PROJECTS, p.metadata.name!).catch((e: unknown) => {
      if (!isNotFound(e)) throw e;
    });
    await client
      .patch(PROJECTS, p.metadata.name!, undefined, { metadata: { finalizers: null } }, PatchStrategy.MergePatch)
      .catch((e: unknown) => {
        if (!isNotFound(e)) throw e;
      });
  });
}

export async function readLease(client: KubeClient, name: string, namespace = LEASE_NAMESPACE): Promise<V1Lease> {
  return client.get<V1Lease>({ group: 'coordination.k8s.io', version: 'v1', plural: 'leases' }, name, namespace);
}

export async function deleteLease(client: KubeClient, name: string, namespace = LEASE_NAMESPACE): Promise<void> {
  await client
    .delete({ group: 'coordination.k8s.io', version: 'v1', plural: 'leases' }, name, namespace)
    .catch(() => {});
}

/** Watch events of one type of object, recorded with the time they arrived. */
export interface WatchRecord<T> {
  type: string;
  object: T;
  at: number;
}

/**
 * Watches `path` from resourceVersion (or from now) and records every event until stop(). A watch the server or
 * client-node closes (idle timeout, request timeout) is resumed from the last resourceVersion seen, so no event is
 * lost or repeated; `failed` holds the error when that is impossible (410 Gone: events were lost, or repeated
 * failures): a test counting events must not trust an interrupted watch.
 */
export async function recordWatch<T>(
  kc: KubeConfig,
  path: string,
  query: Record<string, string>,
): Promise<{ events: WatchRecord<T>[]; failed: () => unknown; stop: () => void }> {
  const events: WatchRecord<T>[] = [];
  let failed: unknown;
  let stopped = false;
  let resumes = 0;
  let lastRV = query.resourceVersion;
  let ac: AbortController | undefined;
  const start = async (): Promise<void> => {
    ac = await new Watch(kc).watch(
      path,
      { allowWatchBookmarks: false, ...query, ...(lastRV ? { resourceVersion: lastRV } : {}) },
      (type: string, object: T) => {
        const rv = (object as { metadata?: { resourceVersion?: string } }).metadata?.resourceVersion;
        if (type === 'ERROR') {
          failed ??= new Error(`watch error event: ${JSON.stringify(object)}`);
          return;
        }
        if (rv) lastRV = rv;
        events.push({ type, object, at: Date.now() });
      },
      (err: unknown) => {
        if (stopped || failed) return;
        if (++resumes > 20) {
          failed = err ?? new Error('watch ended too often');
          return;
        }
        start().catch((e: unknown) => {
          failed ??= e;
        });
      },
    );
  };
  await start();
  return {
    events,
    failed: () => failed,
    stop: () => {
      stopped = true;
      ac?.abort();
    },
  };
}

// ---------------------------------------------------------------------------------------------------------------
// A TCP proxy to kube-apiserver that can hold connections (the apiserver looks unreachable, without stopping it)
// ---------------------------------------------------------------------------------------------------------------

export class HoldingProxy {
  readonly #server: Server;
  readonly #target: { host: string; port: number };
  readonly #held: Socket[] = [];
  readonly #sockets = new Set<Socket>();
  #holding: boolean;
  port = 0;

  constructor(target: string, hold: boolean) {
    const u = new URL(target);
    this.#target = { host: u.hostname, port: Number(u.port) };
    this.#holding = hold;
    this.#server = createServer((sock) => {
      this.#sockets.add(sock);
      sock.on('close', () => this.#sockets.delete(sock));
      sock.on('error', () => {});
      if (this.#holding) {
        sock.pause();
        this.#held.push(sock);
      } else this.#pipe(sock);
    });
  }

  async listen(): Promise<number> {
    await new Promise<void>((r) => this.#server.listen(0, '127.0.0.1', r));
    this.port = (this.#server.address() as { port: number }).port;
    return this.port;
  }

  /** Connects held connections (and new ones from now on) to the target. */
  release(): void {
    this.#holding = false;
    for (const s of this.#held.splice(0)) this.#pipe(s);
  }

  /** A network partition: every open connection is cut and new ones are held (until release()). */
  cut(): void {
    this.#holding = true;
    for (const s of this.#sockets) s.destroy();
    this.#held.length = 0;
  }

  #pipe(sock: Socket): void {
    const up = netConnect(this.#target.port, this.#target.host);
    this.#sockets.add(up);
    up.on('close', () => this.#sockets.delete(up));
    up.on('error', () => sock.destroy());
    sock.on('error', () => up.destroy());
    sock.pipe(up);
    up.pipe(sock);
    sock.resume();
  }

  async close(): Promise<void> {
    for (const s of this.#sockets) s.destroy();
    await new Promise<void>((r) => this.#server.close(() => r()));
  }

  /** A copy of the admin kubeconfig whose server is this proxy. */
  kubeconfig(): string {
    const text = readFileSync(adminKubeconfigFile(), 'utf8');
    const server = /server:\s*(\S+)/.exec(text)?.[1];
    if (!server) throw new Error('admin kubeconfig has no server');
    const dir = mkdtempSync(join(tmpdir(), 'stratus-proxy-'));
    const file = join(dir, 'kubeconfig');
    writeFileSync(file, text.replace(server, `https://127.0.0.1:${this.port}`), { mode: 0o600 });
    return file;
  }
}
