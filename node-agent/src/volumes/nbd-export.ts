// Cross-node attach of local volumes (docs/design/storage.md, "Cross-node attach over NBD"): the node that holds a
// volume's qcow2 serves it over NBD to the QEMU of a guest on another node.
//
//  - One qemu-storage-daemon (qsd) per node, listening on <hostIP>:10809 with TLS-PSK (identity `stratus`; the keys
//    file <stateDir>/nbd/psk/keys.psk, mode 0600), managed over its QMP socket <stateDir>/nbd/qsd.qmp. It outlives
//    the agent (remote guests depend on it): it is started with --daemonize, as the QEMU driver starts the qsd of a
//    cold migration (drivers/qemu.ts exportDisks): the parent exits once the daemon is ready (pid file written,
//    QMP socket and NBD server listening), the daemon runs in its own session, re-parented to init. An agent that
//    starts again adopts the daemon its pid file names when that process is a qsd of this state dir and its QMP
//    socket answers; it never starts a second one.
//  - One export per volume, named vol-<uid>: blockdev-add of the backend's local blockdev tree (node names v<serial>
//    and v<serial>-f, the same names the driver gives a volume's nodes) and block-export-add type=nbd. Both steps
//    are idempotent (an existing node or export is kept), so an agent killed between them converges.
//  - Removal: block-export-del (safe; `hard` when a stale client still holds it, since only volumes no attachment
//    needs are removed), wait for BLOCK_EXPORT_DELETED, then blockdev-del (a node still referenced by an export is
//    "busy": storage.md §2.2).
//  - The export shows the guest-visible contents (qsd opens the qcow2), so the client opens it as raw over an nbd
//    protocol node with `reconnect-delay` (storage.md §2.1): nbdConnection().
//  - A PSK change is applied by rewriting keys.psk: GnuTLS reads a server's PSK file at every handshake, so new
//    connections (and reconnects) use the new key without restarting the daemon or dropping connected guests.
//
// QMP shapes verified with query-qmp-schema on QEMU 7.2 (qsd): block-export-add {type, id, node-name, writable,
// name}, block-export-del {id, mode: safe|hard}, query-block-exports [{id, type, node-name, shutting-down}],
// event BLOCK_EXPORT_DELETED {id}, blockdev-add driver=nbd {server, export, tls-creds, reconnect-delay}.
import { randomBytes } from 'node:crypto';
import { chmod, chown, mkdir, open, readFile, rename, rm } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from 'pino';
import { silentLogger } from '../../../operator/src/runtime/index.ts';
import { type VolumeConnection, volumeSerial } from '../driver.ts';
import { type ProcReader, parsePid, procReader } from '../drivers/qemu/proc.ts';
import { type Exec, hostExec } from '../network/exec.ts';
import { QmpClient, QmpError } from '../qemu/qmp.ts';

/** The NBD port every node's qsd listens on (IANA's for NBD). */
export const NBD_PORT = 10809;
/** The PSK identity (username) clients present. */
export const NBD_PSK_IDENTITY = 'stratus';
/** Seconds a client keeps requests paused while it reconnects to a restarted or unreachable server. */
export const NBD_RECONNECT_DELAY = 10;
/** QOM id of the daemon's own TLS credentials object. */
const SERVER_TLS_ID = 'tlssrv';
const QMP_CHARDEV = 'qmp0';

export interface NbdPsk {
  /** Username presented by clients (default identity: 'stratus'). */
  identity: string;
  /** The pre-shared key, hex (from the operator's Secret). */
  key: string;
}

export interface NbdExporterOptions {
  /** The agent's state directory; the exporter owns <stateDir>/nbd. */
  stateDir: string;
  /** Address the NBD server listens on (the node's host IP, reachable from the other nodes). */
  hostIP: string;
  port?: number;
  psk: NbdPsk;
  /** qemu-storage-daemon binary (default: from PATH). */
  qemuStorageDaemon?: string;
  /** Network namespace the daemon runs in (the simulated nodes of the e2e tier); undefined: the agent's. */
  netns?: string;
  /**
   * The unprivileged user the daemon runs as (the QEMU user guests run as, drivers/qemu/user.ts; it can open the
   * volume files, which the local backend gives to that user): started through `setpriv`, its directory, keys,
   * socket and pid file owned by it. undefined: the agent's user. The daemon listens on the network, so a node with a
   * QEMU user should pass it.
   */
  owner?: { uid: number; gid: number };
  /** Concurrent NBD clients the daemon accepts (default 128). */
  maxConnections?: number;
  log?: Logger;
  /** Injected in tests. */
  exec?: Exec;
  proc?: ProcReader;
}

