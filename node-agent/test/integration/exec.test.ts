// hostExec with real child processes (this tier runs processes; the unit tier does not): a command that exits
// without reading its stdin must fail with its exit status, never with an uncaught EPIPE that ends the agent.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ExecError, hostExec } from '../../src/network/exec.ts';

const uncaught: unknown[] = [];
const onUncaught = (err: unknown) => uncaught.push(err);
beforeAll(() => {
  process.on('uncaughtException', onUncaught);
});
afterAll(() => {
  process.off('uncaughtException', onUncaught);
});

describe('hostExec', () => {
  // Far more than a pipe holds (64 KiB): the write is still going on when the child exits.
  const input = 'x'.repeat(8 * 1024 * 1024);

  it('fails a command that exits without reading its input with its exit status (no EPIPE crash)', async () => {
    const exec = hostExec();
    for (let i = 0; i < 3; i++) {
      const err = await exec.run(process.execPath, ['-e', 'process.exit(3)'], { input }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ExecError);
      expect((err as ExecError).code).toBe(3);
    }
    // A command that reads its input gets all of it.
    const ok = await exec.run(
      process.execPath,
      ['-e', 'let n = 0; process.stdin.on("data", (c) => { n += c.length; }).on("end", () => console.log(n));'],
      { input },
    );
    expect(ok.stdout.trim()).toBe(String(input.length));
    expect(uncaught).toEqual([]);
  });
});
