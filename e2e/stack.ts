// Operator and QEMU node agent as real processes, for the e2e tests, `npm run demo` and `npm run bench:boot`.
// Each process writes its output (JSON log lines) to a log file; it may be detached so it outlives its parent
// (the demo). Plus helpers for the objects a QEMU server needs and for reading a guest's serial console.
// NodeStack runs an operator and one QEMU agent per simulated node of a network lab (e2e/testing/netlab.ts): every
// agent runs in the root namespace (it reaches the API server on 127.0.0.1) with --netns naming its node, so its
// data plane (network backend, DHCP) and its guests' QEMUs live in the node's namespace.
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, openSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { KubernetesObject } from '@kubernetes/client-node';
import { parseAllDocuments } from 'yaml';
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

  constructor(name: string, args: string[], logFile: string, detached = false, extraEnv: Record<string, string> = {}) {
    this.name = name;
    this.logFile = logFile;
    const fd = openSync(logFile, 'a');
    // Only the flags configure it: STRATUS_* variables of the environment would be read as settings.
    // extraEnv is set on purpose (e.g. STRATUS_CRASH_AT, runtime/crash.ts).
    const env = {
      ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('STRATUS_'))),
      ...extraEnv,
    };
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
    let exited = false;
    const found = await waitFor(
      `${this.name}: log "${msg}"`,
      async () => {
        for (const l of (await this.log()).split('\n')) {
          if (!l.includes(msg)) continue;
          try {
            const j = JSON.parse(l) as Record<string, unknown>;
            if (j.msg === msg && pred(j)) return j;
          } catch {}
        }
        exited = !this.running;
        return exited ? {} : undefined; // stop polling: the process is gone
      },
      timeoutMs,
    );
    if (exited) throw new Error(`${this.name} exited before logging "${msg}":\n${(await this.log()).slice(-3000)}`);
    return found;
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
  /** Extra environment (e.g. STRATUS_CRASH_AT). */
  env?: Record<string, string>;
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
      '--install-admission-policies',
    ],
    o.logFile,
    o.detached,
    o.env,
  );
}

export interface AgentProcOptions {
  kubeconfig: string;
  nodeName: string;
  stateDir: string;
  accelerator: 'auto' | 'kvm' | 'tcg';
  /** --kvm-probe-kernel (e.g. the test image's kernel, TestImage.kernel). */
  kvmProbeKernel?: string;
  labels: Record<string, string>;
  logFile: string;
  detached?: boolean;
  /** Network namespace of the node's data plane and QEMUs (--netns); default: the agent's own. */
  netns?: string;
  /** Underlay address of the node (--host-ip). */
  hostIP?: string;
  /** --network-backend. */
  networkBackend?: 'noop' | 'linuxbridge' | 'ovs';
  /** Prefix of the per-network DHCP namespaces (--dhcp-netns-prefix). */
  dhcpNetnsPrefix?: string;
  /** Namespace of the node Lease: the operator's lease namespace (default that of startOperatorProc). */
  leaseNamespace?: string;
  extraArgs?: string[];
  /** Extra environment (e.g. STRATUS_CRASH_AT). */
  env?: Record<string, string>;
}

export function agentArgs(o: AgentProcOptions): string[] {
  return [
    path.join(root, 'node-agent/src/main.ts'),
    `--kubeconfig=${o.kubeconfig}`,
    '--driver=qemu',
    `--accelerator=${o.accelerator}`,
    ...(o.kvmProbeKernel !== undefined ? [`--kvm-probe-kernel=${o.kvmProbeKernel}`] : []),
    `--state-dir=${o.stateDir}`,
    `--node-name=${o.nodeName}`,
    '--labels',
    JSON.stringify(o.labels),
    '--metrics-host=127.0.0.1',
    '--metrics-port=0',
    '--heartbeat-seconds=2',
    `--lease-namespace=${o.leaseNamespace ?? 'stratus-operator-test'}`,
    '--power-off-timeout-seconds=30',
    // The tests' image server (e2e/images/serve.ts) listens on loopback, which image URLs may not reach by default.
    '--image-url-allow-cidr=127.0.0.0/8',
    ...(o.netns !== undefined ? [`--netns=${o.netns}`] : []),
    ...(o.hostIP !== undefined ? [`--host-ip=${o.hostIP}`] : []),
    ...(o.networkBackend !== undefined ? [`--network-backend=${o.networkBackend}`] : []),
    ...(o.dhcpNetnsPrefix !== undefined ? [`--dhcp-netns-prefix=${o.dhcpNetnsPrefix}`] : []),
    ...(o.extraArgs ?? []),
  ];
}

