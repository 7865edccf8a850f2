// GitOps: the controllers never write `spec` (docs/gitops.md). Against a real API server with the operator and fake
// node agents in-process, the test plays the user (and Argo CD/Flux): it creates every kind of examples/ and drives
// every controller action it can reach (create → ACTIVE, stop/start, reboot and rebuild triggers, resize and migrate
// with confirm, a resize no host can take, a claimed port, security groups changed, delete) and the error paths (no valid host, a missing
// reference, a port in use, a network without free addresses, a network deleted while in use), writing only under its
// own field manager. Meanwhile it records every watch event of every object in its namespace (and its cluster-scoped
// Flavors and Project). Then, for every object the test created:
//  - spec at every event equals the spec of the test's latest write before that event (resourceVersion order), and
//    labels and annotations too, except the controller labels listed in ALLOWED_LABELS;
//  - every managedFields entry of another manager is either on the status subresource or touches only
//    metadata.finalizers (values in ALLOWED_FINALIZERS) and metadata.labels (keys in ALLOWED_LABELS).
// Along the way the Argo CD health checks of docs/gitops/health/ (lua5.4) are run on the live objects: each state
// reached maps to the health docs/gitops.md promises.
// Objects the test did not create must be the controllers' own (a controller ownerReference, or
// app.kubernetes.io/managed-by=stratus): those are not in Git, their spec is the controller's to write.
import type { KubernetesObject, V1ManagedFieldsEntry } from '@kubernetes/client-node';
import { PatchStrategy } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { adminKubeConfig } from '../../../e2e/controlplane/testenv.ts';
import { health, scriptOf } from '../../../e2e/gitops/lua.ts';
import {
  FlavorKind,
  GUEST_FINALIZER,
  ImageKind,
  KeyPairKind,
  NETWORK_FINALIZER,
  NETWORK_LABEL,
  NetworkKind,
  PORT_DEVICE_LABEL,
  PORT_FINALIZER,
  PortKind,
  ProjectKind,
  SERVER_FINALIZER,
  SERVER_NODE_LABEL,
  SecurityGroupKind,
  ServerGroupKind,
  ServerKind,
  type ServerSpec,
  VOLUME_FINALIZER,
  VolumeKind,
} from '../../src/api/index.ts';
import { gvrOf } from '../../src/controllers/common.ts';
import { PROJECT_FINALIZER } from '../../src/controllers/project.ts';
import { type GVR, isNotFound } from '../../src/runtime/index.ts';
import { ComputeEnv, type FakeNode, HYPERVISORS, type Srv, waitFor } from './compute-env.ts';
import { recordWatch, type WatchRecord } from './harness.ts';

/** The field manager of every write the test (the "user", or a GitOps tool) makes. */
const USER = 'gitops-user';

/** What controllers may write on user-owned objects outside status: finalizers (whose cleanup they own)... */
const ALLOWED_FINALIZERS = new Set([
  SERVER_FINALIZER, // operator: releases the claim and the ports
  GUEST_FINALIZER, // agent: the guest and its files are gone
  PORT_FINALIZER, // operator: releases the port's address claims
  NETWORK_FINALIZER, // operator: releases the VNI and the DHCP addresses
  PROJECT_FINALIZER, // operator: deletes the project's namespace
  VOLUME_FINALIZER, // operator: the volume host deleted the volume
]);
/** ...and these labels (by kind), which name a binding and are never in Git. */
const ALLOWED_LABELS: Record<string, readonly string[]> = {
  Server: [SERVER_NODE_LABEL], // the node the scheduler bound it to (agents watch by it)
  Port: [PORT_DEVICE_LABEL, NETWORK_LABEL], // Neutron device_id: the server that claimed the port; its network
};

const SERVERS = gvrOf(ServerKind);
const PORTS = gvrOf(PortKind);
const NETWORKS = gvrOf(NetworkKind);
const KINDS = [
  ServerKind,
  PortKind,
  NetworkKind,
  SecurityGroupKind,
  KeyPairKind,
  ImageKind,
  ServerGroupKind,
  VolumeKind,
  FlavorKind,
  ProjectKind,
] as const;
const PUBLIC_KEY =
  'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAmz3JDWliYPOvngSOOj7kbnvOx8hgyJugms5NIm/MrM demo@stratus.example';

