import { describe, expect, it } from 'vitest';
import type { VolumeAttachment } from './storage.ts';
import {
  type AttachingServer,
  attachRefusal,
  deriveVolumeState,
  nextAttachments,
  remoteAttachments,
  serverVolumeEntry,
  serverVolumeNames,
} from './volume-state.ts';

const T = '2026-01-01T00:00:00Z';
const vol = { name: 'data', status: 'available', multiattach: false, backend: 'local' };
const srv = (name: string, o: Partial<AttachingServer> = {}): AttachingServer => ({
  name,
  uid: `${name}-uid`,
  wants: true,
  guestGone: false,
  bus: 'virtio',
  ...o,
});
const ok = { ok: true };

describe('nextAttachments: the v3 flow, one step per pass', () => {
  it('reserve → attaching → attached → detaching → gone', () => {
    let a: VolumeAttachment[] = [];
    a = nextAttachments(vol, a, [srv('vm')], T).attachments;
    expect(a).toEqual([{ server: 'vm', serverUID: 'vm-uid', state: 'reserved', bus: 'virtio' }]);
    a = nextAttachments(vol, a, [srv('vm', { node: 'n1', reach: ok })], T).attachments;
    expect(a[0]).toMatchObject({ state: 'attaching', node: 'n1' });
    a = nextAttachments(vol, a, [srv('vm', { node: 'n1', reach: ok })], T).attachments;
    expect(a[0]?.state).toBe('attaching');
    const reported = { state: 'attached' as const, device: 'd0123', bus: 'scsi' };
    a = nextAttachments(vol, a, [srv('vm', { node: 'n1', reach: ok, reported })], T).attachments;
    expect(a[0]).toMatchObject({ state: 'attached', device: 'd0123', bus: 'scsi', attachedAt: T });
    a = nextAttachments(vol, a, [srv('vm', { node: 'n1', wants: false, reported })], T).attachments;
    expect(a[0]?.state).toBe('detaching');
    a = nextAttachments(vol, a, [srv('vm', { node: 'n1', wants: false, reported })], T).attachments;
    expect(a[0]?.state).toBe('detaching');
    a = nextAttachments(vol, a, [srv('vm', { node: 'n1', wants: false })], T).attachments;
    expect(a).toEqual([]);
  });
  it('a reserved attachment of a server that no longer wants it is dropped at once', () => {
    const a = [{ server: 'vm', serverUID: 'vm-uid', state: 'reserved' as const }];
    expect(nextAttachments(vol, a, [srv('vm', { wants: false })], T).attachments).toEqual([]);
  });
  it('a gone server, a new server of the same name, a moved server or a gone guest count as detached', () => {
    const a = [{ server: 'vm', serverUID: 'vm-uid', node: 'n1', state: 'attached' as const }];
    expect(nextAttachments(vol, a, [], T, false).attachments).toEqual([]);
    expect(nextAttachments(vol, a, [srv('vm', { uid: 'other', node: 'n1' })], T, false).attachments).toEqual([]);
    expect(nextAttachments(vol, a, [srv('vm', { node: 'n2' })], T, false).attachments).toEqual([]);
    expect(nextAttachments(vol, a, [srv('vm', { node: 'n1', guestGone: true })], T).attachments).toEqual([]);
  });
  it('a node that cannot reach the backend: refused, volume untouched', () => {
    const r = nextAttachments(vol, [], [srv('vm', { node: 'n1', reach: { ok: false, reason: 'no rbd' } })], T);
    expect(r.attachments).toEqual([]);
    expect(r.refused).toEqual([
      {
        server: 'vm',
        reason: 'BackendUnreachable',
        message: 'Invalid volume: hypervisor n1 cannot reach volume backend local: no rbd',
      },
    ]);
  });
  it('a reservation made before binding is dropped and refused when the node cannot reach the backend', () => {
    const a = [{ server: 'vm', serverUID: 'vm-uid', state: 'reserved' as const }];
    const r = nextAttachments(
      { ...vol, status: 'reserved' },
      a,
      [srv('vm', { node: 'n2', reach: { ok: false, reason: 'x' } })],
      T,
    );
    expect(r.attachments).toEqual([]);
    expect(r.refused.map((x) => x.reason)).toEqual(['BackendUnreachable']);
    expect(
      attachRefusal({ ...vol, status: 'reserved' }, a, { name: 'vm', uid: 'vm-uid', node: 'n2', reach: { ok: false } })
        ?.reason,
    ).toBe('BackendUnreachable');
  });
  it('non-multiattach: the oldest server wins, the other is refused in Cinder’s words', () => {
    const r = nextAttachments(vol, [], [srv('b', { creationTimestamp: '2' }), srv('a', { creationTimestamp: '1' })], T);
    expect(r.attachments.map((x) => x.server)).toEqual(['a']);
    expect(r.refused).toEqual([
      {
        server: 'b',
        reason: 'VolumeInUse',
        message: 'Invalid volume: volume data already attached to server a and is not multiattach',
      },
    ]);
  });
  it('multiattach: both servers get attachments', () => {
    const r = nextAttachments({ ...vol, multiattach: true }, [], [srv('a'), srv('b')], T);
    expect(r.attachments.map((x) => x.server).sort()).toEqual(['a', 'b']);
    expect(r.refused).toEqual([]);
  });
  it('a volume not available: refused with its status', () => {
    const r = nextAttachments({ ...vol, status: 'creating' }, [], [srv('vm')], T);
    expect(r.refused[0]?.message).toBe(
      'Invalid volume: Volume data status must be available or in-use, but the current status is creating',
    );
  });
  it('no new attachment while the volume is being deleted', () => {
    expect(nextAttachments(vol, [], [srv('vm')], T, false)).toEqual({ attachments: [], refused: [] });
  });
  it('a detaching attachment listed again goes back to attaching', () => {
    const a = [{ server: 'vm', serverUID: 'vm-uid', node: 'n1', state: 'detaching' as const }];
    expect(nextAttachments(vol, a, [srv('vm', { node: 'n1', reach: ok })], T).attachments[0]?.state).toBe('attaching');
  });
});

