// A stand-in node agent for e2e/tests/qemu-driver.test.ts: a QEMU driver in its own process that spawns one guest,
// prints its state as one JSON line on stdout, and then idles until it is killed (the test SIGKILLs it to show the
// guest survives its agent).
//   node e2e/tests/qemu-driver-agent.ts <options JSON> <GuestSpec JSON>

import type { GuestSpec } from '../../node-agent/src/driver.ts';
import { QemuDriver, type QemuDriverOptions } from '../../node-agent/src/drivers/qemu.ts';
import { createLogger } from '../../operator/src/runtime/index.ts';

const [optionsJson, specJson] = process.argv.slice(2);
if (!optionsJson || !specJson) {
  console.error('usage: qemu-driver-agent.ts <options JSON> <GuestSpec JSON>');
  process.exit(2);
}
const logger = createLogger({ level: 'info', name: 'qemu-driver-agent', destination: process.stderr as never });
const driver = new QemuDriver(JSON.parse(optionsJson) as QemuDriverOptions, { logger });
try {
  await driver.init();
  const state = await driver.spawn(JSON.parse(specJson) as GuestSpec);
  process.stdout.write(`${JSON.stringify(state)}\n`);
} catch (err) {
  process.stdout.write(`${JSON.stringify({ error: String(err) })}\n`);
  process.exit(1);
}
setInterval(() => {}, 3_600_000);
