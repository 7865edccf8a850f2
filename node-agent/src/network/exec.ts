// Runs host commands for the network backends: execFile with argument arrays (never a shell), optional stdin, and
// an optional network namespace (the simulated nodes of the e2e tier run their data plane in one netns each; a real
// node uses the host's namespace).
import { execFile } from 'node:child_process';

export interface ExecResult {
  stdout: string;
  stderr: string;
}

export interface ExecOptions {
  /** Written to the command's stdin (e.g. an nft batch for `nft -f -`). */
  input?: string;
  /** Default 30 s. */
  timeoutMs?: number;
}

export class ExecError extends Error {
  override name = 'ExecError';
  readonly argv: readonly string[];
  readonly code: number | string | undefined;
  readonly stderr: string;

  constructor(argv: readonly string[], code: number | string | undefined, stderr: string) {
    super(`${argv.join(' ')}: ${stderr.trim() || `exit ${code}`}`);
    this.argv = argv;
    this.code = code;
    this.stderr = stderr;
  }
}

export interface Exec {
  /** The namespace commands run in; undefined: the agent's own. */
  readonly netns?: string;
  /** Runs a command; rejects with ExecError on a non-zero exit. */
  run(cmd: string, args: readonly string[], opts?: ExecOptions): Promise<ExecResult>;
  /** The argv that runs `cmd args` in this namespace (for long-running processes the caller spawns itself). */
  argv(cmd: string, args: readonly string[]): string[];
}

export function hostExec(netns?: string): Exec {
  const argv = (cmd: string, args: readonly string[]) =>
    netns ? ['ip', 'netns', 'exec', netns, cmd, ...args] : [cmd, ...args];
  return {
    netns,
    argv,
    run(cmd, args, opts = {}) {
      const [bin, ...rest] = argv(cmd, args);
      return new Promise((resolve, reject) => {
        const child = execFile(
          bin!,
          rest,
          { timeout: opts.timeoutMs ?? 30_000, maxBuffer: 64 * 1024 * 1024, encoding: 'utf8' },
          (err, stdout, stderr) => {
            if (err) reject(new ExecError([bin!, ...rest], (err as NodeJS.ErrnoException).code ?? undefined, stderr));
            else resolve({ stdout, stderr });
          },
        );
        // A child that exits without reading its input (ip netns exec of a missing namespace, a tool that fails
        // at once) makes the write fail with EPIPE: an 'error' on stdin that, unhandled, would end the agent. The
        // command's own failure reaches the callback above.
        child.stdin?.on('error', () => {});
        if (opts.input !== undefined) child.stdin?.end(opts.input);
        else child.stdin?.end();
      });
    },
  };
}