export interface NbdExportRequest {
  /** NBD export name (and QMP export id): vol-<uid>. */
  name: string;
  /** Volume metadata.uid (node names derive from its serial). */
  volumeId: string;
  /** The backend's local blockdev tree without node names, e.g. {driver:'qcow2', file:{driver:'file', filename}}. */
  blockdev: Record<string, unknown>;
  writable: boolean;
}

export interface NbdExportAddress {
  host: string;
  port: number;
  name: string;
}

/** Files of the exporter under the state directory. */
export interface NbdPaths {
  dir: string;
  pskDir: string;
  pskFile: string;
  qmpSocket: string;
  pidFile: string;
}

export function nbdPaths(stateDir: string): NbdPaths {
  const dir = join(stateDir, 'nbd');
  const pskDir = join(dir, 'psk');
  return {
    dir,
    pskDir,
    pskFile: join(pskDir, 'keys.psk'),
    qmpSocket: join(dir, 'qsd.qmp'),
    pidFile: join(dir, 'qsd.pid'),
  };
}

/**
 * Where a node keeps the client keys its guests' QEMUs read (writeClientPsk): <stateDir>/nbd-client, apart from the
 * exporter's <stateDir>/nbd (which stop() removes and which belongs to the daemon's user).
 */
export function nbdClientPskDir(stateDir: string): string {
  return join(stateDir, 'nbd-client');
}

/** The export name of a volume. */
export function nbdExportName(volumeId: string): string {
  return `vol-${volumeId}`;
}

/** Node name of a volume's top node in the daemon (the driver's convention: v<serial>, its file v<serial>-f). */
export function exportNodeName(volumeId: string): string {
  return `v${volumeSerial(volumeId)}`;
}

/** The node an export name vol-<uid> uses (undefined for a name of another form). */
export function nodeOfExportName(name: string): string | undefined {
  const m = /^vol-([0-9A-Za-z-]+)$/.exec(name);
  return m ? exportNodeName(m[1]!) : undefined;
}

/** QMP/QOM ids: a letter, then letters, digits, '-', '.', '_' (QEMU's id_wellformed). */
const QEMU_ID = /^[A-Za-z][A-Za-z0-9._-]{0,127}$/;

export function checkExportName(name: string): string {
  if (!QEMU_ID.test(name)) throw new Error(`invalid NBD export name ${JSON.stringify(name)}`);
  return name;
}

function checkIdentity(identity: string): string {
  if (!/^[A-Za-z0-9_.-]{1,64}$/.test(identity)) throw new Error(`invalid PSK identity ${JSON.stringify(identity)}`);
  return identity;
}

function checkKey(key: string): string {
  if (!/^[0-9a-fA-F]{32,1024}$/.test(key) || key.length % 2 !== 0) {
    throw new Error('invalid PSK key: an even number (at least 32) of hex digits');
  }
  return key.toLowerCase();
}

/** The keys.psk line GnuTLS reads: `identity:hexkey`. */
export function pskFileContent(psk: NbdPsk): string {
  return `${checkIdentity(psk.identity)}:${checkKey(psk.key)}\n`;
}

/** QEMU's option parser splits on ','; a path with one (or a newline) cannot be passed safely. */
function checkOptionValue(what: string, v: string): string {
  if (/[,\n\r\0]/.test(v)) throw new Error(`${what} ${JSON.stringify(v)}: must not contain ',' or control characters`);
  return v;
}

/** The NBD server's listen address as qsd's --nbd-server takes it (flat form; storage.md §2.1). */
export function nbdServerOption(hostIP: string, port: number, maxConnections: number): string {
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new Error(`invalid NBD port ${port}`);
  return `addr.type=inet,addr.host=${checkOptionValue('host IP', hostIP)},addr.port=${port},tls-creds=${SERVER_TLS_ID},max-connections=${maxConnections}`;
}

/** qsd's arguments (after the binary): TLS creds, NBD server, QMP monitor, pid file, daemonized. */
export function qsdArgs(o: { paths: NbdPaths; hostIP: string; port: number; maxConnections: number }): string[] {
  const p = o.paths;
  return [
    // qsd acts on its options in order: the credentials before the server that names them.
    '--object',
    `tls-creds-psk,id=${SERVER_TLS_ID},endpoint=server,dir=${checkOptionValue('PSK directory', p.pskDir)}`,
    '--nbd-server',
    nbdServerOption(o.hostIP, o.port, o.maxConnections),
    '--chardev',
    `socket,id=${QMP_CHARDEV},path=${checkOptionValue('QMP socket', p.qmpSocket)},server=on,wait=off`,
    '--monitor',
    `chardev=${QMP_CHARDEV},mode=control`,
    '--pidfile',
    checkOptionValue('pid file', p.pidFile),
    '--daemonize',
  ];
}

