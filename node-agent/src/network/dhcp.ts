// Distributed DHCP, backend-neutral (the Linux bridge and OVS backends both use it): per network with a DHCP-enabled
// IPv4 subnet and local ports, one dnsmasq with static leases for the node's LOCAL ports only, in its own network
// namespace, attached to the network's switch by a veth (host end std-<vni>, inside "dhcp0"). Every node answers
// from the same address (Network status.subnets[].dhcpAddress) and the same MAC (dhcpMac(vni)), like OVN's native
// DHCP; the backend must drop frames with that source MAC on the overlay (nft.ts L2Drop on the VXLAN device) so the
// servers of different nodes never see each other.
//
// dnsmasq daemonizes and survives agent restarts: a new DhcpManager adopts it by its pid file (checked against
// /proc/<pid>/cmdline), rewrites the hosts file and sends SIGHUP when leases change, and restarts it only when its
// configuration file changed. A network that leaves the node loses its dnsmasq, namespace, veth and files.
import { mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { untraversable } from '../fsaccess.ts';
import type { NetworkPlan, PortPlan, PortResult, SubnetPlan } from './backend.ts';
import { type Exec, ExecError, hostExec } from './exec.ts';
import { DEVICE_PREFIX } from './names.ts';
import { parseCidr } from './nft.ts';
import { parseAddrs, parseLinks, parseNetnsList } from './observe.ts';

/** A static lease. */
export interface DhcpHost {
  mac: string;
  ip: string;
  hostname?: string;
}

/** One DHCP server wanted on this node. */
export interface DhcpNetwork {
  /** The network's VNI: names the namespace, veth and files, and derives the server MAC. */
  vni: number;
  /** Network metadata.uid (written into the config for humans). */
  networkId: string;
  /** Interface MTU of the veth and DHCP option 26 (forced). */
  mtu: number;
  /** IPv4 subnets with dhcp=true and a dhcpAddress (others are ignored). */
  subnets: SubnetPlan[];
  /** Static leases: the node's local ports on this network. */
  hosts: DhcpHost[];
  /**
   * MAC of every other known address of the network (remote ports): a neighbour entry of the DHCP namespace that
   * names another MAC for one of them (or for a lease address) is stale and flushed.
   */
  neighbours?: { ip: string; mac: string }[];
  /** Lease time in seconds (default 86400, Neutron's). */
  leaseSeconds?: number;
  /**
   * Attaches the host end of the veth (`hostDevice`, in the node namespace) to the network's switch: Linux bridge
   * master, or OVS port with the network's local VLAN tag. Called on every reconcile; must be idempotent and return
   * one line per change it made (empty when already attached).
   */
  attach(hostDevice: string): Promise<string[]>;
}

export interface DhcpManagerOptions {
  /** Runs commands in the node's namespace (where the bridge is). */
  exec: Exec;
  /**
   * Runs namespace management and dnsmasq (`ip netns add|del`, `ip -n`, `ip netns exec`): must be in the host's
   * MOUNT namespace, since named namespaces are bind mounts under /run/netns (default: hostExec()).
   */
  nsExec?: Exec;
  /** Prefix of the DHCP namespaces (unique per node: several simulated nodes share one host). */
  netnsPrefix: string;
  /** Directory for configs, hosts files, leases and pid files (per node). */
  runDir: string;
  logger?: { warn(obj: object, msg?: string): void; info(obj: object, msg?: string): void };
}

export interface DhcpResult {
  changes: string[];
  /** Per VNI: why its server is not serving (others are still reconciled). */
  errors: Record<number, string>;
}

/** Interface name inside the DHCP namespace. */
/**
 * Default DHCP namespace prefix and run directory for an exec: unique per node namespace, because simulated nodes share
 * one host's /run and its namespace names.
 */
export function dhcpDefaults(exec: Pick<Exec, 'netns'>): { netnsPrefix: string; runDir: string } {
  return {
    netnsPrefix: exec.netns ? `${exec.netns}-dhcp-` : 'stratus-dhcp-',
    runDir: `/run/stratus/network/${exec.netns ?? 'host'}`,
  };
}

export const DHCP_NS_DEVICE = 'dhcp0';

/** The bridge-side veth end of a network's DHCP namespace. */
export function dhcpHostDevice(vni: number): string {
  return `${DEVICE_PREFIX.dhcp}${vni}`;
}

/** The DHCP server MAC of a network, the same on every node: locally administered 02:73:64 + 24-bit VNI. */
export function dhcpMac(vni: number): string {
  const b = [0x02, 0x73, 0x64, (vni >> 16) & 0xff, (vni >> 8) & 0xff, vni & 0xff];
  return b.map((x) => x.toString(16).padStart(2, '0')).join(':');
}

function netmask(prefix: number): string {
  const m = prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
  return [24, 16, 8, 0].map((s) => (m >>> s) & 0xff).join('.');
}

/** The subnets a server serves (IPv4, dhcp on, with a dhcpAddress), sorted by CIDR. */
export function servedSubnets(n: Pick<DhcpNetwork, 'subnets'>): SubnetPlan[] {
  return n.subnets
    .filter((s) => s.ipVersion === 4 && s.dhcp && s.dhcpAddress)
    .sort((a, b) => a.cidr.localeCompare(b.cidr));
}

/** Addresses (address/prefix) of the namespace interface. */
export function serverAddresses(n: Pick<DhcpNetwork, 'subnets'>): string[] {
  return servedSubnets(n).map((s) => `${s.dhcpAddress}/${parseCidr(s.cidr).prefix}`);
}

export interface DnsmasqPaths {
  conf: string;
  hosts: string;
  leases: string;
  pid: string;
}

/** dnsmasq's user after it has bound its sockets (user=nobody, group=nogroup on Debian). */
const NOBODY = { uid: 65534, gid: 65534 };

export function dnsmasqPaths(runDir: string, vni: number): DnsmasqPaths {
  const d = join(runDir, `dhcp-${vni}`);
  return { conf: join(d, 'dnsmasq.conf'), hosts: join(d, 'hosts'), leases: join(d, 'leases'), pid: join(d, 'pid') };
}

/** The dnsmasq configuration file (everything but the leases, which live in the SIGHUP-reloaded hosts file). Pure. */
export function renderDnsmasqConfig(n: DhcpNetwork, paths: DnsmasqPaths): string {
  const lease = n.leaseSeconds ?? 86400;
  const lines = [
    `# Stratus DHCP for network ${n.networkId} (VNI ${n.vni}); generated, do not edit`,
    'no-resolv',
    'no-hosts',
    'port=0',
    'bind-interfaces',
    `interface=${DHCP_NS_DEVICE}`,
    'except-interface=lo',
    'dhcp-authoritative',
    'dhcp-ignore-names',
    // dnsmasq binds and opens its pid and lease files as root, then drops to nobody (keeping only the capabilities
    // DHCP needs); the hosts file it re-reads on SIGHUP is world-readable (it holds MAC/IP pairs only).
    'user=nobody',
    'group=nogroup',
    `pid-file=${paths.pid}`,
    `dhcp-leasefile=${paths.leases}`,
    `dhcp-hostsfile=${paths.hosts}`,
  ];
  servedSubnets(n).forEach((s, i) => {
    const c = parseCidr(s.cidr);
    const net = s.cidr.split('/')[0];
    const tag = `s${i}`;
    lines.push(`dhcp-range=set:${tag},${net},static,${netmask(c.prefix)},${lease}s`);
    if (s.gatewayIP) lines.push(`dhcp-option=tag:${tag},option:router,${s.gatewayIP}`);
    else lines.push(`dhcp-option=tag:${tag},option:router`);
    if (s.dnsNameservers.length) lines.push(`dhcp-option=tag:${tag},option:dns-server,${s.dnsNameservers.join(',')}`);
    const routes = s.hostRoutes.filter((r) => {
      try {
        return parseCidr(r.destination).version === 4;
      } catch {
        return false;
      }
    });
    if (routes.length) {
      // RFC 3442: a client given option 121 ignores option 3, so the default route goes into 121 too
      const all = routes.map((r) => `${r.destination},${r.nexthop}`);
      if (s.gatewayIP && !routes.some((r) => r.destination === '0.0.0.0/0')) all.push(`0.0.0.0/0,${s.gatewayIP}`);
      lines.push(`dhcp-option=tag:${tag},option:classless-static-route,${all.join(',')}`);
    }
    lines.push(`dhcp-option-force=tag:${tag},option:mtu,${n.mtu}`);
  });
  return `${lines.join('\n')}\n`;
}

/** The leases of a dhcp-hostsfile (renderHostsFile's format): MAC per IP. Pure. */
export function parseHostsFile(text: string | undefined): Map<string, string> {
  const out = new Map<string, string>();
  for (const line of (text ?? '').split('\n')) {
    const [mac, ip] = line.split(',');
    if (mac && ip) out.set(ip, mac.toLowerCase());
  }
  return out;
}

/** A neighbour entry (`ip -j neigh show`). */
export interface NeighEntry {
  dst: string;
  lladdr?: string;
  state?: string[];
}

/**
 * The neighbour entries of the DHCP namespace to delete (by address): entries whose MAC is not the one an address
 * has now (a lease or a remote port of the network), and entries of addresses whose lease was released or moved
 * to another MAC (`released`). An address handed to a new port is then resolved afresh at once, instead of
 * timing out until the kernel gives up on the old MAC (shared/reference/networking.md). Pure.
 */
export function staleNeighbours(
  entries: readonly NeighEntry[],
  known: ReadonlyMap<string, string>,
  released: ReadonlySet<string>,
): string[] {
  const out: string[] = [];
  for (const e of entries) {
    if (!e.lladdr || e.dst.includes(':')) continue; // unresolved entries carry no MAC; IPv4 only
    const mac = e.lladdr.toLowerCase();
    const want = known.get(e.dst);
    if ((want !== undefined && want !== mac) || (want === undefined && released.has(e.dst))) out.push(e.dst);
  }
  return [...new Set(out)].sort();
}

/** ifalias ownership marker of a DHCP veth's host end (stale removal requires it, not just the name). */
export function dhcpAlias(n: Pick<DhcpNetwork, 'networkId' | 'vni'>): string {
  return `stratus:dhcp=${n.networkId},vni=${n.vni}`;
}

/** The dhcp-hostsfile: `mac,ip[,hostname]` per lease, sorted. Pure. */
export function renderHostsFile(hosts: readonly DhcpHost[]): string {
  const valid = (h: string | undefined) => (h && /^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/i.test(h) ? h : undefined);
  const lines = hosts.map((h) => [h.mac.toLowerCase(), h.ip, valid(h.hostname)].filter(Boolean).join(',')).sort();
  return lines.length ? `${lines.join('\n')}\n` : '';
}

async function readText(path: string): Promise<string | undefined> {
  try {
    return await readFile(path, 'utf8');
  } catch {
    return undefined;
  }
}

/** The dnsmasq process serving `confPath`, by pid file and /proc/<pid>/cmdline. */
export async function runningDnsmasq(paths: DnsmasqPaths): Promise<number | undefined> {
  const pid = Number((await readText(paths.pid))?.trim());
  if (!Number.isInteger(pid) || pid <= 0) return undefined;
  const cmdline = await readText(`/proc/${pid}/cmdline`);
  if (!cmdline) return undefined;
  const argv = cmdline.split('\0');
  return argv.some((a) => a.endsWith('dnsmasq')) && argv.includes(`--conf-file=${paths.conf}`) ? pid : undefined;
}

async function waitExit(pid: number, timeoutMs: number): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    try {
      process.kill(pid, 0);
    } catch {
      return true;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return false;
}

async function stopPid(pid: number): Promise<void> {
  try {
    process.kill(pid, 'SIGTERM');
  } catch {
    return;
  }
  if (!(await waitExit(pid, 5000))) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
    await waitExit(pid, 2000);
  }
}