type Obj = KubernetesObject & { spec?: unknown };
interface Write {
  uid: string;
  rv: bigint;
  kind: string;
  name: string;
  spec: unknown;
  labels: Record<string, string>;
  annotations: Record<string, string>;
}

const env = new ComputeEnv('spec');
const writes: Write[] = [];
const watches: { kind: string; w: Awaited<ReturnType<typeof recordWatch<Obj>>> }[] = [];
const clusterScoped: { gvr: GVR; name: string }[] = [];
let nodes: FakeNode[] = [];
const flavors = { small: '', medium: '', huge: '' };

function record(o: Obj): Obj {
  const m = o.metadata ?? {};
  writes.push({
    uid: m.uid ?? '',
    rv: BigInt(m.resourceVersion ?? '0'),
    kind: o.kind ?? '',
    name: m.name ?? '',
    spec: o.spec,
    labels: { ...(m.labels ?? {}) },
    annotations: { ...(m.annotations ?? {}) },
  });
  return o;
}

async function create(gvr: GVR, kind: { apiVersion: string; kind: string }, name: string, spec: unknown, ns = true) {
  const o = await env.client.create<Obj>(
    gvr,
    {
      apiVersion: kind.apiVersion,
      kind: kind.kind,
      metadata: { name, ...(ns ? { namespace: env.ns } : {}), labels: env.scopeLabels },
      spec,
    } as Obj,
    { fieldManager: USER },
  );
  if (!ns) clusterScoped.push({ gvr, name });
  return record(o);
}

async function patch(gvr: GVR, name: string, body: Record<string, unknown>, ns: string | undefined = env.ns) {
  return record(await env.client.patch<Obj>(gvr, name, ns, body, PatchStrategy.MergePatch, { fieldManager: USER }));
}

const patchServer = (name: string, spec: Partial<ServerSpec> | Record<string, unknown>) =>
  patch(SERVERS, name, { spec });

async function createServer(name: string, spec: Partial<ServerSpec>) {
  const m = env.manifest(name, { flavor: flavors.small, pool: 'p' });
  return create(SERVERS, ServerKind, name, { ...m.spec, keyPair: 'key', ...spec });
}

const settled = (s: Srv) => s.status?.taskState === undefined;
const waitStatus = (name: string, status: string, timeoutMs?: number) =>
  env.waitServer(name, status, (s) => s.status?.status === status && settled(s), timeoutMs);

/**
 * The Argo CD health check of docs/gitops/health/ (run by lua5.4) on the live object reaches `status` (and a message
 * matching `message`): the checks are tested on what the controllers really write, not only on samples.
 */
async function expectHealth(gvr: GVR, kind: string, name: string, status: string, message = /./) {
  let last = '';
  await waitFor(`${kind}/${name} health ${status}`, async () => {
    const o = await env.client.get<Obj>(gvr, name, env.ns);
    const [h] = await health(scriptOf(kind), [o]);
    last = `${h?.status}: ${h?.message}`;
    return h?.status === status && message.test(h.message);
  }).catch((e: unknown) => {
    throw new Error(`${String(e)} (last: ${last})`);
  });
}

async function deleteAndWait(gvr: GVR, name: string) {
  await env.client.delete(gvr, name, env.ns).catch((e: unknown) => {
    if (!isNotFound(e)) throw e;
  });
  await waitFor(`${gvr.plural}/${name} gone`, async () => {
    try {
      await env.client.get(gvr, name, env.ns);
      return false;
    } catch (e) {
      if (isNotFound(e)) return true;
      throw e;
    }
  });
}

