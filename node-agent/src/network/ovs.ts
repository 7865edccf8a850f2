// The Open vSwitch network backend (Neutron's openvswitch agent with the iptables_hybrid firewall, reduced).
//
// Data path on a node:
//   VM tap stt-<port11>  ──  Linux bridge stq-<port11>  ──  veth stv-<port11> / sto-<port11>  ──  br-int
//   br-int: sto- ports are access ports tagged with the network's node-local VLAN; per (network, peer node) one
//   VXLAN port stn-<hash> (options:key=<VNI>, remote_ip=<peer>, dst_port 4789) tagged with the same VLAN.
//   With datapath_type=netdev (userspace, no kernel module) the tunnel endpoint address lives on the OVS bridge
//   br-phy, which holds the underlay device as a port (init() moves the address and routes there).
//
// Why this shape:
//  - The hybrid plug (a Linux bridge per port) exists so nftables security groups see the VM's traffic: OVS-switched
//    packets never cross netfilter, bridged ones do (br_netfilter). Neutron does the same (qbr/qvb/qvo).
//  - br-int runs fail_mode=standalone without a controller: the only flow is OVS's default NORMAL (MAC learning per
//    VLAN). Isolation comes entirely from port tags, kept in OVSDB (persistent, transactional): a VIF or tunnel port
//    is created with its tag in the same ovs-vsctl transaction, so it is never an untagged trunk. fail_mode=secure
//    would start with an empty flow table (everything dropped) after every ovs-vswitchd restart until the agent
//    re-installs flows; with standalone a restarted switch forwards at once with the persisted tags.
//  - Flooding (ARP, unknown unicast) within a VLAN reaches only the tunnel ports of that network, i.e. only the
//    nodes in NetworkPlan.peers: head-end replication without flows. Remote MACs are learned from the tunnels.
//    Tunnel ports are Port:protected (no forwarding between two protected ports): split horizon, so a frame that
//    came from one node is never relayed to another (the full mesh would otherwise loop broadcasts forever).
//  - The node-local VLAN of a network is recorded in every port's external_ids (stratus-local-vlan), so a restarted
//    agent reuses it (Neutron restores local VLANs from Port other_config); it disappears with the network's last
//    port. Admin-down ports sit in the dead VLAN 4095 (Neutron's DEAD_VLAN_TAG).
//  - Userspace datapath only: the bridge-side veth stv- has TX checksum offload turned off (ethtool -K tx off), else
//    TCP/UDP leave with partial checksums that ovs-vswitchd (AF_PACKET, no vnet header) never completes and the
//    receiver drops them (OVS's own userspace system tests do the same for veths).
//
// Reconciliation: observe (ovs-vsctl --format=json list Bridge/Port/Interface, ip -j -d link, ethtool --json -k) ->
// pure diff (planApply) -> minimal idempotent commands. Applying the same plan twice runs no command the second
// time; a fresh instance adopts what is there; Stratus-owned ports, tunnels and devices the plan lacks are removed.
import { createHash } from 'node:crypto';
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
import { DHCP_NS_DEVICE, DhcpManager, dhcpDefaults, dhcpHostDevice, servedSubnets } from './dhcp.ts';
import { type Exec, hostExec } from './exec.ts';
import { DEVICE_PREFIX, shortId } from './names.ts';
import { NftManager, renderRules } from './nft.ts';
import { mapCol, type OvsRow, OvsVsctl, optInt, optStr, setCol, vsctlValue } from './ovsdb.ts';

/** Name prefix of the VXLAN tunnel ports on br-int (not kernel devices; candidates for names.ts DEVICE_PREFIX). */
export const TUNNEL_PREFIX = 'stn-';
/** VLAN of ports that must not forward (admin down), as Neutron's DEAD_VLAN_TAG. */
export const DEAD_VLAN = 4095;
/** VXLAN UDP port (IANA; Neutron OVS uses it too). */
export const VXLAN_PORT = 4789;

/** OVSDB external_ids keys the backend writes (Port table unless noted). */
export const EXT = {
  /** 'vif' | 'tunnel' | 'dhcp': the ownership marker. */
  kind: 'stratus-kind',
  net: 'stratus-net',
  port: 'stratus-port',
  localVlan: 'stratus-local-vlan',
  /** VIF ports: the conntrack zone of the port's security-group state (one zone per port, as Neutron's hybrid). */
  zone: 'stratus-ct-zone',
  remote: 'stratus-remote',
  vni: 'stratus-vni',
  /** Interface table, the convention OVN/Neutron/os-vif use. */
  ifaceId: 'iface-id',
  attachedMac: 'attached-mac',
} as const;

/** The hybrid-plug device names of a port. */
export function hybridNames(portId: string): { qbr: string; qvb: string; qvo: string } {
  const s = shortId(portId);
  return {
    qbr: `${DEVICE_PREFIX.hybridBridge}${s}`,
    qvb: `${DEVICE_PREFIX.hybridBridgePort}${s}`,
    qvo: `${DEVICE_PREFIX.hybridOvsPort}${s}`,
  };
}

/** The tunnel port of a network toward one peer node (15 characters; which VNI/peer is in external_ids). */
export function tunnelName(vni: number, remoteIP: string): string {
  return `${TUNNEL_PREFIX}${createHash('sha256').update(`${vni}/${remoteIP}`).digest('hex').slice(0, 11)}`;
}

// ---------------------------------------------------------------------------------------------------------------
// Observed state

export interface ObservedOvsPort {
  name: string;
  /** Bridge holding the port (undefined: a dangling Port row). */
  bridge?: string;
  tag?: number;
  /** Port.protected: no forwarding between two protected ports (split horizon between tunnels). */
  protected: boolean;
  externalIds: Record<string, string>;
  /** The port's interface of the same name (every port here has exactly one). */
  type: string;
  options: Record<string, string>;
  ifaceExternalIds: Record<string, string>;
  mtuRequest?: number;
  ofport?: number;
  error?: string;
}

