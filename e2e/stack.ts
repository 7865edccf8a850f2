// Operator and QEMU node agent as real processes, for the e2e tests, `npm run demo` and `npm run bench:boot`.
// Each process writes its output (JSON log lines) to a log file; it may be detached so it outlives its parent
// (the demo). Plus helpers for the objects a QEMU server needs and for reading a guest's serial console.
import { type ChildProcess, spawn } from 'node:child_process';
import { openSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { KubernetesObject } from '@kubernetes/client-node';
import {
  FlavorKind,
  HypervisorKind,
  ImageKind,
  KeyPairKind,
  ServerKind,
  type ServerSpec,
  type ServerStatus,
} from '../operator/src/api/index.ts';
import { gvrOf } from '../operator/src/controllers/common.ts';
import { type GVR, isNotFound, type KubeClient } from '../operator/src/runtime/index.ts';
import { waitFor as poll } from './testing/wait.ts';

export const root = path.resolve(import.meta.dirname, '..');
export const SERVERS = gvrOf(ServerKind);
export const FLAVORS = gvrOf(FlavorKind);
export const IMAGES = gvrOf(ImageKind);
export const KEYPAIRS = gvrOf(KeyPairKind);
export const HYPERVISORS = gvrOf(HypervisorKind);
export const NAMESPACES: GVR = { group: '', version: 'v1', plural: 'namespaces' };
export const LEASES: GVR = { group: 'coordination.k8s.io', version: 'v1', plural: 'leases' };

export type Srv = KubernetesObject & { spec: ServerSpec; status?: ServerStatus };

/** waitFor with the longer default QEMU boots need (60 s). */
export const waitFor = <T>(
  what: string,
  fn: () => T | undefined | false | Promise<T | undefined | false>,
  timeoutMs = 60_000,
  intervalMs = 200,
): Promise<T> => poll(what, fn, timeoutMs, intervalMs);

/** A child process whose stdout and stderr go to `logFile`. */
export class Proc {
  readonly child: ChildProcess;
  readonly logFile: string;
  readonly name: string;
  readonly exited: Promise<void>;

  constructor(name: string, args: string[], logFile: string, detached = false) {
    this.name = name;
    this.logFile = logFile;
    const fd = openSync(logFile, 'a');
    // Only the flags configure it: STRATUS_* variables of the environment would be read as settings.
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('STRATUS_')));
    this.child = spawn(process.execPath, args, { cwd: root, env, stdio: ['ignore', fd, fd], detached });
    this.exited = new Promise((r) => this.child.once('exit', () => r()));
    if (detached) this.child.unref();
  }

  get pid(): number {
    return this.child.pid!;
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  async log(): Promise<string> {
    return readFile(this.logFile, 'utf8').catch(() => '');
  }

  /** Waits for a JSON log line whose msg is `msg` (fails when the process exits first). */
  async waitForLog(
    msg: string,
    timeoutMs = 60_000,
    pred: (line: Record<string, unknown>) => boolean = () => true,
  ): Promise<Record<string, unknown>> {
    return waitFor(
      `${this.name}: log "${msg}"`,
      async () => {
        for (const l of (await this.log()).split('\n')) {
          if (!l.includes(msg)) continue;
          try {
            const j = JSON.parse(l) as Record<string, unknown>;
            if (j.msg === msg && pred(j)) return j;
          } catch {}
        }
        if (!this.running) throw new Error(`${this.name} exited:\n${(await this.log()).slice(-3000)}`);
        return undefined;
      },
      timeoutMs,
    );
  }

  /** Signals the process and waits for its exit (SIGKILL after timeoutMs). */
  async stop(sig: NodeJS.Signals = 'SIGTERM', timeoutMs = 30_000): Promise<void> {
    if (!this.running) return;
    this.child.kill(sig);
    const t = setTimeout(() => this.child.kill('SIGKILL'), timeoutMs);
    await this.exited;
    clearTimeout(t);
  }
}

export interface OperatorProcOptions {
  kubeconfig: string;
  leaseName: string;
  leaseNamespace?: string;
  logFile: string;
  detached?: boolean;
}

export function startOperatorProc(o: OperatorProcOptions): Proc {
  return new Proc(
    'operator',
    [
      path.join(root, 'operator/src/main.ts'),
      `--kubeconfig=${o.kubeconfig}`,
      '--metrics-host=127.0.0.1',
      '--metrics-port=0',
      `--lease-name=${o.leaseName}`,
      `--lease-namespace=${o.leaseNamespace ?? 'stratus-operator-test'}`,
      `--identity=${o.leaseName}`,
      '--install-crds',
    ],
    o.logFile,
    o.detached,
  );
}

