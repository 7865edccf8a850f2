import { describe, expect, it } from 'vitest';
import { crashPoint, parseCrashAt } from './crash.ts';

describe('crash points', () => {
  it('parses <name> and <name>@<n>', () => {
    expect(parseCrashAt(undefined)).toEqual([undefined, 0]);
    expect(parseCrashAt('')).toEqual([undefined, 0]);
    expect(parseCrashAt('attach:after-device')).toEqual(['attach:after-device', 1]);
    expect(parseCrashAt('attach:after-device@3')).toEqual(['attach:after-device', 3]);
    expect(parseCrashAt('x@0')).toEqual([undefined, 0]);
  });

  it('is inert when STRATUS_CRASH_AT is not set', () => {
    expect(process.env.STRATUS_CRASH_AT).toBeUndefined();
    expect(() => crashPoint('attach:after-device')).not.toThrow();
  });
});
