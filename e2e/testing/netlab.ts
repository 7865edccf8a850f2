// A network lab for the e2e tier: several simulated nodes, each a network namespace with one veth ("eth0") on a
// shared underlay bridge in the root namespace (shared/reference/networking.md §2.1). Each node gets the sysctls the
// data plane needs (bridge-nf-call-iptables for the security groups, no IPv6 noise on infrastructure devices).
// VM stand-ins are veths into their own namespace, named like the tap the backend would create, so data-plane tests
// can ping without QEMU. Everything is named with a per-lab prefix and removed by destroy() (also on a rerun after a
// crash: create() first removes a lab of the same prefix).
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export interface LabNode {
  name: string;
  /** Network namespace of the node. */
  netns: string;
  /** Underlay address (the VXLAN local address). */
  hostIP: string;
}

export interface VmStandIn {
  /** Namespace playing the guest. */
  netns: string;
  /** Device name on the node (what the backend sees as the port's tap). */
  device: string;
  mac: string;
  /** address/prefix inside the guest namespace */
  cidr: string;
}

export interface NetLab {
  prefix: string;
  underlay: string;
  nodes: LabNode[];
  /** Runs a command in a namespace (undefined: root); returns stdout; throws on failure. */
  sh(netns: string | undefined, cmd: string, args: readonly string[]): string;
  /** Creates a guest stand-in: a veth named `device` in the node's namespace, its peer `eth0` in a new namespace. */
  vm(
    node: LabNode,
    name: string,
    device: string,
    mac: string,
    cidr: string,
    opts?: { mtu?: number; gateway?: string },
  ): VmStandIn;
  /** Removes a guest stand-in (its namespace, and with it both ends of its veth). */
  removeVm(vm: VmStandIn): void;
  /**
   * Runs a DHCP client (busybox udhcpc, asking for the MTU option) on the stand-in's eth0 and returns what it was
   * given (udhcpc's variables: ip, router, mtu, dns, serverid, ...). `workDir` holds its hook script.
   */
  dhcpLease(vm: VmStandIn, workDir: string): Record<string, string>;
  /** Whether `from` can ping `ip` (one echo, timeout in seconds). */
  ping(from: VmStandIn | string, ip: string, timeoutS?: number): boolean;
  destroy(): void;
}

function run(argv: readonly string[], input?: string): string {
  return execFileSync(argv[0]!, argv.slice(1), { encoding: 'utf8', input, stdio: ['pipe', 'pipe', 'pipe'] });
}

function quiet(argv: readonly string[]): void {
  try {
    run(argv);
  } catch {
    // best effort (cleanup of things that may not exist)
  }
}

/** Namespaces whose name starts with the prefix. */
function netnsWithPrefix(prefix: string): string[] {
  return run(['ip', '-j', 'netns', 'list'])
    .trim()
    .split('\n')
    .filter(Boolean)
    .flatMap((l) => (JSON.parse(l) as { name: string }[]).map((n) => n.name))
    .filter((n) => n.startsWith(prefix));
}

/**
 * Creates `count` nodes named <prefix>n1..n<count> with underlay addresses 10.<subnet>.0.<i>/24.
 * `prefix` must be short (at most 5 characters: device names are limited to 15).
 */
export function createLab(prefix: string, count: number, subnet = 250): NetLab {
  if (prefix.length > 5) throw new Error('lab prefix: at most 5 characters');
  destroyLab(prefix);
  const underlay = `${prefix}ul`;
  const sh = (netns: string | undefined, cmd: string, args: readonly string[]) =>
    run(netns ? ['ip', 'netns', 'exec', netns, cmd, ...args] : [cmd, ...args]);
  run(['ip', 'link', 'add', underlay, 'type', 'bridge']);
  run(['ip', 'link', 'set', underlay, 'up']);
  const nodes: LabNode[] = [];
  for (let i = 1; i <= count; i++) {
    const netns = `${prefix}n${i}`;
    const hostIP = `10.${subnet}.0.${i}`;
    run(['ip', 'netns', 'add', netns]);
    run(['ip', 'link', 'add', `${prefix}u${i}`, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', netns]);
    run(['ip', 'link', 'set', `${prefix}u${i}`, 'master', underlay, 'up']);
    sh(netns, 'sysctl', ['-qw', 'net.ipv6.conf.all.disable_ipv6=1', 'net.ipv6.conf.default.disable_ipv6=1']);
    run(['ip', '-n', netns, 'link', 'set', 'lo', 'up']);
    run(['ip', '-n', netns, 'addr', 'add', `${hostIP}/24`, 'dev', 'eth0']);
    run(['ip', '-n', netns, 'link', 'set', 'eth0', 'up']);
    nodes.push({ name: netns, netns, hostIP });
  }
  const vms: string[] = [];
  return {
    prefix,
    underlay,
    nodes,
    sh,
    vm(node, name, device, mac, cidr, opts = {}) {
      const netns = `${prefix}v-${name}`;
      vms.push(netns);
      run(['ip', 'netns', 'add', netns]);
      run(['ip', 'link', 'add', device, 'netns', node.netns, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', netns]);
      sh(netns, 'sysctl', ['-qw', 'net.ipv6.conf.all.disable_ipv6=1']);
      run(['ip', '-n', netns, 'link', 'set', 'eth0', 'address', mac]);
      if (opts.mtu) run(['ip', '-n', netns, 'link', 'set', 'eth0', 'mtu', String(opts.mtu)]);
      run(['ip', '-n', netns, 'addr', 'add', cidr, 'dev', 'eth0']);
      run(['ip', '-n', netns, 'link', 'set', 'lo', 'up']);
      run(['ip', '-n', netns, 'link', 'set', 'eth0', 'up']);
      if (opts.gateway) run(['ip', '-n', netns, 'route', 'add', 'default', 'via', opts.gateway]);
      return { netns, device, mac, cidr };
    },
    removeVm(vm) {
      run(['ip', 'netns', 'del', vm.netns]);
    },
    dhcpLease(vm, workDir) {
      const script = join(workDir, `udhcpc-${vm.netns}.sh`);
      const dump = join(workDir, `udhcpc-${vm.netns}.env`);
      writeFileSync(script, `#!/bin/sh\nif [ "$1" = bound ]; then env > ${dump}; fi\n`, { mode: 0o755 });
      const args = ['udhcpc', '-i', 'eth0', '-n', '-q', '-f', '-t', '5', '-T', '1', '-O', 'mtu', '-s', script];
      sh(vm.netns, 'busybox', args);
      const lines = readFileSync(dump, 'utf8')
        .split('\n')
        .filter((l) => l.includes('='));
      return Object.fromEntries(lines.map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
    },
    ping(from, ip, timeoutS = 1) {
      const ns = typeof from === 'string' ? from : from.netns;
      try {
        sh(ns, 'ping', ['-c', '1', '-W', String(timeoutS), ip]);
        return true;
      } catch {
        return false;
      }
    },
    destroy: () => destroyLab(prefix),
  };
}

/** Removes every namespace and underlay device of a lab prefix (processes in the namespaces are the caller's). */
export function destroyLab(prefix: string): void {
  for (const ns of netnsWithPrefix(prefix)) quiet(['ip', 'netns', 'del', ns]);
  quiet(['ip', 'link', 'del', `${prefix}ul`]);
}
