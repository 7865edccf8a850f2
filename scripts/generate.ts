// npm run generate            writes crds/*.yaml and docs/api.md from the zod schemas
// npm run generate -- --check exits 1 if any committed file differs from a fresh generation
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { generatedFiles } from '../operator/src/crdgen/index.ts';

const root = resolve(import.meta.dirname, '..');
const check = process.argv.includes('--check');
const files = generatedFiles();
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
for (const f of readdirSync(join(root, 'crds'), { withFileTypes: true })) {
  const rel = `crds/${f.name}`;
  if (f.isFile() && f.name.endsWith('.yaml') && !files.has(rel)) {
    stale.push(rel);
    if (!check) rmSync(join(root, rel));
  }
}

if (check && stale.length > 0) {
  console.error(`generated files are stale, run \`npm run generate\`: ${stale.join(', ')}`);
  process.exit(1);
}
console.log(stale.length === 0 ? 'generated files are up to date' : `wrote ${stale.join(', ')}`);
