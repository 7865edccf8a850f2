// npm run generate            writes crds/*.yaml, charts/stratus/crds/*.yaml (the same CRDs, for `helm install`)
//                             and docs/api.md from the zod schemas
// npm run generate -- --check exits 1 if any committed file differs from a fresh generation
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { generatedFiles } from '../operator/src/crdgen/index.ts';

/** The Helm chart's copy of the CRDs (Helm installs crds/ before the templates, and never upgrades them). */
const CHART_CRDS_DIR = 'charts/stratus/crds';

const root = resolve(import.meta.dirname, '..');
const check = process.argv.includes('--check');
const files = new Map(generatedFiles());
for (const [rel, content] of [...files]) {
  if (rel.startsWith('crds/')) files.set(`${CHART_CRDS_DIR}/${rel.slice('crds/'.length)}`, content);
}
const stale: string[] = [];

for (const [rel, content] of files) {
  const path = join(root, rel);
  const current = existsSync(path) ? readFileSync(path, 'utf8') : undefined;
  if (current === content) continue;
  stale.push(rel);
  if (!check) {
    mkdirSync(dirname(path), { recursive: true });
    writeFileSync(path, content);
  }
}
// CRDs of kinds that no longer exist.
for (const dir of ['crds', CHART_CRDS_DIR]) {
  if (!existsSync(join(root, dir))) continue;
  for (const f of readdirSync(join(root, dir), { withFileTypes: true })) {
    const rel = `${dir}/${f.name}`;
    if (f.isFile() && f.name.endsWith('.yaml') && !files.has(rel)) {
      stale.push(rel);
      if (!check) rmSync(join(root, rel));
    }
  }
}

if (check && stale.length > 0) {
  console.error(`generated files are stale, run \`npm run generate\`: ${stale.join(', ')}`);
  process.exit(1);
}
console.log(stale.length === 0 ? 'generated files are up to date' : `wrote ${stale.join(', ')}`);
