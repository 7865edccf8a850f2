// The Server controller (nova-api + nova-scheduler + nova-conductor): resolves a server's flavor,
// image, key pair and group, creates or claims its Ports (Nova's network allocation; the addresses in
// status come from them), schedules it with the claim ledger, binds it to a hypervisor, watches
// for hypervisors going down and cleans up on delete. Once a server is bound its lifecycle (spawn,
// power, reboot) belongs to the node agent on that hypervisor, which reports the guest's state in status.compute;
// the operator alone writes the user-facing state fields, derived from that report (deriveServerState); see
// docs/design/compute.md and docs/design/status-ownership.md.
import { isIP } from 'node:net';
import { PatchStrategy } from '@kubernetes/client-node';
import {
  attachRefusal,
  COMPUTE_GROUP,
  deriveServerState,
  deriveServerStatus,
  FENCED_ANNOTATION,
  type Flavor,
  FlavorKind,
  GUEST_FINALIZER,
  type Hypervisor,
  type Image,
  ImageKind,
  type KeyPair,
  KeyPairKind,
  NETWORK_LABEL,
  PORT_DEVICE_LABEL,
  PORT_READY,
  type Port,
  PortKind,
  type PortSpec,
  recordAction,
  refuseAction,
  refuseResizeDisks,
  SERVER_FINALIZER,
  SERVER_NODE_LABEL,
  type Server,
  type ServerGroup,
  ServerGroupKind,
  ServerKind,
  type ServerStatus,
  sameJSON,
  serverPortName,
  serverVolumeEntry,
  serverVolumeNames,
  toGiB,
  type Volume,
  VolumeKind,
} from '../api/index.ts';
import {
  addFinalizer,
  controllerOf,
  hasFinalizer,
  isAlreadyExists,
  isConflict,
  isNotFound,
  type Manager,
  objectKey,
  type ReconcileContext,
  type Request,
  removeFinalizer,
  updateStatus,
} from '../runtime/index.ts';
import {
  backendReach,
  type Claim,
  ClaimLedger,
  flavorClaim,
  groupPolicyOf,
  hostStatesFrom,
  type RequestGroup,
  type SchedulerConfig,
  schedule,
} from '../scheduler/index.ts';
import { canonical, FIELD_MANAGER, gvrOf, specOrMetaChanged, withConditions } from './common.ts';
import { HYPERVISORS, isUp } from './hypervisor.ts';

const SERVERS = gvrOf(ServerKind);
const PORTS = gvrOf(PortKind);

export interface ServerControllerOptions {
  instance: string;
  concurrency?: number;
  heartbeatGraceMs: number;
  /**
   * A server in VERIFY_RESIZE is confirmed automatically after this long (Nova's resize_confirm_window);
   * default 0: never, the user confirms or reverts (spec.triggers.confirmResize / revertResize).
   */
  resizeConfirmWindowMs?: number;
  scheduler?: SchedulerConfig;
  now?: () => number;
}

type Status = ServerStatus;
type ConditionUpdate = { type: string; status: 'True' | 'False' | 'Unknown'; reason: string; message: string };

/** The claim a bound server holds, from its status (what an operator restart rebuilds). */
export function claimOf(server: Server): Claim | undefined {
  const node = server.status?.node;
  const a = server.status?.allocation;
  if (!node || !a) return undefined;
  const group = server.spec?.serverGroup ? `${server.metadata.namespace}/${server.spec.serverGroup}` : undefined;
  return {
    server: objectKey(server),
    node,
    vcpus: a.vcpus,
    ramMiB: a.ramMiB,
    diskGiB: a.diskGiB,
    ...(group ? { group } : {}),
  };
}

/**
 * The server group a resize or migration must keep honouring: the group's policy, with the hosts of the server's
 * *other* members (its own placement is the one being changed). Undefined when the server is in no group.
 */
export function moveGroup(
  server: Server,
  group: Pick<ServerGroup, 'metadata' | 'spec'> | undefined,
  claims: Iterable<Claim>,
): RequestGroup | undefined {
  if (!group) return undefined;
  const policy = groupPolicyOf(group);
  const key = objectKey(server);
  const hosts = new Set<string>();
  for (const c of claims) if (c.group === policy.key && c.server !== key) hosts.add(c.node);
  return { ...policy, hosts: [...hosts].sort() };
}

// ---------------------------------------------------------------------------------------------------------------
// Ports (Nova's network allocation): pure helpers
// ---------------------------------------------------------------------------------------------------------------

/** Port condition reasons that end a build: the port will not get its addresses or MAC (Nova aborts the build). */
export const PORT_FAILURE_REASONS: ReadonlySet<string> = new Set([
  'IpAddressGenerationFailure',
  'IpAddressAlreadyAllocated',
  'MacAddressInUse',
  'InvalidIpForSubnet',
]);

/** What a server's `index`-th spec.networks entry asks the Port it creates to be. */
export function desiredPortSpec(server: Pick<Server, 'spec'>, index: number): PortSpec {
  const n = server.spec.networks?.[index];
  if (!n?.network) throw new Error(`spec.networks[${index}] names no network`);
  return {
    network: n.network,
    ...(n.fixedIP ? { fixedIPs: [{ ipAddress: n.fixedIP }] } : {}),
    securityGroups: [...(server.spec.securityGroups ?? ['default'])],
    adminStateUp: true,
  };
}

/**
 * Labels of a Port a server creates: the server's own labels (so what selects a server's objects selects its ports
 * too), without the compute.stratus.io/ ones, plus the device (server) and network labels.
 */
export function serverPortLabels(server: Pick<Server, 'metadata'>, network: string): Record<string, string> {
  const own = Object.entries(server.metadata.labels ?? {}).filter(([k]) => !k.startsWith(`${COMPUTE_GROUP}/`));
  return { ...Object.fromEntries(own), [PORT_DEVICE_LABEL]: server.metadata.name ?? '', [NETWORK_LABEL]: network };
}

/** The Server a port is used by: its device label, else the Server that controls it. */
export function portHolder(port: Pick<Port, 'metadata'>): string | undefined {
  const label = port.metadata.labels?.[PORT_DEVICE_LABEL];
  if (label) return label;
  const owner = controllerOf(port);
  return owner?.kind === ServerKind.kind ? owner.name : undefined;
}

/** Whether `server` (by uid) is the controller of `port`, i.e. the server created it. */
export function ownsPort(server: Pick<Server, 'metadata'>, port: Pick<Port, 'metadata'>): boolean {
  const owner = controllerOf(port);
  return owner?.kind === ServerKind.kind && owner.uid === server.metadata.uid;
}

/** The reason and message when the port failed allocation for good (Ready=False, a terminal reason), else undefined. */
export function portFailure(port: Pick<Port, 'status'>): { reason: string; message: string } | undefined {
  const c = port.status?.conditions?.find((x) => x.type === PORT_READY);
  if (c?.status !== 'False' || !PORT_FAILURE_REASONS.has(c.reason)) return undefined;
  return { reason: c.reason, message: c.message };
}

