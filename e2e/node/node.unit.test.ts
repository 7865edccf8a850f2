// The test node's rendered configuration and the control plane's node mode, as pure functions (the real node runs in
// e2e/tests/node.test.ts).
import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import {
  type ClusterConfig,
  clusterConfig,
  componentArgs,
  controllers,
  NODE_CONTROLLERS,
} from '../controlplane/controlplane.ts';
import { pkiPaths } from '../controlplane/pki.ts';
import { cniConflist, containerdConfig, kubeletConfig, madeByNodes, mountPointsUnder, type NodeState } from './node.ts';

const cfg = (node: boolean): ClusterConfig => ({ ...clusterConfig(), stateDir: '/c', node });

const st: NodeState = {
  name: 'n1',
  dir: '/c/nodes/n1',
  nodeIP: '172.31.253.1',
  podSubnet: '10.244.1.0/24',
  bridge: 'stkcni0',
  cgroupRoot: '/stk-n1',
  kubeletPort: 17250,
  kubeletHealthzPort: 17251,
  proxyHealthzPort: 17252,
  proxyMetricsPort: 17253,
};

describe('control plane node mode', () => {
  const pki = pkiPaths('/c');

  it('serves the API on the API host address with the lease reconciler only in node mode', () => {
    const plain = componentArgs('kube-apiserver', cfg(false), pki);
    expect(plain).toContain('--bind-address=127.0.0.1');
    expect(plain).toContain('--endpoint-reconciler-type=none');
    const node = componentArgs('kube-apiserver', cfg(true), pki);
    expect(node).toContain('--bind-address=0.0.0.0');
    expect(node).toContain(`--advertise-address=${cfg(true).apiHost.address}`);
    expect(node.some((a) => a.startsWith('--endpoint-reconciler-type'))).toBe(false);
  });

  it('always gives the API server its kubelet client certificate and dials kubelets by InternalIP', () => {
    for (const mode of [false, true]) {
      const args = componentArgs('kube-apiserver', cfg(mode), pki);
      expect(args).toContain(`--kubelet-client-certificate=${pki.kubeletClientCert}`);
      expect(args).toContain(`--kubelet-client-key=${pki.kubeletClientKey}`);
      expect(args).toContain('--kubelet-preferred-address-types=InternalIP,Hostname');
    }
  });

  it('runs the workload controllers only in node mode', () => {
    expect(controllers(cfg(false))).not.toContain('deployment-controller');
    expect(controllers(cfg(true))).toEqual(expect.arrayContaining([...NODE_CONTROLLERS]));
    const kcm = componentArgs('kube-controller-manager', cfg(true), pki).find((a) => a.startsWith('--controllers='));
    expect(kcm).toContain('daemonset-controller');
    expect(kcm).toContain('node-lifecycle-controller');
  });
});

describe('node configuration', () => {
  it('containerd: oom_score_adj clamped, cgroupfs, its own runc root, netns under its state dir', () => {
    const toml = containerdConfig(st);
    expect(toml).toContain('restrict_oom_score_adj = true');
    expect(toml).toContain('SystemdCgroup = false');
    expect(toml).toContain('Root = "/c/nodes/n1/containerd/runc"');
    expect(toml).toContain('netns_mounts_under_state_dir = true');
    expect(toml).toContain('sandbox_image = "stratus.local/pause:1"');
    expect(toml).toContain('address = "/c/nodes/n1/containerd/containerd.sock"');
  });

  it('kubelet: webhook + x509 authentication, Webhook authorization, everything under the node directory', () => {
    const k = parse(kubeletConfig(st, cfg(true))) as Record<string, unknown>;
    expect(k.authentication).toEqual({
      anonymous: { enabled: false },
      webhook: { enabled: true },
      x509: { clientCAFile: '/c/pki/ca.crt' },
    });
    expect(k.authorization).toEqual({ mode: 'Webhook' });
    expect(k.cgroupRoot).toBe('/stk-n1');
    for (const key of ['podLogsDir', 'staticPodPath', 'volumePluginDir']) {
      expect(String(k[key]).startsWith('/c/nodes/n1/')).toBe(true);
    }
    expect(k.address).toBe('172.31.253.1');
    expect(k.port).toBe(17250);
  });

  it('CNI: the node bridge and subnet, no masquerading rules', () => {
    const c = JSON.parse(cniConflist(st)) as { plugins: Record<string, unknown>[] };
    expect(c.plugins[0]).toMatchObject({ type: 'bridge', bridge: 'stkcni0', ipMasq: false });
    expect(JSON.stringify(c.plugins[0])).toContain('10.244.1.0/24');
  });
});

describe('teardown helpers', () => {
  it('lists mount points under a directory deepest first, decoding octal escapes', () => {
    const text = [
      '30 1 0:1 / /c/nodes/n1/kubelet/root rw - ext4 /dev/vda rw',
      '31 30 0:1 / /c/nodes/n1/kubelet/root rw - ext4 /dev/vda rw',
      '32 30 0:2 / /c/nodes/n1/kubelet/root/pods/x/volumes/a\\040b rw - tmpfs tmpfs rw',
      '33 1 0:3 / /c/nodes/n10 rw - tmpfs tmpfs rw',
      '34 1 0:4 / /other rw - tmpfs tmpfs rw',
    ].join('\n');
    expect(mountPointsUnder(text, '/c/nodes/n1')).toEqual([
      '/c/nodes/n1/kubelet/root/pods/x/volumes/a b',
      '/c/nodes/n1/kubelet/root',
    ]);
  });

  it('deletes only nft tables that hold nothing but the kubelet/CNI chains (or kube-proxy)', () => {
    expect(madeByNodes('ip kube-proxy', ['anything'])).toBe(true);
    expect(madeByNodes('ip filter', ['INPUT', 'KUBE-FIREWALL', 'KUBE-KUBELET-CANARY'])).toBe(true);
    expect(madeByNodes('ip nat', ['POSTROUTING', 'KUBE-MARK-MASQ', 'DOCKER'])).toBe(false);
    expect(madeByNodes('inet stratus', ['input'])).toBe(false);
  });
});
