// The node's network plan, computed from API objects (pure: no I/O, no clock). The network controller feeds it the
// informer caches; the result is what the backend wires (NodeNetworkPlan), which ports of which servers are local
// and usable, and the NICs a guest gets. Everything here is a function of its input, so it is unit-tested.
//
// Semantics (Neutron's ML2 + L2 agent, reduced):
//  - Local ports: for each Server bound to this node (label and status.node), each spec.networks[i] names a Port
//    (`port`, or serverPortName(server, i)). A port is usable once it exists in the server's namespace, carries the
//    device label naming the server, the operator's IPAM made it Ready (MAC and fixed IPs in status), and its Network
//    has a segmentation id and an MTU.
//  - Remote view (head-end replication, l2population): every other Port of the network (not one wired here) whose
//    status.bindingHost is another node with a known underlay address.
//  - Security groups of a port: spec.securityGroups ?? ['default'] (none without port security), by name in the
//    port's namespace; members of a group are all ports of the namespace that use it, on any node.
//  - Transient states never unwire a running guest: a Port being deleted stays wired while its server still claims
//    it (device label) and it was wired here (in the previous plan, or bound to this node); a Network whose status
//    temporarily lacks its segmentation id, MTU or subnets (being deleted, a partial status write) keeps the last
//    values this node wired (the previous plan, else what the backend observed on the node); so does a Port wired
//    here whose status lost its MAC, addresses or Ready condition.
import { isIP } from 'node:net';
import type { KubernetesObject } from '@kubernetes/client-node';
import { parseCidr } from '../../../operator/src/api/meta.ts';
import { PORT_BOUND, PORT_DEVICE_LABEL, PORT_READY, serverPortName } from '../../../operator/src/api/network.ts';
import type { GuestNetworkInterface } from '../driver.ts';
import type {
  NetworkPlan,
  NodeNetworkPlan,
  PortPlan,
  RemotePortPlan,
  SecurityGroupPlan,
  SecurityGroupRulePlan,
  SubnetPlan,
} from './backend.ts';
import { tapName } from './names.ts';

// ---- input shapes: the API objects as the informers hold them (raw JSON; every field may be missing) ----

interface CondLike {
  type: string;
  status: string;
}

export interface SubnetSpecObj {
  name: string;
  cidr: string;
  gatewayIP?: string;
  disableGateway?: boolean;
  dnsNameservers?: string[];
  hostRoutes?: { destination: string; nexthop: string }[];
  enableDHCP?: boolean;
}

export interface SubnetStatusObj {
  name: string;
  cidr: string;
  ipVersion?: number;
  gatewayIP?: string;
  /** Added by the operator's DHCP support; tolerated missing. */
  dhcpAddress?: string;
}

export interface NetworkObj extends KubernetesObject {
  spec?: { subnets?: SubnetSpecObj[]; adminStateUp?: boolean; portSecurityEnabled?: boolean; mtu?: number };
  status?: { segmentationID?: number; mtu?: number; subnets?: SubnetStatusObj[]; conditions?: CondLike[] };
}

export interface PortObj extends KubernetesObject {
  spec?: {
    network?: string;
    securityGroups?: string[];
    portSecurityEnabled?: boolean;
    allowedAddressPairs?: { ipAddress: string; macAddress?: string }[];
    adminStateUp?: boolean;
  };
  status?: {
    status?: string;
    macAddress?: string;
    fixedIPs?: { subnet: string; ipAddress: string }[];
    bindingHost?: string;
    vifType?: string;
    conditions?: CondLike[];
  };
}

export interface SecurityGroupObj extends KubernetesObject {
  spec?: {
    stateful?: boolean;
    rules?: {
      direction: 'ingress' | 'egress';
      ethertype?: 'IPv4' | 'IPv6';
      protocol?: string;
      portRangeMin?: number;
      portRangeMax?: number;
      remoteIPPrefix?: string;
      remoteGroup?: string;
    }[];
  };
}

export interface HypervisorObj extends KubernetesObject {
  status?: { hostIP?: string };
}

