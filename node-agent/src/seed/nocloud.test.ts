import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { ZodError } from 'zod';
import { splitCidr } from './nic.ts';
import { metaData, type NoCloudInput, networkConfig, noCloudFiles, userData } from './nocloud.ts';

const KEY = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHNvbWVrZXlieXRlcw alice@laptop';
const base: NoCloudInput = { instanceId: '0b8f6a4e-3c2d-4e5f-9a1b-2c3d4e5f6a7b', hostname: 'web-0' };

describe('meta-data / user-data', () => {
  it('no user data, no key: minimal cloud-config', () => {
    expect(metaData(base)).toBe('instance-id: "0b8f6a4e-3c2d-4e5f-9a1b-2c3d4e5f6a7b"\nlocal-hostname: "web-0"\n');
    expect(userData(base)).toBe('#cloud-config\n{}\n');
  });

  it('key pair without user data: ssh_authorized_keys in a generated cloud-config', () => {
    const input = { ...base, keyPair: { name: 'alice', publicKey: `${KEY}\n` } };
    expect(metaData(input)).toBe('instance-id: "0b8f6a4e-3c2d-4e5f-9a1b-2c3d4e5f6a7b"\nlocal-hostname: "web-0"\n');
    expect(userData(input)).toBe(`#cloud-config\nssh_authorized_keys:\n  - "${KEY}"\n`);
    expect(parse(userData(input))).toEqual({ ssh_authorized_keys: [KEY] });
  });

  it('user data and key pair: user data untouched, keys in meta-data public-keys', () => {
    const ud = '#!/bin/sh\necho hello > /tmp/hello\n';
    const input = { ...base, userData: ud, keyPair: { name: 'alice', publicKey: KEY } };
    expect(userData(input)).toBe(ud);
    expect(metaData(input)).toBe(
      `instance-id: "0b8f6a4e-3c2d-4e5f-9a1b-2c3d4e5f6a7b"\nlocal-hostname: "web-0"\npublic-keys:\n  - "${KEY}"\n`,
    );
    expect(parse(metaData(input))).toEqual({
      'instance-id': '0b8f6a4e-3c2d-4e5f-9a1b-2c3d4e5f6a7b',
      'local-hostname': 'web-0',
      'public-keys': [KEY],
    });
  });

  it('user data without key: as given, even empty', () => {
    expect(userData({ ...base, userData: '' })).toBe('');
    expect(userData({ ...base, userData: '#cloud-config\npackages: [htop]\n' })).toBe(
      '#cloud-config\npackages: [htop]\n',
    );
  });

  it('x509 key pairs are not installed as SSH keys', () => {
    const input = {
      ...base,
      keyPair: { name: 'cert', publicKey: '-----BEGIN CERTIFICATE-----', type: 'x509' as const },
    };
    expect(userData(input)).toBe('#cloud-config\n{}\n');
  });

  it('quotes values YAML would reinterpret', () => {
    const md = metaData({ instanceId: '12:30:00', hostname: 'yes' });
    expect(parse(md)).toEqual({ 'instance-id': '12:30:00', 'local-hostname': 'yes' });
  });
});

describe('network-config v2', () => {
  it('golden: static IPv4 with gateway, DNS and MTU (networking.md §2.7 shape)', () => {
    expect(
      networkConfig([
        {
          mac: 'FA:16:3E:00:00:01',
          mtu: 1450,
          addresses: ['192.168.100.11/24'],
          gateway: '192.168.100.1',
          dns: ['192.168.100.2'],
        },
      ]),
    ).toBe(`version: 2
ethernets:
  nic0:
    match:
      macaddress: "fa:16:3e:00:00:01"
    set-name: "eth0"
    mtu: 1450
    addresses:
      - "192.168.100.11/24"
    routes:
      - to: "0.0.0.0/0"
        via: "192.168.100.1"
    nameservers:
      addresses:
        - "192.168.100.2"
`);
  });

  it('golden: dual stack + host routes on eth0, DHCP on eth1', () => {
    const text = networkConfig([
      {
        mac: '52:54:00:12:34:56',
        mtu: 1450,
        addresses: ['10.0.0.5/24', 'fd00:1::5/64'],
        gateway: '10.0.0.1',
        gateway6: 'fd00:1::1',
        routes: [{ to: '172.16.9.9/16', via: '10.0.0.254', metric: 100 }],
        dns: ['10.0.0.2', 'fd00:1::2'],
        searchDomains: ['example.org'],
      },
      { mac: 'fa:16:3e:00:00:02' },
    ]);
    expect(text).toBe(`version: 2
ethernets:
  nic0:
    match:
      macaddress: "52:54:00:12:34:56"
    set-name: "eth0"
    mtu: 1450
    addresses:
      - "10.0.0.5/24"
      - "fd00:1::5/64"
    routes:
      - to: "0.0.0.0/0"
        via: "10.0.0.1"
      - to: "::/0"
        via: "fd00:1::1"
      - to: "172.16.0.0/16"
        via: "10.0.0.254"
        metric: 100
    nameservers:
      addresses:
        - "10.0.0.2"
        - "fd00:1::2"
      search:
        - "example.org"
  nic1:
    match:
      macaddress: "fa:16:3e:00:00:02"
    set-name: "eth1"
    dhcp4: true
`);
    // what cloud-init's YAML loader sees: the all-digit MAC stays a string
    expect(parse(text!, { version: '1.1' }).ethernets.nic0.match.macaddress).toBe('52:54:00:12:34:56');
  });

  it('no NICs: no network-config file', () => {
    expect(networkConfig([])).toBeUndefined();
    expect(Object.keys(noCloudFiles(base))).toEqual(['meta-data', 'user-data']);
    expect(Object.keys(noCloudFiles({ ...base, nics: [{ mac: 'fa:16:3e:00:00:01' }] }))).toEqual([
      'meta-data',
      'user-data',
      'network-config',
    ]);
  });

  it.each([
    ['bad mac', { mac: 'fa:16:3e:00:00' }],
    ['bad address', { mac: 'fa:16:3e:00:00:01', addresses: ['10.0.0.5'] }],
    ['v4 gateway without v4 address', { mac: 'fa:16:3e:00:00:01', addresses: ['fd00::5/64'], gateway: '10.0.0.1' }],
    ['v6 gateway given as v4', { mac: 'fa:16:3e:00:00:01', addresses: ['10.0.0.5/24'], gateway6: '10.0.0.1' }],
  ])('rejects %s', (_w, nic) => {
    expect(() => networkConfig([nic as never])).toThrow(ZodError);
  });
});

describe('splitCidr', () => {
  it('IPv4 and IPv6 network/netmask', () => {
    expect(splitCidr('192.168.100.11/24')).toEqual({
      address: '192.168.100.11',
      network: '192.168.100.0',
      netmask: '255.255.255.0',
      prefix: 24,
      family: 4,
    });
    expect(splitCidr('fd00:1::5/64')).toMatchObject({ network: 'fd00:1::', netmask: 'ffff:ffff:ffff:ffff::' });
    expect(splitCidr('::/0')).toMatchObject({ network: '::', netmask: '::' });
    expect(splitCidr('2001:db8:0:1:0:0:0:1/128')).toMatchObject({
      network: '2001:db8:0:1::1',
      netmask: 'ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff',
    });
    expect(splitCidr('10.1.2.3/0')).toMatchObject({ network: '0.0.0.0', netmask: '0.0.0.0' });
  });
});
