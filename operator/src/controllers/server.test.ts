import { describe, expect, it } from 'vitest';
import {
  MAX_SERVER_ACTIONS,
  NETWORK_LABEL,
  PORT_DEVICE_LABEL,
  type Port,
  recordAction,
  SERVER_NODE_LABEL,
  type Server,
} from '../api/index.ts';
import { statusMergePatch } from '../runtime/index.ts';
import { type Claim, hostStatesFrom, schedule } from '../scheduler/index.ts';
import { hypervisor, NOW } from '../scheduler/test-fixtures.ts';
import {
  addressesFromPorts,
  claimOf,
  desiredPortSpec,
  moveGroup,
  ownsPort,
  portFailure,
  portHolder,
  serverPortLabels,
  serverPortNames,
} from './server.ts';

const server = (status: Server['status'], spec: Partial<Server['spec']> = {}): Server =>
  ({
    metadata: { name: 'vm', namespace: 'p1' },
    spec: { flavor: 'f', image: 'i', securityGroups: [], configDrive: false, powerState: 'Running', ...spec },
    status,
  }) as Server;

describe('claimOf', () => {
  it('reads the claim a bound server holds from its status', () => {
    expect(
      claimOf(server({ node: 'hv1', allocation: { vcpus: 2, ramMiB: 512, diskGiB: 3 } }, { serverGroup: 'g' })),
    ).toEqual({
      server: 'p1/vm',
      node: 'hv1',
      vcpus: 2,
      ramMiB: 512,
      diskGiB: 3,
      group: 'p1/g',
    });
  });
  it('has none for an unbound server or one without an allocation', () => {
    expect(claimOf(server({}))).toBeUndefined();
    expect(claimOf(server({ node: 'hv1' }))).toBeUndefined();
  });
});

describe('moveGroup (resize and migrate keep the server group policy)', () => {
  const vm = server({ node: 'hv1' }, { serverGroup: 'g' });
  const member = (name: string, node: string): Claim => ({
    server: `p1/${name}`,
    node,
    vcpus: 1,
    ramMiB: 512,
    diskGiB: 1,
    group: 'p1/g',
  });
  const claims = [member('vm', 'hv1'), member('other', 'hv2'), { ...member('stranger', 'hv3'), group: 'p1/h' }];
  const group = (policy: 'affinity' | 'anti-affinity') => ({
    metadata: { name: 'g', namespace: 'p1' },
    spec: { policy, rules: {} },
  });
  const hosts = (names: string[]) =>
    hostStatesFrom(
      names.map((n) => hypervisor(n)),
      claims,
      NOW,
      { exclude: 'p1/vm' },
    );
  const migrate = (policy: 'affinity' | 'anti-affinity', names: string[], c = claims) =>
    schedule(
      {
        server: 'p1/vm',
        resources: { vcpus: 1, ramMiB: 512, diskGiB: 1 },
        ignoreHosts: ['hv1'],
        group: moveGroup(vm, group(policy), c)!,
      },
      hosts(names),
    );

  it('names the hosts of the other members only', () => {
    expect(moveGroup(vm, group('anti-affinity'), claims)).toEqual({
      key: 'p1/g',
      policy: 'anti-affinity',
      maxServerPerHost: 1,
      hosts: ['hv2'],
    });
    expect(moveGroup(vm, undefined, claims)).toBeUndefined();
  });
  it('anti-affinity: a migration skips the hosts of other members, and fails when only those are left', () => {
    expect(migrate('anti-affinity', ['hv1', 'hv2', 'hv3'])).toMatchObject({ ok: true, host: 'hv3' });
    expect(migrate('anti-affinity', ['hv1', 'hv2'])).toMatchObject({
      ok: false,
      message: expect.stringContaining('ServerGroupAntiAffinityFilter removed 1 (0 left)'),
    });
  });
  it('affinity: a member cannot leave the others, a lone member can move', () => {
    expect(migrate('affinity', ['hv1', 'hv2', 'hv3'], [member('vm', 'hv1'), member('other', 'hv1')])).toMatchObject({
      ok: false,
      message: expect.stringContaining('ServerGroupAffinityFilter removed 2 (0 left)'),
    });
    expect(migrate('affinity', ['hv1', 'hv2'], [member('vm', 'hv1')])).toMatchObject({ ok: true, host: 'hv2' });
  });
});

describe('recordAction', () => {
  it('completes the in-progress entry of the same action and appends others', () => {
    const st: Parameters<typeof recordAction>[0] = {};
    recordAction(st, 'create', 'InProgress', undefined, 't1');
    recordAction(st, 'create', 'Success', undefined, 't2');
    recordAction(st, 'stop', 'Error', 'x'.repeat(5000), 't3');
    expect(st.actions).toEqual([
      { action: 'create', startTime: 't1', finishTime: 't2', result: 'Success' },
      { action: 'stop', startTime: 't3', finishTime: 't3', result: 'Error', message: 'x'.repeat(1024) },
    ]);
  });
  it('keeps only the newest entries', () => {
    const st: Parameters<typeof recordAction>[0] = {};
    for (let i = 0; i < MAX_SERVER_ACTIONS + 5; i++) recordAction(st, `a${i}`, 'Success', undefined, `t${i}`);
    expect(st.actions).toHaveLength(MAX_SERVER_ACTIONS);
    expect(st.actions?.[0]?.action).toBe('a5');
    expect(st.actions?.at(-1)?.action).toBe(`a${MAX_SERVER_ACTIONS + 4}`);
  });
});

