// OpenStack config drive (Nova nova/virt/configdrive.py, nova/api/metadata/base.py, nova/virt/netutils.py):
// an ISO 9660 volume labelled "config-2" with openstack/<version>/{meta_data.json,network_data.json,user_data}.
// We write one dated version, 2018-08-27, plus "latest" with the same content (cloud-init's ConfigDrive
// datasource reads "latest"). Not written: the ec2/ tree, vendor_data*.json, password, openstack/content/.
import { z } from 'zod';
import { type WriteIsoOptions, writeIso } from './iso.ts';
import { GuestNic, type GuestNicInput, splitCidr } from './nic.ts';
import { SeedKeyPair } from './nocloud.ts';

/** The dated metadata version we write (and everything before it that matters: network_data.json is 2015-10-15+). */
export const CONFIG_DRIVE_VERSION = '2018-08-27';
export const CONFIG_DRIVE_VOLID = 'config-2';

export const ConfigDriveInput = z.object({
  /** The Server uid. */
  uuid: z.string().min(1),
  /** Display name (the Server name). */
  name: z.string().min(1),
  /** Guest hostname; Nova appends ".<dhcp_domain>" (novalocal): pass the full name wanted. */
  hostname: z.string().min(1).max(253),
  availabilityZone: z.string().min(1).default('nova'),
  projectId: z.string().min(1).optional(),
  keyPair: SeedKeyPair.optional(),
  /** Server metadata (Nova "meta"). */
  metadata: z.record(z.string(), z.string()).default({}),
  userData: z.string().optional(),
  /** 512 random bytes, base64 (Nova random_seed). Optional so the output stays a pure function of the input. */
  randomSeed: z.string().optional(),
  nics: z.array(GuestNic).default([]),
  /** links[].type. Nova exposes the VIF type (bridge, ovs, tap, …) or "phy"; cloud-init treats all as physical. */
  linkType: z.string().min(1).default('bridge'),
});
export type ConfigDriveInput = z.input<typeof ConfigDriveInput>;

/** openstack/<version>/meta_data.json content (object), keys in Nova's order. */
export function metaDataJson(input: ConfigDriveInput): Record<string, unknown> {
  const s = ConfigDriveInput.parse(input);
  const md: Record<string, unknown> = { uuid: s.uuid };
  if (Object.keys(s.metadata).length > 0) md.meta = s.metadata;
  if (s.keyPair) {
    const key = s.keyPair.publicKey.trim();
    md.public_keys = { [s.keyPair.name]: key };
    md.keys = [{ name: s.keyPair.name, type: s.keyPair.type, data: key }];
  }
  md.hostname = s.hostname;
  md.name = s.name;
  md.launch_index = 0;
  md.availability_zone = s.availabilityZone;
  if (s.randomSeed !== undefined) md.random_seed = s.randomSeed;
  if (s.projectId !== undefined) md.project_id = s.projectId;
  md.devices = [];
  return md;
}

/**
 * openstack/<version>/network_data.json content (object), as Nova's get_network_metadata builds it: one link
 * per NIC; one network per address ("ipv4"/"ipv6" with ip_address, netmask, routes, network_id, services), or
 * "ipv4_dhcp" for a NIC without addresses; services = every DNS server once.
 */
export function networkDataJson(nicsInput: GuestNicInput[], linkType = 'bridge'): Record<string, unknown> {
  const nics = z.array(GuestNic).parse(nicsInput);
  const links: Record<string, unknown>[] = [];
  const networks: Record<string, unknown>[] = [];
  const services: { type: 'dns'; address: string }[] = [];
  let netNum = 0;
  nics.forEach((n, i) => {
    const linkId = n.linkName ?? `interface${i}`;
    links.push({
      id: linkId,
      ...(n.portId !== undefined ? { vif_id: n.portId } : {}),
      type: linkType,
      mtu: n.mtu ?? null,
      ethernet_mac_address: n.mac,
    });
    const networkId = n.networkId !== undefined ? { network_id: n.networkId } : {};
    if (n.addresses.length === 0) {
      networks.push({ id: `network${netNum++}`, type: 'ipv4_dhcp', link: linkId, ...networkId });
    }
    for (const a of n.addresses) {
      const c = splitCidr(a);
      const routes: { network: string; netmask: string; gateway: string }[] = [];
      const gw = c.family === 4 ? n.gateway : n.gateway6;
      if (gw)
        routes.push({
          network: c.family === 4 ? '0.0.0.0' : '::',
          netmask: c.family === 4 ? '0.0.0.0' : '::',
          gateway: gw,
        });
      for (const r of n.routes) {
        const rc = splitCidr(r.to);
        if (rc.family === c.family) routes.push({ network: rc.network, netmask: rc.netmask, gateway: r.via });
      }
      const dns = n.dns
        .filter((d) => (d.includes(':') ? 6 : 4) === c.family)
        .map((d) => ({ type: 'dns' as const, address: d }));
      networks.push({
        id: `network${netNum++}`,
        type: c.family === 4 ? 'ipv4' : 'ipv6',
        link: linkId,
        ip_address: c.address,
        netmask: c.netmask,
        routes,
        ...networkId,
        services: dns,
      });
    }
    for (const d of n.dns) if (!services.some((s) => s.address === d)) services.push({ type: 'dns', address: d });
  });
  return { links, networks, services };
}

const json = (v: unknown) => `${JSON.stringify(v, null, 2)}\n`;

/** Every file of the drive by path (relative to the ISO root). */
export function configDriveFiles(input: ConfigDriveInput): Record<string, string> {
  const s = ConfigDriveInput.parse(input);
  const md = json(metaDataJson(input));
  const nd = json(networkDataJson(input.nics ?? [], s.linkType));
  const files: Record<string, string> = {};
  for (const version of [CONFIG_DRIVE_VERSION, 'latest']) {
    files[`openstack/${version}/meta_data.json`] = md;
    files[`openstack/${version}/network_data.json`] = nd;
    if (s.userData !== undefined) files[`openstack/${version}/user_data`] = s.userData;
  }
  return files;
}

/** Build the config drive files and write them as an ISO labelled config-2 at `output`. Returns the files. */
export async function writeConfigDriveIso(
  input: ConfigDriveInput,
  output: string,
  options: Omit<WriteIsoOptions, 'volid'> = {},
): Promise<Record<string, string>> {
  const files = configDriveFiles(input);
  await writeIso(files, output, { ...options, volid: CONFIG_DRIVE_VOLID });
  return files;
}