export interface ObservedBridge {
  name: string;
  datapathType: string;
  failMode?: string;
  ports: string[];
}

export interface ObservedLink {
  name: string;
  /** linkinfo.info_kind (bridge, veth, tun, ...); undefined for plain devices. */
  kind?: string;
  master?: string;
  mtu: number;
  /** Administratively up. */
  up: boolean;
  /** Carrier (LOWER_UP): for a tap, a process (QEMU) holds it open. */
  carrier?: boolean;
  alias?: string;
  /** veth peer name when the peer is in the same namespace. */
  peer?: string;
  stpState?: number;
  forwardDelay?: number;
  /** Bridges: br_netfilter hands their IPv4/IPv6 traffic to the inet hooks (nf_call_iptables/ip6tables). */
  nfCall?: boolean;
  /** TX checksum offload (ethtool tx-checksumming), observed for the stv- veths in netdev mode only. */
  txChecksum?: boolean;
}

export interface Observed {
  bridges: ObservedBridge[];
  ports: ObservedOvsPort[];
  links: ObservedLink[];
}

/** Joins `list Bridge`, `list Port` and `list Interface` rows (columns as observe() requests them). */
export function parseOvsState(bridgeRows: OvsRow[], portRows: OvsRow[], ifaceRows: OvsRow[]) {
  const portUuidToBridge = new Map<string, string>();
  const bridges: ObservedBridge[] = [];
  const portByUuid = new Map(portRows.map((p) => [String(p._uuid), p]));
  for (const b of bridgeRows) {
    const name = String(b.name);
    const ports: string[] = [];
    for (const u of setCol(b, 'ports')) {
      portUuidToBridge.set(String(u), name);
      const p = portByUuid.get(String(u));
      if (p) ports.push(String(p.name));
    }
    bridges.push({ name, datapathType: String(b.datapath_type ?? ''), failMode: optStr(b, 'fail_mode'), ports });
  }
  const ifaceByName = new Map(ifaceRows.map((i) => [String(i.name), i]));
  const ports: ObservedOvsPort[] = portRows.map((p) => {
    const name = String(p.name);
    const i = ifaceByName.get(name) ?? {};
    return {
      name,
      bridge: portUuidToBridge.get(String(p._uuid)),
      tag: optInt(p, 'tag'),
      protected: p.protected === true,
      externalIds: mapCol(p, 'external_ids'),
      type: String(i.type ?? ''),
      options: mapCol(i, 'options'),
      ifaceExternalIds: mapCol(i, 'external_ids'),
      mtuRequest: optInt(i, 'mtu_request'),
      ofport: optInt(i, 'ofport'),
      error: optStr(i, 'error'),
    };
  });
  return { bridges, ports };
}

interface IpLink {
  ifname: string;
  flags?: string[];
  mtu: number;
  master?: string;
  ifalias?: string;
  link?: string;
  linkinfo?: {
    info_kind?: string;
    info_data?: { stp_state?: number; forward_delay?: number; nf_call_iptables?: number; nf_call_ip6tables?: number };
  };
}

/** Parses `ip -j -d link show`. */
export function parseLinks(json: string): ObservedLink[] {
  const links = JSON.parse(json || '[]') as IpLink[];
  return links.map((l) => ({
    name: l.ifname,
    kind: l.linkinfo?.info_kind,
    master: l.master,
    mtu: l.mtu,
    up: (l.flags ?? []).includes('UP'),
    carrier: (l.flags ?? []).includes('LOWER_UP'),
    alias: l.ifalias,
    peer: l.linkinfo?.info_kind === 'veth' ? l.link : undefined,
    stpState: l.linkinfo?.info_data?.stp_state,
    forwardDelay: l.linkinfo?.info_data?.forward_delay,
    nfCall:
      l.linkinfo?.info_kind === 'bridge'
        ? l.linkinfo.info_data?.nf_call_iptables === 1 && l.linkinfo.info_data?.nf_call_ip6tables === 1
        : undefined,
  }));
}

/** Parses `ethtool --json -k <dev>`: whether TX checksumming is active. */
export function parseTxChecksum(json: string): boolean | undefined {
  const [f] = JSON.parse(json) as Record<string, { active?: boolean }>[];
  return f?.['tx-checksumming']?.active;
}

// ---------------------------------------------------------------------------------------------------------------
// Desired state and the diff

/**
 * The node-local VLAN of every network of the plan: the one its existing Stratus ports record (a restarted agent
 * keeps it), else the lowest tag no port on the bridge uses.
 */
export function allocateLocalVlans(
  networks: readonly NetworkPlan[],
  ports: readonly ObservedOvsPort[],
  bridge: string,
) {
  const wanted = new Set(networks.map((n) => n.id));
  const out = new Map<string, number>();
  const taken = new Set<number>([0, DEAD_VLAN]);
  const recorded = new Map<string, number>();
  for (const p of ports) {
    if (p.bridge !== bridge) continue;
    const net = p.externalIds[EXT.net];
    const v = Number(p.externalIds[EXT.localVlan]);
    if (net && wanted.has(net) && Number.isInteger(v) && v > 0 && v < DEAD_VLAN) {
      if (!recorded.has(net)) recorded.set(net, v);
    } else if (p.tag !== undefined) taken.add(p.tag); // foreign or stale ports: do not share their VLAN
  }
  const sorted = [...networks].sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  for (const n of sorted) {
    const v = recorded.get(n.id);
    if (v !== undefined && !taken.has(v)) {
      out.set(n.id, v);
      taken.add(v);
    }
  }
  let next = 1;
  for (const n of sorted) {
    if (out.has(n.id)) continue;
    while (taken.has(next)) next++;
    if (next >= DEAD_VLAN) throw new Error('no free local VLAN on the integration bridge');
    out.set(n.id, next);
    taken.add(next);
  }
  return out;
}

