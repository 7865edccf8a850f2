// The v1alpha1 API against a real kube-apiserver: CRDs install, examples are accepted, invalid
// manifests are refused with messages that name the field, kubectl shows descriptions and
// columns, RBAC, garbage collection and namespace deletion behave as in a real cluster.
import { execFile } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { promisify } from 'node:util';
import * as k8s from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseAllDocuments } from 'yaml';
import {
  adminKubeConfig,
  adminKubeconfigFile,
  kubectlPath,
  userKubeConfig,
} from '../../../e2e/controlplane/testenv.ts';
import { waitFor as poll } from '../../../e2e/testing/wait.ts';
import { ALL_KINDS, type KindDefinition } from '../../src/api/index.ts';
import { installCRDs } from '../../src/crdgen/install.ts';

const run = promisify(execFile);
const root = resolve(import.meta.dirname, '../../..');
const NS = 'api-test';

// biome-ignore lint/suspicious/noExplicitAny: fixtures edit arbitrary nested fields of objects read back
type Json = any;
type Obj = { apiVersion: string; kind: string; metadata: { name: string; namespace?: string }; spec?: unknown };

let kc: k8s.KubeConfig;
let objects: k8s.KubernetesObjectApi;
let core: k8s.CoreV1Api;

function kindOf(o: Obj): KindDefinition {
  const k = ALL_KINDS.find((d) => d.kind === o.kind && d.apiVersion === o.apiVersion);
  if (!k) throw new Error(`unknown kind ${o.apiVersion} ${o.kind}`);
  return k;
}

async function kubectl(...args: string[]): Promise<string> {
  const { stdout } = await run(kubectlPath(), ['--kubeconfig', adminKubeconfigFile(), ...args], {
    maxBuffer: 16 << 20,
  });
  return stdout;
}

async function ensureNamespace(name: string): Promise<void> {
  // A namespace left terminating by an earlier run refuses new objects: wait until it is gone.
  await waitFor(
    `namespace ${name} to finish terminating`,
    async () => {
      const r = await refusal(() => core.readNamespace({ name }));
      if (r) return r.code === 404;
      const ns = await core.readNamespace({ name });
      return ns.status?.phase !== 'Terminating';
    },
    120_000,
  );
  try {
    await core.createNamespace({ body: { metadata: { name } } });
  } catch (e) {
    if (!(e instanceof k8s.ApiException && e.code === 409)) throw e;
  }
}

/** Error message of a refused create/replace, or undefined when the API server accepted it. */
async function refusal(action: () => Promise<unknown>): Promise<{ code: number; message: string } | undefined> {
  try {
    await action();
    return undefined;
  } catch (e) {
    if (!(e instanceof k8s.ApiException)) throw e;
    const body = typeof e.body === 'string' ? JSON.parse(e.body) : e.body;
    return { code: e.code, message: String(body?.message ?? e.message) };
  }
}

const waitFor = async (what: string, cond: () => Promise<boolean>, timeoutMs = 60_000): Promise<void> => {
  await poll(what, cond, timeoutMs, 250);
};

async function gone(o: Obj): Promise<boolean> {
  return (
    (await refusal(() => objects.read({ apiVersion: o.apiVersion, kind: o.kind, metadata: o.metadata })))?.code === 404
  );
}

beforeAll(async () => {
  kc = adminKubeConfig();
  objects = k8s.KubernetesObjectApi.makeApiClient(kc);
  core = kc.makeApiClient(k8s.CoreV1Api);
  await installCRDs(kc);
  await ensureNamespace(NS);
  await ensureNamespace('demo');
});

afterAll(async () => {
  await kubectl('delete', '-f', resolve(root, 'examples'), '--ignore-not-found', '--wait=false').catch(() => {});
  await kubectl('delete', 'namespace', NS, '--ignore-not-found', '--wait=false').catch(() => {});
});

describe('CRDs', () => {
  it('are all established and listed in the stratus category', async () => {
    const out = await kubectl('api-resources', '--categories', 'stratus', '-o', 'name');
    const served = out.trim().split('\n').sort();
    expect(served).toEqual(ALL_KINDS.map((k) => `${k.plural}.${k.group}`).sort());
  });

  it('explain fields to kubectl explain', async () => {
    // The API server publishes a new CRD's OpenAPI a few seconds after it is established.
    let out = '';
    let nested = '';
    await waitFor('the CRDs in the OpenAPI document', async () => {
      out = await kubectl('explain', 'server.spec').catch(() => '');
      nested = await kubectl('explain', 'network.spec.subnets.allocationPools').catch(() => '');
      return out !== '' && nested !== '';
    });
    expect(out).toContain('Desired state of the server.');
    expect(out).toMatch(/flavor\s+<string> -required-/);
    expect(out).toContain('Changing it resizes the server.');
    expect(nested).toContain('Ranges handed out to ports.');
  });
});

