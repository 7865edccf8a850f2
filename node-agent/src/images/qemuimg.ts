// qemu-img, run with execFile and argument arrays (never a shell), its JSON parsed with zod.
//
// Untrusted images (fresh downloads) are inspected under prlimit (1 GiB address space, 30 s CPU), as Nova and
// Glance do: a crafted header must not make `qemu-img info` eat the node's memory or spin forever; and, given a
// user (the agent's --qemu-user), not as root, so a parser bug in qemu-img does not hand a crafted image the node.
import { execFile } from 'node:child_process';
import { access, constants } from 'node:fs/promises';
import { promisify } from 'node:util';
import * as z from 'zod';

const execFileP = promisify(execFile);

export const QEMU_IMG = 'qemu-img';
const PRLIMIT = '/usr/bin/prlimit';
/** Limits for inspecting untrusted data (oslo.concurrency's defaults for Nova's image probing). */
const UNTRUSTED_AS_BYTES = 1024 * 1024 * 1024;
const UNTRUSTED_CPU_SECONDS = 30;

const VmdkExtent = z.looseObject({ filename: z.string().optional(), format: z.string().optional() });

/** The fields of `qemu-img info --output=json` that matter here (the rest is ignored). */
export const QemuImgInfo = z.looseObject({
  'virtual-size': z.number().int().nonnegative(),
  filename: z.string().optional(),
  format: z.string().min(1),
  'actual-size': z.number().int().nonnegative().optional(),
  encrypted: z.boolean().optional(),
  'backing-filename': z.string().optional(),
  'full-backing-filename': z.string().optional(),
  'backing-filename-format': z.string().optional(),
  'format-specific': z
    .looseObject({
      type: z.string(),
      data: z
        .looseObject({
          // qcow2
          'data-file': z.string().optional(),
          corrupt: z.boolean().optional(),
          encrypt: z.unknown().optional(),
          // vmdk
          'create-type': z.string().optional(),
          extents: z.array(VmdkExtent).optional(),
        })
        .optional(),
    })
    .optional(),
});
export type QemuImgInfo = z.infer<typeof QemuImgInfo>;

/** A failed qemu-img run; `stderr` is qemu-img's own message (for error texts). */
export class QemuImgError extends Error {
  override readonly name = 'QemuImgError';
  readonly stderr: string;
  readonly code: string | number | undefined;
  constructor(message: string, stderr: string, code?: string | number) {
    super(message);
    this.stderr = stderr;
    this.code = code;
  }
}

let prlimitAvailable: Promise<boolean> | undefined;
function hasPrlimit(): Promise<boolean> {
  prlimitAvailable ??= access(PRLIMIT, constants.X_OK).then(
    () => true,
    () => false,
  );
  return prlimitAvailable;
}

export interface RunOptions {
  signal?: AbortSignal;
  /** Run under prlimit (untrusted input). */
  untrusted?: boolean;
  /** Run as this user (untrusted input: the QEMU user, never root). */
  user?: { uid: number; gid: number };
  timeoutMs?: number;
}

/** Runs qemu-img with `args`; resolves stdout, rejects QemuImgError (message: qemu-img's stderr, trimmed). */
export async function qemuImg(args: readonly string[], opts: RunOptions = {}): Promise<string> {
  let file = QEMU_IMG;
  let argv = [...args];
  if (opts.untrusted && (await hasPrlimit())) {
    file = PRLIMIT;
    argv = [`--as=${UNTRUSTED_AS_BYTES}`, `--cpu=${UNTRUSTED_CPU_SECONDS}`, '--', QEMU_IMG, ...args];
  }
  try {
    const { stdout } = await execFileP(file, argv, {
      signal: opts.signal,
      timeout: opts.timeoutMs ?? (opts.untrusted ? 60_000 : 0),
      maxBuffer: 16 * 1024 * 1024,
      encoding: 'utf8',
      env: { ...process.env, LC_ALL: 'C' },
      ...(opts.user ? { uid: opts.user.uid, gid: opts.user.gid } : {}),
    });
    return stdout;
  } catch (err) {
    if (opts.signal?.aborted) throw opts.signal.reason;
    const e = err as NodeJS.ErrnoException & { stderr?: string; signal?: string; killed?: boolean };
    const stderr = (e.stderr ?? '').trim();
    const why =
      stderr ||
      (e.killed || e.signal
        ? `killed by ${e.signal ?? 'timeout'}`
        : e.code === 'ENOENT'
          ? `${file} not found`
          : e.message);
    throw new QemuImgError(`qemu-img ${args[0] ?? ''}: ${why}`, stderr, e.code ?? undefined);
  }
}

/**
 * `qemu-img info --output=json` of one image (no backing chain). `format` skips probing (use it for anything a
 * guest could have written to); `untrusted` runs under prlimit; `forceShare` (-U) reads disks QEMU holds open.
 */
export async function qemuImgInfo(
  path: string,
  opts: RunOptions & { format?: string; forceShare?: boolean } = {},
): Promise<QemuImgInfo> {
  const args = ['info', '--output=json'];
  if (opts.format) args.push('-f', opts.format);
  if (opts.forceShare) args.push('-U');
  args.push(path);
  const out = await qemuImg(args, opts);
  let json: unknown;
  try {
    json = JSON.parse(out);
  } catch {
    throw new QemuImgError(`qemu-img info: output is not JSON: ${out.slice(0, 200)}`, '');
  }
  const parsed = QemuImgInfo.safeParse(json);
  if (!parsed.success) throw new QemuImgError(`qemu-img info: unexpected output: ${parsed.error.message}`, '');
  return parsed.data;
}

/**
 * `qemu-img info --backing-chain --output=json`: the image first, then each backing file down the chain. `format`
 * is the top image's format (the backing files' come from their parents' headers).
 */
export async function qemuImgChain(
  path: string,
  opts: RunOptions & { format?: string; forceShare?: boolean } = {},
): Promise<QemuImgInfo[]> {
  const args = ['info', '--output=json', '--backing-chain'];
  if (opts.format) args.push('-f', opts.format);
  if (opts.forceShare) args.push('-U');
  args.push(path);
  const out = await qemuImg(args, opts);
  let json: unknown;
  try {
    json = JSON.parse(out);
  } catch {
    throw new QemuImgError(`qemu-img info: output is not JSON: ${out.slice(0, 200)}`, '');
  }
  const parsed = z.array(QemuImgInfo).min(1).safeParse(json);
  if (!parsed.success) throw new QemuImgError(`qemu-img info: unexpected output: ${parsed.error.message}`, '');
  return parsed.data;
}

/** The backing file qemu-img reports (resolved path when it gives one). */
export function backingFileOf(info: QemuImgInfo): string | undefined {
  return info['full-backing-filename'] ?? info['backing-filename'];
}
