// The node agent's last resort for errors that no code path caught (installed by main.ts only). Every I/O error
// is meant to be handled where it arises and to end in a condition on the object concerned (a download error on
// the Server, a failed command in the reconcile that ran it); this decides what happens when one is not.
//
// - An unhandled promise rejection is logged at error level and the agent keeps running. A rejection nobody
//   awaited interrupted no synchronous code: the process is as consistent as after a caught error, and the work it
//   belonged to is level-triggered (the next reconcile, heartbeat or resync does it again). Node's default, ending
//   the process, would leave every guest on the node unmanaged for the sake of one lost promise.
// - An uncaught exception is logged at fatal level and the process exits (code 70, EX_SOFTWARE). A synchronous
//   throw that escaped an event handler left the code it interrupted half done (a library's connection state, a
//   lock or a flag never reset), so carrying on could act on wrong state; exiting is safe because guests run outside
//   the agent (detached processes or systemd units) and the agent converges on restart. Known sources are fixed
//   where they arise (the image download: images/download.ts; stdin of host commands: network/exec.ts).
import type { Logger } from '../../operator/src/runtime/index.ts';

export const EXIT_UNCAUGHT = 70;

interface ProcessLike {
  on(event: 'unhandledRejection', listener: (reason: unknown) => void): unknown;
  on(event: 'uncaughtException', listener: (err: Error, origin: string) => void): unknown;
}

function describe(err: unknown): { err: unknown } {
  return { err: err instanceof Error ? err : new Error(String(err)) };
}

/** Installs the policy above on `proc` (default: this process). */
export function installLastResort(
  log: Logger,
  proc: ProcessLike = process,
  exit: (code: number) => void = (code) => process.exit(code),
): void {
  let rejections = 0;
  proc.on('unhandledRejection', (reason) => {
    rejections++;
    log.error(
      { ...describe(reason), unhandledRejections: rejections },
      'unhandled promise rejection (a bug: the error should have been handled where it arose); the agent keeps running, its work is retried by the next reconcile',
    );
  });
  proc.on('uncaughtException', (err, origin) => {
    // pino flushes what it buffered when the process exits: the line is not lost.
    log.fatal(
      { ...describe(err), origin },
      'uncaught exception (a bug: the error should have been handled where it arose); exiting, guests keep running and the agent converges on restart',
    );
    exit(EXIT_UNCAUGHT);
  });
}
