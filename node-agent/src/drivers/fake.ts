// The fake driver (Nova's nova.virt.fake.FakeDriver): guests are entries in a Map with Nova's power-state machine,
// no processes, no disks. For tests and for simulating many compute nodes in one process. Besides capacity it offers
// per-operation latency and failure injection:
//  - opLatencyMs / latencyMs: how long each operation takes (default 0);
//  - opFailureRate / failureRate: probability that an operation fails (default 0);
//  - the annotation `fake.stratus.io/fail: spawn,powerOff,...` on a Server makes those operations fail for its guest
//    (read when the guest is spawned; `spawn` fails the spawn itself);
//  - crash(id) / shutdownFromGuest(id) stop a guest unexpectedly and emit a GuestExit, as a dying QEMU would.
// Memory per guest is a few hundred bytes, so a process can simulate many nodes.
import * as z from 'zod';
import { byteQuantity, type PowerState, RESIZE_DOWN_MESSAGE } from '../../../operator/src/api/index.ts';
import { type Clock, sleep, systemClock } from '../../../operator/src/runtime/index.ts';
import {
  type AttachedVolume,
  type DiskExport,
  DRIVER_OPS,
  DriverError,
  type DriverOp,
  type GuestExit,
  type GuestInfo,
  GuestNotFoundError,
  type GuestSpec,
  type GuestState,
  type HostInfo,
  type HypervisorDriver,
  InvalidGuestStateError,
  type PowerOffOptions,
  type VolumeAttachmentSpec,
  type VolumeQos,
} from '../driver.ts';

export const FAKE_FAIL_ANNOTATION = 'fake.stratus.io/fail';

const DriverOpName = z.enum(DRIVER_OPS);

export const FakeDriverOptions = z.object({
  vcpus: z.int().min(1).max(100_000).default(16).describe('Host CPUs the fake hypervisor reports.'),
  ram: byteQuantity('Host memory').default('64Gi').describe('Host memory the fake hypervisor reports.'),
  disk: byteQuantity('Host local disk').default('1Ti').describe('Host local disk the fake hypervisor reports.'),
  architecture: z.string().default('x86_64').describe('CPU architecture reported.'),
  accelerator: z.enum(['kvm', 'tcg']).default('kvm').describe('Accelerator reported.'),
  latencyMs: z.int().min(0).default(0).describe('Latency of every operation without its own entry in opLatencyMs.'),
  opLatencyMs: z.partialRecord(DriverOpName, z.int().min(0)).default({}).describe('Latency per operation.'),
  failureRate: z
    .number()
    .min(0)
    .max(1)
    .default(0)
    .describe('Failure probability of every operation without its own entry in opFailureRate.'),
  opFailureRate: z.partialRecord(DriverOpName, z.number().min(0).max(1)).default({}).describe('Failure probability.'),
});
export type FakeDriverOptions = z.input<typeof FakeDriverOptions>;

export interface FakeDriverDeps {
  clock?: Clock;
  /** Random numbers in [0, 1) for failure injection (default Math.random). */
  random?: () => number;
}

interface FakeGuest {
  id: string;
  name: string;
  namespace: string;
  vcpus: number;
  ramMiB: number;
  diskGiB: number;
  powerState: PowerState;
  pid: number | undefined;
  startedAt: string | undefined;
  failOps: ReadonlySet<string> | undefined;
  /** Root and ephemeral sizes (GiB) the guest's disks have (a resize keeps and grows them, never shrinks). */
  rootGiB: number;
  ephemeralGiB: number;
  /** What the guest wrote on its disks (tests). */
  data?: string | undefined;
  /** Attached volumes by volume id, in attach order (the root volume first). */
  volumes: Map<string, FakeVolume>;
  /** Sizes before an unconfirmed resize (restored by revertResize). */
  preResize?: { vcpus: number; ramMiB: number; diskGiB: number; rootGiB: number; ephemeralGiB: number };
}

interface FakeVolume {
  volumeId: string;
  serial: string;
  bus: 'virtio' | 'scsi';
  root: boolean;
  sizeBytes: number | undefined;
  qos: VolumeQos;
}

/** One entry of the operation log kept for tests (last 200 calls). */
export interface FakeCall {
  op: DriverOp;
  id: string;
  ok: boolean;
}

const CALL_LOG = 200;

