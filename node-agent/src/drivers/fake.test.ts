import { describe, expect, it } from 'vitest';
import { FakeClock } from '../../../operator/src/runtime/index.ts';
import {
  DriverError,
  type GuestExit,
  GuestNotFoundError,
  type GuestSpec,
  type HypervisorDriver,
  InvalidGuestStateError,
} from '../driver.ts';
import { FAKE_FAIL_ANNOTATION, FakeDriver } from './fake.ts';
import { createDriver } from './index.ts';

const spec = (id: string, annotations: Record<string, string> = {}): GuestSpec => ({
  id,
  name: `srv-${id}`,
  namespace: 'ns',
  vcpus: 2,
  ramMiB: 2048,
  disk: { rootGiB: 20, ephemeralGiB: 5, swapMiB: 512 },
  image: 'cirros',
  annotations,
});

const power = async (d: HypervisorDriver, id: string) => (await d.state(id))?.powerState;

describe('FakeDriver state machine', () => {
  it('spawns a running guest once per id and lists it with its size', async () => {
    const d = new FakeDriver();
    const s1 = await d.spawn(spec('a'));
    expect(s1).toMatchObject({ id: 'a', powerState: 'RUNNING' });
    expect(s1.pid).toBeTypeOf('number');
    expect(s1.startedAt).toMatch(/Z$/);
    const again = await d.spawn(spec('a'));
    expect(again.pid).toBe(s1.pid);
    expect(d.size).toBe(1);
    expect(await d.list()).toEqual([
      expect.objectContaining({ id: 'a', name: 'srv-a', namespace: 'ns', vcpus: 2, ramMiB: 2048, diskGiB: 26 }),
    ]);
  });

  it('follows Nova power transitions and is idempotent towards each target', async () => {
    const d = new FakeDriver();
    const { pid } = await d.spawn(spec('a'));
    await d.pause('a');
    expect(await power(d, 'a')).toBe('PAUSED');
    await d.pause('a');
    expect((await d.state('a'))?.pid).toBe(pid); // pause keeps the process
    await d.unpause('a');
    await d.unpause('a');
    expect(await power(d, 'a')).toBe('RUNNING');
    await d.suspend('a');
    expect(await d.state('a')).toEqual({ id: 'a', powerState: 'SUSPENDED' });
    await d.resume('a');
    expect(await power(d, 'a')).toBe('RUNNING');
    await d.powerOff('a', { graceful: true, timeoutMs: 1000 });
    await d.powerOff('a', { graceful: false, timeoutMs: 0 });
    expect(await d.state('a')).toEqual({ id: 'a', powerState: 'SHUTDOWN' });
    await d.powerOn('a');
    await d.powerOn('a');
    expect(await power(d, 'a')).toBe('RUNNING');
  });

  it('refuses impossible transitions and unknown guests', async () => {
    const d = new FakeDriver();
    await d.spawn(spec('a'));
    await d.powerOff('a', { graceful: true, timeoutMs: 0 });
    await expect(d.pause('a')).rejects.toBeInstanceOf(InvalidGuestStateError);
    await expect(d.suspend('a')).rejects.toBeInstanceOf(InvalidGuestStateError);
    await expect(d.resume('a')).rejects.toBeInstanceOf(InvalidGuestStateError);
    await expect(d.unpause('a')).rejects.toBeInstanceOf(InvalidGuestStateError);
    await expect(d.reboot('a', { hard: false })).rejects.toBeInstanceOf(InvalidGuestStateError);
    await expect(d.powerOn('nope')).rejects.toBeInstanceOf(GuestNotFoundError);
    expect(await d.state('nope')).toBeUndefined();
    await d.destroy('nope'); // unknown ids succeed
  });

  it('soft reboot keeps the process, hard reboot replaces it and boots from any state', async () => {
    const d = new FakeDriver();
    const { pid } = await d.spawn(spec('a'));
    await d.reboot('a', { hard: false });
    expect((await d.state('a'))?.pid).toBe(pid);
    await d.reboot('a', { hard: true });
    const after = await d.state('a');
    expect(after?.powerState).toBe('RUNNING');
    expect(after?.pid).not.toBe(pid);
    for (const off of [
      () => d.powerOff('a', { graceful: false, timeoutMs: 0 }),
      () => d.pause('a'),
      () => d.suspend('a'),
    ]) {
      await off();
      await d.reboot('a', { hard: true });
      expect(await power(d, 'a')).toBe('RUNNING');
    }
  });

  it('destroy removes the guest', async () => {
    const d = new FakeDriver();
    await d.spawn(spec('a'));
    await d.destroy('a');
    expect(await d.state('a')).toBeUndefined();
    expect(await d.list()).toEqual([]);
  });

  it('reports the configured capacity', async () => {
    const d = new FakeDriver({ vcpus: 64, ram: '256Gi', disk: '2Ti', accelerator: 'tcg' });
    expect(await d.hostInfo()).toMatchObject({
      capacity: { vcpus: 64, ram: '256Gi', disk: '2Ti' },
      cpu: { architecture: 'x86_64' },
      accelerator: 'tcg',
    });
  });
});

