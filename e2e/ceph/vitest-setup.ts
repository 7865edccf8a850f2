// vitest globalSetup of the e2e project: stops the shared Ceph cluster at the end of the run if a test file started
// it (e2e/ceph/shared.ts). Nothing is started here: a run without Ceph tests pays nothing.
import { releaseSharedCeph } from './shared.ts';

export default function setup(): () => Promise<void> {
  return async () => {
    await releaseSharedCeph();
  };
}
