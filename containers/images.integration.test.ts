// npm run images for real (mmdebstrap, npm ci, gcc; cached under ~/.cache/stratus/images/oci, so only the first run
// on a machine is slow: about 1.5 min cold, about 1 s warm, see BENCHMARKS.md): the archives are OCI image layouts
// that umoci reads, the entrypoint, user and tag are those of containers/images.ts, and building twice gives the same
// manifest digests.
import { execFile } from 'node:child_process';
import { createReadStream } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import * as tar from 'tar-stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type BuiltImages, buildImages, defaultTag } from './build.ts';
import { APP_DIR, IMAGES, NODE_PATH, PAUSE } from './images.ts';
import { MEDIA } from './oci.ts';

const execFileP = promisify(execFile);
const BUILD_TIMEOUT = 900_000;

/** The small entries of an archive (index.json, manifests, configs), streamed: layers are left unread. */
async function smallEntries(archive: string): Promise<Map<string, Buffer>> {
  const out = new Map<string, Buffer>();
  const extract = tar.extract();
  const done = new Promise<void>((resolve, reject) => {
    extract.on('entry', (h, stream, next) => {
      const keep = (h.size ?? 0) < 1024 * 1024;
      const chunks: Buffer[] = [];
      stream.on('data', (c: unknown) => {
        if (keep) chunks.push(c as Buffer);
      });
      stream.on('end', () => {
        if (keep) out.set(h.name, Buffer.concat(chunks));
        next();
      });
    });
    extract.on('finish', resolve);
    extract.on('error', reject);
  });
  createReadStream(archive).pipe(extract);
  await done;
  return out;
}

interface Image {
  index: { manifests: { digest: string; annotations: Record<string, string>; platform: unknown }[] };
  manifest: { mediaType: string; config: { digest: string }; layers: { mediaType: string; digest: string }[] };
  config: {
    architecture: string;
    os: string;
    config: { User: string; Entrypoint: string[]; WorkingDir?: string; Labels?: Record<string, string> };
    rootfs: { diff_ids: string[] };
  };
}

async function readImage(archive: string): Promise<Image> {
  const e = await smallEntries(archive);
  const json = (name: string) => JSON.parse(e.get(name)!.toString('utf8'));
  const blob = (digest: string) => json(`blobs/sha256/${digest.replace('sha256:', '')}`);
  expect(json('oci-layout')).toEqual({ imageLayoutVersion: '1.0.0' });
  const index = json('index.json') as Image['index'];
  const manifest = blob(index.manifests[0]!.digest) as Image['manifest'];
  return { index, manifest, config: blob(manifest.config.digest) as Image['config'] };
}

