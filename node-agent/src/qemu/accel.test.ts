import { describe, expect, it, vi } from 'vitest';
import {
  AcceleratorUnavailableError,
  detectAccelerator,
  type KvmProbeOptions,
  type KvmProbeResult,
  PROBE_EXIT_CODE,
  probeArgs,
  probeBootSector,
} from './accel.ts';

// Probes that start a process (a missing QEMU, the real probe): node-agent/test/integration/accel.test.ts.

const enoent = () => Promise.reject(Object.assign(new Error('no such file'), { code: 'ENOENT' }));
const eacces = () => Promise.reject(Object.assign(new Error('denied'), { code: 'EACCES' }));
const opens = () => Promise.resolve();
const probeResults = (...results: KvmProbeResult[]) => {
  const fn = vi.fn<(o: KvmProbeOptions) => Promise<KvmProbeResult>>();
  for (const r of results) fn.mockResolvedValueOnce(r);
  return fn;
};

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

  it('auto picks KVM when the device opens and every probe boots', async () => {
    const probe = probeResults(
      { ok: true, detail: 'boot sector reached in 80 ms' },
      { ok: true, detail: 'boot sector reached in 75 ms' },
    );
    const d = await detectAccelerator({ mode: 'auto', openDevice: opens, probe, cpuModel: 'host', deadlineMs: 1500 });
    expect(d).toEqual({
      accelerator: 'kvm',
      reason: '/dev/kvm usable; boot probe (-cpu host): boot sector reached in 80 ms, boot sector reached in 75 ms',
    });
    expect(probe).toHaveBeenCalledTimes(2);
    expect(probe.mock.calls[0]![0]).toEqual({ qemuBinary: 'qemu-system-x86_64', cpuModel: 'host', deadlineMs: 1500 });
  });

  it('auto falls back to TCG when /dev/kvm is missing or not writable, without probing', async () => {
    const probe = probeResults();
    expect(await detectAccelerator({ mode: 'auto', openDevice: enoent, probe })).toEqual({
      accelerator: 'tcg',
      reason: 'KVM unusable, using TCG: /dev/kvm cannot be opened read-write: does not exist',
    });
    expect(await detectAccelerator({ mode: 'auto', openDevice: eacces, probe, kvmDevice: '/dev/kvm0' })).toEqual({
      accelerator: 'tcg',
      reason: 'KVM unusable, using TCG: /dev/kvm0 cannot be opened read-write: permission denied',
    });
    expect(probe).not.toHaveBeenCalled();
  });

  it('auto falls back to TCG when a later probe attempt fails (flaky KVM)', async () => {
    const probe = probeResults(
      { ok: true, detail: 'boot sector reached in 90 ms' },
      { ok: false, detail: 'boot sector not reached within 2000 ms under KVM (status running)' },
    );
    expect(await detectAccelerator({ mode: 'auto', openDevice: opens, probe })).toEqual({
      accelerator: 'tcg',
      reason:
        'KVM unusable, using TCG: /dev/kvm opens, but boot probe 2/2 failed: boot sector not reached within 2000 ms under KVM (status running)',
    });
  });

  it('stops at the first failed attempt', async () => {
    const probe = probeResults({ ok: false, detail: 'qemu exited SIGABRT: error: failed to set MSR 0x10a to 0x69' });
    const d = await detectAccelerator({ mode: 'auto', openDevice: opens, probe, attempts: 3 });
    expect(d.accelerator).toBe('tcg');
    expect(d.reason).toContain('boot probe 1/3 failed: qemu exited SIGABRT');
    expect(probe).toHaveBeenCalledTimes(1);
  });

  it('kvm mode returns KVM when it works and throws when it does not', async () => {
    const ok = probeResults({ ok: true, detail: 'boot sector reached in 50 ms' });
    expect(await detectAccelerator({ mode: 'kvm', openDevice: opens, probe: ok, attempts: 1 })).toEqual({
      accelerator: 'kvm',
      reason: 'configured: kvm; /dev/kvm usable; boot probe (-cpu host): boot sector reached in 50 ms',
    });
    await expect(detectAccelerator({ mode: 'kvm', openDevice: enoent })).rejects.toThrow(AcceleratorUnavailableError);
    const bad = probeResults({ ok: false, detail: 'query-kvm: enabled=false present=true' });
    await expect(detectAccelerator({ mode: 'kvm', openDevice: opens, probe: bad })).rejects.toThrow(
      'KVM configured but unusable: /dev/kvm opens, but boot probe 1/2 failed: query-kvm: enabled=false present=true',
    );
  });
});

describe('probe guest', () => {
  it('boot sector: writes 0x2a to port 0xf4 and halts; signature 55aa', () => {
    const s = probeBootSector();
    expect(s.length).toBe(512);
    expect([...s.subarray(0, 8)]).toEqual([0xfa, 0xb0, 0x2a, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd]);
    expect([s[510], s[511]]).toEqual([0x55, 0xaa]);
    expect(PROBE_EXIT_CODE).toBe(85);
  });

  it('argv: q35 + SeaBIOS + virtio-blk boot disk + isa-debug-exit, stopped (-S) with a QMP socket', () => {
    expect(probeArgs('/tmp/p', 'kvm', 'host')).toEqual([
      '-machine',
      'q35',
      '-accel',
      'kvm',
      '-cpu',
      'host',
      '-smp',
      '1',
      '-m',
      '32M',
      '-nodefaults',
      '-no-user-config',
      '-display',
      'none',
      '-boot',
      'strict=on',
      '-S',
      '-chardev',
      'socket,id=qmp,path=/tmp/p/qmp.sock,server=on,wait=off',
      '-mon',
      'chardev=qmp,mode=control',
      '-blockdev',
      'driver=file,node-name=probe-file,filename=/tmp/p/boot.img,read-only=on',
      '-blockdev',
      'driver=raw,node-name=probe-fmt,file=probe-file,read-only=on',
      '-device',
      'virtio-blk-pci,drive=probe-fmt,bootindex=0',
      '-device',
      'isa-debug-exit,iobase=0xf4,iosize=0x04',
    ]);
  });
});
