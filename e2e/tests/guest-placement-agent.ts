// A stand-in agent container for e2e/tests/guest-placement.test.ts. Started by the test in a cgroup of its own and in
// a new mount namespace (`unshare -m --propagation private`), like a container: it bind-mounts its "root file system"
// (a copy of QEMU's install prefix) over an empty directory only it sees, starts one QEMU through the host launcher,
// prints {pid, bundle} as one JSON line and idles until the test kills it and its cgroup.
//   node e2e/tests/guest-placement-agent.ts <JSON: {ctrSrc, ctr, stateDir, id, dir, args}>
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { findHostNs } from '../../node-agent/src/drivers/qemu/hostns.ts';
import { HostLauncher } from '../../node-agent/src/drivers/qemu/launcher-host.ts';
import { guestProcess, procReader } from '../../node-agent/src/drivers/qemu/proc.ts';
import { createLogger } from '../../operator/src/runtime/index.ts';
import { waitFor } from '../testing/wait.ts';

interface Input {
  ctrSrc: string;
  ctr: string;
  stateDir: string;
  id: string;
  dir: string;
  args: string[];
  memoryMiB: number;
}
const input = JSON.parse(process.argv[2] ?? '{}') as Input;
const logger = createLogger({ level: 'info', name: 'placement-agent', destination: process.stderr as never });
try {
  execFileSync('mount', ['--bind', input.ctrSrc, input.ctr]);
  const host = await findHostNs();
  if (!host.inContainer) throw new Error('the stand-in agent is not in another mount namespace than its parent');
  const launcher = new HostLauncher({
    host,
    stateDir: input.stateDir,
    qemuBinary: join(input.ctr, 'bin', 'qemu-system-x86_64'),
    logger,
  });
  await launcher.init();
  await launcher.launch({
    id: input.id,
    name: 'placement',
    namespace: 'e2e',
    binary: join(input.ctr, 'bin', 'qemu-system-x86_64'),
    args: input.args,
    dir: input.dir,
    logFile: join(input.dir, 'qemu.log'),
    memoryMiB: input.memoryMiB,
    accelerator: 'tcg',
  });
  const proc = await waitFor('QEMU pid file', async () => {
    const p = await guestProcess(procReader, join(input.dir, 'qemu.pid'), input.id);
    return p.kind === 'running' ? p : undefined;
  });
  process.stdout.write(`${JSON.stringify({ pid: proc.pid, bundle: launcher.bundle?.dir, hostPid: host.pid })}\n`);
} catch (err) {
  process.stdout.write(`${JSON.stringify({ error: String(err) })}\n`);
  process.exit(1);
}
setInterval(() => {}, 3_600_000);
