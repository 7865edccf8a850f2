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

/**
 * The accelerator mode the QEMU e2e tests give their drivers and agents: STRATUS_E2E_ACCELERATOR (auto, kvm or tcg),
 * default auto. Tests never assume what a host offers: they assert the behaviour for the accelerator the agent chose
 * (the Hypervisor's status.accelerator, the driver's decision), and pass with auto and tcg on hosts with working KVM,
 * broken KVM (kvm-pvm) and no KVM.
 */
export function e2eAccelerator(): 'auto' | 'kvm' | 'tcg' {
  const v = process.env.STRATUS_E2E_ACCELERATOR ?? 'auto';
  if (v !== 'auto' && v !== 'kvm' && v !== 'tcg') throw new Error(`STRATUS_E2E_ACCELERATOR=${v}: auto, kvm or tcg`);
  return v;
}
