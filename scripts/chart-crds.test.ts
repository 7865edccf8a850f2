// The chart's crds/ is the generated crds/, file for file (npm run generate writes both; helm installs the chart's).
import { readdirSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

const root = resolve(import.meta.dirname, '..');
const yamls = (dir: string) =>
  readdirSync(resolve(root, dir))
    .filter((f) => f.endsWith('.yaml'))
    .sort();

describe('charts/stratus/crds', () => {
  it('holds exactly the generated CRDs of crds/', () => {
    const want = yamls('crds');
    expect(want.length).toBeGreaterThan(0);
    expect(yamls('charts/stratus/crds')).toEqual(want);
    for (const f of want) {
      expect(readFileSync(resolve(root, 'charts/stratus/crds', f), 'utf8'), f).toBe(
        readFileSync(resolve(root, 'crds', f), 'utf8'),
      );
    }
  });
});
