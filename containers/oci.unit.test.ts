// The OCI writer's determinism and shapes, pure: same entries → same tar bytes and digests, whatever the input order;
// config, manifest and index carry the fields the OCI image spec requires.
import { link, mkdir, mkdtemp, readFile, rm, symlink, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  canonicalJson,
  imageConfig,
  imageIndex,
  imageManifest,
  type LayerEntry,
  MEDIA,
  readTar,
  sha256,
  sortEntries,
  tarBytes,
  walkTree,
  writeLayer,
  writeOciArchive,
} from './oci.ts';

const file = (path: string, text: string, mtime = 100): LayerEntry => ({
  path,
  type: 'file',
  mode: 0o644,
  uid: 0,
  gid: 0,
  mtime,
  data: Buffer.from(text),
});
const dir = (path: string): LayerEntry => ({ path, type: 'directory', mode: 0o755, uid: 0, gid: 0, mtime: 100 });

let tmp: string;
beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'stratus-oci-'));
});
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

describe('layer tar', () => {
  const entries = [file('opt/b.txt', 'b'), dir('opt'), file('opt/a.txt', 'a'), dir('opt/a'), file('opt/a/z', 'z')];

  it('orders entries by path bytes, parents first, whatever the input order', async () => {
    expect(sortEntries(entries).map((e) => e.path)).toEqual(['opt', 'opt/a', 'opt/a.txt', 'opt/a/z', 'opt/b.txt']);
    const a = await tarBytes(entries);
    const b = await tarBytes([...entries].reverse());
    expect(a.equals(b)).toBe(true);
    const names = [...(await readTar(a)).keys()];
    expect(names).toEqual(['opt', 'opt/a', 'opt/a.txt', 'opt/a/z', 'opt/b.txt']);
  });

  it('refuses duplicate, absolute and escaping paths', () => {
    expect(() => sortEntries([file('a', '1'), file('a', '2')])).toThrow(/duplicate/);
    expect(() => sortEntries([file('/etc/passwd', '')])).toThrow(/invalid/);
    expect(() => sortEntries([file('a/../../x', '')])).toThrow(/invalid/);
  });

  it('keeps numeric owners and modes, writes no user names, long names through PAX', async () => {
    const long = `opt/${'d'.repeat(150)}/${'f'.repeat(120)}`;
    const bytes = await tarBytes([{ ...file('x', 'x'), uid: 65532, gid: 65532, mode: 0o4755 }, file(long, 'l')]);
    const t = await readTar(bytes);
    const x = t.get('x')!.header;
    expect([x.uid, x.gid, x.mode, x.uname, x.gname]).toEqual([65532, 65532, 0o4755, '', '']);
    expect(t.get(long)!.data.toString()).toBe('l');
  });

  it('gzipped layer: same entries → same blob digest, diffId = sha256 of the uncompressed tar', async () => {
    const l1 = await writeLayer(entries, join(tmp, 'l1.tgz'));
    const l2 = await writeLayer([...entries].reverse(), join(tmp, 'l2.tgz'));
    expect(l1).toEqual(l2);
    const gz = await readFile(join(tmp, 'l1.tgz'));
    expect(sha256(gz)).toBe(l1.digest);
    expect(gz.length).toBe(l1.size);
    expect(sha256(gunzipSync(gz))).toBe(l1.diffId);
    // gzip header: no file name, mtime 0
    expect(gz.readUInt32LE(4)).toBe(0);
    expect(gz[3]! & 0x08).toBe(0);
    const l3 = await writeLayer([...entries, file('opt/c', 'c')], join(tmp, 'l3.tgz'));
    expect(l3.digest).not.toBe(l1.digest);
  });
});

describe('walkTree', () => {
  it('clamps mtimes, forces owners, records symlinks and hard links, sorted', async () => {
    const root = join(tmp, 'tree');
    await mkdir(join(root, 'sub'), { recursive: true });
    await writeFile(join(root, 'sub', 'f'), 'data');
    await link(join(root, 'sub', 'f'), join(root, 'sub', 'g'));
    await symlink('sub/f', join(root, 'l'));
    await utimes(join(root, 'sub', 'f'), 50, 50);
    const e = await walkTree(root, { clamp: 1000, prefix: 'opt/app', owner: { uid: 0, gid: 0 } });
    expect(e.map((x) => [x.path, x.type, x.linkname])).toEqual([
      ['opt/app', 'directory', undefined],
      ['opt/app/l', 'symlink', 'sub/f'],
      ['opt/app/sub', 'directory', undefined],
      ['opt/app/sub/f', 'file', undefined],
      ['opt/app/sub/g', 'link', 'opt/app/sub/f'],
    ]);
    expect(e.find((x) => x.path === 'opt/app/sub/f')!.mtime).toBe(50);
    expect(e.find((x) => x.path === 'opt/app/sub')!.mtime).toBe(1000);
    expect(e.every((x) => x.uid === 0 && x.gid === 0)).toBe(true);
    // the same tree walked twice gives the same tar
    const again = await walkTree(root, { clamp: 1000, prefix: 'opt/app', owner: { uid: 0, gid: 0 } });
    expect((await tarBytes(e)).equals(await tarBytes(again))).toBe(true);
  });
});

