// Small process, file and network helpers shared by the control-plane modules.
import { execFile } from 'node:child_process';
import { constants as fsc } from 'node:fs';
import { access, open, readFile, rm, stat } from 'node:fs/promises';
import https from 'node:https';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

export { sleep };

export class PrerequisiteError extends Error {
  override name = 'PrerequisiteError';
}

export interface RunResult {
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  timeoutMs?: number;
  input?: string;
}

/** Runs a program with an argument array (never a shell) and rejects with its stderr on a non-zero exit. */
export function run(file: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = execFile(
      file,
      args,
      {
        cwd: opts.cwd,
        env: opts.env ?? process.env,
        timeout: opts.timeoutMs ?? 120_000,
        maxBuffer: 64 * 1024 * 1024,
        encoding: 'utf8',
      },
      (err, stdout, stderr) => {
        if (err) {
          const detail = (stderr || stdout || '').trim().split('\n').slice(-15).join('\n');
          reject(new Error(`${path.basename(file)} ${args.join(' ')} failed: ${err.message}\n${detail}`));
          return;
        }
        resolve({ stdout, stderr });
      },
    );
    if (opts.input !== undefined) child.stdin?.end(opts.input);
  });
}

/** Finds an executable on PATH; returns undefined when absent. */
export async function which(name: string): Promise<string | undefined> {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (!dir) continue;
    const candidate = path.join(dir, name);
    try {
      await access(candidate, fsc.X_OK);
      if ((await stat(candidate)).isFile()) return candidate;
    } catch {
      // not here
    }
  }
  return undefined;
}

export async function exists(p: string): Promise<boolean> {
  try {
    await access(p);
    return true;
  } catch {
    return false;
  }
}

/** True when a process with this pid exists, is not a zombie and (if given) runs the expected executable. */
export async function pidAlive(pid: number, exeBasename?: string): Promise<boolean> {
  try {
    process.kill(pid, 0);
  } catch {
    // ESRCH: gone. EPERM: exists but belongs to another user, so it is not ours.
    return false;
  }
  try {
    const statLine = await readFile(`/proc/${pid}/stat`, 'utf8');
    const state = statLine.slice(statLine.lastIndexOf(')') + 2, statLine.lastIndexOf(')') + 3);
    if (state === 'Z' || state === 'X') return false;
    if (exeBasename) {
      const argv0 = (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0')[0] ?? '';
      if (path.basename(argv0) !== exeBasename) return false;
    }
  } catch {
    // No /proc (not Linux): trust kill(0).
  }
  return true;
}

export async function readPid(file: string): Promise<number | undefined> {
  try {
    const pid = Number.parseInt((await readFile(file, 'utf8')).trim(), 10);
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** True when something accepts TCP connections on 127.0.0.1:port. */
export function portInUse(port: number, host = '127.0.0.1'): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = net.connect({ port, host });
    const done = (inUse: boolean) => {
      sock.destroy();
      resolve(inUse);
    };
    sock.setTimeout(1000, () => done(false));
    sock.once('connect', () => done(true));
    sock.once('error', () => done(false));
  });
}

export interface ProbeOptions {
  ca?: string | Buffer;
  cert?: string | Buffer;
  key?: string | Buffer;
  insecure?: boolean;
  timeoutMs?: number;
}

/** GETs a URL over http(s) and returns the status and body; never throws (status 0 on connection errors). */
export async function probe(url: string, opts: ProbeOptions = {}): Promise<{ status: number; body: string }> {
  const u = new URL(url);
  if (u.protocol === 'http:') {
    try {
      const res = await fetch(u, { signal: AbortSignal.timeout(opts.timeoutMs ?? 2000) });
      return { status: res.status, body: await res.text() };
    } catch (err) {
      return { status: 0, body: String(err) };
    }
  }
  return new Promise((resolve) => {
    const req = https.request(
      u,
      {
        method: 'GET',
        ca: opts.ca,
        cert: opts.cert,
        key: opts.key,
        rejectUnauthorized: !opts.insecure,
        timeout: opts.timeoutMs ?? 2000,
        agent: false,
      },
      (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => {
          body += chunk;
        });
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
        res.on('error', (err) => resolve({ status: 0, body: String(err) }));
      },
    );
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', (err) => resolve({ status: 0, body: String(err) }));
    req.end();
  });
}

/** The last `n` lines of a log file, for error messages. */
export async function tail(file: string, n = 20): Promise<string> {
  try {
    const text = await readFile(file, 'utf8');
    return text.trimEnd().split('\n').slice(-n).join('\n');
  } catch {
    return '(no log)';
  }
}

/**
 * Runs `fn` while holding an exclusive lock file (created with O_EXCL, containing our pid).
 * A lock left by a dead process is taken over; otherwise waits up to `timeoutMs`.
 */
export async function withLock<T>(
  lockPath: string,
  timeoutMs: number,
  fn: () => Promise<T>,
  onWait?: (holder: number) => void,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let announced = false;
  for (;;) {
    try {
      const fh = await open(lockPath, 'wx');
      await fh.writeFile(`${process.pid}\n`);
      await fh.close();
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const holder = await readPid(lockPath);
    if (holder === undefined) {
      // Being written right now, or garbage: give the writer a moment, then take it over.
      const age = Date.now() - (await stat(lockPath).catch(() => ({ mtimeMs: 0 }))).mtimeMs;
      if (age > 5000) await rm(lockPath, { force: true });
    } else if (holder !== process.pid && !(await pidAlive(holder))) {
      await rm(lockPath, { force: true });
      continue;
    } else {
      if (!announced) onWait?.(holder);
      announced = true;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for lock ${lockPath} (held by pid ${holder})`);
    await sleep(500);
  }
  try {
    return await fn();
  } finally {
    await rm(lockPath, { force: true });
  }
}

/** Polls `check` until it returns a value other than undefined, or throws `onTimeout()` after `timeoutMs`. */
export async function waitFor<T>(
  check: () => Promise<T | undefined>,
  timeoutMs: number,
  onTimeout: () => Promise<Error>,
  intervalMs = 250,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw await onTimeout();
    await sleep(intervalMs);
  }
}
