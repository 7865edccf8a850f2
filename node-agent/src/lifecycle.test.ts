import { describe, expect, it } from 'vitest';
import {
  DESIRED_POWER_STATES,
  type DesiredPowerState,
  GUEST_FINALIZER,
  type PowerState,
  type Server,
  ServerKind,
  type TaskState,
  type VmState,
} from '../../operator/src/api/index.ts';
import type { GuestState } from './driver.ts';
import { FakeDriver } from './drivers/fake.ts';
import {
  AGENT_TASKS,
  type Decision,
  decide,
  finishAction,
  interruptActions,
  MAX_ACTIONS,
  moveGuard,
  pendingTriggers,
  recordTriggers,
  refusalIsStale,
  type ServerAction,
  setStates,
  startAction,
  TRANSITIONS,
  VOLUME_BACKED_REBUILD,
} from './lifecycle.ts';

const NODE = 'node-a';

interface Opts {
  vmState?: VmState;
  taskState?: TaskState;
  desired?: DesiredPowerState;
  triggers?: { softReboot?: string; hardReboot?: string };
  handled?: { softReboot?: string; hardReboot?: string; rebuild?: string };
  node?: string | null;
  deleting?: boolean;
  finalizers?: string[];
  flavor?: boolean;
  fault?: string;
}

function server(o: Opts = {}): Server {
  return ServerKind.schema.parse({
    apiVersion: ServerKind.apiVersion,
    kind: ServerKind.kind,
    metadata: {
      name: 'web',
      namespace: 'ns',
      uid: 'uid-1',
      generation: 3,
      ...(o.deleting ? { deletionTimestamp: '2026-01-01T00:00:00Z' } : {}),
      ...(o.finalizers ? { finalizers: o.finalizers } : {}),
    },
    spec: {
      flavor: 'm1.small',
      image: 'cirros',
      powerState: o.desired ?? 'Running',
      ...(o.triggers ? { triggers: o.triggers } : {}),
    },
    status: {
      ...(o.node === null ? {} : { node: o.node ?? NODE }),
      ...(o.flavor === false
        ? {}
        : { flavor: { name: 'm1.small', vcpus: 1, ram: '512Mi', disk: '1Gi', ephemeral: '0', swap: '0' } }),
      ...(o.vmState ? { vmState: o.vmState } : {}),
      ...(o.taskState ? { taskState: o.taskState } : {}),
      ...(o.handled ? { triggers: o.handled } : {}),
      ...(o.fault ? { fault: { code: 500, message: o.fault, time: '2026-01-01T00:00:00Z' } } : {}),
    },
  });
}

const guest = (powerState: PowerState): GuestState => ({ id: 'uid-1', powerState });
/** The guest power state that matches a managed vm_state. */
const GUEST_OF: Partial<Record<VmState, PowerState>> = {
  active: 'RUNNING',
  stopped: 'SHUTDOWN',
  paused: 'PAUSED',
  suspended: 'SUSPENDED',
};

describe('decide: deletion and binding', () => {
  it('destroys the guest, then releases the finalizer, then waits', () => {
    const fin = [GUEST_FINALIZER, 'compute.stratus.io/server'];
    expect(decide(server({ vmState: 'active', deleting: true, finalizers: fin }), guest('RUNNING'), NODE)).toEqual({
      kind: 'destroy',
    });
    expect(decide(server({ vmState: 'deleted', deleting: true, finalizers: fin }), undefined, NODE)).toEqual({
      kind: 'releaseFinalizer',
    });
    expect(decide(server({ vmState: 'deleted', deleting: true, finalizers: ['x'] }), undefined, NODE).kind).toBe(
      'wait',
    );
  });

  it('deletion wins over everything, even without binding or while building', () => {
    expect(decide(server({ node: 'other', deleting: true }), guest('RUNNING'), NODE).kind).toBe('destroy');
    expect(
      decide(
        server({ vmState: 'building', taskState: 'spawning', deleting: true, finalizers: [GUEST_FINALIZER] }),
        undefined,
        NODE,
      ).kind,
    ).toBe('releaseFinalizer');
  });

  it('waits until status.node names this node and vmState is set', () => {
    expect(decide(server({ node: null, vmState: 'building', taskState: 'spawning' }), undefined, NODE)).toMatchObject({
      kind: 'wait',
      reason: 'NotBound',
    });
    expect(decide(server({ node: 'node-b', vmState: 'active' }), guest('RUNNING'), NODE).kind).toBe('wait');
    expect(decide(server({}), undefined, NODE)).toMatchObject({ kind: 'wait', reason: 'NotBound' });
  });
});

