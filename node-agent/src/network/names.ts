// Names of the host devices the network backends own. Linux limits interface names to 15 characters (IFNAMSIZ - 1);
// every name is a 4-character Stratus prefix plus an id (the way Neutron's agents use tap/brq/vxlan-). The prefix
// alone does not prove ownership: a backend removes only devices that also carry its ifalias marker.

/** Prefixes of every device kind (ownership also needs the device's ifalias marker, see the backends). */
export const DEVICE_PREFIX = {
  /** VM tap (Neutron tap<port11>). */
  tap: 'stt-',
  /** Per-network Linux bridge (Neutron brq<net11>). */
  bridge: 'stb-',
  /** Per-network VXLAN device (Neutron vxlan-<vni>). */
  vxlan: 'stx-',
  /** Bridge end of the DHCP namespace's veth. */
  dhcp: 'std-',
  /** OVS hybrid plug: per-port Linux bridge (Neutron qbr), its veth end in it (qvb) and in br-int (qvo). */
  hybridBridge: 'stq-',
  hybridBridgePort: 'stv-',
  hybridOvsPort: 'sto-',
} as const;

/** The id part: the first 11 characters of a uid, without dashes (uids are lower-case hex with dashes). */
export function shortId(uid: string): string {
  return uid.replaceAll('-', '').slice(0, 11);
}

/** The tap QEMU uses for a port. */
export function tapName(portUid: string): string {
  return `${DEVICE_PREFIX.tap}${shortId(portUid)}`;
}

/** The Linux bridge of a network on a node (by VNI: unique per cluster, at most 8 digits). */
export function bridgeName(vni: number): string {
  return `${DEVICE_PREFIX.bridge}${vni}`;
}

/** The VXLAN device of a network on a node. */
export function vxlanName(vni: number): string {
  return `${DEVICE_PREFIX.vxlan}${vni}`;
}

/** Whether a device name has a Stratus prefix (not proof of ownership: see the ifalias markers). */
export function isStratusDevice(name: string): boolean {
  return Object.values(DEVICE_PREFIX).some((p) => name.startsWith(p));
}