describe('examples', () => {
  const files = readdirSync(resolve(root, 'examples')).filter((f) => f.endsWith('.yaml'));
  const docs = files.flatMap((f) =>
    parseAllDocuments(readFileSync(resolve(root, 'examples', f), 'utf8')).map((d) => d.toJS() as Obj),
  );

  it('cover every kind a first VM needs', () => {
    const kinds = new Set(docs.map((d) => d.kind));
    for (const k of ['Project', 'Flavor', 'KeyPair', 'Image', 'Network', 'SecurityGroup', 'Server', 'Volume']) {
      expect(kinds, k).toContain(k);
    }
  });

  it('pass the schemas the operator and agent validate with', () => {
    for (const d of docs) {
      const r = kindOf(d).schema.safeParse(d);
      expect(r.success, `${d.kind}/${d.metadata.name}: ${r.error?.message}`).toBe(true);
    }
  });

  it('are accepted by the API server and listed by kubectl get stratus with their columns', async () => {
    await kubectl('apply', '--server-side', '--field-manager', 'api-test', '-f', resolve(root, 'examples'));
    const out = await kubectl('get', 'stratus', '-A');
    for (const d of docs) expect(out, `${d.kind} ${d.metadata.name}`).toContain(d.metadata.name);
    const servers = await kubectl('get', 'servers', '-n', 'demo');
    expect(servers.split('\n')[0]).toMatch(/NAME\s+STATUS\s+POWER\s+NODE\s+ADDRESSES\s+FLAVOR\s+IMAGE\s+AGE/);
    expect(servers).toMatch(/demo-vm\s+.*m1\.tiny\s+debian-12/);
    const nets = await kubectl('get', 'net', '-n', 'demo');
    expect(nets).toMatch(/private\s+.*10\.20\.0\.0\/24/);
    // Defaults are applied by the API server.
    const flavor = JSON.parse(await kubectl('get', 'flavor', 'm1.tiny', '-o', 'json'));
    expect(flavor.spec).toMatchObject({ ephemeral: '0', swap: '0', isPublic: true });
    const server = JSON.parse(await kubectl('get', 'server', 'demo-vm', '-n', 'demo', '-o', 'json'));
    expect(server.spec).toMatchObject({ powerState: 'Running', configDrive: false });
  });
});

// ---------------------------------------------------------------------------------------------
// Invalid manifests

const meta = (name: string, namespaced = true) => (namespaced ? { name, namespace: NS } : { name });
const flavor = (name: string, spec: Record<string, unknown>): Obj => ({
  apiVersion: 'compute.stratus.io/v1alpha1',
  kind: 'Flavor',
  metadata: meta(name, false),
  spec: { vcpus: 1, ram: '256Mi', disk: '1Gi', ...spec },
});
const server = (name: string, spec: Record<string, unknown>): Obj => ({
  apiVersion: 'compute.stratus.io/v1alpha1',
  kind: 'Server',
  metadata: meta(name),
  spec: { flavor: 'm1.tiny', image: 'debian-12', ...spec },
});
const subnet = (s: Record<string, unknown>) => ({ name: 's1', cidr: '10.0.0.0/24', ...s });
const network = (name: string, subnets: unknown[], spec: Record<string, unknown> = {}): Obj => ({
  apiVersion: 'network.stratus.io/v1alpha1',
  kind: 'Network',
  metadata: meta(name),
  spec: { subnets, ...spec },
});
const sg = (name: string, rule: Record<string, unknown>): Obj => ({
  apiVersion: 'network.stratus.io/v1alpha1',
  kind: 'SecurityGroup',
  metadata: meta(name),
  spec: { rules: [{ direction: 'ingress', ...rule }] },
});
const port = (name: string, spec: Record<string, unknown>): Obj => ({
  apiVersion: 'network.stratus.io/v1alpha1',
  kind: 'Port',
  metadata: meta(name),
  spec: { network: 'private', ...spec },
});
const image = (name: string, spec: Record<string, unknown>): Obj => ({
  apiVersion: 'image.stratus.io/v1alpha1',
  kind: 'Image',
  metadata: meta(name),
  spec: { source: { url: 'http://127.0.0.1/x.qcow2' }, diskFormat: 'qcow2', ...spec },
});
const volume = (name: string, spec: Record<string, unknown>): Obj => ({
  apiVersion: 'storage.stratus.io/v1alpha1',
  kind: 'Volume',
  metadata: meta(name),
  spec: { size: '1Gi', ...spec },
});
const keypair = (name: string, publicKey: string): Obj => ({
  apiVersion: 'compute.stratus.io/v1alpha1',
  kind: 'KeyPair',
  metadata: meta(name),
  spec: { publicKey },
});
const KEY = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAmz3JDWliYPOvngSOOj7kbnvOx8hgyJugms5NIm/MrM t@x';