describe('decide: building', () => {
  it('spawns a bound server that has no guest yet', () => {
    expect(decide(server({ vmState: 'building', taskState: 'spawning' }), undefined, NODE)).toEqual({
      kind: 'spawn',
    });
  });

  it('adopts a guest that already exists instead of spawning a second one', () => {
    const s = server({ vmState: 'building', taskState: 'spawning' });
    expect(decide(s, guest('RUNNING'), NODE)).toEqual({ kind: 'adopt', vmState: 'active' });
    expect(decide(s, guest('SHUTDOWN'), NODE)).toEqual({ kind: 'adopt', vmState: 'stopped' });
    expect(decide(s, guest('PAUSED'), NODE)).toEqual({ kind: 'adopt', vmState: 'paused' });
  });

  it('waits while the operator is still preparing (another task, no flavor snapshot)', () => {
    expect(decide(server({ vmState: 'building', taskState: 'scheduling' }), undefined, NODE).kind).toBe('wait');
    expect(decide(server({ vmState: 'building' }), undefined, NODE).kind).toBe('wait');
    expect(decide(server({ vmState: 'building', taskState: 'spawning', flavor: false }), undefined, NODE).kind).toBe(
      'wait',
    );
  });

  it("keeps spawning while the agent waits for the network (taskState networking is the agent's)", () => {
    expect(decide(server({ vmState: 'building', taskState: 'networking' }), undefined, NODE)).toEqual({
      kind: 'spawn',
    });
    expect(decide(server({ vmState: 'active', taskState: 'networking' }), undefined, NODE)).toEqual({
      kind: 'recover',
      task: 'networking',
    });
  });

  it("keeps spawning while the agent waits for the boot volume (taskState block_device_mapping is the agent's)", () => {
    expect(decide(server({ vmState: 'building', taskState: 'block_device_mapping' }), undefined, NODE)).toEqual({
      kind: 'spawn',
    });
    expect(decide(server({ vmState: 'active', taskState: 'block_device_mapping' }), undefined, NODE)).toEqual({
      kind: 'recover',
      task: 'block_device_mapping',
    });
  });

  it('does not act on triggers before the first spawn (tokens present at creation are recorded, not run)', () => {
    const s = server({ vmState: 'building', taskState: 'spawning', triggers: { hardReboot: 't1' } });
    expect(decide(s, undefined, NODE)).toEqual({ kind: 'spawn' });
  });
});

describe('decide: tasks', () => {
  it('recovers every agent task found at the start of a reconcile (left by an interrupted agent)', () => {
    for (const task of AGENT_TASKS) {
      if (task === 'spawning') continue;
      expect(decide(server({ vmState: 'active', taskState: task }), guest('RUNNING'), NODE)).toEqual({
        kind: 'recover',
        task,
      });
    }
    // spawning outside building is stale too
    expect(decide(server({ vmState: 'active', taskState: 'spawning' }), guest('RUNNING'), NODE).kind).toBe('recover');
  });

  it("waits during the operator's tasks and refuses triggers meanwhile (Nova: 409)", () => {
    const s = server({ vmState: 'active', taskState: 'rebuilding', desired: 'Stopped' });
    expect(decide(s, guest('RUNNING'), NODE)).toEqual({
      kind: 'steady',
      ready: { status: 'False', reason: 'TaskInProgress', message: 'task rebuilding in progress' },
      powerState: 'RUNNING',
    });
    const t = server({ vmState: 'active', taskState: 'resize_migrating', triggers: { hardReboot: 'x' } });
    expect(decide(t, guest('RUNNING'), NODE)).toEqual({
      kind: 'refuse',
      action: 'hardReboot',
      trigger: 'hardReboot',
      reason: 'cannot hardReboot while task resize_migrating is in progress',
    });
  });

  it('leaves vm_states it does not manage alone', () => {
    for (const vm of ['rescued', 'shelved', 'shelved_offloaded', 'soft-delete'] as VmState[]) {
      expect(decide(server({ vmState: vm }), guest('RUNNING'), NODE)).toMatchObject({ kind: 'wait' });
    }
  });
});