/** The command that starts the daemon: through `setpriv` (uid, gid, no groups, no new privileges) for an owner. */
export function qsdCommand(
  binary: string,
  args: readonly string[],
  owner?: { uid: number; gid: number },
): [string, string[]] {
  if (!owner) return [binary, [...args]];
  for (const id of [owner.uid, owner.gid]) {
    if (!Number.isInteger(id) || id < 0) throw new Error(`invalid owner id ${id}`);
  }
  return [
    'setpriv',
    [`--reuid=${owner.uid}`, `--regid=${owner.gid}`, '--clear-groups', '--no-new-privs', '--', binary, ...args],
  ];
}

/** Whether argv is the qsd of this state directory (its command line names our pid file). */
export function isExporterCmdline(argv: readonly string[] | undefined, pidFile: string): boolean {
  if (!argv || argv.length === 0) return false;
  return basename(argv[0]!).startsWith('qemu-storage-daemon') && argv.includes(pidFile);
}

/** The blockdev-add argument of an export's node: the backend's tree with node names (and read-only unless writable). */
export function exportBlockdev(
  volumeId: string,
  blockdev: Record<string, unknown>,
  writable: boolean,
): Record<string, unknown> {
  const node = exportNodeName(volumeId);
  const ro = writable ? {} : { 'read-only': true };
  const out: Record<string, unknown> = { ...blockdev, 'node-name': node, ...ro };
  const file = blockdev.file;
  if (file !== null && typeof file === 'object' && !Array.isArray(file)) {
    out.file = { ...(file as Record<string, unknown>), 'node-name': `${node}-f`, ...ro };
  }
  return out;
}

export interface NbdConnectionRequest {
  volumeId: string;
  host: string;
  port: number;
  /** Export name (vol-<uid>). */
  name: string;
  /** Directory holding the client's keys.psk (writeClientPsk), readable by the QEMU user. */
  clientPskDir: string;
  /** PSK identity (default 'stratus'). */
  identity?: string;
  readOnly?: boolean;
}

/**
 * How a QEMU on another node opens an exported volume: raw over an nbd protocol node (the export shows the
 * guest-visible contents), TLS-PSK with a client credentials object named after the serial, reconnecting for
 * NBD_RECONNECT_DELAY seconds when the exporting node's daemon is restarted or unreachable.
 */
export function nbdConnection(r: NbdConnectionRequest): VolumeConnection {
  const serial = volumeSerial(r.volumeId);
  const tls = `tls${serial}`;
  return {
    volumeId: r.volumeId,
    serial,
    blockdev: {
      driver: 'raw',
      file: {
        driver: 'nbd',
        // The flat SocketAddress form blockdev-add takes (QEMU 7.2); port is a string there.
        server: { type: 'inet', host: r.host, port: String(r.port) },
        export: r.name,
        'tls-creds': tls,
        'reconnect-delay': NBD_RECONNECT_DELAY,
      },
    },
    objects: [
      {
        'qom-type': 'tls-creds-psk',
        id: tls,
        endpoint: 'client',
        dir: r.clientPskDir,
        username: checkIdentity(r.identity ?? NBD_PSK_IDENTITY),
      },
    ],
    ...(r.readOnly ? { readOnly: true } : {}),
  };
}

