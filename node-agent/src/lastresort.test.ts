import { EventEmitter } from 'node:events';
import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { createLogger } from '../../operator/src/runtime/index.ts';
import { EXIT_UNCAUGHT, installLastResort } from './lastresort.ts';

function capture() {
  const lines: Array<Record<string, unknown>> = [];
  const destination = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const l of chunk.toString().split('\n')) if (l) lines.push(JSON.parse(l));
      done();
    },
  });
  return { lines, log: createLogger({ level: 'info', destination }) };
}

describe('installLastResort', () => {
  it('logs an unhandled rejection at error level and keeps running', () => {
    const { lines, log } = capture();
    const proc = new EventEmitter();
    const exits: number[] = [];
    installLastResort(log, proc as never, (c) => exits.push(c));
    proc.emit('unhandledRejection', new Error('lost promise'));
    proc.emit('unhandledRejection', 'a string reason');
    expect(exits).toEqual([]);
    expect(lines).toMatchObject([
      { level: 'error', err: { message: 'lost promise' }, unhandledRejections: 1 },
      { level: 'error', err: { message: 'a string reason' }, unhandledRejections: 2 },
    ]);
    expect(String(lines[0]!.msg)).toMatch(/keeps running/);
  });

  it('logs an uncaught exception at fatal level with its origin, then exits with 70', () => {
    const { lines, log } = capture();
    const proc = new EventEmitter();
    const exits: number[] = [];
    installLastResort(log, proc as never, (c) => exits.push(c));
    proc.emit('uncaughtException', new Error('assert(!this.paused)'), 'uncaughtException');
    expect(exits).toEqual([EXIT_UNCAUGHT]);
    expect(lines).toMatchObject([
      {
        level: 'fatal',
        origin: 'uncaughtException',
        err: { message: 'assert(!this.paused)', stack: expect.any(String) },
      },
    ]);
  });
});
