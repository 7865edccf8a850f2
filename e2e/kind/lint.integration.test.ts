// What cannot run here is at least checked statically: every shell script of the repository (scripts/*.sh,
// .ci/run, e2e/kind/run.sh, any other *.sh) passes shellcheck, and the GitHub Actions workflows pass actionlint
// (which also runs shellcheck on their `run:` steps). actionlint is built once from the Go module proxy, pinned, into
// the cache (${STRATUS_CACHE_DIR:-~/.cache/stratus}/tools/actionlint-<version>/); the actionlint part is skipped,
// saying so, only when Go is missing (scripts/setup.sh requires it for the control plane anyway).
import { execFile } from 'node:child_process';
import { existsSync, globSync, mkdirSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { parse, parseAllDocuments } from 'yaml';
import { cacheRoot, helmPath } from '../controlplane/build.ts';
import { requireTools, which } from '../testing/tools.ts';

const run = promisify(execFile);
const root = join(import.meta.dirname, '../..');
const ACTIONLINT_VERSION = 'v1.7.12';

function shellScripts(): string[] {
  const found = globSync(['**/*.sh', '.ci/run'], {
    cwd: root,
    exclude: (p) => p === 'node_modules' || p === '.git' || p.startsWith('.cluster') || p.startsWith('.images'),
  });
  return [...new Set(found)].sort();
}

/** The cached actionlint binary, built with `go install` on first use; undefined without Go. */
async function actionlint(): Promise<string | undefined> {
  const dir = join(cacheRoot(), 'tools', `actionlint-${ACTIONLINT_VERSION}`);
  const bin = join(dir, 'actionlint');
  if (existsSync(bin)) return bin;
  const go = which('go') ?? (existsSync('/usr/local/go/bin/go') ? '/usr/local/go/bin/go' : undefined);
  if (!go) return undefined;
  const tmp = `${dir}.tmp-${process.pid}`;
  mkdirSync(tmp, { recursive: true });
  await run(go, ['install', `github.com/rhysd/actionlint/cmd/actionlint@${ACTIONLINT_VERSION}`], {
    env: { ...process.env, GOBIN: tmp, GOFLAGS: '-mod=mod', CGO_ENABLED: '0' },
    maxBuffer: 16 << 20,
  });
  mkdirSync(dir, { recursive: true });
  renameSync(join(tmp, 'actionlint'), bin);
  rmSync(tmp, { recursive: true, force: true });
  return bin;
}

describe('static checks of what runs elsewhere', () => {
  it('every shell script passes shellcheck', async () => {
    requireTools('shellcheck');
    const scripts = shellScripts();
    expect(scripts).toEqual(expect.arrayContaining(['scripts/setup.sh', '.ci/run', 'e2e/kind/run.sh']));
    const r = await run('shellcheck', ['--format=gcc', ...scripts], { cwd: root }).catch(
      (e: { stdout?: string; code?: number }) => ({ stdout: e.stdout ?? String(e), code: e.code }),
    );
    expect(r.stdout).toBe('');
  });

  it('the GitHub Actions workflows pass actionlint', async (ctx) => {
    const bin = await actionlint();
    if (!bin) {
      ctx.skip(
        `Go not found: cannot build actionlint ${ACTIONLINT_VERSION} (install Go >= 1.24, as npm run setup asks)`,
      );
      return;
    }
    const workflows = globSync('.github/workflows/*.{yml,yaml}', { cwd: root }).sort();
    expect(workflows).toContain('.github/workflows/kind.yml');
    const r = await run(bin, ['-no-color', ...workflows], { cwd: root }).catch(
      (e: { stdout?: string; stderr?: string }) => ({ stdout: `${e.stdout ?? ''}${e.stderr ?? String(e)}` }),
    );
    expect(r.stdout).toBe('');
  });

  it('run.sh makes a kind cluster whose worker carries the label the kind values select for the agent', async () => {
    const { stdout } = await run('bash', ['e2e/kind/run.sh', '--print-kind-config'], { cwd: root });
    const cfg = parse(stdout) as { apiVersion: string; kind: string; nodes: { role: string; labels?: object }[] };
    expect(cfg).toMatchObject({ apiVersion: 'kind.x-k8s.io/v1alpha4', kind: 'Cluster' });
    expect(cfg.nodes.map((n) => n.role)).toEqual(['control-plane', 'worker']);
    const values = parse(readFileSync(join(root, 'e2e/kind/values.yaml'), 'utf8')) as {
      agent: { nodeSelector: Record<string, string> };
    };
    expect(cfg.nodes[1]!.labels).toEqual(values.agent.nodeSelector);
  });

  it('the chart renders with the kind values: agent and operator images from the loaded archives, never pulled', async (ctx) => {
    if (!existsSync(join(root, 'charts/stratus/Chart.yaml'))) {
      ctx.skip('charts/stratus is not in this tree yet (the chart slice adds it)');
      return;
    }
    const { stdout } = await run(
      helmPath(),
      [
        'template',
        'stratus',
        'charts/stratus',
        '--namespace',
        'stratus-system',
        '-f',
        'e2e/kind/values.yaml',
        '--set',
        'image.tag=9.9.9',
      ],
      { cwd: root, maxBuffer: 64 << 20 },
    );
    type Pod = { nodeSelector?: Record<string, string>; containers: { image: string; imagePullPolicy?: string }[] };
    const objs = parseAllDocuments(stdout).map(
      (d) => d.toJS() as { kind?: string; spec?: { template?: { spec?: Pod } } },
    );
    const ds = objs.find((o) => o?.kind === 'DaemonSet')?.spec?.template?.spec;
    const deploy = objs.find((o) => o?.kind === 'Deployment')?.spec?.template?.spec;
    expect(ds?.nodeSelector).toMatchObject({ 'stratus.io/hypervisor': 'true' });
    expect(ds?.containers[0]).toMatchObject({ image: 'stratus.local/stratus-agent:9.9.9', imagePullPolicy: 'Never' });
    expect(deploy?.containers[0]).toMatchObject({
      image: 'stratus.local/stratus-operator:9.9.9',
      imagePullPolicy: 'Never',
    });
  });
});