/** Writes `content` to `path` atomically (temporary file, fsync, rename) with `mode`, owned by `owner` when given. */
async function writeAtomic(path: string, content: string, mode: number, owner?: { uid: number; gid: number }) {
  const tmp = `${path}.${randomBytes(4).toString('hex')}.tmp`;
  const fh = await open(tmp, 'wx', mode);
  try {
    await fh.writeFile(content);
    await fh.chmod(mode);
    if (owner) await fh.chown(owner.uid, owner.gid);
    await fh.sync();
  } finally {
    await fh.close();
  }
  try {
    await rename(tmp, path);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
}

/**
 * Writes a client's keys.psk into `dir` (created 0700): readable by `owner` (the unprivileged QEMU user the guests
 * run as, drivers/qemu/user.ts), who opens it when the connection's tls-creds-psk object is added to its QEMU. A
 * rewrite with the same content leaves the file alone.
 */
export async function writeClientPsk(
  dir: string,
  identity: string,
  key: string,
  owner?: { uid: number; gid: number },
): Promise<string> {
  const content = pskFileContent({ identity, key });
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await chmod(dir, 0o700);
  if (owner) await chown(dir, owner.uid, owner.gid);
  const file = join(dir, 'keys.psk');
  const old = await readFile(file, 'utf8').catch(() => undefined);
  if (old !== content) await writeAtomic(file, content, 0o600, owner);
  else if (owner) await chown(file, owner.uid, owner.gid);
  return file;
}

interface BlockExportInfo {
  id: string;
  type: string;
  'node-name': string;
  'shutting-down': boolean;
}

function errMsg(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** The node's NBD export daemon (one qemu-storage-daemon), driven over QMP. */
export class NbdExporter {
  readonly host: string;
  readonly port: number;
  readonly paths: NbdPaths;
  readonly #log: Logger;
  readonly #exec: Exec;
  readonly #proc: ProcReader;
  readonly #binary: string;
  readonly #maxConnections: number;
  #psk: NbdPsk;
  readonly #owner: { uid: number; gid: number } | undefined;
  /** Serialises this instance's QMP sessions (the daemon's monitor serves one client at a time). */
  #queue: Promise<unknown> = Promise.resolve();

  constructor(o: NbdExporterOptions) {
    this.#psk = o.psk;
    this.#owner = o.owner;
    this.host = o.hostIP;
    this.port = o.port ?? NBD_PORT;
    this.paths = nbdPaths(o.stateDir);
    this.#log = (o.log ?? silentLogger()).child({ component: 'nbd-export' });
    this.#exec = o.exec ?? hostExec(o.netns);
    this.#proc = o.proc ?? procReader;
    this.#binary = o.qemuStorageDaemon ?? 'qemu-storage-daemon';
    this.#maxConnections = o.maxConnections ?? 128;
    // Validate what goes onto qsd's command line now, not at the first start.
    qsdArgs({ paths: this.paths, hostIP: this.host, port: this.port, maxConnections: this.#maxConnections });
    pskFileContent(o.psk);
    qsdCommand(this.#binary, [], o.owner);
  }

  /** pid of the running daemon of this state directory, or undefined. */
  async pid(): Promise<number | undefined> {
    const pid = parsePid(await this.#proc.readPidFile(this.paths.pidFile));
    if (pid === undefined) return undefined;
    return isExporterCmdline(await this.#proc.cmdline(pid), this.paths.pidFile) ? pid : undefined;
  }

  /** Writes the server's keys, then adopts the running daemon or starts one. Idempotent. */
  start(): Promise<void> {
    return this.#serial(() => this.#ensureRunning());
  }

  /**
   * Exports a volume, or returns its existing export. An export of the same name with the other writability is
   * replaced while no client uses it (an error otherwise: a connected guest is never cut off by a changed request).
   */
  ensureExport(req: NbdExportRequest): Promise<NbdExportAddress> {
    const name = checkExportName(req.name);
    const node = exportNodeName(req.volumeId);
    return this.#session(async (qmp) => {
      let exp = (await this.#exports(qmp)).find((e) => e.id === name);
      if (exp?.['shutting-down']) {
        await this.#awaitGone(qmp, name);
        exp = undefined;
      }
      if (exp && exp['node-name'] !== node) {
        throw new Error(`NBD export ${name} serves node ${exp['node-name']}, not volume ${req.volumeId} (${node})`);
      }
      const ro = await this.#nodeReadOnly(qmp, node);
      if (ro !== undefined && ro === req.writable) {
        this.#log.info({ export: name, writable: req.writable }, 'NBD export writability changed: re-exporting');
        if (exp) await this.#remove(qmp, name, node, 'safe');
        else await qmp.execute('blockdev-del', { 'node-name': node });
        exp = undefined;
      }
      if (!exp) {
        if (ro === undefined || ro === req.writable) {
          await qmp.execute('blockdev-add', exportBlockdev(req.volumeId, req.blockdev, req.writable));
        }
        await qmp.execute('block-export-add', {
          type: 'nbd',
          id: name,
          'node-name': node,
          name,
          writable: req.writable,
        });
        this.#log.info({ export: name, node, writable: req.writable }, 'volume exported over NBD');
      }
      return { host: this.host, port: this.port, name };
    });
  }

  /**
   * Removes an export and its node; unknown succeeds. Called once no attachment needs the export, so a client still
   * connected is stale (a guest gone, a node down): its connection is dropped (block-export-del mode=hard).
   */
  removeExport(name: string): Promise<void> {
    checkExportName(name);
    return this.#session(async (qmp) => {
      const exp = (await this.#exports(qmp)).find((e) => e.id === name);
      await this.#remove(qmp, name, exp?.['node-name'] ?? nodeOfExportName(name), 'hard');
    });
  }

  /** block-export-del (safe first), BLOCK_EXPORT_DELETED, then blockdev-del of the node no export uses any more. */
  async #remove(qmp: QmpClient, name: string, node: string | undefined, inUse: 'safe' | 'hard'): Promise<void> {
    const exp = (await this.#exports(qmp)).find((e) => e.id === name);
    if (exp) {
      if (!exp['shutting-down']) {
        const deleted = qmp.waitForEvent('BLOCK_EXPORT_DELETED', {
          predicate: (e) => (e.data as { id?: string } | undefined)?.id === name,
          timeoutMs: 60_000,
        });
        deleted.catch(() => {});
        try {
          await qmp.execute('block-export-del', { id: name });
        } catch (err) {
          if (inUse === 'safe' || !(err instanceof QmpError) || !/in use/i.test(err.message)) throw err;
          this.#log.warn({ export: name }, 'NBD export still in use by a client: dropping its connections');
          await qmp.execute('block-export-del', { id: name, mode: 'hard' });
        }
        await deleted;
      } else {
        await this.#awaitGone(qmp, name);
      }
      this.#log.info({ export: name }, 'NBD export removed');
    }
    if (node && (await this.#nodeReadOnly(qmp, node)) !== undefined) {
      const users = (await this.#exports(qmp)).filter((e) => e['node-name'] === node);
      if (users.length === 0) await qmp.execute('blockdev-del', { 'node-name': node });
    }
  }

  /** Names of the exports the daemon serves (none when it does not run). */
  async exports(): Promise<string[]> {
    if ((await this.pid()) === undefined) return [];
    return this.#session(async (qmp) =>
      (await this.#exports(qmp)).filter((e) => e.type === 'nbd' && !e['shutting-down']).map((e) => e.id),
    );
  }

  /**
   * Applies a new PSK (the operator's Secret changed): rewrites the server's keys.psk. GnuTLS reads it at every
   * handshake, so new connections and reconnects use it at once; connected clients keep their sessions.
   */
  async setPsk(psk: NbdPsk): Promise<void> {
    pskFileContent(psk);
    this.#psk = psk;
    await this.#serial(() => this.#writeServerPsk());
  }

  /** Ends the daemon (every export with it) and removes everything under <stateDir>/nbd. */
  stop(): Promise<void> {
    return this.#serial(async () => {
      const pid = await this.pid();
      if (pid !== undefined) {
        try {
          const qmp = await QmpClient.connect(this.paths.qmpSocket, { timeoutMs: 5_000 });
          try {
            await qmp.execute('quit').catch(() => {});
          } finally {
            await qmp.close();
          }
        } catch {
          // no monitor: the signals below
        }
        await this.#kill(pid);
        this.#log.info({ pid }, 'NBD export daemon stopped');
      }
      await rm(this.paths.dir, { recursive: true, force: true });
    });
  }

  // ---- internals ----

  #serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#queue.then(fn, fn);
    this.#queue = run.catch(() => {});
    return run;
  }

  /** One QMP session on the running daemon (started or adopted first). */
  #session<T>(fn: (qmp: QmpClient) => Promise<T>): Promise<T> {
    return this.#serial(async () => {
      await this.#ensureRunning();
      const qmp = await QmpClient.connect(this.paths.qmpSocket, { timeoutMs: 10_000 });
      try {
        return await fn(qmp);
      } finally {
        await qmp.close();
      }
    });
  }

  async #ensureRunning(): Promise<void> {
    await this.#ownDir(this.paths.dir);
    await this.#writeServerPsk();
    const pid = await this.pid();
    if (pid !== undefined) {
      const answers = await this.#qmpAnswers();
      if (!answers) {
        throw new Error(
          `NBD export daemon (pid ${pid}) does not answer on ${this.paths.qmpSocket}: another client holds its monitor, or it hangs`,
        );
      }
      const argv = (await this.#proc.cmdline(pid)) ?? [];
      const want = nbdServerOption(this.host, this.port, this.#maxConnections);
      if (!argv.includes(want)) {
        // The listen address changed (node IP, port): restart, but never under a connected guest.
        const active = await this.#sessionNoStart((qmp) => this.#exports(qmp));
        if (active.length > 0) {
          this.#log.warn(
            { pid, want, exports: active.length },
            'NBD export daemon listens elsewhere than configured; kept while it serves exports',
          );
          return;
        }
        this.#log.info({ pid, want }, 'NBD export daemon listens elsewhere than configured: restarting it');
        await this.#kill(pid);
      } else {
        return;
      }
    }
    await rm(this.paths.pidFile, { force: true });
    await rm(this.paths.qmpSocket, { force: true });
    const args = qsdArgs({
      paths: this.paths,
      hostIP: this.host,
      port: this.port,
      maxConnections: this.#maxConnections,
    });
    // --daemonize: returns once the daemon is ready (or with its start-up error on stderr).
    const [cmd, argv] = qsdCommand(this.#binary, args, this.#owner);
    await this.#exec.run(cmd, argv, { timeoutMs: 30_000 });
    const started = await this.pid();
    if (started === undefined) throw new Error(`qemu-storage-daemon started but ${this.paths.pidFile} names no daemon`);
    this.#log.info({ pid: started, host: this.host, port: this.port }, 'NBD export daemon started');
  }

  async #sessionNoStart<T>(fn: (qmp: QmpClient) => Promise<T>): Promise<T> {
    const qmp = await QmpClient.connect(this.paths.qmpSocket, { timeoutMs: 10_000 });
    try {
      return await fn(qmp);
    } finally {
      await qmp.close();
    }
  }

  async #qmpAnswers(): Promise<boolean> {
    try {
      await this.#sessionNoStart((qmp) => qmp.execute('query-version'));
      return true;
    } catch (err) {
      this.#log.debug({ err: errMsg(err) }, 'NBD export daemon QMP check failed');
      return false;
    }
  }

  async #writeServerPsk(): Promise<void> {
    await this.#ownDir(this.paths.dir);
    await this.#ownDir(this.paths.pskDir);
    const content = pskFileContent(this.#psk);
    const old = await readFile(this.paths.pskFile, 'utf8').catch(() => undefined);
    if (old === content) {
      if (this.#owner) await chown(this.paths.pskFile, this.#owner.uid, this.#owner.gid);
      return;
    }
    await writeAtomic(this.paths.pskFile, content, 0o600, this.#owner);
    if (old !== undefined) this.#log.info('NBD PSK changed: new connections use the new key');
  }

  /** Creates a directory 0700, owned by the daemon's user. */
  async #ownDir(dir: string): Promise<void> {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await chmod(dir, 0o700);
    if (this.#owner) await chown(dir, this.#owner.uid, this.#owner.gid);
  }

  async #exports(qmp: QmpClient): Promise<BlockExportInfo[]> {
    return qmp.execute<BlockExportInfo[]>('query-block-exports');
  }

  /** Whether the node is read-only (`ro` of query-named-block-nodes), undefined when it does not exist. */
  async #nodeReadOnly(qmp: QmpClient, node: string): Promise<boolean | undefined> {
    const nodes = await qmp.execute<{ 'node-name': string; ro: boolean }[]>('query-named-block-nodes', { flat: true });
    return nodes.find((n) => n['node-name'] === node)?.ro;
  }

  /** Waits until an export that is shutting down is gone (its clients disconnected). */
  async #awaitGone(qmp: QmpClient, name: string): Promise<void> {
    for (let i = 0; i < 600; i++) {
      if (!(await this.#exports(qmp)).some((e) => e.id === name)) return;
      await sleep(100);
    }
    throw new Error(`NBD export ${name} is still shutting down`);
  }

  async #awaitExit(pid: number, timeoutMs: number): Promise<boolean> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      if (!isExporterCmdline(await this.#proc.cmdline(pid), this.paths.pidFile)) return true;
      if (Date.now() >= end) return false;
      await sleep(50);
    }
  }

  /** SIGTERM unless it has exited already, SIGKILL after 10 s. */
  async #kill(pid: number): Promise<void> {
    if (await this.#awaitExit(pid, 0)) return;
    signal(pid, 'SIGTERM');
    if (!(await this.#awaitExit(pid, 10_000))) {
      signal(pid, 'SIGKILL');
      await this.#awaitExit(pid, 10_000);
    }
  }
}

function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    // gone meanwhile
  }
}