/**
 * The conntrack zone (1..65535) of every port: the one its br-int port records (stable across agent restarts), else
 * the lowest zone no other port uses.
 */
export function allocateZones(portIds: readonly string[], ports: readonly ObservedOvsPort[]): Map<string, number> {
  const wanted = new Set(portIds);
  const recorded = new Map<string, number>();
  const taken = new Set<number>();
  for (const o of ports) {
    const z = Number(o.externalIds[EXT.zone]);
    if (!Number.isInteger(z) || z < 1 || z > 65535) continue;
    const id = o.externalIds[EXT.port];
    if (id && wanted.has(id) && !recorded.has(id)) recorded.set(id, z);
    else taken.add(z);
  }
  const out = new Map<string, number>();
  const sorted = [...wanted].sort();
  for (const id of sorted) {
    const z = recorded.get(id);
    if (z !== undefined && !taken.has(z)) {
      out.set(id, z);
      taken.add(z);
    }
  }
  let next = 1;
  for (const id of sorted) {
    if (out.has(id)) continue;
    while (taken.has(next)) next++;
    if (next > 65535) throw new Error('no free conntrack zone');
    out.set(id, next);
    taken.add(next);
  }
  return out;
}

/**
 * The br-int port of a network's DHCP namespace veth: access port in the network's VLAN, protected like the tunnels
 * so a node's DHCP server never hears or answers another node's guests (every node's server has the same MAC/IP).
 */
export function dhcpOvsPort(n: Pick<NetworkPlan, 'id' | 'vni' | 'mtu'>, vlan: number): DesiredOvsPort {
  return {
    name: dhcpHostDevice(n.vni),
    tag: vlan,
    protected: true,
    externalIds: { [EXT.kind]: 'dhcp', [EXT.net]: n.id, [EXT.localVlan]: String(vlan) },
    type: '',
    options: {},
    ifaceExternalIds: {},
    mtuRequest: n.mtu,
  };
}

/** One command of an apply, with the human-readable change it makes. */
export interface Step {
  cmd: string;
  args: string[];
  change: string;
  /** Port id whose readiness depends on the step (a failure skips the port's remaining steps). */
  port?: string;
  /** Network id whose ports depend on the step (tunnels). */
  net?: string;
}

export interface PlanConfig {
  integrationBridge: string;
  datapathType: 'netdev' | 'system';
  /** ovs-vsctl arguments of one transaction (OvsVsctl.args). */
  vsctl: (commands: readonly (readonly string[])[]) => string[];
  /** Networks with a DHCP server on this node: their std-<vni> br-int port is kept (dhcp.ts attaches it). */
  dhcpNetworks?: ReadonlySet<string>;
}

export interface DesiredOvsPort {
  name: string;
  tag: number;
  protected: boolean;
  externalIds: Record<string, string>;
  type: string;
  options: Record<string, string>;
  ifaceExternalIds: Record<string, string>;
  mtuRequest?: number;
}

const sameMap = (a: Record<string, string>, b: Record<string, string>) =>
  Object.keys(a).length === Object.keys(b).length && Object.entries(a).every(([k, v]) => b[k] === v);

/** Transaction commands that make an OVS port match `d` (empty when it does). */
export function ovsPortCommands(
  d: DesiredOvsPort,
  o: ObservedOvsPort | undefined,
  bridge: string,
  recreate: boolean,
): string[][] {
  const setPort = [
    'set',
    'Port',
    d.name,
    `tag=${d.tag}`,
    `protected=${d.protected}`,
    ...Object.entries(d.externalIds).map(([k, v]) => `external_ids:${k}=${vsctlValue(v)}`),
  ];
  const ifaceArgs = [
    ...(d.type ? [`type=${d.type}`] : []),
    ...Object.entries(d.options).map(([k, v]) => `options:${k}=${vsctlValue(v)}`),
    ...Object.entries(d.ifaceExternalIds).map(([k, v]) => `external_ids:${k}=${vsctlValue(v)}`),
    ...(d.mtuRequest !== undefined ? [`mtu_request=${d.mtuRequest}`] : []),
  ];
  const setIface = ['set', 'Interface', d.name, ...ifaceArgs];
  if (!o || o.bridge !== bridge || recreate) {
    return [
      ...(o ? [['--if-exists', 'del-port', d.name]] : []),
      ['add-port', bridge, d.name],
      setPort,
      ...(ifaceArgs.length ? [setIface] : []),
    ];
  }
  const cmds: string[][] = [];
  const portArgs: string[] = [];
  if (o.tag !== d.tag) portArgs.push(`tag=${d.tag}`);
  if (o.protected !== d.protected) portArgs.push(`protected=${d.protected}`);
  for (const [k, v] of Object.entries(d.externalIds)) {
    if (o.externalIds[k] !== v) portArgs.push(`external_ids:${k}=${vsctlValue(v)}`);
  }
  if (portArgs.length) cmds.push(['set', 'Port', d.name, ...portArgs]);
  const typeOrOptionsDiffer = (o.type || '') !== (d.type || '') || !sameMap(o.options, d.options);
  if (typeOrOptionsDiffer) cmds.push(['clear', 'Interface', d.name, 'options']);
  const iArgs: string[] = [];
  if (typeOrOptionsDiffer) {
    if (d.type) iArgs.push(`type=${d.type}`);
    for (const [k, v] of Object.entries(d.options)) iArgs.push(`options:${k}=${vsctlValue(v)}`);
  }
  for (const [k, v] of Object.entries(d.ifaceExternalIds)) {
    if (o.ifaceExternalIds[k] !== v) iArgs.push(`external_ids:${k}=${vsctlValue(v)}`);
  }
  if (d.mtuRequest !== undefined && o.mtuRequest !== d.mtuRequest) iArgs.push(`mtu_request=${d.mtuRequest}`);
  if (iArgs.length) cmds.push(['set', 'Interface', d.name, ...iArgs]);
  return cmds;
}

