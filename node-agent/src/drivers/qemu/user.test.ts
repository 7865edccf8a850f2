import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { resolveQemuUser, untraversable } from './user.ts';

describe('resolveQemuUser', () => {
  let dir: string;
  let passwd: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'stratus-user-'));
    passwd = join(dir, 'passwd');
    await writeFile(
      passwd,
      [
        'root:x:0:0:root:/root:/bin/bash',
        'nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin',
        'stratus-qemu:x:998:997::/nonexistent:/usr/sbin/nologin',
        '',
      ].join('\n'),
    );
  });
  afterAll(() => rm(dir, { recursive: true, force: true }));

  it('resolves a name to its uid and primary gid', async () => {
    expect(await resolveQemuUser('stratus-qemu', passwd)).toEqual({ name: 'stratus-qemu', uid: 998, gid: 997 });
  });

  it('takes uid:gid as it is (the user need not exist where QEMU starts)', async () => {
    expect(await resolveQemuUser('107:108', passwd)).toEqual({ name: '107:108', uid: 107, gid: 108 });
  });

  it('root means no privilege drop', async () => {
    expect(await resolveQemuUser('root', passwd)).toBeUndefined();
    expect(await resolveQemuUser('0:0', passwd)).toBeUndefined();
    await expect(resolveQemuUser('0:5', passwd)).rejects.toThrow(/uid 0 with gid 5/);
  });

  it('a missing user is an error that says how to fix it', async () => {
    await expect(resolveQemuUser('libvirt-qemu', passwd)).rejects.toThrow(
      /QEMU user libvirt-qemu does not exist in .*: create it \(useradd --system .*stratus-qemu\), give --qemu-user=<uid>:<gid>, or --qemu-user=root/,
    );
    await expect(resolveQemuUser('a b', passwd)).rejects.toThrow(/a user name or uid:gid/);
  });
});

describe('untraversable', () => {
  const tree: Record<string, { mode: number; uid: number; gid: number }> = {
    '/': { mode: 0o755, uid: 0, gid: 0 },
    '/tmp': { mode: 0o1777, uid: 0, gid: 0 },
    '/tmp/stratus-qd-x': { mode: 0o700, uid: 0, gid: 0 },
    '/tmp/stratus-qd-x/state': { mode: 0o755, uid: 0, gid: 0 },
    '/tmp/open': { mode: 0o711, uid: 0, gid: 0 },
    '/tmp/open/grp': { mode: 0o710, uid: 0, gid: 997 },
    '/tmp/open/grp/mine': { mode: 0o700, uid: 998, gid: 0 },
  };
  const statFn = async (p: string) => {
    const s = tree[p];
    if (!s) throw new Error(`no ${p}`);
    return s;
  };
  const user = { uid: 998, gid: 997 };

  it('names the first directory the user may not enter (mkdtemp makes 0700 directories)', async () => {
    expect(await untraversable('/tmp/stratus-qd-x/state', user, statFn)).toEqual({
      path: '/tmp/stratus-qd-x',
      mode: 0o700,
    });
  });

  it('follows owner, group and other bits as the kernel does', async () => {
    expect(await untraversable('/tmp/open/grp/mine', user, statFn)).toBeUndefined();
    expect(await untraversable('/tmp/open/grp', { uid: 5, gid: 5 }, statFn)).toEqual({
      path: '/tmp/open/grp',
      mode: 0o710,
    });
  });
});
