import { describe, expect, it } from 'vitest';
import { deriveServerState, mergeActions, pendingRequest, stateView, withReport } from './server-state.ts';

const T0 = '2026-01-01T10:00:00.250Z';
const T1 = '2026-01-01T10:00:01Z';
const T2 = '2026-01-01T10:00:02Z';
const T3 = '2026-01-01T10:00:03.500Z';

describe('mergeActions', () => {
  it('keeps one entry per action and start time, the finished version, in the order of both lists', () => {
    const a = [{ action: 'create', startTime: T0, result: 'InProgress' as const }];
    const b = [
      { action: 'create', startTime: T0, finishTime: T1, result: 'Success' as const },
      // the agent's times have no fraction: an entry in the same second as the operator's stays after it
      { action: 'stop', startTime: '2026-01-01T10:00:00Z', finishTime: T1, result: 'Success' as const },
    ];
    expect(mergeActions(a, b)).toEqual(b);
    // an operator entry finished by the operator wins over the report's InProgress copy
    const finishedA = [{ action: 'create', startTime: T0, finishTime: T1, result: 'Error' as const, message: 'x' }];
    expect(mergeActions(finishedA, [{ action: 'create', startTime: T0, result: 'InProgress' }])).toEqual(finishedA);
  });

  it('keeps two entries of the same action and second, and interleaves entries only one list has by time', () => {
    const r1 = { action: 'rebuild', startTime: T1, finishTime: T1, result: 'Success' as const };
    const r2 = { ...r1 };
    const own = { action: 'resize', startTime: T3, finishTime: T3, result: 'Error' as const };
    const later = { action: 'stop', startTime: '2026-01-01T10:00:04Z', result: 'InProgress' as const };
    expect(mergeActions([r1, r2, own], [r1, r2, later])).toEqual([r1, r2, own, later]);
    expect(mergeActions(undefined, undefined)).toBeUndefined();
  });

  it('keeps the newest 20', () => {
    const list = Array.from({ length: 25 }, (_, i) => ({
      action: 'stop',
      startTime: new Date(Date.parse(T0) + i * 1000).toISOString(),
      result: 'Success' as const,
    }));
    expect(mergeActions(list.slice(0, 20), list.slice(5))).toEqual(list.slice(5));
  });
});

describe('pendingRequest and stateView', () => {
  const report = {
    node: 'a',
    vmState: 'active' as const,
    powerState: 'RUNNING' as const,
    actions: [{ action: 'create', startTime: T0, finishTime: T1, result: 'Success' as const }],
  };

  it('an operator request stands until the report of its node holds its action entry', () => {
    const resize = { action: 'resize', startTime: T2, result: 'InProgress' as const };
    const st = {
      node: 'a',
      vmState: 'active' as const,
      taskState: 'resize_migrated' as const,
      actions: [...report.actions, resize],
      compute: report,
    };
    expect(pendingRequest(st)).toEqual(resize);
    expect(stateView(st, 'a')).toMatchObject({ vmState: 'active', taskState: 'resize_migrated', status: 'RESIZE' });
    const taken = { ...report, taskState: 'resize_migrated' as const, actions: [...report.actions, resize] };
    expect(pendingRequest({ ...st, compute: taken })).toBeUndefined();
    const done = {
      ...report,
      vmState: 'resized' as const,
      actions: [...report.actions, { ...resize, finishTime: T3, result: 'Success' as const }],
    };
    expect(stateView({ ...st, compute: done }, 'a')).toMatchObject({
      vmState: 'resized',
      taskState: undefined,
      status: 'VERIFY_RESIZE',
    });
  });

  it("a report from another node is not the server's: the operator's fields stand (bind after a move)", () => {
    const st = {
      node: 'b',
      vmState: 'active' as const,
      taskState: 'resize_migrated' as const,
      status: 'RESIZE' as const,
      powerState: 'RUNNING' as const,
      compute: { ...report, vmState: 'stopped' as const, powerState: 'SHUTDOWN' as const },
    };
    expect(stateView(st, 'b')).toMatchObject({
      vmState: 'active',
      taskState: 'resize_migrated',
      powerState: 'RUNNING',
    });
    const derived: Record<string, unknown> = structuredClone(st);
    expect(deriveServerState(derived)).toBe(false);
  });
});

