// The image tag is the chart's appVersion (charts/stratus/Chart.yaml), package.json's version until the chart exists.
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { defaultTag } from './build.ts';

describe('defaultTag', () => {
  let dir: string | undefined;
  afterEach(async () => {
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it("takes the chart's appVersion, else package.json's version", async () => {
    dir = await mkdtemp(join(tmpdir(), 'stratus-tag-'));
    await writeFile(join(dir, 'package.json'), JSON.stringify({ name: 'x', version: '0.1.0' }));
    expect(await defaultTag(dir)).toBe('0.1.0');
    await mkdir(join(dir, 'charts', 'stratus'), { recursive: true });
    await writeFile(
      join(dir, 'charts', 'stratus', 'Chart.yaml'),
      'apiVersion: v2\nname: stratus\nversion: 0.2.1\nappVersion: "0.2.0"\n',
    );
    expect(await defaultTag(dir)).toBe('0.2.0');
  });
});