export interface ServerObj extends KubernetesObject {
  spec?: { networks?: { network?: string; port?: string; fixedIP?: string }[]; hostname?: string };
  status?: { node?: string };
}

export interface PlanInput {
  nodeName: string;
  /** This node's underlay address (falls back to its Hypervisor's status.hostIP). */
  hostIP?: string;
  /** Servers bound to this node (the caller's label-selected informer); others are ignored. */
  servers: readonly ServerObj[];
  networks: readonly NetworkObj[];
  ports: readonly PortObj[];
  securityGroups: readonly SecurityGroupObj[];
  hypervisors: readonly HypervisorObj[];
  /** The plan built before (the last good segmentation id, MTU and subnets of networks wired here; wired ports). */
  previous?: NodeNetworkPlan;
  /** Networks the backend found wired on the node (by network uid), for when there is no previous plan yet. */
  observed?: ReadonlyMap<string, { vni: number; mtu: number }>;
}

/** One spec.networks entry of a local server. */
export interface ServerPortEntry {
  index: number;
  portName: string;
  /** The Port, when it exists in the server's namespace. */
  port?: PortObj;
  /** Its Network, when it exists. */
  network?: NetworkObj;
  /** The PortPlan in the node plan (set exactly when the port is usable). */
  plan?: PortPlan;
  /** Why the port is not usable yet (undefined when usable). */
  waiting?: string;
}

export interface ServerNetworking {
  /** `namespace/name` of the server. */
  key: string;
  uid: string;
  entries: ServerPortEntry[];
}

export interface PlanResult {
  plan: NodeNetworkPlan;
  /** Local servers with at least one spec.networks entry, by key. */
  servers: Map<string, ServerNetworking>;
  /** Problems worth a log line (missing security groups, ports claimed twice...). */
  problems: string[];
}

const key = (namespace: string | undefined, name: string | undefined) => `${namespace ?? ''}/${name ?? ''}`;

function condTrue(conds: readonly CondLike[] | undefined, type: string): boolean {
  return conds?.some((c) => c.type === type && c.status === 'True') ?? false;
}

/** Whether a port runs with security groups and anti-spoofing (the port's setting, else its network's). */
export function portSecurityOf(port: PortObj, network: NetworkObj | undefined): boolean {
  return port.spec?.portSecurityEnabled ?? network?.spec?.portSecurityEnabled ?? true;
}

/** Names of the security groups applied to a port: spec.securityGroups ?? ['default'], none without port security. */
export function effectiveGroups(port: PortObj, network: NetworkObj | undefined): string[] {
  if (!portSecurityOf(port, network)) return [];
  return port.spec?.securityGroups ?? ['default'];
}

/** Addresses a port sends from: its fixed IPs and its allowed address pairs (IPs or CIDRs). */
export function portAddresses(port: PortObj): string[] {
  return [
    ...(port.status?.fixedIPs ?? []).map((f) => f.ipAddress),
    ...(port.spec?.allowedAddressPairs ?? []).map((p) => p.ipAddress),
  ];
}

/** IP version of a CIDR (4 when unparseable). */
function familyOf(cidr: string): 4 | 6 {
  return parseCidr(cidr)?.family === 6 ? 6 : 4;
}

/** The effective subnets of a network: spec subnets merged with what the operator reports in status. */
export function subnetPlans(network: NetworkObj): SubnetPlan[] {
  const reported = new Map((network.status?.subnets ?? []).map((s) => [s.name, s]));
  return (network.spec?.subnets ?? []).map((s) => {
    const st = reported.get(s.name);
    const ipVersion: 4 | 6 = st?.ipVersion === 6 || st?.ipVersion === 4 ? st.ipVersion : familyOf(s.cidr);
    const gatewayIP = s.disableGateway ? undefined : (st?.gatewayIP ?? s.gatewayIP);
    return {
      name: s.name,
      cidr: s.cidr,
      ipVersion,
      ...(gatewayIP ? { gatewayIP } : {}),
      dhcp: (s.enableDHCP ?? true) && ipVersion === 4,
      ...(st?.dhcpAddress ? { dhcpAddress: st.dhcpAddress } : {}),
      dnsNameservers: [...(s.dnsNameservers ?? [])],
      hostRoutes: (s.hostRoutes ?? []).map((r) => ({ destination: r.destination, nexthop: r.nexthop })),
    };
  });
}

