// Cross-node attach over NBD (node-agent/src/volumes/nbd-export.ts), end to end with a real qemu-storage-daemon and a
// real QEMU client on two simulated nodes (network namespaces of a netlab): node 1 exports a qcow2 volume with
// TLS-PSK, node 2's QEMU (-machine none, no guest) opens it with nbdConnection() through object-add + blockdev-add,
// as the driver's hot-plug does, and writes through it (HMP qemu-io on the node); the data is read back from the
// qcow2 file after the export is removed. Also: a client without the key (wrong key, no TLS) is refused; a PSK change
// applies without restarting the daemon; a second exporter on the same state directory (an agent restart) adopts the
// daemon and its exports; stop() leaves nothing. A quick throughput measurement (TLS export vs plain file) is logged,
// not asserted. Needs root, qemu-storage-daemon, qemu-system-x86_64, qemu-img and qemu-io; skipped otherwise.
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { chmod, chown, mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { volumeSerial } from '../../node-agent/src/driver.ts';
import { QmpClient, QmpError } from '../../node-agent/src/qemu/qmp.ts';
import {
  NBD_PORT,
  NbdExporter,
  nbdConnection,
  nbdExportName,
  writeClientPsk,
} from '../../node-agent/src/volumes/nbd-export.ts';
import { createLab, destroyLab, type NetLab } from '../testing/netlab.ts';
import { waitFor } from '../testing/wait.ts';

const log = (m: string) => console.error(`[nbd-export] ${m}`);
const LAB = 'nbde';
const NOBODY = { uid: 65534, gid: 65534 };

function missing(): string | undefined {
  if (process.getuid?.() !== 0) return 'not root';
  for (const tool of ['qemu-storage-daemon', 'qemu-system-x86_64', 'qemu-img', 'qemu-io']) {
    try {
      execFileSync(tool, ['--version'], { stdio: 'ignore' });
    } catch {
      return `${tool} is not installed`;
    }
  }
  return undefined;
}

const why = missing();
if (why) log(`skipped: ${why}`);

const run = (cmd: string, args: readonly string[]) => execFileSync(cmd, args, { encoding: 'utf8' });

/** A QEMU with no machine and no guest, in a namespace, driven over QMP: the client side of an attach. */
class ClientQemu {
  readonly #child: ChildProcess;
  readonly qmp: QmpClient;
  /** QEMU's stdout: HMP's qemu-io prints there (line-buffered through stdbuf). */
  #out = '';

  private constructor(child: ChildProcess, qmp: QmpClient) {
    this.#child = child;
    this.qmp = qmp;
    child.stdout?.setEncoding('utf8').on('data', (d: string) => {
      this.#out += d;
    });
  }

  static async start(netns: string, dir: string, runas?: string): Promise<ClientQemu> {
    const sock = path.join(dir, `client-${Date.now()}.qmp`);
    const args = ['-machine', 'none', '-nodefaults', '-display', 'none', '-S'];
    args.push('-qmp', `unix:${sock},server=on,wait=off`);
    if (runas) args.push('-runas', runas);
    const child = spawn('ip', ['netns', 'exec', netns, 'stdbuf', '-oL', 'qemu-system-x86_64', ...args], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const qmp = await waitFor('client QEMU QMP', async () => QmpClient.connect(sock, { timeoutMs: 2_000 }), 30_000);
    return new ClientQemu(child, qmp);
  }

  /** Runs `qemu-io <node> "<cmd>"` in the client's monitor; resolves with the result line it prints. */
  async qemuIo(node: string, cmd: string): Promise<string> {
    const from = this.#out.length;
    const reply = await this.qmp.execute<string>('human-monitor-command', {
      'command-line': `qemu-io ${node} "${cmd}"`,
    });
    if (reply.trim()) return reply;
    return waitFor(`qemu-io ${cmd}`, () => {
      const text = this.#out.slice(from);
      return /^(wrote|read) .*$|fail.*$|error.*$/im.exec(text)?.[0];
    });
  }

  async stop(): Promise<void> {
    const exited = new Promise<void>((r) => this.#child.once('exit', () => r()));
    await this.qmp.execute('quit').catch(() => {});
    await this.qmp.close();
    if (this.#child.exitCode === null && this.#child.signalCode === null) await exited;
  }
}

/** object-add + blockdev-add of a connection (top node `node`), as the driver's hot-plug does. */
async function attach(qmp: QmpClient, conn: ReturnType<typeof nbdConnection>, node: string): Promise<void> {
  for (const o of conn.objects ?? []) await qmp.execute('object-add', o);
  try {
    const file = conn.blockdev.file as Record<string, unknown>;
    await qmp.execute('blockdev-add', {
      ...conn.blockdev,
      'node-name': node,
      file: { ...file, 'node-name': `${node}-f` },
    });
  } catch (err) {
    for (const o of conn.objects ?? []) await qmp.execute('object-del', { id: o.id }).catch(() => {});
    throw err;
  }
}

async function detach(qmp: QmpClient, conn: ReturnType<typeof nbdConnection>, node: string): Promise<void> {
  await qmp.execute('blockdev-del', { 'node-name': node });
  for (const o of conn.objects ?? []) await qmp.execute('object-del', { id: o.id });
}

describe.skipIf(why !== undefined)('NBD export of local volumes (qemu-storage-daemon, TLS-PSK)', () => {
  let lab: NetLab;
  let work: string;
  let stateDir: string;
  let exporter: NbdExporter;
  const key = 'a1'.repeat(32);
  const otherKey = 'b2'.repeat(32);
  const volumeId = '6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f';
  const name = nbdExportName(volumeId);
  const serial = volumeSerial(volumeId);
  let qcow2: string;
  let client: ClientQemu | undefined;

  beforeAll(async () => {
    lab = createLab(LAB, 2, 247);
    work = await mkdtemp(path.join(tmpdir(), 'stratus-nbd-'));
    // The unprivileged client QEMU must traverse to its keys.
    await chmod(work, 0o755);
    stateDir = path.join(work, 'state');
    await mkdir(stateDir, { recursive: true });
    qcow2 = path.join(work, `${volumeId}.qcow2`);
    run('qemu-img', ['create', '-q', '-f', 'qcow2', qcow2, '64M']);
    // The volume belongs to the QEMU user, as the local backend leaves it; the daemon runs as that user.
    await chown(qcow2, 65534, 65534);
    await chmod(qcow2, 0o600);
    exporter = new NbdExporter({
      stateDir,
      hostIP: lab.nodes[0]!.hostIP,
      psk: { identity: 'stratus', key },
      netns: lab.nodes[0]!.netns,
      owner: NOBODY,
    });
  });

  afterAll(async () => {
    await client?.stop().catch(() => {});
    await exporter?.stop().catch((e) => log(`stop: ${String(e)}`));
    destroyLab(LAB);
    if (work) await rm(work, { recursive: true, force: true });
  });

  it('exports a qcow2 over TLS; a remote QEMU writes through nbdConnection(); the data lands in the file', async () => {
    await exporter.start();
    const pid = await exporter.pid();
    expect(pid).toBeDefined();
    // Detached from the agent: not its child, in a session of its own (killing the agent's process group or session
    // leaves it running).
    const stat = (p: number) =>
      readFileSync(`/proc/${p}/stat`, 'utf8')
        .replace(/^.*\) /, '')
        .split(' ');
    const [, ppid, , session] = stat(pid!);
    expect(Number(ppid)).not.toBe(process.pid);
    expect(session).not.toBe(stat(process.pid)[3]);
    // Unprivileged, keys readable by it alone.
    expect(statSync(`/proc/${pid}`).uid).toBe(NOBODY.uid);
    const keys = statSync(exporter.paths.pskFile);
    expect([keys.uid, keys.mode & 0o777]).toEqual([NOBODY.uid, 0o600]);

    const addr = await exporter.ensureExport({
      name,
      volumeId,
      blockdev: { driver: 'qcow2', file: { driver: 'file', filename: qcow2 } },
      writable: true,
    });
    expect(addr).toEqual({ host: lab.nodes[0]!.hostIP, port: NBD_PORT, name });
    // Idempotent: the same export again, no error, one export.
    await exporter.ensureExport({
      name,
      volumeId,
      blockdev: { driver: 'qcow2', file: { driver: 'file', filename: qcow2 } },
      writable: true,
    });
    expect(await exporter.exports()).toEqual([name]);

    const pskDir = path.join(work, 'client-psk');
    await writeClientPsk(pskDir, 'stratus', key, { uid: 65534, gid: 65534 });
    const st = statSync(path.join(pskDir, 'keys.psk'));
    expect([st.uid, st.mode & 0o777]).toEqual([65534, 0o600]);

    // The client QEMU runs unprivileged, as guests do: it reads its keys after dropping root.
    client = await ClientQemu.start(lab.nodes[1]!.netns, work, '65534:65534');
    const conn = nbdConnection({ volumeId, ...addr, clientPskDir: pskDir, identity: 'stratus' });
    const node = `v${serial}`;
    await attach(client.qmp, conn, node);
    const out = await client.qemuIo(node, 'write -P 0xab 1M 2M');
    expect(out).toContain('wrote 2097152/2097152 bytes');
    expect(await client.qemuIo(node, 'read -P 0xab 1M 2M')).toContain('read 2097152/2097152 bytes');
    await detach(client.qmp, conn, node);

    // The same export asked read-only (no client connected): replaced; a read-write open is refused, then back.
    const blockdev = { driver: 'qcow2', file: { driver: 'file', filename: qcow2 } };
    await exporter.ensureExport({ name, volumeId, blockdev, writable: false });
    await expect(attach(client.qmp, conn, node)).rejects.toThrow(/Permission denied|read.only/i);
    await exporter.ensureExport({ name, volumeId, blockdev, writable: true });
    await attach(client.qmp, conn, node);
    await detach(client.qmp, conn, node);

    await exporter.removeExport(name);
    expect(await exporter.exports()).toEqual([]);
    await exporter.removeExport(name); // unknown: fine
    // The export's node is gone from the daemon too: the file is no longer open (qemu-io takes the write lock).
    const check = run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0xab 1M 2M', '-c', 'read -P 0 0 1M', qcow2]);
    expect(check).not.toMatch(/fail/i);
    expect(check).toContain('read 2097152/2097152 bytes');
    expect(await exporter.pid()).toBe(pid);
  });

  it('refuses a client with the wrong key or without TLS; a PSK change applies without a restart', async () => {
    const addr = await exporter.ensureExport({
      name,
      volumeId,
      blockdev: { driver: 'qcow2', file: { driver: 'file', filename: qcow2 } },
      writable: true,
    });
    const pid = await exporter.pid();
    client ??= await ClientQemu.start(lab.nodes[1]!.netns, work, '65534:65534');
    const wrongDir = path.join(work, 'client-psk-wrong');
    await writeClientPsk(wrongDir, 'stratus', otherKey, { uid: 65534, gid: 65534 });
    const wrong = nbdConnection({ volumeId, ...addr, clientPskDir: wrongDir });
    const node = `v${serial}`;
    await expect(attach(client.qmp, wrong, node)).rejects.toBeInstanceOf(QmpError);
    const { 'tls-creds': _tls, ...plainFile } = wrong.blockdev.file as Record<string, unknown>;
    const plain = { driver: 'raw', 'node-name': node, file: plainFile };
    await expect(client.qmp.execute('blockdev-add', plain)).rejects.toThrow(/TLS/);

    // The operator's Secret changes: the daemon keeps running, new connections need the new key.
    await exporter.setPsk({ identity: 'stratus', key: otherKey });
    expect(await exporter.pid()).toBe(pid);
    const oldDir = path.join(work, 'client-psk');
    const old = nbdConnection({ volumeId, ...addr, clientPskDir: oldDir });
    await expect(attach(client.qmp, old, node)).rejects.toBeInstanceOf(QmpError);
    await attach(client.qmp, wrong, node); // the new key
    expect(await client.qemuIo(node, 'read -P 0xab 1M 2M')).toContain('read 2097152/2097152 bytes');
    // Left attached for the adoption test below.
  });

  it('a second exporter on the same state dir (agent restart) adopts the daemon and its exports', async () => {
    const pid = await exporter.pid();
    const again = new NbdExporter({
      stateDir,
      hostIP: lab.nodes[0]!.hostIP,
      psk: { identity: 'stratus', key: otherKey },
      netns: lab.nodes[0]!.netns,
      owner: NOBODY,
    });
    await again.start();
    expect(await again.pid()).toBe(pid);
    expect(await again.exports()).toEqual([name]);
    // The attached client still reads through the same export.
    const node = `v${serial}`;
    expect(await client!.qemuIo(node, 'read -P 0xab 1M 2M')).toContain('read 2097152/2097152 bytes');

    // The daemon dies (SIGKILL): the volume host's next pass starts a new one and exports again; the attached
    // client reconnects within its reconnect-delay and its I/O goes on (degraded mode: the holding node's daemon is
    // a single point of failure, a short outage is ridden out).
    process.kill(pid!, 'SIGKILL');
    await waitFor('the daemon to die', async () => (await again.pid()) === undefined);
    await again.ensureExport({
      name,
      volumeId,
      blockdev: { driver: 'qcow2', file: { driver: 'file', filename: qcow2 } },
      writable: true,
    });
    expect(await again.pid()).not.toBe(pid);
    expect(await client!.qemuIo(node, 'write -P 0xcd 4M 1M')).toContain('wrote 1048576/1048576 bytes');
    // Its client is still connected: removal drops it (only exports no attachment needs are removed).
    await again.removeExport(name);
    expect(await again.exports()).toEqual([]);
    await client!.stop();
    client = undefined;
    exporter = again;
    const data = run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0xab 1M 2M', '-c', 'read -P 0xcd 4M 1M', qcow2]);
    expect(data).not.toMatch(/fail/i);
    expect(data).toContain('read 1048576/1048576 bytes');
  });

  it('measures the TLS export against the plain file (logged, not asserted)', async () => {
    const src = path.join(work, 'bench.qcow2');
    const raw = path.join(work, 'bench-random.raw');
    const mib = 256;
    run('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', `count=${mib}`, 'status=none']);
    run('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, src]);
    await chown(src, NOBODY.uid, NOBODY.gid);
    await rm(raw);
    const benchId = '0b0b0b0b-1111-4222-8333-444455556666';
    const addr = await exporter.ensureExport({
      name: nbdExportName(benchId),
      volumeId: benchId,
      blockdev: { driver: 'qcow2', file: { driver: 'file', filename: src } },
      writable: false,
    });
    const pskDir = path.join(work, 'client-psk-bench');
    await writeClientPsk(pskDir, 'stratus', otherKey);
    const time = (args: string[]) => {
      const t0 = process.hrtime.bigint();
      execFileSync('ip', ['netns', 'exec', lab.nodes[1]!.netns, 'qemu-img', ...args], { stdio: 'inherit' });
      return Number(process.hrtime.bigint() - t0) / 1e9;
    };
    const out = path.join(work, 'bench-out.raw');
    const plainS = time(['convert', '-q', '-t', 'none', '-f', 'qcow2', '-O', 'raw', src, out]);
    await rm(out);
    const nbdS = time([
      'convert',
      '-q',
      '-t',
      'none',
      '--object',
      `tls-creds-psk,id=tls0,endpoint=client,dir=${pskDir},username=stratus`,
      '--image-opts',
      `driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=${addr.host},file.server.port=${addr.port},file.export=${addr.name},file.tls-creds=tls0`,
      '-O',
      'raw',
      out,
    ]);
    await rm(out);
    await rm(src);
    log(
      `qemu-img convert of ${mib} MiB of random data: plain qcow2 file ${plainS.toFixed(2)} s (${(mib / plainS).toFixed(0)} MiB/s), NBD over TCP+TLS-PSK across two netns ${nbdS.toFixed(2)} s (${(mib / nbdS).toFixed(0)} MiB/s)`,
    );
    await exporter.removeExport(addr.name);
  });

  it('stop() ends the daemon and leaves nothing behind', async () => {
    const pid = await exporter.pid();
    expect(pid).toBeDefined();
    await exporter.stop();
    expect(existsSync(`/proc/${pid}`) && run('cat', [`/proc/${pid}/cmdline`]).includes('qemu-storage-daemon')).toBe(
      false,
    );
    expect(existsSync(exporter.paths.dir)).toBe(false);
    expect(await exporter.pid()).toBeUndefined();
    expect(await exporter.exports()).toEqual([]);
    // Nothing listens on the NBD port of node 1 any more.
    expect(lab.sh(lab.nodes[0]!.netns, 'ss', ['-Htln', `sport = :${NBD_PORT}`]).trim()).toBe('');
  });
});