describe('config, manifest, index', () => {
  const config = imageConfig({
    created: 1_700_000_000,
    user: '65532:65532',
    entrypoint: ['/usr/local/bin/node', '/opt/stratus/operator/src/main.ts'],
    env: ['PATH=/usr/bin'],
    workingDir: '/opt/stratus',
    labels: { 'org.opencontainers.image.version': '0.2.0' },
    diffIds: ['sha256:aa', 'sha256:bb'],
  });

  it('config has the required OCI fields', () => {
    expect(config).toMatchObject({
      architecture: 'amd64',
      os: 'linux',
      created: '2023-11-14T22:13:20.000Z',
      rootfs: { type: 'layers', diff_ids: ['sha256:aa', 'sha256:bb'] },
      config: {
        User: '65532:65532',
        Entrypoint: ['/usr/local/bin/node', '/opt/stratus/operator/src/main.ts'],
        WorkingDir: '/opt/stratus',
        Labels: { 'org.opencontainers.image.version': '0.2.0' },
      },
    });
    expect((config.history as unknown[]).length).toBe(2);
  });

  it('canonical JSON: key order does not change the bytes', () => {
    expect(canonicalJson({ b: 1, a: { d: 2, c: [3, { f: 1, e: 2 }] } })).toBe(
      '{"a":{"c":[3,{"e":2,"f":1}],"d":2},"b":1}',
    );
  });

  it('manifest and index reference blobs by digest and name the image for containerd', () => {
    const cfg = Buffer.from(canonicalJson(config));
    const cd = { mediaType: MEDIA.config, digest: sha256(cfg), size: cfg.length };
    const m = imageManifest(cd, [{ mediaType: MEDIA.layerGzip, digest: 'sha256:cc', size: 3 }]);
    expect(m).toEqual({
      schemaVersion: 2,
      mediaType: MEDIA.manifest,
      config: cd,
      layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: 'sha256:cc', size: 3 }],
    });
    const mb = Buffer.from(canonicalJson(m));
    const idx = imageIndex({ mediaType: MEDIA.manifest, digest: sha256(mb), size: mb.length }, 'stratus.local/x:0.2.0');
    expect(idx).toEqual({
      schemaVersion: 2,
      mediaType: MEDIA.index,
      manifests: [
        {
          mediaType: MEDIA.manifest,
          digest: sha256(mb),
          size: mb.length,
          platform: { architecture: 'amd64', os: 'linux' },
          annotations: {
            'io.containerd.image.name': 'stratus.local/x:0.2.0',
            'org.opencontainers.image.ref.name': '0.2.0',
          },
        },
      ],
    });
  });

  it('image layout archive: oci-layout, index.json, every blob once under its digest, same bytes twice', async () => {
    const blobA = Buffer.from('{"a":1}');
    const lay = await writeLayer([file('x', 'x')], join(tmp, 'lay.tgz'));
    const idx = imageIndex({ mediaType: MEDIA.manifest, digest: sha256(blobA), size: blobA.length }, 'r.local/a:1');
    const blobs = [
      { digest: sha256(blobA), data: blobA },
      { digest: lay.digest, file: join(tmp, 'lay.tgz') },
      { digest: sha256(blobA), data: blobA },
    ];
    await writeOciArchive(join(tmp, 'a1.tar'), idx, blobs, 5);
    await writeOciArchive(join(tmp, 'a2.tar'), idx, [...blobs].reverse(), 5);
    const a1 = await readFile(join(tmp, 'a1.tar'));
    expect(a1.equals(await readFile(join(tmp, 'a2.tar')))).toBe(true);
    const t = await readTar(a1);
    expect([...t.keys()]).toEqual(
      [
        'blobs',
        'blobs/sha256',
        `blobs/sha256/${sha256(blobA).slice(7)}`,
        `blobs/sha256/${lay.digest.slice(7)}`,
        'index.json',
        'oci-layout',
      ].sort(),
    );
    expect(JSON.parse(t.get('oci-layout')!.data.toString())).toEqual({ imageLayoutVersion: '1.0.0' });
    expect(JSON.parse(t.get('index.json')!.data.toString())).toEqual(idx);
    expect(sha256(t.get(`blobs/sha256/${lay.digest.slice(7)}`)!.data)).toBe(lay.digest);
  });
});