describe('deriveServerState', () => {
  it('follows the report of status.node; NOSTATE while HypervisorUp is False; nothing for an unbound server', () => {
    const st: Record<string, unknown> = {
      node: 'a',
      vmState: 'building',
      taskState: 'spawning',
      status: 'BUILD',
      actions: [{ action: 'create', startTime: T0, result: 'InProgress' }],
      compute: {
        node: 'a',
        vmState: 'error',
        powerState: 'NOSTATE',
        fault: { code: 500, message: 'boom', time: T1 },
        actions: [{ action: 'create', startTime: T0, finishTime: T1, result: 'Error', message: 'boom' }],
      },
    };
    expect(deriveServerState(st)).toBe(true);
    expect(st).toMatchObject({ vmState: 'error', status: 'ERROR', powerState: 'NOSTATE', fault: { message: 'boom' } });
    expect(st.taskState).toBeUndefined();
    expect(deriveServerState(st)).toBe(false);

    const down: Record<string, unknown> = {
      node: 'a',
      vmState: 'active',
      powerState: 'RUNNING',
      conditions: [{ type: 'HypervisorUp', status: 'False' }],
      compute: { node: 'a', vmState: 'active', powerState: 'RUNNING' },
    };
    expect(deriveServerState(down)).toBe(true);
    expect(down.powerState).toBe('NOSTATE');

    const unbound: Record<string, unknown> = { vmState: 'error', compute: { node: 'a', vmState: 'active' } };
    expect(deriveServerState(unbound)).toBe(false);
  });
});

describe('withReport', () => {
  it("writes the view's state into status.compute only, with null for what goes, and the agent's other fields", () => {
    const st: Record<string, unknown> = {
      node: 'a',
      vmState: 'active',
      taskState: 'powering-off',
      status: 'ACTIVE',
      triggers: { softReboot: 'x' },
      compute: { node: 'a', vmState: 'active', taskState: 'powering-off', powerState: 'RUNNING' },
    };
    const view: Record<string, unknown> = {
      ...st,
      vmState: 'stopped',
      status: 'SHUTOFF',
      powerState: 'SHUTDOWN',
      launchedAt: T1,
    };
    delete view.taskState;
    delete view.triggers;
    const out = withReport(structuredClone(st), view, 'a');
    expect(out).toEqual({
      node: 'a',
      vmState: 'active',
      taskState: 'powering-off',
      status: 'ACTIVE',
      launchedAt: T1,
      compute: { node: 'a', vmState: 'stopped', taskState: null, powerState: 'SHUTDOWN' },
    });
    // an unchanged report is left as stored (no write)
    const same = withReport(structuredClone(st), { ...st, powerState: 'RUNNING' }, 'a');
    expect(same.compute).toEqual(st.compute);
  });

  it("keeps the volume attacher's compute.volumes of the same node, drops them on null or another node", () => {
    const volumes = [{ volume: 'data', volumeUID: 'u1', state: 'attached' }];
    const st: Record<string, unknown> = {
      node: 'a',
      vmState: 'active',
      powerState: 'RUNNING',
      compute: { node: 'a', vmState: 'active', powerState: 'RUNNING', volumes },
    };
    const kept = withReport(structuredClone(st), { ...structuredClone(st), powerState: 'SHUTDOWN' }, 'a');
    expect(kept.compute).toEqual({ node: 'a', vmState: 'active', powerState: 'SHUTDOWN', volumes });
    const view = structuredClone(st);
    view.compute = { ...(view.compute as object), volumes: null };
    const dropped = withReport(structuredClone(st), view, 'a');
    expect(dropped.compute).toEqual({ node: 'a', vmState: 'active', powerState: 'RUNNING', volumes: null });
    const moved = withReport(structuredClone(st), { ...structuredClone(st), powerState: 'RUNNING' }, 'b');
    expect(moved.compute).toEqual({ node: 'b', vmState: 'active', powerState: 'RUNNING', volumes: null });
  });
});
