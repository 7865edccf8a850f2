// Configuration from command-line flags and environment variables, validated by a zod object schema.
// Each top-level key `fooBar` is read from `--foo-bar=value` (or `--foo-bar value`) and from `<PREFIX>FOO_BAR`;
// a flag wins over the environment, which wins over the schema default. Values are strings, coerced by the
// field's base type: number, boolean (true/false/1/0/yes/no/on/off), array (comma separated; a repeated flag adds
// to the list), object/record (JSON).
// Boolean flags also accept `--foo-bar` and `--no-foo-bar`.

import type * as z from 'zod';

export interface LoadConfigOptions {
  /** Defaults to process.argv.slice(2). */
  argv?: readonly string[];
  /** Defaults to process.env. */
  env?: Readonly<Record<string, string | undefined>>;
  /** Defaults to 'STRATUS_'. */
  envPrefix?: string;
  /** Ignore flags that match no schema key instead of failing (default false). */
  allowUnknownFlags?: boolean;
}

export class ConfigError extends Error {
  override name = 'ConfigError';
  readonly problems: string[];

  constructor(problems: string[]) {
    super(`invalid configuration:\n  ${problems.join('\n  ')}`);
    this.problems = problems;
  }
}

export function flagName(key: string): string {
  return `--${key.replace(/([a-z0-9])([A-Z])/g, '$1-$2').toLowerCase()}`;
}

export function envName(key: string, prefix = 'STRATUS_'): string {
  return `${prefix}${key.replace(/([a-z0-9])([A-Z])/g, '$1_$2').toUpperCase()}`;
}

type AnySchema = z.ZodType;
interface Def {
  type: string;
  innerType?: AnySchema;
  in?: AnySchema;
  element?: AnySchema;
}

function defOf(s: AnySchema): Def {
  return (s as unknown as { def: Def }).def;
}

/** The type that decides how a string is coerced, under optional/default/nullable wrappers and pipes. */
function baseType(s: AnySchema): { type: string; schema: AnySchema } {
  let cur = s;
  for (let i = 0; i < 20; i++) {
    const def = defOf(cur);
    if (def.innerType) cur = def.innerType;
    else if (def.type === 'pipe' && def.in) cur = def.in;
    else return { type: def.type, schema: cur };
  }
  return { type: 'unknown', schema: cur };
}

function coerce(raw: string, schema: AnySchema): unknown {
  const { type, schema: base } = baseType(schema);
  const v = raw.trim();
  switch (type) {
    case 'number': {
      const n = Number(v);
      return v !== '' && !Number.isNaN(n) ? n : raw;
    }
    case 'bigint':
      try {
        return BigInt(v);
      } catch {
        return raw;
      }
    case 'boolean': {
      const l = v.toLowerCase();
      if (['true', '1', 'yes', 'on'].includes(l)) return true;
      if (['false', '0', 'no', 'off'].includes(l)) return false;
      return raw;
    }
    case 'array': {
      const element = defOf(base).element;
      const parts = v === '' ? [] : v.split(',').map((p) => p.trim());
      return element ? parts.map((p) => coerce(p, element)) : parts;
    }
    case 'object':
    case 'record':
      try {
        return JSON.parse(v);
      } catch {
        return raw;
      }
    default:
      return raw;
  }
}

interface Source {
  kind: 'flag' | 'env';
  name: string;
  raw: string;
}

/** Parses argv and env into the schema's output type; throws ConfigError naming the flag/env var on problems. */
export function loadConfig<S extends z.ZodObject>(schema: S, opts: LoadConfigOptions = {}): z.output<S> {
  const argv = opts.argv ?? process.argv.slice(2);
  const env = opts.env ?? process.env;
  const prefix = opts.envPrefix ?? 'STRATUS_';
  const shape = schema.shape as Record<string, AnySchema>;
  const byFlag = new Map(Object.keys(shape).map((k) => [flagName(k), k]));
  const problems: string[] = [];
  const sources = new Map<string, Source>();

  for (const key of Object.keys(shape)) {
    const name = envName(key, prefix);
    const raw = env[name];
    if (raw !== undefined) sources.set(key, { kind: 'env', name, raw });
  }

  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--') break;
    if (!arg.startsWith('--')) {
      problems.push(`unexpected argument ${JSON.stringify(arg)} (flags are --name=value)`);
      continue;
    }
    const eq = arg.indexOf('=');
    const flag = eq >= 0 ? arg.slice(0, eq) : arg;
    let key = byFlag.get(flag);
    let raw: string | undefined = eq >= 0 ? arg.slice(eq + 1) : undefined;
    if (key === undefined && raw === undefined && flag.startsWith('--no-')) {
      const positive = byFlag.get(`--${flag.slice(5)}`);
      if (positive !== undefined && baseType(shape[positive]!).type === 'boolean') {
        key = positive;
        raw = 'false';
      }
    }
    if (key === undefined) {
      if (!opts.allowUnknownFlags) problems.push(`unknown flag ${flag}`);
      continue;
    }
    if (raw === undefined) {
      if (baseType(shape[key]!).type === 'boolean') raw = 'true';
      else if (i + 1 < argv.length && !argv[i + 1]!.startsWith('--')) raw = argv[++i]!;
      else {
        problems.push(`${flag}: missing value`);
        continue;
      }
    }
    // A list flag given more than once adds up (--x=a --x=b is --x=a,b); any other flag: the last one wins.
    const prev = sources.get(key);
    if (prev?.kind === 'flag' && baseType(shape[key]!).type === 'array') raw = `${prev.raw},${raw}`;
    sources.set(key, { kind: 'flag', name: flag, raw });
  }

  const input: Record<string, unknown> = {};
  for (const [key, src] of sources) input[key] = coerce(src.raw, shape[key]!);
  const result = schema.safeParse(input);
  if (!result.success) {
    for (const issue of result.error.issues) {
      const key = String(issue.path[0] ?? '');
      const src = sources.get(key);
      const sub = issue.path.length > 1 ? ` (at ${issue.path.slice(1).join('.')})` : '';
      if (!key) problems.push(issue.message);
      else if (src) problems.push(`${src.name}=${JSON.stringify(src.raw)}${sub}: ${issue.message}`);
      else problems.push(`${flagName(key)} / ${envName(key, prefix)}${sub}: ${issue.message}`);
    }
  }
  if (problems.length > 0) throw new ConfigError(problems);
  return (result as { data: z.output<S> }).data;
}

/** One line per key: flag, env var and description (from .describe()), for --help output. */
export function configUsage(schema: z.ZodObject, envPrefix = 'STRATUS_'): string {
  return Object.entries(schema.shape as Record<string, AnySchema>)
    .map(([key, s]) => `  ${flagName(key)}  (${envName(key, envPrefix)})  ${s.description ?? ''}`.trimEnd())
    .join('\n');
}
