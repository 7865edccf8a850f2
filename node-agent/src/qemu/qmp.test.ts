import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import {
  powerStateOf,
  QmpClient,
  QmpClosedError,
  QmpError,
  type QmpEvent,
  QmpProtocolError,
  QmpTimeoutError,
  RUN_STATES,
} from './qmp.ts';

const GREETING = {
  QMP: { version: { qemu: { micro: 22, minor: 2, major: 7 }, package: 'Debian 1:7.2+dfsg-7' }, capabilities: ['oob'] },
};

type Msg = { execute: string; arguments?: Record<string, unknown>; id?: unknown };
type Handler = (msg: Msg, conn: FakeConn) => void;

/** One accepted connection of the fake server: writes raw text (CRLF-terminated lines, like QEMU). */
class FakeConn {
  readonly received: Msg[] = [];
  readonly socket: Socket;
  constructor(socket: Socket) {
    this.socket = socket;
  }
  send(obj: unknown): void {
    this.socket.write(`${JSON.stringify(obj)}\r\n`);
  }
  raw(text: string): void {
    this.socket.write(text);
  }
  reply(msg: Msg, ret: unknown = {}): void {
    this.send({ return: ret, id: msg.id });
  }
  event(name: string, data?: Record<string, unknown>): void {
    this.send({ event: name, ...(data ? { data } : {}), timestamp: { seconds: 1700000000, microseconds: 42 } });
  }
}

/** A fake QMP server on a real UNIX socket: greets, then hands every command line to `handler`. */
class FakeQmpServer {
  server: Server;
  conns: FakeConn[] = [];
  handler: Handler = (msg, conn) => conn.reply(msg);
  greet: (conn: FakeConn) => void = (conn) => conn.send(GREETING);
  readonly path: string;
  constructor(path: string) {
    this.path = path;
    this.server = createServer((socket) => {
      const conn = new FakeConn(socket);
      this.conns.push(conn);
      let buf = '';
      socket.on('data', (d) => {
        buf += d.toString('utf8');
        for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          const msg = JSON.parse(line) as Msg;
          conn.received.push(msg);
          this.handler(msg, conn);
        }
      });
      socket.on('error', () => {});
      this.greet(conn);
    });
  }
  listen(): Promise<void> {
    return new Promise((resolve) => this.server.listen(this.path, resolve));
  }
  async close(): Promise<void> {
    for (const c of this.conns) c.socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

let dir: string;
let server: FakeQmpServer;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'stratus-qmp-'));
  server = new FakeQmpServer(join(dir, 'qmp.sock'));
  await server.listen();
});

afterEach(async () => {
  await server.close();
  await rm(dir, { recursive: true, force: true });
});

