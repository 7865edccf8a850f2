// The unprivileged user guests' QEMU processes run as (--qemu-user; QEMU's -runas uid:gid).
//
// QEMU starts as root (it opens /dev/kvm, the taps, disks and sockets, and enters the node's network namespace), then
// drops to this uid and gid before the guest runs a single instruction. Its guest directory and the files in it are
// owned by that user and readable by it alone (0700/0600). The numeric form is passed to QEMU so that the name need
// not exist in the namespace QEMU is started in (the systemd launcher starts it in the host's).
import { readFile } from 'node:fs/promises';

export interface QemuUser {
  /** As given (a name or uid:gid), for messages. */
  name: string;
  uid: number;
  gid: number;
}

/** The fix for a missing user, for the error message. */
export const CREATE_USER_HINT =
  'useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin stratus-qemu';

/**
 * Resolves a user name (from the passwd file) or a numeric `uid:gid`. undefined for root (`root` or `0:0`): QEMU then
 * keeps root, which only --qemu-user=root asks for.
 */
export async function resolveQemuUser(spec: string, passwdFile = '/etc/passwd'): Promise<QemuUser | undefined> {
  const numeric = /^(\d+):(\d+)$/.exec(spec);
  let user: QemuUser;
  if (numeric) {
    user = { name: spec, uid: Number(numeric[1]), gid: Number(numeric[2]) };
  } else {
    if (!/^[a-z_][a-z0-9_-]{0,31}\$?$/.test(spec))
      throw new Error(`--qemu-user ${JSON.stringify(spec)}: a user name or uid:gid`);
    const passwd = await readFile(passwdFile, 'utf8');
    const line = passwd.split('\n').find((l) => l.split(':')[0] === spec);
    const [, , uid, gid] = line?.split(':') ?? [];
    if (!line || !/^\d+$/.test(uid ?? '') || !/^\d+$/.test(gid ?? '')) {
      throw new Error(
        `QEMU user ${spec} does not exist in ${passwdFile}: create it (${CREATE_USER_HINT}), give --qemu-user=<uid>:<gid>, or --qemu-user=root to run QEMU as root`,
      );
    }
    user = { name: spec, uid: Number(uid), gid: Number(gid) };
  }
  if (user.uid === 0) {
    if (user.gid !== 0) throw new Error(`--qemu-user ${spec}: uid 0 with gid ${user.gid}; use root`);
    return undefined;
  }
  return user;
}

export { type StatFn, untraversable } from '../../fsaccess.ts';
