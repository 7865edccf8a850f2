import type { EventsV1Event, KubernetesObject } from '@kubernetes/client-node';
import { describe, expect, it } from 'vitest';
import { FakeClock } from './clock.ts';
import { EventRecorder, type EventSink } from './events.ts';
import { captureLogger } from './testing.ts';

const server: KubernetesObject = {
  apiVersion: 'example.com/v1',
  kind: 'Thing',
  metadata: { name: 'web', namespace: 'proj', uid: 'u1', resourceVersion: '7' },
};

function setup(fail: boolean | Error = false) {
  const clock = new FakeClock();
  const created: Array<{ ns: string; event: Record<string, unknown> }> = [];
  const patches: Array<{ ns: string; name: string; patch: Record<string, unknown> }> = [];
  const sink: EventSink = {
    async create(ns, event: EventsV1Event) {
      if (fail) throw fail instanceof Error ? fail : new Error('forbidden');
      created.push({ ns, event: JSON.parse(JSON.stringify(event)) });
      return event;
    },
    async patch(ns, name, patch) {
      patches.push({ ns, name, patch: JSON.parse(JSON.stringify(patch)) });
      return {};
    },
  };
  const { logger, lines } = captureLogger();
  const rec = new EventRecorder({
    reportingController: 'example.com/things',
    reportingInstance: 'pod-1',
    sink,
    clock,
    logger,
    seriesWindowMs: 60_000,
    seriesFlushMs: 10_000,
  });
  return { clock, created, patches, rec, lines };
}

describe('EventRecorder', () => {
  it('writes an events.k8s.io/v1 Event about the object', async () => {
    const { created, rec } = setup();
    rec.warning(server, 'FailedScheduling', 'Schedule', 'no host fits');
    await rec.flush();
    expect(created).toHaveLength(1);
    const { ns, event } = created[0]!;
    expect(ns).toBe('proj');
    expect(event).toMatchObject({
      apiVersion: 'events.k8s.io/v1',
      kind: 'Event',
      metadata: { namespace: 'proj' },
      type: 'Warning',
      reason: 'FailedScheduling',
      action: 'Schedule',
      note: 'no host fits',
      reportingController: 'example.com/things',
      reportingInstance: 'pod-1',
      regarding: { apiVersion: 'example.com/v1', kind: 'Thing', name: 'web', namespace: 'proj', uid: 'u1' },
    });
    expect((event.metadata as { name: string }).name).toMatch(/^web\.[0-9a-f]+$/);
    expect(event.eventTime).toMatch(/\.\d{6}Z$/);
  });

  it('folds repeats into a series: one create, then at most one patch per flush interval', async () => {
    const { clock, created, patches, rec } = setup();
    for (let i = 0; i < 50; i++) rec.normal(server, 'Started', 'Start', 'guest booted');
    await rec.flush();
    expect(created).toHaveLength(1);
    expect(patches).toHaveLength(0);
    await clock.advance(10_000);
    await rec.flush();
    expect(patches).toHaveLength(1);
    const name = (created[0]!.event.metadata as { name: string }).name;
    expect(patches[0]).toMatchObject({ ns: 'proj', name, patch: { series: { count: 50 } } });
    expect((patches[0]!.patch.series as { lastObservedTime: string }).lastObservedTime).toMatch(/\.\d{6}Z$/);
    rec.normal(server, 'Started', 'Start', 'guest booted');
    rec.normal(server, 'Started', 'Start', 'other note'); // a different event
    await clock.advance(10_000);
    await rec.flush();
    expect(created).toHaveLength(2);
    expect(patches.map((p) => (p.patch.series as { count: number }).count)).toEqual([50, 51]);
  });

  it('starts a new Event once the series window has passed', async () => {
    const { clock, created, rec } = setup();
    rec.normal(server, 'Started', 'Start');
    await clock.advance(61_000);
    rec.normal(server, 'Started', 'Start');
    await rec.flush();
    expect(created).toHaveLength(2);
  });

  it('close() writes pending series counts', async () => {
    const { created, patches, rec } = setup();
    rec.normal(server, 'Started', 'Start');
    rec.normal(server, 'Started', 'Start');
    await rec.close();
    expect(created).toHaveLength(1);
    expect(patches).toHaveLength(1);
    rec.normal(server, 'Started', 'Start');
    await rec.flush();
    expect(created).toHaveLength(1); // closed
  });

  it('logs write failures instead of throwing; cluster-scoped objects go to default; notes are capped at 1 kB', async () => {
    const { rec, lines } = setup(true);
    expect(() => rec.warning({ ...server, metadata: { name: 'node1' } }, 'Bad', 'Check', 'x')).not.toThrow();
    await rec.flush();
    expect(lines.some((l) => l.msg === 'failed to write event' && l.level === 'warn')).toBe(true);

    // a namespace being deleted takes no new content: expected while its objects finalize, so not a warning
    const terminating = Object.assign(new Error('HTTP-Code: 403'), {
      code: 403,
      body: { reason: 'Forbidden', details: { causes: [{ reason: 'NamespaceTerminating' }] } },
    });
    const gone = setup(terminating);
    gone.rec.normal(server, 'Detached', 'Detach');
    await gone.rec.flush();
    expect(gone.lines.filter((l) => l.msg === 'failed to write event').map((l) => l.level)).toEqual(['debug']);

    const ok = setup();
    ok.rec.normal({ kind: 'Node', apiVersion: 'v1', metadata: { name: 'node1' } }, 'Ok', 'Check', 'é'.repeat(2000));
    await ok.rec.flush();
    expect(ok.created[0]!.ns).toBe('default');
    expect(Buffer.byteLength(ok.created[0]!.event.note as string)).toBeLessThanOrEqual(1024);
  });
});