beforeAll(async () => {
  await env.setup();
  // env.setup created Image cirros under the client's default manager: it is created again under USER, before any
  // controller runs.
  await env.client.delete(gvrOf(ImageKind), 'cirros', env.ns);
  await create(gvrOf(ImageKind), ImageKind, 'cirros', {
    source: { url: 'https://images.example/cirros.qcow2' },
    diskFormat: 'qcow2',
  });
  const kc = adminKubeConfig();
  for (const k of KINDS) {
    const cluster = k === FlavorKind || k === ProjectKind;
    const path = `/apis/${k.group}/${k.version}/${cluster ? '' : `namespaces/${env.ns}/`}${k.plural}`;
    const query: Record<string, string> = cluster
      ? { labelSelector: Object.entries(env.scopeLabels)[0]!.join('=') }
      : {};
    watches.push({ kind: k.kind, w: await recordWatch<Obj>(kc, path, query) });
  }
  nodes = await env.startNodes(2, 'n', { slots: 4, pool: 'p' });
  await env.startOperator();
  await env.waitNodesUp();
  // The agents' volume backend probes (status.volumeBackends), as the volume host reports them.
  for (const nd of nodes) {
    await env.client.patch(
      HYPERVISORS,
      nd.name,
      undefined,
      { status: { volumeBackends: [{ name: 'local', ok: true }] } },
      PatchStrategy.MergePatch,
      { subresource: 'status', fieldManager: `stratus-agent/${nd.name}` },
    );
  }
}, 60_000);

afterAll(async () => {
  for (const { w } of watches) w.stop();
  await env.teardown();
  // A failed run can leave Ports and Networks holding the operator's finalizers: nothing of it may outlive the run.
  for (const gvr of [PORTS, NETWORKS, gvrOf(VolumeKind)]) {
    const left = await env.client.list<Obj>(gvr, { namespace: env.ns }).catch(() => ({ items: [] as Obj[] }));
    for (const o of left.items) {
      await env.client
        .patch(gvr, o.metadata!.name!, env.ns, { metadata: { finalizers: null } }, PatchStrategy.MergePatch)
        .catch(() => {});
    }
  }
  for (const c of clusterScoped) {
    await env.client.delete(c.gvr, c.name).catch(() => {});
    await env.client
      .patch(c.gvr, c.name, undefined, { metadata: { finalizers: null } }, PatchStrategy.MergePatch)
      .catch(() => {});
  }
}, 120_000);