/** Reconciles the node's DHCP servers (see the file comment). */
export class DhcpManager {
  readonly #exec: Exec;
  readonly #ns: Exec;
  readonly #prefix: string;
  readonly #runDir: string;
  readonly #log: DhcpManagerOptions['logger'];

  constructor(o: DhcpManagerOptions) {
    this.#exec = o.exec;
    this.#ns = o.nsExec ?? hostExec();
    this.#prefix = o.netnsPrefix;
    this.#runDir = o.runDir;
    this.#log = o.logger;
  }

  /** Namespace name of a network's server. */
  netnsName(vni: number): string {
    return `${this.#prefix}${vni}`;
  }

  /** Makes the node run exactly the given servers. Errors of one server do not stop the others. */
  /**
   * reconcile() as a backend needs it: one server per network of `networks` (with the static leases of `ports` and
   * the backend's `attach`), errors logged, and a ready port of a network whose server is not serving keeps its
   * readiness but carries the reason in `results`. Returns the changes.
   */
  async reconcileForPorts(
    networks: readonly NetworkPlan[],
    ports: readonly PortPlan[],
    results: Record<string, PortResult>,
    attach: (n: NetworkPlan, dev: string) => Promise<string[]>,
  ): Promise<string[]> {
    const wanted: DhcpNetwork[] = networks.map((n) => ({
      vni: n.vni,
      networkId: n.id,
      mtu: n.mtu,
      subnets: n.subnets,
      hosts: dhcpHosts(n, ports),
      neighbours: n.remotePorts.flatMap((r) => r.ips.map((ip) => ({ ip, mac: r.mac }))),
      attach: (dev) => attach(n, dev),
    }));
    try {
      const r = await this.reconcile(wanted);
      for (const [vni, msg] of Object.entries(r.errors)) {
        this.#log?.warn({ vni, err: msg }, 'DHCP server not serving');
        const n = networks.find((x) => x.vni === Number(vni));
        for (const p of ports)
          if (n && p.networkId === n.id && results[p.id]?.ready)
            results[p.id] = { ready: true, message: `DHCP server: ${msg}` };
      }
      return r.changes;
    } catch (e) {
      this.#log?.warn({ err: (e as Error).message }, 'DHCP reconcile failed');
      return [];
    }
  }

