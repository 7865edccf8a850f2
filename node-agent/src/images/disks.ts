// Guest disks: qcow2 overlays on cached images (Nova's backing-file model) and blank qcow2 disks (ephemeral, swap).
// Each is created under a temporary name and renamed into place, and creating one that already exists as asked
// is a no-op: an agent restarted mid-spawn calls these again and must not destroy a guest's data.
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, rename, rm, stat } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { promisify } from 'node:util';
import type { CachedImage } from './cache.ts';
import { formatBytes } from './cache.ts';
import { ImageError } from './errors.ts';
import { backingFileOf, qemuImg, qemuImgInfo } from './qemuimg.ts';

const execFileAsync = promisify(execFile);

export interface DiskInfo {
  format: string;
  virtualSize: number;
  /** Bytes the file occupies on the host (allocated blocks). */
  actualSize: number;
  /** Absolute path of the backing file, if any. */
  backingFile?: string;
  backingFormat?: string;
}

/** A disk exists at the path but is not the one asked for; it is left alone. */
export class DiskConflictError extends Error {
  override readonly name = 'DiskConflictError';
}

function checkSize(sizeBytes: number, what: string): void {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 0) {
    throw new RangeError(`${what}: sizeBytes must be a non-negative integer, got ${sizeBytes}`);
  }
}

/** qemu-img rounds a virtual size up to whole sectors. */
const sectors = (n: number) => Math.ceil(n / 512) * 512;

/**
 * `qemu-img info` of a guest disk (read with -U, so a disk QEMU has open works too). `format` skips format
 * probing; pass it for disks whose format you know (a guest can write any header into a raw disk).
 */
export async function diskInfo(path: string, opts: { format?: string } = {}): Promise<DiskInfo> {
  const info = await qemuImgInfo(path, { forceShare: true, format: opts.format });
  const backingFile = backingFileOf(info);
  const backingFormat = info['backing-filename-format'];
  return {
    format: info.format,
    virtualSize: info['virtual-size'],
    actualSize: info['actual-size'] ?? 0,
    ...(backingFile !== undefined ? { backingFile } : {}),
    ...(backingFormat !== undefined ? { backingFormat } : {}),
  };
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    (err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return false;
      throw err;
    },
  );
}

/** The temporary name a file is made under before it is renamed to `path` (`.<name>.tmp-<random>`, same directory). */
export function tempPathFor(path: string): string {
  return join(dirname(path), `.${basename(path)}.tmp-${randomBytes(4).toString('hex')}`);
}

/**
 * Runs qemu-img (`args`, given the temporary name) for `path` under a temporary name in its directory, then
 * `prepare` on the temporary file (resize, chown), then renames it into place: `path` exists complete or not at all.
 */
export async function createAtomically(
  path: string,
  args: (tmp: string) => string[],
  prepare?: (tmp: string) => Promise<void>,
): Promise<void> {
  await mkdir(dirname(path), { recursive: true });
  const tmp = tempPathFor(path);
  try {
    await qemuImg(args(tmp));
    if (prepare) await prepare(tmp);
    await rename(tmp, path);
  } finally {
    await rm(tmp, { force: true });
  }
}

/**
 * The root disk of a guest at `path`: a qcow2 overlay backed by the cached image (`-F base.format -b base.path`)
 * of `sizeBytes` (0: the image's virtual size). An image bigger than the disk is ImageError TooBig. If `path`
 * already is such an overlay (same backing file and size), it is kept as is; anything else there is a
 * DiskConflictError and is not touched.
 */
