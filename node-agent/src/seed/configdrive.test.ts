import { describe, expect, it } from 'vitest';
import { type ConfigDriveInput, configDriveFiles, metaDataJson, networkDataJson } from './configdrive.ts';

const KEY = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHNvbWVrZXlieXRlcw alice@laptop';

const input: ConfigDriveInput = {
  uuid: '0b8f6a4e-3c2d-4e5f-9a1b-2c3d4e5f6a7b',
  name: 'web-0',
  hostname: 'web-0.novalocal',
  availabilityZone: 'zone-a',
  projectId: 'a1b2c3',
  keyPair: { name: 'alice', publicKey: `${KEY}\n` },
  metadata: { role: 'web' },
  userData: '#cloud-config\npackages: [htop]\n',
  nics: [
    {
      mac: 'fa:16:3e:00:00:01',
      mtu: 1450,
      addresses: ['192.168.100.11/24', 'fd00:100::11/64'],
      gateway: '192.168.100.1',
      gateway6: 'fd00:100::1',
      routes: [{ to: '10.20.0.0/16', via: '192.168.100.254' }],
      dns: ['192.168.100.2', 'fd00:100::2'],
      portId: 'c0ffee00-0000-4000-8000-000000000001',
      networkId: 'net-uid-1',
      linkName: 'kvt-c0ffee00-00',
    },
    { mac: 'fa:16:3e:00:00:02', dns: ['192.168.100.2'], networkId: 'net-uid-2' },
  ],
};

describe('config drive', () => {
  it('golden meta_data.json', () => {
    expect(metaDataJson(input)).toEqual({
      uuid: '0b8f6a4e-3c2d-4e5f-9a1b-2c3d4e5f6a7b',
      meta: { role: 'web' },
      public_keys: { alice: KEY },
      keys: [{ name: 'alice', type: 'ssh', data: KEY }],
      hostname: 'web-0.novalocal',
      name: 'web-0',
      launch_index: 0,
      availability_zone: 'zone-a',
      project_id: 'a1b2c3',
      devices: [],
    });
    // Nova's key order
    expect(Object.keys(metaDataJson(input))).toEqual([
      'uuid',
      'meta',
      'public_keys',
      'keys',
      'hostname',
      'name',
      'launch_index',
      'availability_zone',
      'project_id',
      'devices',
    ]);
  });

  it('minimal meta_data.json: no meta, no keys, default zone nova', () => {
    expect(metaDataJson({ uuid: 'u1', name: 'n', hostname: 'n', randomSeed: 'c2VlZA==' })).toEqual({
      uuid: 'u1',
      hostname: 'n',
      name: 'n',
      launch_index: 0,
      availability_zone: 'nova',
      random_seed: 'c2VlZA==',
      devices: [],
    });
  });

  it('golden network_data.json', () => {
    expect(networkDataJson(input.nics!)).toEqual({
      links: [
        {
          id: 'kvt-c0ffee00-00',
          vif_id: 'c0ffee00-0000-4000-8000-000000000001',
          type: 'bridge',
          mtu: 1450,
          ethernet_mac_address: 'fa:16:3e:00:00:01',
        },
        { id: 'interface1', type: 'bridge', mtu: null, ethernet_mac_address: 'fa:16:3e:00:00:02' },
      ],
      networks: [
        {
          id: 'network0',
          type: 'ipv4',
          link: 'kvt-c0ffee00-00',
          ip_address: '192.168.100.11',
          netmask: '255.255.255.0',
          routes: [
            { network: '0.0.0.0', netmask: '0.0.0.0', gateway: '192.168.100.1' },
            { network: '10.20.0.0', netmask: '255.255.0.0', gateway: '192.168.100.254' },
          ],
          network_id: 'net-uid-1',
          services: [{ type: 'dns', address: '192.168.100.2' }],
        },
        {
          id: 'network1',
          type: 'ipv6',
          link: 'kvt-c0ffee00-00',
          ip_address: 'fd00:100::11',
          netmask: 'ffff:ffff:ffff:ffff::',
          routes: [{ network: '::', netmask: '::', gateway: 'fd00:100::1' }],
          network_id: 'net-uid-1',
          services: [{ type: 'dns', address: 'fd00:100::2' }],
        },
        { id: 'network2', type: 'ipv4_dhcp', link: 'interface1', network_id: 'net-uid-2' },
      ],
      services: [
        { type: 'dns', address: '192.168.100.2' },
        { type: 'dns', address: 'fd00:100::2' },
      ],
    });
  });

  it('files: latest and 2018-08-27 with the same content; user_data only when given', () => {
    const files = configDriveFiles(input);
    expect(Object.keys(files)).toEqual([
      'openstack/2018-08-27/meta_data.json',
      'openstack/2018-08-27/network_data.json',
      'openstack/2018-08-27/user_data',
      'openstack/latest/meta_data.json',
      'openstack/latest/network_data.json',
      'openstack/latest/user_data',
    ]);
    expect(files['openstack/latest/meta_data.json']).toBe(files['openstack/2018-08-27/meta_data.json']);
    expect(JSON.parse(files['openstack/latest/meta_data.json']!)).toEqual(metaDataJson(input));
    expect(files['openstack/latest/user_data']).toBe('#cloud-config\npackages: [htop]\n');
    const { userData: _, ...noUserData } = input;
    expect(Object.keys(configDriveFiles(noUserData)).some((p) => p.endsWith('user_data'))).toBe(false);
    expect(
      JSON.parse(configDriveFiles({ uuid: 'u', name: 'n', hostname: 'n' })['openstack/latest/network_data.json']!),
    ).toEqual({
      links: [],
      networks: [],
      services: [],
    });
  });
});
