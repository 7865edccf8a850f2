// cloud-init NoCloud seed (https://docs.cloud-init.io, datasource NoCloud): a filesystem labelled "cidata"
// holding meta-data, user-data and optionally network-config (v2). Pure functions build the file contents;
// writeIso() in iso.ts makes the image.
//
// YAML is emitted by hand, every string scalar double-quoted as a JSON string (valid YAML): values that YAML 1.1
// would otherwise reinterpret stay strings, e.g. a MAC made only of digits (52:54:00:12:34:56 is a sexagesimal
// integer to YAML 1.1) or an address starting with "::".
import { z } from 'zod';
import { type WriteIsoOptions, writeIso } from './iso.ts';
import { GuestNic, type GuestNicInput, splitCidr } from './nic.ts';

export const SeedKeyPair = z.object({
  name: z.string().min(1),
  publicKey: z.string().min(1),
  type: z.enum(['ssh', 'x509']).default('ssh'),
});
export type SeedKeyPair = z.infer<typeof SeedKeyPair>;

export const NoCloudInput = z.object({
  /** instance-id: the Server uid. cloud-init re-runs per-instance modules when it changes. */
  instanceId: z.string().min(1),
  hostname: z.string().min(1).max(253),
  /** User data as given by the user (any cloud-init format). */
  userData: z.string().optional(),
  keyPair: SeedKeyPair.optional(),
  nics: z.array(GuestNic).default([]),
});
export type NoCloudInput = z.input<typeof NoCloudInput>;

const q = (s: string) => JSON.stringify(s);

/** SSH keys to install: x509 "key pairs" are not SSH keys. */
function sshKeys(keyPair: SeedKeyPair | undefined): string[] {
  return keyPair && keyPair.type === 'ssh' ? [keyPair.publicKey.trim()] : [];
}

/**
 * meta-data. The keys go here (cloud-init reads meta-data "public-keys" in every datasource) when user data is
 * also given, so the user's user-data stays untouched; without user data they go into user-data instead.
 */
export function metaData(input: NoCloudInput): string {
  const s = NoCloudInput.parse(input);
  let out = `instance-id: ${q(s.instanceId)}\nlocal-hostname: ${q(s.hostname)}\n`;
  const keys = sshKeys(s.keyPair);
  if (s.userData !== undefined && keys.length > 0) {
    out += `public-keys:\n${keys.map((k) => `  - ${q(k)}\n`).join('')}`;
  }
  return out;
}

/** user-data: the user's, or a minimal #cloud-config (with ssh_authorized_keys when there is a key pair). */
export function userData(input: NoCloudInput): string {
  const s = NoCloudInput.parse(input);
  if (s.userData !== undefined) return s.userData;
  const keys = sshKeys(s.keyPair);
  if (keys.length === 0) return '#cloud-config\n{}\n';
  return `#cloud-config\nssh_authorized_keys:\n${keys.map((k) => `  - ${q(k)}\n`).join('')}`;
}

/**
 * network-config, version 2 (canonical/cloud-init doc/rtd/reference/network-config-format-v2.rst): NIC i is
 * "nic<i>", matched by MAC, renamed eth<i>. No addresses: dhcp4. Default gateways become routes (gateway4/6
 * are deprecated). Undefined when there are no NICs (cloud-init then falls back to DHCP on the first NIC).
 */
export function networkConfig(nicsInput: GuestNicInput[]): string | undefined {
  const nics = z.array(GuestNic).parse(nicsInput);
  if (nics.length === 0) return undefined;
  let out = 'version: 2\nethernets:\n';
  nics.forEach((n, i) => {
    out += `  nic${i}:\n    match:\n      macaddress: ${q(n.mac)}\n    set-name: ${q(`eth${i}`)}\n`;
    if (n.mtu !== undefined) out += `    mtu: ${n.mtu}\n`;
    if (n.addresses.length === 0) {
      out += '    dhcp4: true\n';
    } else {
      out += `    addresses:\n${n.addresses.map((a) => `      - ${q(a)}\n`).join('')}`;
    }
    const routes: { to: string; via: string; metric?: number }[] = [];
    if (n.gateway) routes.push({ to: '0.0.0.0/0', via: n.gateway });
    if (n.gateway6) routes.push({ to: '::/0', via: n.gateway6 });
    for (const r of n.routes) {
      const c = splitCidr(r.to);
      routes.push({
        to: `${c.network}/${c.prefix}`,
        via: r.via,
        ...(r.metric !== undefined ? { metric: r.metric } : {}),
      });
    }
    if (routes.length > 0) {
      out += '    routes:\n';
      for (const r of routes) {
        out += `      - to: ${q(r.to)}\n        via: ${q(r.via)}\n`;
        if (r.metric !== undefined) out += `        metric: ${r.metric}\n`;
      }
    }
    if (n.dns.length > 0 || n.searchDomains.length > 0) {
      out += '    nameservers:\n';
      if (n.dns.length > 0) out += `      addresses:\n${n.dns.map((d) => `        - ${q(d)}\n`).join('')}`;
      if (n.searchDomains.length > 0) {
        out += `      search:\n${n.searchDomains.map((d) => `        - ${q(d)}\n`).join('')}`;
      }
    }
  });
  return out;
}

/** All NoCloud files by name: meta-data, user-data, and network-config when there are NICs. */
export function noCloudFiles(input: NoCloudInput): Record<string, string> {
  const files: Record<string, string> = { 'meta-data': metaData(input), 'user-data': userData(input) };
  const net = networkConfig(input.nics ?? []);
  if (net !== undefined) files['network-config'] = net;
  return files;
}

/** Volume label of a NoCloud seed. */
export const NOCLOUD_VOLID = 'cidata';

/** Build the NoCloud files and write them as an ISO labelled cidata at `output`. Returns the files written. */
export async function writeNoCloudIso(
  input: NoCloudInput,
  output: string,
  options: Omit<WriteIsoOptions, 'volid'> = {},
): Promise<Record<string, string>> {
  const files = noCloudFiles(input);
  await writeIso(files, output, { ...options, volid: NOCLOUD_VOLID });
  return files;
}
