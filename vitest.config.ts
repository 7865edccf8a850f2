import { defineConfig } from 'vitest/config';

// Three tiers, run one at a time by `npm test` (see README):
//  unit         pure logic, no external binaries (enforced by e2e/testing/unit-setup.ts), no network
//  integration  a real kube-apiserver + etcd (started once per run by the global setup), operator in-process, and
//               the tests that run host tools (qemu-img, genisoimage, ssh-keygen, QEMU): a missing tool fails them
//  e2e          operator and node-agent processes, real QEMU guests and kernel networking (root)
export default defineConfig({
  test: {
    projects: [
      {
        test: {
          name: 'unit',
          include: [
            'operator/src/**/*.test.ts',
            'node-agent/src/**/*.test.ts',
            'scripts/**/*.test.ts',
            'e2e/**/*.unit.test.ts',
            'containers/**/*.unit.test.ts',
          ],
          // Makes node:child_process throw in the test worker: the unit tier runs no external binaries.
          setupFiles: ['e2e/testing/unit-setup.ts'],
          testTimeout: 20_000,
        },
      },
      {
        test: {
          name: 'integration',
          include: [
            'operator/test/integration/**/*.test.ts',
            'node-agent/test/integration/**/*.test.ts',
            'e2e/**/*.integration.test.ts',
            'containers/**/*.integration.test.ts',
          ],
          globalSetup: ['e2e/controlplane/vitest-setup.ts'],
          testTimeout: 180_000,
          hookTimeout: 600_000,
          // Test files share one API server; each uses its own namespaces and names.
          fileParallelism: false,
        },
      },
      {
        test: {
          name: 'e2e',
          include: ['e2e/tests/**/*.test.ts'],
          globalSetup: ['e2e/controlplane/vitest-setup.ts', 'e2e/ceph/vitest-setup.ts'],
          testTimeout: 600_000,
          hookTimeout: 900_000,
          fileParallelism: false,
        },
      },
    ],
  },
});
