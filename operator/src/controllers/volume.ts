// The Volume controller (cinder-api + cinder-scheduler): resolves a volume's type, places it on a volume host, keeps
// its attachments through the Cinder v3 flow from the Servers that list it, derives its Cinder status from the
// volume host's report (status.host) and releases it through its finalizer once the host deleted it. The volume host
// (node agent of status.node) and the servers' agents act; this controller only decides and records
// (docs/design/storage.md, docs/design/status-ownership.md). The pure rules are in operator/src/api/volume-state.ts
// and operator/src/scheduler/volume-placement.ts.
import {
  type AttachingServer,
  attachRefusal,
  BUILTIN_VOLUME_TYPE,
  deriveVolumeState,
  GUEST_FINALIZER,
  type Hypervisor,
  HypervisorKind,
  nextAttachments,
  remoteAttachments,
  type Server,
  ServerKind,
  sameJSON,
  serverVolumeEntry,
  serverVolumeNames,
  VOLUME_FINALIZER,
  type Volume,
  VolumeKind,
  type VolumeSnapshot,
  VolumeSnapshotKind,
  type VolumeType,
  VolumeTypeKind,
} from '../api/index.ts';
import {
  addFinalizer,
  crashPoint,
  hasFinalizer,
  isNotFound,
  type Manager,
  objectKey,
  type ReconcileContext,
  type Request,
  removeFinalizer,
} from '../runtime/index.ts';
import { backendReach, placeVolume, volumeHostOf } from '../scheduler/index.ts';
import {
  applyStatusIfChanged,
  canonical,
  gvrOf,
  requeueOnConflict,
  specOrMetaChanged,
  withConditions,
} from './common.ts';
import { ensureNbdSecret } from './volumetype.ts';

export const VOLUMES = gvrOf(VolumeKind);

/** The status fields of a Volume the operator owns (the volume host owns `host`). */
export const VOLUME_OPERATOR_FIELDS = [
  'status',
  'attachments',
  'bootable',
  'multiattach',
  'volumeType',
  'backend',
  'node',
  'size',
  'observedGeneration',
  'conditions',
] as const;

const OWN = VOLUME_OPERATOR_FIELDS as unknown as string[];

/** The default VolumeType: the oldest with isDefault (VolumeType Ready reports MultipleDefaults on the others). */
export function defaultVolumeType(types: readonly VolumeType[]): VolumeType | undefined {
  return types
    .filter((t) => t.spec?.isDefault && !t.metadata?.deletionTimestamp)
    .sort(
      (a, b) =>
        String(a.metadata?.creationTimestamp ?? '').localeCompare(String(b.metadata?.creationTimestamp ?? '')) ||
        (a.metadata?.name ?? '').localeCompare(b.metadata?.name ?? ''),
    )[0];
}

export interface VolumeControllerOptions {
  instance: string;
  concurrency?: number;
  /** Namespace of the NBD Secret (the agents' Lease namespace). */
  secretNamespace: string;
  now?: () => number;
}

