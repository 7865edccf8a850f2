// vitest setupFile of the unit project: the unit tier is pure logic and runs no external binaries (ssh-keygen, QEMU,
// qemu-img, genisoimage, ip, nft...). Every way node:child_process starts a process throws in the test worker, so a
// test that needs a tool fails here with a pointer to the integration tier instead of depending on the host.
//
// This runs in vitest's test worker only; vitest's own processes (the main process that forks workers) are unaffected.
// The builtin module object is patched and syncBuiltinESMExports() updates the ESM named exports, so both
// `import { execFile } from 'node:child_process'` and `import cp from 'node:child_process'` see the guard.
import childProcess from 'node:child_process';
import { syncBuiltinESMExports } from 'node:module';

export const NO_BINARIES_MESSAGE =
  'unit tests run no external binaries: move this test to the integration tier (node-agent/test/integration or operator/test/integration)';

const GUARDED = ['spawn', 'spawnSync', 'exec', 'execSync', 'execFile', 'execFileSync', 'fork'] as const;

for (const name of GUARDED) {
  const refuse = (file?: unknown) => {
    throw new Error(`${NO_BINARIES_MESSAGE} (child_process.${name} ${JSON.stringify(file)})`);
  };
  Object.defineProperty(childProcess, name, { value: refuse, writable: true, configurable: true, enumerable: true });
}
syncBuiltinESMExports();
