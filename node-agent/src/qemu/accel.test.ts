// The accelerator decision with injected device, probe and cache identity (pure). Probes that start a process:
// node-agent/test/integration/accel.test.ts; against a real kernel: e2e/tests/qemu-driver.test.ts.
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import {
  AcceleratorUnavailableError,
  type DetectAcceleratorOptions,
  detectAccelerator,
  type KvmProbeOptions,
  type KvmProbeResult,
  PROBE_APPEND,
  probeArgs,
} from './accel.ts';

const enoent = () => Promise.reject(Object.assign(new Error('no such file'), { code: 'ENOENT' }));
const eacces = () => Promise.reject(Object.assign(new Error('denied'), { code: 'EACCES' }));
const opens = () => Promise.resolve();
const probeResults = (...results: KvmProbeResult[]) => {
  const fn = vi.fn<(o: KvmProbeOptions) => Promise<KvmProbeResult>>();
  for (const r of results) fn.mockResolvedValueOnce(r);
  return fn;
};
const booted = (ms: number): KvmProbeResult => ({
  ok: true,
  detail: `kernel banner after ${ms} ms, through its initialisation to the root mount after ${ms * 3} ms`,
});
const K = '/k/vmlinuz';
const base = (o: Partial<DetectAcceleratorOptions>): DetectAcceleratorOptions => ({
  mode: 'auto',
  openDevice: opens,
  probeKernel: K,
  ...o,
});

describe('detectAccelerator', () => {
  it('tcg mode never probes', async () => {
    const probe = probeResults();
    const openDevice = vi.fn(opens);
    expect(await detectAccelerator({ mode: 'tcg', probe, openDevice })).toEqual({
      accelerator: 'tcg',
      reason: 'configured: tcg',
    });
    expect(openDevice).not.toHaveBeenCalled();
    expect(probe).not.toHaveBeenCalled();
  });

  it('auto picks KVM only when a real kernel boots under it on every attempt', async () => {
    const probe = probeResults(booted(80), booted(75));
    const d = await detectAccelerator(base({ probe, cpuModel: 'host', deadlineMs: 9000 }));
    expect(d).toEqual({
      accelerator: 'kvm',
      reason: `/dev/kvm usable; kernel boot probe (${K}, -cpu host): ${booted(80).detail}; ${booted(75).detail}`,
    });
    expect(probe).toHaveBeenCalledTimes(2);
    expect(probe.mock.calls[0]![0]).toEqual({
      qemuBinary: 'qemu-system-x86_64',
      cpuModel: 'host',
      kernel: K,
      deadlineMs: 9000,
    });
  });

  it('auto falls back to TCG when /dev/kvm is missing or not writable, without probing', async () => {
    const probe = probeResults();
    expect(await detectAccelerator(base({ openDevice: enoent, probe }))).toEqual({
      accelerator: 'tcg',
      reason: 'KVM unusable, using TCG: /dev/kvm cannot be opened read-write: does not exist',
    });
    expect(await detectAccelerator(base({ openDevice: eacces, probe, kvmDevice: '/dev/kvm0' }))).toEqual({
      accelerator: 'tcg',
      reason: 'KVM unusable, using TCG: /dev/kvm0 cannot be opened read-write: permission denied',
    });
    expect(probe).not.toHaveBeenCalled();
  });

  it('a KVM that opens but cannot boot a kernel (kvm-pvm) means TCG, with the reason', async () => {
    const probe = probeResults({
      ok: false,
      detail:
        'the guest stopped with status internal-error under KVM: KVM internal error. Suberror: 1; emulation failure (no kernel output)',
    });
    expect(await detectAccelerator(base({ probe }))).toEqual({
      accelerator: 'tcg',
      reason:
        'KVM unusable, using TCG: /dev/kvm opens, but kernel boot probe 1/2 failed: the guest stopped with status internal-error under KVM: KVM internal error. Suberror: 1; emulation failure (no kernel output)',
    });
    expect(probe).toHaveBeenCalledTimes(1);
  });

  it('auto falls back to TCG when a later attempt fails (flaky KVM)', async () => {
    const probe = probeResults(booted(90), { ok: false, detail: 'the kernel did not finish booting within 15000 ms' });
    const d = await detectAccelerator(base({ probe }));
    expect(d.accelerator).toBe('tcg');
    expect(d.reason).toContain('kernel boot probe 2/2 failed: the kernel did not finish booting');
  });

  it('without a kernel to boot, auto means TCG and names where it looked', async () => {
    const probe = probeResults();
    const d = await detectAccelerator({
      mode: 'auto',
      openDevice: opens,
      probe,
      kernelCandidates: ['/nonexistent/a/vmlinuz', '/nonexistent/b/vmlinuz'],
    });
    expect(d).toEqual({
      accelerator: 'tcg',
      reason:
        'KVM unusable, using TCG: /dev/kvm opens, but there is no kernel to boot the KVM probe with (looked for /nonexistent/a/vmlinuz, /nonexistent/b/vmlinuz; set --kvm-probe-kernel)',
    });
    expect(probe).not.toHaveBeenCalled();
  });

  it('kvm mode returns KVM when it works and throws when it does not', async () => {
    const ok = probeResults(booted(50));
    expect(await detectAccelerator(base({ mode: 'kvm', probe: ok, attempts: 1 }))).toEqual({
      accelerator: 'kvm',
      reason: `configured: kvm; /dev/kvm usable; kernel boot probe (${K}, -cpu host): ${booted(50).detail}`,
    });
    await expect(detectAccelerator(base({ mode: 'kvm', openDevice: enoent }))).rejects.toThrow(
      AcceleratorUnavailableError,
    );
    const bad = probeResults({ ok: false, detail: 'query-kvm: enabled=false present=true' });
    await expect(detectAccelerator(base({ mode: 'kvm', probe: bad }))).rejects.toThrow(
      'KVM configured but unusable: /dev/kvm opens, but kernel boot probe 1/2 failed: query-kvm: enabled=false present=true',
    );
  });
});

