import { describe, expect, it } from 'vitest';
import { PORT_BOUND, PORT_DEVICE_LABEL, PORT_READY } from '../../../operator/src/api/network.ts';
import {
  bindingChanges,
  bindingStatus,
  buildPlan,
  effectiveGroups,
  type HypervisorObj,
  type NetworkObj,
  nicFor,
  type PlanInput,
  type PortObj,
  portFingerprint,
  type SecurityGroupObj,
  type ServerObj,
  serverNics,
} from './plan.ts';

const NODE = 'n1';
const NS = 'p1';

function network(name: string, o: Partial<NetworkObj> & { vni?: number; uid?: string } = {}): NetworkObj {
  return {
    metadata: { name, namespace: NS, uid: o.uid ?? `uid-net-${name}` },
    spec: o.spec ?? {
      subnets: [
        {
          name: 'v4',
          cidr: '10.0.0.0/24',
          dnsNameservers: ['10.0.0.53'],
          hostRoutes: [{ destination: '192.168.0.0/16', nexthop: '10.0.0.254' }],
        },
        { name: 'v6', cidr: 'fd00:1::/64' },
      ],
    },
    status: o.status ?? {
      segmentationID: o.vni ?? 100,
      mtu: 1450,
      subnets: [
        { name: 'v4', cidr: '10.0.0.0/24', ipVersion: 4, gatewayIP: '10.0.0.1', dhcpAddress: '10.0.0.2' },
        { name: 'v6', cidr: 'fd00:1::/64', ipVersion: 6, gatewayIP: 'fd00:1::1' },
      ],
    },
  };
}

function port(
  name: string,
  o: {
    net?: string;
    server?: string;
    ready?: boolean;
    mac?: string;
    ips?: { subnet: string; ipAddress: string }[];
    host?: string;
    sgs?: string[];
    security?: boolean;
    pairs?: { ipAddress: string; macAddress?: string }[];
    ns?: string;
  } = {},
): PortObj {
  const ready = o.ready ?? true;
  return {
    metadata: {
      name,
      namespace: o.ns ?? NS,
      uid: `uid-port-${name}`,
      labels: o.server ? { [PORT_DEVICE_LABEL]: o.server } : {},
    },
    spec: {
      network: o.net ?? 'net',
      ...(o.sgs ? { securityGroups: o.sgs } : {}),
      ...(o.security !== undefined ? { portSecurityEnabled: o.security } : {}),
      ...(o.pairs ? { allowedAddressPairs: o.pairs } : {}),
    },
    status: ready
      ? {
          macAddress: o.mac ?? 'FA:16:3E:00:00:01',
          fixedIPs: o.ips ?? [
            { subnet: 'v4', ipAddress: '10.0.0.10' },
            { subnet: 'v6', ipAddress: 'fd00:1::10' },
          ],
          conditions: [{ type: PORT_READY, status: 'True' }],
          ...(o.host ? { bindingHost: o.host } : {}),
        }
      : { conditions: [{ type: PORT_READY, status: 'False' }] },
  };
}

function server(name: string, networks: NonNullable<NonNullable<ServerObj['spec']>['networks']>) {
  return {
    metadata: { name, namespace: NS, uid: `uid-srv-${name}` },
    spec: { networks },
    status: { node: NODE },
  } satisfies ServerObj;
}

function sg(name: string, rules: NonNullable<SecurityGroupObj['spec']>['rules'] = [], ns = NS): SecurityGroupObj {
  return { metadata: { name, namespace: ns, uid: `uid-sg-${ns}-${name}` }, spec: { rules } };
}

function hv(name: string, hostIP: string): HypervisorObj {
  return { metadata: { name }, status: { hostIP } };
}

function input(o: Partial<PlanInput>): PlanInput {
  return {
    nodeName: NODE,
    servers: [],
    networks: [network('net')],
    ports: [],
    securityGroups: [sg('default')],
    hypervisors: [hv(NODE, '10.9.0.1'), hv('n2', '10.9.0.2'), hv('n3', '10.9.0.3')],
    ...o,
  };
}

