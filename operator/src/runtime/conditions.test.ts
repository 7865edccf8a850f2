import { describe, expect, it } from 'vitest';
import {
  type Condition,
  conditionsEqual,
  findCondition,
  formatTime,
  InvalidConditionError,
  isFalse,
  isTrue,
  removeCondition,
  setCondition,
} from './conditions.ts';

const t1 = new Date('2026-01-01T10:00:00.123Z');
const t2 = new Date('2026-01-01T11:00:00.000Z');

describe('setCondition', () => {
  it('adds a new condition with a second-precision transition time and observedGeneration', () => {
    const list = setCondition(undefined, { type: 'Ready', status: 'False', reason: 'Pending', message: 'wait' }, 3, t1);
    expect(list).toEqual([
      {
        type: 'Ready',
        status: 'False',
        reason: 'Pending',
        message: 'wait',
        lastTransitionTime: '2026-01-01T10:00:00Z',
        observedGeneration: 3,
      },
    ]);
  });

  it('keeps lastTransitionTime when the status is unchanged, but updates reason/message/generation', () => {
    const a = setCondition([], { type: 'Ready', status: 'False', reason: 'Pending' }, 1, t1);
    const b = setCondition(a, { type: 'Ready', status: 'False', reason: 'Scheduling', message: 'm' }, 2, t2);
    expect(b[0]).toMatchObject({ reason: 'Scheduling', message: 'm', observedGeneration: 2 });
    expect(b[0]!.lastTransitionTime).toBe('2026-01-01T10:00:00Z');
    const c = setCondition(b, { type: 'Ready', status: 'True', reason: 'Running' }, 2, t2);
    expect(c[0]!.lastTransitionTime).toBe('2026-01-01T11:00:00Z');
    expect(a[0]!.reason).toBe('Pending'); // input not mutated
  });

  it('replaces in place and leaves other conditions alone', () => {
    let list: Condition[] = [];
    list = setCondition(list, { type: 'A', status: 'True', reason: 'R' }, undefined, t1);
    list = setCondition(list, { type: 'B', status: 'False', reason: 'R' }, undefined, t1);
    list = setCondition(list, { type: 'A', status: 'False', reason: 'R2' }, undefined, t2);
    expect(list.map((c) => [c.type, c.status])).toEqual([
      ['A', 'False'],
      ['B', 'False'],
    ]);
    expect(list[0]!.observedGeneration).toBeUndefined();
  });

  it('rejects reasons, types and messages the API server would reject', () => {
    const bad = [
      { type: 'Ready', status: 'True', reason: '' },
      { type: 'Ready', status: 'True', reason: '1Starts' },
      { type: 'Ready', status: 'True', reason: 'Has Space' },
      { type: 'Ready', status: 'True', reason: 'Ends,' },
      { type: 'Ready', status: 'True', reason: 'x'.repeat(1025) },
      { type: 'bad type!', status: 'True', reason: 'Ok' },
      { type: 'x'.repeat(317), status: 'True', reason: 'Ok' },
      { type: 'Ready', status: 'true', reason: 'Ok' },
      { type: 'Ready', status: 'True', reason: 'Ok', message: 'm'.repeat(32769) },
    ];
    for (const c of bad) {
      expect(() => setCondition([], c as never), JSON.stringify(c).slice(0, 60)).toThrow(InvalidConditionError);
    }
    for (const reason of ['A', 'Ready', 'Some_Reason:With,Parts', 'a1_']) {
      expect(() => setCondition([], { type: 'example.com/Ready', status: 'Unknown', reason })).not.toThrow();
    }
  });
});

describe('condition queries', () => {
  const list = setCondition(
    setCondition([], { type: 'Ready', status: 'True', reason: 'Ok' }, 1, t1),
    { type: 'Degraded', status: 'False', reason: 'Ok' },
    1,
    t1,
  );

  it('finds and tests conditions', () => {
    expect(findCondition(list, 'Ready')?.reason).toBe('Ok');
    expect(findCondition(list, 'Nope')).toBeUndefined();
    expect(isTrue(list, 'Ready')).toBe(true);
    expect(isTrue(list, 'Degraded')).toBe(false);
    expect(isFalse(list, 'Degraded')).toBe(true);
    expect(isTrue(undefined, 'Ready')).toBe(false);
    expect(removeCondition(list, 'Ready').map((c) => c.type)).toEqual(['Degraded']);
  });

  it('compares lists ignoring order', () => {
    expect(conditionsEqual(list, [...list].reverse())).toBe(true);
    expect(conditionsEqual(list, setCondition(list, { type: 'Ready', status: 'True', reason: 'Other' }))).toBe(false);
    expect(conditionsEqual(undefined, [])).toBe(true);
    expect(formatTime(t1)).toBe('2026-01-01T10:00:00Z');
  });
});