describe('decide: desired power state from every vm_state', () => {
  type Expect = 'steady' | `transition:${string}` | `refuse:${string}`;
  const table: Record<'active' | 'stopped' | 'paused' | 'suspended', Record<DesiredPowerState, Expect>> = {
    active: {
      Running: 'steady',
      Stopped: 'transition:stop',
      Paused: 'transition:pause',
      Suspended: 'transition:suspend',
    },
    stopped: { Running: 'transition:start', Stopped: 'steady', Paused: 'refuse:pause', Suspended: 'refuse:suspend' },
    paused: { Running: 'transition:unpause', Stopped: 'refuse:stop', Paused: 'steady', Suspended: 'refuse:suspend' },
    suspended: { Running: 'transition:resume', Stopped: 'refuse:stop', Paused: 'refuse:pause', Suspended: 'steady' },
  };
  const summary = (d: Decision): string =>
    d.kind === 'transition' ? `transition:${d.action}` : d.kind === 'refuse' ? `refuse:${d.action}` : d.kind;

  for (const [vm, row] of Object.entries(table) as [keyof typeof table, Record<DesiredPowerState, Expect>][]) {
    for (const desired of DESIRED_POWER_STATES) {
      it(`${vm} -> ${desired}: ${row[desired]}`, () => {
        const d = decide(server({ vmState: vm, desired }), guest(GUEST_OF[vm]!), NODE);
        expect(summary(d)).toBe(row[desired]);
        if (d.kind === 'refuse') {
          expect(d.reason).toMatch(new RegExp(`cannot ${d.action} a server in vm_state ${vm}`));
          expect(d.trigger).toBeUndefined();
        }
        if (d.kind === 'steady') {
          expect(d).toEqual({
            kind: 'steady',
            ready: { status: 'True', reason: desired, message: `guest is ${GUEST_OF[vm]}` },
            powerState: GUEST_OF[vm],
          });
        }
      });
    }
  }

  it('error with a guest: only Stopped acts (stop is allowed from error); Running stays in ERROR', () => {
    const g = guest('RUNNING');
    expect(decide(server({ vmState: 'error', desired: 'Running', fault: 'boom' }), g, NODE)).toEqual({
      kind: 'steady',
      ready: { status: 'False', reason: 'Error', message: 'server is in ERROR: boom' },
      powerState: 'RUNNING',
    });
    expect(decide(server({ vmState: 'error', desired: 'Stopped' }), g, NODE)).toEqual({
      kind: 'transition',
      action: 'stop',
    });
    expect(decide(server({ vmState: 'error', desired: 'Paused' }), g, NODE)).toMatchObject({
      kind: 'refuse',
      action: 'pause',
    });
    expect(decide(server({ vmState: 'error', desired: 'Suspended' }), g, NODE)).toMatchObject({
      kind: 'refuse',
      action: 'suspend',
    });
  });

  it('error without a guest (failed spawn): steady ERROR whatever is desired', () => {
    for (const desired of DESIRED_POWER_STATES) {
      expect(decide(server({ vmState: 'error', desired }), undefined, NODE)).toMatchObject({
        kind: 'steady',
        ready: { status: 'False', reason: 'Error' },
        powerState: 'NOSTATE',
      });
    }
  });

  it('a guest that vanished is reported missing instead of acted on', () => {
    for (const vm of ['active', 'stopped', 'paused', 'suspended'] as const) {
      expect(decide(server({ vmState: vm, desired: 'Stopped' }), undefined, NODE)).toEqual({ kind: 'missing' });
    }
  });
});

