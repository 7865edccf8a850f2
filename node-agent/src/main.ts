// The Stratus node agent: nova-compute for one node (or, with --driver=fake --fake-nodes=N, N simulated nodes).
// `node node-agent/src/main.ts --help` lists the flags.
import { KubeConfig } from '@kubernetes/client-node';
import {
  ConfigError,
  configUsage,
  createLogger,
  handleSignals,
  loadConfig,
  Manager,
} from '../../operator/src/runtime/index.ts';
import {
  AgentConfig,
  fakeOptionsFrom,
  NodeAgent,
  networkBackendName,
  nodeOptionsFrom,
  qemuOptionsFrom,
} from './agent.ts';
import { createDriver } from './drivers/index.ts';
import { resolveQemuUser } from './drivers/qemu/user.ts';
import { QemuDriver } from './drivers/qemu.ts';
import { installLastResort } from './lastresort.ts';
import type { NetworkBackend } from './network/backend.ts';
import { hostExec } from './network/exec.ts';
import { createBackend } from './network/index.ts';
import { FAKE_IMAGES, FakeExporter, FakeVolumeBackend, fakeNbdConnection } from './volumes/fake.ts';
import { nodeVolumes } from './volumes/node.ts';

async function main(): Promise<void> {
  if (process.argv.includes('--help')) {
    console.log(`usage: stratus-node-agent [flags]\n\n${configUsage(AgentConfig)}`);
    return;
  }
  let cfg: AgentConfig;
  try {
    cfg = loadConfig(AgentConfig);
    if (cfg.fakeNodes > 1 && cfg.driver !== 'fake') throw new ConfigError(['--fake-nodes needs --driver=fake']);
    if (cfg.fakeNodes > 1 && networkBackendName(cfg) !== 'noop') {
      throw new ConfigError(['--fake-nodes needs --network-backend=noop (simulated nodes share one host)']);
    }
  } catch (e) {
    if (e instanceof ConfigError) {
      console.error(e.message);
      process.exit(2);
    }
    throw e;
  }
  const log = createLogger({ level: cfg.logLevel, name: 'stratus-node-agent' });
  // Errors no code path caught: a lost promise is logged and the agent goes on; an uncaught exception is logged at
  // fatal level and ends the process (guests keep running). Why: lastresort.ts.
  installLastResort(log);
  const kc = new KubeConfig();
  if (cfg.kubeconfig) kc.loadFromFile(cfg.kubeconfig);
  else kc.loadFromDefault();

  const names =
    cfg.fakeNodes > 1 ? Array.from({ length: cfg.fakeNodes }, (_, i) => `${cfg.nodeName}-${i}`) : [cfg.nodeName];
  let drivers: ReturnType<typeof createDriver>[];
  let backends: NetworkBackend[];
  const backendName = networkBackendName(cfg);
  const common = nodeOptionsFrom(cfg);
  try {
    drivers = names.map((nodeName) =>
      createDriver(cfg.driver, {
        nodeName,
        logger: log,
        ...(cfg.driver === 'fake' ? { fake: fakeOptionsFrom(cfg) } : { qemu: qemuOptionsFrom(cfg) }),
      }),
    );
    backends = names.map((nodeName) =>
      createBackend(backendName, {
        nodeName,
        ...(common.hostIP ? { hostIP: common.hostIP } : {}),
        exec: hostExec(cfg.netns),
        ...(cfg.underlayDevice ? { underlayDevice: cfg.underlayDevice } : {}),
        logger: log.child({ node: nodeName, component: 'network' }),
        ...(cfg.dhcpNetnsPrefix ? { dhcpNetnsPrefix: cfg.dhcpNetnsPrefix } : {}),
        ovs: { ...(cfg.ovsDb ? { db: cfg.ovsDb } : {}), datapath: cfg.ovsDatapath },
      }),
    );
  } catch (e) {
    console.error((e as Error).message);
    process.exit(2);
  }

  // Agents run no leader election: each node's agent is the only writer of its guests.
  const mgr = new Manager({
    kubeConfig: kc,
    logger: log,
    http: { port: cfg.metricsPort, host: cfg.metricsHost },
    gracefulShutdownMs: cfg.gracefulShutdownSeconds * 1000,
  });
  // Block storage (volumes/node.ts) runs with the qemu driver: its image cache, state directory and QEMU user.
  const owner = cfg.driver === 'qemu' && cfg.qemuUser ? await resolveQemuUser(cfg.qemuUser) : undefined;
  const agents = names.map((nodeName, i) => {
    const driver = drivers[i]!;
    const volumes =
      driver instanceof QemuDriver
        ? nodeVolumes({
            client: mgr.client,
            nodeName,
            stateDir: driver.stateDir,
            ...(common.hostIP ? { hostIP: common.hostIP } : {}),
            ...(owner ? { owner: { uid: owner.uid, gid: owner.gid } } : {}),
            ...(cfg.netns ? { netns: cfg.netns } : {}),
            ...(common.leaseNamespace ? { secretNamespace: common.leaseNamespace } : {}),
            images: {
              ensure: (src, opts) => {
                const cache = driver.imageCache;
                if (!cache) throw new Error('the image cache is not open yet');
                return cache.ensure(src, opts);
              },
            },
            log: log.child({ node: nodeName, component: 'volumes' }),
          })
        : undefined;
    if (volumes && driver instanceof QemuDriver) driver.addImageUser(() => volumes.imagesInUse());
    // Simulated nodes (fake driver) hold their volumes in memory: the same flows, no data.
    const fake = volumes ? undefined : new Map([['local', new FakeVolumeBackend({ node: nodeName })]]);
    return new NodeAgent(mgr, {
      ...common,
      nodeName,
      driver,
      networkBackend: backends[i]!,
      ...(volumes ? { volumeHost: volumes.host, volumeConnectors: volumes.connectors } : {}),
      ...(fake
        ? {
            volumeHost: { backends: fake, images: FAKE_IMAGES, exporter: new FakeExporter() },
            volumeConnectors: { backends: fake, nbd: fakeNbdConnection },
          }
        : {}),
    });
  });
  for (let i = 0; i < agents.length; i += 10) await Promise.all(agents.slice(i, i + 10).map((a) => a.init()));

  handleSignals(mgr, {
    exit: (code) => {
      void Promise.all(agents.map((a) => a.stop().then(() => a.driver.close()))).finally(() => process.exit(code));
    },
  });
  await mgr.start();
  for (const a of agents) a.start();
  log.info(
    { address: mgr.address(), nodes: names.length, driver: cfg.driver, networkBackend: backendName, first: names[0] },
    'node agent started',
  );
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
