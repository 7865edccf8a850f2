// One real QEMU started from qemuArgs (TCG, paused): the command line is accepted and QMP answers as the driver
// expects. The command-line builder itself is unit-tested in node-agent/src/qemu/cmdline.test.ts.
import { execFile, spawn } from 'node:child_process';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { requireTools } from '../../../e2e/testing/tools.ts';
import { waitFor } from '../../../e2e/testing/wait.ts';
import { qemuArgs } from '../../src/qemu/cmdline.ts';
import { QmpClient } from '../../src/qemu/qmp.ts';

requireTools('qemu-system-x86_64', 'qemu-img');
const UUID = '6f1b2f4e-8f5c-4c1e-9c55-3c2b1e0a9d11';

describe('real QEMU', () => {
  it('starts from qemuArgs with -S and answers query-status = prelaunch', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'stratus-qemu-smoke-'));
    try {
      await promisify(execFile)('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'root.qcow2'), '64M']);
      await writeFile(join(dir, 'seed.iso'), Buffer.alloc(64 * 1024));
      const args = qemuArgs({
        name: 'smoke',
        uuid: UUID,
        accelerator: 'tcg',
        vcpus: 1,
        memoryMiB: 64,
        qmpSocket: join(dir, 'qmp.sock'),
        vncSocket: join(dir, 'vnc.sock'),
        serial: { socket: join(dir, 'serial.sock'), log: join(dir, 'console.log') },
        pidFile: join(dir, 'qemu.pid'),
        disks: [
          // cache=none needs O_DIRECT, which tmpfs lacks: writeback works on any temp dir
          { id: 'root', path: join(dir, 'root.qcow2'), cache: 'writeback', bootIndex: 0 },
          { id: 'seed', path: join(dir, 'seed.iso'), format: 'raw', media: 'cdrom', cache: 'writeback' },
        ],
        balloon: true,
        startPaused: true,
      });
      const child = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', 'pipe'] });
      let stderr = '';
      child.stderr.on('data', (d: Buffer) => {
        stderr += d.toString();
      });
      const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
      try {
        await Promise.race([
          waitFor('the QMP socket', () => stat(join(dir, 'qmp.sock')).then((s) => s.isSocket())),
          exited.then((code) => {
            throw new Error(`qemu exited ${code}: ${stderr}`);
          }),
        ]);
        const qmp = await QmpClient.connect(join(dir, 'qmp.sock'));
        expect(await qmp.queryStatus()).toEqual({ running: false, status: 'prelaunch', powerState: 'PAUSED' });
        expect(await qmp.queryKvm()).toMatchObject({ enabled: false });
        const blocks =
          await qmp.execute<{ qdev?: string; inserted?: { 'node-name': string; ro: boolean } }[]>('query-block');
        // qdev is the device id (ide-cd) or its QOM path (virtio-blk: /machine/peripheral/<id>/virtio-backend)
        const devId = (qdev = '') => qdev.replace(/^\/machine\/peripheral\/([^/]+)\/.*$/, '$1');
        expect(blocks.map((b) => [devId(b.qdev), b.inserted?.['node-name'], b.inserted?.ro])).toEqual(
          expect.arrayContaining([
            ['root', 'root-fmt', false],
            ['seed', 'seed-fmt', true],
          ]),
        );
        const pid = Number((await readFile(join(dir, 'qemu.pid'), 'utf8')).trim());
        expect(pid).toBe(child.pid);
        for (const s of ['vnc.sock', 'serial.sock']) expect((await stat(join(dir, s))).isSocket()).toBe(true);
        await qmp.quit();
        expect(await exited).toBe(0);
      } finally {
        if (child.exitCode === null) child.kill('SIGKILL');
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
