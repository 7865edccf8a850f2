// Deterministic crash points for the crash-safety tests (e2e/tests/volumes-crash.test.ts). Inert unless the process
// was started with STRATUS_CRASH_AT=<name> (or <name>@<n>: at the n-th time that point is reached): read once, at
// start. When a point of that name is reached, the process SIGKILLs itself at once (no cleanup, no flushing, as a
// power cut or the OOM killer would), so a test can prove that a restart converges from exactly that line.

const [crashName, crashNth] = parseCrashAt(process.env.STRATUS_CRASH_AT);
let crashHits = 0;

/** `<name>` or `<name>@<n>` → [name, n]; [undefined, 0] when unset or malformed. */
export function parseCrashAt(raw: string | undefined): [string | undefined, number] {
  if (!raw) return [undefined, 0];
  const m = /^([^@]+)(?:@([1-9]\d*))?$/.exec(raw.trim());
  return m ? [m[1], m[2] ? Number(m[2]) : 1] : [undefined, 0];
}

/** A named crash point: SIGKILLs this process when STRATUS_CRASH_AT names it (test-only; a no-op otherwise). */
export function crashPoint(name: string): void {
  if (crashName === undefined || name !== crashName || ++crashHits < crashNth) return;
  process.stderr.write(`crash point ${name}: SIGKILL\n`);
  process.kill(process.pid, 'SIGKILL');
}