describe('FakeDriver latency and failure injection', () => {
  it('takes the configured time per operation', async () => {
    const clock = new FakeClock();
    const d = new FakeDriver({ latencyMs: 100, opLatencyMs: { spawn: 1000 } }, { clock });
    let spawned = false;
    const p = d.spawn(spec('a')).then(() => {
      spawned = true;
    });
    await clock.advance(999);
    expect(spawned).toBe(false);
    expect(await d.state('a')).toBeUndefined();
    await clock.advance(1);
    await p;
    expect(spawned).toBe(true);
    let paused = false;
    const q = d.pause('a').then(() => {
      paused = true;
    });
    await clock.advance(99);
    expect(paused).toBe(false);
    await clock.advance(1);
    await q;
    expect(await power(d, 'a')).toBe('PAUSED');
  });

  it('fails operations with the configured probability', async () => {
    const rolls = [0.05, 0.5];
    const d = new FakeDriver(
      { failureRate: 0.1, opFailureRate: { pause: 1 } },
      { random: () => rolls.shift() ?? 0.99 },
    );
    await expect(d.spawn(spec('a'))).rejects.toBeInstanceOf(DriverError); // 0.05 < 0.1
    expect(await d.state('a')).toBeUndefined(); // a failed spawn leaves nothing
    await d.spawn(spec('a')); // 0.5
    await expect(d.pause('a')).rejects.toThrow(/injected failure/);
    expect(await power(d, 'a')).toBe('RUNNING');
    expect(d.calls.map((c) => `${c.op}:${c.ok}`)).toEqual(['spawn:false', 'spawn:true', 'pause:false']);
  });

  it('fails the operations named in the Server annotation', async () => {
    const d = new FakeDriver();
    await expect(d.spawn(spec('a', { [FAKE_FAIL_ANNOTATION]: 'spawn' }))).rejects.toThrow(FAKE_FAIL_ANNOTATION);
    await d.spawn(spec('b', { [FAKE_FAIL_ANNOTATION]: 'powerOff, reboot' }));
    await expect(d.powerOff('b', { graceful: true, timeoutMs: 0 })).rejects.toBeInstanceOf(DriverError);
    await expect(d.reboot('b', { hard: true })).rejects.toBeInstanceOf(DriverError);
    await d.pause('b');
    d.setFailOps('b', []);
    await d.powerOff('b', { graceful: true, timeoutMs: 0 });
    expect(await power(d, 'b')).toBe('SHUTDOWN');
  });
});

describe('FakeDriver unexpected exits', () => {
  it('crash() stops the guest and emits a GuestExit to subscribers', async () => {
    const d = new FakeDriver();
    await d.spawn(spec('a'));
    const seen: GuestExit[] = [];
    const off = d.onGuestExit((e) => seen.push(e));
    d.crash('a', 'kernel panic');
    expect(await d.state('a')).toEqual({ id: 'a', powerState: 'CRASHED' });
    await Promise.resolve();
    expect(seen).toEqual([expect.objectContaining({ id: 'a', powerState: 'CRASHED', reason: 'kernel panic' })]);
    await d.powerOn('a'); // a crashed guest can be started again
    off();
    d.shutdownFromGuest('a');
    await Promise.resolve();
    expect(seen).toHaveLength(1);
    expect(await power(d, 'a')).toBe('SHUTDOWN');
    expect(() => d.crash('a')).toThrow(InvalidGuestStateError);
  });
});

describe('driver registry', () => {
  it('creates the fake and qemu drivers and fails clearly for others', () => {
    const logger = { child: () => logger } as never;
    expect(createDriver('fake', { nodeName: 'n', logger }).name).toBe('fake');
    expect(createDriver('qemu', { nodeName: 'n', logger, qemu: { stateDir: '/tmp/x' } }).name).toBe('qemu');
    expect(() => createDriver('xen', { nodeName: 'n', logger })).toThrow(/available: fake, qemu/);
  });
});

