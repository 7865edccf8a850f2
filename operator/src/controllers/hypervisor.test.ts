import type { V1Lease } from '@kubernetes/client-node';
import { describe, expect, it } from 'vitest';
import { leaseMarker, NodeLiveness } from './hypervisor.ts';

const lease = (renewTime: string, rv = '1'): V1Lease => ({
  metadata: { name: 'stratus-agent-n1', resourceVersion: rv },
  spec: { holderIdentity: 'n1', renewTime: renewTime as never },
});

describe('NodeLiveness (judged by when this process observed renewals)', () => {
  function setup() {
    const clock = { t: 1000 };
    const l = new NodeLiveness(60_000, () => clock.t);
    return { clock, l };
  }

  it('a renewal is a change of renewTime observed after the initial list; up until grace passes without one', () => {
    const { clock, l } = setup();
    expect(l.observe('n1', leaseMarker(lease('2026-01-01T00:00:00.000000Z')), true)).toBe(false);
    l.start();
    expect(l.verdict('n1')).toEqual({ up: undefined, recheckInMs: 60_000 }); // no evidence yet: keep the state
    clock.t += 10_000;
    expect(l.observe('n1', leaseMarker(lease('2026-01-01T00:00:10.000000Z', '2')), false)).toBe(true);
    expect(l.verdict('n1')).toEqual({ up: true, recheckInMs: 60_000 });
    clock.t += 59_999;
    expect(l.verdict('n1').up).toBe(true);
    clock.t += 1;
    expect(l.verdict('n1')).toEqual({ up: false });
    // Seen again (same renewTime, e.g. a relist or a label change): not a renewal.
    expect(l.observe('n1', leaseMarker(lease('2026-01-01T00:00:10.000000Z', '3')), false)).toBe(false);
    expect(l.verdict('n1').up).toBe(false);
  });

  it('the times written in the Lease (another host’s clock) never matter, only that they change', () => {
    for (const written of ['1970-01-01T00:00:00.000000Z', '2999-12-31T23:59:59.000000Z']) {
      const { clock, l } = setup();
      l.start();
      l.observe('n1', leaseMarker(lease('2026-01-01T00:00:00.000000Z')), false);
      clock.t += 30_000;
      // A renewal whose renewTime lies far in the past or the future is a renewal observed now ...
      expect(l.observe('n1', leaseMarker(lease(written, '2')), false)).toBe(true);
      clock.t += 59_000;
      expect(l.verdict('n1').up).toBe(true);
      // ... and without further renewals the node is down one grace period after it was observed.
      clock.t += 1000;
      expect(l.verdict('n1').up).toBe(false);
    }
  });

  it('after a (re)start the grace period runs from the start for nodes not seen renewing since', () => {
    const { clock, l } = setup();
    l.observe('n1', leaseMarker(lease('2026-01-01T00:00:00.000000Z')), true);
    clock.t += 500_000; // a long-dead node's Lease, listed at start
    l.start();
    expect(l.verdict('n1').up).toBeUndefined();
    clock.t += 60_000;
    expect(l.verdict('n1')).toEqual({ up: false });
    expect(l.verdict('never-seen')).toEqual({ up: false });
  });
});