interface Invalid {
  name: string;
  obj: Obj;
  /** Field path the API server's message must name. */
  field: string;
  /** Words the message must contain. */
  says: RegExp;
}

const invalidCreates: Invalid[] = [
  {
    name: 'negative vcpus',
    obj: flavor('bad-vcpus', { vcpus: -1 }),
    field: 'spec.vcpus',
    says: /greater than or equal to 1/,
  },
  { name: 'ram as a bare number', obj: flavor('bad-ram-int', { ram: 512 }), field: 'spec.ram', says: /string/ },
  { name: 'zero ram', obj: flavor('bad-ram-zero', { ram: '0Mi' }), field: 'spec.ram', says: /must not be zero/ },
  { name: 'malformed disk', obj: flavor('bad-disk', { disk: '10GB' }), field: 'spec.disk', says: /should match/ },
  {
    name: 'both image and volume source',
    obj: server('bad-both', { bootVolume: 'v1' }),
    field: 'spec',
    says: /exactly one of image and bootVolume/,
  },
  {
    name: 'neither image nor volume source',
    obj: server('bad-neither', { image: undefined }),
    field: 'spec',
    says: /exactly one of image and bootVolume/,
  },
  {
    name: 'unknown powerState',
    obj: server('bad-power', { powerState: 'Hibernating' }),
    field: 'spec.powerState',
    says: /Unsupported value/,
  },
  {
    name: 'missing flavor',
    obj: server('bad-noflavor', { flavor: undefined }),
    field: 'spec.flavor',
    says: /Required/,
  },
  {
    name: 'network and port on one NIC',
    obj: server('bad-nic', { networks: [{ network: 'a', port: 'b' }] }),
    field: 'spec.networks[0]',
    says: /exactly one of network and port/,
  },
  {
    name: 'fixedIP with a port',
    obj: server('bad-fixed', { networks: [{ port: 'p', fixedIP: '10.0.0.5' }] }),
    field: 'spec.networks[0].fixedIP',
    says: /only valid with network/,
  },
  {
    name: 'malformed fixedIP',
    obj: server('bad-ip', { networks: [{ network: 'n', fixedIP: '10.0.0.300' }] }),
    field: 'spec.networks[0].fixedIP',
    says: /valid IPv4 or IPv6/,
  },
  {
    name: 'userData and a Secret',
    obj: server('bad-ud', { userData: 'x', userDataSecretRef: { name: 's' } }),
    field: 'spec',
    says: /mutually exclusive/,
  },
  {
    name: 'CIDR with a /33 prefix',
    obj: network('bad-cidr', [subnet({ cidr: '10.0.0.0/33' })]),
    field: 'spec.subnets[0].cidr',
    says: /valid CIDR/,
  },
  {
    name: 'CIDR with host bits set',
    obj: network('bad-canon', [subnet({ cidr: '10.0.0.1/24' })]),
    field: 'spec.subnets[0].cidr',
    says: /canonical/,
  },
  {
    name: 'gateway outside the CIDR',
    obj: network('bad-gw', [subnet({ gatewayIP: '10.0.1.1' })]),
    field: 'spec.subnets[0].gatewayIP',
    says: /inside cidr/,
  },
  {
    name: 'gateway and disableGateway',
    obj: network('bad-gw2', [subnet({ gatewayIP: '10.0.0.1', disableGateway: true })]),
    field: 'spec.subnets[0].gatewayIP',
    says: /mutually exclusive/,
  },
  {
    name: 'pool outside the CIDR',
    obj: network('bad-pool', [subnet({ allocationPools: [{ start: '10.0.0.10', end: '10.0.1.10' }] })]),
    field: 'spec.subnets[0].allocationPools',
    says: /inside cidr/,
  },
  {
    name: 'pool start after end',
    obj: network('bad-pool2', [subnet({ allocationPools: [{ start: '10.0.0.200', end: '10.0.0.100' }] })]),
    field: 'spec.subnets[0].allocationPools[0].start',
    says: /not be after end/,
  },
  {
    name: 'overlapping subnets',
    obj: network('bad-overlap', [subnet({}), subnet({ name: 's2', cidr: '10.0.0.128/25' })]),
    field: 'spec.subnets',
    says: /must not overlap/,
  },
  {
    name: 'six DNS servers',
    obj: network('bad-dns', [
      subnet({ dnsNameservers: ['1.1.1.1', '1.1.1.2', '1.1.1.3', '1.1.1.4', '1.1.1.5', '1.1.1.6'] }),
    ]),
    field: 'spec.subnets[0].dnsNameservers',
    says: /Too many/,
  },
  {
    name: 'IPv6 mode on an IPv4 subnet',
    obj: network('bad-v6mode', [subnet({ ipv6AddressMode: 'slaac' })]),
    field: 'spec.subnets[0].ipv6AddressMode',
    says: /only valid on IPv6/,
  },
  {
    name: 'MTU below 68',
    obj: network('bad-mtu', [], { mtu: 60 }),
    field: 'spec.mtu',
    says: /greater than or equal to 68/,
  },
  {
    name: 'port range min above max',
    obj: sg('bad-range', { protocol: 'tcp', portRangeMin: 90, portRangeMax: 80 }),
    field: 'spec.rules[0].portRangeMin',
    says: /less than or equal/,
  },
  {
    name: 'port above 65535',
    obj: sg('bad-port', { protocol: 'tcp', portRangeMin: 80, portRangeMax: 70000 }),
    field: 'spec.rules[0].portRangeMax',
    says: /65535/,
  },
  {
    name: 'port range without protocol',
    obj: sg('bad-noproto', { portRangeMin: 80, portRangeMax: 80 }),
    field: 'spec.rules[0].protocol',
    says: /port ranges need protocol/,
  },
  {
    name: 'remote prefix and remote group',
    obj: sg('bad-remote', { remoteIPPrefix: '10.0.0.0/8', remoteGroup: 'default' }),
    field: 'spec.rules[0]',
    says: /mutually exclusive/,
  },
  {
    name: 'IPv6 prefix on an IPv4 rule',
    obj: sg('bad-family', { remoteIPPrefix: 'fd00::/8' }),
    field: 'spec.rules[0].remoteIPPrefix',
    says: /match ethertype/,
  },
  {
    name: 'unknown direction',
    obj: sg('bad-dir', { direction: 'sideways' }),
    field: 'spec.rules[0].direction',
    says: /Unsupported value/,
  },
  {
    name: 'port security off with groups',
    obj: port('bad-psec', { portSecurityEnabled: false, securityGroups: ['default'] }),
    field: 'spec.portSecurityEnabled',
    says: /without port security/,
  },
  {
    name: 'upper-case MAC',
    obj: port('bad-mac', { macAddress: 'FA:16:3E:00:00:01' }),
    field: 'spec.macAddress',
    says: /should match/,
  },
  { name: 'not an SSH key', obj: keypair('bad-key', 'hello world'), field: 'spec.publicKey', says: /OpenSSH/ },
  {
    name: 'max per host with affinity',
    obj: {
      apiVersion: 'compute.stratus.io/v1alpha1',
      kind: 'ServerGroup',
      metadata: meta('bad-group'),
      spec: { policy: 'affinity', rules: { maxServerPerHost: 2 } },
    },
    field: 'spec.rules.maxServerPerHost',
    says: /only valid with the anti-affinity/,
  },
  {
    name: 'unknown disk format',
    obj: image('bad-fmt', { diskFormat: 'exe' }),
    field: 'spec.diskFormat',
    says: /Unsupported/,
  },
  {
    name: 'sha256 with a sha512-long digest',
    obj: image('bad-sum', { checksum: { algorithm: 'sha256', value: 'a'.repeat(128) } }),
    field: 'spec.checksum.value',
    says: /64 hex digits/,
  },
  {
    name: 'ftp source',
    obj: image('bad-url', { source: { url: 'ftp://x/y' } }),
    field: 'spec.source.url',
    says: /should match/,
  },
  { name: 'zero-size volume', obj: volume('bad-size', { size: '0' }), field: 'spec.size', says: /must not be zero/ },
  {
    name: 'volume with two sources',
    obj: volume('bad-src', { source: { image: 'a', snapshot: 'b' } }),
    field: 'spec.source',
    says: /at most one/,
  },
  {
    name: 'allocation ratio that is not a decimal',
    obj: {
      apiVersion: 'compute.stratus.io/v1alpha1',
      kind: 'Hypervisor',
      metadata: meta('bad-hv', false),
      spec: { cpuAllocationRatio: '-4' },
    },
    field: 'spec.cpuAllocationRatio',
    says: /should match/,
  },
  {
    name: 'project name that cannot be a namespace',
    obj: { apiVersion: 'identity.stratus.io/v1alpha1', kind: 'Project', metadata: meta('a.b', false), spec: {} },
    field: '',
    says: /must be a DNS label/,
  },
];

