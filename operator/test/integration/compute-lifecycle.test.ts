// One server's life through the operator and a fake node agent, against a real kube-apiserver: power transitions
// (each with its status, action entry and Event), one-shot reboot triggers that run once, transitions Nova forbids
// (refused, nothing attempted), resize in place and to another node, cold migration, a spawn failure, and delete.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FakeDriver } from '../../../node-agent/src/drivers/fake.ts';
import { deriveServerState, GUEST_FINALIZER, SERVER_FINALIZER, SERVER_NODE_LABEL } from '../../src/api/index.ts';
import { ComputeEnv, condition, type FakeNode, type Srv, waitFor } from './compute-env.ts';

const env = new ComputeEnv('life');
let small = '';
let medium = '';
let large = '';
const VM = 'vm';

beforeAll(async () => {
  await env.setup();
  await env.startNodes(3, 'n', { slots: 4 });
  [small, medium, large] = await Promise.all([
    env.flavor('small', 1, 1024),
    env.flavor('medium', 2, 2048),
    env.flavor('large', 2, 4096),
  ]);
  await env.startOperator();
  await env.waitNodesUp();
});

afterAll(async () => {
  await env.teardown();
});

let uid = '';
let home: FakeNode;

const actionsOf = (s: Srv, action: string) => s.status?.actions?.filter((a) => a.action === action) ?? [];
/**
 * No task, and the operator's state fields caught up with the agent's report (the agent's own fields, e.g. triggers
 * and conditions, are written with its report, before the operator derives the user-facing fields from it).
 */
const idle = (s: Srv) =>
  s.status?.taskState === undefined && !deriveServerState(structuredClone(s.status ?? {}) as Record<string, unknown>);

/** Sets spec.powerState and waits for the status it leads to. */
async function power(to: string, status: string): Promise<Srv> {
  await env.patchServer(VM, { spec: { powerState: to } });
  return env.waitServer(VM, status, (s) => s.status?.status === status && idle(s));
}

/** Sets spec.powerState to a target Nova forbids from here and waits for the refusal. */
async function refused(to: string, message: RegExp): Promise<Srv> {
  await env.patchServer(VM, { spec: { powerState: to } });
  return env.waitServer(
    VM,
    `ActionRefused ${message}`,
    (s) => condition(s, 'ActionRefused')?.status === 'True' && message.test(condition(s, 'ActionRefused')!.message),
  );
}

let confirms = 0;
/** VERIFY_RESIZE -> confirmResize -> back to `status` (ACTIVE or SHUTOFF); the move's records are dropped. */
async function confirmResize(status = 'ACTIVE'): Promise<Srv> {
  await env.waitServer(VM, 'VERIFY_RESIZE', (x) => x.status?.status === 'VERIFY_RESIZE' && idle(x));
  const token = `confirm-${++confirms}`;
  await env.patchServer(VM, { spec: { triggers: { confirmResize: token } } });
  return env.waitServer(
    VM,
    `confirmed, ${status}`,
    (x) =>
      x.status?.triggers?.confirmResize === token &&
      x.status.status === status &&
      idle(x) &&
      !x.status.resize &&
      !x.status.migration,
  );
}

async function expectEvent(reason: string, type: 'Normal' | 'Warning' = 'Normal') {
  await env.waitEvent(VM, reason, type);
}

