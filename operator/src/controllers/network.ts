// The Network controller (neutron-server's network and subnet side): claims a VXLAN id (VNI) per network with a
// SegmentAllocation, the DHCP server address of each IPv4 DHCP subnet with an IPAllocation, reports the effective
// MTU, gateway, DHCP address and address usage of every subnet, refuses deletion while ports use the network
// (Neutron's NetworkInUse), releases its claims on deletion and sweeps orphaned claims.
//
// IPAM rules (docs: the Kube-OVN lessons of the networking reference): the API objects are the only record of what
// is taken; creating a claim is the atomic test-and-set (a loser gets AlreadyExists); claims are made before the
// status that reports them; caches only propose candidates, a live read confirms before anything is given up.
import type { KubernetesObject } from '@kubernetes/client-node';
import {
  type IPAllocation,
  IPAllocationKind,
  ipAllocationName,
  NETWORK_FINALIZER,
  NETWORK_LABEL,
  type Network,
  NetworkKind,
  type NetworkStatus,
  PORT_DEVICE_LABEL,
  type Port,
  PortKind,
  type SegmentAllocation,
  SegmentAllocationKind,
  segmentAllocationName,
} from '../api/index.ts';
import { ipToBigInt } from '../api/network.ts';
import {
  candidates,
  type EffectiveSubnet,
  effectiveSubnet,
  formatIP,
  nextVni,
  usage,
  vniStart,
  vxlanMtu,
} from '../ipam/ipam.ts';
import {
  addFinalizer,
  controllerOf,
  type EventRecorder,
  hasFinalizer,
  type Informer,
  isAlreadyExists,
  isNotFound,
  type KubeClient,
  type Manager,
  objectKey,
  type ReconcileContext,
  type Request,
  removeFinalizer,
} from '../runtime/index.ts';
import { applyStatusIfChanged, gvrOf, requeueOnConflict, specOrMetaChanged, withConditions } from './common.ts';

export const NETWORKS = gvrOf(NetworkKind);
export const PORTS = gvrOf(PortKind);
export const IP_ALLOCATIONS = gvrOf(IPAllocationKind);
export const SEGMENT_ALLOCATIONS = gvrOf(SegmentAllocationKind);

/** Network condition: segment, DHCP addresses and status are in place. */
export const NETWORK_READY = 'Ready';
/** Key of the periodic orphan sweep in the network controller's queue (no network can have this name). */
const SWEEP_KEY = '~orphan-sweep';

// ---------------------------------------------------------------------------------------------------------------
// Shared caches and claim helpers (the Port controller uses them too)
// ---------------------------------------------------------------------------------------------------------------

/** `namespace/network` of a claim or port. */
export function networkKeyOf(obj: { metadata?: { namespace?: string }; spec?: { network?: string } }): string {
  return `${obj.metadata?.namespace ?? ''}/${obj.spec?.network ?? ''}`;
}

/**
 * Claim names created by this process that the informer has not shown yet, so concurrent workers do not propose the
 * same candidate twice. A hint only: losing it costs an AlreadyExists, never a duplicate.
 */
export class InflightClaims {
  readonly #names = new Map<string, number>();
  readonly #ttlMs: number;

  constructor(ttlMs = 60_000) {
    this.#ttlMs = ttlMs;
  }

  add(namespace: string, name: string): void {
    this.#names.set(`${namespace}/${name}`, Date.now());
  }

  delete(namespace: string, name: string): void {
    this.#names.delete(`${namespace}/${name}`);
  }

  has(namespace: string, name: string): boolean {
    const key = `${namespace}/${name}`;
    const t = this.#names.get(key);
    if (t === undefined) return false;
    if (Date.now() - t > this.#ttlMs) {
      this.#names.delete(key);
      return false;
    }
    return true;
  }
}

export interface IpamCaches {
  networks: Informer<Network>;
  ports: Informer<Port>;
  claims: Informer<IPAllocation>;
  segments: Informer<SegmentAllocation>;
  inflight: InflightClaims;
}

const shared = new WeakMap<Manager, IpamCaches>();

/**
 * The informers (with their indexes) the network and port controllers share, created once per manager.
 * Indexes: claims by `owner` (controller uid) and `network` (namespace/network); segments by `networkUID`;
 * ports by `network`.
 */
