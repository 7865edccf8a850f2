// The Linux bridge backend (Neutron's linuxbridge agent with l2population, plus its iptables firewall rebuilt on
// nftables): per network a bridge stb-<vni> with a VXLAN device stx-<vni> (UDP 4789, nolearning, head-end
// replication toward the network's other nodes, static FDB entries for remote ports), per port a persistent tap
// stt-<port11> made by the agent and plugged into its network's bridge, security groups and anti-spoofing in two
// nftables tables (nft.ts), and a distributed DHCP server per network (dhcp.ts). See docs/design/networking.md.
//
// apply() observes (ip -j -d link, bridge -j fdb, nft list), diffs against the plan, and runs only the commands that
// change something, so a second apply() of the same plan, or a fresh instance after an agent restart, runs none.
import type { Logger } from '../../../operator/src/runtime/index.ts';
import type {
  ApplyResult,
  NetworkBackend,
  NetworkPlan,
  NodeNetworkPlan,
  PortPlan,
  PortResult,
  VifType,
} from './backend.ts';
import { DhcpManager, dhcpDefaults, dhcpMac, servedSubnets } from './dhcp.ts';
import type { Exec } from './exec.ts';
import { bridgeName, DEVICE_PREFIX, vxlanName } from './names.ts';
import { NftManager, renderRules, zonesForVnis } from './nft.ts';
import {
  deviceWithAddress,
  type FdbEntry,
  isTap,
  type Link,
  parseAddrs,
  parseFdb,
  parseLinks,
  vxlanData,
} from './observe.ts';

/** UDP port of every VXLAN device (IANA; the kernel default 8472 is Linux-specific). */
export const VXLAN_PORT = 4789;
const ZERO_MAC = '00:00:00:00:00:00';

export interface LinuxBridgeOptions {
  /** Runs every command (in the node's network namespace for simulated nodes). */
  exec: Exec;
  /** Underlay device of the VXLAN devices (default: the device holding plan.hostIP). */
  underlayDevice?: string;
  logger?: Logger;
  /** DHCP servers (default on). */
  dhcp?: boolean;
  /**
   * Prefix of DHCP namespace names (+ VNI); unique per node when several simulated nodes share a host. Default
   * `<exec.netns>-dhcp-`, or `stratus-dhcp-` on a real node.
   */
  dhcpNetnsPrefix?: string;
  /** Directory for dnsmasq files (default /run/stratus/network/<exec.netns or "host">). */
  runDir?: string;
  /** Exec in the host's mount namespace for `ip netns add|del|exec` (default: hostExec()). */
  nsExec?: Exec;
  /** nftables table names (default nft.ts DEFAULT_TABLES). */
  tables?: { bridge: string; inet: string };
}

/** ifalias ownership marker of a network's bridge and VXLAN device. */
export function networkAlias(n: Pick<NetworkPlan, 'id' | 'vni'>): string {
  return `stratus:net=${n.id},vni=${n.vni}`;
}

/** ifalias ownership marker of a tap the agent made. */
export function tapAlias(p: Pick<PortPlan, 'id'>): string {
  return `stratus:port=${p.id}`;
}

/** The network uid and VNI of a networkAlias() marker, or undefined when the alias is not one. */
export function parseNetworkAlias(alias: string | undefined): { id: string; vni: number } | undefined {
  const m = /^stratus:net=([^,]+),vni=(\d+)$/.exec(alias ?? '');
  return m ? { id: m[1]!, vni: Number(m[2]) } : undefined;
}

/**
 * The Stratus devices to delete because the plan no longer has them: only devices the agent can prove it made
 * (name prefix AND kind AND ownership marker in ifalias) and that nothing uses. A tap with carrier (a process, i.e.
 * QEMU, holds it open) is kept, and so are the bridge it is attached to and that bridge's VXLAN device: a guest
 * keeps its network even if the plan lost its port. Order: taps, VXLAN devices, bridges. Pure.
 */
