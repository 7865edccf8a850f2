// Every controller of the operator, registered on one manager.
import type { Manager } from '../runtime/index.ts';
import type { SchedulerConfig } from '../scheduler/index.ts';
import { registerHypervisorController } from './hypervisor.ts';
import { registerKeyPairController } from './keypair.ts';
import { registerProjectController } from './project.ts';
import { registerServerController } from './server.ts';

export interface ControllersConfig {
  /** This replica's identity (Events' reportingInstance). */
  identity: string;
  projectConcurrency: number;
  serverConcurrency: number;
  /** A hypervisor whose heartbeat is older than this is down (Nova's service_down_time). */
  heartbeatGraceSeconds: number;
  scheduler: SchedulerConfig;
}

export function registerControllers(mgr: Manager, cfg: ControllersConfig) {
  const heartbeatGraceMs = cfg.heartbeatGraceSeconds * 1000;
  const project = registerProjectController(mgr, { instance: cfg.identity, concurrency: cfg.projectConcurrency });
  const hypervisor = registerHypervisorController(mgr, { heartbeatGraceMs });
  const keypair = registerKeyPairController(mgr);
  const server = registerServerController(mgr, {
    instance: cfg.identity,
    concurrency: cfg.serverConcurrency,
    heartbeatGraceMs,
    scheduler: cfg.scheduler,
  });
  return { project, hypervisor, keypair, server };
}
