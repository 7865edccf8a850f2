// examples/gitops/: well-formed YAML with the apiVersion and kind Argo CD and Flux expect, pointing at the paths of
// this repository (the Argo CD and Flux CRDs are not in the test cluster, so they are not applied anywhere here).
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parseAllDocuments } from 'yaml';

const root = join(import.meta.dirname, '../..');
// biome-ignore lint/suspicious/noExplicitAny: parsed YAML, its shape is what the tests check
type Doc = { apiVersion?: string; kind?: string; metadata?: { name?: string; namespace?: string }; spec?: any };

function docs(file: string): Doc[] {
  const all = parseAllDocuments(readFileSync(join(root, 'examples/gitops', file), 'utf8'));
  for (const d of all) expect(d.errors, `${file}: ${d.errors.join('; ')}`).toEqual([]);
  return all.map((d) => d.toJS() as Doc);
}

describe('examples/gitops', () => {
  it('holds the Argo CD Applications and the Flux manifests', () => {
    expect(readdirSync(join(root, 'examples/gitops')).sort()).toEqual([
      'argocd-application-chart.yaml',
      'argocd-application.yaml',
      'flux.yaml',
    ]);
  });

  it('argocd-application.yaml: an Application syncing the top level of examples/ into demo', () => {
    const [app, ...rest] = docs('argocd-application.yaml');
    expect(rest).toEqual([]);
    expect(app).toMatchObject({
      apiVersion: 'argoproj.io/v1alpha1',
      kind: 'Application',
      metadata: { name: 'stratus-demo', namespace: 'argocd' },
      spec: {
        source: { path: 'examples', directory: { recurse: false } },
        destination: { namespace: 'demo' },
        syncPolicy: { automated: { prune: true, selfHeal: true } },
      },
    });
    expect(app!.spec.syncPolicy.syncOptions).toEqual(
      expect.arrayContaining(['CreateNamespace=true', 'ServerSideApply=true']),
    );
    expect(app!.spec.source.repoURL).toMatch(/^https:\/\//);
  });

  it('argocd-application-chart.yaml: an Application of the chart (Helm source)', () => {
    const [app] = docs('argocd-application-chart.yaml');
    expect(app).toMatchObject({
      apiVersion: 'argoproj.io/v1alpha1',
      kind: 'Application',
      spec: { source: { path: 'charts/stratus', helm: { releaseName: 'stratus' } } },
    });
  });

  it('flux.yaml: Namespace, GitRepository, HelmRelease and Kustomization of ./examples', () => {
    const all = docs('flux.yaml');
    expect(all.map((d) => `${d.apiVersion} ${d.kind}`)).toEqual([
      'v1 Namespace',
      'source.toolkit.fluxcd.io/v1 GitRepository',
      'helm.toolkit.fluxcd.io/v2 HelmRelease',
      'kustomize.toolkit.fluxcd.io/v1 Kustomization',
    ]);
    const [ns, repo, release, kustomization] = all;
    expect(ns!.metadata?.name).toBe('demo');
    expect(repo!.spec.url).toMatch(/^https:\/\//);
    // Flux applies every manifest under the path: examples/gitops/ (these files) must stay out of the artifact.
    expect(repo!.spec.ignore.split('\n')).toEqual(
      expect.arrayContaining(['/*', '!/charts/', '!/examples/', '/examples/gitops/']),
    );
    const source = { kind: 'GitRepository', name: repo!.metadata?.name };
    expect(release!.spec.chart.spec).toMatchObject({ chart: './charts/stratus', sourceRef: source });
    expect(kustomization!.spec).toMatchObject({ path: './examples', prune: true, sourceRef: source });
  });

  it('what the Application and the Kustomization deploy: only Stratus objects in the top level of examples/', () => {
    const files = readdirSync(join(root, 'examples')).filter((f) => f.endsWith('.yaml'));
    expect(files.length).toBeGreaterThan(5);
    for (const f of files) {
      for (const d of parseAllDocuments(readFileSync(join(root, 'examples', f), 'utf8'))) {
        const o = d.toJS() as Doc | null;
        if (!o) continue;
        expect(o.apiVersion, f).toMatch(/\.stratus\.io\/v1alpha1$/);
      }
    }
  });
});
