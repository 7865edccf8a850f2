// Host tools for the integration and e2e tiers. There a missing tool is a failure, never a skip: CI runs these tiers
// on a machine prepared by `npm run setup`, and a test that skips silently proves nothing.
import { accessSync, constants } from 'node:fs';
import { delimiter, join } from 'node:path';

/** Debian package that provides each tool (scripts/setup.sh installs them). */
const PACKAGE: Record<string, string> = {
  awk: 'mawk',
  genisoimage: 'genisoimage',
  isoinfo: 'genisoimage',
  'qemu-img': 'qemu-utils',
  'qemu-io': 'qemu-utils',
  'qemu-system-x86_64': 'qemu-system-x86',
  'ssh-keygen': 'openssh-client',
};

/** Absolute path of an executable on PATH, or undefined. */
export function which(cmd: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    if (!dir) continue;
    const p = join(dir, cmd);
    try {
      accessSync(p, constants.X_OK);
      return p;
    } catch {}
  }
  return undefined;
}

/** Throws, naming every missing tool and its package, unless all of cmds are on PATH. */
export function requireTools(...cmds: string[]): void {
  const missing = cmds.filter((c) => !which(c));
  if (missing.length === 0) return;
  const pkgs = [...new Set(missing.map((c) => PACKAGE[c] ?? c))];
  throw new Error(
    `${missing.join(', ')} not found on PATH: this tier needs ${missing.length > 1 ? 'them' : 'it'} ` +
      `(npm run setup installs it, or: apt-get install ${pkgs.join(' ')})`,
  );
}
