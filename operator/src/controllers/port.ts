// The Port controller (neutron-server's port side, the IPAM client): claims the port's MAC and fixed IPs as
// IPAllocation objects, then reports them in status; resolves the effective security groups (creating the namespace's
// `default` group on first use, as Neutron does); releases the claims when the port is deleted.
//
// Crash safety: claims are made first and carry the port as controller owner plus the labels NETWORK_LABEL and
// PORT_LABEL, so a reconcile that died anywhere finds and adopts them (cache, or a live List before allocating);
// status is written after, with the RV-guarded updateStatus, so fields the node agent writes (bindingHost, vifType,
// the Bound condition) are never lost.
//
// Status ownership (docs/design/status-ownership.md): this controller is the only writer of status.status, as
// neutron-server is of a port's status; it derives ACTIVE/BUILD/DOWN of an allocated port from the binding the node
// agent reports (bindingHost and the Bound condition, which only the agent writes), and reconciles when they change.
import { randomBytes } from 'node:crypto';
import { isIP } from 'node:net';
import { type KubernetesObject, PatchStrategy } from '@kubernetes/client-node';
import {
  DEFAULT_SECURITY_GROUP,
  type IPAllocation,
  IPAllocationKind,
  ipAllocationName,
  ipToBigInt,
  macAllocationName,
  NETWORK_LABEL,
  type Network,
  NetworkKind,
  PORT_BOUND,
  PORT_DEVICE_LABEL,
  PORT_FINALIZER,
  PORT_LABEL,
  PORT_READY,
  type Port,
  PortKind,
  type PortStatus,
  type SecurityGroup,
  ServerKind,
} from '../api/index.ts';
import { type EffectiveSubnet, effectiveSubnet, formatIP, inSubnet, isReserved, macFromBytes } from '../ipam/ipam.ts';
import {
  controllerOf,
  isAlreadyExists,
  isConflict,
  isNotFound,
  type Manager,
  objectKey,
  type ReconcileContext,
  type ReconcileResult,
  type Request,
  removeFinalizer,
  updateStatus,
} from '../runtime/index.ts';
import { FIELD_MANAGER, gvrOf, specOrMetaChanged, withConditions } from './common.ts';
import {
  claimFreeAddress,
  claimLabels,
  deleteClaim,
  IP_ALLOCATIONS,
  ipamCaches,
  networkKeyOf,
  PORTS,
} from './network.ts';
import { ensureDefaultSecurityGroup, SECURITY_GROUPS } from './securitygroup.ts';

/** Port condition: every effective security group exists. */
export const PORT_SECURITY_GROUPS = 'SecurityGroupsResolved';
const SERVERS = gvrOf(ServerKind);

/** deviceOwner of ports used by servers (Neutron: compute:<availability zone>). */
export const COMPUTE_DEVICE_OWNER = 'compute:nova';

/** Ready reasons of ports waiting on their network (retried when the network changes). */
const WAITING_ON_NETWORK = new Set(['NetworkNotFound', 'NetworkDeleting', 'NetworkNotReady', 'SubnetNotFound']);
/** Ready reasons of ports waiting for an address to be freed (retried when a claim of the network goes). */
const WAITING_ON_ADDRESS = new Set(['IpAddressGenerationFailure', 'IpAddressAlreadyAllocated', 'MacAddressInUse']);

export interface PortControllerOptions {
  instance: string;
  concurrency?: number;
  /** Retry interval of a port that could not get its addresses (ms); a released claim retries it sooner. */
  allocationRetryMs?: number;
}

/** A port allocation that failed for a reason the user or time must fix. */
class AllocationFailure extends Error {
  readonly reason: string;
  readonly retry: boolean;
  constructor(reason: string, message: string, retry: boolean) {
    super(message);
    this.reason = reason;
    this.retry = retry;
  }
}

/** The allocation a status reports (MAC and fixed IPs), as a comparable string. */
function allocationOf(st: PortStatus | undefined): string {
  return JSON.stringify([st?.macAddress ?? null, st?.fixedIPs ?? []]);
}

