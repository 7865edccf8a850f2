// Driver registry: name -> factory. Adding a driver is one file under drivers/ and one entry here.
import type { Logger } from 'pino';
import type { Clock } from '../../../operator/src/runtime/index.ts';
import type { HypervisorDriver } from '../driver.ts';
import { FakeDriver, type FakeDriverOptions } from './fake.ts';
import { QemuDriver, type QemuDriverOptions } from './qemu.ts';

export interface DriverContext {
  /** The node (Hypervisor) the driver serves. */
  nodeName: string;
  logger: Logger;
  clock?: Clock;
  /** Options of the fake driver (capacity, latency, failure injection). */
  fake?: FakeDriverOptions;
  /** Options of the QEMU driver (state directory, launcher, accelerator...). */
  qemu?: QemuDriverOptions;
}

export type DriverFactory = (ctx: DriverContext) => HypervisorDriver;

export const DRIVERS: Readonly<Record<string, DriverFactory>> = {
  fake: (ctx) => new FakeDriver(ctx.fake ?? {}, ctx.clock ? { clock: ctx.clock } : {}),
  qemu: (ctx) => new QemuDriver(ctx.qemu ?? {}, { logger: ctx.logger }),
};

/** Names a driver may be configured with. */
export const DRIVER_NAMES = ['fake', 'qemu'] as const;
export type DriverName = (typeof DRIVER_NAMES)[number];

export function createDriver(name: string, ctx: DriverContext): HypervisorDriver {
  const factory = DRIVERS[name];
  if (!factory) {
    const available = Object.keys(DRIVERS).join(', ');
    throw new Error(`hypervisor driver "${name}" is not available; available: ${available}`);
  }
  return factory(ctx);
}
