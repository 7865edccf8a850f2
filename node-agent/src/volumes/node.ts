// The one place a node's volume machinery is assembled (the agent's main.ts calls it for the qemu driver): the local
// backend in the agent's state directory, the rbd backend of each rbd VolumeType, the node's NBD exporter (server
// side, for local volumes attached on other nodes) and the NBD client credentials (for this node's guests attaching
// volumes held elsewhere). The NBD pre-shared key comes from the operator's Secret stratus-volume-nbd, read when
// first needed and re-read on every use, so a node starts before the Secret exists and follows a new key.
import { access } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { NODE_LEASE_NAMESPACE } from '../../../operator/src/api/index.ts';
import type { KubeClient } from '../../../operator/src/runtime/index.ts';
import type { VolumeConnectors } from './attach.ts';
import type { BackendProbe, VolumeBackend } from './backend.ts';
import type { NbdExportInfo, NbdExportRequest, VolumeExporter, VolumeHostOptions, VolumeImageCache } from './host.ts';
import { createBackends, type NbdPsk, readNbdPsk } from './index.ts';
import { LocalBackend } from './local.ts';
import { NbdExporter, nbdClientPskDir, nbdConnection, writeClientPsk } from './nbd-export.ts';
import { RbdBackend, rbdModuleDirs } from './rbd.ts';

export interface NodeVolumesOptions {
  client: KubeClient;
  nodeName: string;
  /** The agent's state directory (volumes/, nbd/, nbd-client/ under it). */
  stateDir: string;
  /** Address other nodes reach this node's NBD exports on; without it local volumes attach on this node only. */
  hostIP?: string;
  /** QEMU's user: volume files, the NBD daemon and the client keys belong to it. */
  owner?: { uid: number; gid: number };
  /** Network namespace the NBD daemon listens in (the simulated nodes of the e2e tier). */
  netns?: string;
  /** Namespace of the Secret stratus-volume-nbd (the agents' Lease namespace). */
  secretNamespace?: string;
  /** The node's image cache (volumes made from an image); the qemu driver's. */
  images: VolumeImageCache;
  log: Logger;
}

export interface NodeVolumes {
  /** For NodeAgent's volumeHost option (VolumeHost without manager and node name). */
  host: Omit<VolumeHostOptions, 'manager' | 'nodeName' | 'logger' | 'clock'>;
  /** For NodeAgent's volumeConnectors option (the attacher). */
  connectors: VolumeConnectors;
  /** Cached image files volumes are overlays on: the image cache must keep them (QemuDriver.addImageUser). */
  imagesInUse(): Promise<Set<string>>;
}

export function nodeVolumes(o: NodeVolumesOptions): NodeVolumes {
  const local = new LocalBackend({ stateDir: o.stateDir, node: o.nodeName, ...(o.owner ? { owner: o.owner } : {}) });
  const namespace = o.secretNamespace ?? NODE_LEASE_NAMESPACE;
  const registry = createBackends({
    client: o.client,
    local,
    rbd: (r) => new RbdBackend({ pool: r.pool, user: r.user, key: r.key, monitors: r.monitors }),
    rbdProbe: { name: 'rbd', probe: probeRbdTools } as VolumeBackend,
  });
  const exporter = o.hostIP
    ? new PskFollowingExporter(
        () => readNbdPsk(o.client, namespace),
        (psk) =>
          new NbdExporter({
            stateDir: o.stateDir,
            hostIP: o.hostIP!,
            psk,
            ...(o.owner ? { owner: o.owner } : {}),
            ...(o.netns ? { netns: o.netns } : {}),
            log: o.log,
          }),
      )
    : undefined;
  const clientDir = nbdClientPskDir(o.stateDir);
  return {
    host: {
      backends: registry.byName,
      ...(registry.rbdFor ? { rbdBackend: registry.rbdFor } : {}),
      ...(exporter ? { exporter } : {}),
      images: o.images,
    },
    connectors: {
      backends: registry.byName,
      ...(registry.rbdFor ? { rbd: registry.rbdFor } : {}),
      nbd: async (vol, exp, psk: NbdPsk) => {
        await writeClientPsk(clientDir, psk.identity, psk.key, o.owner);
        return nbdConnection({
          volumeId: vol.id,
          host: exp.host,
          port: exp.port,
          name: exp.name,
          clientPskDir: clientDir,
          identity: psk.identity,
        });
      },
    },
    imagesInUse: () => local.imagesInUse(),
  };
}

/**
 * The rbd entry of status.volumeBackends before any rbd VolumeType is known: the tools this node needs to use any
 * Ceph cluster (the rbd CLI, QEMU's rbd block driver). Reaching a given cluster is checked per type, at use.
 */
export async function probeRbdTools(): Promise<BackendProbe> {
  const found = async (p: string) =>
    access(p).then(
      () => true,
      () => false,
    );
  const path = (process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin').split(':');
  let cli = false;
  for (const dir of path) if (dir && (await found(join(dir, 'rbd')))) cli = true;
  if (!cli) return { ok: false, reason: 'the rbd CLI is not installed: install ceph-common' };
  let module = false;
  for (const dir of rbdModuleDirs()) if (await found(join(dir, 'block-rbd.so'))) module = true;
  if (!module) return { ok: false, reason: 'QEMU has no rbd block driver (block-rbd.so): install qemu-block-extra' };
  return { ok: true };
}

/** The node's NbdExporter, built with the operator's PSK on first use and given the new key when it changes. */
class PskFollowingExporter implements VolumeExporter {
  readonly #readPsk: () => Promise<NbdPsk>;
  readonly #make: (psk: NbdPsk) => NbdExporter;
  #exporter: NbdExporter | undefined;
  #key = '';

  constructor(readPsk: () => Promise<NbdPsk>, make: (psk: NbdPsk) => NbdExporter) {
    this.#readPsk = readPsk;
    this.#make = make;
  }

  async #current(): Promise<NbdExporter> {
    const psk = await this.#readPsk();
    const key = `${psk.identity}:${psk.key}`;
    if (!this.#exporter) {
      this.#exporter = this.#make(psk);
      await this.#exporter.start();
    } else if (key !== this.#key) {
      await this.#exporter.setPsk(psk);
    }
    this.#key = key;
    return this.#exporter;
  }

  async ensureExport(req: NbdExportRequest): Promise<NbdExportInfo> {
    return (await this.#current()).ensureExport(req);
  }

  async removeExport(name: string): Promise<void> {
    return (await this.#current()).removeExport(name);
  }

  async exports(): Promise<string[]> {
    return (await this.#current()).exports();
  }
}