/** The security groups a port is in: spec.securityGroups, else [default]; none without port security. */
export function effectiveSecurityGroups(port: Pick<Port, 'spec'>, network?: Pick<Network, 'spec'>): string[] {
  const enabled = port.spec.portSecurityEnabled ?? network?.spec?.portSecurityEnabled ?? true;
  if (!enabled) return [];
  return port.spec.securityGroups ?? [DEFAULT_SECURITY_GROUP];
}

/**
 * The status of an allocated port, from the binding its node agent reports: ACTIVE when bound and wired, BUILD when
 * bound but not wired (yet), DOWN when no node binds it. It also replaces the BUILD or ERROR this controller wrote
 * while the port waited or failed.
 */
export function allocatedPortStatus(st: Pick<PortStatus, 'bindingHost' | 'conditions'>): PortStatus['status'] {
  const bound = st.conditions?.find((c) => c.type === PORT_BOUND);
  if (!st.bindingHost || !bound || bound.reason === 'Unbound') return 'DOWN';
  return bound.status === 'True' ? 'ACTIVE' : 'BUILD';
}

/** The binding the node agent reports changed (bindingHost, vifType, Bound): the port status follows it. */
export function bindingChanged(oldObj: Port, newObj: Port): boolean {
  const view = (p: Port) => {
    const st = p.status ?? {};
    const b = st.conditions?.find((c) => c.type === PORT_BOUND);
    return JSON.stringify([st.bindingHost, st.vifType, b?.status, b?.reason]);
  };
  return view(oldObj) !== view(newObj);
}

