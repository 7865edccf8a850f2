import { describe, expect, it } from 'vitest';
import { type ChainLink, formatLocalLocation, LocalBackend, parseLocalLocation, planDepth } from './local.ts';

const UID = '0b6f3c1e-5a0d-4a4e-9f3e-2d1c0b9a8f7e';

describe('local volume locations', () => {
  it('formats and parses volumes and snapshots', () => {
    const v = formatLocalLocation({ node: 'node-a', kind: 'volume', id: UID });
    expect(v).toBe(`local://node-a/${UID}`);
    expect(parseLocalLocation(v)).toEqual({ node: 'node-a', kind: 'volume', id: UID });
    const s = formatLocalLocation({ node: 'n1.example', kind: 'snapshot', id: UID });
    expect(s).toBe(`local://n1.example/snapshots/${UID}`);
    expect(parseLocalLocation(s)).toEqual({ node: 'n1.example', kind: 'snapshot', id: UID });
  });

  it.each([
    'rbd://fsid/volumes/volume-x',
    'local://node-a',
    'local://node-a/',
    `local://node-a/../${UID}`,
    'local://node-a/..',
    `local://node-a/x/${UID}`,
    `local://node-a/snapshots/../${UID}`,
    `local://Node_A/${UID}`,
    `local://node-a/${UID}.qcow2`,
    `local://node-a/snapshots/${UID}/x`,
  ])('refuses %s (no path escapes the volumes directory)', (loc) => {
    expect(() => parseLocalLocation(loc)).toThrow(/is not a local volume location/);
  });

  it('maps locations to files under <stateDir>/volumes, and refuses another node', async () => {
    const b = new LocalBackend({ stateDir: '/var/lib/stratus', node: 'node-a' });
    expect(b.volumePath(UID)).toBe(`/var/lib/stratus/volumes/${UID}.qcow2`);
    expect(b.snapshotPath(UID)).toBe(`/var/lib/stratus/volumes/snapshots/${UID}.qcow2`);
    await expect(b.extend(`local://node-b/${UID}`, 1 << 20)).rejects.toThrow(
      `local://node-b/${UID} is held by node node-b, not by this node (node-a)`,
    );
    await expect(b.delete(`local://node-a/snapshots/${UID}`)).rejects.toThrow(/is a snapshot, not a volume/);
    await expect(b.deleteSnapshot(`local://node-a/${UID}`)).rejects.toThrow(/is a volume, not a snapshot/);
  });

  it('resolves a relative state directory (backing files are absolute paths)', () => {
    const b = new LocalBackend({ stateDir: 'state', node: 'n' });
    expect(b.snapshotPath(UID)).toBe(`${process.cwd()}/state/volumes/snapshots/${UID}.qcow2`);
  });

  it('refuses a depth below 1', () => {
    expect(() => new LocalBackend({ stateDir: '/x', node: 'n', maxSnapshotDepth: 0 })).toThrow(RangeError);
  });
});

describe('planDepth', () => {
  const snap = (n: number): ChainLink => ({ path: `/s/snapshots/${n}.qcow2`, format: 'qcow2', snapshot: true });
  const image: ChainLink = { path: '/s/images/base', format: 'raw', snapshot: false };
  // youngest first: s3 is the volume's backing file, s1 the oldest snapshot
  const chain = [snap(3), snap(2), snap(1)];

  it('does nothing while the chain has room for one more snapshot', () => {
    expect(planDepth([], 1)).toBeUndefined();
    expect(planDepth([image], 1)).toBeUndefined();
    expect(planDepth(chain, 4)).toBeUndefined();
    expect(planDepth([...chain, image], 4)).toBeUndefined();
  });

  it('skips the youngest snapshots, keeping the oldest max-1 in the chain', () => {
    expect(planDepth(chain, 3)).toEqual({ path: snap(2).path, format: 'qcow2' });
    expect(planDepth(chain, 2)).toEqual({ path: snap(1).path, format: 'qcow2' });
    expect(planDepth([...chain, image], 2)).toEqual({ path: snap(1).path, format: 'qcow2' });
  });

  it('with depth 1, rebases onto the image below the snapshots, or onto nothing', () => {
    expect(planDepth([...chain, image], 1)).toEqual({ path: image.path, format: 'raw' });
    expect(planDepth(chain, 1)).toBeNull();
    expect(planDepth([snap(1)], 1)).toBeNull();
  });

  it('refuses a chain with a snapshot below the image', () => {
    expect(() => planDepth([snap(2), image, snap(1)], 5)).toThrow(/snapshot below a non-snapshot/);
  });
});