export function staleDevices(
  links: Iterable<Link>,
  want: ReadonlySet<string>,
): { remove: string[]; kept: { device: string; reason: string }[] } {
  const all = [...links];
  const kept: { device: string; reason: string }[] = [];
  const taps: string[] = [];
  const vxlans: Link[] = [];
  const bridges: Link[] = [];
  for (const l of all) {
    if (want.has(l.ifname)) continue;
    if (l.ifname.startsWith(DEVICE_PREFIX.tap)) {
      if (!isTap(l) || !l.ifalias?.startsWith('stratus:port=')) continue; // not made by the agent
      if (l.flags.includes('LOWER_UP')) kept.push({ device: l.ifname, reason: 'a process holds the tap open' });
      else taps.push(l.ifname);
    } else if (l.ifname.startsWith(DEVICE_PREFIX.vxlan)) {
      if (vxlanData(l) && parseNetworkAlias(l.ifalias)) vxlans.push(l);
    } else if (l.ifname.startsWith(DEVICE_PREFIX.bridge)) {
      if (l.linkinfo?.info_kind === 'bridge' && parseNetworkAlias(l.ifalias)) bridges.push(l);
    }
  }
  const removing = new Set([...taps, ...vxlans.map((l) => l.ifname)]);
  // a bridge stays while a device it does not own (a kept tap, a foreign device) is attached to it
  const busy = new Set(
    all
      .filter(
        (l) =>
          l.master &&
          !removing.has(l.ifname) &&
          !l.ifname.startsWith(DEVICE_PREFIX.vxlan) &&
          !l.ifname.startsWith(DEVICE_PREFIX.dhcp),
      )
      .map((l) => l.master!),
  );
  const keptBridges = new Set<string>();
  for (const b of bridges) {
    if (busy.has(b.ifname)) {
      keptBridges.add(b.ifname);
      kept.push({ device: b.ifname, reason: 'devices are still attached to it' });
    }
  }
  const remove = [...taps];
  for (const v of vxlans) {
    if (v.master && keptBridges.has(v.master))
      kept.push({ device: v.ifname, reason: `its bridge ${v.master} is kept` });
    else remove.push(v.ifname);
  }
  for (const b of bridges) if (!keptBridges.has(b.ifname)) remove.push(b.ifname);
  return { remove, kept };
}

/** The networks wired on the node, by uid, from the VXLAN devices' ownership markers (VNI and MTU). Pure. */
export function observedNetworks(links: Iterable<Link>): Map<string, { vni: number; mtu: number }> {
  const out = new Map<string, { vni: number; mtu: number }>();
  for (const l of links) {
    if (!l.ifname.startsWith(DEVICE_PREFIX.vxlan)) continue;
    const a = parseNetworkAlias(l.ifalias);
    const d = vxlanData(l);
    if (a && d && d.id === a.vni) out.set(a.id, { vni: a.vni, mtu: l.mtu });
  }
  return out;
}

/** Desired VXLAN FDB entries of a network: flood entries per peer (HER) and unicast entries per remote port. Pure. */
export function desiredFdb(n: Pick<NetworkPlan, 'peers' | 'remotePorts'>, hostIP: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  const peers = [...new Set(n.peers)].filter((p) => p !== hostIP).sort();
  if (peers.length) out.set(ZERO_MAC, peers);
  for (const r of [...n.remotePorts].sort((a, b) => a.mac.localeCompare(b.mac))) {
    if (r.hostIP === hostIP) continue;
    out.set(r.mac.toLowerCase(), [r.hostIP]);
  }
  return out;
}

/** The commands that turn the observed FDB entries of a VXLAN device into the desired ones. Pure. */
export function fdbCommands(dev: string, observed: readonly FdbEntry[], desired: Map<string, string[]>): string[][] {
  const have = new Set(
    observed.filter((e) => e.ifname === dev && e.dst && e.flags.includes('self')).map((e) => `${e.mac} ${e.dst}`),
  );
  const want = new Set([...desired].flatMap(([mac, dsts]) => dsts.map((d) => `${mac} ${d}`)));
  const cmds: string[][] = [];
  for (const k of [...want].sort()) {
    if (have.has(k)) continue;
    const [mac, dst] = k.split(' ') as [string, string];
    // the zero MAC holds a list (append); a unicast MAC has one destination (replace moves it)
    cmds.push(['fdb', mac === ZERO_MAC ? 'append' : 'replace', mac, 'dev', dev, 'dst', dst, 'self', 'permanent']);
  }
  for (const k of [...have].sort()) {
    if (want.has(k)) continue;
    const [mac, dst] = k.split(' ') as [string, string];
    // a unicast MAC that moved was already replaced above
    if (mac !== ZERO_MAC && desired.has(mac)) continue;
    cmds.push(['fdb', 'del', mac, 'dev', dev, 'dst', dst, 'self']);
  }
  return cmds;
}

/** Whether an observed VXLAN device can be adopted as is (id, port, local address, underlay, no learning). */
export function vxlanMatches(l: Link, vni: number, hostIP: string, underlay: string): boolean {
  const d = vxlanData(l);
  return !!d && d.id === vni && d.port === VXLAN_PORT && d.local === hostIP && d.link === underlay && !d.learning;
}

