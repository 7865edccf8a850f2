// The Helm chart (charts/stratus) against a real kube-apiserver: `helm lint`, `helm template` of several value sets
// accepted by a server-side dry run (CRDs first), values.schema.json refusing bad values with the field named, the
// agent DaemonSet mounting exactly the host paths the chart README documents, the pods' security settings, and the
// RBAC being enough: the operator and a fake node agent, each authenticated as its chart ServiceAccount and bound by
// nothing but the chart's rendered Roles, take examples/ to an ACTIVE server with no request refused.
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { Writable } from 'node:stream';
import { promisify } from 'node:util';
import { KubeConfig } from '@kubernetes/client-node';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseAllDocuments } from 'yaml';
import { adminKubeconfigFile, helmPath, kubectlPath, mintKubeconfig } from '../../../e2e/controlplane/testenv.ts';
import { waitFor } from '../../../e2e/testing/wait.ts';
import { AgentConfig, startAgent } from '../../../node-agent/src/agent.ts';
import { OperatorConfig } from '../../src/config.ts';
import { registerControllers } from '../../src/controllers/index.ts';
import { installCRDs } from '../../src/crdgen/install.ts';
import { KubeClient, loadConfig, Manager } from '../../src/runtime/index.ts';

const root = resolve(import.meta.dirname, '../../..');
const CHART = resolve(root, 'charts/stratus');
const run = promisify(execFile);

// biome-ignore lint/suspicious/noExplicitAny: rendered manifests are checked field by field
type Obj = Record<string, any>;

async function helm(...args: string[]): Promise<string> {
  return (await run(helmPath(), args, { maxBuffer: 32 << 20 })).stdout;
}

async function kubectl(...args: string[]): Promise<string> {
  return (await run(kubectlPath(), ['--kubeconfig', adminKubeconfigFile(), ...args], { maxBuffer: 32 << 20 })).stdout;
}

/** kubectl with `input` on its stdin. */
function kubectlIn(input: string, ...args: string[]): Promise<string> {
  return new Promise((res, rej) => {
    const child = execFile(
      kubectlPath(),
      ['--kubeconfig', adminKubeconfigFile(), ...args],
      { maxBuffer: 32 << 20 },
      (err, stdout, stderr) =>
        err ? rej(new Error(`kubectl ${args.join(' ')}: ${stderr || err.message}`)) : res(stdout),
    );
    child.stdin?.end(input);
  });
}

/** helm template's exit and stderr (for values the schema must refuse). */
async function helmFails(...args: string[]): Promise<string> {
  try {
    await helm(...args);
  } catch (e) {
    return String((e as { stderr?: string }).stderr ?? e);
  }
  throw new Error(`helm ${args.join(' ')} succeeded`);
}

function parse(manifest: string): Obj[] {
  return parseAllDocuments(manifest)
    .map((d) => d.toJS() as Obj | null)
    .filter((o): o is Obj => o !== null);
}

function find(objs: Obj[], kind: string, suffix = ''): Obj {
  const o = objs.find((x) => x.kind === kind && String(x.metadata?.name).endsWith(suffix));
  if (!o) throw new Error(`no ${kind} *${suffix} rendered`);
  return o;
}