/** Whether a br-int port belongs to Stratus: its ownership marker (external_ids), never its name alone. */
export function isStratusOvsPort(p: ObservedOvsPort): boolean {
  return p.externalIds[EXT.kind] !== undefined;
}

/**
 * The networks wired on the node, by uid, from br-int's marked ports: the VNI from a tunnel port (`stratus-vni`) or
 * the DHCP port's name (`std-<vni>`), the MTU from a VIF port's `mtu_request`. Networks whose VNI or MTU cannot be
 * read are left out. Pure.
 */
export function observedOvsNetworks(ports: readonly ObservedOvsPort[]): Map<string, { vni: number; mtu: number }> {
  const vnis = new Map<string, number>();
  const mtus = new Map<string, number>();
  for (const p of ports) {
    const net = p.externalIds[EXT.net];
    if (!net) continue;
    const kind = p.externalIds[EXT.kind];
    if (kind === 'tunnel' && /^\d+$/.test(p.externalIds[EXT.vni] ?? '')) vnis.set(net, Number(p.externalIds[EXT.vni]));
    if (
      kind === 'dhcp' &&
      p.name.startsWith(DEVICE_PREFIX.dhcp) &&
      /^\d+$/.test(p.name.slice(DEVICE_PREFIX.dhcp.length))
    )
      vnis.set(net, Number(p.name.slice(DEVICE_PREFIX.dhcp.length)));
    if ((kind === 'vif' || kind === 'dhcp') && p.mtuRequest) mtus.set(net, p.mtuRequest);
  }
  const out = new Map<string, { vni: number; mtu: number }>();
  for (const [net, vni] of vnis) {
    const mtu = mtus.get(net);
    if (vni > 0 && mtu) out.set(net, { vni, mtu });
  }
  return out;
}

/** ifalias ownership marker of the devices of a port (tap, per-port bridge, veth ends). */
export function portDeviceAlias(portId: string): string {
  return `stratus:port=${portId}`;
}

/** Whether a link is a device of the hybrid plug or a tap that the agent made (name prefix, kind and marker). */
function isOwnDevice(l: ObservedLink): boolean {
  const p = DEVICE_PREFIX;
  const kindOk =
    (l.name.startsWith(p.hybridBridge) && l.kind === 'bridge') ||
    ((l.name.startsWith(p.hybridBridgePort) || l.name.startsWith(p.hybridOvsPort)) && l.kind === 'veth') ||
    (l.name.startsWith(p.tap) && l.kind === 'tun');
  return kindOk && !!l.alias?.startsWith('stratus:port=');
}

export interface ApplyPlan {
  steps: Step[];
  vlans: Map<string, number>;
  /** Conntrack zone per port id. */
  zones: Map<string, number>;
  /** Ports of the plan that cannot be wired at all (reason), e.g. their network is missing from the plan. */
  invalid: Map<string, string>;
}

/** Per-port bridge attributes: no STP delay; br_netfilter passes its traffic to the security-group table. */
const BRIDGE_ATTRS = ['stp_state', '0', 'forward_delay', '0', 'nf_call_iptables', '1', 'nf_call_ip6tables', '1'];