describe('npm run images', () => {
  let out: string;
  let first: BuiltImages;
  let second: BuiltImages;
  let tag: string;

  beforeAll(async () => {
    out = await mkdtemp(join(tmpdir(), 'stratus-images-'));
    tag = await defaultTag();
    const log = (s: string) => console.error(`[images] ${s}`);
    first = await buildImages({ out: join(out, 'a'), log });
    second = await buildImages({ out: join(out, 'b'), log });
  }, BUILD_TIMEOUT);

  afterAll(async () => {
    if (out) await rm(out, { recursive: true, force: true });
  });

  it('building twice gives the same manifest digests', () => {
    for (const n of ['operator', 'agent', 'pause'] as const) {
      expect(second[n].digest).toBe(first[n].digest);
      expect(second[n].ref).toBe(first[n].ref);
    }
  });

  it.each(['operator', 'agent'] as const)('%s: reference, tag, entrypoint, user, labels', async (name) => {
    const def = IMAGES[name];
    const built = first[name];
    expect(built.ref).toBe(`stratus.local/${def.repository}:${tag}`);
    expect(built.archive).toBe(join(out, 'a', `${def.repository}-${tag}.oci.tar`));
    const img = await readImage(built.archive);
    expect(img.index.manifests).toHaveLength(1);
    expect(img.index.manifests[0]!.digest).toBe(built.digest);
    expect(img.index.manifests[0]!.annotations).toEqual({
      'io.containerd.image.name': built.ref,
      'org.opencontainers.image.ref.name': tag,
    });
    expect(img.manifest.mediaType).toBe(MEDIA.manifest);
    expect(img.manifest.layers.every((l) => l.mediaType === MEDIA.layerGzip)).toBe(true);
    expect(img.config.rootfs.diff_ids).toHaveLength(img.manifest.layers.length);
    expect(img.config.config.Entrypoint).toEqual([
      NODE_PATH,
      `${APP_DIR}/${name === 'agent' ? 'node-agent' : 'operator'}/src/main.ts`,
    ]);
    expect(img.config.config.User).toBe(name === 'operator' ? '65532:65532' : '0:0');
    expect(img.config.config.WorkingDir).toBe(APP_DIR);
    expect(img.config.config.Labels?.['org.opencontainers.image.version']).toBe(tag);
    expect(img.config.config.Labels?.['org.opencontainers.image.revision']).toMatch(/^[0-9a-f]{40}(-dirty)?$/);
    // both images share the node, dependencies and app layers (containerd stores them once)
  });

  it('operator and agent share the node, dependency and app layers', async () => {
    const op = await readImage(first.operator.archive);
    const ag = await readImage(first.agent.archive);
    expect(op.manifest.layers.slice(1)).toEqual(ag.manifest.layers.slice(1));
    expect(op.manifest.layers[0]!.digest).not.toBe(ag.manifest.layers[0]!.digest);
  });

  it('pause: the sandbox image of the test node', async () => {
    expect(first.pause.ref).toBe(PAUSE.ref);
    const img = await readImage(first.pause.archive);
    expect(img.config.config.Entrypoint).toEqual(['/pause']);
  });

  it('--tag names the references and the archives', async () => {
    const built = await buildImages({ out: join(out, 'c'), tag: 'test-tag.1', only: 'operator', log: () => {} });
    expect(built.agent).toBeUndefined();
    expect(built.operator!.ref).toBe('stratus.local/stratus-operator:test-tag.1');
    const img = await readImage(built.operator!.archive);
    expect(img.config.config.Labels?.['org.opencontainers.image.version']).toBe('test-tag.1');
    expect(built.operator!.digest).not.toBe(first.operator.digest);
  });

  it('umoci reads the layout and unpacks a runtime bundle with the same user and command', async () => {
    const layout = join(out, 'layout');
    await mkdir(layout);
    await execFileP('tar', ['-xf', first.operator.archive, '-C', layout]);
    const { stdout } = await execFileP('umoci', ['stat', '--json', '--image', `${layout}:${tag}`]);
    expect((JSON.parse(stdout) as { history: unknown[] }).history.length).toBe(4);
    const bundle = join(out, 'bundle');
    await execFileP('umoci', ['unpack', '--image', `${layout}:${tag}`, bundle], { maxBuffer: 64 * 1024 * 1024 });
    const spec = JSON.parse(await readFile(join(bundle, 'config.json'), 'utf8')) as {
      process: { user: { uid: number; gid: number }; args: string[]; cwd: string };
    };
    expect(spec.process.user).toMatchObject({ uid: 65532, gid: 65532 });
    expect(spec.process.args).toEqual([...IMAGES.operator.entrypoint]);
    expect(spec.process.cwd).toBe(APP_DIR);
    // no shell in the operator image, and the node binary and the app are where the entrypoint says
    await expect(readFile(join(bundle, 'rootfs', 'bin', 'sh'))).rejects.toThrow(/ENOENT/);
    await expect(
      readFile(join(bundle, 'rootfs', 'opt', 'stratus', 'operator', 'src', 'main.ts'), 'utf8'),
    ).resolves.toMatch(/stratus/i);
    const passwd = await readFile(join(bundle, 'rootfs', 'etc', 'passwd'), 'utf8');
    expect(passwd).toContain('nonroot:x:65532:65532:');
  }, 120_000);
});