describe('buildPlan: local ports', () => {
  it('takes the ports of servers bound here: named ports and <server>-<index> ports, in spec order', () => {
    const r = buildPlan(
      input({
        servers: [server('web', [{ network: 'net' }, { port: 'mine' }])],
        ports: [port('web-0', { server: 'web' }), port('mine', { server: 'web', mac: 'fa:16:3e:00:00:02' })],
      }),
    );
    expect(r.plan.hostIP).toBe('10.9.0.1');
    expect(r.plan.ports.map((p) => p.name).sort()).toEqual(['mine', 'web-0']);
    const s = r.servers.get(`${NS}/web`)!;
    expect(s.entries.map((e) => [e.portName, e.waiting])).toEqual([
      ['web-0', undefined],
      ['mine', undefined],
    ]);
    const p = r.plan.ports.find((x) => x.name === 'web-0')!;
    expect(p).toMatchObject({
      id: 'uid-port-web-0',
      namespace: NS,
      networkId: 'uid-net-net',
      device: 'stt-uidportweb0',
      mac: 'fa:16:3e:00:00:01',
      adminStateUp: true,
      portSecurity: true,
      securityGroups: ['uid-sg-p1-default'],
      hostname: 'web',
    });
    expect(r.plan.networks).toEqual([
      expect.objectContaining({
        id: 'uid-net-net',
        vni: 100,
        mtu: 1450,
        adminStateUp: true,
        peers: [],
        remotePorts: [],
        subnets: [
          {
            name: 'v4',
            cidr: '10.0.0.0/24',
            ipVersion: 4,
            gatewayIP: '10.0.0.1',
            dhcp: true,
            dhcpAddress: '10.0.0.2',
            dnsNameservers: ['10.0.0.53'],
            hostRoutes: [{ destination: '192.168.0.0/16', nexthop: '10.0.0.254' }],
          },
          {
            name: 'v6',
            cidr: 'fd00:1::/64',
            ipVersion: 6,
            gatewayIP: 'fd00:1::1',
            dhcp: false,
            dnsNameservers: [],
            hostRoutes: [],
          },
        ],
      }),
    ]);
  });

  it('ignores servers bound elsewhere or without networks, and ports of other servers', () => {
    const elsewhere = { ...server('other', [{ network: 'net' }]), status: { node: 'n2' } };
    const r = buildPlan(
      input({
        servers: [elsewhere, server('nonet', [])],
        ports: [port('other-0', { server: 'other' }), port('free', {})],
      }),
    );
    expect(r.plan.ports).toEqual([]);
    expect(r.plan.networks).toEqual([]);
    expect(r.servers.size).toBe(0);
  });

  it('says why a port is not usable yet and leaves it out of the plan', () => {
    const cases: [PortObj | undefined, NetworkObj[], RegExp][] = [
      [undefined, [network('net')], /port web-0 does not exist yet/],
      [port('web-0', {}), [network('net')], /not claimed by the server yet/],
      [port('web-0', { server: 'db' }), [network('net')], /used by server db/],
      [port('web-0', { server: 'web', ready: false }), [network('net')], /no MAC and addresses yet/],
      [port('web-0', { server: 'web' }), [], /network net of port web-0 does not exist/],
      [port('web-0', { server: 'web' }), [network('net', { status: {} })], /no segmentation id and MTU yet/],
    ];
    for (const [p, nets, why] of cases) {
      const r = buildPlan(
        input({ servers: [server('web', [{ network: 'net' }])], ports: p ? [p] : [], networks: nets }),
      );
      expect(r.plan.ports).toEqual([]);
      expect(r.servers.get(`${NS}/web`)?.entries[0]?.waiting).toMatch(why);
    }
  });

  it('does not wire one port twice when two local servers name it', () => {
    const r = buildPlan(
      input({
        servers: [server('a', [{ port: 'shared' }]), server('b', [{ port: 'shared' }])],
        ports: [port('shared', { server: 'a' })],
      }),
    );
    expect(r.plan.ports.map((p) => p.name)).toEqual(['shared']);
    expect(r.servers.get(`${NS}/b`)?.entries[0]?.waiting).toMatch(/used by server a/);
  });
});