export function ipamCaches(mgr: Manager): IpamCaches {
  let c = shared.get(mgr);
  if (c) return c;
  c = {
    networks: mgr.informer<Network>(NETWORKS),
    ports: mgr.informer<Port>(PORTS),
    claims: mgr.informer<IPAllocation>(IP_ALLOCATIONS),
    segments: mgr.informer<SegmentAllocation>(SEGMENT_ALLOCATIONS),
    inflight: new InflightClaims(),
  };
  c.claims.addIndex('owner', (a) => {
    const ref = controllerOf(a);
    return ref ? [ref.uid] : [];
  });
  c.claims.addIndex('network', (a) => [networkKeyOf(a)]);
  c.segments.addIndex('networkUID', (s) => (s.spec?.network?.uid ? [s.spec.network.uid] : []));
  c.ports.addIndex('network', (p) => [networkKeyOf(p)]);
  const inflight = c.inflight;
  c.claims.addEventHandler({
    onAdd: (a) => inflight.delete(a.metadata.namespace ?? '', a.metadata.name ?? ''),
  });
  shared.set(mgr, c);
  return c;
}

/**
 * Labels a claim carries besides NETWORK_LABEL and PORT_LABEL: those of its holder, so `kubectl get ipalloc -l` finds
 * the claims of labelled ports and operators whose informers select a label see the claims of what they manage.
 */
export function claimLabels(holder: { metadata?: { labels?: Record<string, string> } }): Record<string, string> {
  const out = { ...(holder.metadata?.labels ?? {}) };
  delete out[PORT_DEVICE_LABEL]; // changes over the port's life; the claim is about the address
  return out;
}

/** Addresses (as integers) claimed in one subnet of a network, per the given claims. */
export function claimedIn(claims: readonly IPAllocation[], subnet: string): Set<bigint> {
  const out = new Set<bigint>();
  for (const a of claims) if (a.spec?.subnet === subnet && a.spec.ipAddress) out.add(ipToBigInt(a.spec.ipAddress));
  return out;
}

/** Every claim of a network, read live from the API (the truth when the cache may lag). */
export async function listNetworkClaims(client: KubeClient, namespace: string, network: string) {
  const list = await client.listAll<IPAllocation>(IP_ALLOCATIONS, {
    namespace,
    labelSelector: `${NETWORK_LABEL}=${network}`,
  });
  return (list.items ?? []).filter((a) => a.spec?.network === network);
}

/** Deletes a claim if it is still the object with this uid. */
export async function deleteClaim(client: KubeClient, a: KubernetesObject): Promise<void> {
  try {
    await client.delete(IP_ALLOCATIONS, a.metadata?.name ?? '', a.metadata?.namespace, {
      preconditions: { uid: a.metadata?.uid ?? '' },
    });
  } catch (e) {
    if (!isNotFound(e) && !isConflictOnPrecondition(e)) throw e;
  }
}

function isConflictOnPrecondition(e: unknown): boolean {
  return (e as { code?: number })?.code === 409;
}

/**
 * Claims the first free pool address of a subnet for `claim(ip)`: candidates come from `taken` (the cache) and the
 * in-flight set; AlreadyExists moves to the next candidate; when the cache says the pool is full, a live List of the
 * network's claims confirms before exhaustion is declared. Returns the claimed address, or undefined when the pools
 * are exhausted.
 */
export async function claimFreeAddress(o: {
  client: KubeClient;
  inflight: InflightClaims;
  namespace: string;
  network: string;
  subnet: EffectiveSubnet;
  cached: () => readonly IPAllocation[];
  create: (ip: string, name: string) => Promise<void>;
  maxAttempts?: number;
}): Promise<string | undefined> {
  const { namespace, network, subnet } = o;
  let taken = claimedIn(o.cached(), subnet.name);
  let confirmed = false;
  const nameOf = (n: bigint) => ipAllocationName(network, subnet.name, formatIP(n, subnet.family));
  const isTaken = (n: bigint) => taken.has(n) || o.inflight.has(namespace, nameOf(n));
  for (let attempt = 0; attempt < (o.maxAttempts ?? 1000); ) {
    let next: bigint | undefined;
    for (const n of candidates(subnet, isTaken)) {
      next = n;
      break;
    }
    if (next === undefined) {
      if (confirmed) return undefined;
      confirmed = true;
      taken = claimedIn(await listNetworkClaims(o.client, namespace, network), subnet.name);
      continue;
    }
    const ip = formatIP(next, subnet.family);
    const name = nameOf(next);
    o.inflight.add(namespace, name);
    try {
      await o.create(ip, name);
      return ip;
    } catch (e) {
      o.inflight.delete(namespace, name);
      if (!isAlreadyExists(e)) throw e;
      taken.add(next);
      attempt++;
    }
  }
  throw new Error(`no free address found in subnet ${subnet.name} after ${o.maxAttempts ?? 1000} attempts`);
}