function isUp(l: Link | undefined): boolean {
  return !!l?.flags.includes('UP');
}

/** The Linux bridge + VXLAN + nftables backend. */
export class LinuxBridgeBackend implements NetworkBackend {
  readonly name = 'linuxbridge' as const;
  readonly vifType: VifType = 'bridge';
  readonly #exec: Exec;
  readonly #underlay: string | undefined;
  readonly #log: Logger | undefined;
  readonly #nft: NftManager;
  readonly #dhcp: DhcpManager | undefined;
  readonly #tables: { bridge: string; inet: string } | undefined;
  /** Why security groups cannot be enforced (br_netfilter missing), if so. */
  #sgUnavailable: string | undefined;

  constructor(o: LinuxBridgeOptions) {
    this.#exec = o.exec;
    this.#underlay = o.underlayDevice;
    this.#log = o.logger;
    this.#tables = o.tables;
    this.#nft = new NftManager({ exec: o.exec, logger: o.logger });
    this.#dhcp =
      o.dhcp === false
        ? undefined
        : new DhcpManager({
            exec: o.exec,
            nsExec: o.nsExec,
            netnsPrefix: o.dhcpNetnsPrefix ?? dhcpDefaults(o.exec).netnsPrefix,
            runDir: o.runDir ?? dhcpDefaults(o.exec).runDir,
            logger: o.logger,
          });
  }

