// The guest's YAML flattener (guest/yaml.awk), run with the host's awk (the guest runs it with busybox awk).
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { run } from '../controlplane/util.ts';
import { requireTools } from '../testing/tools.ts';

requireTools('awk');

const script = path.join(path.dirname(fileURLToPath(import.meta.url)), 'guest', 'yaml.awk');
const flatten = async (yaml: string) => (await run('awk', ['-f', script], { input: yaml })).stdout.trim().split('\n');

describe('guest yaml.awk', () => {
  it('flattens the netplan v2 subset Stratus writes', async () => {
    const out = await flatten(
      [
        'version: 2',
        'ethernets:',
        '  nic0:',
        '    match:',
        '      macaddress: "FA:16:3e:00:00:01"   # comment',
        '    set-name: eth0',
        '    mtu: 1450',
        '    addresses:',
        '    - 10.0.0.5/24',
        "    - 'fd00::5/64'",
        '    routes:',
        '      - to: 0.0.0.0/0',
        '        via: 10.0.0.1',
        '      - {to: 192.168.0.0/16, via: 10.0.0.2, metric: 5}',
        '    nameservers:',
        '      addresses: [10.0.0.2, "1.1.1.1"]',
        '  nic1:',
        '    dhcp4: true',
      ].join('\n'),
    );
    expect(out).toEqual([
      'version=2',
      'ethernets.nic0.match.macaddress=FA:16:3e:00:00:01',
      'ethernets.nic0.set-name=eth0',
      'ethernets.nic0.mtu=1450',
      'ethernets.nic0.addresses.0=10.0.0.5/24',
      'ethernets.nic0.addresses.1=fd00::5/64',
      'ethernets.nic0.routes.0.to=0.0.0.0/0',
      'ethernets.nic0.routes.0.via=10.0.0.1',
      'ethernets.nic0.routes.1.to=192.168.0.0/16',
      'ethernets.nic0.routes.1.via=10.0.0.2',
      'ethernets.nic0.routes.1.metric=5',
      'ethernets.nic0.nameservers.addresses.0=10.0.0.2',
      'ethernets.nic0.nameservers.addresses.1=1.1.1.1',
      'ethernets.nic1.dhcp4=true',
    ]);
  });

  it('flattens cloud-config runcmd and skips block scalars', async () => {
    const out = await flatten(
      [
        '#cloud-config',
        'hostname: cc-host',
        'runcmd:',
        '  - echo one: two',
        '  - [sh, -c, "echo a, b"]',
        'write_files:',
        '  - path: /x',
        '    content: |',
        '      key: not-a-key',
        '      - not-an-item',
        '    owner: root',
      ].join('\n'),
    );
    expect(out).toEqual([
      'hostname=cc-host',
      'runcmd.0=echo one: two',
      'runcmd.1.0=sh',
      'runcmd.1.1=-c',
      'runcmd.1.2=echo a, b',
      'write_files.0.path=/x',
      'write_files.0.owner=root',
    ]);
  });
});