describe('decide: the hypervisor is authoritative', () => {
  it('a guest that stopped on its own while active is an exit', () => {
    expect(decide(server({ vmState: 'active' }), guest('CRASHED'), NODE)).toEqual({
      kind: 'exited',
      powerState: 'CRASHED',
    });
    expect(decide(server({ vmState: 'active', desired: 'Stopped' }), guest('SHUTDOWN'), NODE)).toEqual({
      kind: 'exited',
      powerState: 'SHUTDOWN',
    });
  });

  it('crash -> exit recorded -> started again when Running is desired', () => {
    const crashed = decide(server({ vmState: 'active' }), guest('CRASHED'), NODE);
    expect(crashed.kind).toBe('exited');
    // after the exit is recorded, vmState is stopped and the guest still CRASHED
    expect(decide(server({ vmState: 'stopped' }), guest('CRASHED'), NODE)).toEqual({
      kind: 'transition',
      action: 'start',
    });
    // ... unless the user wants it stopped
    expect(decide(server({ vmState: 'stopped', desired: 'Stopped' }), guest('CRASHED'), NODE).kind).toBe('steady');
  });

  it('other differences follow the guest', () => {
    const cases: [VmState, PowerState, VmState][] = [
      ['active', 'PAUSED', 'paused'],
      ['active', 'SUSPENDED', 'suspended'],
      ['paused', 'RUNNING', 'active'],
      ['stopped', 'RUNNING', 'active'],
      ['suspended', 'SHUTDOWN', 'stopped'],
      ['paused', 'CRASHED', 'stopped'],
    ];
    for (const [vm, p, to] of cases) {
      expect(decide(server({ vmState: vm }), guest(p), NODE)).toEqual({ kind: 'sync', vmState: to, powerState: p });
    }
  });

  it('an ERROR server is not synced; an unknown guest state is waited out', () => {
    expect(decide(server({ vmState: 'error' }), guest('SHUTDOWN'), NODE).kind).toBe('steady');
    expect(decide(server({ vmState: 'active' }), guest('NOSTATE'), NODE).kind).toBe('wait');
  });
});

describe('decide: triggers', () => {
  it('hard reboot from every state Nova allows it in', () => {
    for (const vm of ['active', 'stopped', 'paused', 'suspended'] as const) {
      const s = server({ vmState: vm, desired: 'Stopped', triggers: { hardReboot: 't1' } });
      expect(decide(s, guest(GUEST_OF[vm]!), NODE)).toEqual({
        kind: 'transition',
        action: 'hardReboot',
        trigger: 'hardReboot',
      });
    }
    const e = server({ vmState: 'error', triggers: { hardReboot: 't1' } });
    expect(decide(e, guest('SHUTDOWN'), NODE)).toMatchObject({ kind: 'transition', action: 'hardReboot' });
  });

  it('hard reboot re-creates a guest that is gone (failed spawn, lost guest)', () => {
    for (const vm of ['error', 'active', 'stopped'] as const) {
      expect(decide(server({ vmState: vm, triggers: { hardReboot: 't' } }), undefined, NODE)).toEqual({
        kind: 'spawn',
        trigger: 'hardReboot',
      });
    }
  });

  it('soft reboot only from active; otherwise refused and consumed', () => {
    expect(decide(server({ vmState: 'active', triggers: { softReboot: 's1' } }), guest('RUNNING'), NODE)).toEqual({
      kind: 'transition',
      action: 'softReboot',
      trigger: 'softReboot',
    });
    for (const vm of ['stopped', 'paused', 'suspended'] as const) {
      expect(decide(server({ vmState: vm, triggers: { softReboot: 's1' } }), guest(GUEST_OF[vm]!), NODE)).toEqual({
        kind: 'refuse',
        action: 'softReboot',
        trigger: 'softReboot',
        reason: `cannot softReboot a server in vm_state ${vm} (allowed: active)`,
      });
    }
    expect(decide(server({ vmState: 'error', triggers: { softReboot: 's1' } }), guest('RUNNING'), NODE)).toMatchObject({
      kind: 'refuse',
      trigger: 'softReboot',
    });
    expect(decide(server({ vmState: 'active', triggers: { softReboot: 's1' } }), undefined, NODE)).toMatchObject({
      kind: 'refuse',
      reason: 'the guest does not exist on this hypervisor',
    });
  });

  it('runs a token once: a handled token is ignored', () => {
    const s = server({
      vmState: 'active',
      triggers: { hardReboot: 't1', softReboot: 's1' },
      handled: { hardReboot: 't1', softReboot: 's1' },
    });
    expect(pendingTriggers(s)).toEqual([]);
    expect(decide(s, guest('RUNNING'), NODE).kind).toBe('steady');
    const changed = server({ vmState: 'active', triggers: { hardReboot: 't2' }, handled: { hardReboot: 't1' } });
    expect(pendingTriggers(changed)).toEqual(['hardReboot']);
  });

  it('hard reboot before soft reboot, triggers before the desired power state, sync before triggers', () => {
    const both = server({ vmState: 'active', triggers: { hardReboot: 'h', softReboot: 's' } });
    expect(decide(both, guest('RUNNING'), NODE)).toMatchObject({ action: 'hardReboot' });
    const stopToo = server({ vmState: 'active', desired: 'Stopped', triggers: { softReboot: 's' } });
    expect(decide(stopToo, guest('RUNNING'), NODE)).toMatchObject({ action: 'softReboot' });
    const crashed = server({ vmState: 'active', triggers: { softReboot: 's' } });
    expect(decide(crashed, guest('CRASHED'), NODE).kind).toBe('exited');
  });
});

