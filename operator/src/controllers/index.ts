// Every controller of the operator, registered on one manager.
import type { Manager } from '../runtime/index.ts';
import { registerProjectController } from './project.ts';

export interface ControllersConfig {
  /** This replica's identity (Events' reportingInstance). */
  identity: string;
  projectConcurrency: number;
}

export function registerControllers(mgr: Manager, cfg: ControllersConfig): void {
  registerProjectController(mgr, { instance: cfg.identity, concurrency: cfg.projectConcurrency });
}
