// Public surface of the controller runtime. It knows no Stratus kind: everything is addressed by
// group/version/plural and works on plain KubernetesObjects.

export * from './client.ts';
export * from './clock.ts';
export * from './conditions.ts';
export * from './config.ts';
export * from './controller.ts';
export * from './crash.ts';
export * from './events.ts';
export * from './informer.ts';
export * from './leaderelection.ts';
export * from './log.ts';
export * from './manager.ts';
export * from './metrics.ts';
export * from './ratelimit.ts';
export * from './workqueue.ts';