describe('buildPlan: transient states keep running guests wired', () => {
  const deleting = (p: PortObj): PortObj => ({
    ...p,
    metadata: { ...p.metadata, deletionTimestamp: new Date('2026-01-01T00:00:00Z') },
  });
  const web = server('web', [{ network: 'net' }]);

  it('a port being deleted that its server still uses stays wired when it was wired here', () => {
    const before = buildPlan(input({ servers: [web], ports: [port('web-0', { server: 'web' })] }));
    expect(before.plan.ports).toHaveLength(1);
    const gone = deleting(port('web-0', { server: 'web' }));
    const after = buildPlan(input({ servers: [web], ports: [gone], previous: before.plan }));
    expect(after.plan).toEqual(before.plan);
    // after an agent restart (no previous plan) the binding to this node says it was wired here
    const bound = deleting(port('web-0', { server: 'web', host: NODE }));
    expect(buildPlan(input({ servers: [web], ports: [bound] })).plan.ports.map((p) => p.name)).toEqual(['web-0']);
    // never wired here: not wired anew
    const fresh = buildPlan(input({ servers: [web], ports: [gone] }));
    expect(fresh.plan.ports).toEqual([]);
    expect(fresh.servers.get(`${NS}/web`)?.entries[0]?.waiting).toMatch(/being deleted/);
    // released by the server (device label removed): unwired
    const released = deleting(port('web-0', {}));
    expect(buildPlan(input({ servers: [web], ports: [released], previous: before.plan })).plan.ports).toEqual([]);
  });

  it('a port being deleted stays a member of its security groups while a server uses it', () => {
    const peer = deleting(
      port('peer', {
        server: 'other',
        host: 'n2',
        mac: 'fa:16:3e:00:00:09',
        ips: [{ subnet: 'v4', ipAddress: '10.0.0.9' }],
      }),
    );
    const r = buildPlan(input({ servers: [web], ports: [port('web-0', { server: 'web' }), peer] }));
    expect(r.plan.securityGroups[0]?.memberIPs).toContain('10.0.0.9');
    const released = deleting(port('peer', { host: 'n2', ips: [{ subnet: 'v4', ipAddress: '10.0.0.9' }] }));
    const r2 = buildPlan(input({ servers: [web], ports: [port('web-0', { server: 'web' }), released] }));
    expect(r2.plan.securityGroups[0]?.memberIPs).not.toContain('10.0.0.9');
  });

  it('a port wired here whose status lost its MAC, addresses or Ready keeps what it was wired with', () => {
    const before = buildPlan(input({ servers: [web], ports: [port('web-0', { server: 'web' })] }));
    const lost = deleting(port('web-0', { server: 'web', ready: false }));
    const r = buildPlan(input({ servers: [web], ports: [lost], previous: before.plan }));
    expect(r.plan).toEqual(before.plan);
    // never wired here: it waits
    expect(
      buildPlan(input({ servers: [web], ports: [port('web-0', { server: 'web', ready: false })] })).plan.ports,
    ).toEqual([]);
  });

  it('a network being deleted, or whose status lost its segmentation id, MTU and subnets, keeps its wiring', () => {
    const ports = [port('web-0', { server: 'web' })];
    const before = buildPlan(input({ servers: [web], ports }));
    expect(before.plan.networks[0]).toMatchObject({ vni: 100, mtu: 1450 });
    const nic = serverNics(before.servers.get(`${NS}/web`)!, () => ({ ready: true }));
    const net = network('net');
    const variants: NetworkObj[] = [
      { ...net, metadata: { ...net.metadata, deletionTimestamp: new Date('2026-01-01T00:00:00Z') } },
      // the operator's NetworkInUse write that dropped every field but the conditions
      { ...net, metadata: { ...net.metadata, deletionTimestamp: new Date() }, status: { conditions: [] } },
      { ...net, status: { mtu: 1450, subnets: net.status?.subnets ?? [] } },
      { ...net, status: { segmentationID: 100, mtu: 1450 } },
    ];
    for (const n of variants) {
      const r = buildPlan(input({ servers: [web], ports, networks: [n], previous: before.plan }));
      expect(r.plan).toEqual(before.plan);
      expect(serverNics(r.servers.get(`${NS}/web`)!, () => ({ ready: true }))).toEqual(nic);
      // and it stays so while the status stays incomplete (the previous plan carries the last good values)
      expect(buildPlan(input({ servers: [web], ports, networks: [n], previous: r.plan })).plan).toEqual(before.plan);
    }
    // after a restart: what the backend observed on the node (the VXLAN id and MTU of the network's devices)
    const observed = new Map([['uid-net-net', { vni: 100, mtu: 1450 }]]);
    const r = buildPlan(input({ servers: [web], ports, networks: [{ ...net, status: {} }], observed }));
    expect(r.plan.networks[0]).toMatchObject({ id: 'uid-net-net', vni: 100, mtu: 1450 });
    expect(r.plan.ports.map((p) => p.name)).toEqual(['web-0']);
    // a complete status wins over the previous plan (a real change of MTU)
    const changed = network('net', { status: { ...net.status, mtu: 1400 } });
    expect(
      buildPlan(input({ servers: [web], ports, networks: [changed], previous: before.plan })).plan.networks[0]?.mtu,
    ).toBe(1400);
    // nothing known: the port waits as before
    const none = buildPlan(input({ servers: [web], ports, networks: [{ ...net, status: {} }] }));
    expect(none.plan.ports).toEqual([]);
  });
});