/** Disk exports of the fake drivers of this process (several fake nodes share one process in tests). */
const FAKE_EXPORTS = new Map<string, { rootGiB: number; ephemeralGiB: number; data: string | undefined }>();

export class FakeDriver implements HypervisorDriver {
  readonly name = 'fake';
  readonly options: z.output<typeof FakeDriverOptions>;
  readonly #clock: Clock;
  readonly #random: () => number;
  readonly #guests = new Map<string, FakeGuest>();
  readonly #listeners = new Set<(e: GuestExit) => void>();
  #nextPid = 10_000;
  /** Most recent operations, oldest first. */
  readonly calls: FakeCall[] = [];

  constructor(options: FakeDriverOptions = {}, deps: FakeDriverDeps = {}) {
    this.options = FakeDriverOptions.parse(options);
    this.#clock = deps.clock ?? systemClock;
    this.#random = deps.random ?? Math.random;
  }

  async init(): Promise<void> {}

  async close(): Promise<void> {
    this.#listeners.clear();
  }

  async hostInfo(): Promise<HostInfo> {
    const o = this.options;
    return {
      capacity: { vcpus: o.vcpus, ram: o.ram, disk: o.disk },
      cpu: { architecture: o.architecture, model: 'Fake CPU', vendor: 'Stratus' },
      accelerator: o.accelerator,
      acceleratorReason: 'fake driver',
      version: 'fake-1.0',
    };
  }

  async spawn(spec: GuestSpec): Promise<GuestState> {
    const existing = this.#guests.get(spec.id);
    if (existing) return stateOf(existing);
    const failOps = parseFailOps(spec.annotations[FAKE_FAIL_ANNOTATION]);
    await this.#work('spawn', spec.id, failOps);
    // A concurrent spawn of the same id may have finished during the latency: still one guest per id.
    const raced = this.#guests.get(spec.id);
    if (raced) return stateOf(raced);
    const g: FakeGuest = {
      id: spec.id,
      name: spec.name,
      namespace: spec.namespace,
      vcpus: spec.vcpus,
      ramMiB: spec.ramMiB,
      diskGiB: spec.disk.rootGiB + spec.disk.ephemeralGiB + Math.ceil(spec.disk.swapMiB / 1024),
      powerState: 'NOSTATE',
      pid: undefined,
      startedAt: undefined,
      failOps,
      rootGiB: spec.rootVolume ? 0 : spec.disk.rootGiB,
      ephemeralGiB: spec.disk.ephemeralGiB,
      volumes: new Map(),
    };
    if (spec.rootVolume) {
      g.diskGiB -= spec.disk.rootGiB; // the root disk is the volume, not the node's
      addVolume(g, spec.rootVolume, true);
    }
    for (const att of spec.volumes ?? []) addVolume(g, att, false);
    this.#boot(g);
    this.#guests.set(g.id, g);
    return stateOf(g);
  }

  async destroy(id: string): Promise<void> {
    await this.#work('destroy', id, this.#guests.get(id)?.failOps);
    this.#guests.delete(id);
  }

  async powerOff(id: string, _opts: PowerOffOptions): Promise<void> {
    const g = await this.#op('powerOff', id);
    if (g.powerState === 'SHUTDOWN') return;
    this.#halt(g, 'SHUTDOWN');
  }

  async powerOn(id: string): Promise<void> {
    const g = await this.#op('powerOn', id);
    if (g.powerState === 'RUNNING') return;
    if (g.powerState !== 'SHUTDOWN' && g.powerState !== 'CRASHED') {
      throw new InvalidGuestStateError('powerOn', id, g.powerState);
    }
    this.#boot(g);
  }

  async reboot(id: string, opts: { hard: boolean }): Promise<void> {
    const g = await this.#op('reboot', id);
    if (opts.hard) {
      this.#boot(g); // a hard reboot recreates the guest process from any state
      return;
    }
    if (g.powerState !== 'RUNNING') throw new InvalidGuestStateError('reboot', id, g.powerState);
  }

  async pause(id: string): Promise<void> {
    await this.#transition('pause', id, 'RUNNING', 'PAUSED');
  }

  async unpause(id: string): Promise<void> {
    await this.#transition('unpause', id, 'PAUSED', 'RUNNING');
  }