export async function createRootDisk(o: {
  /** A cached image, or any file with the same three facts (a volume snapshot is a qcow2 base too). */
  base: Pick<CachedImage, 'path' | 'format' | 'virtualSize'>;
  path: string;
  sizeBytes: number;
}): Promise<void> {
  const path = resolve(o.path);
  const basePath = resolve(o.base.path);
  checkSize(o.sizeBytes, `root disk ${path}`);
  if (o.sizeBytes > 0 && o.base.virtualSize > o.sizeBytes) {
    throw new ImageError(
      'TooBig',
      `the image's virtual size ${formatBytes(o.base.virtualSize)} (${o.base.virtualSize} bytes) is larger than ` +
        `the root disk of ${formatBytes(o.sizeBytes)} (${o.sizeBytes} bytes)`,
    );
  }
  const size = sectors(o.sizeBytes > 0 ? o.sizeBytes : o.base.virtualSize);
  if (await exists(path)) {
    const have = await diskInfo(path, { format: 'qcow2' }).catch((err: unknown) => {
      throw new DiskConflictError(`root disk ${path} exists but is not a readable qcow2 image: ${String(err)}`);
    });
    if (have.backingFile !== undefined && resolve(dirname(path), have.backingFile) === basePath) {
      if (have.virtualSize === size) return;
      throw new DiskConflictError(
        `root disk ${path} exists with virtual size ${have.virtualSize}, not ${size}; leaving it alone`,
      );
    }
    throw new DiskConflictError(
      `root disk ${path} exists with backing file ${have.backingFile ?? '(none)'}, not ${basePath}; leaving it alone`,
    );
  }
  await createAtomically(path, (tmp) => [
    'create',
    '-q',
    '-f',
    'qcow2',
    '-F',
    o.base.format,
    '-b',
    basePath,
    tmp,
    String(size),
  ]);
}

/** A blank qcow2 disk (ephemeral, swap) of `sizeBytes` at `path`; a no-op if one of that size is already there. */
export async function createBlankDisk(o: { path: string; sizeBytes: number }): Promise<void> {
  const path = resolve(o.path);
  checkSize(o.sizeBytes, `disk ${path}`);
  if (o.sizeBytes === 0) throw new RangeError(`disk ${path}: sizeBytes must be positive`);
  const size = sectors(o.sizeBytes);
  if (await exists(path)) {
    const have = await diskInfo(path, { format: 'qcow2' }).catch((err: unknown) => {
      throw new DiskConflictError(`disk ${path} exists but is not a readable qcow2 image: ${String(err)}`);
    });
    if (have.backingFile === undefined && have.virtualSize === size) return;
    throw new DiskConflictError(
      `disk ${path} exists (virtual size ${have.virtualSize}, backing file ${have.backingFile ?? '(none)'}), ` +
        `not a blank disk of ${size} bytes; leaving it alone`,
    );
  }
  await createAtomically(path, (tmp) => ['create', '-q', '-f', 'qcow2', tmp, String(size)]);
}

/**
 * Grows the qcow2 disk at `path` to `sizeBytes` (`qemu-img resize`, which never shrinks without --shrink); a disk
 * that already has that size is left alone, a bigger one is refused.
 */
export async function growDisk(o: { path: string; sizeBytes: number }): Promise<void> {
  const path = resolve(o.path);
  checkSize(o.sizeBytes, `disk ${path}`);
  const size = sectors(o.sizeBytes);
  const have = await diskInfo(path, { format: 'qcow2' });
  if (have.virtualSize === size) return;
  if (have.virtualSize > size) {
    throw new RangeError(`disk ${path} has virtual size ${have.virtualSize}, more than ${size}: not shrunk`);
  }
  await qemuImg(['resize', '-q', '-f', 'qcow2', path, String(size)]);
}

/**
 * Copies a disk file as it is (a qcow2 overlay keeps its backing file), sparse, through a temporary name renamed
 * into place; `cp --reflink=auto` shares the blocks where the filesystem can.
 */
export async function copyDisk(o: { from: string; to: string }): Promise<void> {
  const to = resolve(o.to);
  await mkdir(dirname(to), { recursive: true });
  const tmp = join(dirname(to), `.${basename(to)}.tmp-${randomBytes(4).toString('hex')}`);
  try {
    await execFileAsync('cp', ['--reflink=auto', '--sparse=always', '--', resolve(o.from), tmp]);
    await rename(tmp, to);
  } finally {
    await rm(tmp, { force: true });
  }
}