function withoutUndefined(o: Obj): Obj {
  return JSON.parse(JSON.stringify(o));
}

describe('invalid manifests are refused at apply time', () => {
  it('has a table of at least 25 cases', () => {
    expect(invalidCreates.length).toBeGreaterThanOrEqual(25);
  });

  it.each(invalidCreates.map((c) => [c.name, c] as const))('%s', async (_name, c) => {
    const obj = withoutUndefined(c.obj);
    const r = await refusal(() => objects.create(obj as k8s.KubernetesObject, undefined, 'All'));
    expect(r, 'accepted by the API server').toBeDefined();
    expect(r?.code).toBe(422);
    expect(r?.message).toContain(c.field);
    expect(r?.message).toMatch(c.says);
    // The operator and the agent refuse the same object when they read it.
    if (c.name !== 'project name that cannot be a namespace') {
      expect(kindOf(obj).schema.safeParse(obj).success, 'accepted by the zod schema').toBe(false);
    }
  });
});

interface InvalidUpdate {
  name: string;
  base: Obj;
  change: (o: Json) => void;
  field: string;
  says: RegExp;
}

const invalidUpdates: InvalidUpdate[] = [
  {
    name: 'flavor vcpus changed',
    base: flavor('imm-flavor', {}),
    change: (o) => {
      o.spec.vcpus = 2;
    },
    field: 'spec.vcpus',
    says: /immutable/,
  },
  {
    name: 'server key pair changed',
    base: server('imm-server', { keyPair: 'a' }),
    change: (o) => {
      o.spec.keyPair = 'b';
    },
    field: 'spec.keyPair',
    says: /immutable/,
  },
  {
    name: 'server key pair removed',
    base: server('imm-server2', { keyPair: 'a' }),
    change: (o) => {
      delete o.spec.keyPair;
    },
    field: 'spec.keyPair',
    says: /cannot be added or removed/,
  },
  {
    name: 'subnet CIDR changed',
    base: network('imm-net', [subnet({})]),
    change: (o) => {
      o.spec.subnets[0].cidr = '10.9.0.0/24';
    },
    field: 'spec.subnets[0].cidr',
    says: /immutable/,
  },
  {
    name: 'port network changed',
    base: port('imm-port', {}),
    change: (o) => {
      o.spec.network = 'other';
    },
    field: 'spec.network',
    says: /immutable/,
  },
  {
    name: 'key pair public key changed',
    base: keypair('imm-key', KEY),
    change: (o) => {
      o.spec.publicKey = KEY.replace('t@x', 'u@y');
    },
    field: 'spec.publicKey',
    says: /immutable/,
  },
  {
    name: 'volume shrunk',
    base: volume('imm-vol', { size: '2Gi' }),
    change: (o) => {
      o.spec.size = '1Gi';
    },
    field: 'spec.size',
    says: /Invalid input: New size must be greater than current size \(current: 2Gi, new: 1Gi\)\./,
  },
  {
    name: 'project namespace changed',
    base: {
      apiVersion: 'identity.stratus.io/v1alpha1',
      kind: 'Project',
      metadata: meta('imm-project', false),
      spec: { namespace: 'imm-a' },
    },
    change: (o) => {
      o.spec.namespace = 'imm-b';
    },
    field: 'spec.namespace',
    says: /immutable/,
  },
];