  async suspend(id: string): Promise<void> {
    const g = await this.#op('suspend', id);
    if (g.powerState === 'SUSPENDED') return;
    if (g.powerState !== 'RUNNING') throw new InvalidGuestStateError('suspend', id, g.powerState);
    this.#halt(g, 'SUSPENDED');
  }

  async resume(id: string): Promise<void> {
    const g = await this.#op('resume', id);
    if (g.powerState === 'RUNNING') return;
    if (g.powerState !== 'SUSPENDED') throw new InvalidGuestStateError('resume', id, g.powerState);
    this.#boot(g);
  }

  async resize(id: string, spec: GuestSpec, _opts: PowerOffOptions): Promise<void> {
    const g = await this.#op('resize', id);
    // A guest booting from a volume has no root disk of its own: the volume is neither copied nor grown.
    const fromVolume = [...g.volumes.values()].some((v) => v.root);
    const rootGiB = fromVolume ? 0 : spec.disk.rootGiB > 0 ? spec.disk.rootGiB : g.rootGiB;
    const size = {
      vcpus: spec.vcpus,
      ramMiB: spec.ramMiB,
      diskGiB: rootGiB + spec.disk.ephemeralGiB + Math.ceil(spec.disk.swapMiB / 1024),
      rootGiB,
      ephemeralGiB: spec.disk.ephemeralGiB,
    };
    if (g.preResize) {
      if (JSON.stringify(size) === JSON.stringify(sizeOf(g))) return;
      throw new DriverError('resize', id, `resize: guest ${id} has a resize that is not confirmed or reverted`);
    }
    if (g.powerState === 'SUSPENDED' || g.powerState === 'PAUSED') {
      throw new InvalidGuestStateError('resize', id, g.powerState);
    }
    if (rootGiB < g.rootGiB || size.ephemeralGiB < g.ephemeralGiB)
      throw new DriverError('resize', id, RESIZE_DOWN_MESSAGE);
    if (g.powerState === 'RUNNING') this.#halt(g, 'SHUTDOWN');
    g.preResize = sizeOf(g);
    Object.assign(g, size);
  }

  async confirmResize(id: string): Promise<void> {
    const g = this.#guests.get(id);
    if (!g) return;
    await this.#work('confirmResize', id, g.failOps);
    delete g.preResize;
  }

  async revertResize(id: string, _opts: PowerOffOptions): Promise<void> {
    const g = await this.#op('revertResize', id);
    if (!g.preResize) return;
    if (g.powerState !== 'SHUTDOWN' && g.powerState !== 'CRASHED') this.#halt(g, 'SHUTDOWN');
    Object.assign(g, g.preResize);
    delete g.preResize;
  }

  async exportDisks(id: string, host: string): Promise<DiskExport> {
    const g = await this.#op('exportDisks', id);
    if (g.powerState !== 'SHUTDOWN' && g.powerState !== 'CRASHED') {
      throw new InvalidGuestStateError('exportDisks', id, g.powerState);
    }
    const key = `${host}/${id}`;
    FAKE_EXPORTS.set(key, { rootGiB: g.rootGiB, ephemeralGiB: g.ephemeralGiB, data: g.data });
    return { host, port: 10_809, disks: { root: id, ...(g.ephemeralGiB > 0 ? { ephemeral: `${id}-eph` } : {}) } };
  }

  // Volumes: in memory, with the QEMU driver's rules (a repeat returns the attachment unchanged, a detach of what is
  // not attached succeeds, a stopped guest keeps them for its next boot).

  async attachVolume(id: string, att: VolumeAttachmentSpec): Promise<AttachedVolume> {
    const g = await this.#op('attachVolume', id);
    if (g.powerState === 'SUSPENDED') throw new InvalidGuestStateError('attachVolume', id, g.powerState);
    const v = g.volumes.get(att.connection.volumeId) ?? addVolume(g, att, false);
    return attachedOf(v);
  }

  async detachVolume(id: string, volumeId: string): Promise<void> {
    const g = this.#guests.get(id);
    if (!g?.volumes.has(volumeId)) return;
    await this.#work('detachVolume', id, g.failOps);
    const v = g.volumes.get(volumeId);
    if (v?.root)
      throw new DriverError('detachVolume', id, `detachVolume: volume ${volumeId} is the root disk of guest ${id}`);
    if (g.powerState === 'SUSPENDED') throw new InvalidGuestStateError('detachVolume', id, g.powerState);
    g.volumes.delete(volumeId);
  }