/** The commands that make the node match the plan (pure). */
export function planApply(plan: NodeNetworkPlan, obs: Observed, cfg: PlanConfig): ApplyPlan {
  const br = cfg.integrationBridge;
  const steps: Step[] = [];
  const invalid = new Map<string, string>();
  const nets = new Map(plan.networks.map((n) => [n.id, n]));
  const vlans = allocateLocalVlans(plan.networks, obs.ports, br);
  const zones = allocateZones(
    plan.ports.map((p) => p.id),
    obs.ports,
  );
  const links = new Map(obs.links.map((l) => [l.name, l]));
  const ovsPorts = new Map(obs.ports.map((p) => [p.name, p]));
  const ip = (args: string[], change: string, port?: string) => steps.push({ cmd: 'ip', args, change, port });
  const vs = (cmds: string[][], change: string, extra: { port?: string; net?: string } = {}) =>
    steps.push({ cmd: 'ovs-vsctl', args: cfg.vsctl(cmds), change, ...extra });

  // Desired OVS ports (tunnels and VIFs) and Linux devices.
  const desiredOvs = new Map<string, DesiredOvsPort & { net: string; port?: string }>();
  for (const n of plan.networks) {
    const vlan = vlans.get(n.id)!;
    const names: string[] = [];
    for (const peer of [...new Set(n.peers)].filter((p) => p !== plan.hostIP).sort()) {
      const name = tunnelName(n.vni, peer);
      names.push(name);
      desiredOvs.set(name, {
        name,
        net: n.id,
        tag: vlan,
        protected: true,
        externalIds: {
          [EXT.kind]: 'tunnel',
          [EXT.net]: n.id,
          [EXT.localVlan]: String(vlan),
          [EXT.remote]: peer,
          [EXT.vni]: String(n.vni),
        },
        type: 'vxlan',
        options: {
          remote_ip: peer,
          local_ip: plan.hostIP,
          key: String(n.vni),
          dst_port: String(VXLAN_PORT),
        },
        ifaceExternalIds: {},
      });
    }
  }
  const keep = new Set(plan.networks.filter((n) => cfg.dhcpNetworks?.has(n.id)).map((n) => dhcpHostDevice(n.vni)));
  const desiredLinks = new Set<string>();
  const localPorts: { p: PortPlan; n: NetworkPlan }[] = [];
  for (const p of plan.ports) {
    const n = nets.get(p.networkId);
    if (!n) {
      invalid.set(p.id, `network ${p.networkId} is not in the node plan`);
      continue;
    }
    localPorts.push({ p, n });
    const { qbr, qvb, qvo } = hybridNames(p.id);
    for (const d of [p.device, qbr, qvb, qvo]) desiredLinks.add(d);
    const vlan = vlans.get(n.id)!;
    desiredOvs.set(qvo, {
      name: qvo,
      net: n.id,
      port: p.id,
      tag: p.adminStateUp && n.adminStateUp ? vlan : DEAD_VLAN,
      protected: false,
      externalIds: {
        [EXT.kind]: 'vif',
        [EXT.net]: n.id,
        [EXT.port]: p.id,
        [EXT.localVlan]: String(vlan),
        [EXT.zone]: String(zones.get(p.id)),
      },
      type: '',
      options: {},
      ifaceExternalIds: { [EXT.ifaceId]: p.id, [EXT.attachedMac]: p.mac },
      mtuRequest: n.mtu,
    });
  }

  // Taps the plan lost that a process (QEMU) still holds open: they keep their whole plug (per-port bridge, veth,
  // br-int port), so a guest never loses its NIC because of a transient plan.
  const inUse = new Set(
    obs.links
      .filter((l) => !desiredLinks.has(l.name) && l.name.startsWith(DEVICE_PREFIX.tap) && isOwnDevice(l) && l.carrier)
      .map((l) => l.name.slice(DEVICE_PREFIX.tap.length)),
  );
  const heldOpen = (name: string) => inUse.has(name.slice(DEVICE_PREFIX.tap.length));
  // 1. Stale OVS ports on the integration bridge (before their devices go): only ports with our marker.
  for (const o of obs.ports) {
    if (o.bridge !== br || !isStratusOvsPort(o) || desiredOvs.has(o.name) || keep.has(o.name)) continue;
    if (o.externalIds[EXT.kind] === 'vif' && heldOpen(o.name)) continue;
    const what = o.externalIds[EXT.kind] === 'tunnel' ? `tunnel to ${o.options.remote_ip ?? '?'}` : 'port';
    vs([['--if-exists', 'del-port', br, o.name]], `${br}: removed stale ${what} ${o.name}`);
  }
  // 2. Stale hybrid-plug devices and taps: only devices with our marker (a VM stand-in veth named like a tap, or a
  // device someone else made with our prefix, is not ours), and none of a tap still held open.
  const gone = new Set<string>();
  for (const l of obs.links) {
    if (desiredLinks.has(l.name) || gone.has(l.name)) continue;
    if (!isOwnDevice(l) || heldOpen(l.name)) continue;
    ip(['link', 'del', 'dev', l.name], `removed stale device ${l.name}`);
    gone.add(l.name);
    if (l.peer) gone.add(l.peer);
  }
  // 3. Tunnels first: the flood list is complete before a port goes live.
  for (const [name, d] of desiredOvs) {
    if (d.port) continue;
    const cmds = ovsPortCommands(d, ovsPorts.get(name), br, false);
    if (cmds.length) {
      const verb = ovsPorts.get(name)?.bridge === br ? 'updated' : 'added';
      vs(cmds, `${br}: ${verb} tunnel ${name} to ${d.options.remote_ip} (VNI ${d.options.key}, VLAN ${d.tag})`, {
        net: d.net,
      });
    }
  }
  // 4. Ports: tap, per-port bridge, veth, br-int access port.
  for (const { p, n } of localPorts) {
    const { qbr, qvb, qvo } = hybridNames(p.id);
    const mtu = String(n.mtu);
    const label = `port ${p.namespace}/${p.name}`;
    const tap = links.get(p.device);
    if (!tap)
      ip(['tuntap', 'add', 'dev', p.device, 'mode', 'tap', 'vnet_hdr'], `${label}: created tap ${p.device}`, p.id);
    const bridge = links.get(qbr);
    const bridgeOk = bridge?.kind === 'bridge';
    if (bridge && !bridgeOk) ip(['link', 'del', 'dev', qbr], `${label}: removed ${qbr} (not a bridge)`, p.id);
    if (!bridgeOk) {
      ip(
        ['link', 'add', 'name', qbr, 'mtu', mtu, 'type', 'bridge', ...BRIDGE_ATTRS],
        `${label}: created bridge ${qbr}`,
        p.id,
      );
    } else if (bridge.stpState !== 0 || bridge.forwardDelay !== 0 || !bridge.nfCall) {
      ip(
        ['link', 'set', 'dev', qbr, 'type', 'bridge', ...BRIDGE_ATTRS],
        `${label}: ${qbr} stp off, br_netfilter on`,
        p.id,
      );
    }
    const alias = portDeviceAlias(p.id);
    const b = bridgeOk ? bridge : undefined;
    if (!b?.up || b.mtu !== n.mtu || b.alias !== alias) {
      ip(['link', 'set', 'dev', qbr, 'mtu', mtu, 'alias', alias, 'up'], `${label}: ${qbr} mtu ${mtu} up`, p.id);
    }
    const vb = links.get(qvb);
    const vo = links.get(qvo);
    const vethOk = vb?.kind === 'veth' && vb.peer === qvo && vo?.kind === 'veth';
    if (!vethOk) {
      if (vb) ip(['link', 'del', 'dev', qvb], `${label}: removed broken ${qvb}`, p.id);
      if (vo && vb?.peer !== qvo) ip(['link', 'del', 'dev', qvo], `${label}: removed broken ${qvo}`, p.id);
      ip(
        ['link', 'add', 'name', qvb, 'mtu', mtu, 'type', 'veth', 'peer', 'name', qvo, 'mtu', mtu],
        `${label}: created veth ${qvb}/${qvo}`,
        p.id,
      );
    }
    // every device the agent makes carries the port's marker (stale removal requires it); a device with the tap's
    // name that the agent did not make (a VM stand-in) is used as is and not marked
    const setMember = (dev: string, l: ObservedLink | undefined, master: string | undefined, mark: boolean) => {
      const aliasOk = !mark || l?.alias === alias;
      if (l?.up && l.mtu === n.mtu && (master === undefined || l.master === master) && aliasOk) return;
      ip(
        [
          'link',
          'set',
          'dev',
          dev,
          ...(master ? ['master', master] : []),
          'mtu',
          mtu,
          ...(mark ? ['alias', alias] : []),
          'up',
        ],
        `${label}: ${dev}${master ? ` in ${master}` : ''} mtu ${mtu} up`,
        p.id,
      );
    };
    setMember(qvb, vethOk ? vb : undefined, qbr, true);
    setMember(qvo, vethOk ? vo : undefined, undefined, true);
    setMember(p.device, tap, qbr, !tap || tap.kind === 'tun');
    if (cfg.datapathType === 'netdev' && (!vethOk || vb.txChecksum !== false)) {
      steps.push({
        cmd: 'ethtool',
        args: ['-K', qvb, 'tx', 'off'],
        change: `${label}: ${qvb} tx checksum offload off`,
        port: p.id,
      });
    }
    const d = desiredOvs.get(qvo)!;
    const cmds = ovsPortCommands(d, ovsPorts.get(qvo), br, !vethOk);
    if (cmds.length) vs(cmds, `${label}: ${br} port ${qvo} VLAN ${d.tag}`, { port: p.id });
  }
  return { steps, vlans, zones, invalid };
}