  async reconcile(wanted: readonly DhcpNetwork[]): Promise<DhcpResult> {
    const changes: string[] = [];
    const errors: Record<number, string> = {};
    const desired = new Map(wanted.filter((n) => servedSubnets(n).length > 0).map((n) => [n.vni, n]));
    const namespaces = new Set(
      parseNetnsList((await this.#ns.run('ip', ['-j', 'netns', 'list'])).stdout)
        .map((n) => n.name)
        .filter((n) => n.startsWith(this.#prefix) && /^\d+$/.test(n.slice(this.#prefix.length))),
    );
    const links = parseLinks((await this.#exec.run('ip', ['-j', '-d', 'link', 'show'])).stdout);
    // only host ends the agent marked are its own (a device named like ours is not proof)
    const linkNames = new Set(links.filter((l) => l.ifalias?.startsWith('stratus:dhcp=')).map((l) => l.ifname));

    // stale servers: namespaces, host veth ends and run directories of VNIs no longer wanted
    const staleVnis = new Set<number>();
    for (const ns of namespaces) staleVnis.add(Number(ns.slice(this.#prefix.length)));
    for (const name of linkNames)
      if (name.startsWith(DEVICE_PREFIX.dhcp) && /^\d+$/.test(name.slice(DEVICE_PREFIX.dhcp.length)))
        staleVnis.add(Number(name.slice(DEVICE_PREFIX.dhcp.length)));
    for (const e of await readdir(this.#runDir).catch(() => [] as string[])) {
      const m = /^dhcp-(\d+)$/.exec(e);
      if (m) staleVnis.add(Number(m[1]));
    }
    for (const vni of desired.keys()) staleVnis.delete(vni);
    for (const vni of [...staleVnis].sort((a, b) => a - b)) {
      try {
        const ns = namespaces.has(this.netnsName(vni)) && (await this.#ownNamespace(vni));
        changes.push(...(await this.#remove(vni, ns, linkNames.has(dhcpHostDevice(vni)))));
      } catch (e) {
        errors[vni] = `removing DHCP server: ${(e as Error).message}`;
      }
    }

    for (const n of [...desired.values()].sort((a, b) => a.vni - b.vni)) {
      try {
        changes.push(...(await this.#ensure(n, namespaces.has(this.netnsName(n.vni)), links)));
      } catch (e) {
        errors[n.vni] = (e as Error).message;
        this.#log?.warn({ vni: n.vni, err: (e as Error).message }, 'DHCP server reconcile failed');
      }
    }
    return { changes, errors };
  }

  /** Removes every server (the node leaves all networks). */
  async removeAll(): Promise<DhcpResult> {
    return this.reconcile([]);
  }

  /** Whether the namespace of `vni` is one the agent made: its dhcp0 has the network's DHCP server MAC. */
  async #ownNamespace(vni: number): Promise<boolean> {
    const ns = this.netnsName(vni);
    try {
      const inner = parseLinks((await this.#ns.run('ip', ['-n', ns, '-j', 'link', 'show'])).stdout);
      if (inner.find((l) => l.ifname === DHCP_NS_DEVICE)?.address === dhcpMac(vni)) return true;
    } catch {
      // unreadable: not proven ours
    }
    this.#log?.warn(
      { netns: ns },
      'left a namespace named like a DHCP namespace that the agent cannot prove is its own',
    );
    return false;
  }

  async #remove(vni: number, hasNs: boolean, hasDev: boolean): Promise<string[]> {
    const changes: string[] = [];
    const paths = dnsmasqPaths(this.#runDir, vni);
    const pid = await runningDnsmasq(paths);
    if (pid !== undefined) {
      await stopPid(pid);
      changes.push(`dhcp ${vni}: stopped dnsmasq (pid ${pid})`);
    }
    if (hasDev) {
      await this.#exec.run('ip', ['link', 'del', dhcpHostDevice(vni)]).catch(ignoreMissing);
      changes.push(`dhcp ${vni}: deleted ${dhcpHostDevice(vni)}`);
    }
    if (hasNs) {
      await this.#ns.run('ip', ['netns', 'del', this.netnsName(vni)]).catch(ignoreMissing);
      changes.push(`dhcp ${vni}: deleted namespace ${this.netnsName(vni)}`);
    }
    const dir = join(this.#runDir, `dhcp-${vni}`);
    if ((await readdir(dir).catch(() => undefined)) !== undefined) {
      await rm(dir, { recursive: true, force: true });
      changes.push(`dhcp ${vni}: removed ${dir}`);
    }
    return changes;
  }

  async #ensure(n: DhcpNetwork, hasNs: boolean, links: ReturnType<typeof parseLinks>): Promise<string[]> {
    const changes: string[] = [];
    const ns = this.netnsName(n.vni);
    const host = dhcpHostDevice(n.vni);
    const mac = dhcpMac(n.vni);
    if (!hasNs) {
      await this.#ns.run('ip', ['netns', 'add', ns]);
      await this.#ns.run('ip', ['netns', 'exec', ns, 'sysctl', '-qw', 'net.ipv6.conf.all.disable_ipv6=1']);
      await this.#ns.run('ip', ['netns', 'exec', ns, 'sysctl', '-qw', 'net.ipv6.conf.default.disable_ipv6=1']);
      await this.#ns.run('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
      changes.push(`dhcp ${n.vni}: created namespace ${ns}`);
    }
    // inside view
    const inner = parseLinks((await this.#ns.run('ip', ['-n', ns, '-j', '-d', 'link', 'show'])).stdout);
    let hostLink = links.find((l) => l.ifname === host);
    let nsLink = inner.find((l) => l.ifname === DHCP_NS_DEVICE);
    if (hostLink && (hostLink.linkinfo?.info_kind !== 'veth' || !nsLink)) {
      // a half pair (the namespace was recreated) or something else under our name
      await this.#exec.run('ip', ['link', 'del', host]);
      changes.push(`dhcp ${n.vni}: deleted broken ${host}`);
      hostLink = undefined;
    }
    if (!hostLink) {
      if (nsLink) await this.#ns.run('ip', ['-n', ns, 'link', 'del', DHCP_NS_DEVICE]);
      await this.#exec.run('ip', ['link', 'add', host, 'type', 'veth', 'peer', 'name', DHCP_NS_DEVICE, 'netns', ns]);
      await this.#exec.run('sysctl', ['-qw', `net.ipv6.conf.${host}.disable_ipv6=1`]).catch(() => undefined);
      changes.push(`dhcp ${n.vni}: created veth ${host}`);
      nsLink = undefined;
      hostLink = undefined;
    }
    if (hostLink?.mtu !== n.mtu) await this.#exec.run('ip', ['link', 'set', host, 'mtu', String(n.mtu)]);
    if (hostLink?.ifalias !== dhcpAlias(n)) {
      await this.#exec.run('ip', ['link', 'set', host, 'alias', dhcpAlias(n)]);
      if (hostLink) changes.push(`dhcp ${n.vni}: marked ${host}`);
    }
    changes.push(...(await n.attach(host)));
    if (!hostLink?.flags.includes('UP')) await this.#exec.run('ip', ['link', 'set', host, 'up']);
    if (hostLink && (hostLink.mtu !== n.mtu || !hostLink.flags.includes('UP')))
      changes.push(`dhcp ${n.vni}: set ${host} mtu ${n.mtu} up`);
    // namespace end: MAC, MTU, addresses, up
    if (nsLink?.address !== mac) await this.#ns.run('ip', ['-n', ns, 'link', 'set', DHCP_NS_DEVICE, 'address', mac]);
    if (nsLink?.mtu !== n.mtu)
      await this.#ns.run('ip', ['-n', ns, 'link', 'set', DHCP_NS_DEVICE, 'mtu', String(n.mtu)]);
    if (!nsLink?.flags.includes('UP')) await this.#ns.run('ip', ['-n', ns, 'link', 'set', DHCP_NS_DEVICE, 'up']);
    if (nsLink && (nsLink.address !== mac || nsLink.mtu !== n.mtu || !nsLink.flags.includes('UP')))
      changes.push(`dhcp ${n.vni}: set ${DHCP_NS_DEVICE} address/mtu/up`);
    const want = serverAddresses(n);
    const have = parseAddrs((await this.#ns.run('ip', ['-n', ns, '-j', 'addr', 'show', 'dev', DHCP_NS_DEVICE])).stdout)
      .flatMap((a) => a.addr_info)
      .filter((a) => a.family === 'inet')
      .map((a) => `${a.local}/${a.prefixlen}`);
    for (const a of want.filter((x) => !have.includes(x))) {
      await this.#ns.run('ip', ['-n', ns, 'addr', 'add', a, 'dev', DHCP_NS_DEVICE]);
      changes.push(`dhcp ${n.vni}: address ${a}`);
    }
    for (const a of have.filter((x) => !want.includes(x))) {
      await this.#ns.run('ip', ['-n', ns, 'addr', 'del', a, 'dev', DHCP_NS_DEVICE]);
      changes.push(`dhcp ${n.vni}: removed address ${a}`);
    }

    // files and process
    const paths = dnsmasqPaths(this.#runDir, n.vni);
    await mkdir(join(this.#runDir, `dhcp-${n.vni}`), { recursive: true, mode: 0o755 });
    const conf = renderDnsmasqConfig(n, paths);
    const hosts = renderHostsFile(n.hosts);
    const confChanged = (await readText(paths.conf)) !== conf;
    const oldHosts = await readText(paths.hosts);
    const hostsChanged = oldHosts !== hosts;
    // before the new hosts file replaces the record of the old leases (a crash in between flushes again)
    changes.push(...(await this.#flushNeighbours(n, ns, oldHosts)));
    if (confChanged) await writeFile(paths.conf, conf, { mode: 0o644 });
    if (hostsChanged) await writeFile(paths.hosts, hosts, { mode: 0o644 });
    let pid = await runningDnsmasq(paths);
    if (pid !== undefined && confChanged) {
      await stopPid(pid);
      changes.push(`dhcp ${n.vni}: stopped dnsmasq (pid ${pid}) for a new configuration`);
      pid = undefined;
    }
    if (pid === undefined) {
      // dnsmasq drops to nobody and re-reads the hosts file as it: a directory it cannot enter means no leases at all
      const blocked = await untraversable(dirname(paths.hosts), NOBODY);
      if (blocked) {
        throw new Error(
          `dnsmasq (as nobody) cannot read ${paths.hosts}: ${blocked.path} is mode 0${blocked.mode.toString(8)}; let it in (chmod o+x) or use another DHCP run directory`,
        );
      }
      // dnsmasq daemonizes once it has bound its sockets: a failure to start is reported here
      await this.#ns.run('ip', ['netns', 'exec', ns, 'dnsmasq', `--conf-file=${paths.conf}`]);
      changes.push(`dhcp ${n.vni}: started dnsmasq in ${ns}`);
    } else if (hostsChanged) {
      process.kill(pid, 'SIGHUP');
      changes.push(`dhcp ${n.vni}: reloaded leases (${n.hosts.length} hosts)`);
    }
    return changes;
  }

  /** Deletes the DHCP namespace's neighbour entries that name an old MAC for an address (staleNeighbours). */
  async #flushNeighbours(n: DhcpNetwork, ns: string, oldHostsText: string | undefined): Promise<string[]> {
    const known = new Map<string, string>();
    for (const x of n.neighbours ?? []) known.set(x.ip, x.mac.toLowerCase());
    for (const h of n.hosts) known.set(h.ip, h.mac.toLowerCase());
    const released = new Set<string>();
    for (const [ip, mac] of parseHostsFile(oldHostsText)) if (known.get(ip) !== mac) released.add(ip);
    const out = (await this.#ns.run('ip', ['-n', ns, '-j', 'neigh', 'show', 'dev', DHCP_NS_DEVICE])).stdout.trim();
    const entries = out ? (JSON.parse(out) as NeighEntry[]) : [];
    const changes: string[] = [];
    for (const ip of staleNeighbours(entries, known, released)) {
      await this.#ns.run('ip', ['-n', ns, 'neigh', 'del', ip, 'dev', DHCP_NS_DEVICE]).catch(ignoreMissing);
      changes.push(`dhcp ${n.vni}: flushed the stale neighbour entry of ${ip}`);
    }
    return changes;
  }
}

function ignoreMissing(e: unknown): void {
  if (e instanceof ExecError && /Cannot find device|No such file|does not exist/i.test(e.stderr)) return;
  throw e;
}

/** Static leases of a network: its local ports' fixed IPv4 addresses inside served subnets. Pure. */
export function dhcpHosts(
  n: Pick<NetworkPlan, 'id' | 'subnets'>,
  ports: readonly PortPlan[],
): { mac: string; ip: string; hostname?: string }[] {
  const subnets = servedSubnets(n).map((s) => ({ name: s.name, cidr: parseCidr(s.cidr) }));
  const out: { mac: string; ip: string; hostname?: string }[] = [];
  for (const p of ports) {
    if (p.networkId !== n.id) continue;
    for (const f of p.fixedIPs) {
      let c: ReturnType<typeof parseCidr>;
      try {
        c = parseCidr(f.ipAddress);
      } catch {
        continue;
      }
      const inSubnet = subnets.some(
        (s) =>
          s.cidr.version === c.version &&
          c.addr >> BigInt(32 - s.cidr.prefix) === s.cidr.addr >> BigInt(32 - s.cidr.prefix),
      );
      if (inSubnet) {
        out.push({ mac: p.mac, ip: f.ipAddress, ...(p.hostname ? { hostname: p.hostname } : {}) });
        break; // one lease per MAC (dnsmasq: one address per host line per subnet)
      }
    }
  }
  return out;
}