export function registerVolumeController(mgr: Manager, opts: VolumeControllerOptions) {
  const volumes = mgr.informer<Volume>(VOLUMES);
  const types = mgr.informer<VolumeType>(gvrOf(VolumeTypeKind));
  const snapshots = mgr.informer<VolumeSnapshot>(gvrOf(VolumeSnapshotKind));
  const servers = mgr.informer<Server>(gvrOf(ServerKind));
  const hypervisors = mgr.informer<Hypervisor>(gvrOf(HypervisorKind));
  const events = mgr.eventRecorder({
    reportingController: 'stratus.io/volume-controller',
    reportingInstance: opts.instance,
  });
  const client = mgr.client;
  const now = opts.now ?? Date.now;
  let nbdSecret = false;
  /** The operator's status fields by SSA (the volume host's `host` is never carried: it stays the agent's). */
  const applyVolume = (vol: Volume, status: Record<string, unknown>) =>
    applyStatusIfChanged(client, VolumeKind, vol, status, OWN);

  // Servers by the volumes they list, volumes by the servers holding their attachments, snapshots by their volume.
  servers.addIndex('volumes', (s: Server) =>
    serverVolumeNames(s.spec ?? {}).map((v) => `${s.metadata.namespace}/${v}`),
  );
  volumes.addIndex('servers', (v: Volume) =>
    (v.status?.attachments ?? []).map((a) => `${v.metadata.namespace}/${a.server}`),
  );
  volumes.addIndex('pendingType', (v: Volume) => (v.status?.node ? [] : [v.spec?.volumeType ?? '']));
  snapshots.addIndex('volume', (s: VolumeSnapshot) => [`${s.metadata.namespace}/${s.spec?.volume}`]);

  /** The servers of the volume's namespace that list it or hold one of its attachments, as the flow sees them. */
  function attachingServers(vol: Volume, backend: string): AttachingServer[] {
    const ns = vol.metadata.namespace ?? '';
    const name = vol.metadata.name ?? '';
    const found = new Map<string, Server>();
    for (const s of servers.byIndex('volumes', `${ns}/${name}`)) found.set(s.metadata.name ?? '', s);
    for (const a of vol.status?.attachments ?? []) {
      const s = servers.get(a.server, ns);
      if (s) found.set(a.server, s);
    }
    return [...found.values()].map((s) => {
      const entry = serverVolumeEntry(s.spec ?? {}, name);
      const node = s.status?.node;
      const report =
        node && s.status?.compute?.node === node
          ? s.status.compute.volumes?.find((x) => x.volumeUID === vol.metadata.uid || x.volume === name)
          : undefined;
      return {
        name: s.metadata.name ?? '',
        uid: s.metadata.uid ?? '',
        node,
        creationTimestamp: String(s.metadata.creationTimestamp ?? ''),
        wants: entry !== undefined && !s.metadata.deletionTimestamp,
        guestGone: !!s.metadata.deletionTimestamp && !hasFinalizer(s, GUEST_FINALIZER),
        bus: entry?.bus,
        bootIndex: entry?.bootIndex,
        reported: report ? { state: report.state, device: report.device, bus: report.bus } : undefined,
        reach: node ? backendReach(hypervisors.get(node), backend) : undefined,
      };
    });
  }

  /** The node a new volume must live on, or why it must wait or fail. */
  function requiredNode(
    vol: Volume,
    backend: string,
  ): { node?: string } | { wait: string } | { fail: string; reason: string } {
    const ns = vol.metadata.namespace ?? '';
    const src = vol.spec.source;
    if (src?.snapshot) {
      const snap = snapshots.get(src.snapshot, ns);
      if (!snap) return { fail: `snapshot ${src.snapshot} does not exist in ${ns}`, reason: 'SnapshotNotFound' };
      if (snap.status?.status !== 'available') return { wait: `snapshot ${src.snapshot} is not available yet` };
      return backend === 'local' ? { node: snap.status.node } : {};
    }
    if (src?.volume) {
      const v = volumes.get(src.volume, ns);
      if (!v) return { fail: `volume ${src.volume} does not exist in ${ns}`, reason: 'VolumeNotFound' };
      if (!v.status?.node) return { wait: `volume ${src.volume} is not placed yet` };
      return backend === 'local' ? { node: v.status.node } : {};
    }
    if (backend === 'local') {
      const bound = servers
        .byIndex('volumes', `${ns}/${vol.metadata.name}`)
        .find((s) => s.status?.node && !s.metadata.deletionTimestamp);
      if (bound?.status?.node) return { node: bound.status.node };
    }
    return {};
  }

  async function reconcile(req: Request, ctx: ReconcileContext) {
    let vol = volumes.get(req.name, req.namespace);
    if (!vol) return undefined;
    if (!nbdSecret) {
      // Cross-node attachments need it; a missing namespace (the agents make it) is retried on a later reconcile.
      nbdSecret = await ensureNbdSecret(client, opts.secretNamespace).then(
        () => true,
        (err: unknown) => {
          ctx.log.warn({ err, namespace: opts.secretNamespace }, 'NBD Secret not ensured yet');
          return false;
        },
      );
    }
    const gen = vol.metadata.generation;
    const st = vol.status ?? {};
    const deleting = !!vol.metadata.deletionTimestamp;
    if (deleting && !hasFinalizer(vol, VOLUME_FINALIZER)) return undefined;
    if (!deleting && !hasFinalizer(vol, VOLUME_FINALIZER)) {
      vol = await addFinalizer<Volume>(client, VOLUMES, req.name, req.namespace, VOLUME_FINALIZER, { current: vol });
    }
    const conds: Parameters<typeof withConditions>[1][number][] = [];

    // 1. The type (fixed once placed).
    let typeName = st.volumeType;
    let backend = st.backend;
    let multiattach = st.multiattach;
    if (!st.node) {
      typeName = vol.spec.volumeType ?? defaultVolumeType(types.list())?.metadata?.name ?? BUILTIN_VOLUME_TYPE;
      const t = types.get(typeName);
      if (!t && typeName !== BUILTIN_VOLUME_TYPE) {
        if (deleting) return release(vol, ctx);
        const message = `Volume type ${typeName} could not be found.`;
        await applyVolume(vol, {
          status: 'error',
          observedGeneration: gen,
          conditions: withConditions(
            st.conditions,
            [{ type: 'Ready', status: 'False', reason: 'VolumeTypeNotFound', message }],
            gen,
          ),
        });
        if (st.status !== 'error') events.warning(vol, 'VolumeTypeNotFound', 'Create', message);
        return undefined;
      }
      backend = t?.spec?.backend ?? 'local';
      multiattach = t?.spec?.multiattach ?? false;
    }
    backend ??= 'local';
    const bootable = vol.spec.bootable ?? st.bootable ?? !!vol.spec.source?.image;

    // 2. Placement: the node is written before anything happens on it (a restart continues from it).
    let node = st.node;
    if (!node && !deleting) {
      const need = requiredNode(vol, backend);
      if ('wait' in need) {
        await applyVolume(vol, {
          status: 'creating',
          volumeType: typeName,
          backend,
          multiattach,
          bootable,
          observedGeneration: gen,
          conditions: withConditions(
            st.conditions,
            [{ type: 'Ready', status: 'False', reason: 'Waiting', message: need.wait }],
            gen,
          ),
        });
        return { requeueAfter: 5000 };
      }
      let placed =
        'fail' in need
          ? { ok: false as const, message: need.fail }
          : placeVolume(
              { backend, availabilityZone: vol.spec.availabilityZone, node: need.node },
              hypervisors.list().map(volumeHostOf),
            );
      // A bound server's node that cannot hold it: any node (the server attaches over NBD).
      if (!placed.ok && !('fail' in need) && need.node && !vol.spec.source) {
        placed = placeVolume(
          { backend, availabilityZone: vol.spec.availabilityZone },
          hypervisors.list().map(volumeHostOf),
        );
      }
      if (!placed.ok) {
        const reason = 'fail' in need ? need.reason : 'NoValidHost';
        await applyVolume(vol, {
          status: 'error',
          volumeType: typeName,
          backend,
          multiattach,
          bootable,
          observedGeneration: gen,
          conditions: withConditions(
            st.conditions,
            [{ type: 'Ready', status: 'False', reason, message: placed.message }],
            gen,
          ),
        });
        if (st.status !== 'error') events.warning(vol, reason, 'Schedule', placed.message);
        ctx.log.info({ message: placed.message }, 'volume not placed');
        // Hypervisors come and go: a volume without a host is looked at again (Cinder would not; it is cheap here).
        return { requeueAfter: 30_000 };
      }
      node = placed.node;
      await applyVolume(vol, {
        node,
        backend,
        volumeType: typeName,
        multiattach,
        bootable,
        status: 'creating',
        observedGeneration: gen,
        conditions: withConditions(
          st.conditions,
          [{ type: 'Ready', status: 'False', reason: 'Creating', message: `placed on ${node}` }],
          gen,
        ),
      });
      crashPoint('operator:after-placement');
      events.normal(vol, 'Scheduled', 'Schedule', `volume host ${node} (backend ${backend})`);
      ctx.log.info({ node, backend }, 'volume placed');
      return { requeue: true }; // the status write does not requeue; the next pass derives from the fresh object
    }

    // 3. Deletion: dependants first, then the attachments must be gone, then the host deletes it.
    const dependants = deleting ? snapshots.byIndex('volume', `${req.namespace}/${req.name}`) : [];
    const names = { name: req.name, status: st.status, multiattach, backend };
    const { attachments } = nextAttachments(
      names,
      st.attachments ?? [],
      attachingServers(vol, backend),
      new Date(now()).toISOString(),
      !deleting,
    );
    const state = deriveVolumeState({
      deleting: deleting && dependants.length === 0 && attachments.length === 0,
      node,
      status: st.status,
      host: st.host,
      specSize: vol.spec.size,
      size: st.size,
      fromImage: !!vol.spec.source?.image,
      attachments,
    });
    if (deleting && (dependants.length > 0 || attachments.length > 0)) {
      // Stays as it is until they are gone (Cinder refuses; a finalizer waits).
      state.status = (st.status ?? state.status) as typeof state.status;
    }

    if (deleting && dependants.length > 0) {
      conds.push({
        type: 'Ready',
        status: 'False',
        reason: 'DependentSnapshots',
        message: `Invalid volume: Volume ${req.name} still has ${dependants.length} dependent snapshots: ${dependants.map((s) => s.metadata.name).join(', ')}`,
      });
    } else if (state.status === 'available' || state.status === 'in-use') {
      conds.push({
        type: 'Ready',
        status: 'True',
        reason: state.status === 'in-use' ? 'InUse' : 'Available',
        message: `${state.status} on ${node}`,
      });
    } else if (state.status.startsWith('error')) {
      conds.push({ type: 'Ready', status: 'False', reason: 'BackendError', message: state.fault ?? state.status });
    } else {
      conds.push({
        type: 'Ready',
        status: 'False',
        reason: reasonOf(state.status),
        message: `${state.status} on ${node}`,
      });
    }
    const remote = remoteAttachments(backend, node, attachments);
    conds.push(
      remote.length > 0
        ? {
            type: 'Degraded',
            status: 'True',
            reason: 'RemoteAttachment',
            message: `attached over NBD from ${node}: that node is a single point of failure (${remote.map((a) => `server ${a.server} on ${a.node}`).join(', ')})`,
          }
        : {
            type: 'Degraded',
            status: 'False',
            reason: 'LocalAttachments',
            message: 'no attachment is served over NBD',
          },
    );
    const before = st.attachments ?? [];
    const wrote = await applyVolume(vol, {
      status: state.status,
      attachments: attachments.length > 0 ? attachments : undefined,
      size: state.size,
      bootable,
      observedGeneration: gen,
      conditions: withConditions(st.conditions, conds, gen),
    });
    for (const a of attachments) {
      const was = before.find((b) => b.server === a.server);
      if (a.state === 'attached' && was?.state !== 'attached') {
        events.normal(vol, 'Attached', 'Attach', `attached to server ${a.server} on ${a.node} as ${a.device ?? '?'}`);
      }
    }
    for (const b of before) {
      if (!attachments.some((a) => a.server === b.server))
        events.normal(vol, 'Detached', 'Detach', `detached from server ${b.server}`);
    }
    if (state.status.startsWith('error') && st.status !== state.status) {
      events.warning(vol, 'BackendError', 'Backend', state.fault ?? state.status);
    }

    if (deleting && dependants.length === 0 && attachments.length === 0) {
      const host = st.host?.node === node ? st.host : undefined;
      if (!node || !host || host.state === 'deleted') return release(vol, ctx);
      return undefined; // the host reports deleting, then deleted (its report requeues this volume)
    }
    // Our own status writes do not requeue (the predicate): an attachment that moved (reserved → attaching) may
    // take its next step from the same inputs. The steps reach a fixpoint, where nothing is written.
    return wrote && canonical(before) !== canonical(attachments) ? { requeue: true } : undefined;
  }

  async function release(vol: Volume, ctx: ReconcileContext) {
    try {
      await removeFinalizer(client, VOLUMES, vol.metadata.name ?? '', vol.metadata.namespace, VOLUME_FINALIZER, {
        current: vol,
      });
    } catch (e) {
      if (!isNotFound(e)) throw e;
    }
    ctx.log.info('volume released');
    return undefined;
  }

  const controller = mgr.addController({
    name: 'volume',
    reconcile: requeueOnConflict(reconcile),
    maxConcurrentReconciles: opts.concurrency ?? 4,
  });
  // Spec and metadata changes, and each change of the volume host's report.
  controller.for(volumes, {
    updatePredicate: (a, b) =>
      specOrMetaChanged(a, b) || !sameJSON(a.status?.host, b.status?.host) || a.status?.node !== b.status?.node,
  });
  // A server listing, unlisting, binding, being deleted or reporting its guest's volumes revisits those volumes.
  controller.watches(servers, (s) => {
    const ns = s.metadata?.namespace ?? '';
    const keys = new Set(serverVolumeNames(s.spec ?? {}).map((v) => `${ns}/${v}`));
    for (const v of volumes.byIndex('servers', `${ns}/${s.metadata?.name}`)) keys.add(objectKey(v));
    return [...keys];
  });
  // Snapshots: a deleting volume waits for them; a volume from a snapshot waits for it.
  controller.watches(snapshots, (s) => {
    const ns = s.metadata?.namespace ?? '';
    const keys = [`${ns}/${s.spec?.volume}`];
    for (const v of volumes.list(ns)) if (v.spec?.source?.snapshot === s.metadata?.name) keys.push(objectKey(v));
    return keys;
  });
  // A type appearing (or becoming the default) revisits the volumes not placed yet.
  controller.watches(types, (t) => [
    ...volumes.byIndex('pendingType', t.metadata?.name ?? '').map(objectKey),
    ...(t.spec?.isDefault ? volumes.byIndex('pendingType', '').map(objectKey) : []),
  ]);
  // A hypervisor's backends or liveness changing revisits the volumes attached or waiting there.
  const lastSeen = new Map<string, string>();
  controller.watches(hypervisors, (hv) => {
    const name = hv.metadata?.name ?? '';
    const sig = JSON.stringify([hv.status?.state, hv.status?.volumeBackends, hv.spec?.enabled]);
    if (lastSeen.get(name) === sig) return [];
    lastSeen.set(name, sig);
    return volumes
      .list()
      .filter((v) => !v.status?.node || v.status.node === name || v.status.attachments?.some((a) => a.node === name))
      .map(objectKey);
  });
  return { controller, volumes, attachRefusal };
}

function reasonOf(status: string): string {
  return status
    .split(/[-_]/)
    .map((w) => w.charAt(0).toUpperCase() + w.slice(1))
    .join('');
}