  async volumes(id: string): Promise<AttachedVolume[]> {
    const g = this.#guests.get(id);
    return g ? [...g.volumes.values()].map(attachedOf) : [];
  }

  async extendVolume(id: string, volumeId: string, sizeBytes: number): Promise<void> {
    const g = await this.#op('extendVolume', id);
    const v = attachedVolume(g, volumeId, 'extendVolume');
    if (v.sizeBytes === undefined || v.sizeBytes < sizeBytes) v.sizeBytes = sizeBytes;
  }

  async setVolumeQos(id: string, volumeId: string, qos: VolumeQos): Promise<void> {
    const g = await this.#op('setVolumeQos', id);
    attachedVolume(g, volumeId, 'setVolumeQos').qos = { ...qos };
  }

  /** The QoS a volume has (tests). */
  volumeQos(id: string, volumeId: string): VolumeQos | undefined {
    return this.#guests.get(id)?.volumes.get(volumeId)?.qos;
  }

  async unexportDisks(id: string): Promise<void> {
    for (const key of FAKE_EXPORTS.keys()) if (key.endsWith(`/${id}`)) FAKE_EXPORTS.delete(key);
  }

  async importDisks(spec: GuestSpec, from: DiskExport): Promise<GuestState> {
    const existing = this.#guests.get(spec.id);
    if (existing) return stateOf(existing);
    await this.#work('importDisks', spec.id, parseFailOps(spec.annotations[FAKE_FAIL_ANNOTATION]));
    const src = FAKE_EXPORTS.get(`${from.host}/${spec.id}`);
    if (!src)
      throw new DriverError('importDisks', spec.id, `importDisks: nothing exported at ${from.host}:${from.port}`);
    const g = await this.spawn(spec);
    const guest = this.#guests.get(g.id)!;
    this.#halt(guest, 'SHUTDOWN');
    guest.data = src.data;
    return stateOf(guest);
  }

  /** Number of disk exports served by all fake drivers of this process (tests: none may leak). */
  static exports(): number {
    return FAKE_EXPORTS.size;
  }

  /** Opaque guest data kept on its disks (tests: follows resize and migration, lost by destroy). */
  setData(id: string, data: string): void {
    const g = this.#guests.get(id);
    if (g) g.data = data;
  }

  data(id: string): string | undefined {
    return this.#guests.get(id)?.data;
  }

  /** Whether the guest has an unconfirmed resize (tests). */
  resizePending(id: string): boolean {
    return this.#guests.get(id)?.preResize !== undefined;
  }

  async state(id: string): Promise<GuestState | undefined> {
    const g = this.#guests.get(id);
    return g && stateOf(g);
  }

