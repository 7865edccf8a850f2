import { describe, expect, it } from 'vitest';
import type { PortPlan } from './backend.ts';
import { dhcpHosts } from './dhcp.ts';
import {
  desiredFdb,
  fdbCommands,
  networkAlias,
  observedNetworks,
  parseNetworkAlias,
  staleDevices,
  vxlanMatches,
} from './linuxbridge.ts';
import type { Link } from './observe.ts';

const Z = '00:00:00:00:00:00';

describe('VXLAN FDB reconciliation', () => {
  const net = {
    peers: ['10.0.0.2', '10.0.0.3', '10.0.0.1', '10.0.0.2'],
    remotePorts: [
      { mac: 'FA:16:3E:00:00:02', ips: [], hostIP: '10.0.0.2' },
      { mac: 'fa:16:3e:00:00:09', ips: [], hostIP: '10.0.0.1' },
    ],
  };

  it('wants one flood entry per other node and one unicast entry per remote port', () => {
    expect([...desiredFdb(net, '10.0.0.1')]).toEqual([
      [Z, ['10.0.0.2', '10.0.0.3']],
      ['fa:16:3e:00:00:02', ['10.0.0.2']],
    ]);
  });

  it('adds what is missing, removes what is stale, moves a unicast MAC by replace', () => {
    const observed = [
      { mac: Z, ifname: 'stx-1', dst: '10.0.0.2', flags: ['self'] },
      { mac: Z, ifname: 'stx-1', dst: '10.0.0.9', flags: ['self'] },
      { mac: Z, ifname: 'stx-2', dst: '10.0.0.3', flags: ['self'] }, // another device
      { mac: 'fa:16:3e:00:00:02', ifname: 'stx-1', dst: '10.0.0.7', flags: ['self'] }, // moved
      { mac: 'fa:16:3e:00:00:05', ifname: 'stx-1', dst: '10.0.0.7', flags: ['self'] }, // gone
      { mac: '8e:81:63:02:82:b5', ifname: 'stx-1', flags: [], master: 'stb-1' }, // bridge entry, not ours
    ];
    expect(fdbCommands('stx-1', observed, desiredFdb(net, '10.0.0.1'))).toEqual([
      ['fdb', 'append', Z, 'dev', 'stx-1', 'dst', '10.0.0.3', 'self', 'permanent'],
      ['fdb', 'replace', 'fa:16:3e:00:00:02', 'dev', 'stx-1', 'dst', '10.0.0.2', 'self', 'permanent'],
      ['fdb', 'del', Z, 'dev', 'stx-1', 'dst', '10.0.0.9', 'self'],
      ['fdb', 'del', 'fa:16:3e:00:00:05', 'dev', 'stx-1', 'dst', '10.0.0.7', 'self'],
    ]);
  });

  it('runs nothing when the FDB already matches', () => {
    const want = desiredFdb(net, '10.0.0.1');
    const observed = [...want].flatMap(([mac, dsts]) =>
      dsts.map((dst) => ({ mac, ifname: 'stx-1', dst, flags: ['self'] })),
    );
    expect(fdbCommands('stx-1', observed, want)).toEqual([]);
  });
});

describe('adoption checks', () => {
  const link = (data: Record<string, unknown>): Link => ({
    ifindex: 5,
    ifname: 'stx-9',
    flags: [],
    mtu: 1450,
    linkinfo: {
      info_kind: 'vxlan',
      info_data: { id: 9, local: '10.0.0.1', link: 'eth0', port: 4789, learning: false, ...data },
    },
  });
  it('adopts a VXLAN device only with the right VNI, port, local address, underlay and no learning', () => {
    expect(vxlanMatches(link({}), 9, '10.0.0.1', 'eth0')).toBe(true);
    expect(vxlanMatches(link({ port: 8472 }), 9, '10.0.0.1', 'eth0')).toBe(false);
    expect(vxlanMatches(link({ local: '10.0.0.2' }), 9, '10.0.0.1', 'eth0')).toBe(false);
    expect(vxlanMatches(link({ link: 'eth1' }), 9, '10.0.0.1', 'eth0')).toBe(false);
    expect(vxlanMatches(link({ learning: true }), 9, '10.0.0.1', 'eth0')).toBe(false);
    expect(vxlanMatches(link({ id: 10 }), 9, '10.0.0.1', 'eth0')).toBe(false);
    expect(networkAlias({ id: 'u', vni: 9 })).toBe('stratus:net=u,vni=9');
  });
});