describe('attachRefusal', () => {
  it('no refusal for the server that holds the attachment', () => {
    const a = [{ server: 'vm', serverUID: 'u', state: 'attached' as const }];
    expect(attachRefusal({ ...vol, status: 'in-use' }, a, { name: 'vm', uid: 'u' })).toBeUndefined();
  });
});

describe('deriveVolumeState', () => {
  const base = { deleting: false, node: 'n1', specSize: '1Gi', fromImage: false, attachments: [] };
  const host = (state: string, o: Record<string, unknown> = {}) => ({ node: 'n1', state, size: '1Gi', ...o }) as never;
  it('not placed: the operator’s own status', () => {
    expect(deriveVolumeState({ ...base, node: undefined }).status).toBe('creating');
    expect(deriveVolumeState({ ...base, node: undefined, status: 'error' }).status).toBe('error');
  });
  it('no report, a report of another node, creating: creating (downloading from an image)', () => {
    expect(deriveVolumeState(base).status).toBe('creating');
    expect(deriveVolumeState({ ...base, host: host('available', { node: 'n2' }) }).status).toBe('creating');
    expect(deriveVolumeState({ ...base, fromImage: true, host: host('creating') }).status).toBe('downloading');
  });
  it('available: the size follows the host', () => {
    expect(deriveVolumeState({ ...base, host: host('available') })).toEqual({ status: 'available', size: '1Gi' });
  });
  it('extend: extending until the host holds the new size', () => {
    const s = { ...base, specSize: '2Gi', size: '1Gi' };
    expect(deriveVolumeState({ ...s, host: host('available') })).toEqual({ status: 'extending', size: '1Gi' });
    expect(deriveVolumeState({ ...s, host: host('available', { size: '2Gi' }) })).toEqual({
      status: 'available',
      size: '2Gi',
    });
    expect(deriveVolumeState({ ...s, host: host('error', { fault: 'no space' }) })).toEqual({
      status: 'error_extending',
      size: '1Gi',
      fault: 'no space',
    });
  });
  it('errors carry the host’s fault; deleting; error_deleting', () => {
    expect(deriveVolumeState({ ...base, host: host('error', { fault: 'boom' }) })).toMatchObject({
      status: 'error',
      fault: 'boom',
    });
    expect(deriveVolumeState({ ...base, deleting: true, host: host('available') }).status).toBe('deleting');
    expect(deriveVolumeState({ ...base, deleting: true, host: host('error') }).status).toBe('error_deleting');
  });
  it('attachments: in-use wins, then detaching, attaching, reserved', () => {
    const at = (...states: string[]) =>
      deriveVolumeState({
        ...base,
        host: host('available'),
        attachments: states.map((state, i) => ({ server: `s${i}`, state }) as VolumeAttachment),
      }).status;
    expect(at('attached', 'detaching')).toBe('in-use');
    expect(at('detaching', 'reserved')).toBe('detaching');
    expect(at('attaching')).toBe('attaching');
    expect(at('reserved')).toBe('reserved');
  });
});

describe('helpers', () => {
  it('remote attachments: local volume, attached on another node', () => {
    const a = [
      { server: 'x', node: 'n1', state: 'attached' as const },
      { server: 'y', node: 'n2', state: 'attaching' as const },
    ];
    expect(remoteAttachments('local', 'n1', a).map((x) => x.server)).toEqual(['y']);
    expect(remoteAttachments('rbd', 'n1', a)).toEqual([]);
  });
  it('server entries: the boot volume first, boot index 0', () => {
    const spec = {
      bootVolume: 'root',
      bootVolumeDeleteOnTermination: true,
      volumes: [{ volume: 'd', bus: 'scsi' as const }],
    };
    expect(serverVolumeNames(spec)).toEqual(['root', 'd']);
    expect(serverVolumeEntry(spec, 'root')).toEqual({ bus: 'virtio', bootIndex: 0, deleteOnTermination: true });
    expect(serverVolumeEntry(spec, 'd')).toEqual({ bus: 'scsi', deleteOnTermination: false });
    expect(serverVolumeEntry(spec, 'x')).toBeUndefined();
  });
});
