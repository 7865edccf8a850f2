// Whether an unprivileged process (QEMU after -runas, dnsmasq as nobody, qemu-img on untrusted data) can reach a path
// the agent prepared for it as root.
import { stat } from 'node:fs/promises';

/** Mode and owner of a path, as traversable() needs them (injected in tests). */
export type StatFn = (path: string) => Promise<{ mode: number; uid: number; gid: number }>;

/**
 * The first directory on the way to `dir` (itself included) that `user` may not enter, or undefined when it can
 * reach it. QEMU, once it has dropped to the user, must still reach its guest directory (the suspend and resume
 * streams, its pid file) and qemu-img the image cache's work directories.
 */
export async function untraversable(
  dir: string,
  user: { uid: number; gid: number },
  statFn: StatFn = stat,
): Promise<{ path: string; mode: number } | undefined> {
  const parts = dir.split('/').filter(Boolean);
  for (let i = 0; i <= parts.length; i++) {
    const p = `/${parts.slice(0, i).join('/')}`;
    const s = await statFn(p);
    const bit = s.uid === user.uid ? 0o100 : s.gid === user.gid ? 0o010 : 0o001;
    if ((s.mode & bit) === 0) return { path: p, mode: s.mode & 0o7777 };
  }
  return undefined;
}
