// The Argo CD health checks of docs/gitops/health/*.lua, run by a real Lua interpreter (Debian's lua5.4; Argo CD
// embeds gopher-lua, a Lua 5.1: the scripts use nothing newer) on sample objects shaped by the API types. Each
// object is handed to the script as the global `obj`, as Argo CD does, and the returned hs.status / hs.message are
// checked.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import type {
  ImageStatus,
  NetworkStatus,
  PortSpec,
  PortStatus,
  ServerSpec,
  ServerStatus,
  VolumeStatus,
} from '../../operator/src/api/index.ts';
import { requireTools } from '../testing/tools.ts';
import { health, LUA, toLua } from './lua.ts';

type Obj<S, St> = { metadata: { name: string; generation: number }; spec?: Partial<S>; status?: St };
const meta = (generation = 1) => ({ name: 'x', generation });
const condition = (type: string, status: 'True' | 'False', reason: string, message: string) => ({
  type,
  status,
  reason,
  message,
  lastTransitionTime: '2026-01-01T00:00:00Z',
});

/** Runs the cases of one script and compares each hs with what the case expects. */
async function expectHealth<T>(script: string, cases: readonly [string, T, string, RegExp?][]) {
  requireTools(LUA);
  const got = await health(
    script,
    cases.map(([, o]) => o),
  );
  expect(got.length).toBe(cases.length);
  cases.forEach(([name, , status, message], i) => {
    expect({ case: name, status: got[i]!.status }).toEqual({ case: name, status });
    if (message) expect(got[i]!.message, name).toMatch(message);
  });
}

