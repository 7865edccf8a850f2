// The unit tier's guard (unit-setup.ts) is active in every unit test worker: each way to start a process throws.
import * as cp from 'node:child_process';
import { execFile, spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';

const MESSAGE = /unit tests run no external binaries: move this test to the integration tier/;

describe('unit tier guard', () => {
  it('refuses named imports, the namespace, require() and promisified calls', async () => {
    expect(() => spawn('true')).toThrow(MESSAGE);
    expect(() => execFile('true')).toThrow(MESSAGE);
    expect(() => cp.execFileSync('true')).toThrow(MESSAGE);
    expect(() => cp.spawnSync('true')).toThrow(MESSAGE);
    expect(() => cp.exec('true')).toThrow(MESSAGE);
    expect(() => cp.fork('x.js')).toThrow(MESSAGE);
    const required = createRequire(import.meta.url)('node:child_process') as typeof cp;
    expect(() => required.spawn('true')).toThrow(MESSAGE);
    await expect(promisify(execFile)('true', [])).rejects.toThrow(MESSAGE);
  });
});