describe('controllers never write spec', () => {
  it('drives every reachable controller action; only status, finalizers and binding labels are written', async () => {
    // --- the objects of examples/ (and the error fixtures), as a user or GitOps tool applies them ---
    flavors.small = `${env.id}-small`;
    flavors.medium = `${env.id}-medium`;
    flavors.huge = `${env.id}-huge`;
    await create(gvrOf(FlavorKind), FlavorKind, flavors.small, { vcpus: 1, ram: '1Gi', disk: '10Gi' }, false);
    await create(gvrOf(FlavorKind), FlavorKind, flavors.medium, { vcpus: 2, ram: '2Gi', disk: '10Gi' }, false);
    await create(gvrOf(FlavorKind), FlavorKind, flavors.huge, { vcpus: 1, ram: '64Gi', disk: '10Gi' }, false);
    const project = `${env.id}-proj`;
    await create(gvrOf(ProjectKind), ProjectKind, project, { description: 'gitops' }, false);
    await create(gvrOf(KeyPairKind), KeyPairKind, 'key', { publicKey: PUBLIC_KEY });
    await create(gvrOf(ServerGroupKind), ServerGroupKind, 'spread', { policy: 'soft-anti-affinity' });
    await create(gvrOf(VolumeKind), VolumeKind, 'data', { size: '1Gi' });
    for (const sg of ['default', 'web']) {
      await create(gvrOf(SecurityGroupKind), SecurityGroupKind, sg, {
        rules: [{ direction: 'ingress', protocol: 'tcp', portRangeMin: 22, portRangeMax: 22 }],
      });
    }
    await create(NETWORKS, NetworkKind, 'net-a', {
      subnets: [{ name: 'v4', cidr: '10.91.0.0/24', enableDHCP: true }],
    });
    await create(NETWORKS, NetworkKind, 'net-full', {
      // one address, no DHCP port: the filler port takes it, the next port gets none
      subnets: [
        {
          name: 'v4',
          cidr: '10.92.0.0/29',
          enableDHCP: false,
          allocationPools: [{ start: '10.92.0.2', end: '10.92.0.2' }],
        },
      ],
    });
    await create(PORTS, PortKind, 'filler', { network: 'net-full' });
    await create(PORTS, PortKind, 'user-port', { network: 'net-a' });

    // --- a server through its life ---
    await createServer('vm', { serverGroup: 'spread', networks: [{ network: 'net-a' }], securityGroups: ['default'] });
    await waitStatus('vm', 'ACTIVE');
    await expectHealth(SERVERS, 'Server', 'vm', 'Healthy', /^ACTIVE$/);
    await expectHealth(PORTS, 'Port', 'vm-0', 'Healthy', /Wired on/);
    await expectHealth(NETWORKS, 'Network', 'net-a', 'Healthy');
    await expectHealth(gvrOf(ImageKind), 'Image', 'cirros', 'Healthy');
    // The volume is placed (Progressing) and available once its volume host reports it.
    await expectHealth(gvrOf(VolumeKind), 'Volume', 'data', 'Progressing', /^creating$/);
    const data = await env.client.get<Obj & { status?: { node?: string } }>(gvrOf(VolumeKind), 'data', env.ns);
    const host = data.status?.node ?? '';
    await env.client.patch(
      gvrOf(VolumeKind),
      'data',
      env.ns,
      { status: { host: { node: host, state: 'available', size: '1Gi' } } },
      PatchStrategy.MergePatch,
      { subresource: 'status', fieldManager: `stratus-agent/${host}` },
    );
    await expectHealth(gvrOf(VolumeKind), 'Volume', 'data', 'Healthy', /^available$/);
    await patchServer('vm', { powerState: 'Stopped' });
    await waitStatus('vm', 'SHUTOFF');
    await expectHealth(SERVERS, 'Server', 'vm', 'Healthy', /^SHUTOFF$/);
    await patchServer('vm', { powerState: 'Running' });
    await waitStatus('vm', 'ACTIVE');
    for (const t of ['softReboot', 'hardReboot', 'rebuild'] as const) {
      await patchServer('vm', { triggers: { [t]: `${t}-1` } });
      await env.waitServer('vm', `${t} done`, (s) => s.status?.triggers?.[t] === `${t}-1` && settled(s));
    }
    await expectHealth(SERVERS, 'Server', 'vm', 'Healthy', /^ACTIVE$/); // every trigger token recorded as done
    // security groups changed: the operator keeps its own port's groups (its object, not the user's)
    await patchServer('vm', { securityGroups: ['default', 'web'] });
    await env.waitServer('vm', 'regrouped', (s) => settled(s));
    await waitFor('owned port regrouped', async () => {
      const p = await env.client.get<Obj & { spec: { securityGroups?: string[] } }>(PORTS, 'vm-0', env.ns);
      return p.spec.securityGroups?.length === 2;
    });
    // resize, confirm; migrate, confirm
    await patchServer('vm', { flavor: flavors.medium });
    await waitStatus('vm', 'VERIFY_RESIZE');
    await expectHealth(SERVERS, 'Server', 'vm', 'Suspended', /confirmResize/);
    await patchServer('vm', { triggers: { confirmResize: 'confirm-1' } });
    await waitStatus('vm', 'ACTIVE');
    await expectHealth(SERVERS, 'Server', 'vm', 'Healthy', /^ACTIVE$/);
    await patchServer('vm', { triggers: { migrate: 'migrate-1' } });
    await waitStatus('vm', 'VERIFY_RESIZE');
    await expectHealth(SERVERS, 'Server', 'vm', 'Suspended');
    await patchServer('vm', { triggers: { confirmResize: 'confirm-2' } });
    await waitStatus('vm', 'ACTIVE');
    await expectHealth(SERVERS, 'Server', 'vm', 'Healthy', /^ACTIVE$/);
    // a resize no host can take is refused for this generation: spec.flavor stays unapplied until spec changes
    await patchServer('vm', { flavor: flavors.huge });
    await expectHealth(SERVERS, 'Server', 'vm', 'Degraded', /not applied/);
    await patchServer('vm', { flavor: flavors.medium });
    await expectHealth(SERVERS, 'Server', 'vm', 'Healthy', /^ACTIVE$/);

    // a server that claims the user's port (the operator labels it), and one that finds it in use
    await createServer('claimer', { networks: [{ port: 'user-port' }] });
    await waitStatus('claimer', 'ACTIVE');
    await expectHealth(SERVERS, 'Server', 'claimer', 'Healthy');
    await expectHealth(PORTS, 'Port', 'user-port', 'Healthy', /Wired on/);
    await createServer('thief', { networks: [{ port: 'user-port' }] });
    await env.waitServer('thief', 'PortInUse', (s) =>
      (s.status?.conditions ?? []).some((c) => c.reason === 'PortInUse'),
    );
    await expectHealth(SERVERS, 'Server', 'thief', 'Degraded', /in use by server claimer/);

    // --- error paths ---
    await createServer('too-big', { flavor: flavors.huge });
    await waitStatus('too-big', 'ERROR');
    await expectHealth(SERVERS, 'Server', 'too-big', 'Degraded');
    await createServer('no-addr', { networks: [{ network: 'net-full' }] });
    await waitStatus('no-addr', 'ERROR');
    await expectHealth(SERVERS, 'Server', 'no-addr', 'Degraded');
    await expectHealth(PORTS, 'Port', 'no-addr-0', 'Degraded');
    await expectHealth(PORTS, 'Port', 'filler', 'Healthy', /not bound/);
    await createServer('dangling', { image: 'no-such-image' });
    await env.waitServer('dangling', 'waiting for its image', (s) => (s.status?.conditions ?? []).length > 0);
    await expectHealth(SERVERS, 'Server', 'dangling', 'Progressing');
    // the network cannot go while ports use it
    await env.client.delete(NETWORKS, 'net-a', env.ns);
    await waitFor('net-a NetworkInUse', async () => {
      const n = await env.client.get<Obj & { status?: { conditions?: { reason?: string }[] } }>(
        NETWORKS,
        'net-a',
        env.ns,
      );
      return (n.status?.conditions ?? []).some((c) => c.reason === 'NetworkInUse');
    });
    await expectHealth(NETWORKS, 'Network', 'net-a', 'Healthy');

    // --- delete: the claimed port is released (label removed), everything goes ---
    for (const s of ['claimer', 'thief', 'vm', 'too-big', 'no-addr', 'dangling']) await deleteAndWait(SERVERS, s);
    await waitFor('user-port released', async () => {
      const p = await env.client.get<Obj>(PORTS, 'user-port', env.ns);
      return p.metadata?.labels?.[PORT_DEVICE_LABEL] === undefined;
    });
    for (const p of ['user-port', 'filler']) await deleteAndWait(PORTS, p);
    await deleteAndWait(NETWORKS, 'net-a');
    await deleteAndWait(NETWORKS, 'net-full');
    await env.operator!.mgr.idle();
    expect(nodes.length).toBe(2);

    // --- the check ---
    for (const { kind, w } of watches) expect(w.failed(), `watch of ${kind}`).toBeUndefined();
    const events: WatchRecord<Obj>[] = watches.flatMap(({ w }) => w.events);
    const violations = specOwnershipViolations(events, writes);
    expect(violations).toEqual([]);
    // the test saw the controllers at work: status written, binding labels and finalizers set
    const managers = new Set(
      events.flatMap((e) => (e.object.metadata?.managedFields ?? []).map((m) => m.manager ?? '')),
    );
    expect([...managers]).toEqual(expect.arrayContaining([USER, 'stratus-operator']));
    expect(events.some((e) => e.object.metadata?.labels?.[SERVER_NODE_LABEL])).toBe(true);
    expect(events.some((e) => e.object.metadata?.finalizers?.includes(GUEST_FINALIZER))).toBe(true);
    const statuses = new Set(
      events.map((e) => (e.object as Srv).status?.status).filter((x): x is NonNullable<typeof x> => !!x),
    );
    expect([...statuses]).toEqual(expect.arrayContaining(['BUILD', 'ACTIVE', 'SHUTOFF', 'VERIFY_RESIZE', 'ERROR']));
    expect(
      events.some((e) => e.object.metadata?.name === 'user-port' && e.object.metadata.labels?.[PORT_DEVICE_LABEL]),
    ).toBe(true);
    // the server's own port: the operator wrote its spec (created it, then changed its groups): allowed, not the user's
    const ownPort = events.filter((e) => e.object.kind === 'Port' && e.object.metadata?.name === 'vm-0');
    expect(new Set(ownPort.map((e) => canonical(e.object.spec))).size).toBeGreaterThan(1);
    console.log(
      `spec ownership: ${events.length} watch events, ${writes.length} user writes, managers ${[...managers].join(', ')}`,
    );
  }, 300_000);
});