describe('QmpClient', () => {
  it('awaits the greeting, negotiates, and correlates replies by id', async () => {
    server.handler = (msg, conn) => {
      if (msg.execute === 'query-status') conn.reply(msg, { running: true, status: 'running' });
      else conn.reply(msg);
    };
    const qmp = await QmpClient.connect(server.path);
    expect(qmp.greeting?.version.qemu).toEqual({ micro: 22, minor: 2, major: 7 });
    const conn = server.conns[0]!;
    expect(conn.received[0]).toMatchObject({ execute: 'qmp_capabilities' });
    expect(conn.received[0]).not.toHaveProperty('arguments');
    expect(await qmp.queryStatus()).toEqual({ running: true, status: 'running', powerState: 'RUNNING' });
    const ids = conn.received.map((m) => m.id);
    expect(new Set(ids).size).toBe(ids.length);
    expect(ids.every((id) => typeof id === 'string')).toBe(true);
    await qmp.close();
    expect(qmp.closed).toBe(true);
  });

  it('matches out-of-order replies to their commands', async () => {
    const held: Msg[] = [];
    server.handler = (msg, conn) => {
      if (msg.execute === 'qmp_capabilities') return conn.reply(msg);
      held.push(msg);
      if (held.length === 3) {
        for (const m of [held[2]!, held[0]!, held[1]!]) conn.reply(m, { echo: m.execute });
      }
    };
    const qmp = await QmpClient.connect(server.path);
    const results = await Promise.all([qmp.execute('a'), qmp.execute('b'), qmp.execute('c')]);
    expect(results).toEqual([{ echo: 'a' }, { echo: 'b' }, { echo: 'c' }]);
    await qmp.close();
  });

  it('passes arguments and rejects error replies with a typed QmpError', async () => {
    server.handler = (msg, conn) => {
      if (msg.execute === 'system_wakeup') {
        conn.send({
          error: { class: 'GenericError', desc: 'Unable to wake up: guest is not in suspended state' },
          id: msg.id,
        });
      } else conn.reply(msg, msg.arguments ?? {});
    };
    const qmp = await QmpClient.connect(server.path);
    expect(await qmp.execute('echo', { x: 1 })).toEqual({ x: 1 });
    const err = await qmp.systemWakeup().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpError);
    expect(err).toMatchObject({
      command: 'system_wakeup',
      errorClass: 'GenericError',
      desc: 'Unable to wake up: guest is not in suspended state',
    });
    await qmp.close();
  });

  it('delivers events sent before the greeting and before the negotiation reply', async () => {
    server.greet = (conn) => {
      conn.event('EARLY');
      conn.send(GREETING);
    };
    server.handler = (msg, conn) => {
      if (msg.execute === 'qmp_capabilities') {
        conn.event('RESUME');
        conn.event('NIC_RX_FILTER_CHANGED', { name: 'nic0', path: '/machine/peripheral/nic0/virtio-backend' });
      }
      conn.reply(msg);
    };
    const seen: QmpEvent[] = [];
    const qmp = await QmpClient.connect(server.path, { onEvent: (e) => seen.push(e) });
    expect(seen.map((e) => e.event)).toEqual(['EARLY', 'RESUME', 'NIC_RX_FILTER_CHANGED']);
    expect(seen[0]).toEqual({ event: 'EARLY', data: {}, timestamp: { seconds: 1700000000, microseconds: 42 } });
    expect(seen[2]!.data).toEqual({ name: 'nic0', path: '/machine/peripheral/nic0/virtio-backend' });
    await qmp.close();
  });

  it('parses lines split across chunks and merged into one chunk', async () => {
    server.greet = (conn) => {
      const text = `${JSON.stringify(GREETING)}\r\n`;
      conn.raw(text.slice(0, 7));
      setTimeout(() => conn.raw(text.slice(7, 30)), 5);
      setTimeout(() => conn.raw(text.slice(30)), 10);
    };
    server.handler = (msg, conn) => {
      if (msg.execute !== 'burst') return conn.reply(msg);
      // event + reply + event in one write, the last one split in two writes
      const ev = (n: string) => JSON.stringify({ event: n, timestamp: { seconds: 1, microseconds: 2 } });
      const all = `${ev('ONE')}\r\n${JSON.stringify({ return: { ok: 'ü' }, id: msg.id })}\r\n${ev('TWO')}\r\n`;
      const cut = all.length - 10;
      conn.raw(all.slice(0, cut));
      setTimeout(() => conn.raw(all.slice(cut)), 5);
    };
    const qmp = await QmpClient.connect(server.path);
    const events: string[] = [];
    qmp.on('event', (e) => events.push(e.event));
    const two = qmp.waitForEvent('TWO', { timeoutMs: 1000 });
    expect(await qmp.execute('burst')).toEqual({ ok: 'ü' });
    await two;
    expect(events).toEqual(['ONE', 'TWO']);
    await qmp.close();
  });

  it('handles a multi-byte UTF-8 character split between chunks', async () => {
    server.handler = (msg, conn) => {
      if (msg.execute !== 'utf8') return conn.reply(msg);
      const bytes = Buffer.from(`${JSON.stringify({ return: 'é€', id: msg.id })}\r\n`, 'utf8');
      const cut = bytes.indexOf(0xe2) + 1; // inside the 3-byte euro sign
      conn.socket.write(bytes.subarray(0, cut));
      setTimeout(() => conn.socket.write(bytes.subarray(cut)), 5);
    };
    const qmp = await QmpClient.connect(server.path);
    expect(await qmp.execute('utf8')).toBe('é€');
    await qmp.close();
  });

  it('times out when there is no greeting: at timeoutMs, not before (fake clock)', async () => {
    server.greet = () => {};
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout', 'Date'] });
    try {
      const qmp = new QmpClient();
      let outcome: unknown;
      void qmp.connect(server.path, { timeoutMs: 150 }).then(
        () => {
          outcome = 'connected';
        },
        (e: unknown) => {
          outcome = e;
        },
      );
      // the socket is really connected (I/O is not faked); only the greeting is missing
      while (server.conns.length === 0) await new Promise((r) => setImmediate(r));
      await vi.advanceTimersByTimeAsync(149);
      expect(outcome).toBeUndefined();
      expect(qmp.closed).toBe(false);
      await vi.advanceTimersByTimeAsync(1);
      for (let i = 0; i < 10 && outcome === undefined; i++) await new Promise((r) => setImmediate(r));
      expect(outcome).toBeInstanceOf(QmpTimeoutError);
      expect(qmp.closed).toBe(true);
    } finally {
      vi.useRealTimers();
    }
  });

  it('times out a command without a reply and drops the late reply', async () => {
    let late: Msg | undefined;
    server.handler = (msg, conn) => {
      if (msg.execute === 'slow') late = msg;
      else conn.reply(msg, msg.execute === 'fast' ? 'fast' : {});
    };
    const qmp = await QmpClient.connect(server.path);
    await expect(qmp.execute('slow', undefined, { timeoutMs: 50 })).rejects.toBeInstanceOf(QmpTimeoutError);
    server.conns[0]!.reply(late!, 'too late');
    expect(await qmp.execute('fast')).toBe('fast');
    await qmp.close();
  });

  it('attributes an error reply without id to the oldest command in flight', async () => {
    server.handler = (msg, conn) => {
      if (msg.execute === 'garbled') conn.send({ error: { class: 'GenericError', desc: 'JSON parse error' } });
      else conn.reply(msg);
    };
    const qmp = await QmpClient.connect(server.path);
    await expect(qmp.execute('garbled')).rejects.toMatchObject({ command: 'garbled', desc: 'JSON parse error' });
    await qmp.close();
  });

  it('rejects with the abort reason when the signal aborts', async () => {
    server.handler = (msg, conn) => {
      if (msg.execute === 'qmp_capabilities') conn.reply(msg);
    };
    const qmp = await QmpClient.connect(server.path);
    const ac = new AbortController();
    const p = qmp.execute('never', undefined, { signal: ac.signal });
    ac.abort(new Error('stop waiting'));
    await expect(p).rejects.toThrow('stop waiting');
    await qmp.close();
  });

  it('rejects all pending calls and event waits when the server closes the connection', async () => {
    server.handler = (msg, conn) => {
      if (msg.execute === 'qmp_capabilities') conn.reply(msg);
      if (msg.execute === 'die') setTimeout(() => conn.socket.destroy(), 10);
    };
    const qmp = await QmpClient.connect(server.path);
    let closeReason: Error | undefined;
    qmp.on('close', (e) => {
      closeReason = e;
    });
    const waits = [qmp.execute('pending-1'), qmp.execute('pending-2'), qmp.waitForEvent('SHUTDOWN')];
    const die = qmp.execute('die');
    for (const p of [...waits, die]) await expect(p).rejects.toBeInstanceOf(QmpClosedError);
    expect(closeReason).toBeInstanceOf(QmpClosedError);
    await expect(qmp.execute('after')).rejects.toBeInstanceOf(QmpClosedError);
  });

  it('rejects pending calls on close()', async () => {
    server.handler = (msg, conn) => {
      if (msg.execute === 'qmp_capabilities') conn.reply(msg);
    };
    const qmp = await QmpClient.connect(server.path);
    const p = qmp.execute('never');
    await qmp.close();
    await expect(p).rejects.toBeInstanceOf(QmpClosedError);
  });

  it('closes with a protocol error on a line that is not JSON', async () => {
    server.handler = (msg, conn) => {
      if (msg.execute === 'qmp_capabilities') conn.reply(msg);
      else conn.raw('this is not json\r\n');
    };
    const qmp = await QmpClient.connect(server.path);
    const closed = new Promise<Error>((resolve) => qmp.once('close', resolve));
    await expect(qmp.execute('x')).rejects.toBeInstanceOf(QmpClosedError);
    expect(await closed).toBeInstanceOf(QmpProtocolError);
  });

  it('fails to connect to a missing socket', async () => {
    await expect(QmpClient.connect(join(dir, 'missing.sock'), { timeoutMs: 500 })).rejects.toBeInstanceOf(
      QmpClosedError,
    );
  });

  it('fails negotiation when qmp_capabilities is refused', async () => {
    server.handler = (msg, conn) =>
      conn.send({
        error: { class: 'CommandNotFound', desc: 'Capabilities negotiation is already complete' },
        id: msg.id,
      });
    await expect(QmpClient.connect(server.path)).rejects.toBeInstanceOf(QmpError);
  });

  it('waitForEvent filters by name and predicate, and times out', async () => {
    server.handler = (msg, conn) => {
      conn.reply(msg);
      if (msg.execute === 'system_powerdown') {
        conn.event('POWERDOWN');
        conn.event('SHUTDOWN', { guest: false, reason: 'host-signal' });
        conn.event('SHUTDOWN', { guest: true, reason: 'guest-shutdown' });
      }
    };
    const qmp = await QmpClient.connect(server.path);
    const down = qmp.waitForEvent('SHUTDOWN', { timeoutMs: 1000, predicate: (e) => e.data.guest === true });
    await qmp.powerdown();
    expect((await down).data).toEqual({ guest: true, reason: 'guest-shutdown' });
    await expect(qmp.waitForEvent('WAKEUP', { timeoutMs: 30 })).rejects.toBeInstanceOf(QmpTimeoutError);
    expect(qmp.listenerCount('event')).toBe(0);
    await qmp.close();
  });

  it('a throwing event listener or predicate fails its own wait or the connection, never the process', async () => {
    server.handler = (msg, conn) => {
      conn.reply(msg);
      if (msg.execute === 'stop') conn.event('STOP');
      if (msg.execute === 'cont') conn.event('RESUME');
    };
    const qmp = await QmpClient.connect(server.path);
    const wait = qmp.waitForEvent('STOP', {
      timeoutMs: 1000,
      predicate: () => {
        throw new Error('bad predicate');
      },
    });
    await qmp.stop();
    await expect(wait).rejects.toThrow('bad predicate');
    expect(qmp.closed).toBe(false);
    // A listener that throws closes the connection with the error (its owner reconnects).
    qmp.on('event', (e) => {
      if (e.event === 'RESUME') throw new Error('listener bug');
    });
    const closed = new Promise<Error>((resolve) => qmp.once('close', resolve));
    await qmp.cont().catch(() => {}); // the reply may or may not arrive before the close
    expect((await closed).message).toBe("QMP: an 'event' listener failed on RESUME: listener bug");
    expect(qmp.closed).toBe(true);
  });

  it('sends the power helpers as the right commands; quit tolerates the connection dropping', async () => {
    server.handler = (msg, conn) => {
      if (msg.execute === 'quit') {
        conn.socket.destroy(); // QEMU may exit before the reply is read
        return;
      }
      if (msg.execute === 'query-kvm') return conn.reply(msg, { enabled: false, present: true });
      conn.reply(msg);
    };
    const qmp = await QmpClient.connect(server.path);
    await qmp.stop();
    await qmp.cont();
    await qmp.reset();
    await qmp.powerdown();
    expect(await qmp.queryKvm()).toEqual({ enabled: false, present: true });
    await qmp.quit();
    expect(server.conns[0]!.received.map((m) => m.execute)).toEqual([
      'qmp_capabilities',
      'stop',
      'cont',
      'system_reset',
      'system_powerdown',
      'query-kvm',
      'quit',
    ]);
    await expect(qmp.quit()).rejects.toBeInstanceOf(QmpClosedError);
  });
});

describe('powerStateOf', () => {
  it('maps every QEMU 7.2 run state', () => {
    const mapped = Object.fromEntries(RUN_STATES.map((s) => [s, powerStateOf(s)]));
    expect(mapped).toEqual({
      debug: 'PAUSED',
      inmigrate: 'PAUSED',
      'internal-error': 'CRASHED',
      'io-error': 'PAUSED',
      paused: 'PAUSED',
      postmigrate: 'PAUSED',
      prelaunch: 'PAUSED',
      'finish-migrate': 'PAUSED',
      'restore-vm': 'PAUSED',
      running: 'RUNNING',
      'save-vm': 'PAUSED',
      shutdown: 'SHUTDOWN',
      suspended: 'SUSPENDED',
      watchdog: 'PAUSED',
      'guest-panicked': 'CRASHED',
      colo: 'PAUSED',
    });
    expect(powerStateOf('some-future-state')).toBe('NOSTATE');
  });
});
