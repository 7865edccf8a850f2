import { describe, expect, it } from 'vitest';
import type { NetworkPlan, NodeNetworkPlan, PortPlan } from './backend.ts';
import { tapName } from './names.ts';
import {
  allocateLocalVlans,
  allocateZones,
  DEAD_VLAN,
  EXT,
  hybridNames,
  type Observed,
  type ObservedOvsPort,
  observedOvsNetworks,
  planApply,
  planUnderlayMove,
  tunnelName,
} from './ovs.ts';

const NET = 'a0a0a0a0-0000-4000-8000-00000000000a';
const PORT = 'a1000000-0000-4000-8000-000000000001';
const cfg = {
  integrationBridge: 'br-int',
  datapathType: 'netdev' as const,
  vsctl: (c: readonly (readonly string[])[]) => c.flatMap((x, i) => (i ? ['--', ...x] : [...x])),
};

function net(over: Partial<NetworkPlan> = {}): NetworkPlan {
  return {
    id: NET,
    name: 'a',
    namespace: 'x',
    vni: 100,
    mtu: 1450,
    adminStateUp: true,
    subnets: [],
    peers: ['10.0.0.2'],
    remotePorts: [],
    ...over,
  };
}
function port(over: Partial<PortPlan> = {}): PortPlan {
  return {
    id: PORT,
    name: 'p',
    namespace: 'x',
    networkId: NET,
    device: tapName(PORT),
    mac: 'fa:16:3e:00:00:01',
    fixedIPs: [],
    adminStateUp: true,
    portSecurity: false,
    allowedAddressPairs: [],
    securityGroups: [],
    ...over,
  };
}
const plan = (p: Partial<NodeNetworkPlan> = {}): NodeNetworkPlan => ({
  hostIP: '10.0.0.1',
  networks: [net()],
  ports: [port()],
  securityGroups: [],
  ...p,
});
const empty: Observed = { bridges: [], ports: [], links: [] };
const ovsPort = (o: Partial<ObservedOvsPort> & { name: string }): ObservedOvsPort => ({
  bridge: 'br-int',
  protected: false,
  externalIds: {},
  type: '',
  options: {},
  ifaceExternalIds: {},
  ...o,
});