  /** Turns on br_netfilter's calls into the inet hooks (the security groups' stateful half) in this namespace. */
  async init(): Promise<void> {
    const problems: string[] = [];
    for (const key of ['net.bridge.bridge-nf-call-iptables', 'net.bridge.bridge-nf-call-ip6tables']) {
      try {
        const cur = (await this.#exec.run('sysctl', ['-n', key])).stdout.trim();
        if (cur !== '1') await this.#exec.run('sysctl', ['-qw', `${key}=1`]);
      } catch (e) {
        problems.push(`${key}: ${(e as Error).message.trim()}`);
      }
    }
    this.#sgUnavailable = problems.length
      ? `security groups cannot be enforced: br_netfilter is not available (${problems.join('; ')})`
      : undefined;
    if (this.#sgUnavailable) this.#log?.error(this.#sgUnavailable);
  }

  async observeNetworks(): Promise<Map<string, { vni: number; mtu: number }>> {
    return observedNetworks((await this.#links()).values());
  }

  async close(): Promise<void> {
    // nothing runs in the background; dnsmasq keeps serving leases across agent restarts
  }

  async #run(cmd: string, args: string[], changes: string[], what?: string): Promise<void> {
    await this.#exec.run(cmd, args);
    changes.push(what ?? `${cmd} ${args.join(' ')}`);
  }

  async #links(): Promise<Map<string, Link>> {
    const links = parseLinks((await this.#exec.run('ip', ['-j', '-d', 'link', 'show'])).stdout);
    return new Map(links.map((l) => [l.ifname, l]));
  }

  async #underlayDevice(hostIP: string): Promise<string> {
    if (this.#underlay) return this.#underlay;
    const dev = deviceWithAddress(parseAddrs((await this.#exec.run('ip', ['-j', 'addr', 'show'])).stdout), hostIP);
    if (!dev) throw new Error(`no device holds the node's underlay address ${hostIP}`);
    return dev;
  }

  async apply(plan: NodeNetworkPlan): Promise<ApplyResult> {
    const changes: string[] = [];
    const ports: Record<string, PortResult> = {};
    const netErrors = new Map<string, string>();
    const links = await this.#links();
    const networks = [...plan.networks].sort((a, b) => a.vni - b.vni);
    const byId = new Map(networks.map((n) => [n.id, n]));
    const wantPorts = plan.ports.filter((p) => byId.has(p.networkId)).sort((a, b) => a.device.localeCompare(b.device));
    const wantDevices = new Set([
      ...networks.flatMap((n) => [bridgeName(n.vni), vxlanName(n.vni)]),
      ...wantPorts.map((p) => p.device),
    ]);

    // 1. remove stale devices first (frees VNIs and names): only our own, unused ones (marker and plan)
    const stale = staleDevices(links.values(), wantDevices);
    for (const k of stale.kept) this.#log?.warn(k, 'kept a device the plan no longer has');
    for (const dev of stale.remove) {
      try {
        await this.#run('ip', ['link', 'del', dev], changes, `deleted stale ${dev}`);
        links.delete(dev);
      } catch (e) {
        this.#log?.warn({ device: dev, err: (e as Error).message }, 'could not delete stale device');
      }
    }

    // 2. networks: bridge, VXLAN device, FDB
    let underlay: string | undefined;
    let fdb: FdbEntry[] | undefined;
    for (const n of networks) {
      try {
        underlay ??= await this.#underlayDevice(plan.hostIP);
        const ul = links.get(underlay);
        if (ul && ul.mtu - 50 < n.mtu)
          this.#log?.warn({ network: n.id, mtu: n.mtu, underlayMtu: ul.mtu }, 'network MTU exceeds underlay MTU - 50');
        await this.#ensureNetwork(n, plan.hostIP, underlay, links, changes);
        fdb ??= parseFdb((await this.#exec.run('bridge', ['-j', 'fdb', 'show'])).stdout);
        for (const args of fdbCommands(vxlanName(n.vni), fdb, desiredFdb(n, plan.hostIP)))
          await this.#run('bridge', args, changes);
      } catch (e) {
        netErrors.set(n.id, (e as Error).message);
        this.#log?.warn({ network: n.id, vni: n.vni, err: (e as Error).message }, 'network wiring failed');
      }
    }

    // 3. ports
    for (const p of plan.ports) {
      const n = byId.get(p.networkId);
      if (!n) {
        ports[p.id] = { ready: false, message: `network ${p.networkId} is not in the node plan` };
        continue;
      }
      const err = netErrors.get(n.id);
      if (err) {
        ports[p.id] = { ready: false, message: `network ${n.namespace}/${n.name}: ${err}` };
        continue;
      }
      try {
        await this.#ensurePort(p, n, links, changes);
        ports[p.id] = { ready: true, ...(p.adminStateUp ? {} : { message: 'administratively down' }) };
      } catch (e) {
        ports[p.id] = { ready: false, message: (e as Error).message };
      }
    }

    // 4. security groups and anti-spoofing (atomic per table)
    const zones = zonesForVnis(networks.map((n) => n.vni));
    const dhcpVnis = new Set(networks.filter((n) => servedSubnets(n).length > 0).map((n) => n.vni));
    const rendered = renderRules({
      ports: wantPorts.map((p) => {
        const n = byId.get(p.networkId)!;
        return { port: p, device: p.device, bridge: bridgeName(n.vni), zone: zones.get(n.vni)! };
      }),
      securityGroups: plan.securityGroups,
      l2Drops: this.#dhcp ? [...dhcpVnis].map((v) => ({ device: vxlanName(v), mac: dhcpMac(v) })) : [],
      tables: this.#tables,
    });
    changes.push(...(await this.#nft.applyForPorts(rendered, wantPorts, ports, this.#sgUnavailable)));

    // 5. DHCP
    if (this.#dhcp) {
      const served = networks.filter((n) => dhcpVnis.has(n.vni) && !netErrors.has(n.id));
      changes.push(
        ...(await this.#dhcp.reconcileForPorts(served, wantPorts, ports, (n, dev) =>
          this.#attachDhcp(dev, bridgeName(n.vni)),
        )),
      );
    }
    if (changes.length) this.#log?.info({ changes }, 'network data plane changed');
    return { ports, changes };
  }

  async #ensureNetwork(
    n: NetworkPlan,
    hostIP: string,
    underlay: string,
    links: Map<string, Link>,
    changes: string[],
  ): Promise<void> {
    const br = bridgeName(n.vni);
    const vx = vxlanName(n.vni);
    const alias = networkAlias(n);
    let b = links.get(br);
    if (b && b.linkinfo?.info_kind !== 'bridge') {
      await this.#run('ip', ['link', 'del', br], changes, `deleted ${br} (not a bridge)`);
      b = undefined;
    }
    if (!b) {
      await this.#run(
        'ip',
        ['link', 'add', br, 'mtu', String(n.mtu), 'type', 'bridge', 'stp_state', '0', 'forward_delay', '0'],
        changes,
        `created bridge ${br}`,
      );
      await this.#exec.run('sysctl', ['-qw', `net.ipv6.conf.${br}.disable_ipv6=1`]).catch(() => undefined);
    } else {
      const d = (b.linkinfo?.info_data ?? {}) as { stp_state?: number; forward_delay?: number };
      if (d.stp_state !== 0 || d.forward_delay !== 0)
        await this.#run('ip', ['link', 'set', br, 'type', 'bridge', 'stp_state', '0', 'forward_delay', '0'], changes);
    }
    // per-bridge br_netfilter switches: the inet table sees this bridge's traffic even if the global sysctls are 0
    const bd = (b?.linkinfo?.info_data ?? {}) as { nf_call_iptables?: number; nf_call_ip6tables?: number };
    if (bd.nf_call_iptables !== 1 || bd.nf_call_ip6tables !== 1)
      await this.#run(
        'ip',
        ['link', 'set', br, 'type', 'bridge', 'nf_call_iptables', '1', 'nf_call_ip6tables', '1'],
        changes,
        b ? undefined : '',
      );
    if (b?.ifalias !== alias) await this.#run('ip', ['link', 'set', br, 'alias', alias], changes, b ? undefined : '');
    if (b && b.mtu !== n.mtu) await this.#run('ip', ['link', 'set', br, 'mtu', String(n.mtu)], changes);

    let v = links.get(vx);
    if (v && !vxlanMatches(v, n.vni, hostIP, underlay)) {
      await this.#run('ip', ['link', 'del', vx], changes, `deleted ${vx} (attributes changed)`);
      v = undefined;
    }
    if (!v) {
      await this.#run(
        'ip',
        [
          'link',
          'add',
          vx,
          'mtu',
          String(n.mtu),
          'type',
          'vxlan',
          'id',
          String(n.vni),
          'dstport',
          String(VXLAN_PORT),
          'local',
          hostIP,
          'dev',
          underlay,
          'nolearning',
        ],
        changes,
        `created VXLAN ${vx} (VNI ${n.vni}, local ${hostIP}, dev ${underlay})`,
      );
      await this.#exec.run('sysctl', ['-qw', `net.ipv6.conf.${vx}.disable_ipv6=1`]).catch(() => undefined);
    }
    if (v?.ifalias !== alias) await this.#run('ip', ['link', 'set', vx, 'alias', alias], changes, v ? undefined : '');
    if (v && v.mtu !== n.mtu) await this.#run('ip', ['link', 'set', vx, 'mtu', String(n.mtu)], changes);
    if (v?.master !== br) await this.#run('ip', ['link', 'set', vx, 'master', br], changes, v ? undefined : '');
    const up = n.adminStateUp ? 'up' : 'down';
    if (isUp(v) !== n.adminStateUp) await this.#run('ip', ['link', 'set', vx, up], changes, v ? undefined : '');
    if (isUp(b) !== n.adminStateUp) await this.#run('ip', ['link', 'set', br, up], changes, b ? undefined : '');
    // drop the empty change lines of freshly created devices (their creation line says it all)
    for (let i = changes.length - 1; i >= 0; i--) if (changes[i] === '') changes.splice(i, 1);
  }

  async #ensurePort(p: PortPlan, n: NetworkPlan, links: Map<string, Link>, changes: string[]): Promise<void> {
    const br = bridgeName(n.vni);
    let l = links.get(p.device);
    const created = !l;
    if (!l) {
      await this.#run(
        'ip',
        ['tuntap', 'add', 'dev', p.device, 'mode', 'tap', 'vnet_hdr'],
        changes,
        `created tap ${p.device}`,
      );
      await this.#exec.run('sysctl', ['-qw', `net.ipv6.conf.${p.device}.disable_ipv6=1`]).catch(() => undefined);
      l = undefined;
    }
    const tap = created || (l !== undefined && isTap(l));
    const quiet = created ? '' : undefined;
    if (tap && l?.ifalias !== tapAlias(p))
      await this.#run('ip', ['link', 'set', p.device, 'alias', tapAlias(p)], changes, quiet);
    if (l?.mtu !== n.mtu) await this.#run('ip', ['link', 'set', p.device, 'mtu', String(n.mtu)], changes, quiet);
    if (l?.master !== br) await this.#run('ip', ['link', 'set', p.device, 'master', br], changes, quiet);
    if (isUp(l) !== p.adminStateUp)
      await this.#run('ip', ['link', 'set', p.device, p.adminStateUp ? 'up' : 'down'], changes, quiet);
    for (let i = changes.length - 1; i >= 0; i--) if (changes[i] === '') changes.splice(i, 1);
  }

  async #attachDhcp(dev: string, br: string): Promise<string[]> {
    const l = parseLinks((await this.#exec.run('ip', ['-j', '-d', 'link', 'show', 'dev', dev])).stdout)[0];
    if (l?.master === br) return [];
    await this.#exec.run('ip', ['link', 'set', dev, 'master', br]);
    return [`attached ${dev} to ${br}`];
  }
}
