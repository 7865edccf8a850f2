// The fake volume backend: volumes in memory, for the nodes the fake hypervisor driver simulates (scale runs, the
// quickstart with --driver=fake). It answers as the local backend does (name `local`, locations
// `local://<node>/<uid>`), keeps no data, and its connections are null-co blockdevs the fake driver accepts. Like
// the fake driver, it forgets everything when the agent process ends.
import { type VolumeConnection, volumeSerial } from '../driver.ts';
import type {
  BackendProbe,
  ProvisionedSnapshot,
  ProvisionedVolume,
  SnapshotRef,
  VolumeBackend,
  VolumeRef,
  VolumeSourceSpec,
} from './backend.ts';
import type { NbdExportInfo, NbdExportRequest, VolumeExporter, VolumeImageCache } from './host.ts';

export class FakeVolumeBackend implements VolumeBackend {
  readonly name = 'local';
  readonly #node: string;
  readonly #volumes = new Map<string, number>();
  readonly #snapshots = new Map<string, number>();

  constructor(o: { node: string }) {
    this.#node = o.node;
  }

  async probe(): Promise<BackendProbe> {
    return { ok: true };
  }

  async create(vol: VolumeRef, sizeBytes: number, source: VolumeSourceSpec): Promise<ProvisionedVolume> {
    const location = `local://${this.#node}/${vol.id}`;
    const from =
      source.kind === 'image'
        ? source.image.virtualSize
        : source.kind === 'snapshot'
          ? this.#snapshots.get(source.location)
          : source.kind === 'volume'
            ? this.#volumes.get(source.location)
            : 0;
    if (from === undefined) throw new Error(`fake volume backend: no ${source.kind} at ${JSON.stringify(source)}`);
    if (sizeBytes < from) throw new RangeError(`volume size ${sizeBytes} is smaller than its source (${from} bytes)`);
    if (!this.#volumes.has(location)) this.#volumes.set(location, sizeBytes);
    return { location, sizeBytes: this.#volumes.get(location)!, allocatedBytes: 0 };
  }

  async inspect(location: string): Promise<ProvisionedVolume | undefined> {
    const size = this.#volumes.get(location);
    return size === undefined ? undefined : { location, sizeBytes: size, allocatedBytes: 0 };
  }

  async extend(location: string, sizeBytes: number): Promise<ProvisionedVolume> {
    const size = this.#volumes.get(location);
    if (size === undefined) throw new Error(`fake volume backend: no volume ${location}`);
    if (sizeBytes < size) throw new RangeError(`a volume cannot shrink (${size} → ${sizeBytes} bytes)`);
    this.#volumes.set(location, sizeBytes);
    return { location, sizeBytes, allocatedBytes: 0 };
  }

  async delete(location: string): Promise<void> {
    this.#volumes.delete(location);
  }

  async createSnapshot(location: string, snap: SnapshotRef): Promise<ProvisionedSnapshot> {
    const size = this.#volumes.get(location);
    if (size === undefined) throw new Error(`fake volume backend: no volume ${location}`);
    const at = `local://${this.#node}/snapshots/${snap.id}`;
    if (!this.#snapshots.has(at)) this.#snapshots.set(at, size);
    return { location: at, sizeBytes: this.#snapshots.get(at)! };
  }

  async deleteSnapshot(location: string): Promise<void> {
    this.#snapshots.delete(location);
  }

  async list(): Promise<{ volumes: string[]; snapshots: string[] }> {
    return { volumes: [...this.#volumes.keys()], snapshots: [...this.#snapshots.keys()] };
  }

  async connection(vol: VolumeRef, location: string): Promise<VolumeConnection> {
    const size = this.#volumes.get(location);
    if (size === undefined) throw new Error(`fake volume backend: no volume ${location}`);
    return { volumeId: vol.id, serial: volumeSerial(vol.id), blockdev: { driver: 'null-co', size } };
  }
}

/** The image "cache" of a simulated node: a volume made from an image gets the image's declared size, no data. */
export const FAKE_IMAGES: VolumeImageCache = {
  ensure: async (src) => ({
    key: 'fake',
    path: '/dev/null',
    format: 'raw',
    virtualSize: 0,
    size: 0,
    sha256: src.checksum?.algorithm === 'sha256' ? src.checksum.value : '0'.repeat(64),
  }),
};

/** The NBD exporter of a simulated node: it records exports (so attachments across simulated nodes follow the flow). */
export class FakeExporter implements VolumeExporter {
  readonly #host: string;
  readonly #exports = new Set<string>();

  constructor(o: { host?: string } = {}) {
    this.#host = o.host ?? '127.0.0.1';
  }

  async ensureExport(req: NbdExportRequest): Promise<NbdExportInfo> {
    this.#exports.add(req.name);
    return { host: this.#host, port: 10809, name: req.name };
  }

  async removeExport(name: string): Promise<void> {
    this.#exports.delete(name);
  }

  async exports(): Promise<string[]> {
    return [...this.#exports];
  }
}

/** How a simulated node "opens" a volume another simulated node exports: a null-co blockdev, no data. */
export const fakeNbdConnection = (vol: VolumeRef): VolumeConnection => ({
  volumeId: vol.id,
  serial: volumeSerial(vol.id),
  blockdev: { driver: 'null-co' },
});