describe('buildPlan: remote view', () => {
  it('peers and remote ports are the other nodes binding ports of the same network', () => {
    const r = buildPlan(
      input({
        servers: [server('web', [{ network: 'net' }])],
        ports: [
          port('web-0', { server: 'web', host: NODE }),
          port('r1', {
            server: 'x',
            host: 'n2',
            mac: 'fa:16:3e:00:00:21',
            ips: [{ subnet: 'v4', ipAddress: '10.0.0.21' }],
          }),
          port('r2', {
            server: 'y',
            host: 'n3',
            mac: 'fa:16:3e:00:00:31',
            ips: [{ subnet: 'v4', ipAddress: '10.0.0.31' }],
          }),
          port('r3', { server: 'z', host: 'n2', mac: 'fa:16:3e:00:00:22', ips: [] }),
          port('unbound', { server: 'u' }),
          port('unknown-host', { server: 'v', host: 'n9' }),
          port('othernet', { server: 'w', host: 'n3', net: 'net2', mac: 'fa:16:3e:00:00:99' }),
          port('otherns', { server: 'w', host: 'n3', ns: 'p2', mac: 'fa:16:3e:00:00:98' }),
        ],
        networks: [network('net'), network('net2', { vni: 200 })],
      }),
    );
    expect(r.plan.networks).toHaveLength(1);
    const n = r.plan.networks[0]!;
    expect(n.peers).toEqual(['10.9.0.2', '10.9.0.3']);
    expect(n.remotePorts).toEqual([
      { mac: 'fa:16:3e:00:00:21', ips: ['10.0.0.21'], hostIP: '10.9.0.2' },
      { mac: 'fa:16:3e:00:00:22', ips: [], hostIP: '10.9.0.2' },
      { mac: 'fa:16:3e:00:00:31', ips: ['10.0.0.31'], hostIP: '10.9.0.3' },
    ]);
  });

  it('a port moving here (still bound to its old node) is local, not a remote port or a peer', () => {
    const r = buildPlan(
      input({
        servers: [server('web', [{ network: 'net' }])],
        ports: [
          port('web-0', { server: 'web', host: 'n2', mac: 'fa:16:3e:00:00:01' }),
          port('r1', { server: 'x', host: 'n3', mac: 'fa:16:3e:00:00:31', ips: [] }),
        ],
      }),
    );
    expect(r.plan.ports.map((p) => p.name)).toEqual(['web-0']);
    const n = r.plan.networks[0]!;
    expect(n.peers).toEqual(['10.9.0.3']);
    expect(n.remotePorts).toEqual([{ mac: 'fa:16:3e:00:00:31', ips: [], hostIP: '10.9.0.3' }]);
  });

  it('uses the configured host IP over the Hypervisor status', () => {
    const r = buildPlan(input({ hostIP: '192.0.2.1' }));
    expect(r.plan.hostIP).toBe('192.0.2.1');
  });
});

