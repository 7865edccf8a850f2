// What the QEMU end-to-end tests need from the machine.
import { execFileSync } from 'node:child_process';

/** Why QEMU tests cannot run here (not root, a tool missing), or undefined when they can. */
export function missingQemuPrerequisite(): string | undefined {
  if (process.getuid?.() !== 0) return 'not root';
  for (const tool of ['qemu-system-x86_64', 'qemu-img', 'genisoimage']) {
    try {
      execFileSync(tool, ['--version'], { stdio: 'ignore' });
    } catch {
      return `${tool} is not installed`;
    }
  }
  return undefined;
}