describe('statusMergePatch', () => {
  it('sends changed top-level fields whole and removed ones as null', () => {
    expect(
      statusMergePatch(
        { vmState: 'building', taskState: 'spawning', conditions: [{ type: 'A' }], node: 'hv1' },
        { vmState: 'active', conditions: [{ type: 'A' }, { type: 'B' }], node: 'hv1' },
      ),
    ).toEqual({ vmState: 'active', taskState: null, conditions: [{ type: 'A' }, { type: 'B' }] });
  });
  it('is undefined when nothing changed', () => {
    expect(statusMergePatch({ a: { b: 1 } }, { a: { b: 1 } })).toBeUndefined();
    expect(statusMergePatch(undefined, {})).toBeUndefined();
  });
});

describe('ports of a server', () => {
  const vm = {
    metadata: { name: 'vm', namespace: 'p1', uid: 'u1', labels: { app: 'web', [SERVER_NODE_LABEL]: 'hv1' } },
    spec: {
      flavor: 'f',
      image: 'i',
      configDrive: false,
      powerState: 'Running',
      securityGroups: ['web', 'default'],
      networks: [{ network: 'net1' }, { port: 'mine' }, { network: 'net2', fixedIP: '10.0.2.9' }],
    },
  } as unknown as Server;
  const port = (name: string, o: Partial<Port['metadata']> = {}, status: Port['status'] = {}): Port =>
    ({
      metadata: { name, namespace: 'p1', ...o },
      spec: { network: name === 'vm-2' ? 'net2' : 'net1', adminStateUp: true },
      status,
    }) as Port;
  const ownedBy = (uid: string, name = 'vm') => ({
    ownerReferences: [{ apiVersion: 'compute.stratus.io/v1alpha1', kind: 'Server', name, uid, controller: true }],
  });

  it('names each entry: the port it names or <server>-<index>', () => {
    expect(serverPortNames(vm)).toEqual(['vm-0', 'mine', 'vm-2']);
  });

  it('asks for the network, the fixed IP when given, and the server security groups', () => {
    expect(desiredPortSpec(vm, 0)).toEqual({ network: 'net1', securityGroups: ['web', 'default'], adminStateUp: true });
    expect(desiredPortSpec(vm, 2)).toEqual({
      network: 'net2',
      fixedIPs: [{ ipAddress: '10.0.2.9' }],
      securityGroups: ['web', 'default'],
      adminStateUp: true,
    });
    expect(desiredPortSpec({ spec: { ...vm.spec, securityGroups: [] } }, 0).securityGroups).toEqual([]);
    expect(() => desiredPortSpec(vm, 1)).toThrow(/names no network/);
  });

  it('labels created ports with the server labels (not compute.stratus.io/ ones), device and network', () => {
    expect(serverPortLabels(vm, 'net1')).toEqual({ app: 'web', [PORT_DEVICE_LABEL]: 'vm', [NETWORK_LABEL]: 'net1' });
  });

  it('knows who holds a port: its device label, else its controlling Server', () => {
    expect(portHolder(port('p', { labels: { [PORT_DEVICE_LABEL]: 'other' } }))).toBe('other');
    expect(portHolder(port('p', ownedBy('u9', 'older')))).toBe('older');
    expect(portHolder(port('p'))).toBeUndefined();
    expect(ownsPort(vm, port('vm-0', ownedBy('u1')))).toBe(true);
    expect(ownsPort(vm, port('vm-0', ownedBy('u9')))).toBe(false);
  });

  it('treats only terminal Ready=False reasons as a failed allocation', () => {
    const cond = (status: string, reason: string) => ({
      conditions: [{ type: 'Ready', status, reason, message: 'm', lastTransitionTime: 't' }],
    });
    expect(portFailure(port('p', {}, cond('False', 'IpAddressGenerationFailure') as never))).toEqual({
      reason: 'IpAddressGenerationFailure',
      message: 'm',
    });
    expect(portFailure(port('p', {}, cond('False', 'MacAddressInUse') as never))).toBeDefined();
    expect(portFailure(port('p', {}, cond('False', 'NetworkNotFound') as never))).toBeUndefined();
    expect(portFailure(port('p', {}, cond('True', 'Allocated') as never))).toBeUndefined();
    expect(portFailure(port('p'))).toBeUndefined();
  });

  it('lists addresses in spec.networks order with network, version, MAC and port', () => {
    const p0 = port(
      'vm-0',
      {},
      {
        macAddress: 'fa:16:3e:00:00:01',
        fixedIPs: [
          { subnet: 'v4', ipAddress: '10.0.1.5' },
          { subnet: 'v6', ipAddress: 'fd00::5' },
        ],
      },
    );
    const p2 = port('vm-2', {}, { fixedIPs: [{ subnet: 'v4', ipAddress: '10.0.2.9' }] });
    expect(addressesFromPorts([p0, undefined, p2, port('vm-3')])).toEqual([
      { network: 'net1', ip: '10.0.1.5', version: 4, macAddress: 'fa:16:3e:00:00:01', type: 'fixed', port: 'vm-0' },
      { network: 'net1', ip: 'fd00::5', version: 6, macAddress: 'fa:16:3e:00:00:01', type: 'fixed', port: 'vm-0' },
      { network: 'net2', ip: '10.0.2.9', version: 4, type: 'fixed', port: 'vm-2' },
    ]);
    expect(addressesFromPorts([])).toEqual([]);
  });
});