describe('power lifecycle through the fake agent', () => {
  it('create: scheduled, spawned, ACTIVE / RUNNING with both finalizers', async () => {
    await env.createServer(VM, { flavor: small });
    const s = await env.waitServer(VM, 'ACTIVE', (x) => x.status?.status === 'ACTIVE' && idle(x));
    uid = s.metadata!.uid!;
    home = env.node(s.status?.node);
    expect(s.status).toMatchObject({ vmState: 'active', powerState: 'RUNNING', flavor: { name: small } });
    expect(s.metadata?.labels?.[SERVER_NODE_LABEL]).toBe(home.name);
    expect(s.metadata?.finalizers).toEqual(expect.arrayContaining([SERVER_FINALIZER, GUEST_FINALIZER]));
    expect(s.status?.actions).toEqual([expect.objectContaining({ action: 'create', result: 'Success' })]);
    expect(condition(s, 'Scheduled')).toMatchObject({ status: 'True' });
    expect(condition(s, 'Ready')).toMatchObject({ status: 'True', reason: 'Running' });
    expect(await home.driver.state(uid)).toMatchObject({ powerState: 'RUNNING' });
    await expectEvent('Scheduled');
    await expectEvent('Spawned');
  });

  it('Stopped -> SHUTOFF', async () => {
    const s = await power('Stopped', 'SHUTOFF');
    expect(s.status).toMatchObject({ vmState: 'stopped', powerState: 'SHUTDOWN' });
    expect(s.status?.actions?.at(-1)).toMatchObject({ action: 'stop', result: 'Success' });
    expect(await home.driver.state(uid)).toMatchObject({ powerState: 'SHUTDOWN' });
    await expectEvent('Stopped');
  });

  it('forbidden while SHUTOFF: Paused and a soft reboot are refused, nothing attempted', async () => {
    const s = await refused('Paused', /pause: cannot pause a server in vm_state stopped/);
    expect(s.status).toMatchObject({ status: 'SHUTOFF', vmState: 'stopped', powerState: 'SHUTDOWN' });
    expect(condition(s, 'Ready')).toMatchObject({ status: 'False', reason: 'ActionRefused' });
    await expectEvent('ActionRefused', 'Warning');

    await env.patchServer(VM, { spec: { powerState: 'Stopped' } });
    await env.waitServer(VM, 'refusal cleared', (x) => condition(x, 'ActionRefused')?.status === 'False');

    await env.patchServer(VM, { spec: { triggers: { softReboot: 'soft-while-off' } } });
    const r = await env.waitServer(
      VM,
      'soft reboot token consumed',
      (x) => x.status?.triggers?.softReboot === 'soft-while-off',
    );
    expect(condition(r, 'ActionRefused')).toMatchObject({
      status: 'True',
      message: expect.stringMatching(/softReboot: cannot softReboot a server in vm_state stopped/),
    });
    expect(r.status?.status).toBe('SHUTOFF');
    expect(home.calls('pause', uid)).toBe(0);
    expect(home.calls('reboot', uid)).toBe(0);
    expect(await home.driver.state(uid)).toMatchObject({ powerState: 'SHUTDOWN' });
  });

  it('Running -> ACTIVE (start), refusal cleared', async () => {
    const s = await power('Running', 'ACTIVE');
    expect(s.status).toMatchObject({ vmState: 'active', powerState: 'RUNNING' });
    expect(s.status?.actions?.at(-1)).toMatchObject({ action: 'start', result: 'Success' });
    expect(condition(s, 'ActionRefused')).toMatchObject({ status: 'False' });
    await expectEvent('Started');
  });

  it('Paused -> PAUSED', async () => {
    const s = await power('Paused', 'PAUSED');
    expect(s.status).toMatchObject({ vmState: 'paused', powerState: 'PAUSED' });
    expect(s.status?.actions?.at(-1)).toMatchObject({ action: 'pause', result: 'Success' });
    expect(await home.driver.state(uid)).toMatchObject({ powerState: 'PAUSED' });
    await expectEvent('Paused');
  });

  it('forbidden while PAUSED: Suspended and Stopped are refused, nothing attempted', async () => {
    let s = await refused('Suspended', /suspend: cannot suspend a server in vm_state paused/);
    expect(s.status).toMatchObject({ status: 'PAUSED', powerState: 'PAUSED' });
    s = await refused('Stopped', /stop: cannot stop a server in vm_state paused/);
    expect(s.status).toMatchObject({ status: 'PAUSED', powerState: 'PAUSED' });
    expect(home.calls('suspend', uid)).toBe(0);
    expect(home.calls('powerOff', uid)).toBe(1); // the one Stopped earlier
    expect(await home.driver.state(uid)).toMatchObject({ powerState: 'PAUSED' });
  });

  it('Running -> ACTIVE (unpause)', async () => {
    const s = await power('Running', 'ACTIVE');
    expect(s.status).toMatchObject({ vmState: 'active', powerState: 'RUNNING' });
    expect(s.status?.actions?.at(-1)).toMatchObject({ action: 'unpause', result: 'Success' });
    await expectEvent('Unpaused');
  });

  it('Suspended -> SUSPENDED', async () => {
    const s = await power('Suspended', 'SUSPENDED');
    expect(s.status).toMatchObject({ vmState: 'suspended', powerState: 'SUSPENDED' });
    expect(s.status?.actions?.at(-1)).toMatchObject({ action: 'suspend', result: 'Success' });
    await expectEvent('Suspended');
  });

  it('Running -> ACTIVE (resume)', async () => {
    const s = await power('Running', 'ACTIVE');
    expect(s.status).toMatchObject({ vmState: 'active', powerState: 'RUNNING' });
    expect(s.status?.actions?.at(-1)).toMatchObject({ action: 'resume', result: 'Success' });
    expect(await home.driver.state(uid)).toMatchObject({ powerState: 'RUNNING' });
    await expectEvent('Resumed');
  });

  it('soft and hard reboot tokens each run exactly once', async () => {
    const reboots = home.calls('reboot', uid);
    await env.patchServer(VM, { spec: { triggers: { softReboot: 'soft-1' } } });
    let s = await env.waitServer(VM, 'soft reboot done', (x) => x.status?.triggers?.softReboot === 'soft-1' && idle(x));
    expect(s.status?.status).toBe('ACTIVE');
    expect(actionsOf(s, 'softReboot')).toEqual([expect.objectContaining({ result: 'Success' })]);
    expect(home.calls('reboot', uid)).toBe(reboots + 1);
    await expectEvent('Rebooted');

    // the same token again (plus a change that makes both controllers reconcile): nothing happens
    await env.patchServer(VM, {
      metadata: { annotations: { 'test.stratus.io/touch': '1' } },
      spec: { triggers: { softReboot: 'soft-1' } },
    });
    const pid = (await home.driver.state(uid))?.pid;
    await env.patchServer(VM, { spec: { triggers: { hardReboot: 'hard-1' } } });
    s = await env.waitServer(VM, 'hard reboot done', (x) => x.status?.triggers?.hardReboot === 'hard-1' && idle(x));
    expect(actionsOf(s, 'hardReboot')).toEqual([expect.objectContaining({ result: 'Success' })]);
    expect((await home.driver.state(uid))?.pid).not.toBe(pid); // a hard reboot recreates the guest process
    await env.patchServer(VM, {
      metadata: { annotations: { 'test.stratus.io/touch': '2' } },
      spec: { triggers: { hardReboot: 'hard-1', softReboot: 'soft-1' } },
    });
    // an observable step after the re-applied tokens: both controllers have seen them by then
    s = await power('Stopped', 'SHUTOFF');
    s = await power('Running', 'ACTIVE');
    expect(home.calls('reboot', uid)).toBe(reboots + 2);
    expect(actionsOf(s, 'softReboot')).toHaveLength(1);
    expect(actionsOf(s, 'hardReboot')).toHaveLength(1);
  });

  it('a rebuild token and a changed spec.image each rebuild the guest once', async () => {
    const spawns = home.calls('spawn', uid);
    await env.patchServer(VM, { spec: { triggers: { rebuild: 'rebuild-1' } } });
    let s = await env.waitServer(VM, 'rebuild done', (x) => x.status?.triggers?.rebuild === 'rebuild-1' && idle(x));
    expect(s.status?.status).toBe('ACTIVE');
    expect(actionsOf(s, 'rebuild')).toEqual([expect.objectContaining({ result: 'Success' })]);
    expect(home.calls('spawn', uid)).toBe(spawns + 1);
    await expectEvent('Rebuilt');
    const image = `${s.spec.image}-v2`;
    await env.patchServer(VM, { spec: { image } });
    s = await env.waitServer(VM, 'rebuilt from the new image', (x) => x.status?.image === image && idle(x));
    expect(s.status?.powerState).toBe('RUNNING');
    expect(actionsOf(s, 'rebuild')).toHaveLength(2);
    expect(home.calls('spawn', uid)).toBe(spawns + 2);
  });
});