/** The rows of the "Host paths" table of charts/stratus/README.md: host path → [path in the pod, backend ('': all)]. */
function documentedHostPaths(): Map<string, [string, string]> {
  const readme = readFileSync(resolve(CHART, 'README.md'), 'utf8');
  const section = readme.split(/^## /m).find((s) => s.startsWith('Host paths'));
  if (!section) throw new Error('charts/stratus/README.md has no "## Host paths" section');
  const rows = new Map<string, [string, string]>();
  for (const m of section.matchAll(/^\| `(\/[^`]*)` \| `(\/[^`]*)` \|[^|]*\| ([a-z]*) *\|/gm))
    rows.set(m[1]!, [m[2]!, m[3]!]);
  return rows;
}

const ns = `chart-${randomBytes(3).toString('hex')}`;
const release = 'stratus';

beforeAll(async () => {
  await installCRDs(loadAdmin());
  await kubectl('create', 'namespace', ns);
});

function loadAdmin(): KubeConfig {
  const kc = new KubeConfig();
  kc.loadFromFile(adminKubeconfigFile());
  return kc;
}

afterAll(async () => {
  // The uninstall test's kept default flavors, should it have failed half-way (examples/ define an m1.tiny too).
  await kubectl('delete', 'flavors', '-l', 'app.kubernetes.io/part-of=stratus', '--wait').catch(() => {});
  await kubectl('delete', 'namespace', ns, '--ignore-not-found', '--wait=false').catch(() => {});
});

describe('helm lint and template', () => {
  it('lints clean, also with --strict and with the e2e values', async () => {
    await helm('lint', CHART);
    await helm('lint', CHART, '--strict');
    await helm('lint', CHART, '--strict', '-f', resolve(CHART, 'ci/test-values.yaml'));
    await helm('lint', CHART, '--strict', '--set', 'flavors.defaults=true', '--set', 'networkBackend=ovs');
  });

  const variants: Record<string, string[]> = {
    defaults: [],
    'default flavors, OVS backend': ['--set', 'flavors.defaults=true', '--set', 'networkBackend=ovs'],
    'e2e values': ['-f', resolve(CHART, 'ci/test-values.yaml')],
  };
  for (const [name, args] of Object.entries(variants)) {
    it(`the API server accepts every object rendered with ${name} (server-side dry run)`, async () => {
      await kubectl('apply', '--server-side', '--force-conflicts', '--dry-run=server', '-f', resolve(CHART, 'crds'));
      const manifest = await helm('template', release, CHART, '-n', ns, ...args);
      const objs = parse(manifest);
      expect(objs.length).toBeGreaterThan(10);
      const out = await kubectlIn(manifest, 'apply', '--server-side', '--dry-run=server', '-n', ns, '-f', '-');
      for (const o of objs) expect(out).toContain(`${o.metadata.name} serverside-applied (server dry run)`);
    });
  }

  it('renders OpenStack default flavors only when asked', async () => {
    expect(parse(await helm('template', release, CHART)).filter((o) => o.kind === 'Flavor')).toEqual([]);
    const flavors = parse(await helm('template', release, CHART, '--set', 'flavors.defaults=true')).filter(
      (o) => o.kind === 'Flavor',
    );
    expect(flavors.map((f) => [f.metadata.name, f.spec.vcpus, f.spec.ram, f.spec.disk])).toEqual([
      ['m1.tiny', 1, '512Mi', '1Gi'],
      ['m1.small', 1, '2Gi', '20Gi'],
      ['m1.medium', 2, '4Gi', '40Gi'],
      ['m1.large', 4, '8Gi', '80Gi'],
      ['m1.xlarge', 8, '16Gi', '160Gi'],
    ]);
    for (const f of flavors) expect(f.metadata.annotations['helm.sh/resource-policy']).toBe('keep');
  });

  it('templates the ServiceMonitor only when enabled', async () => {
    expect(parse(await helm('template', release, CHART)).some((o) => o.kind === 'ServiceMonitor')).toBe(false);
    const on = parse(await helm('template', release, CHART, '--set', 'operator.serviceMonitor.enabled=true'));
    expect(find(on, 'ServiceMonitor').spec.endpoints[0].port).toBe('metrics');
  });
});

describe('values.schema.json', () => {
  const cases: [string, string[], RegExp][] = [
    ['an unknown network backend', ['--set', 'networkBackend=vxlan'], /\/networkBackend.*linuxbridge.*ovs/],
    ['no operator replica', ['--set', 'operator.replicas=0'], /\/operator\/replicas.*minimum/],
    ['an unknown accelerator', ['--set', 'accelerator=hvf'], /\/accelerator.*auto.*kvm.*tcg/],
    ['a bad CIDR', ['--set', 'imageUrl.allowCidrs={127.0.0.1}'], /\/imageUrl\/allowCidrs\/0/],
    ['a misspelt key', ['--set', 'operator.replica=2'], /operator.*replica/],
    ['a relative host path', ['--set', 'agent.hostPaths[0].path=var/lib'], /\/agent\/hostPaths\/0\/path/],
    ['an unknown launcher', ['--set', 'agent.launcher=docker'], /\/agent\/launcher/],
    ['a device name too long', ['--set', 'underlayDevice=averyveryverylongname'], /\/underlayDevice/],
    ['a reserved RAM that is no quantity', ['--set', 'agent.reserved.ram=2GB'], /\/agent\/reserved\/ram/],
    ['a pull policy typo', ['--set', 'image.pullPolicy=never'], /\/image\/pullPolicy/],
    ['an extra arg that is no flag', ['--set', 'agent.extraArgs={foo}'], /\/agent\/extraArgs\/0/],
  ];
  for (const [what, args, message] of cases) {
    it(`refuses ${what}, naming the field`, async () => {
      const stderr = await helmFails('template', release, CHART, ...args);
      expect(stderr).toMatch(/values don't meet the specifications of the schema/);
      expect(stderr).toMatch(message);
    });
  }
});

describe('rendered workloads', () => {
  it('the agent DaemonSet mounts exactly the host paths charts/stratus/README.md documents', async () => {
    const documented = documentedHostPaths();
    expect(documented.size).toBeGreaterThan(3);
    for (const backend of ['linuxbridge', 'ovs']) {
      const ds = find(parse(await helm('template', release, CHART, '--set', `networkBackend=${backend}`)), 'DaemonSet');
      const spec = ds.spec.template.spec;
      const volumes = new Map<string, string>(
        spec.volumes.map((v: Obj) => [v.name as string, v.hostPath?.path as string]),
      );
      expect([...volumes.values()].every((p) => typeof p === 'string')).toBe(true);
      const want = [...documented].filter(([, [, b]]) => b === '' || b === backend);
      expect([...volumes.values()].sort()).toEqual(want.map(([host]) => host).sort());
      // Each mounted where the table says; network namespaces propagate both ways.
      const mounts: Obj[] = spec.containers[0].volumeMounts;
      expect(mounts.map((m) => [volumes.get(m.name), m.mountPath]).sort()).toEqual(
        want.map(([host, [pod]]) => [host, pod]).sort(),
      );
      expect(mounts.find((m) => m.mountPath === '/run/netns')?.mountPropagation).toBe('Bidirectional');
      const args: string[] = spec.containers[0].args;
      expect(args).toContain(`--host-cgroup-root=${documented.get('/sys/fs/cgroup')?.[0]}`);
      if (backend === 'ovs') expect(args).toContain('--ovs-db=unix:/run/openvswitch/db.sock');
    }
  });

  it('the agent: privileged on the host network and PIDs, node-critical, every node tolerated, one node at a time', async () => {
    const objs = parse(await helm('template', release, CHART, '-n', ns));
    const ds = find(objs, 'DaemonSet');
    const spec = ds.spec.template.spec;
    const c = spec.containers[0];
    expect(c.securityContext.privileged).toBe(true);
    expect([spec.hostNetwork, spec.hostPID, spec.dnsPolicy]).toEqual([true, true, 'ClusterFirstWithHostNet']);
    expect(spec.priorityClassName).toBe('system-node-critical');
    expect(spec.tolerations).toEqual([{ operator: 'Exists' }]);
    expect(spec.nodeSelector).toEqual({ 'stratus.io/hypervisor': 'true' });
    expect(ds.spec.updateStrategy).toEqual({ type: 'RollingUpdate', rollingUpdate: { maxUnavailable: 1 } });
    expect(c.env.find((e: Obj) => e.name === 'NODE_NAME').valueFrom.fieldRef.fieldPath).toBe('spec.nodeName');
    expect(c.args).toContain('--node-name=$(NODE_NAME)');
    expect(c.args).toContain(`--lease-namespace=${ns}`);
    // Longer than the agent's own shutdown deadline, so SIGKILL never cuts a reconcile (guests survive either way).
    expect(spec.terminationGracePeriodSeconds).toBeGreaterThan(30);
    const none = find(parse(await helm('template', release, CHART, '--set', 'agent.nodeSelector=null')), 'DaemonSet');
    expect(none.spec.template.spec.nodeSelector).toBeUndefined();
    expect(c.image).toBe('stratus.local/stratus-agent:0.2.0');
    // The e2e values: every node, images imported (never pulled), the loopback image server allowed.
    const e2e = find(
      parse(await helm('template', release, CHART, '-f', resolve(CHART, 'ci/test-values.yaml'))),
      'DaemonSet',
    );
    expect(e2e.spec.template.spec.nodeSelector).toBeUndefined();
    expect(e2e.spec.template.spec.containers[0].imagePullPolicy).toBe('Never');
    expect(e2e.spec.template.spec.containers[0].args).toContain('--image-url-allow-cidr=127.0.0.0/8');
  });

  it('the operator: two leader-elected replicas, non-root on a read-only root filesystem, probes, PDB', async () => {
    const objs = parse(await helm('template', release, CHART, '-n', ns));
    const dep = find(objs, 'Deployment');
    const pod = dep.spec.template.spec;
    const c = pod.containers[0];
    expect(dep.spec.replicas).toBe(2);
    expect(pod.securityContext).toMatchObject({
      runAsNonRoot: true,
      runAsUser: 65532,
      seccompProfile: { type: 'RuntimeDefault' },
    });
    expect(c.securityContext).toMatchObject({
      runAsNonRoot: true,
      runAsUser: 65532,
      readOnlyRootFilesystem: true,
      allowPrivilegeEscalation: false,
      privileged: false,
      capabilities: { drop: ['ALL'] },
    });
    expect(pod.hostNetwork).toBeUndefined();
    expect(c.args).toEqual(
      expect.arrayContaining(['--leader-elect=true', '--install-crds=true', `--lease-namespace=${ns}`]),
    );
    expect([c.livenessProbe.httpGet.path, c.readinessProbe.httpGet.path]).toEqual(['/healthz', '/readyz']);
    expect(c.image).toBe('stratus.local/stratus-operator:0.2.0');
    expect(find(objs, 'PodDisruptionBudget').spec.minAvailable).toBe(1);
    const single = parse(await helm('template', release, CHART, '--set', 'operator.replicas=1'));
    expect(single.some((o) => o.kind === 'PodDisruptionBudget')).toBe(false);
    expect(find(objs, 'Service', '-metrics').spec.ports[0]).toMatchObject({ name: 'metrics', port: 8080 });
    // Soft spreading: a single-node cluster still runs both replicas.
    expect(pod.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution).toBeUndefined();
    expect(pod.topologySpreadConstraints[0].whenUnsatisfiable).toBe('ScheduleAnyway');
  });
});

describe('component flags', () => {
  /** A container's args with $(VAR) references expanded as the kubelet does (here: sample values). */
  const expand = (args: string[]) =>
    args.map((a) =>
      a.replace(
        /\$\((\w+)\)/g,
        (_, v: string) => ({ NODE_NAME: 'node-1', HOST_IP: '192.0.2.7', POD_NAME: 'op-1' })[v] ?? '',
      ),
    );
  const variants: Record<string, string[]> = {
    defaults: [],
    'OVS, underlay device, tcg, CIDRs, extra args': [
      '--set',
      'networkBackend=ovs',
      '--set',
      'underlayDevice=eth1',
      '--set',
      'accelerator=tcg',
      '--set',
      'imageUrl.allowCidrs={127.0.0.0/8,192.0.2.0/24}',
      '--set',
      'agent.extraArgs={--reserved-ram=2Gi}',
      '--set',
      'operator.extraArgs={--heartbeat-grace-seconds=90}',
      '--set',
      'operator.installCrds=false',
    ],
    'e2e values': ['-f', resolve(CHART, 'ci/test-values.yaml')],
  };
  for (const [name, args] of Object.entries(variants)) {
    it(`the operator and the agent accept every flag the chart gives them (${name})`, async () => {
      const objs = parse(await helm('template', release, CHART, '-n', ns, ...args));
      const op = loadConfig(OperatorConfig, {
        argv: expand(find(objs, 'Deployment').spec.template.spec.containers[0].args),
        env: {},
      });
      expect(op).toMatchObject({ leaderElect: true, leaseNamespace: ns, identity: 'op-1', metricsPort: 8080 });
      const agentArgs = expand(find(objs, 'DaemonSet').spec.template.spec.containers[0].args);
      const agent = loadConfig(AgentConfig, { argv: agentArgs, env: {} });
      expect(agent).toMatchObject({ nodeName: 'node-1', hostIP: '192.0.2.7', driver: 'qemu', leaseNamespace: ns });
      expect(agent.launcher).toBe('auto');
      expect([agent.reservedRam, agent.cpuAllocationRatio]).toEqual(['2Gi', '4.0']);
    });
  }
});

describe('RBAC', () => {
  it('is enough: operator and agent as the chart ServiceAccounts take examples/ to ACTIVE with no request refused', async () => {
    // The chart's RBAC objects only, bound to the ServiceAccounts in ns.
    const rbac = parse(await helm('template', release, CHART, '-n', ns, '--set', 'operator.installCrds=true')).filter(
      (o) => ['ServiceAccount', 'ClusterRole', 'ClusterRoleBinding', 'Role', 'RoleBinding'].includes(o.kind),
    );
    const rbacFile = JSON.stringify({ apiVersion: 'v1', kind: 'List', items: rbac });
    const apply = (verb: 'apply' | 'delete') =>
      kubectlIn(rbacFile, verb, '-f', '-', ...(verb === 'delete' ? ['--ignore-not-found'] : []));
    await apply('apply');

    const asServiceAccount = async (name: string) => {
      const kc = new KubeConfig();
      kc.loadFromFile(
        await mintKubeconfig(`system:serviceaccount:${ns}:${name}`, [
          'system:serviceaccounts',
          `system:serviceaccounts:${ns}`,
          'system:authenticated',
        ]),
      );
      return kc;
    };
    const lines: string[] = [];
    const logger = pino(
      { level: 'debug' },
      new Writable({
        write(chunk, _enc, cb) {
          lines.push(String(chunk));
          cb();
        },
      }),
    );
    // RBAC refusals; a namespace being deleted (another file's leftovers still finalizing) refuses new Events with a
    // 403 too, which says nothing about the chart's Roles.
    const refused = () =>
      lines.filter((l) => /forbidden|"statusCode":403|\b403\b/i.test(l) && !l.includes('NamespaceTerminating'));
    const opKc = await asServiceAccount(`${release}-operator`);
    const agentKc = await asServiceAccount(`${release}-agent`);
    // What --install-crds does at start.
    await installCRDs(opKc);

    const op = new Manager({
      kubeConfig: opKc,
      logger: logger.child({ c: 'operator' }),
      http: false,
      leaderElection: { leaseName: 'stratus-operator', leaseNamespace: ns, identity: `${ns}-op` },
      gracefulShutdownMs: 10_000,
    });
    registerControllers(op, {
      identity: `${ns}-op`,
      projectConcurrency: 2,
      serverConcurrency: 2,
      heartbeatGraceSeconds: 60,
      nodeLeaseNamespace: ns,
      scheduler: {},
    });
    await op.start();
    const node = `${ns}-node`;
    const agent = await startAgent({
      kubeConfig: agentKc,
      nodeName: node,
      logger: logger.child({ c: 'agent' }),
      leaseNamespace: ns,
      hostIP: '192.0.2.1',
      heartbeatSeconds: 1,
    });
    const admin = new KubeClient(loadAdmin());
    const SERVERS = { group: 'compute.stratus.io', version: 'v1alpha1', plural: 'servers' };
    const PROJECTS = { group: 'identity.stratus.io', version: 'v1alpha1', plural: 'projects' };
    const NAMESPACES = { group: '', version: 'v1', plural: 'namespaces' };
    const terminating = async (gvr: typeof SERVERS, name: string) =>
      admin.get(gvr, name).then(
        (o) => (o as Obj).metadata?.deletionTimestamp !== undefined,
        () => false,
      );
    // examples/ live in the demo namespace: a Project or namespace an earlier run left terminating must go first
    // (this operator finishes their deletion).
    const demoSettled = async () => !(await terminating(PROJECTS, 'demo')) && !(await terminating(NAMESPACES, 'demo'));
    try {
      await waitFor('no terminating demo Project or namespace', demoSettled, 120_000, 250);
      await kubectl('create', 'namespace', 'demo').catch(() => {});
      await kubectl('apply', '-f', resolve(root, 'examples'));
      await waitFor(
        'demo-vm ACTIVE on the test node',
        async () => {
          const s = (await admin.get(SERVERS, 'demo-vm', 'demo')) as Obj;
          return s.status?.status === 'ACTIVE' && s.status?.node === node;
        },
        120_000,
        250,
      );
      await kubectl('-n', 'demo', 'delete', 'server', 'demo-vm', '--wait=true', '--timeout=60s');
    } catch (e) {
      throw new Error(`${(e as Error).message}\nrequests refused:\n${refused().join('')}`);
    } finally {
      // Deleted while operator and agent still run, so that finalizers are released and nothing is left terminating.
      await kubectl('delete', '-f', resolve(root, 'examples'), '--ignore-not-found', '--wait=false').catch(() => {});
      await waitFor(
        'the demo Project and namespace gone',
        async () =>
          (await admin.get(PROJECTS, 'demo').then(
            () => false,
            () => true,
          )) &&
          (await admin.get(NAMESPACES, 'demo').then(
            () => false,
            () => true,
          )),
        120_000,
        250,
      ).catch(() => {});
      await agent.stop();
      await op.stop(10_000);
      await kubectl('delete', 'hypervisor', node, '--ignore-not-found', '--wait=false').catch(() => {});
      await apply('delete').catch(() => {});
    }
    expect(refused()).toEqual([]);
  });
});

describe('helm install and uninstall', () => {
  it('uninstall removes the release objects and leaves CRDs, custom resources and kept flavors (as documented)', async () => {
    const rel = `u${randomBytes(3).toString('hex')}`;
    const kubeconfig = ['--kubeconfig', adminKubeconfigFile()];
    // No kubelet here: the objects are created, nothing runs; what matters is what Helm creates and deletes.
    // Kept flavors of an aborted earlier run belong to its release: Helm would refuse to adopt them.
    await kubectl('delete', 'flavors', '-l', 'app.kubernetes.io/part-of=stratus', '--wait');
    await helm('install', rel, CHART, '-n', ns, ...kubeconfig, '--set', 'flavors.defaults=true');
    const owned = async () =>
      (
        await kubectl(
          'get',
          'deployments,daemonsets,services,serviceaccounts,roles,rolebindings,poddisruptionbudgets',
          '-n',
          ns,
          '-l',
          `app.kubernetes.io/instance=${rel}`,
          '-o',
          'name',
        )
      )
        .split('\n')
        .filter(Boolean);
    const cluster = async () =>
      (
        await kubectl(
          'get',
          'clusterroles,clusterrolebindings',
          '-l',
          `app.kubernetes.io/instance=${rel}`,
          '-o',
          'name',
        )
      )
        .split('\n')
        .filter(Boolean);
    // Deployment, DaemonSet, metrics Service, 2 ServiceAccounts, 2 lease Roles and their bindings, the PDB.
    expect(await owned()).toHaveLength(10);
    expect(await cluster()).toHaveLength(4);
    // A custom resource a user made meanwhile.
    await kubectlIn(
      JSON.stringify({
        apiVersion: 'compute.stratus.io/v1alpha1',
        kind: 'KeyPair',
        metadata: { name: 'k', namespace: ns },
        spec: { publicKey: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl u@h' },
      }),
      'apply',
      '-f',
      '-',
    );

    await helm('uninstall', rel, '-n', ns, ...kubeconfig, '--wait');
    expect(await owned()).toEqual([]);
    expect(await cluster()).toEqual([]);
    // Left: the CRDs (and so every custom resource), the default flavors (resource-policy keep), the namespace.
    expect(await kubectl('get', 'crd', 'servers.compute.stratus.io', '-o', 'name')).toContain(
      'servers.compute.stratus.io',
    );
    expect(await kubectl('-n', ns, 'get', 'keypair', 'k', '-o', 'name')).toContain('keypair');
    const flavors = await kubectl('get', 'flavors', '-l', `app.kubernetes.io/instance=${rel}`, '-o', 'name');
    expect(flavors.split('\n').filter(Boolean)).toHaveLength(5);
    // The documented command removes them.
    await kubectl('delete', 'flavors', '-l', 'app.kubernetes.io/part-of=stratus', '--wait');
    expect(await kubectl('get', 'flavors', '-l', 'app.kubernetes.io/part-of=stratus', '-o', 'name')).toBe('');
  });
});