describe('Argo CD health checks (docs/gitops/health/*.lua) under lua5.4', () => {
  it('toLua writes any JSON value as a Lua literal', async () => {
    requireTools(LUA);
    const v = { a: [1, 2.5, true], s: 'quote " back \\ nl \n tab \t é "9 \n1', n: null, e: {} };
    const program = `local v = ${toLua(v)}; io.write(#v.a, "|", v.a[2], "|", tostring(v.a[3]), "|", v.s, "|", tostring(v.n))`;
    const { stdout } = await promisify(execFile)(LUA, ['-e', program]);
    expect(stdout).toBe(`3|2.5|true|${v.s}|nil`);
  });

  it('Server', async () => {
    type S = Obj<ServerSpec, ServerStatus>;
    const spec: Partial<ServerSpec> = { flavor: 'm1.tiny', image: 'debian-12', powerState: 'Running' };
    const flavor = { name: 'm1.tiny', vcpus: 1, ram: '512Mi', disk: '1Gi' };
    const st = (s: Partial<ServerStatus>): ServerStatus => ({ flavor, ...s }) as ServerStatus;
    await expectHealth<S>('server.lua', [
      ['no status yet', { metadata: meta(), spec }, 'Progressing', /schedule/],
      [
        'building',
        { metadata: meta(), spec, status: st({ status: 'BUILD', vmState: 'building', taskState: 'spawning' }) },
        'Progressing',
        /BUILD \(spawning\)/,
      ],
      [
        'active',
        { metadata: meta(), spec, status: st({ status: 'ACTIVE', vmState: 'active', powerState: 'RUNNING' }) },
        'Healthy',
        /^ACTIVE$/,
      ],
      [
        'rebooting',
        { metadata: meta(), spec, status: st({ status: 'REBOOT', vmState: 'active', taskState: 'rebooting' }) },
        'Progressing',
      ],
      [
        'resizing',
        { metadata: meta(), spec, status: st({ status: 'RESIZE', vmState: 'active', taskState: 'resize_migrating' }) },
        'Progressing',
      ],
      [
        'migrating, no task yet',
        { metadata: meta(), spec, status: st({ status: 'MIGRATING', vmState: 'active' }) },
        'Progressing',
      ],
      [
        'verify resize',
        { metadata: meta(), spec, status: st({ status: 'VERIFY_RESIZE', vmState: 'resized' }) },
        'Suspended',
        /confirmResize/,
      ],
      [
        'error with fault',
        {
          metadata: meta(),
          spec,
          status: st({
            status: 'ERROR',
            vmState: 'error',
            fault: { code: 500, message: 'No valid host was found. 0/3 hosts', time: '2026-01-01T00:00:00Z' },
          }),
        },
        'Degraded',
        /^No valid host was found/,
      ],
      [
        'error without fault: the failing condition',
        {
          metadata: meta(),
          spec,
          status: st({
            status: 'ERROR',
            vmState: 'error',
            conditions: [condition('Scheduled', 'False', 'PortInUse', 'Port p is still in use by server a')],
          }),
        },
        'Degraded',
        /still in use/,
      ],
      [
        'stopped as asked',
        {
          metadata: meta(),
          spec: { ...spec, powerState: 'Stopped' },
          status: st({ status: 'SHUTOFF', vmState: 'stopped' }),
        },
        'Healthy',
        /SHUTOFF/,
      ],
      [
        'stopped, asked to run',
        { metadata: meta(), spec, status: st({ status: 'SHUTOFF', vmState: 'stopped' }) },
        'Degraded',
        /SHUTOFF but spec.powerState is Running/,
      ],
      [
        'paused as asked',
        {
          metadata: meta(),
          spec: { ...spec, powerState: 'Paused' },
          status: st({ status: 'PAUSED', vmState: 'paused' }),
        },
        'Healthy',
      ],
      [
        'trigger not acted on',
        {
          metadata: meta(2),
          spec: { ...spec, triggers: { hardReboot: 't2' } },
          status: st({ status: 'ACTIVE', vmState: 'active', triggers: { hardReboot: 't1' } }),
        },
        'Progressing',
        /hardReboot=t2/,
      ],
      [
        'trigger done',
        {
          metadata: meta(2),
          spec: { ...spec, triggers: { hardReboot: 't2' } },
          status: st({ status: 'ACTIVE', vmState: 'active', triggers: { hardReboot: 't2' } }),
        },
        'Healthy',
      ],
      [
        'flavor changed, resize not started',
        {
          metadata: meta(2),
          spec: { ...spec, flavor: 'm1.small' },
          status: st({ status: 'ACTIVE', vmState: 'active' }),
        },
        'Progressing',
        /m1.small/,
      ],
      [
        'resize refused for this generation',
        {
          metadata: meta(3),
          spec: { ...spec, flavor: 'm1.huge' },
          status: st({
            status: 'ACTIVE',
            vmState: 'active',
            conditions: [
              { ...condition('Resized', 'False', 'NoValidHost', 'No valid host was found'), observedGeneration: 3 },
            ],
          }),
        },
        'Degraded',
        /Flavor m1.huge not applied: No valid host/,
      ],
      [
        'resize refused for an older generation: a new try is pending',
        {
          metadata: meta(4),
          spec: { ...spec, flavor: 'm1.huge' },
          status: st({
            status: 'ACTIVE',
            vmState: 'active',
            conditions: [
              { ...condition('Resized', 'False', 'NoValidHost', 'No valid host was found'), observedGeneration: 3 },
            ],
          }),
        },
        'Progressing',
      ],
      [
        'power state refused',
        {
          metadata: meta(),
          spec: { ...spec, powerState: 'Paused' },
          status: st({
            status: 'SHUTOFF',
            vmState: 'stopped',
            conditions: [condition('ActionRefused', 'True', 'Refused', 'cannot pause a stopped server')],
          }),
        },
        'Degraded',
        /SHUTOFF but spec.powerState is Paused: cannot pause/,
      ],
      ['shelved', { metadata: meta(), spec, status: st({ status: 'SHELVED', vmState: 'shelved' }) }, 'Suspended'],
      ['hypervisor gone', { metadata: meta(), spec, status: st({ status: 'UNKNOWN' }) }, 'Unknown'],
    ]);
  });

  it('Network', async () => {
    type N = Obj<unknown, NetworkStatus>;
    const ready = condition('Ready', 'True', 'Allocated', 'segment 4097 allocated');
    await expectHealth<N>('network.lua', [
      ['no status', { metadata: meta() }, 'Progressing', /allocate/],
      [
        'active',
        { metadata: meta(), status: { status: 'ACTIVE', observedGeneration: 1, conditions: [ready] } },
        'Healthy',
        /ACTIVE/,
      ],
      [
        'spec not observed',
        { metadata: meta(3), status: { status: 'ACTIVE', observedGeneration: 2 } },
        'Progressing',
        /generation 3/,
      ],
      ['build', { metadata: meta(), status: { status: 'BUILD', observedGeneration: 1 } }, 'Progressing'],
      [
        'error',
        {
          metadata: meta(),
          status: {
            status: 'ERROR',
            observedGeneration: 1,
            conditions: [condition('Ready', 'False', 'InvalidMtu', 'mtu 9000 exceeds 1450')],
          },
        },
        'Degraded',
        /^mtu 9000 exceeds 1450$/,
      ],
      ['down', { metadata: meta(), status: { status: 'DOWN', observedGeneration: 1 } }, 'Suspended'],
      [
        'in use while deleted stays healthy',
        {
          metadata: meta(),
          status: {
            status: 'ACTIVE',
            observedGeneration: 1,
            conditions: [condition('Ready', 'True', 'NetworkInUse', '1 port uses it')],
          },
        },
        'Healthy',
        /port uses it/,
      ],
    ]);
  });

  it('Port', async () => {
    type P = Obj<PortSpec, PortStatus>;
    const allocated = condition('Ready', 'True', 'Allocated', 'MAC and addresses allocated');
    await expectHealth<P>('port.lua', [
      ['no status', { metadata: meta() }, 'Progressing', /allocate/],
      [
        'wired',
        {
          metadata: meta(),
          status: {
            status: 'ACTIVE',
            observedGeneration: 1,
            bindingHost: 'node-1',
            conditions: [allocated, condition('Bound', 'True', 'Wired', 'tap up')],
          },
        },
        'Healthy',
        /node-1/,
      ],
      [
        'allocated, unbound',
        { metadata: meta(), status: { status: 'DOWN', observedGeneration: 1, conditions: [allocated] } },
        'Healthy',
        /not bound/,
      ],
      [
        'waiting for an address',
        {
          metadata: meta(),
          status: {
            status: 'BUILD',
            observedGeneration: 1,
            conditions: [condition('Ready', 'False', 'NetworkNotReady', 'network net-a has no segment yet')],
          },
        },
        'Progressing',
        /no segment/,
      ],
      [
        'bound, not wired',
        {
          metadata: meta(),
          status: {
            status: 'BUILD',
            observedGeneration: 1,
            bindingHost: 'n',
            conditions: [allocated, condition('Bound', 'False', 'Wiring', 'creating tap')],
          },
        },
        'Progressing',
        /creating tap/,
      ],
      [
        'no address left',
        {
          metadata: meta(),
          status: {
            status: 'ERROR',
            observedGeneration: 1,
            conditions: [condition('Ready', 'False', 'IpAddressGenerationFailure', 'no free address in subnet v4')],
          },
        },
        'Degraded',
        /no free address/,
      ],
      [
        'spec not observed',
        { metadata: meta(2), status: { status: 'ACTIVE', observedGeneration: 1 } },
        'Progressing',
        /generation 2/,
      ],
    ]);
  });

  it('Image', async () => {
    type I = Obj<unknown, ImageStatus>;
    await expectHealth<I>('image.lua', [
      ['no status (not reported today)', { metadata: meta() }, 'Healthy', /No status/],
      ['active', { metadata: meta(), status: { status: 'active' } }, 'Healthy', /active/],
      ['queued', { metadata: meta(), status: { status: 'queued' } }, 'Progressing'],
      ['saving', { metadata: meta(), status: { status: 'saving' } }, 'Progressing'],
      [
        'killed',
        {
          metadata: meta(),
          status: { status: 'killed', conditions: [condition('Ready', 'False', 'ChecksumMismatch', 'sha256 differs')] },
        },
        'Degraded',
        /sha256 differs/,
      ],
      ['deactivated', { metadata: meta(), status: { status: 'deactivated' } }, 'Suspended'],
      ['spec not observed', { metadata: meta(2), status: { status: 'active', observedGeneration: 1 } }, 'Progressing'],
    ]);
  });

  it('Volume', async () => {
    type V = Obj<unknown, VolumeStatus>;
    await expectHealth<V>('volume.lua', [
      ['no status (not placed yet)', { metadata: meta() }, 'Progressing', /Waiting for the operator/],
      ['available', { metadata: meta(), status: { status: 'available' } }, 'Healthy'],
      [
        'in-use',
        { metadata: meta(), status: { status: 'in-use', attachments: [{ server: 'vm', state: 'attached' }] } },
        'Healthy',
      ],
      ['creating', { metadata: meta(), status: { status: 'creating' } }, 'Progressing'],
      ['extending', { metadata: meta(), status: { status: 'extending' } }, 'Progressing'],
      [
        'error',
        {
          metadata: meta(),
          status: {
            status: 'error',
            conditions: [
              condition('Ready', 'False', 'NoSpace', 'no space on node-1'),
              condition('Degraded', 'False', 'LocalAttachments', 'no attachment is served over NBD'),
            ],
          },
        },
        'Degraded',
        /^error: no space on node-1$/,
      ],
      [
        'in-use over NBD (degraded mode)',
        {
          metadata: meta(),
          status: {
            status: 'in-use',
            conditions: [
              condition(
                'Degraded',
                'True',
                'RemoteAttachment',
                'attached over NBD from node-1: that node is a single point of failure',
              ),
            ],
          },
        },
        'Healthy',
        /in-use \(attached over NBD from node-1/,
      ],
      ['error_extending', { metadata: meta(), status: { status: 'error_extending' } }, 'Degraded'],
      ['maintenance', { metadata: meta(), status: { status: 'maintenance' } }, 'Suspended'],
      [
        'spec not observed',
        { metadata: meta(2), status: { status: 'available', observedGeneration: 1 } },
        'Progressing',
      ],
    ]);
  });
});
