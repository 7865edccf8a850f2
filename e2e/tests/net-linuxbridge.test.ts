// The Linux bridge network backend on three simulated nodes (network namespaces on an underlay bridge, netlab.ts),
// with veth VM stand-ins instead of QEMU guests:
//  1. network A (nodes 1, 2) and network B (nodes 1, 3, same IP range as A): pings within a network across nodes
//     pass, B cannot reach A; the 1450 MTU holds (1422-byte DF ping passes, 1423 does not);
//  2. security groups: members of a default-like group reach each other; a port of another group is unreachable
//     until an ingress rule is added and cut off again (including its running flow) when it is removed;
//     anti-spoofing drops a stand-in that changes its address;
//  3. DHCP: a stand-in without address gets its static lease (router, MTU) from the node-local dnsmasq; an address
//     handed to a new port (new MAC) is reachable from the DHCP namespace at once (stale neighbour entry flushed);
//  4. idempotence: a second apply and a new backend instance (agent restart) run no changing command and keep every
//     ifindex; stale removal needs the ownership marker (a tap with our prefix but no marker survives) and keeps a
//     bridge that still has a guest attached; removal then leaves no Stratus device, table, namespace or dnsmasq.
// Needs root, iproute2, nft, conntrack, dnsmasq and busybox (udhcpc); skipped with a message otherwise.
import { execFileSync, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type {
  NetworkPlan,
  NodeNetworkPlan,
  PortPlan,
  SecurityGroupPlan,
} from '../../node-agent/src/network/backend.ts';
import { dhcpMac } from '../../node-agent/src/network/dhcp.ts';
import { type Exec, hostExec } from '../../node-agent/src/network/exec.ts';
import { LinuxBridgeBackend } from '../../node-agent/src/network/linuxbridge.ts';
import { bridgeName, tapName, vxlanName } from '../../node-agent/src/network/names.ts';
import { renderRules, replaceBatch } from '../../node-agent/src/network/nft.ts';
import { parseLinks, parseNetnsList } from '../../node-agent/src/network/observe.ts';
import { createLab, type LabNode, type NetLab, type VmStandIn } from '../testing/netlab.ts';
import { waitFor } from '../testing/wait.ts';

const log = (m: string) => console.error(`[net-linuxbridge] ${m}`);
const PREFIX = 'h2lb';

function missingPrerequisite(): string | undefined {
  if (process.getuid?.() !== 0) return 'not root';
  for (const tool of ['ip', 'bridge', 'nft', 'conntrack', 'dnsmasq', 'busybox', 'ping']) {
    try {
      execFileSync('which', [tool], { stdio: 'ignore' });
    } catch {
      return `${tool} is not installed`;
    }
  }
  return undefined;
}
const missing = missingPrerequisite();
if (missing) log(`SKIPPED: ${missing} (needs root, iproute2, nftables, conntrack, dnsmasq, busybox, ping)`);

/** An Exec that records every command (to count the changing ones). */
function recording(inner: Exec, log: string[][]): Exec {
  return {
    netns: inner.netns,
    argv: (c, a) => inner.argv(c, a),
    run(cmd, args, opts) {
      log.push([cmd, ...args]);
      return inner.run(cmd, args, opts);
    },
  };
}

/** Commands that change something (everything but the observations). */
function changing(cmds: string[][]): string[][] {
  return cmds.filter(([cmd, ...a]) => {
    if ((cmd === 'ip' || cmd === 'bridge') && a.includes('-j')) return false;
    if (cmd === 'nft' && a[0] === 'list') return false;
    if (cmd === 'sysctl' && a[0] === '-n') return false;
    return true;
  });
}

const uid = (n: number) => `${n.toString(16).padStart(8, '0')}-0000-4000-8000-00000000000${n % 10}`;
const mac = (n: number) => `fa:16:3e:00:00:${n.toString(16).padStart(2, '0')}`;

const A = { id: uid(0xa0), vni: 4101, cidr: '192.168.41.0/24' };
const B = { id: uid(0xb0), vni: 4102, cidr: '192.168.41.0/24' };
const SG_DEFAULT = uid(0xd0);
const SG_WEB = uid(0xd1);
const SG_B = uid(0xd2);

interface TestPort {
  key: string;
  id: string;
  node: number;
  net: typeof A;
  ip?: string;
  mac: string;
  groups: string[];
  /** no stand-in: the backend makes a real tap */
  tapOnly?: boolean;
}

const PORTS: TestPort[] = [
  { key: 'a1', id: uid(1), node: 1, net: A, ip: '192.168.41.11', mac: mac(1), groups: [SG_DEFAULT] },
  { key: 'a2', id: uid(2), node: 2, net: A, ip: '192.168.41.12', mac: mac(2), groups: [SG_DEFAULT] },
  { key: 'a3', id: uid(3), node: 1, net: A, ip: '192.168.41.13', mac: mac(3), groups: [SG_WEB] },
  { key: 'a4', id: uid(4), node: 2, net: A, ip: '192.168.41.14', mac: mac(4), groups: [SG_DEFAULT], tapOnly: true },
  { key: 'a5', id: uid(5), node: 2, net: A, ip: '192.168.41.15', mac: mac(5), groups: [SG_DEFAULT] },
  { key: 'b1', id: uid(6), node: 3, net: B, ip: '192.168.41.21', mac: mac(6), groups: [SG_B] },
  { key: 'b2', id: uid(7), node: 1, net: B, ip: '192.168.41.22', mac: mac(7), groups: [SG_B] },
];

function portPlan(p: TestPort): PortPlan {
  return {
    id: p.id,
    name: p.key,
    namespace: 'lab',
    networkId: p.net.id,
    device: tapName(p.id),
    mac: p.mac,
    fixedIPs: p.ip ? [{ subnet: `${p.net === A ? 'a' : 'b'}-v4`, ipAddress: p.ip }] : [],
    adminStateUp: true,
    portSecurity: true,
    allowedAddressPairs: [],
    securityGroups: p.groups,
    hostname: p.key,
  };
}

function groups(webIngress: boolean): SecurityGroupPlan[] {
  const members = (g: string) => PORTS.filter((p) => p.groups.includes(g) && p.ip).map((p) => p.ip!);
  const egressAll = [
    { direction: 'egress' as const, ethertype: 'IPv4' as const },
    { direction: 'egress' as const, ethertype: 'IPv6' as const },
  ];
  const selfRules = (id: string) => [
    ...egressAll,
    { direction: 'ingress' as const, ethertype: 'IPv4' as const, remoteGroupId: id },
    { direction: 'ingress' as const, ethertype: 'IPv6' as const, remoteGroupId: id },
  ];
  return [
    {
      id: SG_DEFAULT,
      name: 'default',
      namespace: 'lab',
      stateful: true,
      rules: selfRules(SG_DEFAULT),
      memberIPs: members(SG_DEFAULT),
    },
    { id: SG_B, name: 'default-b', namespace: 'lab', stateful: true, rules: selfRules(SG_B), memberIPs: members(SG_B) },
    {
      id: SG_WEB,
      name: 'web',
      namespace: 'lab',
      stateful: true,
      rules: [
        ...egressAll,
        ...(webIngress
          ? [{ direction: 'ingress' as const, ethertype: 'IPv4' as const, protocol: 'icmp', remoteIPPrefix: A.cidr }]
          : []),
      ],
      memberIPs: members(SG_WEB),
    },
  ];
}

function plan(lab: NetLab, node: number, webIngress = false): NodeNetworkPlan {
  const local = PORTS.filter((p) => p.node === node);
  const nets = [...new Set(local.map((p) => p.net))];
  const networks: NetworkPlan[] = nets.map((n) => {
    const nodesOf = new Set(PORTS.filter((p) => p.net === n).map((p) => p.node));
    return {
      id: n.id,
      name: n === A ? 'net-a' : 'net-b',
      namespace: 'lab',
      vni: n.vni,
      mtu: 1450,
      adminStateUp: true,
      subnets: [
        {
          name: `${n === A ? 'a' : 'b'}-v4`,
          cidr: n.cidr,
          ipVersion: 4,
          gatewayIP: '192.168.41.1',
          dhcp: n === A,
          dhcpAddress: n === A ? '192.168.41.2' : undefined,
          dnsNameservers: ['192.0.2.53'],
          hostRoutes: [],
        },
      ],
      peers: [...nodesOf].filter((x) => x !== node).map((x) => lab.nodes[x - 1]!.hostIP),
      remotePorts: PORTS.filter((p) => p.net === n && p.node !== node).map((p) => ({
        mac: p.mac,
        ips: p.ip ? [p.ip] : [],
        hostIP: lab.nodes[p.node - 1]!.hostIP,
      })),
    };
  });
  return {
    hostIP: lab.nodes[node - 1]!.hostIP,
    networks,
    ports: local.map(portPlan),
    securityGroups: groups(webIngress),
  };
}

describe.skipIf(missing !== undefined)('Linux bridge backend (3 simulated nodes, veth stand-ins)', () => {
  let lab: NetLab;
  let runDir: string;
  const cmds: string[][][] = [[], [], []];
  const backends: LinuxBridgeBackend[] = [];
  const vms: Record<string, VmStandIn> = {};
  const node = (i: number): LabNode => lab.nodes[i - 1]!;
  const newBackend = (i: number) =>
    new LinuxBridgeBackend({
      exec: recording(hostExec(node(i).netns), cmds[i - 1]!),
      nsExec: recording(hostExec(), cmds[i - 1]!),
      dhcpNetnsPrefix: `${PREFIX}d${i}-`,
      runDir: path.join(runDir, `n${i}`),
    });
  const links = (i: number) => parseLinks(lab.sh(node(i).netns, 'ip', ['-j', '-d', 'link', 'show']));
  const applyAll = async (webIngress = false) => {
    const results = [];
    for (let i = 1; i <= 3; i++) results.push(await backends[i - 1]!.apply(plan(lab, i, webIngress)));
    return results;
  };

  beforeAll(async () => {
    lab = createLab(PREFIX, 3, 241);
    runDir = await mkdtemp(path.join(tmpdir(), 'stratus-h2lb-'));
    await chmod(runDir, 0o755); // dnsmasq drops to nobody and re-reads its hosts file under it
    for (const p of PORTS) {
      if (p.tapOnly) continue;
      // a2's guest MTU is 1500 so that only the data plane limits its packets (MTU check)
      vms[p.key] = lab.vm(node(p.node), p.key, tapName(p.id), p.mac, `${p.ip}/24`, {
        mtu: p.key === 'a2' ? 1500 : 1450,
      });
      // a5 is the DHCP client: no address until it gets its lease
      if (p.key === 'a5') lab.sh(vms[p.key]!.netns, 'ip', ['addr', 'flush', 'dev', 'eth0']);
    }
    for (let i = 1; i <= 3; i++) {
      const b = newBackend(i);
      await b.init();
      backends.push(b);
    }
  });

  afterAll(async () => {
    for (const b of backends) await b.close();
    // fallback cleanup of dnsmasq processes (the removal test normally stops them)
    for (let i = 1; i <= 3; i++) {
      const dir = path.join(runDir ?? '/nonexistent', `n${i}`);
      for (const d of await readdir(dir).catch(() => [] as string[])) {
        const pid = Number((await readFile(path.join(dir, d, 'pid'), 'utf8').catch(() => '')).trim());
        const cmdline = pid ? await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '') : '';
        if (pid && cmdline.includes(runDir)) process.kill(pid, 'SIGKILL');
      }
    }
    lab?.destroy();
    if (runDir) await rm(runDir, { recursive: true, force: true });
  });

  it('wires both networks: ports ready, taps made by the backend, isolation, MTU', async () => {
    const results = await applyAll();
    for (const r of results)
      for (const [id, pr] of Object.entries(r.ports)) expect(pr, id).toMatchObject({ ready: true });
    expect(results[0]!.changes.length).toBeGreaterThan(0);

    // the tap made for a4 (no stand-in): a persistent vnet_hdr tap in A's bridge with the network MTU
    const tap = links(2).find((l) => l.ifname === tapName(uid(4)))!;
    expect(tap.linkinfo).toMatchObject({ info_kind: 'tun', info_data: { type: 'tap', vnet_hdr: true, persist: true } });
    expect(tap).toMatchObject({ master: bridgeName(A.vni), mtu: 1450 });
    const vx = links(1).find((l) => l.ifname === vxlanName(A.vni))!;
    expect(vx.linkinfo?.info_data).toMatchObject({ id: A.vni, port: 4789, local: node(1).hostIP, learning: false });
    expect(vx.mtu).toBe(1450);

    await waitFor('a1 -> a2 across nodes', () => lab.ping(vms.a1!, '192.168.41.12'), 10_000);
    expect(lab.ping(vms.a2!, '192.168.41.11')).toBe(true);
    await waitFor('b2 -> b1 across nodes', () => lab.ping(vms.b2!, '192.168.41.21'), 10_000);
    // B shares A's address range but not its segment
    expect(lab.ping(vms.b2!, '192.168.41.11')).toBe(false);
    expect(lab.ping(vms.b1!, '192.168.41.12')).toBe(false);
    expect(lab.ping(vms.a1!, '192.168.41.22')).toBe(false);

    // MTU 1450 end to end: a2's guest MTU is 1500, so only the data plane limits it
    const df = (size: number) => {
      try {
        lab.sh(vms.a2!.netns, 'ping', ['-c', '1', '-W', '1', '-M', 'do', '-s', String(size), '192.168.41.11']);
        return true;
      } catch {
        return false;
      }
    };
    expect(df(1422)).toBe(true);
    expect(df(1423)).toBe(false);
  });

  it('enforces security groups: group members, ingress rule added and removed (cutting the running flow)', async () => {
    // a3 is in "web" (no ingress): nobody reaches it, and it does not reach default-group members
    expect(lab.ping(vms.a1!, '192.168.41.13')).toBe(false);
    expect(lab.ping(vms.a2!, '192.168.41.13')).toBe(false);
    expect(lab.ping(vms.a3!, '192.168.41.11')).toBe(false);
    // a1 and a5 are members of default on different nodes... a5 has no address yet; a1 <-> a2 pass (above)

    await applyAll(true);
    await waitFor('a1 -> a3 after the ingress rule', () => lab.ping(vms.a1!, '192.168.41.13'), 10_000);
    expect(lab.ping(vms.a2!, '192.168.41.13')).toBe(true);
    // still not the other way round (default's ingress wants members)
    expect(lab.ping(vms.a3!, '192.168.41.11')).toBe(false);

    // a running flow (one ICMP echo conntrack entry) is cut when the rule goes away
    const out = path.join(runDir, 'ping.out');
    // -O: ping reports every echo left unanswered, so "no more replies" is counted, not waited out
    const child = spawn(
      'ip',
      ['netns', 'exec', vms.a1!.netns, 'ping', '-O', '-i', '0.2', '-W', '0.5', '-w', '60', '192.168.41.13'],
      { stdio: ['ignore', 'pipe', 'ignore'] },
    );
    let text = '';
    child.stdout.on('data', (d) => {
      text += String(d);
    });
    const lines = () => text.split('\n');
    const replies = () => lines().filter((l) => l.includes('bytes from')).length;
    const seqOf = (l: string) => Number(/icmp_seq=(\d+)/.exec(l)?.[1] ?? -1);
    try {
      await waitFor('running ping gets replies', () => replies() >= 3, 10_000);
      const r = await applyAll(false);
      // Echoes sent after the apply returned: the first sequence number ping had not printed yet.
      const firstAfter = Math.max(-1, ...lines().map(seqOf)) + 1;
      await waitFor(
        'five echoes after the rule removal to go unanswered',
        () => lines().filter((l) => l.startsWith('no answer yet') && seqOf(l) >= firstAfter).length >= 5,
        30_000,
      );
      expect(lines().filter((l) => l.includes('bytes from') && seqOf(l) > firstAfter)).toEqual([]);
      expect(r[0]!.changes.some((c) => c.startsWith('conntrack -D'))).toBe(true);
    } finally {
      child.kill();
      await writeFile(out, text);
    }
    expect(lab.ping(vms.a1!, '192.168.41.13')).toBe(false);
    expect(lab.ping(vms.a1!, '192.168.41.12')).toBe(true);
  });

  it('drops spoofed sources', async () => {
    const ns = vms.a1!.netns;
    lab.sh(ns, 'ip', ['addr', 'del', '192.168.41.11/24', 'dev', 'eth0']);
    lab.sh(ns, 'ip', ['addr', 'add', '192.168.41.99/24', 'dev', 'eth0']);
    try {
      expect(lab.ping(vms.a1!, '192.168.41.12')).toBe(false);
    } finally {
      lab.sh(ns, 'ip', ['addr', 'del', '192.168.41.99/24', 'dev', 'eth0']);
      lab.sh(ns, 'ip', ['addr', 'add', '192.168.41.11/24', 'dev', 'eth0']);
    }
    await waitFor('a1 -> a2 with its own address again', () => lab.ping(vms.a1!, '192.168.41.12'), 10_000);
  });

  it('takes a port and a network administratively down and up again', async () => {
    const down = (p: NodeNetworkPlan, portDown: boolean, netDown: boolean): NodeNetworkPlan => ({
      ...p,
      networks: p.networks.map((n) => (n.id === A.id ? { ...n, adminStateUp: !netDown } : n)),
      ports: p.ports.map((x) => (x.id === uid(1) ? { ...x, adminStateUp: !portDown } : x)),
    });
    const flags = (dev: string) => links(1).find((l) => l.ifname === dev)!.flags;
    let r = await backends[0]!.apply(down(plan(lab, 1), true, false));
    expect(r.ports[uid(1)]).toMatchObject({ ready: true, message: 'administratively down' });
    expect(flags(tapName(uid(1)))).not.toContain('UP');
    expect(lab.ping(vms.a1!, '192.168.41.12')).toBe(false);
    r = await backends[0]!.apply(down(plan(lab, 1), false, true));
    expect(flags(bridgeName(A.vni))).not.toContain('UP');
    expect(flags(tapName(uid(1)))).toContain('UP');
    expect(lab.ping(vms.a1!, '192.168.41.12')).toBe(false);
    await backends[0]!.apply(plan(lab, 1));
    await waitFor('a1 -> a2 after admin up', () => lab.ping(vms.a1!, '192.168.41.12'), 10_000);
  });

  it('renders every rule kind into tables the real nft accepts', async () => {
    const rendered = renderRules({
      ports: [
        {
          port: {
            id: 'p1',
            mac: 'fa:16:3e:00:01:01',
            fixedIPs: [
              { subnet: 'v4', ipAddress: '10.0.0.5' },
              { subnet: 'v6', ipAddress: 'fd00::5' },
            ],
            allowedAddressPairs: [
              { ipAddress: '0.0.0.0/0', macAddress: '' },
              { ipAddress: '10.0.7.0/24', macAddress: 'fa:16:3e:00:01:aa' },
              { ipAddress: 'fd00:7::/64', macAddress: 'fa:16:3e:00:01:aa' },
            ],
            portSecurity: true,
            securityGroups: ['g1', 'g2'],
          },
          device: 'stt-chk1',
          bridge: 'stb-chk',
          zone: 70000 - 65535,
        },
        {
          port: {
            id: 'p2',
            mac: 'fa:16:3e:00:01:02',
            fixedIPs: [],
            allowedAddressPairs: [],
            portSecurity: true,
            securityGroups: ['g3'],
          },
          device: 'stt-chk2',
          bridge: 'stb-chk',
          zone: 70000 - 65535,
        },
      ],
      securityGroups: [
        {
          id: 'g1',
          name: 'all-kinds',
          namespace: 'lab',
          stateful: true,
          rules: [
            { direction: 'ingress', ethertype: 'IPv4', protocol: 'tcp', portRangeMin: 22, portRangeMax: 22 },
            {
              direction: 'ingress',
              ethertype: 'IPv4',
              protocol: 'udp',
              portRangeMin: 1000,
              portRangeMax: 2000,
              remoteIPPrefix: '10.1.0.0/16',
            },
            { direction: 'ingress', ethertype: 'IPv4', protocol: 'icmp', portRangeMin: 8, portRangeMax: 0 },
            { direction: 'ingress', ethertype: 'IPv6', protocol: 'icmp', portRangeMin: 128 },
            { direction: 'ingress', ethertype: 'IPv6', protocol: 'tcp', portRangeMin: 443, remoteGroupId: 'g2' },
            { direction: 'ingress', ethertype: 'IPv4', protocol: '47' },
            { direction: 'ingress', ethertype: 'IPv4', protocol: 'sctp', portRangeMin: 5000 },
            { direction: 'egress', ethertype: 'IPv6', remoteIPPrefix: '::/0' },
            { direction: 'egress', ethertype: 'IPv4', remoteGroupId: 'g1' },
          ],
          memberIPs: ['10.0.0.5', 'fd00::5', '10.0.7.0/24', '10.0.7.9', '0.0.0.0/0'],
        },
        { id: 'g2', name: 'empty', namespace: 'lab', stateful: true, rules: [], memberIPs: [] },
        {
          id: 'g3',
          name: 'stateless',
          namespace: 'lab',
          stateful: false,
          rules: [
            { direction: 'ingress', ethertype: 'IPv4', protocol: 'udp', portRangeMin: 53 },
            { direction: 'egress', ethertype: 'IPv4', protocol: 'udp' },
          ],
          memberIPs: [],
        },
      ],
      l2Drops: [{ device: 'stx-chk', mac: dhcpMac(70000) }],
      tables: { bridge: 'h2chk_l2', inet: 'h2chk_sg' },
    });
    expect(rendered.warnings).toEqual([]);
    for (const [family, name, text] of [
      ['bridge', 'h2chk_l2', rendered.bridge!],
      ['inet', 'h2chk_sg', rendered.inet!],
    ] as const) {
      // check mode: parsed and validated by the kernel, nothing installed
      execFileSync('ip', ['netns', 'exec', node(3).netns, 'nft', '-c', '-f', '-'], {
        input: replaceBatch(family, name, text),
        stdio: ['pipe', 'pipe', 'pipe'],
      });
    }
  });

  it('serves a static DHCP lease from the node-local dnsmasq', async () => {
    const env = lab.dhcpLease(vms.a5!, runDir);
    expect(env).toMatchObject({ ip: '192.168.41.15', router: '192.168.41.1', mtu: '1450', dns: '192.0.2.53' });
    expect(env.serverid).toBe('192.168.41.2');
    // dnsmasq gave up root once bound: every one of this lab's runs as nobody
    const uids: string[] = [];
    for (let i = 1; i <= 3; i++) {
      const dir = path.join(runDir, `n${i}`);
      for (const d of await readdir(dir).catch(() => [] as string[])) {
        const pid = Number((await readFile(path.join(dir, d, 'pid'), 'utf8').catch(() => '')).trim());
        const status = pid ? await readFile(`/proc/${pid}/status`, 'utf8').catch(() => '') : '';
        const uid = /^Uid:\s+(.*)$/m.exec(status)?.[1];
        if (uid) uids.push(uid);
      }
    }
    expect(uids.length).toBeGreaterThan(0);
    expect(new Set(uids)).toEqual(new Set(['65534\t65534\t65534\t65534']));
    // the DHCP server MAC never crosses the overlay: node1's bridge has not learnt it on its VXLAN port
    const fdb = lab.sh(node(1).netns, 'bridge', ['-j', 'fdb', 'show', 'br', bridgeName(A.vni)]);
    expect(
      (JSON.parse(fdb) as { mac: string; ifname?: string }[]).filter(
        (e) => e.mac === dhcpMac(A.vni) && e.ifname === vxlanName(A.vni),
      ),
    ).toEqual([]);
  });

  it('an address released and handed to a new port (new MAC) is reachable from the DHCP namespace at once', async () => {
    const dhcpNs = `${PREFIX}d2-${A.vni}`;
    const IP = '192.168.41.16';
    // ports without port security, so that the DHCP namespace may ping them (the address is the point here)
    const reused = (id: number, m: string): PortPlan => ({
      ...portPlan({ key: `r${id}`, id: uid(id), node: 2, net: A, ip: IP, mac: m, groups: [] }),
      portSecurity: false,
      securityGroups: [],
    });
    const withPort = (p: PortPlan): NodeNetworkPlan => {
      const base = plan(lab, 2);
      return { ...base, ports: [...base.ports, p] };
    };
    let first: VmStandIn | undefined = lab.vm(node(2), 'r8', tapName(uid(8)), mac(8), `${IP}/24`);
    let second: VmStandIn | undefined;
    try {
      await backends[1]!.apply(withPort(reused(8, mac(8))));
      await waitFor('DHCP namespace -> first holder', () => lab.ping(dhcpNs, IP), 10_000);
      const neigh = JSON.parse(lab.sh(dhcpNs, 'ip', ['-j', 'neigh', 'show', IP])) as { lladdr?: string }[];
      expect(neigh[0]?.lladdr).toBe(mac(8));

      // the port goes, its address is handed to a new port with a new MAC on the same node
      lab.removeVm(first);
      first = undefined;
      second = lab.vm(node(2), 'r9', tapName(uid(9)), mac(9), `${IP}/24`);
      const r = await backends[1]!.apply(withPort(reused(9, mac(9))));
      // the first packet already goes to the new MAC (before, the old entry stayed REACHABLE and then was probed:
      // the first connections timed out); a few one-second attempts, none of which succeeds without the flush
      let ok = false;
      for (let i = 0; i < 3 && !ok; i++) ok = lab.ping(dhcpNs, IP);
      expect(ok).toBe(true);
      expect(r.changes).toContain(`dhcp ${A.vni}: flushed the stale neighbour entry of ${IP}`);
      const after = JSON.parse(lab.sh(dhcpNs, 'ip', ['-j', 'neigh', 'show', IP])) as { lladdr?: string }[];
      expect(after[0]?.lladdr).toBe(mac(9));
    } finally {
      if (first) lab.removeVm(first);
      if (second) lab.removeVm(second);
      await backends[1]!.apply(plan(lab, 2)); // back to the lab's plan (the next tests count changes)
    }
  });

  it('is idempotent and adopts everything after a restart', async () => {
    const before = [1, 2, 3].map((i) => new Map(links(i).map((l) => [l.ifname, l.ifindex])));
    for (const c of cmds) c.length = 0;
    const again = await applyAll();
    for (let i = 0; i < 3; i++) {
      expect(again[i]!.changes, `node${i + 1}`).toEqual([]);
      expect(changing(cmds[i]!), `node${i + 1}`).toEqual([]);
    }
    // a new backend instance (agent restart) adopts devices, FDB, tables and dnsmasq without a change
    for (let i = 1; i <= 3; i++) {
      backends[i - 1] = newBackend(i);
      await backends[i - 1]!.init();
    }
    for (const c of cmds) c.length = 0;
    const adopted = await applyAll();
    for (let i = 0; i < 3; i++) {
      expect(adopted[i]!.changes, `node${i + 1}`).toEqual([]);
      expect(changing(cmds[i]!), `node${i + 1}`).toEqual([]);
      for (const pr of Object.values(adopted[i]!.ports)) expect(pr.ready).toBe(true);
    }
    const after = [1, 2, 3].map((i) => new Map(links(i).map((l) => [l.ifname, l.ifindex])));
    expect(after).toEqual(before);
  });

  it('removes stale FDB entries and devices, and everything when the plan is empty', async () => {
    // a stale flood entry and a stale tap
    lab.sh(node(1).netns, 'bridge', [
      'fdb',
      'append',
      '00:00:00:00:00:00',
      'dev',
      vxlanName(A.vni),
      'dst',
      '10.241.0.77',
      'self',
      'permanent',
    ]);
    lab.sh(node(1).netns, 'ip', ['tuntap', 'add', 'dev', 'stt-deadbeef00', 'mode', 'tap']);
    lab.sh(node(1).netns, 'ip', ['link', 'set', 'stt-deadbeef00', 'alias', 'stratus:port=deadbeef']);
    // the prefix alone proves nothing: a tap someone else made with our prefix survives
    lab.sh(node(1).netns, 'ip', ['tuntap', 'add', 'dev', 'stt-foreign000', 'mode', 'tap']);
    // nor for a DHCP veth end or a namespace named like ours that the agent did not make
    lab.sh(node(1).netns, 'ip', ['link', 'add', 'std-9999', 'type', 'veth', 'peer', 'name', 'std-9999p']);
    const foreignNs = `${PREFIX}d1-9999`;
    execFileSync('ip', ['netns', 'add', foreignNs]);
    let r: Awaited<ReturnType<LinuxBridgeBackend['apply']>>;
    try {
      r = await backends[0]!.apply(plan(lab, 1));
      expect(links(1).some((l) => l.ifname === 'std-9999')).toBe(true);
      const all = parseNetnsList(execFileSync('ip', ['-j', 'netns', 'list'], { encoding: 'utf8' }));
      expect(all.some((n) => n.name === foreignNs)).toBe(true);
    } finally {
      lab.sh(node(1).netns, 'ip', ['link', 'del', 'std-9999']);
      execFileSync('ip', ['netns', 'del', foreignNs]);
    }
    expect(r.changes).toContain('deleted stale stt-deadbeef00');
    expect(r.changes.some((c) => c.includes('stt-foreign000') || c.includes('9999'))).toBe(false);
    expect(links(1).some((l) => l.ifname === 'stt-foreign000')).toBe(true);
    lab.sh(node(1).netns, 'ip', ['link', 'del', 'stt-foreign000']);
    expect(r.changes.some((c) => c.includes('fdb del 00:00:00:00:00:00') && c.includes('10.241.0.77'))).toBe(true);

    const empty = (i: number): NodeNetworkPlan => ({
      hostIP: node(i).hostIP,
      networks: [],
      ports: [],
      securityGroups: [],
    });
    // a bridge that still has a guest attached (here the veth stand-ins) is not proven unused: it stays, with its
    // VXLAN device, until the guests are gone
    await backends[0]!.apply(empty(1));
    expect(
      links(1)
        .filter((l) => /^st[bx]-/.test(l.ifname))
        .map((l) => l.ifname)
        .sort(),
    ).toEqual([bridgeName(A.vni), bridgeName(B.vni), vxlanName(A.vni), vxlanName(B.vni)]);
    for (const vm of Object.values(vms)) lab.removeVm(vm);
    // a namespace goes asynchronously: wait until the stand-ins' node ends are gone too
    const standIns = new Set(Object.values(vms).map((v) => v.device));
    await waitFor(
      'stand-ins gone',
      () => [1, 2, 3].every((i) => !links(i).some((l) => standIns.has(l.ifname))),
      10_000,
    );
    for (let i = 1; i <= 3; i++) {
      const res = await backends[i - 1]!.apply(empty(i));
      expect(res.ports).toEqual({});
      const left = links(i).filter(
        (l) => /^st[bxd]-/.test(l.ifname) || (l.ifname.startsWith('stt-') && l.linkinfo?.info_kind === 'tun'),
      );
      expect(
        left.map((l) => l.ifname),
        `node${i}`,
      ).toEqual([]);
      expect(lab.sh(node(i).netns, 'nft', ['list', 'tables']).trim(), `node${i}`).toBe('');
      const ns = parseNetnsList(execFileSync('ip', ['-j', 'netns', 'list'], { encoding: 'utf8' }));
      expect(ns.filter((n) => n.name.startsWith(`${PREFIX}d${i}-`))).toEqual([]);
      expect(existsSync(path.join(runDir, `n${i}`, `dhcp-${A.vni}`))).toBe(false);
    }
    const dnsmasqs = execFileSync('ps', ['-eo', 'args'], { encoding: 'utf8' })
      .split('\n')
      .filter((l) => l.includes('dnsmasq') && l.includes(runDir));
    expect(dnsmasqs).toEqual([]);
  });
});
