import { describe, expect, it } from 'vitest';
import { RESIZE_DOWN_MESSAGE, RESIZE_TO_ZERO_MESSAGE, refuseResizeDisks } from './nova-actions.ts';

describe('refuseResizeDisks (a resize keeps the disks, so they never shrink)', () => {
  it('allows equal and bigger disks', () => {
    expect(refuseResizeDisks({ rootGiB: 1, ephemeralGiB: 0 }, { rootGiB: 1, ephemeralGiB: 0 })).toBeUndefined();
    expect(refuseResizeDisks({ rootGiB: 1, ephemeralGiB: 1 }, { rootGiB: 2, ephemeralGiB: 3 })).toBeUndefined();
    expect(refuseResizeDisks({ rootGiB: 0, ephemeralGiB: 0 }, { rootGiB: 0, ephemeralGiB: 0 })).toBeUndefined();
    expect(refuseResizeDisks({ rootGiB: 0, ephemeralGiB: 0 }, { rootGiB: 5, ephemeralGiB: 0 })).toBeUndefined();
  });

  it("refuses a smaller root or ephemeral disk, and a sized root to disk 0, with Nova's words", () => {
    expect(refuseResizeDisks({ rootGiB: 2, ephemeralGiB: 0 }, { rootGiB: 1, ephemeralGiB: 0 })).toBe(
      'Resize error: Unable to resize disk down.',
    );
    expect(refuseResizeDisks({ rootGiB: 1, ephemeralGiB: 2 }, { rootGiB: 4, ephemeralGiB: 1 })).toBe(
      RESIZE_DOWN_MESSAGE,
    );
    expect(refuseResizeDisks({ rootGiB: 1, ephemeralGiB: 0 }, { rootGiB: 0, ephemeralGiB: 0 })).toBe(
      RESIZE_TO_ZERO_MESSAGE,
    );
  });
});