describe('buildPlan: security groups', () => {
  it('resolves the default group, members across nodes, and remote groups of included groups', () => {
    const r = buildPlan(
      input({
        servers: [server('web', [{ network: 'net' }])],
        ports: [
          port('web-0', { server: 'web', sgs: ['web'], pairs: [{ ipAddress: '10.0.0.100' }] }),
          port('db-0', { server: 'db', host: 'n2', sgs: ['db'], ips: [{ subnet: 'v4', ipAddress: '10.0.0.20' }] }),
          port('other-0', { server: 'o', host: 'n3', ips: [{ subnet: 'v4', ipAddress: '10.0.0.30' }] }),
          port('foreign', { ns: 'p2', sgs: ['db'], ips: [{ subnet: 'v4', ipAddress: '10.0.0.40' }] }),
        ],
        securityGroups: [
          sg('default', [{ direction: 'ingress', remoteGroup: 'default' }]),
          sg('web', [
            { direction: 'ingress', protocol: 'tcp', portRangeMin: 80, portRangeMax: 80 },
            {
              direction: 'egress',
              ethertype: 'IPv4',
              protocol: 'tcp',
              portRangeMin: 5432,
              portRangeMax: 5432,
              remoteGroup: 'db',
            },
            { direction: 'egress', ethertype: 'IPv6', protocol: 'any', remoteIPPrefix: '::/0' },
          ]),
          sg('db', [{ direction: 'ingress', remoteGroup: 'web' }]),
          sg('db', [], 'p2'),
        ],
      }),
    );
    const p = r.plan.ports[0]!;
    expect(p.securityGroups).toEqual(['uid-sg-p1-web']);
    expect(p.allowedAddressPairs).toEqual([{ ipAddress: '10.0.0.100', macAddress: 'fa:16:3e:00:00:01' }]);
    const byName = Object.fromEntries(r.plan.securityGroups.map((g) => [g.name, g]));
    expect(Object.keys(byName).sort()).toEqual(['db', 'web']);
    expect(byName.web!.memberIPs).toEqual(['10.0.0.10', '10.0.0.100', 'fd00:1::10']);
    expect(byName.web!.rules).toEqual([
      { direction: 'ingress', ethertype: 'IPv4', protocol: 'tcp', portRangeMin: 80, portRangeMax: 80 },
      {
        direction: 'egress',
        ethertype: 'IPv4',
        protocol: 'tcp',
        portRangeMin: 5432,
        portRangeMax: 5432,
        remoteGroupId: 'uid-sg-p1-db',
      },
      { direction: 'egress', ethertype: 'IPv6', remoteIPPrefix: '::/0' },
    ]);
    // db is there for its members (only the p1 port), with its rule naming web
    expect(byName.db!.memberIPs).toEqual(['10.0.0.20']);
    expect(byName.db!.rules).toEqual([{ direction: 'ingress', ethertype: 'IPv4', remoteGroupId: 'uid-sg-p1-web' }]);
    expect(r.problems).toEqual([]);
  });

  it('a port with no securityGroups gets default; a self-referencing default lists all its members', () => {
    const r = buildPlan(
      input({
        servers: [server('web', [{ network: 'net' }])],
        ports: [
          port('web-0', { server: 'web' }),
          port('x', { host: 'n2', ips: [{ subnet: 'v4', ipAddress: '10.0.0.7' }] }),
        ],
        securityGroups: [sg('default', [{ direction: 'ingress', remoteGroup: 'default' }])],
      }),
    );
    expect(r.plan.securityGroups).toEqual([
      {
        id: 'uid-sg-p1-default',
        name: 'default',
        namespace: NS,
        stateful: true,
        rules: [{ direction: 'ingress', ethertype: 'IPv4', remoteGroupId: 'uid-sg-p1-default' }],
        memberIPs: ['10.0.0.10', '10.0.0.7', 'fd00:1::10'],
      },
    ]);
  });

  it('port security off (on the port or inherited from the network): no groups, no pairs', () => {
    expect(effectiveGroups(port('a', { security: false }), network('net'))).toEqual([]);
    const open = network('net', { spec: { portSecurityEnabled: false, subnets: [] } });
    expect(effectiveGroups(port('a', { sgs: ['web'] }), open)).toEqual([]);
    expect(effectiveGroups(port('a', { security: true }), open)).toEqual(['default']);
    const r = buildPlan(
      input({
        servers: [server('web', [{ network: 'net' }])],
        ports: [port('web-0', { server: 'web', security: false })],
      }),
    );
    expect(r.plan.ports[0]).toMatchObject({ portSecurity: false, securityGroups: [], allowedAddressPairs: [] });
    expect(r.plan.securityGroups).toEqual([]);
  });

  it('a missing group contributes no rules and is reported; a rule naming a missing remote group is dropped', () => {
    const r = buildPlan(
      input({
        servers: [server('web', [{ network: 'net' }])],
        ports: [port('web-0', { server: 'web', sgs: ['gone', 'web'] })],
        securityGroups: [
          sg('web', [
            { direction: 'ingress', remoteGroup: 'ghost' },
            { direction: 'ingress', protocol: 'icmp' },
          ]),
        ],
      }),
    );
    expect(r.plan.ports[0]!.securityGroups).toEqual(['uid-sg-p1-web']);
    expect(r.plan.securityGroups[0]!.rules).toEqual([{ direction: 'ingress', ethertype: 'IPv4', protocol: 'icmp' }]);
    expect(r.problems).toEqual([
      expect.stringMatching(/security group p1\/gone does not exist/),
      expect.stringMatching(/p1\/ghost .*does not exist/),
    ]);
  });
});