describe('immutable fields are refused on update', () => {
  it.each(invalidUpdates.map((c) => [c.name, c] as const))('%s', async (_name, c) => {
    const created = (await objects.create(c.base as k8s.KubernetesObject)) as Json;
    try {
      c.change(created);
      const r = await refusal(() => objects.replace(created as k8s.KubernetesObject));
      expect(r, 'accepted by the API server').toBeDefined();
      expect(r?.code).toBe(422);
      expect(r?.message).toContain(c.field);
      expect(r?.message).toMatch(c.says);
    } finally {
      await objects.delete(c.base as k8s.KubernetesObject);
    }
  });

  it('allows the changes that are declarative actions (resize, extend, start/stop)', async () => {
    const s = (await objects.create(server('mut-server', {}) as k8s.KubernetesObject)) as Json;
    s.spec.flavor = 'm1.small';
    s.spec.powerState = 'Stopped';
    s.spec.triggers = { hardReboot: '2026-11-22T10:00:00Z' };
    await objects.replace(s as k8s.KubernetesObject);
    const v = (await objects.create(volume('mut-vol', {}) as k8s.KubernetesObject)) as Json;
    v.spec.size = '3Gi';
    await objects.replace(v as k8s.KubernetesObject);
    await objects.delete(s as k8s.KubernetesObject);
    await objects.delete(v as k8s.KubernetesObject);
  });
});

