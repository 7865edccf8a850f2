import { describe, expect, it } from 'vitest';
import { deviceWithAddress, isTap, parseAddrs, parseFdb, parseLinks, parseNetnsList, vxlanData } from './observe.ts';

// Real outputs of iproute2 6.1 (`ip -j -d link show`), trimmed to one device each.
const VXLAN =
  '[{"ifindex":5,"ifname":"stx-9","flags":["BROADCAST","MULTICAST"],"mtu":1450,"qdisc":"noop","master":"stb-9","operstate":"DOWN","linkmode":"DEFAULT","group":"default","txqlen":1000,"link_type":"ether","address":"8e:81:63:02:82:b5","broadcast":"ff:ff:ff:ff:ff:ff","promiscuity":1,"allmulti":1,"min_mtu":68,"max_mtu":65535,"linkinfo":{"info_kind":"vxlan","info_data":{"id":9,"local":"10.9.0.1","link":"eth0","port_range":{"low":0,"high":0},"port":4789,"learning":false,"ttl":0,"df":"unset","ageing":300,"udp_csum":true,"udp_zero_csum6_tx":false,"udp_zero_csum6_rx":false},"info_slave_kind":"bridge","info_slave_data":{"state":"disabled","priority":32,"cost":2,"hairpin":false,"guard":false,"root_block":false,"fastleave":false,"learning":true,"flood":true,"id":"0x8001","no":"0x1","designated_port":32769,"designated_cost":0,"bridge_id":"8000.3e:f5:e4:e0:93:c7","root_id":"8000.3e:f5:e4:e0:93:c7","hold_timer":0.00,"message_age_timer":0.00,"forward_delay_timer":0.00,"topology_change_ack":0,"config_pending":0,"proxy_arp":false,"proxy_arp_wifi":false,"multicast_router":1,"mcast_flood":true,"bcast_flood":true,"mcast_to_unicast":false,"neigh_suppress":false,"group_fwd_mask":"0","group_fwd_mask_str":"0x0","vlan_tunnel":false,"isolated":false,"locked":false}},"inet6_addr_gen_mode":"eui64","num_tx_queues":1,"num_rx_queues":1,"gso_max_size":65536,"gso_max_segs":65535,"tso_max_size":524280,"tso_max_segs":65535,"gro_max_size":65536,"ifalias":"stratus:net=x,vni=9"}]';
const TAP =
  '[{"ifindex":6,"ifname":"stt-a","flags":["BROADCAST","MULTICAST"],"mtu":1500,"qdisc":"noop","master":"stb-9","operstate":"DOWN","linkmode":"DEFAULT","group":"default","txqlen":1000,"link_type":"ether","address":"3e:f5:e4:e0:93:c7","broadcast":"ff:ff:ff:ff:ff:ff","promiscuity":1,"allmulti":1,"min_mtu":68,"max_mtu":65521,"linkinfo":{"info_kind":"tun","info_data":{"type":"tap","pi":false,"vnet_hdr":true,"multi_queue":false,"persist":true},"info_slave_kind":"bridge","info_slave_data":{"state":"disabled","priority":32,"cost":2,"hairpin":false,"guard":false,"root_block":false,"fastleave":false,"learning":true,"flood":true,"id":"0x8002","no":"0x2","designated_port":32770,"designated_cost":0,"bridge_id":"8000.3e:f5:e4:e0:93:c7","root_id":"8000.3e:f5:e4:e0:93:c7","hold_timer":0.00,"message_age_timer":0.00,"forward_delay_timer":0.00,"topology_change_ack":0,"config_pending":0,"proxy_arp":false,"proxy_arp_wifi":false,"multicast_router":1,"mcast_flood":true,"bcast_flood":true,"mcast_to_unicast":false,"neigh_suppress":false,"group_fwd_mask":"0","group_fwd_mask_str":"0x0","vlan_tunnel":false,"isolated":false,"locked":false}},"inet6_addr_gen_mode":"eui64","num_tx_queues":1,"num_rx_queues":1,"gso_max_size":65536,"gso_max_segs":65535,"tso_max_size":65536,"tso_max_segs":65535,"gro_max_size":65536}]';

describe('observe parsers', () => {
  it('parses links, VXLAN attributes, taps and aliases', () => {
    const [vx] = parseLinks(VXLAN);
    expect(vx).toMatchObject({
      ifindex: 5,
      ifname: 'stx-9',
      mtu: 1450,
      master: 'stb-9',
      ifalias: 'stratus:net=x,vni=9',
    });
    expect(vxlanData(vx!)).toMatchObject({ id: 9, local: '10.9.0.1', link: 'eth0', port: 4789, learning: false });
    expect(isTap(vx!)).toBe(false);
    const [tap] = parseLinks(TAP);
    expect(isTap(tap!)).toBe(true);
    expect(vxlanData(tap!)).toBeUndefined();
    expect(parseLinks('')).toEqual([]);
  });

  it('fails loudly on an unexpected format instead of seeing no devices', () => {
    expect(() => parseLinks('[{"ifname":"x"}]')).toThrow();
    expect(() => parseLinks('{"not":"a list"}')).toThrow();
  });

  it('parses FDB entries, addresses and namespace lists', () => {
    const fdb = parseFdb(
      '[{"mac":"00:00:00:00:00:00","ifname":"stx-9","dst":"10.9.0.2","flags":["self"],"state":"permanent"},{"mac":"8e:81:63:02:82:b5","ifname":"stx-9","flags":[],"master":"stb-9","state":"permanent"}]',
    );
    expect(fdb[0]).toMatchObject({ mac: '00:00:00:00:00:00', dst: '10.9.0.2', flags: ['self'] });
    expect(fdb[1]!.dst).toBeUndefined();
    const addrs = parseAddrs(
      '[{"ifindex":1,"ifname":"lo","addr_info":[]},{"ifindex":3,"ifname":"eth0","addr_info":[{"family":"inet","local":"10.9.0.1","prefixlen":24}]}]',
    );
    expect(deviceWithAddress(addrs, '10.9.0.1')).toBe('eth0');
    expect(deviceWithAddress(addrs, '10.9.0.2')).toBeUndefined();
    // `ip -j netns list` prints nothing at all without namespaces, and one JSON array otherwise
    expect(parseNetnsList('')).toEqual([]);
    expect(parseNetnsList('[{"name":"a"},{"name":"b","id":0}]\n')).toEqual([{ name: 'a' }, { name: 'b', id: 0 }]);
  });
});