// ---------------------------------------------------------------------------------------------------------------

const without = (m: Record<string, string> | undefined, keys: readonly string[]) =>
  Object.fromEntries(Object.entries(m ?? {}).filter(([k]) => !keys.includes(k)));

const canonical = (v: unknown): string =>
  JSON.stringify(v, (_k, x: unknown) =>
    x && typeof x === 'object' && !Array.isArray(x)
      ? Object.fromEntries(Object.entries(x as Record<string, unknown>).sort(([a], [b]) => a.localeCompare(b)))
      : x,
  );

/** A managedFields entry of a manager other than the user that writes anything but status, finalizers, labels. */
function managedFieldsViolation(kind: string, m: V1ManagedFieldsEntry): string | undefined {
  if (m.manager === USER || m.subresource === 'status') return undefined;
  const f = (m.fieldsV1 ?? {}) as Record<string, Record<string, Record<string, unknown>>>;
  const bad: string[] = [];
  for (const [top, sub] of Object.entries(f)) {
    if (top !== 'f:metadata') {
      bad.push(top);
      continue;
    }
    for (const [field, v] of Object.entries(sub)) {
      if (field === 'f:finalizers') {
        for (const k of Object.keys(v)) {
          if (k !== '.' && !ALLOWED_FINALIZERS.has(JSON.parse(k.replace(/^v:/, '')) as string))
            bad.push(`finalizer ${k}`);
        }
      } else if (field === 'f:labels') {
        for (const k of Object.keys(v)) {
          if (k !== '.' && !(ALLOWED_LABELS[kind] ?? []).includes(k.replace(/^f:/, ''))) bad.push(`label ${k}`);
        }
      } else bad.push(`metadata ${field}`);
    }
  }
  return bad.length ? `${m.manager} (${m.operation}) wrote ${bad.join(', ')}` : undefined;
}

