// The Stratus operator: nova-api/scheduler/conductor, neutron-server, cinder, glance and keystone as
// controllers on one manager. `npm run operator -- --help` lists the flags.
import { setTimeout as sleep } from 'node:timers/promises';
import { KubeConfig } from '@kubernetes/client-node';
import { OperatorConfig } from './config.ts';
import { registerControllers } from './controllers/index.ts';
import { installAdmissionPolicies, installCRDs } from './crdgen/install.ts';
import {
  ConfigError,
  configUsage,
  createLogger,
  handleSignals,
  isAlreadyExists,
  isForbidden,
  KubeClient,
  type Logger,
  loadConfig,
  Manager,
} from './runtime/index.ts';

async function main(): Promise<void> {
  if (process.argv.includes('--help')) {
    console.log(`usage: stratus-operator [flags]\n\n${configUsage(OperatorConfig)}`);
    return;
  }
  let cfg: OperatorConfig;
  try {
    cfg = loadConfig(OperatorConfig);
  } catch (e) {
    if (e instanceof ConfigError) {
      console.error(e.message);
      process.exit(2);
    }
    throw e;
  }
  const log = createLogger({ level: cfg.logLevel, name: 'stratus-operator' });
  const kc = new KubeConfig();
  if (cfg.kubeconfig) kc.loadFromFile(cfg.kubeconfig);
  else kc.loadFromDefault();

  if (cfg.installCrds) {
    await installCRDs(kc);
    log.info('CRDs installed');
  }
  if (cfg.installAdmissionPolicies) {
    await installAdmissionPolicies(kc);
    log.info('admission policies installed');
  }
  // The leader Lease and the node agents' Leases live there. Made in the background, retried: the HTTP endpoints
  // (/healthz, /readyz, /metrics) must answer while the API server does not, and the leader elector retries its
  // Lease until the namespace exists.
  void ensureNamespace(new KubeClient(kc), cfg.leaseNamespace, log);

  const mgr = new Manager({
    kubeConfig: kc,
    logger: log,
    http: { port: cfg.metricsPort, host: cfg.metricsHost },
    gracefulShutdownMs: cfg.gracefulShutdownSeconds * 1000,
    leaderElection: cfg.leaderElect && {
      leaseName: cfg.leaseName,
      leaseNamespace: cfg.leaseNamespace,
      identity: cfg.identity,
      leaseDurationMs: cfg.leaseDurationSeconds * 1000,
      renewDeadlineMs: cfg.renewDeadlineSeconds * 1000,
      retryPeriodMs: cfg.retryPeriodSeconds * 1000,
    },
    // As client-go does: a replica that lost its lease exits and is restarted as a candidate.
    onLeadershipLost: (reason) => {
      log.error({ reason }, 'leadership lost; exiting');
      process.exit(1);
    },
  });
  registerControllers(mgr, {
    identity: cfg.identity,
    projectConcurrency: cfg.projectConcurrency,
    serverConcurrency: cfg.serverConcurrency,
    heartbeatGraceSeconds: cfg.heartbeatGraceSeconds,
    nodeLeaseNamespace: cfg.leaseNamespace,
    resizeConfirmWindowSeconds: cfg.resizeConfirmWindowSeconds,
    scheduler: { strategy: cfg.schedulerStrategy },
    portConcurrency: cfg.portConcurrency,
    networkConcurrency: cfg.networkConcurrency,
    underlayMtu: cfg.underlayMtu,
    orphanGraceSeconds: cfg.orphanGraceSeconds,
  });
  handleSignals(mgr);
  await mgr.start();
  log.info({ address: mgr.address(), identity: cfg.identity, leaderElect: cfg.leaderElect }, 'operator started');
  await mgr.elected();
  log.info('leading: controllers started');
}

async function ensureNamespace(client: KubeClient, name: string, log: Logger): Promise<void> {
  for (let delayMs = 500; ; delayMs = Math.min(delayMs * 2, 30_000)) {
    try {
      await client.create(
        { group: '', version: 'v1', plural: 'namespaces' },
        { apiVersion: 'v1', kind: 'Namespace', metadata: { name } },
      );
      return;
    } catch (e) {
      if (isAlreadyExists(e) || isForbidden(e)) return;
      log.warn({ err: e, namespace: name, retryInMs: delayMs }, 'cannot create the lease namespace yet');
    }
    await sleep(delayMs, undefined, { ref: false });
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
