import { describe, expect, it } from 'vitest';
import { SERVER_NODE_LABEL } from '../../operator/src/api/index.ts';
import { guestVerdict, type PlacedServer } from './placement.ts';

const UID = 'uid-1';
const srv = (o: {
  label?: string;
  node?: string;
  actions?: { action: string; result?: string; message?: string }[];
  deleting?: boolean;
  uid?: string;
}): PlacedServer => ({
  metadata: {
    uid: o.uid ?? UID,
    labels: o.label ? { [SERVER_NODE_LABEL]: o.label } : {},
    ...(o.deleting ? { deletionTimestamp: '2026-01-01T00:00:00Z' } : {}),
  },
  status: { ...(o.node ? { node: o.node } : {}), ...(o.actions ? { actions: o.actions } : {}) },
});

describe('guestVerdict: when a guest whose server is not bound here may be destroyed', () => {
  it('destroys when the server is gone, replaced by a new one of the same name, or being deleted', () => {
    expect(guestVerdict(undefined, UID, 'n1')).toMatchObject({ destroy: true });
    expect(guestVerdict(srv({ label: 'n1', node: 'n1', uid: 'other' }), UID, 'n1')).toMatchObject({ destroy: true });
    expect(guestVerdict(srv({ label: 'n2', node: 'n1', deleting: true }), UID, 'n1')).toMatchObject({ destroy: true });
  });

  it('destroys after a move away from this node that the operator recorded', () => {
    for (const action of ['resize', 'migrate']) {
      for (const result of ['InProgress', 'Success']) {
        const s = srv({ label: 'n2', node: 'n2', actions: [{ action, result, message: 'n1 -> n2' }] });
        expect(guestVerdict(s, UID, 'n1')).toEqual({ destroy: true, reason: `the server moved to n2 (${action})` });
      }
    }
  });

  it('destroys the target copy of a move that was reverted (VERIFY_RESIZE revert back to the source)', () => {
    const actions = [
      { action: 'migrate', result: 'Success', message: 'n1 -> n2' },
      { action: 'revertResize', result: 'Success', message: 'n2 -> n1' },
    ];
    expect(guestVerdict(srv({ label: 'n1', node: 'n1', actions }), UID, 'n2')).toEqual({
      destroy: true,
      reason: 'the server moved to n1 (revertResize)',
    });
    // the source, where the server is back, keeps it
    expect(guestVerdict(srv({ label: 'n1', node: 'n1', actions }), UID, 'n1')).toMatchObject({ boundHere: true });
  });

  it('keeps the guest on a label edit or a bad patch, whatever else the status says', () => {
    const cases: PlacedServer[] = [
      srv({ label: 'n2', node: 'n1' }), // kubectl label server x compute.stratus.io/node=n2 --overwrite
      srv({ node: 'n1' }), // label removed
      srv({ label: 'n2', node: 'n2' }), // status.node patched too, but no move recorded
      srv({ label: 'n2', node: 'n2', actions: [{ action: 'migrate', result: 'Success', message: 'n3 -> n2' }] }),
      srv({ label: 'n2', node: 'n2', actions: [{ action: 'migrate', result: 'Error', message: 'n1 -> n2' }] }),
      srv({ label: 'n3', node: 'n2', actions: [{ action: 'migrate', result: 'Success', message: 'n1 -> n2' }] }),
      // an older move away, then a move back here: the newest move decides
      srv({
        label: 'n2',
        node: 'n2',
        actions: [
          { action: 'migrate', result: 'Success', message: 'n1 -> n2' },
          { action: 'resize', result: 'Success', message: 'n2 -> n1' },
        ],
      }),
    ];
    for (const s of cases) {
      const v = guestVerdict(s, UID, 'n1');
      expect(v).toMatchObject({ destroy: false, boundHere: false });
      expect(v.reason).toMatch(/no move away from n1 is recorded/);
    }
    expect(guestVerdict(srv({ label: 'n1', node: 'n1' }), UID, 'n1')).toMatchObject({
      destroy: false,
      boundHere: true,
    });
  });
});