describe('probe result cache', () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'stratus-accel-'));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('probes once per host boot and kernel: a second agent start reuses the result, a new identity probes again', async () => {
    const cacheFile = join(dir, 'run', 'kvm-probe.json');
    let identity = 'boot-1';
    const o = (probe: ReturnType<typeof probeResults>) =>
      base({ probe, cacheFile, attempts: 1, identity: async () => identity });

    const first = probeResults({ ok: false, detail: 'the kernel did not finish booting within 15000 ms' });
    const d1 = await detectAccelerator(o(first));
    expect(first).toHaveBeenCalledTimes(1);
    expect(d1.accelerator).toBe('tcg');
    expect(JSON.parse(await readFile(cacheFile, 'utf8'))).toMatchObject({ ok: false });

    const second = probeResults();
    const d2 = await detectAccelerator(o(second));
    expect(second).not.toHaveBeenCalled();
    expect(d2.accelerator).toBe('tcg');
    expect(d2.reason).toMatch(/cached for this host boot\)$/);

    // The host rebooted (or its kernel, QEMU or the probe kernel changed): probe again.
    identity = 'boot-2';
    const third = probeResults(booted(40));
    expect((await detectAccelerator(o(third))).accelerator).toBe('kvm');
    expect(third).toHaveBeenCalledTimes(1);
  });

  it('a cached result still follows the mode: kvm mode refuses a cached failure', async () => {
    const cacheFile = join(dir, 'kvm-probe.json');
    const identity = async () => 'boot-1';
    await detectAccelerator(
      base({ probe: probeResults({ ok: false, detail: 'no kernel output' }), cacheFile, attempts: 1, identity }),
    );
    await expect(
      detectAccelerator(base({ mode: 'kvm', probe: probeResults(), cacheFile, attempts: 1, identity })),
    ).rejects.toThrow(/KVM configured but unusable: .*no kernel output/);
  });
});

describe('probe guest', () => {
  it('argv: q35, the guests CPU model, the kernel without disk or initrd, serial on stdout, stopped (-S), QMP', () => {
    expect(probeArgs('/tmp/p', '/boot/vmlinuz-6.1', 'host')).toEqual([
      '-machine',
      'q35',
      '-accel',
      'kvm',
      '-cpu',
      'host',
      '-smp',
      '1',
      '-m',
      '256M',
      '-nodefaults',
      '-no-user-config',
      '-display',
      'none',
      '-no-reboot',
      '-S',
      '-chardev',
      'socket,id=qmp,path=/tmp/p/qmp.sock,server=on,wait=off',
      '-mon',
      'chardev=qmp,mode=control',
      '-serial',
      'stdio',
      '-kernel',
      '/boot/vmlinuz-6.1',
      '-append',
      PROBE_APPEND,
    ]);
    expect(PROBE_APPEND).toContain('panic=-1');
  });
});