/** Why a port cannot be wired yet, or undefined when it can. */
export function portWaitReason(
  portName: string,
  port: PortObj | undefined,
  network: NetworkObj | undefined,
  serverName: string,
  wiredHere = false,
): string | undefined {
  if (!port) return `port ${portName} does not exist yet`;
  // A port being deleted that its server still uses keeps its wiring (the operator keeps it with PortInUse until
  // the server releases it); it is not wired anew.
  if (port.metadata?.deletionTimestamp && !wiredHere) return `port ${portName} is being deleted`;
  const device = port.metadata?.labels?.[PORT_DEVICE_LABEL];
  if (device !== serverName) {
    return device
      ? `port ${portName} is used by server ${device}`
      : `port ${portName} is not claimed by the server yet (label ${PORT_DEVICE_LABEL})`;
  }
  if (!condTrue(port.status?.conditions, PORT_READY) || !port.status?.macAddress || !port.status.fixedIPs) {
    return `port ${portName} has no MAC and addresses yet (condition ${PORT_READY})`;
  }
  const netName = port.spec?.network ?? '';
  if (!network) return `network ${netName} of port ${portName} does not exist`;
  if (!network.status?.segmentationID || !network.status.mtu) {
    return `network ${netName} has no segmentation id and MTU yet`;
  }
  return undefined;
}

/** Whether a Network status holds everything the data plane needs (segmentation id, MTU, subnets). */
function statusComplete(n: NetworkObj): boolean {
  const st = n.status;
  return !!st?.segmentationID && !!st.mtu && (st.subnets !== undefined || (n.spec?.subnets ?? []).length === 0);
}

/**
 * The network as the plan uses it: when its status lacks the segmentation id, MTU or subnets (a network being
 * deleted, a partial status write), the last values this node wired fill the gap (the previous plan, else the
 * backend's observation), so a transient status never unwires running guests. A complete status is used as is.
 */
export function effectiveNetwork(
  n: NetworkObj,
  previous: NodeNetworkPlan | undefined,
  observed: ReadonlyMap<string, { vni: number; mtu: number }> | undefined,
): NetworkObj {
  if (statusComplete(n)) return n;
  const uid = n.metadata?.uid ?? '';
  const prev = previous?.networks.find((x) => x.id === uid);
  const seen = observed?.get(uid);
  const st = n.status ?? {};
  const vni = st.segmentationID || prev?.vni || seen?.vni;
  const mtu = st.mtu || prev?.mtu || seen?.mtu;
  const subnets =
    st.subnets ??
    prev?.subnets.map((s) => ({
      name: s.name,
      cidr: s.cidr,
      ipVersion: s.ipVersion,
      ...(s.gatewayIP ? { gatewayIP: s.gatewayIP } : {}),
      ...(s.dhcpAddress ? { dhcpAddress: s.dhcpAddress } : {}),
    }));
  return {
    ...n,
    status: {
      ...st,
      ...(vni ? { segmentationID: vni } : {}),
      ...(mtu ? { mtu } : {}),
      ...(subnets ? { subnets } : {}),
    },
  };
}

/**
 * The port as the plan uses it: a port wired here before (in the previous plan) whose status transiently lacks its
 * MAC, fixed IPs or Ready condition keeps the MAC and addresses it was wired with. A complete status is used as is.
 */
export function effectivePort(p: PortObj, previous: NodeNetworkPlan | undefined): PortObj {
  const st = p.status ?? {};
  if (condTrue(st.conditions, PORT_READY) && st.macAddress && st.fixedIPs) return p;
  const prev = previous?.ports.find((x) => x.id === p.metadata?.uid);
  if (!prev) return p;
  return {
    ...p,
    status: {
      ...st,
      macAddress: st.macAddress || prev.mac,
      fixedIPs: st.fixedIPs ?? prev.fixedIPs.map((f) => ({ subnet: f.subnet, ipAddress: f.ipAddress })),
      conditions: [...(st.conditions ?? []).filter((c) => c.type !== PORT_READY), { type: PORT_READY, status: 'True' }],
    },
  };
}