/** The Port name of each spec.networks entry: the one named, or the one the server creates. */
export function serverPortNames(server: Pick<Server, 'metadata' | 'spec'>): string[] {
  return (server.spec.networks ?? []).map((n, i) => n.port ?? serverPortName(server.metadata.name ?? '', i));
}

/**
 * status.addresses from the ports of the server, in spec.networks order (`ports[i]` is the port of entry i, or
 * undefined while it does not exist): every allocated fixed IP with its network, IP version, MAC and port.
 */
export function addressesFromPorts(ports: ReadonlyArray<Pick<Port, 'metadata' | 'spec' | 'status'> | undefined>) {
  const out: NonNullable<ServerStatus['addresses']> = [];
  for (const p of ports) {
    if (!p) continue;
    for (const f of p.status?.fixedIPs ?? []) {
      const version = isIP(f.ipAddress);
      if (version !== 4 && version !== 6) continue;
      out.push({
        network: p.spec.network,
        ip: f.ipAddress,
        version,
        ...(p.status?.macAddress ? { macAddress: p.status.macAddress } : {}),
        type: 'fixed',
        port: p.metadata.name ?? '',
      });
    }
  }
  return out.slice(0, 64);
}

export function registerServerController(mgr: Manager, opts: ServerControllerOptions) {
  const servers = mgr.informer<Server>(SERVERS);
  const flavors = mgr.informer<Flavor>(gvrOf(FlavorKind));
  const images = mgr.informer<Image>(gvrOf(ImageKind));
  const keypairs = mgr.informer<KeyPair>(gvrOf(KeyPairKind));
  const groups = mgr.informer<ServerGroup>(gvrOf(ServerGroupKind));
  const hypervisors = mgr.informer<Hypervisor>(HYPERVISORS);
  const ports = mgr.informer<Port>(PORTS);
  const volumes = mgr.informer<Volume>(gvrOf(VolumeKind));
  const events = mgr.eventRecorder({
    reportingController: 'stratus.io/server-controller',
    reportingInstance: opts.instance,
  });
  const client = mgr.client;
  const now = opts.now ?? Date.now;
  const ledger = new ClaimLedger();
  let ledgerBuilt = false;

  // Unbound servers wait for what they reference: index them so its arrival requeues them.
  const ref = (kind: string) => (s: Server) => {
    if (s.status?.node) return [];
    const spec = s.spec ?? {};
    const name =
      kind === 'flavor'
        ? spec.flavor
        : kind === 'image'
          ? spec.image
          : kind === 'keypair'
            ? spec.keyPair
            : spec.serverGroup;
    if (!name) return [];
    return [kind === 'flavor' ? name : `${s.metadata.namespace}/${name}`];
  };
  for (const kind of ['flavor', 'image', 'keypair', 'group']) servers.addIndex(`waitsFor:${kind}`, ref(kind));
  servers.addIndex('node', (s: Server) => (s.status?.node ? [s.status.node] : []));
  // Every Port a server uses, by namespace/name (the ports it names and those it creates): their changes requeue it.
  servers.addIndex('ports', (s: Server) =>
    Array.isArray(s.spec?.networks) ? serverPortNames(s).map((p) => `${s.metadata.namespace}/${p}`) : [],
  );

  // The volumes a server lists (spec.volumes, bootVolume): their changes requeue it (volumesAttached, boot volume).
  servers.addIndex('volumeRefs', (s: Server) =>
    serverVolumeNames(s.spec ?? {}).map((v) => `${s.metadata.namespace}/${v}`),
  );

  function ensureLedger(): void {
    if (ledgerBuilt) return;
    const claims: Claim[] = [];
    for (const s of servers.list()) {
      const c = claimOf(s);
      if (c) claims.push(c);
    }
    ledger.rebuild(claims);
    ledgerBuilt = true;
    mgr.logger.info({ claims: claims.length }, 'claim ledger rebuilt from the API');
  }

  /**
   * Read-modify-write of status. `mutate` sees the freshest status (re-read after a conflict), with the state fields
   * derived from the agent's report (deriveServerState), and returns false to leave it alone, e.g. when the server
   * got bound meanwhile. The operator is the only writer of vmState, taskState, status, powerState, fault and actions:
   * after the mutation they are derived again (an operator request it just made stands until the agent takes it up).
   */
  async function writeStatus(server: Server, mutate: (st: Status) => undefined | false): Promise<Server> {
    return updateStatus<Server>(
      client,
      SERVERS,
      server,
      (st) => {
        deriveServerState(st);
        if (mutate(st as Status) === false) return undefined;
        deriveServerState(st);
        if ((st as Status).vmState)
          (st as Status).status = deriveServerStatus((st as Status).vmState, (st as Status).taskState);
        return st;
      },
      { fieldManager: FIELD_MANAGER },
    );
  }

  function conditionsWith(st: Status, gen: number | undefined, ...updates: ConditionUpdate[]) {
    st.conditions = withConditions(st.conditions, updates, gen, new Date(now()));
  }

  /** A server that cannot be scheduled yet because something it names is missing. */
  async function waitFor(server: Server, reason: string, message: string) {
    await writeStatus(server, (st) => {
      if (st.node) return false;
      st.vmState = 'building';
      st.taskState = 'scheduling';
      st.observedGeneration = server.metadata.generation;
      conditionsWith(st, server.metadata.generation, { type: 'Scheduled', status: 'False', reason, message });
    });
    return undefined;
  }

  async function fail(server: Server, reason: string, message: string, code = reason === 'NoValidHost' ? 500 : 400) {
    const t = new Date(now()).toISOString();
    await writeStatus(server, (st) => {
      if (st.node) return false;
      st.vmState = 'error';
      delete st.taskState;
      st.fault = { code, message, time: t };
      st.observedGeneration = server.metadata.generation;
      conditionsWith(st, server.metadata.generation, { type: 'Scheduled', status: 'False', reason, message });
      recordAction(st, 'create', 'Error', message, t);
    });
    events.warning(server, reason === 'NoValidHost' ? 'FailedScheduling' : reason, 'Schedule', message);
  }

  async function scheduleAndBind(server: Server, ctx: ReconcileContext) {
    const key = objectKey(server);
    const ns = server.metadata.namespace ?? '';
    const spec = server.spec;
    const flavor = flavors.get(spec.flavor);
    if (!flavor) return waitFor(server, 'FlavorNotFound', `flavor ${spec.flavor} does not exist`);
    const image = spec.image ? images.get(spec.image, ns) : undefined;
    if (spec.image && !image) return waitFor(server, 'ImageNotFound', `image ${spec.image} does not exist in ${ns}`);
    if (spec.keyPair && !keypairs.get(spec.keyPair, ns)) {
      return waitFor(server, 'KeyPairNotFound', `key pair ${spec.keyPair} does not exist in ${ns}`);
    }
    let group: RequestGroup | undefined;
    if (spec.serverGroup) {
      const g = groups.get(spec.serverGroup, ns);
      if (!g) return waitFor(server, 'ServerGroupNotFound', `server group ${spec.serverGroup} does not exist in ${ns}`);
      group = { ...groupPolicyOf(g), hosts: ledger.hostsOfGroup(`${ns}/${spec.serverGroup}`) };
    }
    const fspec = FlavorKind.spec.safeParse(flavor.spec);
    if (!fspec.success)
      return waitFor(server, 'InvalidFlavor', `flavor ${spec.flavor} is invalid: ${fspec.error.message}`);
    if (image && (image.spec?.minRAM ?? 0) > 0 && flavorClaim(fspec.data).ramMiB < (image.spec?.minRAM ?? 0)) {
      await fail(
        server,
        'FlavorMemoryTooSmall',
        `flavor ${spec.flavor} has less memory than image ${spec.image} requires (${image.spec?.minRAM} MiB)`,
      );
      return undefined;
    }
    // Boot from volume: the server is bound once its boot volume is available (or reserved for it), on a node that
    // reaches its backend, preferably the node holding a local one.
    let bootVolume: Volume | undefined;
    if (spec.bootVolume) {
      bootVolume = volumes.get(spec.bootVolume, ns);
      if (!bootVolume) return waitFor(server, 'VolumeNotFound', `Volume ${spec.bootVolume} could not be found.`);
      const vs = bootVolume.status;
      const mine = vs?.attachments?.some(
        (a) => a.server === server.metadata.name && a.serverUID === server.metadata.uid,
      );
      if (!mine && vs?.status !== 'available') {
        return waitFor(
          server,
          'VolumeNotAvailable',
          `Invalid volume: Volume ${spec.bootVolume} status must be available or in-use, but the current status is ${vs?.status ?? 'creating'}`,
        );
      }
    }
    const resources = flavorClaim(fspec.data, image, { bootFromVolume: !!spec.bootVolume });
    const hosts = hostStatesFrom(hypervisors.list(), ledger.claims(), now(), {
      exclude: key,
      heartbeatGraceSeconds: opts.heartbeatGraceMs / 1000,
    });
    const bootBackend = bootVolume?.status?.backend;
    // Prefer the nodes holding the server's local volumes (the boot volume first): attached there, they need no NBD.
    const volumeHosts = [bootVolume, ...(spec.volumes ?? []).map((v) => volumes.get(v.volume, ns))]
      .filter((v): v is Volume => v?.status?.backend === 'local' && v.status.node !== undefined)
      .map((v) => v.status!.node!);
    // From here to ledger.assume nothing awaits: concurrent reconciles see each other's claims.
    const result = schedule(
      {
        server: key,
        resources,
        ...(image?.spec?.properties ? { imageProperties: image.spec.properties } : {}),
        ...(spec.availabilityZone ? { availabilityZone: spec.availabilityZone } : {}),
        ...(spec.nodeSelector ? { nodeSelector: spec.nodeSelector } : {}),
        ...(group ? { group } : {}),
        ...(bootBackend ? { volumeBackends: [bootBackend] } : {}),
        ...(volumeHosts.length > 0 ? { volumeHosts } : {}),
      },
      hosts,
      opts.scheduler,
    );
    if (!result.ok) {
      // A hypervisor not judged up or down yet (its agent just started: no Lease renewal seen) may be the host this
      // server needs. Failing now would put the server in ERROR for good (Nova does not retry NoValidHost): wait.
      const pending = hypervisors.list().filter((h) => h.status?.state === undefined && h.spec?.enabled !== false);
      if (pending.length > 0) {
        ctx.log.info({ message: result.message, pending: pending.length }, 'no valid host yet; hypervisors pending');
        await waitFor(
          server,
          'HypervisorsPending',
          `${result.message}; ${pending.length} hypervisor(s) not judged up or down yet (no Lease renewal seen): waiting`,
        );
        return { requeueAfter: 1000 };
      }
      ctx.log.info({ message: result.message }, 'no valid host');
      await fail(server, 'NoValidHost', result.message);
      return undefined;
    }
    const node = result.host;
    ledger.assume({ server: key, node, ...resources, ...(group ? { group: group.key } : {}) });
    try {
      const t = new Date(now()).toISOString();
      // The status is the record of the claim (rebuilt from it after a restart), so it is written first;
      // the label that hands the server to the node's agent follows.
      const bound = await writeStatus(server, (st) => {
        if (st.node) return false; // bound meanwhile (a previous leader): keep that binding
        st.node = node;
        st.allocation = { vcpus: resources.vcpus, ramMiB: resources.ramMiB, diskGiB: resources.diskGiB };
        st.flavor = {
          name: spec.flavor,
          vcpus: fspec.data.vcpus,
          ram: fspec.data.ram,
          disk: fspec.data.disk,
          ephemeral: fspec.data.ephemeral,
          swap: fspec.data.swap,
        };
        if (spec.image) st.image = spec.image;
        st.vmState = 'building';
        st.taskState = 'spawning';
        delete st.fault;
        st.observedGeneration = server.metadata.generation;
        conditionsWith(st, server.metadata.generation, {
          type: 'Scheduled',
          status: 'True',
          reason: 'Scheduled',
          message: `bound to hypervisor ${node}`,
        });
        recordAction(st, 'create', 'InProgress', undefined, t);
      });
      if (bound.status?.node !== node) {
        ledger.forget(key);
        return { requeue: true };
      }
      await bindMetadata(bound, node);
      ledger.confirm(key);
    } catch (e) {
      ledger.forget(key);
      throw e;
    }
    events.normal(server, 'Scheduled', 'Schedule', `bound to hypervisor ${node}`);
    ctx.log.info({ node, ...resources }, 'scheduled');
    return undefined;
  }

  /**
   * Hands a server to a node: the node label and the operator's finalizer in one merge patch guarded by
   * resourceVersion (one request; a server that is not bound needs no finalizer, nothing to clean up).
   */
  async function bindMetadata(server: Server, node: string) {
    let cur = server;
    for (let i = 1; ; i++) {
      const finalizers = cur.metadata.finalizers ?? [];
      const needsFinalizer = !finalizers.includes(SERVER_FINALIZER) && !cur.metadata.deletionTimestamp;
      if (cur.metadata.labels?.[SERVER_NODE_LABEL] === node && !needsFinalizer) return;
      try {
        await client.patch(
          SERVERS,
          cur.metadata.name ?? '',
          cur.metadata.namespace,
          {
            metadata: {
              resourceVersion: cur.metadata.resourceVersion,
              labels: { [SERVER_NODE_LABEL]: node },
              ...(needsFinalizer ? { finalizers: [...finalizers, SERVER_FINALIZER] } : {}),
            },
          },
          PatchStrategy.MergePatch,
        );
        return;
      } catch (e) {
        if (i >= 5 || !isConflict(e)) throw e;
        cur = await client.get<Server>(SERVERS, cur.metadata.name ?? '', cur.metadata.namespace);
      }
    }
  }

  /**
   * The state fields of a bound server derived from its node agent's report (status.compute), written when they
   * differ: the controller watches the report, so this follows each change of it.
   */
  async function syncState(server: Server): Promise<Server> {
    const st = structuredClone(server.status ?? {}) as Record<string, unknown>;
    if (!deriveServerState(st)) return server;
    return writeStatus(server, () => undefined);
  }

  /**
   * status.volumesAttached (Nova's os-extended-volumes:volumes_attached: the attachments of this server in state
   * attached, the boot volume first) and condition VolumesAttached: True when every listed volume is attached, False
   * with the refusal in Cinder's words (VolumeNotAvailable, VolumeInUse, BackendUnreachable, and a Warning Event) or
   * while attaching. The Volume controller keeps the attachments; the same refusal rule (attachRefusal) decides both.
   */
  async function syncVolumes(server: Server): Promise<Server> {
    const ns = server.metadata.namespace ?? '';
    const names = serverVolumeNames(server.spec ?? {});
    const had = server.status?.conditions?.find((c) => c.type === 'VolumesAttached');
    if (names.length === 0 && !had && !server.status?.volumesAttached) return server;
    const attached: NonNullable<Status['volumesAttached']> = [];
    let refusal: { reason: string; message: string } | undefined;
    const pending: string[] = [];
    const node = server.status?.node;
    for (const name of names) {
      const entry = serverVolumeEntry(server.spec, name);
      const vol = volumes.get(name, ns);
      const att = vol?.status?.attachments?.find(
        (a) => a.server === server.metadata.name && (a.serverUID ?? server.metadata.uid) === server.metadata.uid,
      );
      if (att?.state === 'attached') {
        attached.push({
          volume: name,
          ...(att.device ? { device: att.device } : {}),
          ...(att.bus ? { bus: att.bus } : {}),
          ...(entry?.bootIndex !== undefined ? { bootIndex: entry.bootIndex } : {}),
          deleteOnTermination: entry?.deleteOnTermination ?? false,
        });
        continue;
      }
      pending.push(name);
      if (refusal || att) continue;
      if (!vol) {
        refusal = { reason: 'VolumeNotFound', message: `Volume ${name} could not be found.` };
        continue;
      }
      const backend = vol.status?.backend ?? 'local';
      const r = attachRefusal(
        { name, status: vol.status?.status, multiattach: vol.status?.multiattach, backend },
        vol.status?.attachments ?? [],
        {
          name: server.metadata.name ?? '',
          uid: server.metadata.uid ?? '',
          node,
          reach: node ? backendReach(hypervisors.get(node), backend) : undefined,
        },
      );
      if (r) refusal = r;
    }
    const cond: ConditionUpdate =
      pending.length === 0
        ? {
            type: 'VolumesAttached',
            status: 'True',
            reason: 'Attached',
            message: `${attached.length} volume(s) attached`,
          }
        : refusal
          ? { type: 'VolumesAttached', status: 'False', ...refusal }
          : {
              type: 'VolumesAttached',
              status: 'False',
              reason: 'Attaching',
              message: `attaching ${pending.join(', ')}`,
            };
    const same =
      had?.status === cond.status &&
      had.reason === cond.reason &&
      had.message === cond.message &&
      canonical(server.status?.volumesAttached ?? []) === canonical(attached);
    if (same) return server;
    const updated = await writeStatus(server, (st) => {
      if (attached.length > 0) st.volumesAttached = attached;
      else delete st.volumesAttached;
      conditionsWith(st, server.metadata.generation, cond);
    });
    if (refusal && (had?.reason !== refusal.reason || had.message !== refusal.message)) {
      events.warning(server, refusal.reason, 'AttachVolume', refusal.message);
    }
    return updated;
  }

  /**
   * A deleted server's volumes with deleteOnTermination (spec.volumes[].deleteOnTermination,
   * bootVolumeDeleteOnTermination) are deleted once its guest is gone and their attachment to it dropped. Returns
   * true while one still holds an attachment to this server (the Volume controller drops it promptly).
   */
  async function deleteVolumesOnTermination(server: Server, ctx: ReconcileContext): Promise<boolean> {
    const ns = server.metadata.namespace ?? '';
    let waiting = false;
    for (const name of serverVolumeNames(server.spec ?? {})) {
      if (!serverVolumeEntry(server.spec, name)?.deleteOnTermination) continue;
      const vol = volumes.get(name, ns);
      if (!vol || vol.metadata.deletionTimestamp) continue;
      if (vol.status?.attachments?.some((a) => a.server === server.metadata.name)) {
        waiting = true;
        continue;
      }
      try {
        await client.delete(gvrOf(VolumeKind), name, ns, { preconditions: { uid: vol.metadata.uid } });
        events.normal(
          server,
          'VolumeDeleted',
          'Delete',
          `volume ${name} deleted with the server (deleteOnTermination)`,
        );
        ctx.log.info({ volume: name }, 'volume deleted on termination');
      } catch (e) {
        if (isNotFound(e) || isConflict(e)) continue;
        // Refused (another server attached it meanwhile): the volume stays, as in Nova.
        ctx.log.info({ err: e, volume: name }, 'volume not deleted on termination');
        events.warning(server, 'VolumeNotDeleted', 'Delete', `volume ${name} not deleted: ${(e as Error).message}`);
      }
    }
    return waiting;
  }

  /** Marks a bound server's hypervisor reachability (NOSTATE when it stopped reporting). */
  async function trackHypervisor(server: Server, ctx: ReconcileContext) {
    const node = server.status?.node ?? '';
    const hv = hypervisors.get(node);
    const up = hv !== undefined && isUp(hv, now(), opts.heartbeatGraceMs);
    const cond = server.status?.conditions?.find((c) => c.type === 'HypervisorUp');
    if (up && cond?.status !== 'False') return undefined;
    if (!up && cond?.status === 'False' && server.status?.powerState === 'NOSTATE') return undefined;
    await writeStatus(server, (st) => {
      if (!up) st.powerState = 'NOSTATE';
      conditionsWith(
        st,
        server.metadata.generation,
        up
          ? {
              type: 'HypervisorUp',
              status: 'True',
              reason: 'HeartbeatResumed',
              message: `hypervisor ${node} reports again`,
            }
          : {
              type: 'HypervisorUp',
              status: 'False',
              reason: 'HeartbeatExpired',
              message: `hypervisor ${node} has not reported for more than ${opts.heartbeatGraceMs / 1000} s; the guest state is unknown`,
            },
      );
    });
    if (!up) {
      events.warning(server, 'HypervisorDown', 'Monitor', `hypervisor ${node} stopped reporting; power state unknown`);
      ctx.log.warn({ node }, 'hypervisor down: server power state unknown');
    }
    return undefined;
  }

  // ---- ports (Nova's network allocation) ----

  type PortProblem = { kind: 'wait' | 'fail'; reason: string; message: string };
  type PortResult = { kind: 'ok'; port: Port } | PortProblem;
  /** The server's ports in spec.networks order (undefined where there is none yet), or why it cannot go on. */
  type PortsOutcome = { kind: 'ok'; ports: (Port | undefined)[] } | (PortProblem & { ports: (Port | undefined)[] });

  /**
   * Ensures the ports of every spec.networks entry: creates the ports of `network` entries (owned by the server, so
   * the garbage collector deletes them with it) and keeps their security groups, claims the named ports of `port`
   * entries. Reads the cache; writes only what differs. Stops at the first port another server holds.
   */
  async function ensurePorts(server: Server, ctx: ReconcileContext): Promise<PortsOutcome> {
    const list: (Port | undefined)[] = [];
    let waiting: PortProblem | undefined;
    for (const [i, n] of (server.spec.networks ?? []).entries()) {
      const r = n.network ? await ensureOwnedPort(server, i, ctx) : await claimPort(server, n.port ?? '', ctx);
      if (r.kind === 'fail') return { ...r, ports: list };
      if (r.kind === 'wait') waiting ??= r;
      list.push(r.kind === 'ok' ? r.port : undefined);
    }
    return waiting ? { ...waiting, ports: list } : { kind: 'ok', ports: list };
  }

  async function ensureOwnedPort(server: Server, index: number, ctx: ReconcileContext): Promise<PortResult> {
    const ns = server.metadata.namespace ?? '';
    const name = server.metadata.name ?? '';
    const portName = serverPortName(name, index);
    const spec = desiredPortSpec(server, index);
    let port = ports.get(portName, ns);
    if (!port) {
      try {
        port = await client.create<Port>(PORTS, {
          apiVersion: PortKind.apiVersion,
          kind: PortKind.kind,
          metadata: {
            name: portName,
            namespace: ns,
            labels: serverPortLabels(server, spec.network),
            ownerReferences: [
              {
                apiVersion: ServerKind.apiVersion,
                kind: ServerKind.kind,
                name,
                uid: server.metadata.uid ?? '',
                controller: true,
                blockOwnerDeletion: true,
              },
            ],
          },
          spec,
        } as Port);
        ctx.log.debug({ port: portName, network: spec.network }, 'port created');
      } catch (e) {
        if (!isAlreadyExists(e)) throw e;
        port = await client.get<Port>(PORTS, portName, ns); // the cache is behind
      }
    }
    if (port.metadata.deletionTimestamp) {
      return { kind: 'wait', reason: 'PortDeleting', message: `port ${portName} is being deleted; it is re-created` };
    }
    if (!ownsPort(server, port)) {
      const owner = controllerOf(port);
      if (owner?.kind === ServerKind.kind && owner.name === name) {
        // A port of an earlier server of this name: the garbage collector deletes it, then it is re-created.
        return {
          kind: 'wait',
          reason: 'PortDeleting',
          message: `port ${portName} of an earlier server ${name} is not deleted yet`,
        };
      }
      const holder = portHolder(port);
      return {
        kind: 'fail',
        reason: 'PortInUse',
        message:
          holder && holder !== name
            ? `Port ${portName} is still in use by server ${holder}`
            : `Port ${portName} already exists and was not created by server ${name}`,
      };
    }
    const labels = port.metadata.labels ?? {};
    const relabel = labels[PORT_DEVICE_LABEL] !== name || labels[NETWORK_LABEL] !== spec.network;
    const regroup = canonical(port.spec?.securityGroups ?? null) !== canonical(spec.securityGroups);
    if (relabel || regroup) {
      port = await client.patch<Port>(
        PORTS,
        portName,
        ns,
        {
          ...(relabel ? { metadata: { labels: { [PORT_DEVICE_LABEL]: name, [NETWORK_LABEL]: spec.network } } } : {}),
          ...(regroup ? { spec: { securityGroups: spec.securityGroups } } : {}),
        },
        PatchStrategy.MergePatch,
      );
      ctx.log.debug({ port: portName, securityGroups: spec.securityGroups }, 'port updated');
    }
    return { kind: 'ok', port };
  }

  /**
   * Claims an existing port for the server (Neutron device_id): sets its device label, guarded by resourceVersion,
   * only when no server holds it. The server gets its finalizer first, so the claim is released when it goes.
   */
  async function claimPort(server: Server, portName: string, ctx: ReconcileContext): Promise<PortResult> {
    const ns = server.metadata.namespace ?? '';
    const name = server.metadata.name ?? '';
    let port = ports.get(portName, ns);
    for (let i = 1; ; i++) {
      if (!port || port.metadata.deletionTimestamp) {
        return { kind: 'wait', reason: 'PortNotFound', message: `port ${portName} does not exist in ${ns}` };
      }
      const holder = portHolder(port);
      if (holder === name && !(controllerOf(port)?.kind === ServerKind.kind && !ownsPort(server, port))) {
        return { kind: 'ok', port };
      }
      if (holder) {
        return { kind: 'fail', reason: 'PortInUse', message: `Port ${portName} is still in use by server ${holder}` };
      }
      if (!hasFinalizer(server, SERVER_FINALIZER)) {
        server = await addFinalizer<Server>(client, SERVERS, name, ns, SERVER_FINALIZER, { current: server });
      }
      try {
        port = await client.patch<Port>(
          PORTS,
          portName,
          ns,
          { metadata: { resourceVersion: port.metadata.resourceVersion, labels: { [PORT_DEVICE_LABEL]: name } } },
          PatchStrategy.MergePatch,
        );
        ctx.log.info({ port: portName }, 'port claimed');
        return { kind: 'ok', port };
      } catch (e) {
        if (i >= 5 || !(isConflict(e) || isNotFound(e))) throw e;
        port = await getPort(portName, ns);
      }
    }
  }

  async function getPort(name: string, ns: string): Promise<Port | undefined> {
    try {
      return await client.get<Port>(PORTS, name, ns);
    } catch (e) {
      if (isNotFound(e)) return undefined;
      throw e;
    }
  }

  /**
   * On deletion (Nova deallocate_for_instance): deletes the ports the server created (the garbage collector would,
   * later) and removes the device label from the ports it claimed, which stay for another server.
   */
  async function releasePorts(server: Server, ctx: ReconcileContext) {
    const ns = server.metadata.namespace ?? '';
    const name = server.metadata.name ?? '';
    const nets = Array.isArray(server.spec?.networks) ? server.spec.networks : [];
    for (const [i, n] of nets.entries()) {
      if (n.network) {
        const p = ports.get(serverPortName(name, i), ns);
        if (!p || p.metadata.deletionTimestamp || !ownsPort(server, p)) continue;
        await client
          .delete(PORTS, p.metadata.name ?? '', ns, { preconditions: { uid: p.metadata.uid } })
          .catch((e: unknown) => {
            if (!isNotFound(e) && !isConflict(e)) throw e;
          });
        continue;
      }
      if (!n.port) continue;
      let p = ports.get(n.port, ns);
      for (let i = 1; p && p.metadata.labels?.[PORT_DEVICE_LABEL] === name && !ownsPort(server, p); i++) {
        try {
          await client.patch(
            PORTS,
            n.port,
            ns,
            { metadata: { resourceVersion: p.metadata.resourceVersion, labels: { [PORT_DEVICE_LABEL]: null } } },
            PatchStrategy.MergePatch,
          );
          ctx.log.info({ port: n.port }, 'port released');
          break;
        } catch (e) {
          if (i >= 5 || !(isConflict(e) || isNotFound(e))) throw e;
          p = await getPort(n.port, ns);
        }
      }
    }
  }

  /** The first port that failed allocation for good, as a fault message. */
  function failedPort(list: readonly (Port | undefined)[]): { reason: string; message: string } | undefined {
    for (const p of list) {
      const f = p && portFailure(p);
      if (f) return { reason: f.reason, message: `port ${p.metadata.name}: ${f.reason}: ${f.message}` };
    }
    return undefined;
  }

  /**
   * A bound server whose port failed allocation while building: Nova's build abort. ERROR with the fault, the claim
   * released (status.node and allocation cleared, the ledger forgets it) and the node label removed, so the agent
   * lets go of it.
   */
  async function abortBuild(server: Server, reason: string, message: string, ctx: ReconcileContext) {
    const node = server.status?.node;
    const t = new Date(now()).toISOString();
    const updated = await writeStatus(server, (st) => {
      if (st.vmState !== 'building' || st.node !== node) return false; // the build went on meanwhile
      st.vmState = 'error';
      delete st.taskState;
      delete st.node;
      delete st.allocation;
      st.fault = { code: 500, message, time: t };
      st.observedGeneration = server.metadata.generation;
      conditionsWith(st, server.metadata.generation, { type: 'Scheduled', status: 'False', reason, message });
      recordAction(st, 'create', 'Error', message, t);
    });
    if (updated.status?.node) return;
    ledger.forget(objectKey(server));
    await unbindLabel(updated);
    events.warning(server, reason, 'Build', `build aborted: ${message}`);
    ctx.log.info({ node, reason, message }, 'build aborted: port allocation failed');
  }

  /** Removes the node label of a server that is no longer placed (its status.node is unset). */
  async function unbindLabel(server: Server) {
    if (server.metadata.labels?.[SERVER_NODE_LABEL] === undefined) return;
    await client.patch(
      SERVERS,
      server.metadata.name ?? '',
      server.metadata.namespace,
      { metadata: { labels: { [SERVER_NODE_LABEL]: null } } },
      PatchStrategy.MergePatch,
    );
  }

  /** status.addresses from the ports, written only when it differs. */
  async function syncAddresses(server: Server, list: readonly (Port | undefined)[]): Promise<Server> {
    const want = addressesFromPorts(list);
    if (canonical(want) === canonical(server.status?.addresses ?? [])) return server;
    return writeStatus(server, (st) => {
      if (want.length > 0) st.addresses = want;
      else delete st.addresses;
    });
  }

  async function reconcile(req: Request, ctx: ReconcileContext) {
    ensureLedger();
    const key = req.namespace ? `${req.namespace}/${req.name}` : req.name;
    const server = servers.get(req.name, req.namespace);
    if (!server) {
      ledger.forget(key);
      return undefined;
    }

    if (server.metadata.deletionTimestamp) {
      if (hasFinalizer(server, GUEST_FINALIZER)) {
        const node = server.status?.node;
        const hv = node ? hypervisors.get(node) : undefined;
        // Nova's local delete: a server whose hypervisor is gone or down is deleted without it; the agent
        // destroys the orphaned guest if it ever comes back.
        if (!hv || !isUp(hv, now(), opts.heartbeatGraceMs)) {
          await removeFinalizer(client, SERVERS, req.name, req.namespace, GUEST_FINALIZER, { current: server });
          events.warning(server, 'LocalDelete', 'Delete', `hypervisor ${node ?? '(none)'} is down: deleted without it`);
          return undefined;
        }
        await syncState(server); // the agent reports deleting, then deleted
        return { requeueAfter: opts.heartbeatGraceMs }; // the agent destroys the guest and releases its finalizer
      }
      if (hasFinalizer(server, SERVER_FINALIZER)) {
        const waiting = await deleteVolumesOnTermination(server, ctx);
        if (waiting) return { requeueAfter: 5000 };
        await releasePorts(server, ctx);
        await removeFinalizer(client, SERVERS, req.name, req.namespace, SERVER_FINALIZER, { current: server });
      }
      ledger.forget(key);
      return undefined;
    }

    const parsed = ServerKind.schema.safeParse(server);
    if (!parsed.success) {
      if (server.status?.vmState !== 'error') await fail(server, 'InvalidSpec', parsed.error.message.slice(0, 2000));
      return undefined;
    }
    if (!server.status?.node) {
      // Nova does not retry a server that went to ERROR while scheduling; a spec change does.
      if (server.status?.vmState === 'error' && server.status.observedGeneration === server.metadata.generation) {
        await unbindLabel(server); // an aborted build that stopped between its status write and the label
        return undefined;
      }
      // Ports first (Nova validates requested ports in the API); scheduling does not wait for their addresses.
      const net = await ensurePorts(parsed.data as Server, ctx);
      if (net.kind === 'wait') return waitFor(server, net.reason, net.message);
      const failed = net.kind === 'fail' ? net : failedPort(net.ports);
      if (failed) {
        await fail(server, failed.reason, failed.message, failed.reason === 'PortInUse' ? 409 : 500);
        return undefined;
      }
      return scheduleAndBind(parsed.data as Server, ctx);
    }

    // Bound: keep the claim, the label and the finalizer in place (repairs a restart between the two writes).
    const claim = claimOf(server);
    if (claim && !ledger.get(key)) ledger.assume(claim);
    if (claim) ledger.confirm(key);
    await bindMetadata(server, server.status.node);
    // The user-facing state follows the agent's report first: every decision below reads the derived fields.
    const synced = await syncState(server);
    const cur = (ServerKind.schema.safeParse(synced).data ?? parsed.data) as Server;
    const net = await ensurePorts(cur, ctx);
    if (cur.status?.vmState === 'building') {
      const failed = net.kind === 'fail' ? net : failedPort(net.ports);
      if (failed) {
        await abortBuild(cur, failed.reason, failed.message, ctx);
        return undefined;
      }
    }
    if (net.kind !== 'ok') ctx.log.info({ reason: net.reason, message: net.message }, 'ports not in place');
    const following = await followMove(cur, ctx);
    if (following) return following;
    const moved = await resizeOrMigrate(cur, ctx);
    if (moved) return moved;
    const addressed = await syncAddresses(synced, net.ports);
    return trackHypervisor(await syncVolumes(addressed), ctx);
  }

  /**
   * A resize or migration after its placement: records fencing of a down source (an admin annotated it
   * compute.stratus.io/fenced), turns the confirmResize / revertResize tokens of a server in VERIFY_RESIZE into the
   * tasks the agents carry out (resize_confirming on the new node; resize_reverting back on the old node, with the
   * old flavor, claim and label), and drops the move's records once it is confirmed or reverted. Each change of the
   * agent's report requeues the server; this also polls while a move is in flight (the source agent's
   * migrationSource and fencing do not).
   */
  async function followMove(server: Server, ctx: ReconcileContext): Promise<{ requeueAfter: number } | undefined> {
    const st = server.status ?? {};
    if (!st.resize && !st.migration) return undefined;
    const t = new Date(now()).toISOString();
    const mig = st.migration;
    if (mig && st.taskState === 'resize_migrated' && !mig.sourceFenced) {
      const hv = hypervisors.get(mig.source);
      const fenced = hv?.metadata?.annotations?.[FENCED_ANNOTATION];
      if (hv && fenced && !isUp(hv, now(), opts.heartbeatGraceMs)) {
        await writeStatus(server, (s) => {
          if (!s.migration || s.migration.source !== mig.source) return false;
          s.migration = { ...s.migration, sourceFenced: t };
        });
        events.warning(server, 'SourceFenced', 'Migrate', `hypervisor ${mig.source} is down and fenced (${fenced})`);
      }
    }
    const lastMove = [...(st.actions ?? [])].reverse().find((a) => a.action === 'resize' || a.action === 'migrate');
    const condType = lastMove?.action === 'migrate' ? 'Migrated' : 'Resized';
    const token = (name: 'confirmResize' | 'revertResize') => {
      const v = server.spec.triggers?.[name];
      return v !== undefined && v !== st.triggers?.[name] ? v : undefined;
    };
    if (!st.taskState && (st.vmState === 'resized' || st.vmState === 'error') && st.resize) {
      const revert = token('revertResize');
      if (revert !== undefined) return revertMove(server, revert, condType, ctx);
      const confirm = token('confirmResize');
      const window = opts.resizeConfirmWindowMs ?? 0;
      const since = lastMove?.finishTime ? Date.parse(lastMove.finishTime) : Number.NaN;
      const due = window > 0 && Number.isFinite(since) && now() - since >= window;
      if (st.vmState === 'resized' && (confirm !== undefined || due)) {
        await writeStatus(server, (s) => {
          if (s.taskState || s.vmState !== 'resized') return false;
          s.taskState = 'resize_confirming';
          if (confirm !== undefined) s.triggers = { ...s.triggers, confirmResize: confirm };
          recordAction(s, 'confirmResize', 'InProgress', confirm === undefined ? 'automatic' : undefined, t);
        });
        events.normal(server, 'ConfirmingResize', 'ConfirmResize', `confirming on ${st.node}`);
        return { requeueAfter: 2000 };
      }
      if (window > 0 && st.vmState === 'resized' && Number.isFinite(since)) {
        return { requeueAfter: Math.max(1000, since + window - now()) };
      }
      return st.vmState === 'error' ? { requeueAfter: 30_000 } : { requeueAfter: 5000 };
    }
    if (!st.taskState && st.vmState !== 'resized' && st.vmState !== 'error' && st.vmState !== 'building') {
      // Confirmed or reverted and finished: the move's records go (the source agent then drops its copy).
      await writeStatus(server, (s) => {
        if (s.taskState || s.vmState === 'resized' || s.vmState === 'error') return false;
        delete s.resize;
        delete s.migration;
      });
      ctx.log.info('move finished; its records dropped');
      return undefined;
    }
    return { requeueAfter: 2000 };
  }

  /** revertResize: the server goes back to its old node, flavor and claim; the agent there restores the guest. */
  async function revertMove(server: Server, token: string, condType: string, ctx: ReconcileContext) {
    const st = server.status ?? {};
    const r = st.resize!;
    const gen = server.metadata.generation;
    const t = new Date(now()).toISOString();
    const key = objectKey(server);
    const from = st.node ?? '';
    const group = ledger.get(key)?.group;
    if (r.oldAllocation)
      ledger.assume({ server: key, node: r.oldNode, ...r.oldAllocation, ...(group ? { group } : {}) });
    const updated = await writeStatus(server, (s) => {
      if (s.taskState || !s.resize) return false;
      s.node = r.oldNode;
      if (r.oldFlavor) s.flavor = r.oldFlavor;
      if (r.oldAllocation) s.allocation = r.oldAllocation;
      s.taskState = 'resize_reverting';
      s.triggers = { ...s.triggers, revertResize: token };
      delete s.migration;
      conditionsWith(s, gen, {
        type: condType,
        status: 'False',
        reason: 'Reverted',
        message: `reverted: back on ${r.oldNode}${r.oldFlavor ? ` with flavor ${r.oldFlavor.name}` : ''}`,
      });
      recordAction(s, 'revertResize', 'InProgress', `${from} -> ${r.oldNode}`, t);
    });
    if (updated.status?.taskState !== 'resize_reverting') {
      ledger.assume(claimOf(updated) ?? claimOf(server)!);
      return { requeueAfter: 2000 };
    }
    await bindMetadata(updated, r.oldNode);
    ledger.confirm(key);
    events.normal(server, 'RevertingResize', 'RevertResize', `${from} -> ${r.oldNode}`);
    ctx.log.info({ from, to: r.oldNode }, 'reverting a resize or migration');
    return { requeueAfter: 2000 };
  }

  /**
   * A flavor change is a resize, a new spec.triggers.migrate token a cold migration. The scheduler checks the
   * new placement (a resize stays on its hypervisor when it fits there; a migration must move); the operator
   * moves the claim, status.node and the node label and sets taskState resize_migrated; the agent on the
   * target finishes it (respawns the guest with the new size and its previous power state) and the agent on
   * the old hypervisor destroys the guest it no longer owns. Resizes are confirmed automatically.
   */
  async function resizeOrMigrate(server: Server, ctx: ReconcileContext) {
    const st = server.status ?? {};
    const gen = server.metadata.generation;
    const resize = st.flavor !== undefined && server.spec.flavor !== st.flavor.name;
    const token = server.spec.triggers?.migrate;
    const migrate = token !== undefined && token !== st.triggers?.migrate;
    if (!resize && !migrate) return undefined;
    const action = resize ? 'resize' : 'migrate';
    const condType = resize ? 'Resized' : 'Migrated';
    const settled = st.conditions?.find((c) => c.type === condType && c.observedGeneration === gen);
    if (resize && settled?.status === 'False') return undefined; // refused for this generation already
    if (st.taskState) return { requeueAfter: 2000 }; // busy: retried once the task is over
    const node = st.node ?? '';
    const t = new Date(now()).toISOString();

    const refuseWith = async (reason: string, message: string) => {
      await writeStatus(server, (s) => {
        if (migrate && !resize) s.triggers = { ...s.triggers, migrate: token };
        conditionsWith(s, gen, { type: condType, status: 'False', reason, message });
        recordAction(s, action, 'Error', message, t);
      });
      events.warning(server, reason, resize ? 'Resize' : 'Migrate', message);
      return undefined;
    };

    const refusal = refuseAction(action, st.vmState ?? 'building', st.taskState);
    if (refusal) return refuseWith('ActionRefused', refusal);
    let flavorSpec = FlavorKind.spec.safeParse(flavors.get(server.spec.flavor)?.spec);
    if (!resize) flavorSpec = FlavorKind.spec.safeParse(flavors.get(st.flavor?.name ?? '')?.spec);
    if (!flavorSpec.success)
      return refuseWith('FlavorNotFound', `flavor ${server.spec.flavor} does not exist or is invalid`);
    if (resize && st.flavor) {
      // A resize keeps the disks: Nova refuses a smaller root or ephemeral disk.
      const disks = (f: { disk: string; ephemeral?: string | undefined }) => ({
        rootGiB: toGiB(f.disk),
        ephemeralGiB: toGiB(f.ephemeral ?? '0'),
      });
      const down = refuseResizeDisks(disks(st.flavor), disks(flavorSpec.data));
      if (down) return refuseWith('CannotResizeDisk', down);
    }
    const image = server.spec.image ? images.get(server.spec.image, server.metadata.namespace) : undefined;
    const resources = flavorClaim(flavorSpec.data, image, { bootFromVolume: !!server.spec.bootVolume });
    const key = objectKey(server);
    const group = ledger.get(key)?.group;
    const hosts = hostStatesFrom(hypervisors.list(), ledger.claims(), now(), {
      exclude: key,
      heartbeatGraceSeconds: opts.heartbeatGraceMs / 1000,
    });
    // The group's policy still applies: an anti-affinity member must not move next to another member, an
    // affinity member must not leave the others.
    const groupObj = server.spec.serverGroup
      ? groups.get(server.spec.serverGroup, server.metadata.namespace)
      : undefined;
    const requestGroup = moveGroup(server, groupObj, ledger.claims());
    const req = {
      server: key,
      resources,
      ...(image?.spec?.properties ? { imageProperties: image.spec.properties } : {}),
      ...(server.spec.availabilityZone ? { availabilityZone: server.spec.availabilityZone } : {}),
      ...(server.spec.nodeSelector ? { nodeSelector: server.spec.nodeSelector } : {}),
      ...(requestGroup ? { group: requestGroup } : {}),
    };
    let result = resize
      ? schedule(
          req,
          hosts.filter((h) => h.name === node),
          opts.scheduler,
        )
      : undefined;
    if (!result?.ok) result = schedule({ ...req, ignoreHosts: [node] }, hosts, opts.scheduler);
    if (!result.ok) return refuseWith('NoValidHost', result.message);
    const target = result.host;
    ledger.assume({ server: key, node: target, ...resources, ...(group ? { group } : {}) });
    try {
      const updated = await writeStatus(server, (s) => {
        if (s.taskState || s.node !== node) return false; // the agent started something meanwhile
        // What a revert needs; a move to another node also names its source (whose agent serves the disks).
        s.resize = {
          ...(s.flavor ? { oldFlavor: s.flavor } : {}),
          oldNode: node,
          ...(s.vmState === 'active' || s.vmState === 'stopped' ? { oldVmState: s.vmState } : {}),
          ...(s.allocation ? { oldAllocation: s.allocation } : {}),
        } as Status['resize'];
        if (target !== node) s.migration = { source: node, target };
        else delete s.migration;
        s.node = target;
        s.allocation = { vcpus: resources.vcpus, ramMiB: resources.ramMiB, diskGiB: resources.diskGiB };
        if (resize) {
          const f = flavorSpec.data;
          s.flavor = {
            name: server.spec.flavor,
            vcpus: f.vcpus,
            ram: f.ram,
            disk: f.disk,
            ephemeral: f.ephemeral,
            swap: f.swap,
          };
        }
        if (migrate) s.triggers = { ...s.triggers, migrate: token };
        s.taskState = 'resize_migrated';
        conditionsWith(s, gen, {
          type: condType,
          status: 'True',
          reason: target === node ? 'SameHost' : 'Moved',
          message: target === node ? `resized in place on ${node}` : `moved from ${node} to ${target}`,
        });
        recordAction(s, action, 'InProgress', `${node} -> ${target}`, t);
      });
      if (updated.status?.taskState !== 'resize_migrated' || updated.status.node !== target) {
        ledger.assume(claimOf(updated) ?? { server: key, node, ...resources });
        return { requeueAfter: 2000 };
      }
      await bindMetadata(updated, target);
      ledger.confirm(key);
    } catch (e) {
      ledger.forget(key);
      ledger.assume(claimOf(server) ?? { server: key, node, ...resources });
      throw e;
    }
    events.normal(server, resize ? 'Resizing' : 'Migrating', resize ? 'Resize' : 'Migrate', `${node} -> ${target}`);
    ctx.log.info({ from: node, to: target, action }, 'placement changed');
    return undefined;
  }

  const controller = mgr.addController({ name: 'server', reconcile, maxConcurrentReconciles: opts.concurrency ?? 4 });
  // Spec and metadata changes, and each change of the node agent's report (the state fields follow it promptly).
  controller.for(servers, {
    updatePredicate: (a, b) => specOrMetaChanged(a, b) || !sameJSON(a.status?.compute, b.status?.compute),
  });
  const waiting =
    (index: string, keyOf: (o: { metadata?: { name?: string; namespace?: string } }) => string) =>
    (o: { metadata?: { name?: string; namespace?: string } }) =>
      servers.byIndex(index, keyOf(o)).map((s) => objectKey(s));
  controller.watches(
    flavors,
    waiting('waitsFor:flavor', (o) => o.metadata?.name ?? ''),
  );
  controller.watches(
    images,
    waiting('waitsFor:image', (o) => `${o.metadata?.namespace}/${o.metadata?.name}`),
  );
  controller.watches(
    keypairs,
    waiting('waitsFor:keypair', (o) => `${o.metadata?.namespace}/${o.metadata?.name}`),
  );
  controller.watches(
    groups,
    waiting('waitsFor:group', (o) => `${o.metadata?.namespace}/${o.metadata?.name}`),
  );
  // A hypervisor going up or down (status.state, written by the hypervisor controller) revisits its servers.
  const lastState = new Map<string, string | undefined>();
  controller.watches(hypervisors, (hv) => {
    const name = hv.metadata?.name ?? '';
    const state = hv.status?.state;
    if (lastState.has(name) && lastState.get(name) === state) return [];
    lastState.set(name, state);
    return servers.byIndex('node', name).map((s) => objectKey(s));
  });
  // A port's changes (created, addresses allocated, claimed, released, deleted) revisit the servers it belongs to:
  // the one named by its device label, the one controlling it, and those whose spec names it.
  controller.watches(ports, (p) => {
    const ns = p.metadata?.namespace ?? '';
    const keys = new Set<string>();
    const label = p.metadata?.labels?.[PORT_DEVICE_LABEL];
    if (label) keys.add(`${ns}/${label}`);
    const owner = controllerOf(p);
    if (owner?.kind === ServerKind.kind) keys.add(`${ns}/${owner.name}`);
    for (const s of servers.byIndex('ports', `${ns}/${p.metadata?.name}`)) keys.add(objectKey(s));
    return [...keys];
  });
  // A volume's attachments or status changing revisits the servers that list it or hold one of its attachments.
  controller.watches(volumes, (v) => {
    const ns = v.metadata?.namespace ?? '';
    const keys = new Set(servers.byIndex('volumeRefs', `${ns}/${v.metadata?.name}`).map((s) => objectKey(s)));
    for (const a of v.status?.attachments ?? []) keys.add(`${ns}/${a.server}`);
    return [...keys];
  });
  return { controller, ledger };
}
