// The bootable test guest image: build (or reuse), boot under TCG with a NoCloud seed, check the console markers,
// user-data, static network config and the TCP service, reset, then ACPI power-off through QMP.
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QmpClient } from '../../node-agent/src/qemu/qmp.ts';
import { run } from '../controlplane/util.ts';
import { ensureTestImage, type TestImage } from '../images/build.ts';
import { staticNetworkConfig, writeSeedIso } from '../images/seed.ts';
import { waitFor } from '../testing/wait.ts';

const log = (m: string) => console.error(`[guest-image] ${m}`);
const MAC = 'fa:16:3e:00:00:01';

async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const { port } = srv.address() as net.AddressInfo;
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  return port;
}

async function readTcp(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const sock = net.connect(port, '127.0.0.1');
    let data = '';
    sock.setEncoding('utf8');
    sock.setTimeout(5000, () => sock.destroy(new Error('timeout')));
    sock.on('data', (c: string) => {
      data += c;
    });
    sock.on('end', () => resolve(data));
    sock.on('error', reject);
  });
}

const count = (text: string, needle: string) => text.split(needle).length - 1;

describe('test guest image', () => {
  let image: TestImage;
  let work: string;
  let qemu: ChildProcess | undefined;

  beforeAll(async () => {
    const t0 = Date.now();
    image = await ensureTestImage({ log });
    log(`image ${image.path} (${image.size} bytes) ready in ${Date.now() - t0} ms`);
    work = await mkdtemp(path.join(os.tmpdir(), 'stratus-guest-'));
  }, 300_000);

  afterAll(async () => {
    if (qemu && qemu.exitCode === null && qemu.signalCode === null) qemu.kill('SIGKILL');
    if (work) await rm(work, { recursive: true, force: true });
  });

  it('is a qcow2 image with the checksums of its bytes', async () => {
    expect(image.format).toBe('qcow2');
    expect(image.sha256).toMatch(/^[0-9a-f]{64}$/);
    expect(image.sha512).toMatch(/^[0-9a-f]{128}$/);
    const info = JSON.parse((await run('qemu-img', ['info', '--output=json', image.path])).stdout) as {
      format: string;
      'virtual-size': number;
    };
    expect(info.format).toBe('qcow2');
    expect(info['virtual-size']).toBe(image.virtualSize);
  });

  it('rebuilds byte for byte from the same inputs', async () => {
    // A fresh cache directory (fresh apt resolution and build), sharing only the downloaded .debs.
    const debDir = path.join(path.dirname(path.dirname(image.path)), 'debs');
    const again = await ensureTestImage({ cacheDir: path.join(work, 'cache'), debDir, force: true });
    expect(again.sha256).toBe(image.sha256);
    expect(again.size).toBe(image.size);
  }, 120_000);

  it('boots with a NoCloud seed, runs user-data, serves TCP, resets and powers off on the ACPI button', async () => {
    const overlay = path.join(work, 'overlay.qcow2');
    const seed = path.join(work, 'seed.iso');
    const consoleLog = path.join(work, 'console.log');
    const qmpSock = path.join(work, 'qmp.sock');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', image.path, overlay, '1G']);
    await writeSeedIso(seed, {
      instanceId: 'iid-guest-image-test',
      hostname: 't-guest',
      userData: '#!/bin/sh\necho USERDATA-RAN-$((6*7))\n',
      networkConfig: staticNetworkConfig({
        mac: MAC,
        address: '10.0.2.15/24',
        gateway: '10.0.2.2',
        nameservers: ['10.0.2.3'],
      }),
    });
    const fwd = await freePort();
    const started = Date.now();
    qemu = spawn(
      'qemu-system-x86_64',
      [
        ['-machine', 'q35', '-accel', 'tcg', '-m', '256', '-nographic', '-monitor', 'none'],
        ['-serial', `file:${consoleLog}`],
        ['-drive', `file=${overlay},if=virtio,format=qcow2`],
        ['-drive', `file=${seed},if=virtio,format=raw,readonly=on`],
        ['-netdev', `user,id=n0,hostfwd=tcp:127.0.0.1:${fwd}-:8080`],
        ['-device', `virtio-net-pci,netdev=n0,mac=${MAC}`],
        ['-qmp', `unix:${qmpSock},server=on,wait=off`, '-sandbox', 'on'],
      ].flat(),
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    let stderr = '';
    qemu.stderr?.on('data', (c: Buffer) => {
      stderr += c.toString();
    });
    const exited = new Promise<number | null>((resolve) => qemu!.once('exit', (code) => resolve(code)));
    // The guest's tty turns \n into \r\n.
    const consoleText = async () => (await readFile(consoleLog, 'utf8').catch(() => '')).replaceAll('\r', '');
    const waitConsole = async (needle: string, times: number, timeoutMs: number) => {
      try {
        return await Promise.race([
          waitFor(
            `${needle} (x${times}) on the console`,
            async () => {
              const text = await consoleText();
              return count(text, needle) >= times ? text : undefined;
            },
            timeoutMs,
          ),
          exited.then((code) => {
            throw new Error(`qemu exited ${code}; stderr: ${stderr}`);
          }),
        ]);
      } catch (err) {
        throw new Error(`${String(err)}\nconsole:\n${(await consoleText()).slice(-3000)}`);
      }
    };
    /** One QMP command on a fresh connection (QmpClient negotiates the greeting and capabilities). */
    const qmp = async (command: (c: QmpClient) => Promise<void>) => {
      const c = await QmpClient.connect(qmpSock);
      try {
        await command(c);
      } finally {
        await c.close();
      }
    };

    let text = await waitConsole('STRATUS-GUEST-READY', 1, 120_000);
    log(`READY ${Date.now() - started} ms after QEMU start (TCG)`);
    expect(text).toContain('STRATUS-GUEST-READY hostname=t-guest instance-id=iid-guest-image-test\n');
    expect(count(text, 'STRATUS-GUEST-READY')).toBe(1);
    expect(text).toContain('USERDATA-RAN-42\n');
    expect(text).toContain('STRATUS-GUEST-ADDR eth0 10.0.2.15/24\n');
    expect(text.indexOf('USERDATA-RAN-42')).toBeLessThan(text.indexOf('STRATUS-GUEST-READY'));
    // slirp forwards to 10.0.2.15:8080, so this also proves the static address took.
    expect(await readTcp(fwd)).toBe('t-guest\n');

    const resetAt = Date.now();
    await qmp((c) => c.reset());
    text = await waitConsole('STRATUS-GUEST-READY', 2, 120_000);
    log(`READY again ${Date.now() - resetAt} ms after system_reset`);
    expect(count(text, 'USERDATA-RAN-42')).toBe(2);

    const powerdownAt = Date.now();
    await qmp((c) => c.powerdown());
    const code = await Promise.race([exited, sleep(30_000).then(() => 'timeout' as const)]);
    log(`QEMU exited ${Date.now() - powerdownAt} ms after system_powerdown`);
    text = await consoleText();
    expect(code, `console:\n${text.slice(-2000)}`).toBe(0);
    expect(count(text, 'STRATUS-GUEST-POWEROFF')).toBe(1);
  }, 300_000);
});
