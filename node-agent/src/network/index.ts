// Network backend registry: name -> factory. Adding a backend is one file under network/ and one entry here.
import type { Logger } from '../../../operator/src/runtime/index.ts';
import type { NetworkBackend } from './backend.ts';
import type { Exec } from './exec.ts';
import { LinuxBridgeBackend } from './linuxbridge.ts';
import { NoopBackend } from './noop.ts';
import { OvsBackend } from './ovs.ts';

/** Names a backend may be configured with (--network-backend). */
export const BACKEND_NAMES = ['noop', 'linuxbridge', 'ovs'] as const;
export type BackendName = (typeof BACKEND_NAMES)[number];

export interface BackendContext {
  /** The node the backend wires. */
  nodeName: string;
  /** Underlay address of the node (VXLAN local address). */
  hostIP?: string;
  /** Runs the data-plane commands (inside --netns when set). */
  exec: Exec;
  /** Underlay device of the VXLAN tunnels (default: the device holding hostIP). */
  underlayDevice?: string;
  logger: Logger;
  /** Prefix of the per-network DHCP namespaces (default chosen by the backend). */
  dhcpNetnsPrefix?: string;
  /** OVS backend: OVSDB socket (ovs-vsctl --db) and datapath type of br-int. */
  ovs?: { db?: string; datapath?: 'netdev' | 'system' };
}

export type BackendFactory = (ctx: BackendContext) => NetworkBackend;

export const BACKENDS: Readonly<Partial<Record<BackendName, BackendFactory>>> = {
  noop: () => new NoopBackend(),
  linuxbridge: (ctx) =>
    new LinuxBridgeBackend({
      exec: ctx.exec,
      logger: ctx.logger,
      ...(ctx.underlayDevice ? { underlayDevice: ctx.underlayDevice } : {}),
      ...(ctx.dhcpNetnsPrefix ? { dhcpNetnsPrefix: ctx.dhcpNetnsPrefix } : {}),
    }),
  ovs: (ctx) =>
    new OvsBackend({
      exec: ctx.exec,
      ...(ctx.ovs?.db ? { db: ctx.ovs.db } : {}),
      ...(ctx.ovs?.datapath ? { datapathType: ctx.ovs.datapath } : {}),
      ...(ctx.underlayDevice ? { underlayDevice: ctx.underlayDevice } : {}),
      ...(ctx.hostIP ? { hostIP: ctx.hostIP } : {}),
      ...(ctx.dhcpNetnsPrefix ? { dhcpNetnsPrefix: ctx.dhcpNetnsPrefix } : {}),
      logger: ctx.logger,
    }),
};

export function createBackend(name: string, ctx: BackendContext): NetworkBackend {
  const factory = BACKENDS[name as BackendName];
  if (!factory) {
    const available = Object.keys(BACKENDS).join(', ');
    throw new Error(`network backend "${name}" is not available; available: ${available}`);
  }
  return factory(ctx);
}