// ---------------------------------------------------------------------------------------------------------------
// Underlay on br-phy (userspace datapath)

export interface IpAddr {
  local: string;
  prefixlen: number;
  family: string;
  scope?: string;
}

export interface IpRoute {
  dst: string;
  gateway?: string;
  protocol?: string;
  metric?: number;
  prefsrc?: string;
}

/**
 * The commands that move the underlay's IPv4 addresses and routes onto the tunnel bridge (pure): add each address to
 * the bridge, move non-connected routes (ip route replace ... dev <bridge>), then drop the address from the device.
 * Every step is idempotent, so a restart in the middle converges.
 */
export function planUnderlayMove(
  device: string,
  bridge: string,
  devAddrs: readonly IpAddr[],
  bridgeAddrs: readonly IpAddr[],
  devRoutes: readonly IpRoute[],
): string[][] {
  const cmds: string[][] = [];
  const v4 = (a: IpAddr) => a.family === 'inet' && (a.scope ?? 'global') === 'global';
  const onBridge = new Set(bridgeAddrs.filter(v4).map((a) => `${a.local}/${a.prefixlen}`));
  const moving = devAddrs.filter(v4).map((a) => `${a.local}/${a.prefixlen}`);
  for (const a of moving) if (!onBridge.has(a)) cmds.push(['addr', 'add', a, 'dev', bridge]);
  for (const r of devRoutes) {
    if (r.protocol === 'kernel' || !r.gateway) continue;
    cmds.push([
      'route',
      'replace',
      r.dst,
      'via',
      r.gateway,
      'dev',
      bridge,
      ...(r.metric !== undefined ? ['metric', String(r.metric)] : []),
      ...(r.protocol && r.protocol !== 'boot' ? ['proto', r.protocol] : []),
    ]);
  }
  for (const a of moving) cmds.push(['addr', 'del', a, 'dev', device]);
  return cmds;
}

// ---------------------------------------------------------------------------------------------------------------
// The backend

export interface OvsBackendOptions {
  exec: Exec;
  /** ovs-vsctl --db target (unix:/path/db.sock); undefined: the system database. */
  db?: string;
  /** Datapath of the bridges: 'system' (kernel module) or 'netdev' (userspace; CI). Default 'system'. */
  datapathType?: 'netdev' | 'system';
  /** Underlay device whose address becomes the tunnel endpoint on br-phy (netdev); default: the one with hostIP. */
  underlayDevice?: string;
  /** The node's underlay address (finds the underlay device when underlayDevice is not given). */
  hostIP?: string;
  /** Default br-int. */
  integrationBridge?: string;
  /** Bridge holding the underlay device and address with the userspace datapath. Default br-phy. */
  tunnelBridge?: string;
  logger?: Logger;
  /** Plain-text log sink, used when no logger is given. */
  log?: (msg: string) => void;
  /** DHCP servers (dhcp.ts; default on). */
  dhcp?: boolean;
  /** Prefix of DHCP namespace names; unique per node when several simulated nodes share a host. */
  dhcpNetnsPrefix?: string;
  /** Directory for dnsmasq files (default /run/stratus/network/<netns|host>). */
  runDir?: string;
  /** Exec in the host's mount namespace for `ip netns add|del|exec` (default: hostExec()). */
  nsExec?: Exec;
  /** nftables table names (default nft.ts DEFAULT_TABLES). */
  tables?: { bridge: string; inet: string };
}

/** What the backend logs to (a pino Logger fits). */
interface LogSink {
  info(obj: object | string, msg?: string): void;
  warn(obj: object | string, msg?: string): void;
  error(obj: object | string, msg?: string): void;
}

function textSink(log: (msg: string) => void): LogSink {
  const f = (obj: object | string, msg?: string) =>
    log(typeof obj === 'string' ? obj : `${msg ?? ''} ${JSON.stringify(obj)}`.trim());
  return { info: f, warn: f, error: f };
}

/** Open vSwitch backend: hybrid plug (tap -> stq- bridge -> veth -> br-int), VXLAN per network and peer. */
export class OvsBackend implements NetworkBackend {
  readonly name = 'ovs' as const;
  readonly vifType: VifType = 'ovs';
  readonly vsctl: OvsVsctl;
  readonly exec: Exec;
  readonly datapathType: 'netdev' | 'system';
  readonly integrationBridge: string;
  readonly tunnelBridge: string;
  readonly #opts: OvsBackendOptions;
  readonly #nsExec: Exec;
  readonly #nft: NftManager;
  readonly #dhcp: DhcpManager | undefined;
  readonly #log: LogSink | undefined;
  /** Why security groups cannot be enforced (br_netfilter missing), if so. */
  #sgUnavailable: string | undefined;

