// A small QMP client (QEMU Machine Protocol, qemu docs/interop/qmp-spec.rst) over a UNIX socket.
//
// Protocol facts this client relies on:
//  - The server greets first: {"QMP": {"version": {...}, "capabilities": [...]}}. Until the client sends
//    qmp_capabilities, every other command fails with CommandNotFound.
//  - Commands are {"execute": name, "arguments"?: {...}, "id"?: any}; replies are {"return": value, "id"} or
//    {"error": {"class", "desc"}, "id"}. Replies to commands QEMU could not parse may lack the id; without
//    out-of-band execution (never enabled here) replies arrive in issue order, so such a reply belongs to the
//    oldest command in flight.
//  - Asynchronous events {"event", "data"?, "timestamp": {"seconds", "microseconds"}} may arrive at any time,
//    including between the greeting and the qmp_capabilities reply (observed in practice, qemu issue 2176).
//  - Every server message is one JSON object terminated by CRLF; socket chunks split and merge lines freely.
//  - A QEMU chardev socket serves one client at a time: close the client to let another connect.
import { EventEmitter } from 'node:events';
import { connect as netConnect, type Socket } from 'node:net';
import { StringDecoder } from 'node:string_decoder';
import type { PowerState } from '../../../operator/src/api/index.ts';

/** The command failed inside QEMU (an {"error": …} reply). */
export class QmpError extends Error {
  override readonly name = 'QmpError';
  /** QMP error class, e.g. GenericError, CommandNotFound, DeviceNotActive, KVMMissingCap. */
  readonly errorClass: string;
  readonly desc: string;
  readonly command: string;
  constructor(command: string, errorClass: string, desc: string) {
    super(`QMP ${command}: ${errorClass}: ${desc}`);
    this.command = command;
    this.errorClass = errorClass;
    this.desc = desc;
  }
}

/** No reply (or greeting, or event) within the allotted time. */
export class QmpTimeoutError extends Error {
  override readonly name = 'QmpTimeoutError';
}

/** The connection is closed (by close(), by QEMU exiting, or after a protocol/socket error). */
export class QmpClosedError extends Error {
  override readonly name = 'QmpClosedError';
}

/** QEMU sent something that is not QMP. The connection is closed. */
export class QmpProtocolError extends Error {
  override readonly name = 'QmpProtocolError';
}

export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: string[];
}

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  /** Seconds and microseconds since the epoch; both -1 if QEMU could not read the clock. */
  timestamp: { seconds: number; microseconds: number };
}

export interface QmpCallOptions {
  /** Reject with QmpTimeoutError after this long. Default: the client's commandTimeoutMs. */
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface QmpConnectOptions {
  /** Time allowed for connect + greeting + qmp_capabilities. Default 5000 ms. */
  timeoutMs?: number;
  signal?: AbortSignal;
}

export interface QmpClientOptions {
  /** Default per-command timeout. Default 30000 ms. */
  commandTimeoutMs?: number;
}

/** QMP RunState (qapi/run-state.json) of QEMU 7.2. */
export const RUN_STATES = [
  'debug',
  'inmigrate',
  'internal-error',
  'io-error',
  'paused',
  'postmigrate',
  'prelaunch',
  'finish-migrate',
  'restore-vm',
  'running',
  'save-vm',
  'shutdown',
  'suspended',
  'watchdog',
  'guest-panicked',
  'colo',
] as const;
export type RunState = (typeof RUN_STATES)[number];

export interface QmpStatus {
  /** QMP's own flag: all vCPUs runnable. */
  running: boolean;
  /** The QMP run state (kept as a string: newer QEMUs may add states). */
  status: string;
  /** The Nova power state it maps to. */
  powerState: PowerState;
}

/**
 * Nova power state of a QMP run state. Follows libvirt (qemuMonitorVMStatusToPausedReason and the domain state
 * it feeds, which Nova's libvirt driver maps to power states): every stopped-but-alive state is PAUSED, ACPI S3
 * is SUSPENDED (libvirt PMSUSPENDED), 'shutdown' (only seen with -no-shutdown) is SHUTDOWN. Two deliberate
 * differences: guest-panicked and internal-error are CRASHED, since the guest cannot continue without a reset.
 * Note: a guest saved to disk by the driver's suspend has no QEMU process; that SUSPENDED is the driver's call.
 */
export function powerStateOf(status: string): PowerState {
  switch (status) {
    case 'running':
      return 'RUNNING';
    case 'suspended':
      return 'SUSPENDED';
    case 'shutdown':
      return 'SHUTDOWN';
    case 'guest-panicked':
    case 'internal-error':
      return 'CRASHED';
    case 'paused':
    case 'prelaunch':
    case 'inmigrate':
    case 'postmigrate':
    case 'finish-migrate':
    case 'save-vm':
    case 'restore-vm':
    case 'debug':
    case 'io-error':
    case 'watchdog':
    case 'colo':
      return 'PAUSED';
    default:
      return 'NOSTATE';
  }
}

interface Pending {
  id: string;
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  cleanup: () => void;
}

type QmpClientEvents = {
  /** An asynchronous QMP event. */
  event: [QmpEvent];
  /** The connection ended; the error says why (QmpClosedError for a plain close). Emitted once. */
  close: [Error];
};

let clientSeq = 0;

/**
 * QMP client. Attach 'event' listeners before connect() to see events sent during negotiation:
 *
 *   const qmp = new QmpClient();
 *   qmp.on('event', (e) => …);
 *   await qmp.connect('/run/stratus/guest/qmp.sock');
 *   const { powerState } = await qmp.queryStatus();
 *
 * One connection per client; after close, make a new client to reconnect.
 */
export class QmpClient extends EventEmitter<QmpClientEvents> {
  #socket: Socket | undefined;
  #greeting: QmpGreeting | undefined;
  #pending = new Map<string, Pending>();
  #decoder = new StringDecoder('utf8');
  #buffer = '';
  #nextId = 0;
  #prefix = `stratus-${process.pid}-${++clientSeq}`;
  #closed: Error | undefined;
  #greetingWaiter: { resolve: (g: QmpGreeting) => void; reject: (err: Error) => void } | undefined;
  readonly commandTimeoutMs: number;