export function registerPortController(mgr: Manager, opts: PortControllerOptions) {
  const { networks, ports, claims, inflight } = ipamCaches(mgr);
  const groups = mgr.informer<SecurityGroup>(SECURITY_GROUPS);
  const events = mgr.eventRecorder({
    reportingController: 'stratus.io/port-controller',
    reportingInstance: opts.instance,
  });
  const client = mgr.client;
  const retryMs = opts.allocationRetryMs ?? 30_000;

  const readyReason = (p: Port) => p.status?.conditions?.find((c) => c.type === PORT_READY);
  /** Every status write of the controller: RV-guarded merge patch of its own fields, as `stratus-operator`. */
  const writePortStatus = (port: Port, mutate: (st: Record<string, unknown>) => Record<string, unknown> | undefined) =>
    updateStatus<Port>(client, PORTS, port, mutate, { fieldManager: FIELD_MANAGER });
  ports.addIndex('waitingOnNetwork', (p) => {
    const c = readyReason(p);
    return !c || (c.status !== 'True' && WAITING_ON_NETWORK.has(c.reason)) ? [networkKeyOf(p)] : [];
  });
  ports.addIndex('waitingOnAddress', (p) => {
    const c = readyReason(p);
    return c && c.status !== 'True' && WAITING_ON_ADDRESS.has(c.reason) ? [networkKeyOf(p)] : [];
  });
  ports.addIndex('securityGroup', (p) =>
    (p.spec?.securityGroups ?? [DEFAULT_SECURITY_GROUP]).map((g) => `${p.metadata.namespace}/${g}`),
  );

  function ownedBy(port: Port) {
    const uid = port.metadata.uid;
    return (a: IPAllocation) => controllerOf(a)?.uid === uid;
  }

  /** The claims the port holds: from the cache, or from a live List when about to allocate. */
  /**
   * The claims the port holds: from the cache, or (live) from a List, the truth: every decision to release a claim
   * is made on a live List, never on a cache that may still show a claim that is gone or miss one just made.
   */
  async function heldClaims(port: Port, live: boolean): Promise<IPAllocation[]> {
    if (!live) return claims.byIndex('owner', port.metadata.uid ?? '');
    const list = await client.listAll<IPAllocation>(IP_ALLOCATIONS, {
      namespace: port.metadata.namespace,
      labelSelector: `${PORT_LABEL}=${port.metadata.name}`,
    });
    return (list.items ?? []).filter(ownedBy(port));
  }

  function claimManifest(port: Port, name: string, spec: IPAllocation['spec']): KubernetesObject {
    return {
      apiVersion: IPAllocationKind.apiVersion,
      kind: IPAllocationKind.kind,
      metadata: {
        name,
        namespace: port.metadata.namespace,
        labels: { ...claimLabels(port), [NETWORK_LABEL]: port.spec.network, [PORT_LABEL]: port.metadata.name ?? '' },
        ownerReferences: [
          {
            apiVersion: PortKind.apiVersion,
            kind: PortKind.kind,
            name: port.metadata.name ?? '',
            uid: port.metadata.uid ?? '',
            controller: true,
            blockOwnerDeletion: false,
          },
        ],
      },
      spec: { ...spec, port: port.metadata.name ?? '' },
    } as KubernetesObject;
  }

  /** Claims exactly `name`; true when the port now holds it, false when another holder has it. */
  async function claimExact(port: Port, name: string, spec: IPAllocation['spec']): Promise<boolean> {
    const ns = port.metadata.namespace ?? '';
    inflight.add(ns, name);
    try {
      await client.create(IP_ALLOCATIONS, claimManifest(port, name, spec));
      return true;
    } catch (e) {
      inflight.delete(ns, name);
      if (!isAlreadyExists(e)) throw e;
      const live = await client.get<IPAllocation>(IP_ALLOCATIONS, name, ns).catch((err: unknown) => {
        if (isNotFound(err)) return undefined;
        throw err;
      });
      if (!live) return claimExact(port, name, spec); // released meanwhile
      return controllerOf(live)?.uid === port.metadata.uid;
    }
  }

  /** The port's MAC claim: the one it holds, else spec.macAddress, else a random fa:16:3e MAC. */
  async function ensureMac(port: Port, held: IPAllocation[]): Promise<string> {
    const net = port.spec.network;
    const macs = held.filter((a) => a.spec.macAddress);
    const wanted = port.spec.macAddress?.toLowerCase();
    const keep =
      macs.find((a) => a.spec.macAddress === wanted) ??
      (wanted === undefined
        ? (macs.find((a) => a.spec.macAddress === port.status?.macAddress) ??
          [...macs].sort((a, b) => (a.metadata.name ?? '').localeCompare(b.metadata.name ?? ''))[0])
        : undefined);
    for (const a of macs) if (a !== keep) await deleteClaim(client, a);
    if (keep?.spec.macAddress) return keep.spec.macAddress;
    if (wanted !== undefined) {
      if (await claimExact(port, macAllocationName(net, wanted), { network: net, macAddress: wanted, purpose: 'port' }))
        return wanted;
      throw new AllocationFailure(
        'MacAddressInUse',
        `Unable to complete operation for network ${net}. The mac address ${wanted} is in use.`,
        true,
      );
    }
    for (let i = 0; i < 32; i++) {
      const mac = macFromBytes(randomBytes(3));
      const name = macAllocationName(net, mac);
      if (inflight.has(port.metadata.namespace ?? '', name)) continue;
      try {
        await client.create(
          IP_ALLOCATIONS,
          claimManifest(port, name, { network: net, macAddress: mac, purpose: 'port' }),
        );
        return mac;
      } catch (e) {
        if (!isAlreadyExists(e)) throw e;
      }
    }
    throw new Error(`no free MAC address found in network ${net} after 32 attempts`);
  }

  interface IpRequest {
    subnet: EffectiveSubnet;
    ip?: bigint;
  }

  /** The requested addresses (spec.fixedIPs, else one from the first IPv4 and the first IPv6 subnet). */
  function ipRequests(port: Port, subnets: EffectiveSubnet[]): IpRequest[] {
    const net = port.spec.network;
    if (!port.spec.fixedIPs) {
      const out: IpRequest[] = [];
      const v4 = subnets.find((s) => s.family === 4);
      const v6 = subnets.find((s) => s.family === 6);
      if (v4) out.push({ subnet: v4 });
      if (v6) out.push({ subnet: v6 });
      return out;
    }
    return port.spec.fixedIPs.map((f) => {
      const named = f.subnet === undefined ? undefined : subnets.find((s) => s.name === f.subnet);
      if (f.subnet !== undefined && !named) {
        throw new AllocationFailure(
          'SubnetNotFound',
          `Subnet ${f.subnet} could not be found in network ${net}.`,
          false,
        );
      }
      if (f.ipAddress === undefined) return { subnet: named! };
      const n = ipToBigInt(f.ipAddress);
      const family = isIP(f.ipAddress);
      const fits = (s: EffectiveSubnet) => s.family === family && inSubnet(s, n);
      const sub = named ?? subnets.find(fits);
      if (!sub || !fits(sub)) {
        throw new AllocationFailure(
          'InvalidIpForSubnet',
          `IP address ${f.ipAddress} is not a valid IP for the specified subnet${f.subnet ? ` ${f.subnet}` : 's of network ' + net}.`,
          false,
        );
      }
      if (isReserved(sub, n)) {
        const what = n === sub.gateway ? 'the gateway address' : 'the network or broadcast address';
        throw new AllocationFailure(
          'InvalidIpForSubnet',
          `IP address ${f.ipAddress} is ${what} of subnet ${sub.name} and cannot be assigned to a port.`,
          false,
        );
      }
      return { subnet: sub, ip: n };
    });
  }

  /** Claims the requested addresses (adopting held ones), releases held ones no request matches. */
  async function ensureIPs(port: Port, held: IPAllocation[], requests: IpRequest[]) {
    const ns = port.metadata.namespace ?? '';
    const net = port.spec.network;
    const ipClaims = held.filter((a) => a.spec.ipAddress);
    const inStatus = new Set((port.status?.fixedIPs ?? []).map((f) => `${f.subnet}/${f.ipAddress}`));
    ipClaims.sort((a, b) => {
      const sa = inStatus.has(`${a.spec.subnet}/${a.spec.ipAddress}`) ? 0 : 1;
      const sb = inStatus.has(`${b.spec.subnet}/${b.spec.ipAddress}`) ? 0 : 1;
      if (sa !== sb) return sa - sb;
      const d = ipToBigInt(a.spec.ipAddress ?? '0.0.0.0') - ipToBigInt(b.spec.ipAddress ?? '0.0.0.0');
      return d < 0n ? -1 : d > 0n ? 1 : 0;
    });
    const used = new Set<IPAllocation>();
    const matched: (IPAllocation | undefined)[] = requests.map((r) => {
      if (r.ip === undefined) return undefined;
      const name = ipAllocationName(net, r.subnet.name, formatIP(r.ip, r.subnet.family));
      const a = ipClaims.find((c) => c.metadata.name === name && !used.has(c));
      if (a) used.add(a);
      return a;
    });
    requests.forEach((r, i) => {
      if (r.ip !== undefined) return;
      const a = ipClaims.find((c) => c.spec.subnet === r.subnet.name && !used.has(c));
      if (a) used.add(a);
      matched[i] = a;
    });
    for (const a of ipClaims) if (!used.has(a)) await deleteClaim(client, a);

    const out: { subnet: string; ipAddress: string }[] = [];
    for (const [i, r] of requests.entries()) {
      const have = matched[i];
      if (have?.spec.ipAddress) {
        out.push({ subnet: r.subnet.name, ipAddress: have.spec.ipAddress });
        continue;
      }
      if (r.ip !== undefined) {
        const ip = formatIP(r.ip, r.subnet.family);
        const name = ipAllocationName(net, r.subnet.name, ip);
        const ok = await claimExact(port, name, {
          network: net,
          subnet: r.subnet.name,
          ipAddress: ip,
          purpose: 'port',
        });
        if (!ok) {
          throw new AllocationFailure(
            'IpAddressAlreadyAllocated',
            `IP address ${ip} already allocated in subnet ${r.subnet.name} of network ${net}.`,
            true,
          );
        }
        out.push({ subnet: r.subnet.name, ipAddress: ip });
        continue;
      }
      const ip = await claimFreeAddress({
        client,
        inflight,
        namespace: ns,
        network: net,
        subnet: r.subnet,
        cached: () => claims.byIndex('network', `${ns}/${net}`),
        create: async (address, name) => {
          await client.create(
            IP_ALLOCATIONS,
            claimManifest(port, name, { network: net, subnet: r.subnet.name, ipAddress: address, purpose: 'port' }),
          );
        },
      });
      if (ip === undefined) {
        throw new AllocationFailure(
          'IpAddressGenerationFailure',
          `No more IP addresses available on subnet ${r.subnet.name} of network ${net}.`,
          true,
        );
      }
      out.push({ subnet: r.subnet.name, ipAddress: ip });
    }
    return out;
  }

  /** Adds the finalizer and the network label in one merge patch guarded by resourceVersion. */
  async function ensureMetadata(port: Port): Promise<Port> {
    let cur = port;
    for (let i = 1; ; i++) {
      const finalizers = cur.metadata.finalizers ?? [];
      const needsFinalizer = !finalizers.includes(PORT_FINALIZER);
      const needsLabel = cur.metadata.labels?.[NETWORK_LABEL] !== cur.spec.network;
      if (!needsFinalizer && !needsLabel) return cur;
      try {
        return await client.patch<Port>(
          PORTS,
          cur.metadata.name ?? '',
          cur.metadata.namespace,
          {
            metadata: {
              resourceVersion: cur.metadata.resourceVersion,
              ...(needsLabel ? { labels: { [NETWORK_LABEL]: cur.spec.network } } : {}),
              ...(needsFinalizer ? { finalizers: [...finalizers, PORT_FINALIZER] } : {}),
            },
          },
          PatchStrategy.MergePatch,
        );
      } catch (e) {
        if (i >= 5 || !isConflict(e)) throw e;
        cur = await client.get<Port>(PORTS, cur.metadata.name ?? '', cur.metadata.namespace);
      }
    }
  }

  async function release(port: Port, ctx: ReconcileContext) {
    if (!port.metadata.finalizers?.includes(PORT_FINALIZER)) return undefined;
    // A port a live server still uses keeps its addresses (and its tap on the node): deleting it would cut the
    // guest's NIC silently and the server would get a new port with new addresses. It goes once the server does
    // (the Server controller deletes the ports it created and unlabels the others when it is deleted).
    const device = port.metadata.labels?.[PORT_DEVICE_LABEL];
    if (device) {
      const server = await client.get(SERVERS, device, port.metadata.namespace).catch((e: unknown) => {
        if (isNotFound(e)) return undefined;
        throw e;
      });
      if (server && !server.metadata?.deletionTimestamp) {
        const message = `port is in use by server ${device}; it is deleted when the server is`;
        const gen = port.metadata.generation;
        const before = readyReason(port);
        await writePortStatus(port, (raw) => {
          const st = raw as PortStatus;
          if (st.macAddress !== undefined) st.status = allocatedPortStatus(st); // follows the binding meanwhile
          st.conditions = withConditions(
            st.conditions,
            [{ type: PORT_READY, status: 'False', reason: 'PortInUse', message }],
            gen,
          ) as PortStatus['conditions'];
          return st as Record<string, unknown>;
        });
        if (before?.reason !== 'PortInUse') events.warning(port, 'PortInUse', 'Delete', message);
        return { requeueAfter: 60_000 };
      }
    }
    const held = await heldClaims(port, true);
    for (const a of held) await deleteClaim(client, a);
    await removeFinalizer(client, PORTS, port.metadata.name ?? '', port.metadata.namespace, PORT_FINALIZER, {
      current: port,
    }).catch((e: unknown) => {
      if (!isNotFound(e)) throw e; // gone already (another writer removed the finalizer)
    });
    ctx.log.info({ claims: held.length }, 'port released its addresses');
    return undefined;
  }

  /** A port that cannot be allocated (yet): BUILD while waiting, ERROR on a failure. */
  async function notReady(
    port: Port,
    status: 'BUILD' | 'ERROR',
    reason: string,
    message: string,
    mac?: string,
  ): Promise<ReconcileResult> {
    const gen = port.metadata.generation;
    const before = readyReason(port);
    const base = allocationOf(port.status);
    let raced = false;
    await writePortStatus(port, (raw) => {
      const st = raw as PortStatus;
      if (allocationOf(st) !== base) {
        raced = true; // another writer allocated meanwhile: look again rather than report a stale failure
        return undefined;
      }
      st.status = status;
      if (mac && st.macAddress === undefined) st.macAddress = mac;
      st.observedGeneration = gen;
      st.conditions = withConditions(
        st.conditions,
        [{ type: PORT_READY, status: 'False', reason, message }],
        gen,
      ) as PortStatus['conditions'];
      return st as Record<string, unknown>;
    });
    if (raced) return { requeue: true };
    if (status === 'ERROR' && (before?.reason !== reason || before.status === 'True')) {
      events.warning(port, reason, 'Allocate', message);
    }
    return undefined;
  }

  /** Resolves the effective security groups; creates the namespace's default group when a port needs it. */
  async function resolveGroups(port: Port, names: string[]) {
    const ns = port.metadata.namespace ?? '';
    const missing: string[] = [];
    for (const g of names) {
      if (groups.get(g, ns)) continue;
      const live = await client.get(SECURITY_GROUPS, g, ns).catch((e: unknown) => {
        if (isNotFound(e)) return undefined;
        throw e;
      });
      if (live) continue;
      if (g === DEFAULT_SECURITY_GROUP) {
        if (await ensureDefaultSecurityGroup(client, ns)) {
          events.normal(port, 'DefaultSecurityGroupCreated', 'Create', `created security group default in ${ns}`);
        }
        continue;
      }
      missing.push(g);
    }
    return missing;
  }

  async function reconcile(req: Request, ctx: ReconcileContext) {
    let port = ports.get(req.name, req.namespace);
    if (!port) return undefined;
    if (port.metadata.deletionTimestamp) return release(port, ctx);
    const parsed = PortKind.spec.safeParse(port.spec);
    if (!parsed.success) {
      await notReady(port, 'ERROR', 'InvalidSpec', parsed.error.message.slice(0, 2000));
      return undefined;
    }
    port = await ensureMetadata({ ...port, spec: parsed.data } as Port);
    port = { ...port, spec: parsed.data } as Port;
    const gen = port.metadata.generation;
    const ns = port.metadata.namespace ?? '';
    const netName = port.spec.network;
    const network = networks.get(netName, ns);
    if (!network) return notReady(port, 'BUILD', 'NetworkNotFound', `Network ${netName} could not be found.`);
    if (network.metadata.deletionTimestamp) {
      return notReady(port, 'BUILD', 'NetworkDeleting', `Network ${netName} is being deleted.`);
    }
    if (!network.status?.segmentationID || network.status.status !== 'ACTIVE') {
      return notReady(port, 'BUILD', 'NetworkNotReady', `Waiting for network ${netName} to become ACTIVE.`);
    }
    const netSpec = NetworkKind.spec.safeParse(network.spec);
    if (!netSpec.success) return notReady(port, 'BUILD', 'NetworkNotReady', `Network ${netName} is invalid.`);
    const subnets = netSpec.data.subnets.map(effectiveSubnet);

    // Fast path: status complete for this generation and the cache shows exactly the claims it names.
    const ready = readyReason(port);
    let held = await heldClaims(port, false);
    const st0 = port.status ?? {};
    const complete =
      ready?.status === 'True' &&
      st0.observedGeneration === gen &&
      st0.macAddress !== undefined &&
      held.length === 1 + (st0.fixedIPs?.length ?? 0) &&
      held.some((a) => a.spec.macAddress === st0.macAddress) &&
      (st0.fixedIPs ?? []).every((f) => held.some((a) => a.spec.ipAddress === f.ipAddress));
    if (!complete) held = await heldClaims(port, true);

    let mac: string | undefined;
    let fixedIPs: { subnet: string; ipAddress: string }[];
    try {
      const requests = ipRequests(port, subnets);
      // More claims than the port needs (two writers raced, e.g. an old leader finishing a reconcile): decide which
      // to keep from the freshest status, so every writer keeps the same ones.
      const macCount = held.filter((a) => a.spec.macAddress).length;
      if (macCount > 1 || held.length - macCount > requests.length) {
        const live = await client.get<Port>(PORTS, req.name, req.namespace);
        port = { ...port, status: live.status, metadata: live.metadata } as Port;
      }
      mac = await ensureMac(port, held);
      fixedIPs = await ensureIPs(port, held, requests);
    } catch (e) {
      if (!(e instanceof AllocationFailure)) throw e;
      ctx.log.info({ reason: e.reason, message: e.message }, 'allocation failed');
      const raced = await notReady(port, 'ERROR', e.reason, e.message, mac);
      if (raced) return raced;
      return e.retry ? { requeueAfter: retryMs } : undefined;
    }

    const macAddress = mac;
    const sgs = effectiveSecurityGroups(port, { spec: netSpec.data });
    const missing = await resolveGroups(port, sgs);
    const deviceID = port.metadata.labels?.[PORT_DEVICE_LABEL];
    const wasReady = ready?.status === 'True';
    // Compare-and-swap on the allocation: if another writer changed MAC or addresses since this reconcile read the
    // port, its decisions are stale; reconcile again instead of overwriting.
    const base = allocationOf(port.status);
    let raced = false;
    await writePortStatus(port, (raw) => {
      const st = raw as PortStatus;
      if (allocationOf(st) !== base) {
        raced = true;
        return undefined;
      }
      st.macAddress = macAddress;
      st.fixedIPs = fixedIPs;
      st.securityGroups = sgs;
      if (deviceID) {
        st.deviceID = deviceID;
        st.deviceOwner = COMPUTE_DEVICE_OWNER;
      } else {
        delete st.deviceID;
        delete st.deviceOwner;
      }
      st.status = allocatedPortStatus(st);
      st.observedGeneration = gen;
      st.conditions = withConditions(
        st.conditions,
        [
          {
            type: PORT_READY,
            status: 'True',
            reason: 'Allocated',
            message: `${macAddress} ${fixedIPs.map((f) => f.ipAddress).join(' ')}`.trim(),
          },
          missing.length === 0
            ? { type: PORT_SECURITY_GROUPS, status: 'True', reason: 'Resolved', message: sgs.join(', ') }
            : {
                type: PORT_SECURITY_GROUPS,
                status: 'False',
                reason: 'SecurityGroupNotFound',
                message: `Security group ${missing.join(', ')} not found in ${ns}; the port gets the rules of the others.`,
              },
        ],
        gen,
      ) as PortStatus['conditions'];
      return st as Record<string, unknown>;
    });
    if (raced) {
      ctx.log.info('allocation changed by another writer; reconciling again');
      return { requeue: true };
    }
    if (!wasReady) {
      events.normal(port, 'Allocated', 'Allocate', `${mac} ${fixedIPs.map((f) => f.ipAddress).join(' ')}`.trim());
      ctx.log.info({ mac, fixedIPs }, 'port allocated');
    }
    return undefined;
  }

  const controller = mgr.addController({ name: 'port', reconcile, maxConcurrentReconciles: opts.concurrency ?? 8 });
  controller.for(ports, { updatePredicate: (a, b) => specOrMetaChanged(a, b) || bindingChanged(a, b) });
  // A claim appearing, changing or going revisits its port: extra claims (a lost race, a stale read) are released,
  // a claim deleted by hand is made again.
  controller.owns(claims, { apiVersion: PortKind.apiVersion, kind: PortKind.kind });
  // Ports waiting on their network go again when it changes (becomes ACTIVE, gains a subnet, is created).
  controller.watches(networks, (n) => ports.byIndex('waitingOnNetwork', objectKey(n)).map(objectKey));
  // Ports waiting for an address go again when a claim of their network is released.
  claims.addEventHandler({
    onDelete: (a) => {
      for (const p of ports.byIndex('waitingOnAddress', networkKeyOf(a))) controller.enqueue(objectKey(p));
    },
  });
  // Ports naming a security group go again when it appears or goes.
  const groupEvent = (g: SecurityGroup) => {
    for (const p of ports.byIndex('securityGroup', objectKey(g))) controller.enqueue(objectKey(p));
  };
  groups.addEventHandler({ onAdd: groupEvent, onDelete: groupEvent });
  return { controller, events };
}
