// Test doubles for the volume host: a VolumeBackend over a directory (sparse raw files, no external tools, faults and
// a "kill" hook injectable) and an NBD exporter that records its calls. The backend follows the contract's naming
// (location local://<node>/<uid>, files <dir>/volumes/<uid>.qcow2 and <dir>/volumes/snapshots/<snapuid>.qcow2), so
// the real LocalBackend (node-agent/src/volumes/local.ts) can take its place in the tests that inject no fault.
import { copyFile, mkdir, readdir, rename, rm, stat, truncate, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { VolumeConnection } from '../../src/driver.ts';
import { volumeSerial } from '../../src/driver.ts';
import type {
  BackendProbe,
  ProvisionedSnapshot,
  ProvisionedVolume,
  SnapshotRef,
  VolumeBackend,
  VolumeRef,
  VolumeSourceSpec,
} from '../../src/volumes/backend.ts';
import type { NbdExportInfo, NbdExportRequest, VolumeExporter } from '../../src/volumes/host.ts';

type Op = 'create' | 'extend' | 'delete' | 'createSnapshot' | 'deleteSnapshot';

export class DirBackend implements VolumeBackend {
  readonly name = 'local';
  readonly calls: { op: Op | 'inspect' | 'connection'; arg: string; source?: VolumeSourceSpec['kind'] }[] = [];
  /** The next call of an op throws this error (once). */
  readonly failNext = new Map<Op, Error>();
  /** After doing its work, create() of a volume never returns (an agent killed before its report). */
  hangAfterCreate = false;
  readonly #dir: string;
  readonly #node: string;

  constructor(dir: string, node: string) {
    this.#dir = dir;
    this.#node = node;
  }

  get volumesDir(): string {
    return path.join(this.#dir, 'volumes');
  }

  pathOf(location: string): string {
    const prefix = `local://${this.#node}/`;
    if (!location.startsWith(prefix)) throw new Error(`not a location of this node: ${location}`);
    return path.join(this.volumesDir, `${location.slice(prefix.length)}.qcow2`);
  }

  #fail(op: Op): void {
    const err = this.failNext.get(op);
    if (err) {
      this.failNext.delete(op);
      throw err;
    }
  }

  async probe(): Promise<BackendProbe> {
    return { ok: true };
  }

  async create(vol: VolumeRef, sizeBytes: number, source: VolumeSourceSpec): Promise<ProvisionedVolume> {
    this.calls.push({ op: 'create', arg: vol.id, source: source.kind });
    this.#fail('create');
    const location = `local://${this.#node}/${vol.id}`;
    const file = this.pathOf(location);
    const existing = await this.inspect(location);
    if (existing) return existing;
    await mkdir(path.dirname(file), { recursive: true });
    const tmp = `${file}.tmp`;
    if (source.kind === 'image') await copyFile(source.image.path, tmp);
    else if (source.kind !== 'blank') await copyFile(this.pathOf(source.location), tmp);
    else await writeFile(tmp, '');
    const size = (await stat(tmp)).size;
    if (size < sizeBytes) await truncate(tmp, sizeBytes);
    await rename(tmp, file);
    if (this.hangAfterCreate) await new Promise<never>(() => {});
    return (await this.inspect(location))!;
  }

  async inspect(location: string): Promise<ProvisionedVolume | undefined> {
    this.calls.push({ op: 'inspect', arg: location });
    try {
      const st = await stat(this.pathOf(location));
      return { location, sizeBytes: st.size, allocatedBytes: st.blocks * 512 };
    } catch {
      return undefined;
    }
  }

  async extend(location: string, sizeBytes: number): Promise<ProvisionedVolume> {
    this.calls.push({ op: 'extend', arg: location });
    this.#fail('extend');
    const cur = await this.inspect(location);
    if (!cur) throw new Error(`no volume at ${location}`);
    if (sizeBytes < cur.sizeBytes) throw new RangeError('volumes never shrink');
    if (sizeBytes > cur.sizeBytes) await truncate(this.pathOf(location), sizeBytes);
    return (await this.inspect(location))!;
  }

  async delete(location: string): Promise<void> {
    this.calls.push({ op: 'delete', arg: location });
    this.#fail('delete');
    await rm(this.pathOf(location), { force: true });
  }

  async createSnapshot(location: string, snap: SnapshotRef): Promise<ProvisionedSnapshot> {
    this.calls.push({ op: 'createSnapshot', arg: location });
    this.#fail('createSnapshot');
    const target = `local://${this.#node}/snapshots/${snap.id}`;
    const file = this.pathOf(target);
    await mkdir(path.dirname(file), { recursive: true });
    try {
      await stat(file);
    } catch {
      await copyFile(this.pathOf(location), `${file}.tmp`);
      await rename(`${file}.tmp`, file);
    }
    return { location: target, sizeBytes: (await stat(file)).size };
  }

  async deleteSnapshot(location: string): Promise<void> {
    this.calls.push({ op: 'deleteSnapshot', arg: location });
    this.#fail('deleteSnapshot');
    await rm(this.pathOf(location), { force: true });
  }

  async list(): Promise<{ volumes: string[]; snapshots: string[] }> {
    const names = async (dir: string) =>
      (await readdir(dir).catch(() => [] as string[])).filter((f) => f.endsWith('.qcow2')).map((f) => f.slice(0, -6));
    return {
      volumes: (await names(this.volumesDir)).map((id) => `local://${this.#node}/${id}`),
      snapshots: (await names(path.join(this.volumesDir, 'snapshots'))).map(
        (id) => `local://${this.#node}/snapshots/${id}`,
      ),
    };
  }

  async connection(vol: VolumeRef, location: string): Promise<VolumeConnection> {
    this.calls.push({ op: 'connection', arg: location });
    return {
      volumeId: vol.id,
      serial: volumeSerial(vol.id),
      blockdev: { driver: 'raw', file: { driver: 'file', filename: this.pathOf(location) } },
    };
  }
}

/** An NBD exporter that serves nothing and records what it was asked. */
export class RecordingExporter implements VolumeExporter {
  readonly served = new Map<string, NbdExportRequest>();
  readonly calls: { op: 'ensure' | 'remove'; name: string }[] = [];

  async ensureExport(req: NbdExportRequest): Promise<NbdExportInfo> {
    this.calls.push({ op: 'ensure', name: req.name });
    this.served.set(req.name, req);
    return { name: req.name, host: '127.0.0.1', port: 10809 };
  }

  async removeExport(name: string): Promise<void> {
    this.calls.push({ op: 'remove', name });
    this.served.delete(name);
  }

  async exports(): Promise<string[]> {
    return [...this.served.keys()];
  }
}
