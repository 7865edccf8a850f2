import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../../operator/src/runtime/index.ts';
import { AgentConfig, fakeOptionsFrom, nodeOptionsFrom, qemuOptionsFrom, ZONE_LABEL } from './agent.ts';
import { type ServerObject, serverChanged } from './compute.ts';

const load = (argv: string[], env: Record<string, string> = {}) => loadConfig(AgentConfig, { argv, env });

describe('AgentConfig', () => {
  it('has the documented defaults', () => {
    const c = load(['--node-name=n1']);
    expect(c).toMatchObject({
      nodeName: 'n1',
      driver: 'qemu',
      fakeNodes: 1,
      heartbeatSeconds: 10,
      concurrency: 4,
      metricsPort: 8081,
      cpuAllocationRatio: '4.0',
      reservedRam: '512Mi',
    });
  });

  it('reads flags and STRATUS_ variables, including JSON maps', () => {
    const c = load(['--driver=fake', '--fake-nodes=100', '--fake-op-latency-ms={"spawn":2000}', '--zone=az1'], {
      STRATUS_NODE_NAME: 'sim',
      STRATUS_FAKE_RAM: '128Gi',
      STRATUS_LABELS: '{"rack":"r1"}',
      STRATUS_HOST_IP: '10.0.0.5',
    });
    expect(c.fakeNodes).toBe(100);
    expect(fakeOptionsFrom(c)).toMatchObject({ ram: '128Gi', opLatencyMs: { spawn: 2000 }, failureRate: 0 });
    const n = nodeOptionsFrom(c);
    expect(n.labels).toEqual({ rack: 'r1', [ZONE_LABEL]: 'az1' });
    expect(n.hostIP).toBe('10.0.0.5');
    expect(n.hypervisorSpec).toMatchObject({ reserved: { vcpus: 0, ram: '512Mi', disk: '0' } });
  });

  it('passes the qemu driver flags through', () => {
    expect(qemuOptionsFrom(load(['--node-name=n1']))).toEqual({
      stateDir: '/var/lib/stratus',
      accelerator: 'auto',
      qemuBinary: 'qemu-system-x86_64',
      launcher: 'direct',
      powerOffTimeoutMs: 60_000,
      qemuUser: 'stratus-qemu',
    });
    const c = load([
      '--state-dir=/srv/stratus',
      '--image-cache-dir=/cache',
      '--launcher=systemd',
      '--accelerator=tcg',
      '--kvm-probe-kernel=/opt/vmlinuz',
      '--qemu-user=107:108',
      '--power-off-timeout-seconds=5',
    ]);
    expect(qemuOptionsFrom(c)).toMatchObject({
      stateDir: '/srv/stratus',
      imageCacheDir: '/cache',
      launcher: 'systemd',
      accelerator: 'tcg',
      kvmProbeKernel: '/opt/vmlinuz',
      qemuUser: '107:108',
      powerOffTimeoutMs: 5000,
    });
    expect(() => load(['--qemu-user=a b'])).toThrow(/--qemu-user/);
    expect(() => load(['--state-dir=relative'])).toThrow(/--state-dir/);
    expect(
      qemuOptionsFrom(
        load([
          '--image-url-allow-cidr=127.0.0.0/8',
          '--image-url-allow-cidr=::1',
          '--image-url-deny-cidr=10.96.0.0/12,10.244.0.0/16',
        ]),
      ).imageUrlPolicy,
    ).toEqual({ allowCidrs: ['127.0.0.0/8', '::1'], denyCidrs: ['10.96.0.0/12', '10.244.0.0/16'] });
    expect(() => load(['--image-url-deny-cidr=10.0.0.0/33'])).toThrow(/--image-url-deny-cidr.*must be a CIDR/);
    expect(() => load(['--launcher=docker'])).toThrow(/--launcher/);
    // Guest placement (docs/design/guest-placement.md).
    expect(
      qemuOptionsFrom(load(['--launcher=auto', '--host-cgroup-root=/host/sys/fs/cgroup', '--host-mount-ns-pid=812'])),
    ).toMatchObject({ launcher: 'auto', hostCgroupRoot: '/host/sys/fs/cgroup', hostMountNsPid: 812 });
    expect(qemuOptionsFrom(load(['--launcher=host'])).launcher).toBe('host');
    expect(() => load(['--host-cgroup-root=host/cg'])).toThrow(/--host-cgroup-root/);
    expect(() => load(['--host-mount-ns-pid=0'])).toThrow(/--host-mount-ns-pid/);
  });

  it('rejects bad values naming the flag', () => {
    expect(() => load(['--node-name=Bad_Name'])).toThrow(ConfigError);
    expect(() => load(['--driver=xen'])).toThrow(/--driver/);
    expect(() => load(['--fake-failure-rate=2'])).toThrow(/--fake-failure-rate/);
    expect(() => load(['--host-ip=nope'])).toThrow(/--host-ip/);
  });
});

describe('serverChanged (update predicate)', () => {
  const base: ServerObject = {
    metadata: { name: 's', namespace: 'ns', generation: 1, labels: { a: 'b' } },
    status: { node: 'n', vmState: 'active', powerState: 'RUNNING', conditions: [] },
  };
  const with_ = (status: Record<string, unknown>, metadata: Record<string, unknown> = {}): ServerObject => ({
    metadata: { ...base.metadata, ...metadata },
    status: { ...base.status, ...status },
  });

  it("ignores the agent's own status writes", () => {
    expect(serverChanged(base, with_({ vmState: 'stopped', powerState: 'SHUTDOWN', actions: [{}] }))).toBe(false);
    expect(serverChanged(base, with_({ taskState: 'powering-off', status: 'ACTIVE' }))).toBe(false);
    expect(serverChanged(with_({ taskState: 'powering-off' }), base)).toBe(false);
  });

  it('passes resyncs, spec and metadata changes, operator fields and NOSTATE on node loss', () => {
    expect(serverChanged(base, base)).toBe(true);
    expect(serverChanged(base, with_({}, { generation: 2 }))).toBe(true);
    expect(serverChanged(base, with_({}, { deletionTimestamp: '2026-01-01T00:00:00Z' }))).toBe(true);
    expect(serverChanged(base, with_({}, { finalizers: ['x'] }))).toBe(true);
    expect(serverChanged(base, with_({}, { annotations: { 'fake.stratus.io/fail': 'spawn' } }))).toBe(true);
    expect(serverChanged(base, with_({ node: 'other' }))).toBe(true);
    expect(serverChanged(base, with_({ flavor: { name: 'f' } }))).toBe(true);
    expect(serverChanged(base, with_({ taskState: 'rebuilding' }))).toBe(true);
    expect(serverChanged(with_({ taskState: 'rebuilding' }), base)).toBe(true);
    expect(serverChanged(base, with_({ powerState: 'NOSTATE' }))).toBe(true);
  });
});