describe('OVS backend planning', () => {
  it('names fit IFNAMSIZ and are stable', () => {
    const h = hybridNames(PORT);
    expect(h).toEqual({ qbr: 'stq-a1000000000', qvb: 'stv-a1000000000', qvo: 'sto-a1000000000' });
    expect(tunnelName(100, '10.0.0.2')).toMatch(/^stn-[0-9a-f]{11}$/);
    expect(tunnelName(100, '10.0.0.2')).toBe(tunnelName(100, '10.0.0.2'));
    expect(tunnelName(100, '10.0.0.2')).not.toBe(tunnelName(101, '10.0.0.2'));
  });

  it('keeps recorded local VLANs and avoids VLANs of other ports', () => {
    const b = 'b0b0b0b0-0000-4000-8000-00000000000b';
    const observed = [
      ovsPort({ name: 'sto-x', tag: 7, externalIds: { [EXT.net]: b, [EXT.localVlan]: '7' } }),
      ovsPort({ name: 'foreign', tag: 1 }),
    ];
    const v = allocateLocalVlans([net(), net({ id: b })], observed, 'br-int');
    expect(v.get(b)).toBe(7);
    expect(v.get(NET)).toBe(2);
  });

  it('keeps recorded conntrack zones, first come first served on duplicates', () => {
    const observed = [
      ovsPort({ name: 'a', externalIds: { [EXT.port]: 'p2', [EXT.zone]: '5' } }),
      ovsPort({ name: 'b', externalIds: { [EXT.port]: 'gone', [EXT.zone]: '1' } }),
    ];
    expect(Object.fromEntries(allocateZones(['p1', 'p2'], observed))).toEqual({ p1: 2, p2: 5 });
  });

  it('plans a fresh node: tunnel first (protected), then the hybrid plug, the tagged access port and tx offload off', () => {
    const { steps } = planApply(plan(), empty, cfg);
    const text = steps.map((s) => [s.cmd, ...s.args].join(' '));
    expect(text[0]).toContain(`add-port br-int ${tunnelName(100, '10.0.0.2')}`);
    expect(text[0]).toContain('protected=true');
    expect(text[0]).toContain('options:key="100"');
    expect(text[0]).toContain('options:dst_port="4789"');
    expect(text).toContain(`ip tuntap add dev ${tapName(PORT)} mode tap vnet_hdr`);
    expect(text.some((t) => t.startsWith('ip link add name stq-a1000000000 mtu 1450 type bridge'))).toBe(true);
    expect(text).toContain('ip link add name stv-a1000000000 mtu 1450 type veth peer name sto-a1000000000 mtu 1450');
    expect(text).toContain('ethtool -K stv-a1000000000 tx off');
    const last = text.at(-1)!;
    expect(last).toContain('add-port br-int sto-a1000000000 -- set Port sto-a1000000000 tag=1 protected=false');
    expect(last).toContain(`external_ids:iface-id=${PORT}`);
  });

  it('puts admin-down ports in the dead VLAN and leaves foreign devices alone', () => {
    const { steps } = planApply(
      plan({ ports: [port({ adminStateUp: false })] }),
      {
        ...empty,
        links: [
          { name: 'stt-other', kind: 'veth', mtu: 1500, up: true },
          { name: 'eth0', mtu: 1500, up: true },
        ],
      },
      cfg,
    );
    const text = steps.map((s) => s.args.join(' '));
    expect(text.at(-1)).toContain(`tag=${DEAD_VLAN}`);
    expect(text.some((t) => t.includes('stt-other') || t.includes('eth0'))).toBe(false);
  });

  it('removes only stale ports and devices with the ownership marker, never by name prefix alone', () => {
    const mark = { alias: 'stratus:port=deadbeef' };
    const obs: Observed = {
      bridges: [],
      ports: [
        ovsPort({ name: 'stn-00000000000', externalIds: { [EXT.kind]: 'tunnel' }, options: { remote_ip: '10.0.0.9' } }),
        ovsPort({ name: 'sto-foreign0000' }), // our prefix, no marker: someone else's
        ovsPort({ name: 'other' }),
      ],
      links: [
        { name: 'stq-deadbeef000', kind: 'bridge', mtu: 1450, up: true, ...mark },
        { name: 'stv-deadbeef000', kind: 'veth', peer: 'sto-deadbeef000', mtu: 1450, up: true, ...mark },
        { name: 'sto-deadbeef000', kind: 'veth', peer: 'stv-deadbeef000', mtu: 1450, up: true, ...mark },
        { name: 'stt-deadbeef000', kind: 'tun', mtu: 1450, up: true, ...mark },
        { name: 'stt-standin0000', kind: 'veth', mtu: 1450, up: true },
        { name: 'stt-unmarked000', kind: 'tun', mtu: 1450, up: true }, // a tap another tool made
        { name: 'stq-unmarked000', kind: 'bridge', mtu: 1450, up: true },
      ],
    };
    const text = planApply(plan({ networks: [], ports: [] }), obs, cfg).steps.map((s) => [s.cmd, ...s.args].join(' '));
    expect(text).toEqual([
      'ovs-vsctl --if-exists del-port br-int stn-00000000000',
      'ip link del dev stq-deadbeef000',
      'ip link del dev stv-deadbeef000',
      'ip link del dev stt-deadbeef000',
    ]);
  });

  it('keeps the whole plug of a tap a process still holds open, even when the plan lost its port', () => {
    const mark = { alias: 'stratus:port=deadbeef' };
    const obs: Observed = {
      bridges: [],
      ports: [ovsPort({ name: 'sto-deadbeef000', externalIds: { [EXT.kind]: 'vif' } })],
      links: [
        { name: 'stq-deadbeef000', kind: 'bridge', mtu: 1450, up: true, ...mark },
        { name: 'stv-deadbeef000', kind: 'veth', peer: 'sto-deadbeef000', mtu: 1450, up: true, ...mark },
        { name: 'sto-deadbeef000', kind: 'veth', peer: 'stv-deadbeef000', mtu: 1450, up: true, ...mark },
        { name: 'stt-deadbeef000', kind: 'tun', mtu: 1450, up: true, carrier: true, ...mark },
      ],
    };
    expect(planApply(plan({ networks: [], ports: [] }), obs, cfg).steps).toEqual([]);
  });

  it('reads the networks wired on the node from the marked br-int ports (after an agent restart)', () => {
    const ports = [
      ovsPort({ name: 'stn-aaaaaaaaaaa', externalIds: { [EXT.kind]: 'tunnel', [EXT.net]: 'n1', [EXT.vni]: '100' } }),
      ovsPort({ name: 'sto-aaaaaaaaaaa', externalIds: { [EXT.kind]: 'vif', [EXT.net]: 'n1' }, mtuRequest: 1450 }),
      ovsPort({ name: 'std-200', externalIds: { [EXT.kind]: 'dhcp', [EXT.net]: 'n2' }, mtuRequest: 1400 }),
      ovsPort({ name: 'sto-bbbbbbbbbbb', externalIds: { [EXT.kind]: 'vif', [EXT.net]: 'n3' }, mtuRequest: 1450 }), // no VNI
      ovsPort({ name: 'sto-foreign0000', mtuRequest: 1450 }), // not ours
    ];
    expect([...observedOvsNetworks(ports)]).toEqual([
      ['n1', { vni: 100, mtu: 1450 }],
      ['n2', { vni: 200, mtu: 1400 }],
    ]);
  });

  it('plans nothing when the node matches, and only the difference when one attribute drifted', () => {
    const h = hybridNames(PORT);
    const tn = tunnelName(100, '10.0.0.2');
    const obs: Observed = {
      bridges: [],
      ports: [
        ovsPort({
          name: tn,
          tag: 1,
          protected: true,
          externalIds: {
            [EXT.kind]: 'tunnel',
            [EXT.net]: NET,
            [EXT.localVlan]: '1',
            [EXT.remote]: '10.0.0.2',
            [EXT.vni]: '100',
          },
          type: 'vxlan',
          options: { remote_ip: '10.0.0.2', local_ip: '10.0.0.1', key: '100', dst_port: '4789' },
        }),
        ovsPort({
          name: h.qvo,
          tag: 1,
          externalIds: { [EXT.kind]: 'vif', [EXT.net]: NET, [EXT.port]: PORT, [EXT.localVlan]: '1', [EXT.zone]: '1' },
          ifaceExternalIds: { 'iface-id': PORT, 'attached-mac': 'fa:16:3e:00:00:01' },
          mtuRequest: 1450,
        }),
      ],
      links: [
        {
          name: h.qbr,
          kind: 'bridge',
          mtu: 1450,
          up: true,
          alias: `stratus:port=${PORT}`,
          stpState: 0,
          forwardDelay: 0,
          nfCall: true,
        },
        {
          name: h.qvb,
          kind: 'veth',
          peer: h.qvo,
          master: h.qbr,
          mtu: 1450,
          up: true,
          txChecksum: false,
          alias: `stratus:port=${PORT}`,
        },
        { name: h.qvo, kind: 'veth', peer: h.qvb, mtu: 1450, up: true, alias: `stratus:port=${PORT}` },
        { name: tapName(PORT), kind: 'tun', master: h.qbr, mtu: 1450, up: true, alias: `stratus:port=${PORT}` },
      ],
    };
    expect(planApply(plan(), obs, cfg).steps).toEqual([]);
    const drifted = structuredClone(obs);
    drifted.ports[1]!.tag = 9;
    drifted.links[3]!.mtu = 1500;
    const text = planApply(plan(), drifted, cfg).steps.map((s) => [s.cmd, ...s.args].join(' '));
    expect(text).toEqual([
      `ip link set dev ${tapName(PORT)} master ${h.qbr} mtu 1450 alias stratus:port=${PORT} up`,
      `ovs-vsctl set Port ${h.qvo} tag=1`,
    ]);
  });

  it('moves the underlay address and routes onto br-phy, idempotently', () => {
    const a = { local: '10.0.0.1', prefixlen: 24, family: 'inet', scope: 'global' };
    const routes = [
      { dst: '10.0.0.0/24', protocol: 'kernel' },
      { dst: 'default', gateway: '10.0.0.254', protocol: 'static' },
    ];
    expect(planUnderlayMove('eth0', 'br-phy', [a], [], routes)).toEqual([
      ['addr', 'add', '10.0.0.1/24', 'dev', 'br-phy'],
      ['route', 'replace', 'default', 'via', '10.0.0.254', 'dev', 'br-phy', 'proto', 'static'],
      ['addr', 'del', '10.0.0.1/24', 'dev', 'eth0'],
    ]);
    expect(planUnderlayMove('eth0', 'br-phy', [], [a], [])).toEqual([]);
  });
});
