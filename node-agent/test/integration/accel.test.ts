// Accelerator probes that start a process (the pure decision logic is unit-tested in node-agent/src/qemu/accel.test.ts;
// the probe booting a real kernel: e2e/tests/qemu-driver.test.ts, which has the test image's kernel).
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { requireTools } from '../../../e2e/testing/tools.ts';
import { detectAccelerator, probeKvmKernel } from '../../src/qemu/accel.ts';

describe('probe guest', () => {
  it('reports a missing QEMU binary as a failed probe', async () => {
    const r = await probeKvmKernel({
      qemuBinary: '/nonexistent/qemu-system-x86_64',
      cpuModel: 'host',
      kernel: '/nonexistent/vmlinuz',
      deadlineMs: 500,
    });
    expect(r).toEqual({ ok: false, detail: expect.stringContaining('cannot run /nonexistent/qemu-system-x86_64') });
  });

  it('reports a kernel QEMU cannot load as a failed probe', async () => {
    requireTools('qemu-system-x86_64');
    const r = await probeKvmKernel({
      qemuBinary: 'qemu-system-x86_64',
      cpuModel: 'max',
      kernel: '/nonexistent/vmlinuz',
      deadlineMs: 5_000,
      accelerator: 'tcg',
    });
    expect(r).toEqual({ ok: false, detail: expect.stringMatching(/qemu exited 1: .*nonexistent\/vmlinuz/) });
  });
});

describe('real accelerator decision on this machine', () => {
  it('decides, with a reason, and caches a probe result per host boot', { timeout: 120_000 }, async () => {
    requireTools('qemu-system-x86_64');
    const dir = await mkdtemp(join(tmpdir(), 'stratus-accel-'));
    try {
      const cacheFile = join(dir, 'kvm-probe.json');
      const decision = await detectAccelerator({ mode: 'auto', cacheFile });
      console.info(`accelerator on this machine: ${decision.accelerator} (${decision.reason})`);
      expect(['kvm', 'tcg']).toContain(decision.accelerator);
      expect(decision.reason.length).toBeGreaterThan(10);
      const again = await detectAccelerator({ mode: 'auto', cacheFile });
      expect(again.accelerator).toBe(decision.accelerator);
      // A probe that ran (device opens, a kernel found) is not repeated.
      if (/kernel boot probe/.test(decision.reason)) expect(again.reason).toMatch(/cached for this host boot\)$/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