/** Builds the node's plan and the per-server view of its ports. */
export function buildPlan(input: PlanInput): PlanResult {
  const problems: string[] = [];
  const networks = new Map(
    input.networks.map((n) => [
      key(n.metadata?.namespace, n.metadata?.name),
      effectiveNetwork(n, input.previous, input.observed),
    ]),
  );
  const wiredBefore = new Set(input.previous?.ports.map((p) => p.id));
  const wiredHere = (p: PortObj | undefined) =>
    !!p && (wiredBefore.has(p.metadata?.uid ?? '') || p.status?.bindingHost === input.nodeName);
  const allPorts = input.ports.map((p) => effectivePort(p, input.previous));
  const ports = new Map(allPorts.map((p) => [key(p.metadata?.namespace, p.metadata?.name), p]));
  const groups = new Map(input.securityGroups.map((g) => [key(g.metadata?.namespace, g.metadata?.name), g]));
  const hostIPs = new Map<string, string>();
  for (const h of input.hypervisors) {
    if (h.metadata?.name && h.status?.hostIP) hostIPs.set(h.metadata.name, h.status.hostIP);
  }
  const hostIP = input.hostIP ?? hostIPs.get(input.nodeName) ?? '';
  const networkOf = (p: PortObj) => networks.get(key(p.metadata?.namespace, p.spec?.network));

  // 1. local servers and their ports
  const servers = new Map<string, ServerNetworking>();
  const localPorts: { port: PortObj; network: NetworkObj; server: ServerObj; entry: ServerPortEntry }[] = [];
  const claimed = new Set<string>();
  const sorted = [...input.servers].sort((a, b) =>
    key(a.metadata?.namespace, a.metadata?.name).localeCompare(key(b.metadata?.namespace, b.metadata?.name)),
  );
  for (const s of sorted) {
    const nets = s.spec?.networks ?? [];
    if (nets.length === 0 || s.status?.node !== input.nodeName) continue;
    const ns = s.metadata?.namespace;
    const name = s.metadata?.name ?? '';
    const sk = key(ns, name);
    const entries: ServerPortEntry[] = nets.map((n, index) => {
      const portName = n.port ?? serverPortName(name, index);
      const port = ports.get(key(ns, portName));
      const network = port && networkOf(port);
      const waiting = portWaitReason(portName, port, network, name, wiredHere(port));
      const e: ServerPortEntry = { index, portName };
      if (port) e.port = port;
      if (network) e.network = network;
      if (waiting) e.waiting = waiting;
      return e;
    });
    for (const e of entries) {
      if (e.waiting || !e.port || !e.network) continue;
      const uid = e.port.metadata?.uid ?? '';
      if (claimed.has(uid)) {
        problems.push(`port ${sk.split('/')[0]}/${e.portName} is named twice by local servers`);
        e.waiting = `port ${e.portName} is named twice`;
        continue;
      }
      claimed.add(uid);
      localPorts.push({ port: e.port, network: e.network, server: s, entry: e });
    }
    servers.set(sk, { key: sk, uid: s.metadata?.uid ?? '', entries });
  }

  // 2. security groups: members (cluster-wide, per namespace) and the groups local ports need
  const members = new Map<string, Set<string>>(); // group key -> addresses
  for (const p of allPorts) {
    // a port being deleted stays a member while a server still uses it (its guest still sends from its addresses)
    if (p.metadata?.deletionTimestamp && !p.metadata.labels?.[PORT_DEVICE_LABEL]) continue;
    const addrs = portAddresses(p);
    if (addrs.length === 0) continue;
    for (const g of effectiveGroups(p, networkOf(p))) {
      const gk = key(p.metadata?.namespace, g);
      const set = members.get(gk) ?? new Set<string>();
      members.set(gk, set);
      for (const a of addrs) set.add(a);
    }
  }
  const sgPlans = new Map<string, SecurityGroupPlan>(); // by group key
  const missing = new Set<string>();
  const includeGroup = (gk: string, followRemote: boolean): string | undefined => {
    const done = sgPlans.get(gk);
    if (done) return done.id;
    const g = groups.get(gk);
    if (!g?.metadata?.uid) {
      if (!missing.has(gk)) problems.push(`security group ${gk} does not exist: its ports get no rules from it`);
      missing.add(gk);
      return undefined;
    }
    const plan: SecurityGroupPlan = {
      id: g.metadata.uid,
      name: g.metadata.name ?? '',
      namespace: g.metadata.namespace ?? '',
      stateful: g.spec?.stateful ?? true,
      rules: [],
      memberIPs: sortAddresses([...(members.get(gk) ?? [])]),
    };
    sgPlans.set(gk, plan);
    for (const r of g.spec?.rules ?? []) {
      const rule: SecurityGroupRulePlan = { direction: r.direction, ethertype: r.ethertype ?? 'IPv4' };
      if (r.protocol !== undefined && r.protocol !== 'any') rule.protocol = r.protocol;
      if (r.portRangeMin !== undefined) rule.portRangeMin = r.portRangeMin;
      if (r.portRangeMax !== undefined) rule.portRangeMax = r.portRangeMax;
      if (r.remoteIPPrefix !== undefined) rule.remoteIPPrefix = r.remoteIPPrefix;
      if (r.remoteGroup !== undefined) {
        const rk = key(g.metadata.namespace, r.remoteGroup);
        const rid = rk === gk ? plan.id : followRemote ? includeGroup(rk, false) : groups.get(rk)?.metadata?.uid;
        if (!rid) {
          if (!followRemote && !missing.has(rk)) {
            problems.push(`security group ${rk} (remote group of ${gk}) does not exist: the rule matches nothing`);
            missing.add(rk);
          }
          continue; // a rule whose peers do not exist allows nothing
        }
        rule.remoteGroupId = rid;
      }
      plan.rules.push(rule);
    }
    return plan.id;
  };

  // 3. ports and networks of the plan
  const portPlans: PortPlan[] = [];
  const localNets = new Map<string, NetworkObj>(); // uid -> network
  for (const { port, network, server, entry } of localPorts) {
    const security = portSecurityOf(port, network);
    const sgIds: string[] = [];
    if (security) {
      for (const g of effectiveGroups(port, network)) {
        const id = includeGroup(key(port.metadata?.namespace, g), true);
        if (id && !sgIds.includes(id)) sgIds.push(id);
      }
    }
    const mac = (port.status?.macAddress ?? '').toLowerCase();
    const uid = port.metadata?.uid ?? '';
    const plan: PortPlan = {
      id: uid,
      name: port.metadata?.name ?? '',
      namespace: port.metadata?.namespace ?? '',
      networkId: network.metadata?.uid ?? '',
      device: tapName(uid),
      mac,
      fixedIPs: (port.status?.fixedIPs ?? []).map((f) => ({ subnet: f.subnet, ipAddress: f.ipAddress })),
      adminStateUp: port.spec?.adminStateUp ?? true,
      portSecurity: security,
      allowedAddressPairs: security
        ? (port.spec?.allowedAddressPairs ?? []).map((p) => ({
            ipAddress: p.ipAddress,
            macAddress: (p.macAddress ?? mac).toLowerCase(),
          }))
        : [],
      securityGroups: sgIds,
      hostname: server.spec?.hostname ?? server.metadata?.name ?? '',
    };
    entry.plan = plan;
    portPlans.push(plan);
    localNets.set(plan.networkId, network);
  }

  const networkPlans: NetworkPlan[] = [];
  for (const [id, n] of localNets) {
    const ns = n.metadata?.namespace;
    const peers = new Set<string>();
    const remotePorts: RemotePortPlan[] = [];
    for (const p of allPorts) {
      if (p.metadata?.namespace !== ns || p.spec?.network !== n.metadata?.name) continue;
      // A port wired here is local even while its binding still names its previous node (a migration or resize to
      // this node, before the old agent unbinds it): no FDB entry or flood peer sends its traffic there.
      if (claimed.has(p.metadata?.uid ?? '')) continue;
      const host = p.status?.bindingHost;
      if (!host || host === input.nodeName) continue;
      const ip = hostIPs.get(host);
      if (!ip || ip === hostIP) continue;
      peers.add(ip);
      if (p.status?.macAddress) {
        remotePorts.push({
          mac: p.status.macAddress.toLowerCase(),
          ips: (p.status.fixedIPs ?? []).map((f) => f.ipAddress),
          hostIP: ip,
        });
      }
    }
    networkPlans.push({
      id,
      name: n.metadata?.name ?? '',
      namespace: ns ?? '',
      vni: n.status?.segmentationID ?? 0,
      mtu: n.status?.mtu ?? 0,
      adminStateUp: n.spec?.adminStateUp ?? true,
      subnets: subnetPlans(n),
      peers: sortAddresses([...peers]),
      remotePorts: remotePorts.sort((a, b) => a.mac.localeCompare(b.mac)),
    });
  }
  networkPlans.sort((a, b) => a.vni - b.vni);
  portPlans.sort((a, b) => a.device.localeCompare(b.device));
  const securityGroups = [...sgPlans.values()].sort((a, b) => a.id.localeCompare(b.id));
  return { plan: { hostIP, networks: networkPlans, ports: portPlans, securityGroups }, servers, problems };
}

