// Driver registry: name -> factory. Adding a driver is one file under drivers/ and one entry here.
import type { Logger } from 'pino';
import type { Clock } from '../../../operator/src/runtime/index.ts';
import type { HypervisorDriver } from '../driver.ts';
import { FakeDriver, type FakeDriverOptions } from './fake.ts';

export interface DriverContext {
  /** The node (Hypervisor) the driver serves. */
  nodeName: string;
  logger: Logger;
  clock?: Clock;
  /** Options of the fake driver (capacity, latency, failure injection). */
  fake?: FakeDriverOptions;
}

export type DriverFactory = (ctx: DriverContext) => HypervisorDriver;

export const DRIVERS: Readonly<Record<string, DriverFactory>> = {
  fake: (ctx) => new FakeDriver(ctx.fake ?? {}, ctx.clock ? { clock: ctx.clock } : {}),
};

/** Names a driver may be configured with, including those not implemented yet (they fail in createDriver). */
export const DRIVER_NAMES = ['fake', 'qemu'] as const;
export type DriverName = (typeof DRIVER_NAMES)[number];

export function createDriver(name: string, ctx: DriverContext): HypervisorDriver {
  const factory = DRIVERS[name];
  if (!factory) {
    const available = Object.keys(DRIVERS).join(', ');
    const hint = name === 'qemu' ? ' (the QEMU driver is not implemented yet; run with --driver=fake)' : '';
    throw new Error(`hypervisor driver "${name}" is not available${hint}; available: ${available}`);
  }
  return factory(ctx);
}