describe('stale devices', () => {
  let idx = 10;
  const l = (ifname: string, o: Partial<Link> & { kind?: string; data?: Record<string, unknown> } = {}): Link => ({
    ifindex: idx++,
    ifname,
    flags: o.flags ?? ['BROADCAST', 'MULTICAST', 'UP'],
    mtu: o.mtu ?? 1450,
    ...(o.master ? { master: o.master } : {}),
    ...(o.ifalias ? { ifalias: o.ifalias } : {}),
    ...(o.kind ? { linkinfo: { info_kind: o.kind, ...(o.data ? { info_data: o.data } : {}) } } : {}),
  });
  const tap = { kind: 'tun', data: { type: 'tap' } };
  const vx = (vni: number) => ({ kind: 'vxlan', data: { id: vni, port: 4789 } });

  it('removes only devices with the ownership marker that the plan does not have', () => {
    const links = [
      l('stt-aaaaaaaaaaa', { ...tap, ifalias: 'stratus:port=a', master: 'stb-7' }), // ours, unused
      l('stt-bbbbbbbbbbb', { ...tap }), // the prefix but no marker: someone else's tap
      l('stt-ccccccccccc', { kind: 'veth' }), // a test stand-in
      l('stt-ddddddddddd', { ...tap, ifalias: 'stratus:port=d' }), // in the plan
      l('stx-7', { ...vx(7), ifalias: networkAlias({ id: 'n7', vni: 7 }), master: 'stb-7' }),
      l('stb-7', { kind: 'bridge', ifalias: networkAlias({ id: 'n7', vni: 7 }) }),
      l('stx-8', { ...vx(8) }), // no marker
      l('stb-8', { kind: 'bridge', ifalias: 'made by hand' }),
      l('stb-9', { kind: 'dummy', ifalias: networkAlias({ id: 'n9', vni: 9 }) }), // not a bridge
    ];
    expect(staleDevices(links, new Set(['stt-ddddddddddd']))).toEqual({
      remove: ['stt-aaaaaaaaaaa', 'stx-7', 'stb-7'],
      kept: [],
    });
  });

  it('keeps a tap a process holds open, its bridge and the VXLAN device of that bridge', () => {
    const alias = networkAlias({ id: 'n7', vni: 7 });
    const links = [
      l('stt-aaaaaaaaaaa', { ...tap, ifalias: 'stratus:port=a', master: 'stb-7', flags: ['UP', 'LOWER_UP'] }),
      l('stx-7', { ...vx(7), ifalias: alias, master: 'stb-7' }),
      l('std-7', { kind: 'veth', master: 'stb-7' }),
      l('stb-7', { kind: 'bridge', ifalias: alias }),
      l('eth9', { kind: 'veth', master: 'stb-5' }), // a foreign device in another stale bridge
      l('stb-5', { kind: 'bridge', ifalias: networkAlias({ id: 'n5', vni: 5 }) }),
    ];
    const r = staleDevices(links, new Set());
    expect(r.remove).toEqual([]);
    expect(r.kept.map((k) => k.device).sort()).toEqual(['stb-5', 'stb-7', 'stt-aaaaaaaaaaa', 'stx-7']);
  });

  it('reads the networks wired on the node from the VXLAN markers', () => {
    expect(parseNetworkAlias('stratus:net=u-1,vni=9')).toEqual({ id: 'u-1', vni: 9 });
    expect(parseNetworkAlias('stratus:port=u')).toBeUndefined();
    const links = [
      l('stx-9', { ...vx(9), ifalias: networkAlias({ id: 'u-1', vni: 9 }), mtu: 1400 }),
      l('stx-10', { ...vx(11), ifalias: networkAlias({ id: 'u-2', vni: 10 }) }), // inconsistent: ignored
      l('stb-9', { kind: 'bridge', ifalias: networkAlias({ id: 'u-1', vni: 9 }) }),
    ];
    expect([...observedNetworks(links)]).toEqual([['u-1', { vni: 9, mtu: 1400 }]]);
  });
});

describe('dhcpHosts', () => {
  const port = (id: string, networkId: string, ips: string[], hostname?: string): PortPlan => ({
    id,
    name: id,
    namespace: 'ns',
    networkId,
    device: `stt-${id}`,
    mac: `fa:16:3e:00:00:0${id}`,
    fixedIPs: ips.map((ipAddress) => ({ subnet: 'x', ipAddress })),
    adminStateUp: true,
    portSecurity: true,
    allowedAddressPairs: [],
    securityGroups: [],
    hostname,
  });
  it('leases the first fixed IPv4 address inside a served subnet of local ports of the network', () => {
    const n = {
      id: 'n',
      subnets: [
        {
          name: 'v4',
          cidr: '10.0.0.0/24',
          ipVersion: 4 as const,
          dhcp: true,
          dhcpAddress: '10.0.0.2',
          dnsNameservers: [],
          hostRoutes: [],
        },
      ],
    };
    expect(
      dhcpHosts(n, [
        port('1', 'n', ['fd00::5', '10.0.0.5', '10.0.0.6'], 'vm1'),
        port('2', 'n', ['10.9.0.5']),
        port('3', 'other', ['10.0.0.7']),
      ]),
    ).toEqual([{ mac: 'fa:16:3e:00:00:01', ip: '10.0.0.5', hostname: 'vm1' }]);
  });
});