function sortAddresses(a: string[]): string[] {
  return [...new Set(a)].sort();
}

/** A stable fingerprint of what wiring a port means (the port plan and its network's plan without the peers). */
export function portFingerprint(plan: NodeNetworkPlan, portId: string): string | undefined {
  const p = plan.ports.find((x) => x.id === portId);
  if (!p) return undefined;
  const n = plan.networks.find((x) => x.id === p.networkId);
  return JSON.stringify([p, n && { vni: n.vni, mtu: n.mtu, adminStateUp: n.adminStateUp }]);
}

/** The NIC of a usable port: tap, MAC, MTU, addresses with prefixes, gateways, routes and DNS from its subnets. */
export function nicFor(port: PortPlan, network: NetworkObj): GuestNetworkInterface {
  const subnets = new Map(subnetPlans(network).map((s) => [s.name, s]));
  const addresses: string[] = [];
  const used: SubnetPlan[] = [];
  for (const f of port.fixedIPs) {
    const s = subnets.get(f.subnet);
    const prefix = s ? parseCidr(s.cidr)?.prefix : undefined;
    addresses.push(`${f.ipAddress}/${prefix ?? (isIP(f.ipAddress) === 6 ? 128 : 32)}`);
    if (s && !used.includes(s)) used.push(s);
  }
  const gateway = used.find((s) => s.ipVersion === 4 && s.gatewayIP)?.gatewayIP;
  const gateway6 = used.find((s) => s.ipVersion === 6 && s.gatewayIP)?.gatewayIP;
  const routes = used.flatMap((s) => s.hostRoutes.map((r) => ({ to: r.destination, via: r.nexthop })));
  const dns = [...new Set(used.flatMap((s) => s.dnsNameservers))].slice(0, 5);
  return {
    device: port.device,
    mac: port.mac,
    ...(network.status?.mtu ? { mtu: network.status.mtu } : {}),
    addresses,
    ...(gateway ? { gateway } : {}),
    ...(gateway6 ? { gateway6 } : {}),
    routes,
    dns,
    portId: port.id,
    ...(network.metadata?.uid ? { networkId: network.metadata.uid } : {}),
  };
}