export interface AgentProcOptions {
  kubeconfig: string;
  nodeName: string;
  stateDir: string;
  accelerator: 'auto' | 'kvm' | 'tcg';
  labels: Record<string, string>;
  logFile: string;
  detached?: boolean;
  extraArgs?: string[];
}

export function agentArgs(o: AgentProcOptions): string[] {
  return [
    path.join(root, 'node-agent/src/main.ts'),
    `--kubeconfig=${o.kubeconfig}`,
    '--driver=qemu',
    `--accelerator=${o.accelerator}`,
    `--state-dir=${o.stateDir}`,
    `--node-name=${o.nodeName}`,
    '--labels',
    JSON.stringify(o.labels),
    '--metrics-host=127.0.0.1',
    '--metrics-port=0',
    '--heartbeat-seconds=2',
    '--power-off-timeout-seconds=30',
    ...(o.extraArgs ?? []),
  ];
}

export function startAgentProc(o: AgentProcOptions): Proc {
  return new Proc('node-agent', agentArgs(o), o.logFile, o.detached);
}

// ---------------------------------------------------------------------------------------------------------------
// Guests on disk
// ---------------------------------------------------------------------------------------------------------------

export const guestDir = (stateDir: string, uid: string) => path.join(stateDir, 'guests', uid);

export async function consoleText(stateDir: string, uid: string): Promise<string> {
  return (await readFile(path.join(guestDir(stateDir, uid), 'console.log'), 'utf8').catch(() => '')).replaceAll(
    '\r',
    '',
  );
}

export const count = (text: string, needle: string) => text.split(needle).length - 1;

/** Waits until `needle` appears at least `times` times on the guest's serial console; returns the console text. */
export async function waitConsole(
  stateDir: string,
  uid: string,
  needle: string,
  times = 1,
  timeoutMs = 180_000,
): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const text = await consoleText(stateDir, uid);
    if (count(text, needle) >= times) return text;
    if (Date.now() > deadline)
      throw new Error(`no ${needle} (x${times}) on the console of ${uid}:\n${text.slice(-3000)}`);
    await sleep(50);
  }
}

/** The pid in the guest's qemu.pid (0 when there is none). */
export async function qemuPid(stateDir: string, uid: string): Promise<number> {
  return Number((await readFile(path.join(guestDir(stateDir, uid), 'qemu.pid'), 'utf8').catch(() => '')).trim()) || 0;
}

/** The pid is a live QEMU of guest `uid` (a zombie or a reused pid is not). */
export async function isQemuOf(pid: number, uid: string): Promise<boolean> {
  if (pid <= 0) return false;
  return (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0').includes(uid);
}

// ---------------------------------------------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------------------------------------------

export function flavor(name: string, labels: Record<string, string>, disk = '1Gi'): KubernetesObject {
  return {
    apiVersion: FlavorKind.apiVersion,
    kind: 'Flavor',
    metadata: { name, labels },
    spec: { vcpus: 1, ram: '256Mi', disk },
  } as KubernetesObject;
}

export function image(
  name: string,
  namespace: string,
  url: string,
  sha256?: string,
  labels: Record<string, string> = {},
): KubernetesObject {
  return {
    apiVersion: ImageKind.apiVersion,
    kind: 'Image',
    metadata: { name, namespace, labels },
    spec: {
      source: { url },
      diskFormat: 'qcow2',
      ...(sha256 ? { checksum: { algorithm: 'sha256', value: sha256 } } : {}),
    },
  } as KubernetesObject;
}

export function keyPair(name: string, namespace: string, labels: Record<string, string> = {}): KubernetesObject {
  return {
    apiVersion: KeyPairKind.apiVersion,
    kind: 'KeyPair',
    metadata: { name, namespace, labels },
    spec: { publicKey: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAmz3JDWliYPOvngSOOj7kbnvOx8hgyJugms5NIm/MrM e2e@stratus' },
  } as KubernetesObject;
}

export function server(name: string, namespace: string, spec: Partial<ServerSpec>, labels = {}): Srv {
  return {
    apiVersion: ServerKind.apiVersion,
    kind: 'Server',
    metadata: { name, namespace, labels },
    spec: spec as ServerSpec,
  };
}

export async function getServer(client: KubeClient, ns: string, name: string): Promise<Srv | undefined> {
  try {
    return await client.get<Srv>(SERVERS, name, ns);
  } catch (e) {
    if (isNotFound(e)) return undefined;
    throw e;
  }
}

/** Deletes and ignores NotFound. */
export async function deleteIgnore(client: KubeClient, gvr: GVR, name: string, ns?: string): Promise<void> {
  try {
    await client.delete(gvr, name, ns);
  } catch (e) {
    if (!isNotFound(e)) throw e;
  }
}