  constructor(opts: OvsBackendOptions) {
    this.#opts = opts;
    this.exec = opts.exec;
    this.#log = opts.logger ?? (opts.log ? textSink(opts.log) : undefined);
    this.#nsExec = opts.nsExec ?? hostExec();
    this.vsctl = new OvsVsctl({ exec: opts.exec, db: opts.db });
    this.datapathType = opts.datapathType ?? 'system';
    this.integrationBridge = opts.integrationBridge ?? 'br-int';
    this.tunnelBridge = opts.tunnelBridge ?? 'br-phy';
    this.#nft = new NftManager({ exec: opts.exec, logger: this.#log });
    this.#dhcp =
      opts.dhcp === false
        ? undefined
        : new DhcpManager({
            exec: opts.exec,
            nsExec: this.#nsExec,
            netnsPrefix: opts.dhcpNetnsPrefix ?? dhcpDefaults(opts.exec).netnsPrefix,
            runDir: opts.runDir ?? dhcpDefaults(opts.exec).runDir,
            logger: this.#log,
          });
  }

  async #bridges(): Promise<ObservedBridge[]> {
    const [b, p, i] = await this.vsctl.list([
      { table: 'Bridge', columns: ['_uuid', 'name', 'datapath_type', 'fail_mode', 'ports'] },
      { table: 'Port', columns: ['_uuid', 'name'] },
      { table: 'Interface', columns: ['name'] },
    ]);
    return parseOvsState(b!, p!, i!).bridges;
  }

  /** Creates a bridge, or fixes its datapath and fail mode. */
  async #ensureBridge(name: string, bridges: ObservedBridge[]): Promise<void> {
    const b = bridges.find((x) => x.name === name);
    const attrs = [`datapath_type=${this.datapathType}`, 'fail_mode=standalone'];
    if (!b) {
      await this.vsctl.run([
        ['--may-exist', 'add-br', name],
        ['set', 'Bridge', name, ...attrs],
      ]);
    } else if (b.datapathType !== this.datapathType || b.failMode !== 'standalone') {
      await this.vsctl.run([['set', 'Bridge', name, ...attrs]]);
    } else return;
    this.#log?.info(`${name}: datapath ${this.datapathType}, fail_mode standalone`);
  }

  async #ip<T>(args: string[]): Promise<T> {
    const { stdout } = await this.exec.run('ip', ['-j', ...args]);
    return JSON.parse(stdout || '[]') as T;
  }

  async #underlayDevice(): Promise<string> {
    if (this.#opts.underlayDevice) return this.#opts.underlayDevice;
    const ip = this.#opts.hostIP;
    if (!ip) throw new Error('OVS backend: underlayDevice or hostIP is required with datapath netdev');
    const addrs = await this.#ip<{ ifname: string; addr_info: IpAddr[] }[]>(['addr', 'show']);
    const dev = addrs.find((d) => d.addr_info.some((a) => a.local === ip))?.ifname;
    if (!dev) throw new Error(`OVS backend: no device has the host address ${ip}`);
    if (dev !== this.tunnelBridge) return dev;
    // Already moved: the underlay is br-phy's non-internal port.
    const b = (await this.#bridges()).find((x) => x.name === this.tunnelBridge);
    const port = b?.ports.find((p) => p !== this.tunnelBridge);
    if (!port) throw new Error(`OVS backend: ${this.tunnelBridge} holds ${ip} but no underlay port`);
    return port;
  }

  /**
   * Turns on br_netfilter's calls into the inet hooks (security groups), creates br-int and, for the userspace
   * datapath, br-phy with the underlay device as a port and the underlay address and routes moved onto it.
   */
  async init(): Promise<void> {
    const problems: string[] = [];
    for (const key of ['net.bridge.bridge-nf-call-iptables', 'net.bridge.bridge-nf-call-ip6tables']) {
      try {
        const cur = (await this.exec.run('sysctl', ['-n', key])).stdout.trim();
        if (cur !== '1') await this.exec.run('sysctl', ['-qw', `${key}=1`]);
      } catch (e) {
        problems.push(`${key}: ${(e as Error).message.trim()}`);
      }
    }
    this.#sgUnavailable = problems.length
      ? `security groups cannot be enforced: br_netfilter is not available (${problems.join('; ')})`
      : undefined;
    if (this.#sgUnavailable) this.#log?.error(this.#sgUnavailable);

    const bridges = await this.#bridges();
    await this.#ensureBridge(this.integrationBridge, bridges);
    if (this.datapathType !== 'netdev') return;
    const dev = await this.#underlayDevice();
    const phy = this.tunnelBridge;
    await this.#ensureBridge(phy, bridges);
    const b = bridges.find((x) => x.name === phy);
    if (!b?.ports.includes(dev)) {
      await this.vsctl.run([['--may-exist', 'add-port', phy, dev]]);
      this.#log?.info(`${phy}: added underlay ${dev}`);
    }
    const [link] = await this.#ip<{ mtu: number }[]>(['link', 'show', 'dev', dev]);
    const [phyLink] = await this.#ip<{ mtu: number; flags: string[] }[]>(['link', 'show', 'dev', phy]);
    if (link && phyLink && (phyLink.mtu !== link.mtu || !phyLink.flags.includes('UP'))) {
      await this.exec.run('ip', ['link', 'set', 'dev', phy, 'mtu', String(link.mtu), 'up']);
    }
    const addrsOf = async (d: string) =>
      (await this.#ip<{ addr_info: IpAddr[] }[]>(['addr', 'show', 'dev', d]))[0]?.addr_info ?? [];
    const routes = await this.#ip<IpRoute[]>(['route', 'show', 'dev', dev]);
    const cmds = planUnderlayMove(dev, phy, await addrsOf(dev), await addrsOf(phy), routes);
    for (const c of cmds) await this.exec.run('ip', c);
    if (cmds.length) this.#log?.info(`${phy}: moved the underlay address of ${dev}`);
  }

  /** Reads OVSDB, links and (userspace datapath) the stv- veths' checksum offload. */
  async observe(): Promise<Observed> {
    const [b, p, i] = await this.vsctl.list([
      { table: 'Bridge', columns: ['_uuid', 'name', 'datapath_type', 'fail_mode', 'ports'] },
      { table: 'Port', columns: ['_uuid', 'name', 'tag', 'protected', 'external_ids'] },
      { table: 'Interface', columns: ['name', 'type', 'options', 'external_ids', 'mtu_request', 'ofport', 'error'] },
    ]);
    const ovs = parseOvsState(b!, p!, i!);
    const { stdout } = await this.exec.run('ip', ['-j', '-d', 'link', 'show']);
    const links = parseLinks(stdout);
    if (this.datapathType === 'netdev') {
      for (const l of links) {
        if (!l.name.startsWith(DEVICE_PREFIX.hybridBridgePort) || l.kind !== 'veth') continue;
        try {
          l.txChecksum = parseTxChecksum((await this.exec.run('ethtool', ['--json', '-k', l.name])).stdout);
        } catch {
          // gone meanwhile: the plan recreates or ignores it
        }
      }
    }
    return { ...ovs, links };
  }

  async apply(plan: NodeNetworkPlan): Promise<ApplyResult> {
    const obs = await this.observe();
    const dhcpNetworks = new Set(
      this.#dhcp ? plan.networks.filter((n) => servedSubnets(n).length > 0).map((n) => n.id) : [],
    );
    const { steps, invalid, vlans, zones } = planApply(plan, obs, {
      integrationBridge: this.integrationBridge,
      datapathType: this.datapathType,
      vsctl: (c) => this.vsctl.args(c),
      dhcpNetworks,
    });
    const failed = new Map<string, string>(invalid);
    const failedNets = new Map<string, string>();
    const changes: string[] = [];
    for (const s of steps) {
      if (s.port && failed.has(s.port)) continue;
      try {
        await this.exec.run(s.cmd, s.args, { timeoutMs: 60_000 });
        changes.push(s.change);
      } catch (e) {
        const msg = `${s.change}: ${(e as Error).message}`;
        changes.push(`FAILED ${msg}`);
        if (s.port) failed.set(s.port, msg);
        if (s.net) failedNets.set(s.net, msg);
      }
    }
    // After changes, check that ovs-vswitchd opened every VIF port.
    const after = steps.length ? await this.observe() : obs;
    const ovsByName = new Map(after.ports.map((p) => [p.name, p]));
    const nets = new Map(plan.networks.map((n) => [n.id, n]));
    const ports: Record<string, PortResult> = {};
    for (const p of plan.ports) {
      const f = failed.get(p.id) ?? failedNets.get(p.networkId);
      if (f) {
        ports[p.id] = { ready: false, message: f };
        continue;
      }
      const o = ovsByName.get(hybridNames(p.id).qvo);
      if (!o || o.error || (o.ofport !== undefined && o.ofport < 0)) {
        ports[p.id] = { ready: false, message: `${this.integrationBridge} port: ${o?.error ?? 'not attached'}` };
        continue;
      }
      const up = p.adminStateUp && nets.get(p.networkId)?.adminStateUp;
      ports[p.id] = up ? { ready: true } : { ready: true, message: 'administratively down' };
    }

    // Security groups and anti-spoofing: the tap is a port of its own stq- bridge, one conntrack zone per port.
    // No L2 drops: the DHCP port is protected, so the per-node DHCP servers never meet over the tunnels.
    const wired = plan.ports.filter((p) => !invalid.has(p.id));
    const rendered = renderRules({
      ports: wired.map((p) => ({ port: p, device: p.device, bridge: hybridNames(p.id).qbr, zone: zones.get(p.id)! })),
      securityGroups: plan.securityGroups,
      tables: this.#opts.tables,
    });
    changes.push(...(await this.#nft.applyForPorts(rendered, wired, ports, this.#sgUnavailable)));

    // DHCP: dhcp.ts runs the servers; their veth joins br-int here (attach).
    if (this.#dhcp) {
      const dhcp = this.#dhcp;
      const served = plan.networks.filter((n) => dhcpNetworks.has(n.id) && !failedNets.has(n.id));
      changes.push(
        ...(await dhcp.reconcileForPorts(served, wired, ports, (n, dev) =>
          this.#attachDhcp(dev, dhcpOvsPort(n, vlans.get(n.id)!), ovsByName.get(dev), dhcp.netnsName(n.vni)),
        )),
      );
    }
    if (changes.length) this.#log?.info({ changes }, 'network data plane changed');
    return { ports, changes };
  }

  /**
   * Plugs a DHCP namespace's veth into br-int (called by dhcp.ts on every reconcile; idempotent). Userspace datapath:
   * the namespace end sends UDP with partial checksums, which ovs-vswitchd does not complete: TX offload off there.
   */
  async #attachDhcp(dev: string, d: DesiredOvsPort, o: ObservedOvsPort | undefined, netns: string): Promise<string[]> {
    const changes: string[] = [];
    const cmds = ovsPortCommands(d, o, this.integrationBridge, false);
    if (cmds.length) {
      await this.vsctl.run(cmds);
      changes.push(`${this.integrationBridge}: DHCP port ${dev} VLAN ${d.tag}`);
    }
    if (this.datapathType === 'netdev') {
      const ethtool = (args: string[]) => this.#nsExec.run('ip', ['netns', 'exec', netns, 'ethtool', ...args]);
      if (parseTxChecksum((await ethtool(['--json', '-k', DHCP_NS_DEVICE])).stdout) !== false) {
        await ethtool(['-K', DHCP_NS_DEVICE, 'tx', 'off']);
        changes.push(`${netns}: ${DHCP_NS_DEVICE} tx checksum offload off`);
      }
    }
    return changes;
  }

  async observeNetworks(): Promise<Map<string, { vni: number; mtu: number }>> {
    return observedOvsNetworks((await this.observe()).ports);
  }

  async close(): Promise<void> {}
}
