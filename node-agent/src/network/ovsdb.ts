// A thin wrapper around ovs-vsctl for the OVS network backend: every command through an Exec (so it works inside a
// simulated node's netns), an optional OVSDB target (--db=unix:/path/db.sock; default the system database), and
// JSON output (--format=json) decoded into plain objects. The decoding is pure and unit-tested.
//
// OVSDB JSON datum encoding (RFC 7047 §5.1): an atom is a JSON string/number/boolean, ["uuid", "<uuid>"] a
// reference, ["set", [atoms]] a set (a one-element set may also be the bare atom, the empty set is
// ["set", []]), ["map", [[key, value], ...]] a map.
import type { Exec } from './exec.ts';

export type OvsAtom = string | number | boolean;
/** A decoded OVSDB datum: atom, set (array) or map (string keys). */
export type OvsDatum = OvsAtom | OvsAtom[] | Record<string, OvsAtom>;
export type OvsRow = Record<string, OvsDatum>;

function decodeAtom(a: unknown): OvsAtom {
  if (Array.isArray(a) && (a[0] === 'uuid' || a[0] === 'named-uuid') && typeof a[1] === 'string') return a[1];
  if (typeof a === 'string' || typeof a === 'number' || typeof a === 'boolean') return a;
  throw new Error(`unexpected OVSDB atom ${JSON.stringify(a)}`);
}

/** Decodes one OVSDB JSON datum. */
export function decodeDatum(d: unknown): OvsDatum {
  if (Array.isArray(d) && d[0] === 'set' && Array.isArray(d[1])) return (d[1] as unknown[]).map(decodeAtom);
  if (Array.isArray(d) && d[0] === 'map' && Array.isArray(d[1])) {
    const out: Record<string, OvsAtom> = {};
    for (const kv of d[1] as unknown[]) {
      if (!Array.isArray(kv) || kv.length !== 2) throw new Error(`unexpected OVSDB map entry ${JSON.stringify(kv)}`);
      out[String(decodeAtom(kv[0]))] = decodeAtom(kv[1]);
    }
    return out;
  }
  return decodeAtom(d);
}

/**
 * Parses the output of `ovs-vsctl --format=json list T1 -- list T2 ...`: one JSON table per line
 * ({"data": [[...], ...], "headings": [...]}), decoded into one row array per listed table.
 */
export function parseListOutput(stdout: string): OvsRow[][] {
  return stdout
    .split('\n')
    .map((l) => l.trim())
    .filter(Boolean)
    .map((line) => {
      const t = JSON.parse(line) as { data?: unknown[][]; headings?: string[] };
      if (!Array.isArray(t.data) || !Array.isArray(t.headings)) throw new Error(`unexpected ovs-vsctl output: ${line}`);
      const headings = t.headings;
      return t.data.map((row) => Object.fromEntries(headings.map((h, i) => [h, decodeDatum(row[i])])));
    });
}

/** A string-keyed map column (external_ids, options, other_config, status); {} when absent. */
export function mapCol(row: OvsRow, col: string): Record<string, string> {
  const v = row[col];
  if (v === undefined || Array.isArray(v) || typeof v !== 'object') return {};
  return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, String(x)]));
}

/** A set column as an array (a bare atom is a one-element set). */
export function setCol(row: OvsRow, col: string): OvsAtom[] {
  const v = row[col];
  if (v === undefined) return [];
  if (Array.isArray(v)) return v;
  if (typeof v === 'object') return [];
  return [v];
}

/** An optional integer column (e.g. Port.tag, Interface.ofport): undefined when the set is empty. */
export function optInt(row: OvsRow, col: string): number | undefined {
  const [v] = setCol(row, col);
  return typeof v === 'number' ? v : undefined;
}

/** An optional string column (e.g. Interface.error, Bridge.fail_mode): undefined when the set is empty. */
export function optStr(row: OvsRow, col: string): string | undefined {
  const [v] = setCol(row, col);
  return v === undefined ? undefined : String(v);
}

/**
 * Quotes a value for ovs-vsctl's `set` argument syntax (column:key=value): bare when it is a simple token, else a
 * JSON-style double-quoted string (ovs-vsctl parses both).
 */
export function vsctlValue(v: string): string {
  return /^[A-Za-z0-9_.:/-]+$/.test(v) && !/^-?\d/.test(v) ? v : JSON.stringify(v);
}

export interface OvsVsctlOptions {
  exec: Exec;
  /** ovs-vsctl --db target (e.g. unix:/run/node1/db.sock); undefined: the system database. */
  db?: string;
  /** ovs-vsctl --timeout in seconds (also bounds waiting for ovs-vswitchd to apply a change). Default 30. */
  timeoutS?: number;
}

/** ovs-vsctl through an Exec. */
export class OvsVsctl {
  readonly exec: Exec;
  readonly db: string | undefined;
  readonly timeoutS: number;

  constructor(opts: OvsVsctlOptions) {
    this.exec = opts.exec;
    this.db = opts.db;
    this.timeoutS = opts.timeoutS ?? 30;
  }

  /** The global options every invocation starts with. */
  globalArgs(): string[] {
    return [...(this.db ? [`--db=${this.db}`] : []), `--timeout=${this.timeoutS}`];
  }

  /** The arguments of one ovs-vsctl transaction made of `commands` (joined with `--`). */
  args(commands: readonly (readonly string[])[]): string[] {
    const out = this.globalArgs();
    commands.forEach((c, i) => {
      if (i > 0) out.push('--');
      out.push(...c);
    });
    return out;
  }

  /** Runs one transaction. */
  async run(commands: readonly (readonly string[])[]): Promise<string> {
    const { stdout } = await this.exec.run('ovs-vsctl', this.args(commands), { timeoutMs: (this.timeoutS + 5) * 1000 });
    return stdout;
  }

  /** Lists several tables in one read (one consistent snapshot). */
  async list(tables: readonly { table: string; columns: readonly string[] }[]): Promise<OvsRow[][]> {
    const cmds = tables.map((t) => [`--columns=${t.columns.join(',')}`, 'list', t.table]);
    const { stdout } = await this.exec.run('ovs-vsctl', [...this.globalArgs(), '--format=json', ...joinCmds(cmds)], {
      timeoutMs: (this.timeoutS + 5) * 1000,
    });
    const out = parseListOutput(stdout);
    if (out.length !== tables.length)
      throw new Error(`ovs-vsctl list: expected ${tables.length} tables, got ${out.length}`);
    return out;
  }
}

function joinCmds(cmds: readonly (readonly string[])[]): string[] {
  return cmds.flatMap((c, i) => (i > 0 ? ['--', ...c] : [...c]));
}