describe('FakeDriver resize', () => {
  it('keeps the disks: grows, refuses shrinking, leaves the guest stopped; confirm and revert', async () => {
    const d = new FakeDriver();
    await d.spawn(spec('a'));
    const off = { graceful: true, timeoutMs: 0 };
    const small = { ...spec('a'), disk: { rootGiB: 10, ephemeralGiB: 5, swapMiB: 0 } };
    await expect(d.resize('a', small, off)).rejects.toThrow('Resize error: Unable to resize disk down.');
    expect(await power(d, 'a')).toBe('RUNNING');
    const big = { ...spec('a'), vcpus: 4, disk: { rootGiB: 40, ephemeralGiB: 5, swapMiB: 512 } };
    await d.resize('a', big, off);
    expect(await power(d, 'a')).toBe('SHUTDOWN');
    expect(d.resizePending('a')).toBe(true);
    expect((await d.list())[0]).toMatchObject({ vcpus: 4, diskGiB: 46 });
    await d.resize('a', big, off); // repeated: nothing more
    await d.revertResize('a', off);
    expect((await d.list())[0]).toMatchObject({ vcpus: 2, diskGiB: 26 });
    expect(d.resizePending('a')).toBe(false);
    await d.resize('a', big, off);
    await d.confirmResize('a');
    expect(d.resizePending('a')).toBe(false);
    expect((await d.list())[0]).toMatchObject({ vcpus: 4, diskGiB: 46 });
    await d.confirmResize('unknown');
  });
});

describe('FakeDriver volumes', () => {
  const att = (volumeId: string, bus: 'virtio' | 'scsi' = 'virtio') => ({
    connection: {
      volumeId,
      serial: volumeId.replaceAll('-', '').slice(0, 20),
      blockdev: { driver: 'qcow2', file: { driver: 'file', filename: `/v/${volumeId}.qcow2` } },
    },
    bus,
  });

  it('attaches once (a repeat returns it unchanged), detaches idempotently, extends and sets QoS', async () => {
    const d = new FakeDriver();
    await d.spawn(spec('a'));
    const v = await d.attachVolume('a', att('vol-1', 'scsi'));
    expect(v).toEqual({ volumeId: 'vol-1', serial: 'vol1', bus: 'scsi', device: 'dvol1' });
    expect(await d.attachVolume('a', { ...att('vol-1'), bus: 'virtio' })).toEqual(v);
    expect(await d.volumes('a')).toEqual([v]);
    await d.extendVolume('a', 'vol-1', 2 * 1024 ** 3);
    await d.extendVolume('a', 'vol-1', 1024 ** 3); // never shrinks
    expect((await d.volumes('a'))[0]?.sizeBytes).toBe(2 * 1024 ** 3);
    await d.setVolumeQos('a', 'vol-1', { totalIopsSec: 100 });
    expect(d.volumeQos('a', 'vol-1')).toEqual({ totalIopsSec: 100 });
    await expect(d.extendVolume('a', 'nope', 1)).rejects.toBeInstanceOf(DriverError);
    await d.detachVolume('a', 'vol-1');
    await d.detachVolume('a', 'vol-1');
    await d.detachVolume('unknown', 'vol-1');
    expect(await d.volumes('a')).toEqual([]);
    await expect(d.attachVolume('unknown', att('vol-1'))).rejects.toBeInstanceOf(GuestNotFoundError);
  });

  it('keeps volumes of a stopped guest; boots from a root volume that cannot be detached and is not local disk', async () => {
    const d = new FakeDriver();
    await d.spawn({ ...spec('b'), rootVolume: { ...att('root-1'), bootIndex: 0 }, volumes: [att('vol-2', 'scsi')] });
    expect((await d.list())[0]).toMatchObject({ diskGiB: 6 }); // ephemeral 5 + swap 1, no root disk
    await d.powerOff('b', { graceful: false, timeoutMs: 0 });
    await d.attachVolume('b', att('vol-3'));
    await d.powerOn('b');
    expect((await d.volumes('b')).map((v) => v.volumeId)).toEqual(['root-1', 'vol-2', 'vol-3']);
    await expect(d.detachVolume('b', 'root-1')).rejects.toBeInstanceOf(DriverError);
    await d.resize(
      'b',
      { ...spec('b'), disk: { rootGiB: 40, ephemeralGiB: 5, swapMiB: 512 } },
      { graceful: true, timeoutMs: 0 },
    );
    expect((await d.list())[0]).toMatchObject({ diskGiB: 6 });
  });
});