describe('status bookkeeping', () => {
  const now = '2026-01-01T00:00:00Z';
  const later = '2026-01-01T00:01:00Z';

  it('starts, completes and bounds action entries (newest last)', () => {
    let a = startAction(undefined, 'stop', now);
    expect(a).toEqual([{ action: 'stop', startTime: now, result: 'InProgress' }]);
    expect(startAction(a, 'stop', later)).toEqual(a); // already in progress
    a = finishAction(a, 'stop', 'Success', later);
    expect(a).toEqual([{ action: 'stop', startTime: now, finishTime: later, result: 'Success' }]);
    a = finishAction(a, 'exit', 'Error', later, 'crashed'); // no InProgress entry: appended
    expect(a.at(-1)).toEqual({
      action: 'exit',
      startTime: later,
      finishTime: later,
      result: 'Error',
      message: 'crashed',
    });
    let many: ServerAction[] = [];
    for (let i = 0; i < 30; i++) many = finishAction(startAction(many, `a${i}`, now), `a${i}`, 'Success', now);
    expect(many).toHaveLength(MAX_ACTIONS);
    expect(many.at(-1)?.action).toBe('a29');
    expect(many[0]?.action).toBe('a10');
  });

  it('a repeated identical failure replaces the previous entry instead of piling up', () => {
    let a: ServerAction[] = [];
    for (let i = 0; i < 5; i++) a = finishAction(startAction(a, 'stop', now), 'stop', 'Error', later, 'boom');
    expect(a).toEqual([{ action: 'stop', startTime: now, finishTime: later, result: 'Error', message: 'boom' }]);
    a = finishAction(startAction(a, 'stop', now), 'stop', 'Error', later, 'other');
    expect(a).toHaveLength(2);
  });

  it('marks interrupted entries', () => {
    const a = interruptActions([{ action: 'pause', startTime: now, result: 'InProgress' }], later);
    expect(a).toEqual([
      {
        action: 'pause',
        startTime: now,
        finishTime: later,
        result: 'Error',
        message: 'interrupted: the node agent restarted',
      },
    ]);
  });

  it('derives status from vmState and taskState', () => {
    const st: Record<string, unknown> = { vmState: 'active' };
    expect(setStates(st, undefined, 'rebooting_hard')).toMatchObject({ status: 'HARD_REBOOT' });
    expect(setStates(st, 'stopped', undefined)).toEqual({ vmState: 'stopped', status: 'SHUTOFF' });
    expect(setStates(st, undefined, TRANSITIONS.start.task)).toMatchObject({ status: 'SHUTOFF' });
  });

  it('records only the given trigger tokens, keeping the operator ones', () => {
    const s = server({ vmState: 'active', triggers: { softReboot: 's2', hardReboot: 'h2' } });
    const st = recordTriggers({ triggers: { rebuild: 'r1', softReboot: 's1' } }, s, ['hardReboot']);
    expect(st.triggers).toEqual({ rebuild: 'r1', softReboot: 's1', hardReboot: 'h2' });
  });

  it('keeps a refusal until the spec changes', () => {
    const c = (status: 'True' | 'False', observedGeneration: number) => [
      { type: 'ActionRefused', status, reason: 'R', message: 'm', lastTransitionTime: now, observedGeneration },
    ];
    expect(refusalIsStale(undefined, 3)).toBe(true);
    expect(refusalIsStale(c('True', 3), 3)).toBe(false);
    expect(refusalIsStale(c('True', 2), 3)).toBe(true);
    expect(refusalIsStale(c('False', 3), 3)).toBe(true);
  });
});

/**
 * decide() against the fake driver, with a minimal executor (no API): from every managed state and every desired
 * state the loop ends in steady or a standing refusal within a few steps, never spawning a second guest.
 */