/** The NICs of a local server in spec.networks order, or the reasons it has to wait. */
export function serverNics(
  s: ServerNetworking,
  isWired: (portId: string) => { ready: boolean; message?: string } | undefined,
): { nics: GuestNetworkInterface[] } | { waiting: string[] } {
  const waiting: string[] = [];
  const nics: GuestNetworkInterface[] = [];
  for (const e of s.entries) {
    if (e.waiting || !e.plan || !e.network) {
      waiting.push(e.waiting ?? `port ${e.portName} is not usable`);
      continue;
    }
    const w = isWired(e.plan.id);
    if (!w?.ready) {
      waiting.push(`port ${e.portName} is not wired on this node yet${w?.message ? `: ${w.message}` : ''}`);
      continue;
    }
    nics.push(nicFor(e.plan, e.network));
  }
  return waiting.length > 0 ? { waiting } : { nics };
}

/** What the node agent writes on a Port's status. */
export type BindingChange =
  | { kind: 'bind'; port: PortObj; ready: boolean; message?: string }
  | { kind: 'unbind'; port: PortObj };

/** The Bound condition (without time) a port bound here gets. */
export function boundCondition(
  nodeName: string,
  r: { ready: boolean; message?: string },
): { type: string; status: 'True' | 'False'; reason: string; message: string } {
  return r.ready
    ? { type: PORT_BOUND, status: 'True', reason: 'Wired', message: `wired on ${nodeName}` }
    : {
        type: PORT_BOUND,
        status: 'False',
        reason: 'WiringFailed',
        message: `not wired on ${nodeName} yet: ${r.message ?? 'not reported by the backend'}`.slice(0, 1024),
      };
}

