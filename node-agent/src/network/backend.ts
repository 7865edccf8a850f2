// The network backend interface (Neutron's L2 agent drivers, reduced to what the node agent uses). The agent's
// network controller computes a NodeNetworkPlan from the API objects (Networks, Ports, SecurityGroups, Hypervisors)
// and hands the whole plan to backend.apply(); the backend makes the node match it and removes what it owns but
// the plan no longer has. A backend is one file under network/ plus one line in network/index.ts.
//
// Rules every backend follows:
//  - apply() is level-triggered and idempotent: it observes the kernel (ip -j, bridge -j, nft -j, ovs-vsctl
//    --format=json), changes only what differs, and never duplicates a device, FDB entry, flow or rule. Applying the
//    same plan twice changes nothing; after an agent restart, apply() adopts what is there without flapping it.
//  - It only touches objects it owns, recognised by name prefix (names.ts) and marker (ifalias, OVS external_ids).
//  - Anything it owns that the plan lacks is removed (stale taps, bridges, VXLAN devices, FDB entries, rules,
//    dnsmasq processes).
//  - Security groups are replaced atomically (one nft batch per table); a failed batch leaves the old rules.
//  - Every command runs through an Exec (exec.ts), so a backend works inside a network namespace (simulated nodes).

/** A subnet of a network as the node needs it (gateway, DHCP, routes for leases). */
export interface SubnetPlan {
  name: string;
  cidr: string;
  ipVersion: 4 | 6;
  gatewayIP?: string;
  /** Run a DHCP server for this subnet on this node (Subnet.enableDHCP; IPv4 only for now). */
  dhcp: boolean;
  /** Address the node's DHCP server answers from (Network status.subnets[].dhcpAddress); the same on every node. */
  dhcpAddress?: string;
  dnsNameservers: string[];
  hostRoutes: { destination: string; nexthop: string }[];
}

/** A network with at least one port on this node. */
export interface NetworkPlan {
  /** Network metadata.uid. */
  id: string;
  name: string;
  namespace: string;
  /** VXLAN network identifier (Network status.segmentationID). */
  vni: number;
  /** MTU of the network (Network status.mtu); set on bridge, VXLAN device, taps and given to guests. */
  mtu: number;
  adminStateUp: boolean;
  subnets: SubnetPlan[];
  /** Underlay addresses of the other nodes that have ports of this network (head-end replication list). */
  peers: string[];
  /** Ports of this network bound on other nodes (l2population: static FDB entries toward their node). */
  remotePorts: RemotePortPlan[];
}

export interface RemotePortPlan {
  mac: string;
  ips: string[];
  /** Underlay address of the node the port is bound on. */
  hostIP: string;
}

/** A port wired on this node. */
export interface PortPlan {
  /** Port metadata.uid. */
  id: string;
  name: string;
  namespace: string;
  /** NetworkPlan.id of its network. */
  networkId: string;
  /** Host-side device name (names.ts tapName). */
  device: string;
  /** Lower-case MAC. */
  mac: string;
  fixedIPs: { subnet: string; ipAddress: string }[];
  adminStateUp: boolean;
  /** Anti-spoofing and security groups on (false: the port forwards anything). */
  portSecurity: boolean;
  /** Extra addresses (IP or CIDR) the port may send from, with their MAC (defaults to the port MAC). */
  allowedAddressPairs: { ipAddress: string; macAddress: string }[];
  /** SecurityGroupPlan ids applied to the port (ignored when portSecurity is false). */
  securityGroups: string[];
  /** Host name for the DHCP lease (the server's hostname). */
  hostname?: string;
}

export interface SecurityGroupRulePlan {
  direction: 'ingress' | 'egress';
  ethertype: 'IPv4' | 'IPv6';
  /** Protocol name (tcp, udp, icmp, icmpv6, sctp...) or number as text; undefined: any. */
  protocol?: string;
  portRangeMin?: number;
  portRangeMax?: number;
  remoteIPPrefix?: string;
  /** SecurityGroupPlan id whose members' addresses are the peers. */
  remoteGroupId?: string;
}

export interface SecurityGroupPlan {
  /** SecurityGroup metadata.uid. */
  id: string;
  name: string;
  namespace: string;
  stateful: boolean;
  rules: SecurityGroupRulePlan[];
  /** Addresses (fixed IPs and allowed address pairs) of every port in the group, on any node. */
  memberIPs: string[];
}

/** Everything the node's data plane should have. */
export interface NodeNetworkPlan {
  /** This node's underlay address (VXLAN local address). */
  hostIP: string;
  networks: NetworkPlan[];
  ports: PortPlan[];
  /** Groups used by local ports, and groups their rules name as remote groups. */
  securityGroups: SecurityGroupPlan[];
}

export interface PortResult {
  /** The port is wired: device exists, attached, up, with its rules. */
  ready: boolean;
  message?: string;
}

export interface ApplyResult {
  /** Per PortPlan.id. */
  ports: Record<string, PortResult>;
  /** What changed, one human-readable line each (logged; empty when the node already matched the plan). */
  changes: string[];
}

export type VifType = 'bridge' | 'ovs' | 'noop';

export interface NetworkBackend {
  /** Backend name as Hypervisor status.networkBackend reports it. */
  readonly name: 'linuxbridge' | 'ovs' | 'noop';
  /** Port status.vifType of the ports it wires. */
  readonly vifType: VifType;
  /** Prepares the node (sysctls, base tables, OVS bridges); idempotent. */
  init(): Promise<void>;
  /** Makes the node match the plan (see the rules above). */
  apply(plan: NodeNetworkPlan): Promise<ApplyResult>;
  /**
   * The networks already wired on the node (by network uid: VNI and MTU read from the devices' ownership markers),
   * so a restarted agent keeps them while a Network's status is transiently incomplete. Optional.
   */
  observeNetworks?(): Promise<Map<string, { vni: number; mtu: number }>>;
  /** Stops background work (dnsmasq keeps running: guests keep their leases across agent restarts). */
  close(): Promise<void>;
}