describe('decide converges with the fake driver', () => {
  async function run(vm: VmState, desired: DesiredPowerState) {
    const d = new FakeDriver();
    await d.spawn({
      id: 'uid-1',
      name: 'web',
      namespace: 'ns',
      vcpus: 1,
      ramMiB: 512,
      disk: { rootGiB: 1, ephemeralGiB: 0, swapMiB: 0 },
      annotations: {},
    });
    // bring the guest to the power state matching vm
    if (vm === 'stopped') await d.powerOff('uid-1', { graceful: true, timeoutMs: 0 });
    if (vm === 'paused') await d.pause('uid-1');
    if (vm === 'suspended') await d.suspend('uid-1');
    let status: Record<string, unknown> = { vmState: vm };
    const steps: string[] = [];
    for (let i = 0; i < 10; i++) {
      const s = server({ vmState: status.vmState as VmState, desired });
      const dec = decide(s, await d.state('uid-1'), NODE);
      steps.push(dec.kind === 'transition' || dec.kind === 'refuse' ? `${dec.kind}:${dec.action}` : dec.kind);
      if (dec.kind === 'steady' || dec.kind === 'refuse') break;
      if (dec.kind !== 'transition') throw new Error(`unexpected ${dec.kind}`);
      const a = dec.action;
      if (a === 'start') await d.powerOn('uid-1');
      else if (a === 'stop') await d.powerOff('uid-1', { graceful: true, timeoutMs: 0 });
      else if (a === 'softReboot' || a === 'hardReboot') await d.reboot('uid-1', { hard: a === 'hardReboot' });
      else await d[a]('uid-1');
      status = { ...setStates({ ...status }, TRANSITIONS[a].target, undefined) };
    }
    expect(d.size).toBe(1);
    return steps;
  }

  for (const vm of ['active', 'stopped', 'paused', 'suspended'] as const) {
    for (const desired of DESIRED_POWER_STATES) {
      it(`${vm} -> ${desired}`, async () => {
        const steps = await run(vm, desired);
        expect(steps.length).toBeLessThanOrEqual(2);
        expect(['steady', 'refuse']).toContain(steps.at(-1)!.split(':')[0]);
      });
    }
  }
});

describe('resize and migration placed by the operator', () => {
  it('finishes a resize_migrated task of an active or stopped server, naming the action', () => {
    const g: GuestState = { id: 'uid-1', powerState: 'RUNNING' };
    const active = server({ vmState: 'active', taskState: 'resize_migrated' });
    expect(decide(active, g, NODE)).toEqual({ kind: 'finishResize', action: 'resize' });
    expect(decide(active, undefined, NODE)).toEqual({ kind: 'finishResize', action: 'resize' });
    const migrating = server({ vmState: 'stopped', taskState: 'resize_migrated' });
    migrating.status!.actions = [{ action: 'migrate', startTime: 't', result: 'InProgress' }];
    expect(decide(migrating, undefined, NODE)).toEqual({ kind: 'finishResize', action: 'migrate' });
  });
  it('moved here: never starts the guest before the source confirmed it stopped (or was fenced) and served the disks', () => {
    const exp = { host: '10.0.0.1', port: 10810, disks: { root: 'root' }, imageSha256: 'f'.repeat(64) };
    const moving = (migrationSource?: object, sourceFenced?: string) => {
      const s = server({ vmState: 'active', taskState: 'resize_migrated' });
      s.status!.actions = [{ action: 'migrate', startTime: 't', result: 'InProgress' }];
      s.status!.migration = { source: 'node-b', target: NODE, ...(sourceFenced ? { sourceFenced } : {}) };
      if (migrationSource) s.status!.migrationSource = migrationSource as never;
      return s;
    };
    // nothing from the source yet: wait
    expect(decide(moving(), undefined, NODE)).toMatchObject({ kind: 'wait', reason: 'WaitingForSource' });
    // a record from another node (an earlier move) does not count
    const stale = { node: 'node-c', guestStoppedAt: '2026-01-01T00:00:00Z', export: exp };
    expect(decide(moving(stale), undefined, NODE)).toMatchObject({ kind: 'wait', reason: 'WaitingForSource' });
    // an export without the stop confirmation does not count either
    const unconfirmed = { node: 'node-b', export: exp };
    expect(moveGuard({ ...moving().status!, migrationSource: unconfirmed as never })).toMatchObject({ ok: false });
    // stopped, disks not served yet: wait for them
    const stopped = { node: 'node-b', guestStoppedAt: '2026-01-01T00:00:00Z' };
    expect(decide(moving(stopped), undefined, NODE)).toMatchObject({ kind: 'wait', reason: 'WaitingForSourceDisks' });
    // stopped and served: import
    expect(decide(moving({ ...stopped, export: exp }), undefined, NODE)).toEqual({
      kind: 'finishResize',
      action: 'migrate',
      importFrom: exp,
    });
    // fenced by the operator: allowed to start, but the disks must have been served
    const fenced = moving(undefined, '2026-01-01T00:01:00Z');
    expect(moveGuard(fenced.status!)).toMatchObject({ ok: false, reason: 'WaitingForSourceDisks' });
    expect(moveGuard({ ...fenced.status!, migrationSource: { node: 'node-b', export: exp } as never })).toEqual({
      ok: true,
      from: exp,
    });
    // a guest already imported here (interrupted agent) is finished without another copy
    expect(decide(moving(), { id: 'uid-1', powerState: 'SHUTDOWN' }, NODE)).toEqual({
      kind: 'finishResize',
      action: 'migrate',
    });
  });

  it('VERIFY_RESIZE: steady until the operator sets resize_confirming or resize_reverting', () => {
    const g: GuestState = { id: 'uid-1', powerState: 'RUNNING' };
    expect(decide(server({ vmState: 'resized' }), g, NODE)).toMatchObject({
      kind: 'steady',
      ready: { status: 'True', reason: 'VerifyResize' },
      powerState: 'RUNNING',
    });
    expect(decide(server({ vmState: 'resized', taskState: 'resize_confirming' }), g, NODE)).toEqual({
      kind: 'confirmResize',
    });
    expect(decide(server({ vmState: 'resized', taskState: 'resize_reverting' }), g, NODE)).toEqual({
      kind: 'revertResize',
    });
    // a failed move (ERROR) can be reverted too
    expect(decide(server({ vmState: 'error', taskState: 'resize_reverting' }), undefined, NODE)).toEqual({
      kind: 'revertResize',
    });
    // not on the node the server is bound to: nothing
    expect(decide(server({ vmState: 'resized', taskState: 'resize_reverting', node: 'node-b' }), g, NODE).kind).toBe(
      'wait',
    );
  });

  it('does not finish one on a server in another state', () => {
    const paused = server({ vmState: 'paused', taskState: 'resize_migrated' });
    expect(decide(paused, { id: 'uid-1', powerState: 'PAUSED' }, NODE).kind).not.toBe('finishResize');
  });
});