describe('NICs', () => {
  it('builds addresses with prefixes, gateways, routes and DNS from the port subnets', () => {
    const r = buildPlan(
      input({ servers: [server('web', [{ network: 'net' }])], ports: [port('web-0', { server: 'web' })] }),
    );
    const nic = nicFor(r.plan.ports[0]!, network('net'));
    expect(nic).toEqual({
      device: 'stt-uidportweb0',
      mac: 'fa:16:3e:00:00:01',
      mtu: 1450,
      addresses: ['10.0.0.10/24', 'fd00:1::10/64'],
      gateway: '10.0.0.1',
      gateway6: 'fd00:1::1',
      routes: [{ to: '192.168.0.0/16', via: '10.0.0.254' }],
      dns: ['10.0.0.53'],
      portId: 'uid-port-web-0',
      networkId: 'uid-net-net',
    });
  });

  it('omits disabled gateways; an address of an unknown subnet gets a host prefix', () => {
    const net = network('net', {
      spec: { subnets: [{ name: 'v4', cidr: '10.0.0.0/24', disableGateway: true }] },
      status: { segmentationID: 5, mtu: 1400, subnets: [{ name: 'v4', cidr: '10.0.0.0/24', ipVersion: 4 }] },
    });
    const r = buildPlan(
      input({
        networks: [net],
        servers: [server('web', [{ network: 'net' }])],
        ports: [
          port('web-0', {
            server: 'web',
            ips: [
              { subnet: 'v4', ipAddress: '10.0.0.9' },
              { subnet: 'old', ipAddress: 'fd00::9' },
            ],
          }),
        ],
      }),
    );
    const nic = nicFor(r.plan.ports[0]!, net);
    expect(nic.addresses).toEqual(['10.0.0.9/24', 'fd00::9/128']);
    expect(nic.gateway).toBeUndefined();
    expect(nic.gateway6).toBeUndefined();
    expect(nic.mtu).toBe(1400);
  });

  it('serverNics waits for unusable or unwired ports and returns NICs in spec order once all are wired', () => {
    const r = buildPlan(
      input({
        servers: [server('web', [{ port: 'b' }, { port: 'a' }, { port: 'c' }])],
        ports: [
          port('a', { server: 'web', mac: 'fa:16:3e:00:00:0a' }),
          port('b', { server: 'web', mac: 'fa:16:3e:00:00:0b' }),
        ],
      }),
    );
    const s = r.servers.get(`${NS}/web`)!;
    const wired = new Map<string, { ready: boolean; message?: string }>([['uid-port-a', { ready: true }]]);
    expect(serverNics(s, (id) => wired.get(id))).toEqual({
      waiting: ['port b is not wired on this node yet', 'port c does not exist yet'],
    });
    const r2 = buildPlan(
      input({
        servers: [server('web', [{ port: 'b' }, { port: 'a' }])],
        ports: [
          port('a', { server: 'web', mac: 'fa:16:3e:00:00:0a' }),
          port('b', { server: 'web', mac: 'fa:16:3e:00:00:0b' }),
        ],
      }),
    );
    wired.set('uid-port-b', { ready: false, message: 'tap missing' });
    expect(serverNics(r2.servers.get(`${NS}/web`)!, (id) => wired.get(id))).toEqual({
      waiting: ['port b is not wired on this node yet: tap missing'],
    });
    wired.set('uid-port-b', { ready: true });
    const out = serverNics(r2.servers.get(`${NS}/web`)!, (id) => wired.get(id));
    expect('nics' in out && out.nics.map((n) => n.mac)).toEqual(['fa:16:3e:00:00:0b', 'fa:16:3e:00:00:0a']);
  });

  it('the port fingerprint changes with the port plan and the network, not with peers', () => {
    const base = input({ servers: [server('web', [{ network: 'net' }])], ports: [port('web-0', { server: 'web' })] });
    const fp = portFingerprint(buildPlan(base).plan, 'uid-port-web-0');
    const withPeer = buildPlan({
      ...base,
      ports: [...base.ports, port('r', { server: 'x', host: 'n2', mac: 'fa:16:3e:00:00:77' })],
    });
    expect(portFingerprint(withPeer.plan, 'uid-port-web-0')).toBe(fp);
    const mtu = buildPlan({ ...base, networks: [network('net', { status: { segmentationID: 100, mtu: 1400 } })] });
    expect(portFingerprint(mtu.plan, 'uid-port-web-0')).not.toBe(fp);
    expect(portFingerprint(mtu.plan, 'nope')).toBeUndefined();
  });
});