export function startAgentProc(o: AgentProcOptions): Proc {
  return new Proc('node-agent', agentArgs(o), o.logFile, o.detached, o.env);
}

// ---------------------------------------------------------------------------------------------------------------
// Several nodes: an operator and one agent per simulated node
// ---------------------------------------------------------------------------------------------------------------

/** Hypervisor label naming the node, for nodeSelectors that pin a Server to one node of a NodeStack. */
export const NODE_LABEL = 'test.stratus.io/node';

/** A simulated node as NodeStack needs it (structurally e2e/testing/netlab.ts LabNode). */
export interface StackNode {
  /** Lab node name (unique within the lab, e.g. <prefix>n1). */
  name: string;
  netns: string;
  hostIP: string;
}

export interface NodeStackOptions {
  /** Run id: operator lease name, prefix of the node (Hypervisor) names. A DNS label. */
  id: string;
  /** Directory of the logs and the agents' state directories (keep it short: guest socket paths must fit 107 bytes). */
  work: string;
  kubeconfig: string;
  nodes: readonly StackNode[];
  networkBackend: 'noop' | 'linuxbridge' | 'ovs';
  /** Labels of every Hypervisor (the run's label, so Servers never land on other hypervisors of the cluster). */
  labels: Record<string, string>;
  /** Default tcg. */
  accelerator?: 'auto' | 'kvm' | 'tcg';
  /** --kvm-probe-kernel of every agent. */
  kvmProbeKernel?: string;
  /** More agent flags per node (e.g. --ovs-db of the node's OVS). */
  agentArgs?: (node: StackNode) => string[];
  /** Reuse an operator the caller runs (e.g. one per test file) instead of starting one. */
  operator?: Proc;
}

/** One agent of a NodeStack. */
export interface StackAgent {
  node: StackNode;
  /** Hypervisor name: <id>-<lab node name>. */
  nodeName: string;
  stateDir: string;
  proc: Proc | undefined;
  /** How many agent processes were started for this node (log files agent-<node>-<n>.log). */
  starts: number;
}

/**
 * An operator plus one QEMU node agent per simulated node. The agents run in the root namespace, each with its own
 * state directory, --netns <node netns>, --host-ip <node underlay address>, and the labels {...labels, NODE_LABEL:
 * nodeName}; DHCP namespaces get the node's netns name plus "-d" as prefix, so removing the lab's namespaces by
 * prefix removes them too.
 */
export class NodeStack {
  readonly o: NodeStackOptions;
  operator: Proc | undefined;
  readonly agents: StackAgent[];
  #ownOperator = false;

  constructor(o: NodeStackOptions) {
    this.o = o;
    this.operator = o.operator;
    this.agents = o.nodes.map((node) => ({
      node,
      nodeName: `${o.id}-${node.name}`.toLowerCase(),
      // Short: guest sockets live under <stateDir>/guests/<uid>/ and UNIX socket paths are limited to 107 bytes.
      stateDir: path.join(o.work, `s-${node.name}`),
      proc: undefined,
      starts: 0,
    }));
  }

  /** The agent of a lab node (by lab node name or the node itself). */
  agent(node: StackNode | string): StackAgent {
    const name = typeof node === 'string' ? node : node.name;
    const a = this.agents.find((x) => x.node.name === name || x.nodeName === name);
    if (!a) throw new Error(`no agent for node ${name}`);
    return a;
  }

  /** nodeSelector pinning a Server to one node. */
  nodeSelector(node: StackNode | string): Record<string, string> {
    return { ...this.o.labels, [NODE_LABEL]: this.agent(node).nodeName };
  }

  /** Starts the operator (unless given) and every agent; resolves once all run. */
  async start(): Promise<void> {
    if (!this.operator) {
      this.#ownOperator = true;
      this.operator = startOperatorProc({
        kubeconfig: this.o.kubeconfig,
        leaseName: this.o.id,
        logFile: path.join(this.o.work, 'operator.log'),
      });
    }
    await Promise.all([
      this.#ownOperator ? this.operator.waitForLog('leading: controllers started', 120_000) : Promise.resolve(),
      ...this.agents.map((a) => this.startAgent(a.node)),
    ]);
  }

