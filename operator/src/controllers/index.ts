// Every controller of the operator, registered on one manager.
import { NODE_LEASE_NAMESPACE } from '../api/index.ts';
import type { Manager } from '../runtime/index.ts';
import type { SchedulerConfig } from '../scheduler/index.ts';
import { registerHypervisorController } from './hypervisor.ts';
import { registerKeyPairController } from './keypair.ts';
import { registerNetworkController } from './network.ts';
import { registerPortController } from './port.ts';
import { registerProjectController } from './project.ts';
import { registerSecurityGroupController } from './securitygroup.ts';
import { registerServerController } from './server.ts';
import { registerVolumeController } from './volume.ts';
import { registerVolumeSnapshotController } from './volumesnapshot.ts';
import { registerVolumeTypeController } from './volumetype.ts';

export interface ControllersConfig {
  /** This replica's identity (Events' reportingInstance). */
  identity: string;
  projectConcurrency: number;
  serverConcurrency: number;
  /** A hypervisor whose node Lease was not seen renewed for this long is down (Nova's service_down_time). */
  heartbeatGraceSeconds: number;
  /** Namespace of the node agents' Leases (default NODE_LEASE_NAMESPACE, stratus-system). */
  nodeLeaseNamespace?: string;
  /** VERIFY_RESIZE is confirmed automatically after this long (default 0: never). */
  resizeConfirmWindowSeconds?: number;
  scheduler: SchedulerConfig;
  /** Parallel Port reconciles (default 8). */
  portConcurrency?: number;
  /** Parallel Network reconciles (default 4). */
  networkConcurrency?: number;
  /** Underlay MTU (Neutron global_physnet_mtu, default 1500): VXLAN networks get 50 less. */
  underlayMtu?: number;
  /** Claims whose holder is gone are released once older than this (default 120 s). */
  orphanGraceSeconds?: number;
  /** Period of the orphan sweep (default 60 s). */
  orphanSweepSeconds?: number;
  /** Retry period of a port that could not get its addresses (default 30 s). */
  portRetrySeconds?: number;
}

export function registerControllers(mgr: Manager, cfg: ControllersConfig) {
  const heartbeatGraceMs = cfg.heartbeatGraceSeconds * 1000;
  const project = registerProjectController(mgr, { instance: cfg.identity, concurrency: cfg.projectConcurrency });
  const hypervisor = registerHypervisorController(mgr, {
    heartbeatGraceMs,
    ...(cfg.nodeLeaseNamespace ? { leaseNamespace: cfg.nodeLeaseNamespace } : {}),
  });
  const keypair = registerKeyPairController(mgr);
  const server = registerServerController(mgr, {
    instance: cfg.identity,
    concurrency: cfg.serverConcurrency,
    heartbeatGraceMs,
    resizeConfirmWindowMs: (cfg.resizeConfirmWindowSeconds ?? 0) * 1000,
    scheduler: cfg.scheduler,
  });
  const network = registerNetworkController(mgr, {
    instance: cfg.identity,
    concurrency: cfg.networkConcurrency ?? 4,
    underlayMtu: cfg.underlayMtu ?? 1500,
    orphanGraceMs: (cfg.orphanGraceSeconds ?? 120) * 1000,
    orphanSweepMs: (cfg.orphanSweepSeconds ?? 60) * 1000,
  });
  const port = registerPortController(mgr, {
    instance: cfg.identity,
    concurrency: cfg.portConcurrency ?? 8,
    allocationRetryMs: (cfg.portRetrySeconds ?? 30) * 1000,
  });
  const securityGroup = registerSecurityGroupController(mgr);
  const volume = registerVolumeController(mgr, {
    instance: cfg.identity,
    secretNamespace: cfg.nodeLeaseNamespace ?? NODE_LEASE_NAMESPACE,
  });
  const volumeSnapshot = registerVolumeSnapshotController(mgr);
  const volumeType = registerVolumeTypeController(mgr);
  return { project, hypervisor, keypair, server, network, port, securityGroup, volume, volumeSnapshot, volumeType };
}