const UNBOUND = (nodeName: string) => ({
  type: PORT_BOUND,
  status: 'False' as const,
  reason: 'Unbound',
  message: `no longer wired on ${nodeName}`,
});

/**
 * Port status changes after an apply: local ports of the plan are bound here (Bound True once wired, False while the
 * backend reports them not ready); ports still bound to this node that the plan no longer has are unbound.
 * Only ports whose status differs are returned. The agent writes only the binding (bindingHost, vifType, Bound):
 * status.status (ACTIVE/BUILD/DOWN) is the operator's, derived from it (docs/design/status-ownership.md).
 */
export function bindingChanges(
  nodeName: string,
  vifType: string,
  ports: readonly PortObj[],
  plan: NodeNetworkPlan,
  results: Readonly<Record<string, { ready: boolean; message?: string }>>,
): BindingChange[] {
  const local = new Set(plan.ports.map((p) => p.id));
  const out: BindingChange[] = [];
  for (const port of ports) {
    const uid = port.metadata?.uid ?? '';
    const st = port.status ?? {};
    if (local.has(uid)) {
      const r = results[uid] ?? { ready: false };
      const want = boundCondition(nodeName, r);
      const bound = st.conditions?.find((c) => c.type === PORT_BOUND) as (CondLike & Partial<typeof want>) | undefined;
      const same =
        st.bindingHost === nodeName &&
        st.vifType === vifType &&
        bound?.status === want.status &&
        bound.reason === want.reason &&
        bound.message === want.message;
      if (!same) out.push({ kind: 'bind', port, ready: r.ready, ...(r.message ? { message: r.message } : {}) });
    } else if (st.bindingHost === nodeName) {
      out.push({ kind: 'unbind', port });
    }
  }
  return out;
}

/**
 * The status mutation of a binding change, for updateStatus (re-run on the fresh object after a conflict).
 * An unbind only clears a binding that still names this node: the port's new node may have bound it already.
 * Returns undefined when there is nothing to write.
 */
export function bindingStatus(
  change: BindingChange,
  st: Record<string, unknown>,
  nodeName: string,
  vifType: string,
  setCond: (conds: unknown, c: { type: string; status: 'True' | 'False'; reason: string; message: string }) => unknown,
): Record<string, unknown> | undefined {
  if (change.kind === 'unbind') {
    if (st.bindingHost !== nodeName) return undefined;
    delete st.bindingHost;
    delete st.vifType;
    st.conditions = setCond(st.conditions, UNBOUND(nodeName));
    return st;
  }
  st.bindingHost = nodeName;
  st.vifType = vifType;
  st.conditions = setCond(st.conditions, boundCondition(nodeName, change));
  return st;
}
