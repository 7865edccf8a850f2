// Runs the Argo CD health checks of docs/gitops/health/*.lua with a real Lua interpreter (Debian's lua5.4), the way
// Argo CD runs them: the object as the global `obj`, the script's returned table as the health.
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';

export const LUA = 'lua5.4';
export const HEALTH_DIR = join(import.meta.dirname, '../../docs/gitops/health');

export interface Health {
  status: string;
  message: string;
}

/** A JSON value as a Lua expression (objects as tables with string keys, arrays as sequences, null as nil). */
export function toLua(v: unknown): string {
  if (v === null || v === undefined) return 'nil';
  if (typeof v === 'boolean' || typeof v === 'number') return String(v);
  if (typeof v === 'string') {
    // Byte-wise decimal escapes for everything outside printable ASCII, and for quote and backslash; always three
    // digits, so a digit after the escape is not read as part of it ("\\0349" would be one escape).
    let out = '"';
    for (const b of Buffer.from(v, 'utf8')) {
      out +=
        b >= 0x20 && b < 0x7f && b !== 0x22 && b !== 0x5c ? String.fromCharCode(b) : `\\${String(b).padStart(3, '0')}`;
    }
    return `${out}"`;
  }
  if (Array.isArray(v)) return `{${v.map(toLua).join(', ')}}`;
  const fields = Object.entries(v as Record<string, unknown>)
    .filter(([, x]) => x !== undefined && x !== null)
    .map(([k, x]) => `[${toLua(k)}] = ${toLua(x)}`);
  return `{${fields.join(', ')}}`;
}

/** Runs one health script (e.g. 'server.lua') on each object, one interpreter for all, and returns hs per object. */
export async function health(script: string, objects: readonly unknown[]): Promise<Health[]> {
  const body = readFileSync(join(HEALTH_DIR, script), 'utf8');
  const program = [
    `local cases = {${objects.map(toLua).join(',\n')}}`,
    'local function check()',
    body,
    'end',
    'for _, o in ipairs(cases) do',
    '  obj = o',
    '  hs = nil',
    '  local h = check()',
    '  io.write(tostring(h.status), "\\t", (tostring(h.message or "")):gsub("[\\t\\n]", " "), "\\n")',
    'end',
  ].join('\n');
  const { stdout } = await promisify(execFile)(LUA, ['-e', program], { maxBuffer: 16 << 20 });
  return stdout
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => {
      const [status = '', message = ''] = l.split('\t');
      return { status, message };
    });
}

/** The health script of a kind: server.lua for Server. */
export const scriptOf = (kind: string) => `${kind.toLowerCase()}.lua`;