describe('port binding', () => {
  const plan = buildPlan(
    input({ servers: [server('web', [{ network: 'net' }])], ports: [port('web-0', { server: 'web' })] }),
  ).plan;

  it('binds wired local ports, unbinds ports still bound here that are no longer local, skips the rest', () => {
    const local = port('web-0', { server: 'web' });
    const stale = port('old', { server: 'gone', host: NODE });
    const remote = port('far', { server: 'x', host: 'n2' });
    const changes = bindingChanges(NODE, 'bridge', [local, stale, remote], plan, { 'uid-port-web-0': { ready: true } });
    expect(changes.map((c) => [c.kind, c.port.metadata?.name])).toEqual([
      ['bind', 'web-0'],
      ['unbind', 'old'],
    ]);
  });

  it('writes nothing when the status already says so', () => {
    const local = port('web-0', { server: 'web' });
    const st: Record<string, unknown> = structuredClone(local.status) as never;
    const setCond = (conds: unknown, c: object) => [
      ...((conds as object[]) ?? []).filter((x) => (x as { type: string }).type !== PORT_BOUND),
      c,
    ];
    const change = bindingChanges(NODE, 'bridge', [local], plan, { 'uid-port-web-0': { ready: true } })[0]!;
    const written = bindingStatus(change, st, NODE, 'bridge', setCond)!;
    expect(written).toMatchObject({ bindingHost: NODE, vifType: 'bridge' });
    expect(written.status).toBe(local.status?.status); // status.status is the operator's (derived from Bound)
    expect((written.conditions as { type: string; status: string }[]).find((c) => c.type === PORT_BOUND)).toMatchObject(
      { status: 'True', reason: 'Wired' },
    );
    const bound = { ...local, status: written as PortObj['status'] };
    expect(bindingChanges(NODE, 'bridge', [bound], plan, { 'uid-port-web-0': { ready: true } })).toEqual([]);
    // the backend reports it broken: Bound False with the reason (the operator shows BUILD)
    const broken = bindingChanges(NODE, 'bridge', [bound], plan, {
      'uid-port-web-0': { ready: false, message: 'no tap' },
    });
    expect(broken).toHaveLength(1);
    const st2 = bindingStatus(broken[0]!, structuredClone(written), NODE, 'bridge', setCond)!;
    expect(st2.status).toBe(written.status);
    expect((st2.conditions as { type: string; status: string }[]).find((c) => c.type === PORT_BOUND)?.status).toBe(
      'False',
    );
    expect((st2.conditions as { type: string; message: string }[]).find((c) => c.type === PORT_BOUND)?.message).toMatch(
      /no tap/,
    );
  });

  it('an unbind only clears a binding that still names this node', () => {
    const setCond = (conds: unknown, c: object) => [...((conds as object[]) ?? []), c];
    const stale = port('old', { server: 'gone', host: NODE });
    const change = { kind: 'unbind' as const, port: stale };
    const st = bindingStatus(
      change,
      { ...stale.status, vifType: 'bridge', status: 'ACTIVE' },
      NODE,
      'bridge',
      setCond,
    )!;
    expect(st.bindingHost).toBeUndefined();
    expect(st.vifType).toBeUndefined();
    expect(st.status).toBe('ACTIVE'); // untouched: the operator derives DOWN from the Unbound condition
    expect(st.conditions).toContainEqual(
      expect.objectContaining({ type: PORT_BOUND, status: 'False', reason: 'Unbound' }),
    );
    expect(bindingStatus(change, { ...stale.status, bindingHost: 'n2' }, NODE, 'bridge', setCond)).toBeUndefined();
  });
});