describe('resize and migrate', () => {
  let filler = '';

  it('a resize that fits in place stays on the node, with the new flavor, back to ACTIVE', async () => {
    // a 1 GiB server pinned next to vm: vm can grow to 2 GiB here, not to 4 GiB
    filler = 'filler';
    await env.createServer(filler, { flavor: small, node: home.name });
    await env.waitServer(filler, 'ACTIVE', (x) => x.status?.status === 'ACTIVE' && idle(x));
    const spawns = home.calls('spawn', uid);

    home.driver.setData(uid, 'written before the resize');
    await env.patchServer(VM, { spec: { flavor: medium } });
    const v = await env.waitServer(
      VM,
      'VERIFY_RESIZE',
      (x) => x.status?.flavor?.name === medium && x.status.status === 'VERIFY_RESIZE' && idle(x),
    );
    expect(v.status).toMatchObject({ vmState: 'resized', resize: { oldNode: home.name, oldFlavor: { name: small } } });
    expect(v.status?.migration).toBeUndefined();
    expect(home.driver.resizePending(uid)).toBe(true);
    const s = await confirmResize();
    expect(home.driver.resizePending(uid)).toBe(false);
    expect(home.driver.data(uid)).toBe('written before the resize');
    expect(s.status?.node).toBe(home.name);
    expect(s.metadata?.labels?.[SERVER_NODE_LABEL]).toBe(home.name);
    expect(s.status).toMatchObject({ powerState: 'RUNNING', allocation: { vcpus: 2, ramMiB: 2048 } });
    expect(condition(s, 'Resized')).toMatchObject({ status: 'True', reason: 'SameHost' });
    expect(actionsOf(s, 'resize').at(-1)).toMatchObject({ result: 'Success' });
    expect((await home.driver.list()).find((g) => g.id === uid)).toMatchObject({ vcpus: 2, ramMiB: 2048 });
    // the driver resized the guest keeping its disks: no new guest
    expect(home.calls('resize', uid)).toBe(1);
    expect(home.calls('spawn', uid)).toBe(spawns);
    await expectEvent('Resized');
  });

  it('a resize that does not fit moves the server; the old node loses the guest', async () => {
    await env.patchServer(VM, { spec: { flavor: large } });
    const v = await env.waitServer(
      VM,
      'resized elsewhere, VERIFY_RESIZE',
      (x) => x.status?.flavor?.name === large && x.status.status === 'VERIFY_RESIZE' && idle(x),
    );
    // the source stopped the guest, served its disks, and keeps it until the confirm
    expect(v.status?.migration).toMatchObject({ source: home.name, target: v.status?.node });
    expect(v.status?.migrationSource).toMatchObject({ node: home.name, guestStoppedAt: expect.any(String) });
    expect(await home.driver.state(uid)).toMatchObject({ powerState: 'SHUTDOWN' });
    await waitFor('export ended', async () => FakeDriver.exports() === 0);
    const s = await confirmResize();
    const target = env.node(s.status?.node);
    expect(target.driver.data(uid)).toBe('written before the resize'); // copied, not rebuilt
    expect(target.calls('importDisks', uid)).toBe(1);
    expect(target.name).not.toBe(home.name);
    expect(s.metadata?.labels?.[SERVER_NODE_LABEL]).toBe(target.name);
    expect(condition(s, 'Resized')).toMatchObject({ status: 'True', reason: 'Moved' });
    expect(s.status).toMatchObject({ powerState: 'RUNNING', allocation: { ramMiB: 4096 } });
    expect((await target.driver.list()).find((g) => g.id === uid)).toMatchObject({ ramMiB: 4096 });
    const old = home;
    await waitGuestGone(old, uid);
    home = target;
  });

  it('a migrate token moves the server to another node, once', async () => {
    const from = home;
    await env.patchServer(VM, { spec: { triggers: { migrate: 'mig-1' } } });
    await env.waitServer(
      VM,
      'migrated, VERIFY_RESIZE',
      (x) => x.status?.triggers?.migrate === 'mig-1' && x.status.status === 'VERIFY_RESIZE' && idle(x),
    );
    const s = await confirmResize();
    const target = env.node(s.status?.node);
    expect(target.name).not.toBe(from.name);
    expect(s.metadata?.labels?.[SERVER_NODE_LABEL]).toBe(target.name);
    expect(condition(s, 'Migrated')).toMatchObject({ status: 'True', reason: 'Moved' });
    expect(actionsOf(s, 'migrate')).toEqual([expect.objectContaining({ result: 'Success' })]);
    expect(await target.driver.state(uid)).toMatchObject({ powerState: 'RUNNING' });
    await waitGuestGone(from, uid);
    await expectEvent('Migrated');
    home = target;
  });

  it('a SHUTOFF server resized in place comes back SHUTOFF with the new size', async () => {
    await power('Stopped', 'SHUTOFF');
    await env.patchServer(VM, { spec: { flavor: medium } });
    const s = await confirmResize('SHUTOFF');
    expect(s.status).toMatchObject({ node: home.name, vmState: 'stopped', powerState: 'SHUTDOWN' });
    expect(condition(s, 'Resized')).toMatchObject({ status: 'True', reason: 'SameHost' });
    expect((await home.driver.list()).find((g) => g.id === uid)).toMatchObject({
      ramMiB: 2048,
      powerState: 'SHUTDOWN',
    });
    const back = await power('Running', 'ACTIVE');
    expect(back.status?.powerState).toBe('RUNNING');
  });

  it('a migration reverted from VERIFY_RESIZE goes back to its node with its disks; the target copy is dropped', async () => {
    const from = home;
    home.driver.setData(uid, 'kept through the revert');
    await env.patchServer(VM, { spec: { triggers: { migrate: 'mig-2' } } });
    const v = await env.waitServer(
      VM,
      'migrated, VERIFY_RESIZE',
      (x) => x.status?.triggers?.migrate === 'mig-2' && x.status.status === 'VERIFY_RESIZE' && idle(x),
    );
    const target = env.node(v.status?.node);
    expect(target.name).not.toBe(from.name);
    expect(await from.driver.state(uid)).toMatchObject({ powerState: 'SHUTDOWN' });
    await env.patchServer(VM, { spec: { triggers: { revertResize: 'revert-1' } } });
    const r = await env.waitServer(
      VM,
      'reverted',
      (x) => x.status?.triggers?.revertResize === 'revert-1' && x.status.status === 'ACTIVE' && idle(x),
    );
    expect(r.status?.node).toBe(from.name);
    expect(r.metadata?.labels?.[SERVER_NODE_LABEL]).toBe(from.name);
    expect(r.status?.migration).toBeUndefined();
    expect(r.status?.migrationSource).toBeUndefined();
    expect(condition(r, 'Migrated')).toMatchObject({ status: 'False', reason: 'Reverted' });
    expect(actionsOf(r, 'revertResize').at(-1)).toMatchObject({ result: 'Success' });
    expect(from.driver.data(uid)).toBe('kept through the revert');
    await waitGuestGone(target, uid);
    await env.waitServer(VM, 'records dropped', (x) => !x.status?.resize);
  });

  it("a resize to a smaller disk is refused with Nova's words; the server and its guest stay as they are", async () => {
    const smallDisk = await env.flavor('smalldisk', 2, 2048, 5);
    const before = await env.waitServer(VM, 'idle', (x) => idle(x));
    await env.patchServer(VM, { spec: { flavor: smallDisk } });
    const r = await env.waitServer(VM, 'Resized=False', (x) => {
      const c = condition(x, 'Resized');
      return c?.status === 'False' && c.observedGeneration === x.metadata?.generation;
    });
    expect(condition(r, 'Resized')).toMatchObject({
      reason: 'CannotResizeDisk',
      message: 'Resize error: Unable to resize disk down.',
    });
    expect(r.status).toMatchObject({ status: 'ACTIVE', node: before.status?.node, flavor: { name: medium } });
    expect(actionsOf(r, 'resize').at(-1)).toMatchObject({ result: 'Error' });
    await env.patchServer(VM, { spec: { flavor: medium } });
  });

  it('a spawn failure ends in ERROR with a fault; resizing an ERROR server is refused', async () => {
    await env.createServer('broken', { flavor: small, annotations: { 'fake.stratus.io/fail': 'spawn' } });
    const s = await env.waitServer('broken', 'ERROR', (x) => x.status?.status === 'ERROR' && idle(x));
    expect(s.status).toMatchObject({ vmState: 'error', powerState: 'NOSTATE' });
    expect(s.status?.fault?.message).toMatch(/spawn failed: injected failure/);
    expect(actionsOf(s, 'create').at(-1)).toMatchObject({ result: 'Error' });
    const node = env.node(s.status?.node);
    expect(await node.driver.state(s.metadata!.uid!)).toBeUndefined();
    await env.waitEvent('broken', 'SpawnFailed', 'Warning');

    await env.patchServer('broken', { spec: { flavor: medium } });
    const r = await env.waitServer('broken', 'Resized=False', (x) => condition(x, 'Resized')?.status === 'False');
    expect(condition(r, 'Resized')).toMatchObject({
      reason: 'ActionRefused',
      message: expect.stringMatching(/cannot resize a server in vm_state error/),
      observedGeneration: r.metadata?.generation,
    });
    expect(r.status).toMatchObject({ status: 'ERROR', node: node.name, flavor: { name: small } });
    expect(actionsOf(r, 'resize').at(-1)).toMatchObject({ result: 'Error' });
    expect(node.calls('spawn', r.metadata!.uid!)).toBe(1);
  });

  it('delete: the guest is destroyed, both finalizers released, the object gone', async () => {
    await env.deleteServer(VM);
    await env.waitServerGone(VM);
    expect(await home.driver.state(uid)).toBeUndefined();
    expect(home.calls('destroy', uid)).toBeGreaterThanOrEqual(1);
    for (const nd of env.nodes) expect(await nd.guestIds()).not.toContain(uid);
    await expectEvent('Deleted');
  });
});

async function waitGuestGone(node: FakeNode, id: string) {
  await waitFor(`guest ${id} gone from ${node.name}`, async () => (await node.driver.state(id)) === undefined);
}