// ---------------------------------------------------------------------------------------------------------------
// The controller
// ---------------------------------------------------------------------------------------------------------------

export interface NetworkControllerOptions {
  instance: string;
  concurrency?: number;
  /** MTU of the underlay (Neutron global_physnet_mtu); networks get this minus the VXLAN overhead. */
  underlayMtu?: number;
  /** Claims and segments younger than this are never swept (ms). */
  orphanGraceMs?: number;
  /** How often the orphan sweep runs (ms). */
  orphanSweepMs?: number;
  /** How often a network being deleted looks again for its ports (ms), besides port events. */
  inUsePollMs?: number;
}

type Ready = { status: 'True' | 'False' | 'Unknown'; reason: string; message: string };

export function registerNetworkController(mgr: Manager, opts: NetworkControllerOptions) {
  const caches = ipamCaches(mgr);
  const { networks, ports, claims, segments, inflight } = caches;
  const events = mgr.eventRecorder({
    reportingController: 'stratus.io/network-controller',
    reportingInstance: opts.instance,
  });
  const client = mgr.client;
  const underlayMtu = opts.underlayMtu ?? 1500;
  const graceMs = opts.orphanGraceMs ?? 120_000;
  const sweepMs = opts.orphanSweepMs ?? 60_000;
  const inUsePollMs = opts.inUsePollMs ?? 10_000;

  /**
   * The one status write of the controller, which owns every Network status field. Each path passes what it
   * observed; the rest (segment, MTU, subnets) keeps the values last written: an in-use or invalid network keeps its
   * segmentation id, or node agents would drop its data plane under running guests.
   */
  async function writeStatus(
    net: Network,
    status: NetworkStatus['status'],
    ready: Ready,
    observed: NetworkStatus = {},
  ) {
    const gen = net.metadata.generation;
    const conditions = withConditions(net.status?.conditions, [{ type: NETWORK_READY, ...ready }], gen);
    await applyStatusIfChanged(client, NetworkKind, net as KubernetesObject & Network, {
      ...observed,
      status,
      observedGeneration: gen,
      conditions,
    });
  }

  /** The VNI of the network: the one it holds, else the first free one probed from a hash of its uid. */
  async function ensureSegment(net: Network, ctx: ReconcileContext): Promise<number> {
    const uid = net.metadata.uid ?? '';
    const ns = net.metadata.namespace ?? '';
    const name = net.metadata.name ?? '';
    const mine = segments
      .byIndex('networkUID', uid)
      .map((s) => s.spec.vni)
      .sort((a, b) => a - b);
    const fromStatus = net.status?.segmentationID;
    let chosen = fromStatus !== undefined && mine.includes(fromStatus) ? fromStatus : mine[0];
    if (chosen === undefined) {
      let vni = fromStatus ?? vniStart(uid);
      for (let probes = 0; chosen === undefined; probes++) {
        if (probes > 10_000) throw new Error('no free VXLAN id found after 10000 probes');
        const cached = segments.get(segmentAllocationName(vni));
        if (cached && cached.spec.network.uid !== uid) {
          vni = nextVni(vni);
          continue;
        }
        try {
          await client.create(SEGMENT_ALLOCATIONS, {
            apiVersion: SegmentAllocationKind.apiVersion,
            kind: SegmentAllocationKind.kind,
            metadata: { name: segmentAllocationName(vni), labels: { ...claimLabels(net), [NETWORK_LABEL]: name } },
            spec: { vni, network: { namespace: ns, name, uid } },
          } as KubernetesObject);
          chosen = vni;
          events.normal(net, 'SegmentAllocated', 'Allocate', `VXLAN id ${vni}`);
          ctx.log.info({ vni }, 'segment allocated');
        } catch (e) {
          if (!isAlreadyExists(e)) throw e;
          const live = await client
            .get<SegmentAllocation>(SEGMENT_ALLOCATIONS, segmentAllocationName(vni))
            .catch((err: unknown) => {
              if (isNotFound(err)) return undefined;
              throw err;
            });
          if (live?.spec.network.uid === uid) chosen = vni;
          else if (live) vni = nextVni(vni);
          // deleted meanwhile: try the same VNI again
        }
      }
    }
    // Extra claims of this network (a lost race between two replicas): keep one.
    for (const vni of mine) {
      if (vni === chosen) continue;
      const s = segments.get(segmentAllocationName(vni));
      if (s) await deleteSegment(s);
    }
    return chosen;
  }

  async function deleteSegment(s: SegmentAllocation): Promise<void> {
    try {
      await client.delete(SEGMENT_ALLOCATIONS, s.metadata.name ?? '', undefined, {
        preconditions: { uid: s.metadata.uid ?? '' },
      });
    } catch (e) {
      if (!isNotFound(e) && !isConflictOnPrecondition(e)) throw e;
    }
  }

  /** The DHCP server address of an IPv4 DHCP subnet: the claim the network holds, else the first free address. */
  async function ensureDhcp(net: Network, sub: EffectiveSubnet, ctx: ReconcileContext): Promise<string | undefined> {
    const uid = net.metadata.uid ?? '';
    const ns = net.metadata.namespace ?? '';
    const name = net.metadata.name ?? '';
    const isMine = (a: IPAllocation) => a.spec.purpose === 'dhcp' && a.spec.subnet === sub.name;
    let held = claims.byIndex('owner', uid).filter(isMine);
    if (held.length !== 1) {
      // None or several (two writers raced): decide on the live claims, keeping the lowest address, a rule every
      // writer applies the same way whatever status it last saw.
      held = (await listNetworkClaims(client, ns, name)).filter((a) => controllerOf(a)?.uid === uid && isMine(a));
    }
    if (held.length > 0) {
      held.sort((a, b) =>
        ipToBigInt(a.spec.ipAddress ?? '0.0.0.0') < ipToBigInt(b.spec.ipAddress ?? '0.0.0.0') ? -1 : 1,
      );
      const keep = held[0]!;
      for (const a of held.slice(1)) await deleteClaim(client, a);
      return keep.spec.ipAddress;
    }
    const ip = await claimFreeAddress({
      client,
      inflight,
      namespace: ns,
      network: name,
      subnet: sub,
      cached: () => claims.byIndex('network', `${ns}/${name}`),
      create: async (address, claimName) => {
        await client.create(IP_ALLOCATIONS, {
          apiVersion: IPAllocationKind.apiVersion,
          kind: IPAllocationKind.kind,
          metadata: {
            name: claimName,
            namespace: ns,
            labels: { ...claimLabels(net), [NETWORK_LABEL]: name },
            ownerReferences: [
              {
                apiVersion: NetworkKind.apiVersion,
                kind: NetworkKind.kind,
                name,
                uid,
                controller: true,
                blockOwnerDeletion: false,
              },
            ],
          },
          spec: { network: name, subnet: sub.name, ipAddress: address, purpose: 'dhcp' },
        } as KubernetesObject);
      },
    });
    if (ip === undefined) {
      events.warning(net, 'DhcpAddressUnavailable', 'Allocate', `subnet ${sub.name}: no free address for DHCP`);
      return undefined;
    }
    events.normal(net, 'DhcpAddressAllocated', 'Allocate', `subnet ${sub.name}: DHCP server address ${ip}`);
    ctx.log.info({ subnet: sub.name, ip }, 'DHCP address allocated');
    return ip;
  }

  /** Ports of the network, from the cache, or, when the cache shows none, from a live List. */
  async function portsOf(net: Network): Promise<string[]> {
    const ns = net.metadata.namespace ?? '';
    const name = net.metadata.name ?? '';
    const cached = ports.byIndex('network', `${ns}/${name}`).map((p) => p.metadata.name ?? '');
    if (cached.length > 0) return cached;
    const live = await client.listAll<Port>(PORTS, { namespace: ns });
    return (live.items ?? []).filter((p) => p.spec?.network === name).map((p) => p.metadata.name ?? '');
  }

  async function finalize(net: Network, ctx: ReconcileContext) {
    if (!hasFinalizer(net, NETWORK_FINALIZER)) return undefined;
    const ns = net.metadata.namespace ?? '';
    const name = net.metadata.name ?? '';
    const uid = net.metadata.uid ?? '';
    const inUse = await portsOf(net);
    if (inUse.length > 0) {
      const shown = inUse.slice(0, 5).join(', ') + (inUse.length > 5 ? `, ... (${inUse.length} ports)` : '');
      await writeStatus(net, net.status?.status ?? 'ACTIVE', {
        status: 'False',
        reason: 'NetworkInUse',
        message: `Unable to complete operation on network ${name}. There are one or more ports still in use on the network: ${shown}.`,
      });
      return { requeueAfter: inUsePollMs };
    }
    // Every claim of the network goes: DHCP addresses, leftovers of ports (none may remain), manual reservations.
    for (const a of await listNetworkClaims(client, ns, name)) await deleteClaim(client, a);
    const vnis = new Set(segments.byIndex('networkUID', uid).map((s) => s.spec.vni));
    if (net.status?.segmentationID) vnis.add(net.status.segmentationID);
    for (const vni of vnis) {
      const s = await client
        .get<SegmentAllocation>(SEGMENT_ALLOCATIONS, segmentAllocationName(vni))
        .catch((e: unknown) => {
          if (isNotFound(e)) return undefined;
          throw e;
        });
      if (s?.spec.network.uid === uid) await deleteSegment(s);
    }
    await removeFinalizer(client, NETWORKS, name, ns, NETWORK_FINALIZER, { current: net }).catch((e: unknown) => {
      if (!isNotFound(e)) throw e; // gone already (another writer removed the finalizer)
    });
    ctx.log.info({ vnis: [...vnis] }, 'network released its segment and addresses');
    return undefined;
  }

  async function reconcileNetwork(req: Request, ctx: ReconcileContext) {
    let net = networks.get(req.name, req.namespace);
    if (!net) return undefined;
    if (net.metadata.deletionTimestamp) return finalize(net, ctx);
    if (!hasFinalizer(net, NETWORK_FINALIZER)) {
      // The status write below is guarded by the resourceVersion of the object it was computed from: this one.
      net = await addFinalizer<Network>(client, NETWORKS, req.name, req.namespace, NETWORK_FINALIZER, { current: net });
    }
    const parsed = NetworkKind.spec.safeParse(net.spec);
    if (!parsed.success) {
      await writeStatus(net, 'ERROR', {
        status: 'False',
        reason: 'InvalidSpec',
        message: parsed.error.message.slice(0, 2000),
      });
      return undefined;
    }
    const spec = parsed.data;
    const maxMtu = vxlanMtu(underlayMtu);
    if (spec.mtu !== undefined && spec.mtu > maxMtu) {
      await writeStatus(net, 'ERROR', {
        status: 'False',
        reason: 'InvalidMtu',
        message: `Requested MTU ${spec.mtu} is too big, maximum is ${maxMtu} (underlay ${underlayMtu} minus the VXLAN overhead)`,
      });
      return undefined;
    }
    const vni = await ensureSegment(net, ctx);
    const ns = net.metadata.namespace ?? '';
    const name = net.metadata.name ?? '';
    const subnets: NonNullable<NetworkStatus['subnets']> = [];
    const dhcpSubnets = new Set<string>();
    for (const s of spec.subnets) {
      const sub = effectiveSubnet(s);
      const dhcp = sub.family === 4 && sub.enableDHCP ? await ensureDhcp(net, sub, ctx) : undefined;
      if (sub.family === 4 && sub.enableDHCP) dhcpSubnets.add(sub.name);
      const claimed = claimedIn(claims.byIndex('network', `${ns}/${name}`), sub.name);
      if (dhcp) claimed.add(ipToBigInt(dhcp));
      subnets.push({
        name: sub.name,
        cidr: sub.cidr,
        ipVersion: sub.family,
        ...(sub.gateway !== undefined ? { gatewayIP: formatIP(sub.gateway, sub.family) } : {}),
        ...(dhcp ? { dhcpAddress: dhcp } : {}),
        ...usage(sub, claimed),
      });
    }
    // DHCP claims of subnets that were removed or had DHCP turned off.
    for (const a of claims.byIndex('owner', net.metadata.uid ?? '')) {
      // (Extra claims of a DHCP subnet are ensureDhcp's to resolve, on a live List.)
      if (a.spec.purpose === 'dhcp' && !dhcpSubnets.has(a.spec.subnet ?? '')) await deleteClaim(client, a);
    }
    await writeStatus(
      net,
      'ACTIVE',
      { status: 'True', reason: 'Allocated', message: `VXLAN id ${vni}` },
      { networkType: 'vxlan', segmentationID: vni, mtu: spec.mtu ?? maxMtu, subnets },
    );
    return undefined;
  }

  /**
   * Deletes claims whose holder is gone: SegmentAllocations whose network (namespace/name/uid) no longer exists and
   * IPAllocations whose controller owner (Port or Network, by uid) no longer exists. Only claims older than the grace
   * period, and only after a live read of the holder.
   */
  async function sweep(ctx: ReconcileContext) {
    const now = Date.now();
    const old = (o: KubernetesObject) => now - new Date(o.metadata?.creationTimestamp ?? now).getTime() > graceMs;
    let swept = 0;
    for (const s of segments.list()) {
      if (!old(s)) continue;
      const ref = s.spec?.network;
      if (!ref) continue;
      if (await holderExists(NETWORKS, networks, ref.name, ref.namespace, ref.uid)) continue;
      await deleteSegment(s);
      swept++;
      ctx.log.info({ segment: s.metadata.name, network: `${ref.namespace}/${ref.name}` }, 'orphaned segment released');
    }
    for (const a of claims.list()) {
      if (!old(a)) continue;
      const ref = controllerOf(a);
      if (!ref) continue; // no holder: a manual reservation
      const ns = a.metadata.namespace ?? '';
      const found =
        ref.kind === 'Port'
          ? await holderExists(PORTS, ports, ref.name, ns, ref.uid)
          : ref.kind === 'Network'
            ? await holderExists(NETWORKS, networks, ref.name, ns, ref.uid)
            : true;
      if (found) continue;
      await deleteClaim(client, a);
      swept++;
      ctx.log.info({ claim: objectKey(a), holder: `${ref.kind}/${ref.name}` }, 'orphaned address claim released');
    }
    if (swept > 0) ctx.log.info({ swept }, 'orphan sweep');
    return { requeueAfter: sweepMs };
  }

  async function holderExists(
    gvr: typeof NETWORKS,
    cache: Informer<Network> | Informer<Port>,
    name: string,
    namespace: string,
    uid: string,
  ): Promise<boolean> {
    if (cache.get(name, namespace)?.metadata.uid === uid) return true;
    try {
      const live = await client.get<KubernetesObject>(gvr, name, namespace);
      return live.metadata?.uid === uid;
    } catch (e) {
      if (isNotFound(e)) return false;
      throw e;
    }
  }

  const reconcile = requeueOnConflict(async (req: Request, ctx: ReconcileContext) => {
    if (req.name === SWEEP_KEY && !req.namespace) return sweep(ctx);
    return reconcileNetwork(req, ctx);
  });

  const controller = mgr.addController({ name: 'network', reconcile, maxConcurrentReconciles: opts.concurrency ?? 4 });
  controller.for(networks, { updatePredicate: specOrMetaChanged });
  // Address usage changes with every claim of the network.
  controller.watches(claims, (a) => (a.spec?.network ? [networkKeyOf(a)] : []));
  // A network being deleted waits for its ports.
  controller.watches(ports, (p) => {
    const net = networks.get(p.spec?.network ?? '', p.metadata.namespace);
    return net?.metadata.deletionTimestamp ? [networkKeyOf(p)] : [];
  });
  // A segment deleted behind the network's back (by hand) is claimed again.
  controller.watches(segments, (s) => {
    const ref = s.spec?.network;
    return ref ? [{ namespace: ref.namespace, name: ref.name }] : [];
  });
  controller.enqueue({ name: SWEEP_KEY });
  return { controller, events: events as EventRecorder, caches };
}
