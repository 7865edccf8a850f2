// Writes seed files into an ISO 9660 image with genisoimage (Debian package genisoimage):
//   genisoimage -quiet -input-charset utf-8 -output <tmp> -volid <label> -joliet -rock <staging dir>
// then renames the result over the target (readers never see a partial image).
//
// Determinism: same input -> same file names, contents, layout, permissions and file/directory dates (every
// staged file and directory gets the fixed SEED_MTIME before genisoimage runs). Not the same bytes, though:
// genisoimage 1.1.11 has no option for the volume descriptor dates (it stamps the current time; it ignores
// SOURCE_DATE_EPOCH), and Rock Ridge records each file's ctime, which no one can set. Compare seeds with
// seedDigest() of the input files instead of hashing images.
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { chmod, mkdir, mkdtemp, rename, rm, utimes, writeFile } from 'node:fs/promises';
import { dirname, join, posix } from 'node:path';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);

/** The date every staged file and directory carries. */
export const SEED_MTIME = new Date('2020-01-01T00:00:00Z');

export interface WriteIsoOptions {
  /** Volume label: "cidata" (NoCloud) or "config-2" (config drive). */
  volid: string;
  /** Default genisoimage (from PATH). */
  genisoimage?: string;
  timeoutMs?: number;
}

/** Checks a relative file path of the image: no absolute paths, no "..", no empty segments. */
function checkPath(p: string): void {
  const norm = posix.normalize(p);
  if (p.startsWith('/') || norm !== p || p.split('/').some((s) => s === '' || s === '.' || s === '..')) {
    throw new Error(`invalid path in image: ${JSON.stringify(p)}`);
  }
}

/** Write `files` (path relative to the image root -> content) as an ISO image at `output` (replaced atomically). */
export async function writeIso(
  files: Readonly<Record<string, string | Uint8Array>>,
  output: string,
  options: WriteIsoOptions,
): Promise<void> {
  if (!/^[A-Za-z0-9_-]{1,32}$/.test(options.volid)) throw new Error(`invalid volume id ${options.volid}`);
  const entries = Object.entries(files).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  for (const [p] of entries) checkPath(p);
  const outDir = dirname(output);
  const staging = await mkdtemp(join(outDir, '.seed-staging-'));
  const tmp = join(outDir, `.seed-${randomBytes(6).toString('hex')}.iso`);
  try {
    const root = join(staging, 'root');
    await mkdir(root, { mode: 0o755 });
    const dirs = new Set<string>();
    for (const [p, content] of entries) {
      for (let d = posix.dirname(p); d !== '.'; d = posix.dirname(d)) dirs.add(d);
      await mkdir(join(root, posix.dirname(p)), { recursive: true, mode: 0o755 });
      const file = join(root, p);
      await writeFile(file, content, { mode: 0o644 });
      await chmod(file, 0o644); // writeFile's mode is masked by the umask
      await utimes(file, SEED_MTIME, SEED_MTIME);
    }
    // directories last, deepest first: creating children changes a directory's mtime
    for (const d of [...dirs].sort((a, b) => b.length - a.length)) {
      await chmod(join(root, d), 0o755);
      await utimes(join(root, d), SEED_MTIME, SEED_MTIME);
    }
    await chmod(root, 0o755);
    await utimes(root, SEED_MTIME, SEED_MTIME);
    await execFileP(
      options.genisoimage ?? 'genisoimage',
      ['-quiet', '-input-charset', 'utf-8', '-output', tmp, '-volid', options.volid, '-joliet', '-rock', root],
      { timeout: options.timeoutMs ?? 60_000, maxBuffer: 1024 * 1024 },
    );
    await rename(tmp, output);
  } finally {
    await rm(staging, { recursive: true, force: true });
    await rm(tmp, { force: true });
  }
}

/** sha256 of a seed's files (names and contents): equal digests mean equivalent images. */
export function seedDigest(files: Readonly<Record<string, string | Uint8Array>>): string {
  const h = createHash('sha256');
  for (const [p, content] of Object.entries(files).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
    const bytes = typeof content === 'string' ? Buffer.from(content, 'utf8') : content;
    h.update(`${p}\0${bytes.length}\0`);
    h.update(bytes);
  }
  return h.digest('hex');
}
