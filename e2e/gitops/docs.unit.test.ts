// docs/gitops.md and docs/gitops/argocd-cm.yaml carry the health checks of docs/gitops/health/*.lua verbatim
// (node e2e/gitops/render.ts writes them): a stale copy fails here.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { CONFIGMAP, DOC, HEALTH_CHECKS, rendered, root } from './render.ts';

const read = (rel: string) => readFileSync(join(root, rel), 'utf8');

describe('docs/gitops health checks', () => {
  it('docs/gitops.md and argocd-cm.yaml are what render.ts makes of the .lua files', () => {
    for (const f of rendered()) {
      expect(read(f.path), `${f.path} is stale: run node e2e/gitops/render.ts`).toBe(f.content);
    }
  });

  it('argocd-cm.yaml holds each script exactly, under resource.customizations.health.<group>_<Kind>', () => {
    const data = (parse(read(CONFIGMAP)) as { data: Record<string, string> }).data;
    expect(Object.keys(data).sort()).toEqual(HEALTH_CHECKS.map((c) => c.key).sort());
    for (const c of HEALTH_CHECKS) expect(data[c.key]).toBe(read(c.script));
    expect(Object.keys(data)).toContain('resource.customizations.health.compute.stratus.io_Server');
  });

  it('the doc shows every script in a lua block', () => {
    const doc = read(DOC);
    for (const c of HEALTH_CHECKS) expect(doc).toContain(`\`\`\`lua\n${read(c.script)}\`\`\``);
  });
});