describe('cluster behaviour with Stratus objects', () => {
  it('refuses a user without rights and allows one with a role', async () => {
    const userKc = await userKubeConfig('tenant-alice', ['tenants']);
    const asUser = k8s.KubernetesObjectApi.makeApiClient(userKc);
    const obj = withoutUndefined(server('rbac-vm', {}));
    const r = await refusal(() => asUser.create(obj as k8s.KubernetesObject));
    expect(r?.code).toBe(403);
    expect(r?.message).toContain('tenant-alice');

    const rbac = kc.makeApiClient(k8s.RbacAuthorizationV1Api);
    await rbac.createNamespacedRole({
      namespace: NS,
      body: {
        metadata: { name: 'server-editor' },
        rules: [{ apiGroups: ['compute.stratus.io'], resources: ['servers'], verbs: ['create', 'get', 'delete'] }],
      },
    });
    await rbac.createNamespacedRoleBinding({
      namespace: NS,
      body: {
        metadata: { name: 'alice-servers' },
        roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name: 'server-editor' },
        subjects: [{ kind: 'User', name: 'tenant-alice', apiGroup: 'rbac.authorization.k8s.io' }],
      },
    });
    await waitFor(
      'RBAC grant',
      async () => (await refusal(() => asUser.create(obj as k8s.KubernetesObject))) === undefined,
    );
    // Still no rights on other kinds.
    expect(
      (await refusal(() => asUser.create(withoutUndefined(volume('rbac-vol', {})) as k8s.KubernetesObject)))?.code,
    ).toBe(403);
    await objects.delete(obj as k8s.KubernetesObject);
  });

  it('garbage-collects objects whose owner is deleted', async () => {
    const owner = (await objects.create(withoutUndefined(server('gc-owner', {})) as k8s.KubernetesObject)) as Obj & {
      metadata: { uid: string };
    };
    const child = port('gc-child', {});
    (child.metadata as Record<string, unknown>).ownerReferences = [
      {
        apiVersion: owner.apiVersion,
        kind: owner.kind,
        name: owner.metadata.name,
        uid: owner.metadata.uid,
        controller: true,
        blockOwnerDeletion: true,
      },
    ];
    await objects.create(child as k8s.KubernetesObject);
    await objects.delete(owner as k8s.KubernetesObject);
    await waitFor('the owned port to be collected', () => gone(child));
  });

  it('removes the objects of a deleted namespace', async () => {
    const ns = 'api-test-doomed';
    await ensureNamespace(ns);
    const inside = [
      { ...withoutUndefined(network('n1', [subnet({})])), metadata: { name: 'n1', namespace: ns } },
      { ...withoutUndefined(server('s1', {})), metadata: { name: 's1', namespace: ns } },
    ];
    for (const o of inside) await objects.create(o as k8s.KubernetesObject);
    await core.deleteNamespace({ name: ns });
    await waitFor(
      'the namespace and its objects to disappear',
      async () =>
        (await refusal(() => core.readNamespace({ name: ns })))?.code === 404 &&
        (await Promise.all(inside.map(gone))).every(Boolean),
      120_000,
    );
  });
});
