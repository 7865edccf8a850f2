import { describe, expect, it } from 'vitest';
import { HypervisorSpec } from '../../operator/src/api/index.ts';
import type { GuestInfo } from './driver.ts';
import { allocatableOf, effectiveAccelerator, usageOf } from './hypervisor.ts';

const spec = (s: object = {}) => HypervisorSpec.parse(s);

describe('allocatableOf', () => {
  it('applies the API defaults: 4x vCPUs, RAM minus 512Mi, all disk', () => {
    expect(allocatableOf({ vcpus: 8, ram: '16Gi', disk: '100Gi' }, spec())).toEqual({
      vcpus: 32,
      ram: '15872Mi',
      disk: '100Gi',
    });
  });

  it('subtracts reservations before applying ratios, in integer units', () => {
    const s = spec({
      cpuAllocationRatio: '1.5',
      ramAllocationRatio: '1.333',
      diskAllocationRatio: '0.9',
      reserved: { vcpus: 2, ram: '1Gi', disk: '20Gi' },
    });
    // vCPUs (8-2)*1.5 = 9; RAM floor((8192-1024)*1.333) = 9554 MiB; disk floor((100-20)*0.9) = 72 GiB
    expect(allocatableOf({ vcpus: 8, ram: '8Gi', disk: '100Gi' }, s)).toEqual({
      vcpus: 9,
      ram: '9554Mi',
      disk: '72Gi',
    });
  });

  it('rounds capacity down and reservations up to whole units, never below zero', () => {
    // 1e9 bytes = 953.67 MiB -> 953; 500M reserved = 476.8 MiB -> 477
    expect(
      allocatableOf(
        { vcpus: 1, ram: '1G', disk: '1500Mi' },
        spec({ cpuAllocationRatio: '1.0', reserved: { vcpus: 4, ram: '500M', disk: '0' } }),
      ),
    ).toEqual({ vcpus: 0, ram: '476Mi', disk: '1Gi' });
    expect(allocatableOf({ vcpus: 4, ram: '256Mi', disk: '0' }, spec())).toEqual({
      vcpus: 16,
      ram: '0Mi',
      disk: '0Gi',
    });
  });

  it('matches a ratio of zero', () => {
    expect(allocatableOf({ vcpus: 4, ram: '4Gi', disk: '4Gi' }, spec({ cpuAllocationRatio: '0' })).vcpus).toBe(0);
  });
});

describe('usageOf', () => {
  it('sums every defined guest, running or not', () => {
    const g = (vcpus: number, ramMiB: number, diskGiB: number, powerState: GuestInfo['powerState']): GuestInfo => ({
      id: `${vcpus}-${ramMiB}`,
      name: 'x',
      namespace: 'ns',
      vcpus,
      ramMiB,
      diskGiB,
      powerState,
    });
    expect(usageOf([g(2, 2048, 20, 'RUNNING'), g(1, 512, 1, 'SHUTDOWN')])).toEqual({
      vcpus: 3,
      ram: '2560Mi',
      disk: '21Gi',
      servers: 2,
    });
    expect(usageOf([])).toEqual({ vcpus: 0, ram: '0Mi', disk: '0Gi', servers: 0 });
  });
});

describe('effectiveAccelerator', () => {
  const kvm = { accelerator: 'kvm' as const, acceleratorReason: '/dev/kvm usable' };
  const tcg = { accelerator: 'tcg' as const, acceleratorReason: 'no /dev/kvm' };
  it('auto follows the host, tcg is always possible, kvm needs the host', () => {
    expect(effectiveAccelerator('auto', kvm)).toEqual({ accelerator: 'kvm', reason: '/dev/kvm usable' });
    expect(effectiveAccelerator('auto', tcg).accelerator).toBe('tcg');
    expect(effectiveAccelerator('tcg', kvm).accelerator).toBe('tcg');
    expect(effectiveAccelerator('kvm', kvm).accelerator).toBe('kvm');
    expect(effectiveAccelerator('kvm', tcg)).toEqual({
      accelerator: 'tcg',
      reason: 'spec.accelerator is kvm but KVM is unusable: no /dev/kvm',
    });
  });
});
