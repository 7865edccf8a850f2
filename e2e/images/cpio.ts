// A deterministic cpio "newc" archive writer for initramfs images: entries sorted by path, every timestamp 0, owner
// root, inode numbers assigned in order, no host metadata. The kernel's initramfs unpacker reads this format.

export type CpioEntry =
  | { path: string; type: 'dir'; mode?: number }
  | { path: string; type: 'file'; mode?: number; data: Buffer | string }
  | { path: string; type: 'symlink'; target: string }
  | { path: string; type: 'char'; mode?: number; major: number; minor: number };

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;

function hex8(n: number): string {
  return n.toString(16).padStart(8, '0');
}

function pad4(n: number): Buffer {
  return Buffer.alloc((4 - (n % 4)) % 4);
}

function header(ino: number, mode: number, nlink: number, size: number, name: string, rdev = [0, 0]): Buffer {
  const nameBytes = Buffer.from(`${name}\0`, 'utf8');
  const fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0] ?? 0, rdev[1] ?? 0, nameBytes.length, 0];
  const head = Buffer.from(`070701${fields.map(hex8).join('')}`, 'ascii');
  return Buffer.concat([head, nameBytes, pad4(head.length + nameBytes.length)]);
}

/** Serialises entries (paths relative, without a leading slash) into one newc archive, sorted by path. */
export function cpioNewc(entries: readonly CpioEntry[]): Buffer {
  const sorted = [...entries].sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
  const parts: Buffer[] = [];
  let ino = 1;
  let prev: string | undefined;
  for (const e of sorted) {
    if (e.path === prev) throw new Error(`cpio: duplicate path ${e.path}`);
    if (e.path.startsWith('/') || e.path === '') throw new Error(`cpio: path must be relative: ${e.path}`);
    prev = e.path;
    switch (e.type) {
      case 'dir':
        parts.push(header(ino++, S_IFDIR | (e.mode ?? 0o755), 2, 0, e.path));
        break;
      case 'file': {
        const data = typeof e.data === 'string' ? Buffer.from(e.data, 'utf8') : e.data;
        parts.push(header(ino++, S_IFREG | (e.mode ?? 0o644), 1, data.length, e.path), data, pad4(data.length));
        break;
      }
      case 'symlink': {
        const data = Buffer.from(e.target, 'utf8');
        parts.push(header(ino++, S_IFLNK | 0o777, 1, data.length, e.path), data, pad4(data.length));
        break;
      }
      case 'char':
        parts.push(header(ino++, S_IFCHR | (e.mode ?? 0o600), 1, 0, e.path, [e.major, e.minor]));
        break;
    }
  }
  parts.push(header(0, 0, 1, 0, 'TRAILER!!!'));
  return Buffer.concat(parts);
}