  constructor(options: QmpClientOptions = {}) {
    super();
    this.commandTimeoutMs = options.commandTimeoutMs ?? 30_000;
  }

  /** Create, connect and negotiate in one call. `onEvent` sees events sent during negotiation too. */
  static async connect(
    path: string,
    options: QmpConnectOptions & QmpClientOptions & { onEvent?: (e: QmpEvent) => void } = {},
  ): Promise<QmpClient> {
    const client = new QmpClient(options);
    if (options.onEvent) client.on('event', options.onEvent);
    await client.connect(path, options);
    return client;
  }

  /** The server greeting (after connect()). */
  get greeting(): QmpGreeting | undefined {
    return this.#greeting;
  }

  /** Whether the connection is closed (or failed). */
  get closed(): boolean {
    return this.#closed !== undefined;
  }

  /** Connect to QEMU's QMP socket, await the greeting and negotiate capabilities (none are enabled). */
  async connect(path: string, options: QmpConnectOptions = {}): Promise<QmpGreeting> {
    if (this.#socket || this.#closed) throw new Error('QmpClient.connect: already used; create a new client');
    const timeoutMs = options.timeoutMs ?? 5_000;
    const deadline = Date.now() + timeoutMs;
    const socket = netConnect({ path });
    this.#socket = socket;
    socket.on('data', (chunk: Buffer) => this.#onData(chunk));
    socket.on('error', (err) =>
      this.#shutdown(new QmpClosedError(`QMP socket ${path}: ${err.message}`, { cause: err })),
    );
    socket.on('close', () => this.#shutdown(new QmpClosedError(`QMP socket ${path} closed`)));

    const greeting = new Promise<QmpGreeting>((resolve, reject) => {
      this.#greetingWaiter = { resolve, reject };
    });
    try {
      this.#greeting = await withTimeout(greeting, timeoutMs, options.signal, () => {
        return new QmpTimeoutError(`QMP socket ${path}: no greeting within ${timeoutMs} ms`);
      });
      await this.execute('qmp_capabilities', undefined, {
        timeoutMs: Math.max(1, deadline - Date.now()),
        ...(options.signal ? { signal: options.signal } : {}),
      });
    } catch (err) {
      this.#shutdown(err instanceof Error ? err : new Error(String(err)));
      throw err;
    }
    return this.#greeting;
  }

  /**
   * Run a command. Resolves with its "return" value, rejects with QmpError for an "error" reply, QmpTimeoutError,
   * QmpClosedError, or the signal's reason.
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, options: QmpCallOptions = {}): Promise<T> {
    if (this.#closed) return Promise.reject(new QmpClosedError(`QMP ${command}: ${this.#closed.message}`));
    if (!this.#socket) return Promise.reject(new QmpClosedError(`QMP ${command}: not connected`));
    if (options.signal?.aborted) return Promise.reject(options.signal.reason);
    const socket = this.#socket;
    const id = `${this.#prefix}-${++this.#nextId}`;
    const timeoutMs = options.timeoutMs ?? this.commandTimeoutMs;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        cleanup();
        reject(new QmpTimeoutError(`QMP ${command}: no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      const onAbort = () => {
        this.#pending.delete(id);
        cleanup();
        reject(options.signal!.reason);
      };
      options.signal?.addEventListener('abort', onAbort, { once: true });
      const cleanup = () => {
        clearTimeout(timer);
        options.signal?.removeEventListener('abort', onAbort);
      };
      this.#pending.set(id, { id, command, resolve: resolve as (v: unknown) => void, reject, cleanup });
      const msg: Record<string, unknown> = { execute: command, id };
      if (args !== undefined) msg.arguments = args;
      socket.write(`${JSON.stringify(msg)}\n`);
    });
  }

  /**
   * Resolve with the next event named `name` (and matching `predicate`). Rejects on timeout, abort, or when the
   * connection closes first. Start waiting before triggering the event:
   *   const down = qmp.waitForEvent('SHUTDOWN', { timeoutMs: 60_000 }); await qmp.powerdown(); await down;
   */
  waitForEvent(
    name: string,
    options: QmpCallOptions & { predicate?: (e: QmpEvent) => boolean } = {},
  ): Promise<QmpEvent> {
    if (this.#closed) return Promise.reject(new QmpClosedError(`waiting for ${name}: ${this.#closed.message}`));
    if (options.signal?.aborted) return Promise.reject(options.signal.reason);
    const timeoutMs = options.timeoutMs ?? this.commandTimeoutMs;
    return new Promise<QmpEvent>((resolve, reject) => {
      const onEvent = (e: QmpEvent) => {
        if (e.event !== name) return;
        let match = true;
        try {
          match = !options.predicate || options.predicate(e);
        } catch (err) {
          // A predicate that throws fails this wait, not the socket's data handler (and with it the process).
          cleanup();
          reject(err);
          return;
        }
        if (!match) return;
        cleanup();
        resolve(e);
      };
      const onClose = (err: Error) => {
        cleanup();
        reject(new QmpClosedError(`waiting for ${name}: ${err.message}`, { cause: err }));
      };
      const onAbort = () => {
        cleanup();
        reject(options.signal!.reason);
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new QmpTimeoutError(`no ${name} event within ${timeoutMs} ms`));
      }, timeoutMs);
      const cleanup = () => {
        clearTimeout(timer);
        this.off('event', onEvent);
        this.off('close', onClose);
        options.signal?.removeEventListener('abort', onAbort);
      };
      this.on('event', onEvent);
      this.on('close', onClose);
      options.signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  /** Close the connection; pending calls reject with QmpClosedError. Resolves once the socket is closed. */
  async close(): Promise<void> {
    const socket = this.#socket;
    this.#shutdown(new QmpClosedError('QMP connection closed by client'));
    if (socket && !socket.closed) await new Promise<void>((resolve) => socket.once('close', () => resolve()));
  }

  // ---- helpers for the driver ----

  /** query-status, with the Nova power state. */
  async queryStatus(options?: QmpCallOptions): Promise<QmpStatus> {
    const r = await this.execute<{ running: boolean; status: string }>('query-status', undefined, options);
    return { running: r.running, status: r.status, powerState: powerStateOf(r.status) };
  }

  /** query-kvm: whether KVM is compiled in/available (present) and in use (enabled). */
  queryKvm(options?: QmpCallOptions): Promise<{ enabled: boolean; present: boolean }> {
    return this.execute('query-kvm', undefined, options);
  }

  /** ACPI power button (system_powerdown). The guest decides; QEMU exits once it powers off. */
  async powerdown(options?: QmpCallOptions): Promise<void> {
    await this.execute('system_powerdown', undefined, options);
  }

  /** Hard reset (system_reset). */
  async reset(options?: QmpCallOptions): Promise<void> {
    await this.execute('system_reset', undefined, options);
  }

  /** Pause the vCPUs (stop); RAM stays in memory. */
  async stop(options?: QmpCallOptions): Promise<void> {
    await this.execute('stop', undefined, options);
  }

  /** Resume the vCPUs (cont); also starts a guest launched with -S. */
  async cont(options?: QmpCallOptions): Promise<void> {
    await this.execute('cont', undefined, options);
  }

  /** Wake a guest from ACPI S3 (system_wakeup); fails unless the guest is suspended. */
  async systemWakeup(options?: QmpCallOptions): Promise<void> {
    await this.execute('system_wakeup', undefined, options);
  }

  /**
   * Terminate QEMU now (quit): no guest shutdown. QEMU may drop the connection before its reply arrives, so a
   * close after sending counts as success.
   */
  async quit(options?: QmpCallOptions): Promise<void> {
    if (this.#closed) throw new QmpClosedError(`QMP quit: ${this.#closed.message}`);
    try {
      await this.execute('quit', undefined, options);
    } catch (err) {
      if (!(err instanceof QmpClosedError)) throw err;
    }
  }

  // ---- internals ----

  #onData(chunk: Buffer): void {
    this.#buffer += this.#decoder.write(chunk);
    for (;;) {
      if (this.#closed) return;
      const nl = this.#buffer.indexOf('\n');
      if (nl < 0) break;
      const line = this.#buffer.slice(0, nl).trim();
      this.#buffer = this.#buffer.slice(nl + 1);
      if (line) this.#onLine(line);
    }
    if (this.#buffer.length > 64 * 1024 * 1024) {
      this.#shutdown(new QmpProtocolError('QMP: line longer than 64 MiB'));
    }
  }

  #onLine(line: string): void {
    let msg: unknown;
    try {
      msg = JSON.parse(line);
    } catch {
      this.#shutdown(new QmpProtocolError(`QMP: not JSON: ${line.slice(0, 200)}`));
      return;
    }
    if (typeof msg !== 'object' || msg === null || Array.isArray(msg)) {
      this.#shutdown(new QmpProtocolError(`QMP: not an object: ${line.slice(0, 200)}`));
      return;
    }
    const m = msg as Record<string, unknown>;
    if ('QMP' in m) {
      const waiter = this.#greetingWaiter;
      this.#greetingWaiter = undefined;
      waiter?.resolve(m.QMP as QmpGreeting);
      return;
    }
    if (typeof m.event === 'string') {
      const ts = (m.timestamp ?? {}) as { seconds?: number; microseconds?: number };
      try {
        this.emit('event', {
          event: m.event,
          data: (m.data ?? {}) as Record<string, unknown>,
          timestamp: { seconds: ts.seconds ?? -1, microseconds: ts.microseconds ?? -1 },
        });
      } catch (err) {
        // A listener that throws would otherwise throw out of the socket's 'data' handler and end the process. The
        // connection is closed with the error instead: its owner sees 'close' and reconnects (events may be lost).
        const why = err instanceof Error ? err.message : String(err);
        this.#shutdown(new Error(`QMP: an 'event' listener failed on ${m.event}: ${why}`, { cause: err }));
      }
      return;
    }
    if ('return' in m || 'error' in m) {
      let pending: Pending | undefined;
      if ('id' in m) {
        pending = typeof m.id === 'string' ? this.#pending.get(m.id) : undefined;
        if (!pending) return; // a reply we gave up on (timeout, abort) or not ours: drop it (qmp-spec)
      } else {
        pending = this.#pending.values().next().value; // unparsed command: replies come in order
        if (!pending) return;
      }
      this.#pending.delete(pending.id);
      pending.cleanup();
      if ('error' in m) {
        const e = (m.error ?? {}) as { class?: string; desc?: string };
        pending.reject(new QmpError(pending.command, e.class ?? 'GenericError', e.desc ?? 'unknown error'));
      } else {
        pending.resolve(m.return);
      }
      return;
    }
    // Unknown message kinds are ignored (qmp-spec: be liberal in what you accept).
  }

  #shutdown(reason: Error): void {
    if (this.#closed) return;
    this.#closed = reason;
    const waiter = this.#greetingWaiter;
    this.#greetingWaiter = undefined;
    waiter?.reject(reason);
    const socket = this.#socket;
    if (socket && !socket.destroyed) socket.destroy();
    const closedErr = reason instanceof QmpClosedError ? reason : new QmpClosedError(reason.message, { cause: reason });
    for (const p of this.#pending.values()) {
      p.cleanup();
      p.reject(new QmpClosedError(`QMP ${p.command}: ${closedErr.message}`, { cause: reason }));
    }
    this.#pending.clear();
    this.emit('close', reason);
  }
}

function withTimeout<T>(
  p: Promise<T>,
  ms: number,
  signal: AbortSignal | undefined,
  onTimeout: () => Error,
): Promise<T> {
  if (signal?.aborted) return Promise.reject(signal.reason);
  return new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => {
      cleanup();
      reject(onTimeout());
    }, ms);
    const onAbort = () => {
      cleanup();
      reject(signal!.reason);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    const cleanup = () => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
    };
    p.then(
      (v) => {
        cleanup();
        resolve(v);
      },
      (e) => {
        cleanup();
        reject(e);
      },
    );
  });
}
