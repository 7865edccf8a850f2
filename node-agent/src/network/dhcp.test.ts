import { describe, expect, it } from 'vitest';
import type { SubnetPlan } from './backend.ts';
import {
  type DhcpNetwork,
  dhcpHostDevice,
  dhcpMac,
  dnsmasqPaths,
  parseHostsFile,
  renderDnsmasqConfig,
  renderHostsFile,
  servedSubnets,
  serverAddresses,
  staleNeighbours,
} from './dhcp.ts';

const subnet = (over: Partial<SubnetPlan> = {}): SubnetPlan => ({
  name: 'v4',
  cidr: '192.168.41.0/24',
  ipVersion: 4,
  gatewayIP: '192.168.41.1',
  dhcp: true,
  dhcpAddress: '192.168.41.2',
  dnsNameservers: ['192.0.2.53', '192.0.2.54'],
  hostRoutes: [],
  ...over,
});

const net = (over: Partial<DhcpNetwork> = {}): DhcpNetwork => ({
  vni: 4101,
  networkId: 'uid-a',
  mtu: 1450,
  subnets: [subnet()],
  hosts: [],
  attach: async () => [],
  ...over,
});

describe('DHCP rendering', () => {
  it('derives the same server MAC and device names from the VNI on every node', () => {
    expect(dhcpMac(4101)).toBe('02:73:64:00:10:05');
    expect(dhcpMac(16777215)).toBe('02:73:64:ff:ff:ff');
    expect(dhcpHostDevice(4101)).toBe('std-4101');
    expect(dhcpHostDevice(16777215).length).toBeLessThanOrEqual(15);
  });

  it('serves only IPv4 subnets with DHCP and a server address', () => {
    const n = net({
      subnets: [
        subnet({ name: 'b', cidr: '10.0.0.0/16', dhcpAddress: '10.0.0.2' }),
        subnet({ name: 'off', cidr: '10.1.0.0/24', dhcp: false }),
        subnet({ name: 'v6', cidr: 'fd00::/64', ipVersion: 6, dhcpAddress: 'fd00::2' }),
        subnet({ name: 'noaddr', cidr: '10.2.0.0/24', dhcpAddress: undefined }),
        subnet(),
      ],
    });
    expect(servedSubnets(n).map((s) => s.name)).toEqual(['b', 'v4']);
    expect(serverAddresses(n)).toEqual(['10.0.0.2/16', '192.168.41.2/24']);
  });

  it('renders the dnsmasq configuration: static range, router, DNS, forced MTU, lease time', () => {
    const conf = renderDnsmasqConfig(net({ leaseSeconds: 600 }), dnsmasqPaths('/run/x', 4101));
    const lines = conf.split('\n');
    expect(lines).toContain('dhcp-range=set:s0,192.168.41.0,static,255.255.255.0,600s');
    expect(lines).toContain('dhcp-option=tag:s0,option:router,192.168.41.1');
    expect(lines).toContain('dhcp-option=tag:s0,option:dns-server,192.0.2.53,192.0.2.54');
    expect(lines).toContain('dhcp-option-force=tag:s0,option:mtu,1450');
    expect(lines).toContain('dhcp-hostsfile=/run/x/dhcp-4101/hosts');
    expect(lines).toContain('port=0');
    // least privilege: dnsmasq drops root once it has bound and opened its files
    expect(lines).toContain('user=nobody');
    expect(lines).toContain('group=nogroup');
    expect(conf).not.toContain('user=root');
    expect(conf).not.toContain('classless-static-route');
  });

  it('puts host routes and the default route into option 121, and no router without a gateway', () => {
    const conf = renderDnsmasqConfig(
      net({ subnets: [subnet({ hostRoutes: [{ destination: '10.10.0.0/16', nexthop: '192.168.41.254' }] })] }),
      dnsmasqPaths('/run/x', 4101),
    );
    expect(conf).toContain(
      'dhcp-option=tag:s0,option:classless-static-route,10.10.0.0/16,192.168.41.254,0.0.0.0/0,192.168.41.1\n',
    );
    const noGw = renderDnsmasqConfig(
      net({ subnets: [subnet({ gatewayIP: undefined, dnsNameservers: [] })] }),
      dnsmasqPaths('/run/x', 4101),
    );
    expect(noGw).toContain('dhcp-option=tag:s0,option:router\n');
    expect(noGw).not.toContain('dns-server');
  });

  it('renders sorted host lines and drops invalid host names', () => {
    expect(
      renderHostsFile([
        { mac: 'FA:16:3E:00:00:02', ip: '192.168.41.12', hostname: 'web-2' },
        { mac: 'fa:16:3e:00:00:01', ip: '192.168.41.11', hostname: 'bad_name!' },
      ]),
    ).toBe('fa:16:3e:00:00:01,192.168.41.11\nfa:16:3e:00:00:02,192.168.41.12,web-2\n');
    expect(renderHostsFile([])).toBe('');
  });
});

describe('stale neighbour entries of the DHCP namespace', () => {
  it('flushes entries naming an old MAC for an address a new port got, or for a released lease', () => {
    const old = parseHostsFile(
      renderHostsFile([
        { mac: 'FA:16:3E:00:00:01', ip: '192.168.41.10', hostname: 'a' },
        { mac: 'fa:16:3e:00:00:02', ip: '192.168.41.11' },
        { mac: 'fa:16:3e:00:00:03', ip: '192.168.41.12' },
      ]),
    );
    expect([...old]).toEqual([
      ['192.168.41.10', 'fa:16:3e:00:00:01'],
      ['192.168.41.11', 'fa:16:3e:00:00:02'],
      ['192.168.41.12', 'fa:16:3e:00:00:03'],
    ]);
    // now: .10 is a new port (new MAC), .11 was released, .12 unchanged, .20 is a remote port
    const known = new Map([
      ['192.168.41.10', 'fa:16:3e:00:00:99'],
      ['192.168.41.12', 'fa:16:3e:00:00:03'],
      ['192.168.41.20', 'fa:16:3e:00:00:20'],
    ]);
    const released = new Set([...old].filter(([ip, mac]) => known.get(ip) !== mac).map(([ip]) => ip));
    const entries = [
      { dst: '192.168.41.10', lladdr: 'fa:16:3e:00:00:01', state: ['REACHABLE'] },
      { dst: '192.168.41.11', lladdr: 'fa:16:3e:00:00:02', state: ['STALE'] },
      { dst: '192.168.41.12', lladdr: 'FA:16:3E:00:00:03', state: ['REACHABLE'] },
      { dst: '192.168.41.20', lladdr: 'fa:16:3e:00:00:21', state: ['STALE'] }, // the remote address moved
      { dst: '192.168.41.30', lladdr: 'fa:16:3e:00:00:30', state: ['STALE'] }, // unknown: left alone
      { dst: '192.168.41.31', state: ['FAILED'] },
      { dst: 'fe80::1', lladdr: 'fa:16:3e:00:00:01', state: ['STALE'] },
    ];
    expect(staleNeighbours(entries, known, released)).toEqual(['192.168.41.10', '192.168.41.11', '192.168.41.20']);
    // entries that already match: nothing to do
    expect(staleNeighbours(entries.slice(2, 3), known, new Set())).toEqual([]);
  });
});
