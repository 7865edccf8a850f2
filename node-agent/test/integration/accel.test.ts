// Accelerator probes that start a process (the pure decision logic is unit-tested in node-agent/src/qemu/accel.test.ts).
import { describe, expect, it } from 'vitest';
import { requireTools } from '../../../e2e/testing/tools.ts';
import { detectAccelerator, probeKvmBoot } from '../../src/qemu/accel.ts';

describe('probe guest', () => {
  it('reports a missing QEMU binary as a failed probe', async () => {
    const r = await probeKvmBoot({ qemuBinary: '/nonexistent/qemu-system-x86_64', cpuModel: 'host', deadlineMs: 500 });
    expect(r).toEqual({ ok: false, detail: expect.stringContaining('cannot run /nonexistent/qemu-system-x86_64') });
  });
});

describe('real accelerator probe on this machine', () => {
  it('decides, with a reason', { timeout: 60_000 }, async () => {
    requireTools('qemu-system-x86_64');
    const decision = await detectAccelerator({ mode: 'auto' });
    console.info(`accelerator on this machine: ${decision.accelerator} (${decision.reason})`);
    expect(['kvm', 'tcg']).toContain(decision.accelerator);
    expect(decision.reason.length).toBeGreaterThan(10);
  });
});