  /** Starts the agent of a node (which must not run) and waits for "node agent started". */
  async startAgent(node: StackNode | string): Promise<Proc> {
    const a = this.agent(node);
    if (a.proc?.running) throw new Error(`the agent of ${a.node.name} already runs`);
    a.starts++;
    a.proc = startAgentProc({
      kubeconfig: this.o.kubeconfig,
      nodeName: a.nodeName,
      stateDir: a.stateDir,
      accelerator: this.o.accelerator ?? 'tcg',
      ...(this.o.kvmProbeKernel ? { kvmProbeKernel: this.o.kvmProbeKernel } : {}),
      labels: { ...this.o.labels, [NODE_LABEL]: a.nodeName },
      logFile: path.join(this.o.work, `agent-${a.node.name}-${a.starts}.log`),
      netns: a.node.netns,
      hostIP: a.node.hostIP,
      networkBackend: this.o.networkBackend,
      dhcpNetnsPrefix: `${a.node.netns}-d`,
      extraArgs: this.o.agentArgs?.(a.node) ?? [],
    });
    await a.proc.waitForLog('node agent started', 120_000);
    return a.proc;
  }

  /** Kills (default SIGKILL) the agent of a node and starts a new one; guests and data plane stay. */
  async restartAgent(node: StackNode | string, signal: NodeJS.Signals = 'SIGKILL'): Promise<Proc> {
    await this.agent(node).proc?.stop(signal);
    return this.startAgent(node);
  }

  /** Stops every agent (SIGTERM: guests keep running) and the operator if this stack started it. */
  async stop(): Promise<void> {
    await Promise.all(this.agents.map((a) => a.proc?.stop('SIGTERM')));
    if (this.#ownOperator) await this.operator?.stop('SIGTERM');
  }

  /** The node whose agent hosts a guest uid (by guest directory), if any. */
  agentOf(uid: string): StackAgent | undefined {
    return this.agents.find((a) => existsSync(guestDir(a.stateDir, uid)));
  }

  /** SIGKILLs the QEMUs of these guests on every node (cleanup after a failed run; only this run's guests). */
  async killGuests(uids: Iterable<string>): Promise<void> {
    for (const uid of uids) {
      for (const a of this.agents) {
        const pid = await qemuPid(a.stateDir, uid);
        if (await isQemuOf(pid, uid)) process.kill(pid, 'SIGKILL');
      }
    }
  }
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

// ---------------------------------------------------------------------------------------------------------------
// examples/ on a test machine
// ---------------------------------------------------------------------------------------------------------------

/** The manifests of examples/ that make the demo server and its data volume, in apply order (09's second guest is left out). */
export const EXAMPLE_FILES = [
  '00-project.yaml',
  '01-flavor.yaml',
  '02-keypair.yaml',
  '03-image.yaml',
  '04-network.yaml',
  '05-securitygroup.yaml',
  '06-servergroup.yaml',
  '08-volume.yaml',
  '07-server.yaml',
] as const;

/** Name the adapted examples give their Image. */
export const EXAMPLE_IMAGE = 'stratus-test';

/**
 * examples/ adapted to a machine without the Internet: the Image is the test image served at `imageUrl` (checked by
 * its sha256) instead of Debian's cloud image, the Server boots it, is pinned with `nodeSelector` and runs short user
 * data; every object gets `labels`. Networks, security groups and the (anti-affinity) server group stay as written.
 */
export async function exampleManifests(o: {
  imageUrl: string;
  sha256: string;
  nodeSelector: Record<string, string>;
  labels?: Record<string, string>;
}): Promise<(KubernetesObject & { spec?: Record<string, unknown> })[]> {
  const out: (KubernetesObject & { spec?: Record<string, unknown> })[] = [];
  for (const f of EXAMPLE_FILES) {
    for (const doc of parseAllDocuments(await readFile(path.join(root, 'examples', f), 'utf8'))) {
      const obj = doc.toJS() as (KubernetesObject & { spec: Record<string, unknown> }) | null;
      if (!obj) continue;
      if (o.labels) obj.metadata = { ...obj.metadata, labels: { ...obj.metadata?.labels, ...o.labels } };
      if (obj.kind === 'Image') {
        obj.metadata = { ...obj.metadata, name: EXAMPLE_IMAGE };
        obj.spec = {
          source: { url: o.imageUrl },
          diskFormat: 'qcow2',
          checksum: { algorithm: 'sha256', value: o.sha256 },
          properties: { hw_architecture: 'x86_64' },
        };
      }
      if (obj.kind === 'Volume' && (obj.spec.source as { image?: string } | undefined)?.image) {
        obj.spec = { ...obj.spec, source: { image: EXAMPLE_IMAGE } };
      }
      if (obj.kind === 'Server') {
        obj.spec = {
          ...obj.spec,
          image: EXAMPLE_IMAGE,
          nodeSelector: o.nodeSelector,
          userData: '#!/bin/sh\necho "hello from $(hostname), user data ran"\n',
        };
      }
      out.push(obj);
    }
  }
  return out;
}