  async list(): Promise<GuestInfo[]> {
    return [...this.#guests.values()].map((g) => ({
      ...stateOf(g),
      name: g.name,
      namespace: g.namespace,
      vcpus: g.vcpus,
      ramMiB: g.ramMiB,
      diskGiB: g.diskGiB,
    }));
  }

  onGuestExit(listener: (e: GuestExit) => void): () => void {
    this.#listeners.add(listener);
    return () => {
      this.#listeners.delete(listener);
    };
  }

  // ---- test hooks ----

  /** The guest dies (QEMU killed, guest kernel panic with reboot disabled): CRASHED, and a GuestExit. */
  crash(id: string, reason = 'guest crashed'): void {
    const g = this.#guests.get(id);
    if (!g) throw new GuestNotFoundError('powerOff', id);
    if (g.powerState !== 'RUNNING' && g.powerState !== 'PAUSED') {
      throw new InvalidGuestStateError('powerOff', id, g.powerState);
    }
    this.#halt(g, 'CRASHED');
    this.#emit({ id, powerState: 'CRASHED', at: this.#now(), reason });
  }

  /** The guest powers itself off (`poweroff` inside): SHUTDOWN, and a GuestExit. */
  shutdownFromGuest(id: string, reason = 'guest powered off'): void {
    const g = this.#guests.get(id);
    if (!g) throw new GuestNotFoundError('powerOff', id);
    if (g.powerState !== 'RUNNING') throw new InvalidGuestStateError('powerOff', id, g.powerState);
    this.#halt(g, 'SHUTDOWN');
    this.#emit({ id, powerState: 'SHUTDOWN', at: this.#now(), reason });
  }

  /** Replaces the operations that fail for one guest (as the annotation would at spawn). */
  setFailOps(id: string, ops: readonly DriverOp[]): void {
    const g = this.#guests.get(id);
    if (g) g.failOps = new Set(ops);
  }

  /** Number of guests. */
  get size(): number {
    return this.#guests.size;
  }

  // ---- internals ----

  #now(): string {
    return new Date(this.#clock.now()).toISOString();
  }

  #boot(g: FakeGuest): void {
    g.powerState = 'RUNNING';
    g.pid = this.#nextPid++;
    g.startedAt = this.#now();
  }

  #halt(g: FakeGuest, to: PowerState): void {
    g.powerState = to;
    g.pid = undefined;
    g.startedAt = undefined;
  }

  async #transition(op: DriverOp, id: string, from: PowerState, to: PowerState): Promise<void> {
    const g = await this.#op(op, id);
    if (g.powerState === to) return;
    if (g.powerState !== from) throw new InvalidGuestStateError(op, id, g.powerState);
    g.powerState = to;
  }

  /** Latency and failure injection for an operation on an existing guest; returns the guest. */
  async #op(op: DriverOp, id: string): Promise<FakeGuest> {
    const before = this.#guests.get(id);
    if (!before) {
      this.#log(op, id, false);
      throw new GuestNotFoundError(op, id);
    }
    await this.#work(op, id, before.failOps);
    const g = this.#guests.get(id);
    if (!g) throw new GuestNotFoundError(op, id); // destroyed meanwhile
    return g;
  }

  async #work(op: DriverOp, id: string, failOps: ReadonlySet<string> | undefined): Promise<void> {
    const o = this.options;
    const latency = o.opLatencyMs[op] ?? o.latencyMs;
    if (latency > 0) await sleep(this.#clock, latency);
    const rate = o.opFailureRate[op] ?? o.failureRate;
    const annotated = failOps?.has(op) ?? false;
    if (annotated || (rate > 0 && this.#random() < rate)) {
      this.#log(op, id, false);
      throw new DriverError(op, id, `${op} failed: injected failure (${annotated ? FAKE_FAIL_ANNOTATION : 'rate'})`);
    }
    this.#log(op, id, true);
  }

  #log(op: DriverOp, id: string, ok: boolean): void {
    this.calls.push({ op, id, ok });
    if (this.calls.length > CALL_LOG) this.calls.splice(0, this.calls.length - CALL_LOG);
  }

  #emit(e: GuestExit): void {
    for (const l of [...this.#listeners]) {
      queueMicrotask(() => l(e));
    }
  }
}

function addVolume(g: FakeGuest, att: VolumeAttachmentSpec, root: boolean): FakeVolume {
  const v: FakeVolume = {
    volumeId: att.connection.volumeId,
    serial: att.connection.serial,
    bus: att.bus,
    root,
    sizeBytes: undefined,
    qos: { ...(att.qos ?? {}) },
  };
  g.volumes.set(v.volumeId, v);
  return v;
}

function attachedVolume(g: FakeGuest, volumeId: string, op: DriverOp): FakeVolume {
  const v = g.volumes.get(volumeId);
  if (!v) throw new DriverError(op, g.id, `${op}: volume ${volumeId} is not attached to guest ${g.id}`);
  return v;
}

function attachedOf(v: FakeVolume): AttachedVolume {
  return {
    volumeId: v.volumeId,
    serial: v.serial,
    bus: v.bus,
    device: `d${v.serial}`,
    ...(v.sizeBytes !== undefined ? { sizeBytes: v.sizeBytes } : {}),
  };
}

function sizeOf(g: FakeGuest): NonNullable<FakeGuest['preResize']> {
  return { vcpus: g.vcpus, ramMiB: g.ramMiB, diskGiB: g.diskGiB, rootGiB: g.rootGiB, ephemeralGiB: g.ephemeralGiB };
}

function stateOf(g: FakeGuest): GuestState {
  return {
    id: g.id,
    powerState: g.powerState,
    ...(g.pid !== undefined ? { pid: g.pid } : {}),
    ...(g.startedAt !== undefined ? { startedAt: g.startedAt } : {}),
  };
}

function parseFailOps(v: string | undefined): ReadonlySet<string> | undefined {
  if (!v) return undefined;
  const ops = v
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
  return ops.length > 0 ? new Set(ops) : undefined;
}