/** Every way the recorded events show a controller writing what the user owns (empty: none). */
function specOwnershipViolations(events: readonly WatchRecord<Obj>[], userWrites: readonly Write[]): string[] {
  const byUid = new Map<string, Write[]>();
  for (const w of userWrites) byUid.set(w.uid, [...(byUid.get(w.uid) ?? []), w]);
  for (const list of byUid.values()) list.sort((a, b) => (a.rv < b.rv ? -1 : a.rv > b.rv ? 1 : 0));
  const out = new Set<string>();
  for (const e of events) {
    if (e.type === 'DELETED') continue;
    const o = e.object;
    const m = o.metadata ?? {};
    const what = `${o.kind}/${m.name}`;
    const mine = byUid.get(m.uid ?? '');
    if (!mine) {
      // Not the user's: it must be a controller's own object (not in Git).
      const controlled = (m.ownerReferences ?? []).some((r) => r.controller);
      if (!controlled && m.labels?.['app.kubernetes.io/managed-by'] !== 'stratus') {
        out.add(`${what}: created by someone other than the user, with no controller owner`);
      }
      continue;
    }
    const rv = BigInt(m.resourceVersion ?? '0');
    const last = mine.filter((w) => w.rv <= rv).at(-1);
    if (!last) {
      out.add(`${what}@${rv}: an event before the user's first write`);
      continue;
    }
    const allowed = ALLOWED_LABELS[o.kind ?? ''] ?? [];
    if (canonical(o.spec) !== canonical(last.spec)) {
      out.add(`${what}@${rv}: spec ${canonical(o.spec)} differs from the user's ${canonical(last.spec)}`);
    }
    if (canonical(without(m.labels, allowed)) !== canonical(without(last.labels, allowed))) {
      out.add(`${what}@${rv}: labels ${canonical(m.labels)} differ from the user's ${canonical(last.labels)}`);
    }
    if (canonical(m.annotations ?? {}) !== canonical(last.annotations)) {
      out.add(`${what}@${rv}: annotations ${canonical(m.annotations)} differ from ${canonical(last.annotations)}`);
    }
    for (const mf of m.managedFields ?? []) {
      const v = managedFieldsViolation(o.kind ?? '', mf);
      if (v) out.add(`${what}: ${v}`);
    }
  }
  return [...out];
}