describe('rebuild', () => {
  it("is refused for a volume-backed server, in Nova's words", () => {
    const s = server({ vmState: 'active' });
    s.spec.image = undefined;
    s.spec.bootVolume = 'root';
    s.spec.triggers = { rebuild: 't1' };
    expect(decide(s, guest('RUNNING'), NODE)).toEqual({
      kind: 'refuse',
      action: 'rebuild',
      reason: VOLUME_BACKED_REBUILD,
      trigger: 'rebuild',
    });
  });

  const running: GuestState = { id: 'uid-1', powerState: 'RUNNING' };
  it('runs for a new rebuild token or a changed spec.image, from active, stopped or error', () => {
    const s = server({ vmState: 'active' });
    s.spec.triggers = { rebuild: 't1' };
    expect(decide(s, running, NODE)).toEqual({ kind: 'rebuild' });
    const img = server({ vmState: 'stopped' });
    img.status!.image = 'old-image';
    expect(decide(img, { id: 'uid-1', powerState: 'SHUTDOWN' }, NODE)).toEqual({ kind: 'rebuild' });
    const err = server({ vmState: 'error', fault: 'x' });
    err.spec.triggers = { rebuild: 't1' };
    expect(decide(err, undefined, NODE)).toEqual({ kind: 'rebuild' });
  });
  it('does nothing for a token already handled or the same image', () => {
    const s = server({ vmState: 'active', handled: { rebuild: 't1' } });
    s.spec.triggers = { rebuild: 't1' };
    s.status!.image = s.spec.image;
    expect(decide(s, running, NODE).kind).toBe('steady');
  });
  it('is refused while paused, consuming the token', () => {
    const s = server({ vmState: 'paused' });
    s.spec.triggers = { rebuild: 't2' };
    const d = decide(s, { id: 'uid-1', powerState: 'PAUSED' }, NODE);
    expect(d).toMatchObject({ kind: 'refuse', action: 'rebuild', trigger: 'rebuild' });
  });
});
