// The node's volume backends (a backend is one file under volumes/ plus one line here): instances are injected
// (the agent builds LocalBackend from its state directory; RbdBackend per VolumeType through a factory), and this
// registry hands the volume host the backend of a volume: by name, or for rbd the instance of its VolumeType built
// from the type's options and the cephx key of the Secret it names (key `key`). Also the NBD pre-shared key the
// node's exporter (server side) and QEMU (client side) use: Secret stratus-volume-nbd in the operator's namespace.
import type { KubernetesObject } from '@kubernetes/client-node';
import { NODE_LEASE_NAMESPACE, type VolumeType } from '../../../operator/src/api/index.ts';
import { type GVR, isNotFound, type KubeClient } from '../../../operator/src/runtime/index.ts';
import type { VolumeBackend } from './backend.ts';

const SECRETS: GVR = { group: '', version: 'v1', plural: 'secrets' };

/** The Secret holding the NBD TLS pre-shared key (created by the operator; keys identity, key). */
export const NBD_SECRET_NAME = 'stratus-volume-nbd';

/** What RbdBackend needs for the volumes of one VolumeType. */
export interface RbdTypeOptions {
  /** VolumeType name. */
  type: string;
  pool: string;
  user: string;
  monitors: string[];
  /** The cephx key, base64 as `ceph auth get-key` prints it. */
  key: string;
}

export interface NbdPsk {
  identity: string;
  /** 64 hex characters. */
  key: string;
}

export interface CreateBackendsOptions {
  client: KubeClient;
  /** The node's local backend (LocalBackend), when it runs one. */
  local?: VolumeBackend;
  /** Builds the rbd backend of one VolumeType (e.g. `(o) => new RbdBackend(o)`); without it, rbd is unavailable. */
  rbd?: (o: RbdTypeOptions) => VolumeBackend;
  /** A type-less rbd backend that only probes (tools, QEMU's rbd block driver) for status.volumeBackends. */
  rbdProbe?: VolumeBackend;
}

export interface VolumeBackends {
  /** Backends by name that need no per-type options (local), and the rbd probe: VolumeHost `backends`. */
  readonly byName: ReadonlyMap<string, VolumeBackend>;
  /** The rbd backend of a VolumeType (VolumeHost `rbdBackend`); undefined when this node has no rbd factory. */
  readonly rbdFor: ((type: VolumeType) => Promise<VolumeBackend>) | undefined;
}

/** The registry. The rbd instance of a type is rebuilt when the type or its key changes. */
export function createBackends(o: CreateBackendsOptions): VolumeBackends {
  const byName = new Map<string, VolumeBackend>();
  if (o.local) byName.set('local', o.local);
  if (o.rbdProbe) byName.set('rbd', o.rbdProbe);
  const cache = new Map<string, { fingerprint: string; backend: VolumeBackend }>();
  const factory = o.rbd;
  const rbdFor = factory
    ? async (type: VolumeType): Promise<VolumeBackend> => {
        const name = type.metadata?.name ?? '';
        const opts = type.spec.rbd;
        if (type.spec.backend !== 'rbd' || !opts) throw new Error(`volume type ${name} is not an rbd type`);
        const key = await secretValue(o.client, opts.secretRef.name, opts.secretRef.namespace, 'key');
        const options: RbdTypeOptions = {
          type: name,
          pool: opts.pool,
          user: opts.user,
          monitors: [...opts.monitors],
          key,
        };
        const fingerprint = JSON.stringify(options);
        const hit = cache.get(name);
        if (hit?.fingerprint === fingerprint) return hit.backend;
        const backend = factory(options);
        cache.set(name, { fingerprint, backend });
        return backend;
      }
    : undefined;
  return { byName, rbdFor };
}

/** The NBD pre-shared key the operator distributes (Secret stratus-volume-nbd, keys identity and key). */
export async function readNbdPsk(client: KubeClient, namespace: string = NODE_LEASE_NAMESPACE): Promise<NbdPsk> {
  const identity = await secretValue(client, NBD_SECRET_NAME, namespace, 'identity');
  const key = await secretValue(client, NBD_SECRET_NAME, namespace, 'key');
  if (!/^[0-9a-f]{64}$/i.test(key))
    throw new Error(`secret ${namespace}/${NBD_SECRET_NAME}: key is not 64 hex characters`);
  return { identity, key };
}

async function secretValue(client: KubeClient, name: string, namespace: string, key: string): Promise<string> {
  let secret: KubernetesObject & { data?: Record<string, string> };
  try {
    secret = await client.get(SECRETS, name, namespace);
  } catch (err) {
    if (isNotFound(err)) throw new Error(`secret ${namespace}/${name} not found`);
    throw err;
  }
  const b64 = secret.data?.[key];
  if (b64 === undefined) throw new Error(`secret ${namespace}/${name} has no key ${key}`);
  return Buffer.from(b64, 'base64').toString('utf8').trim();
}
