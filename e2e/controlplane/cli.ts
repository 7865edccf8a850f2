// npm run cluster -- up [--node] | down [--purge] | status | kubeconfig <user> [group...] | env | build
import { existsSync } from 'node:fs';
import path from 'node:path';
import { binariesDir, buildAll, helmPath, kubectlPath, readBuildInfo, repoRoot } from './build.ts';
import {
  adminKubeconfigPath,
  apiserverUrl,
  clusterConfig,
  controllers,
  down,
  effectiveConfig,
  mintKubeconfig,
  status,
  up,
} from './controlplane.ts';
import { PrerequisiteError } from './util.ts';

const USAGE = `usage: npm run cluster -- <command>

  up                          start etcd, kube-apiserver, kube-controller-manager (idempotent)
  up --node [--name N] [--image ARCHIVE…]
                              also kube-scheduler, the workload controllers and a real node (containerd,
                              kubelet, kube-proxy; root) with the pause image (--pause ARCHIVE, default
                              .images/pause.oci.tar, else e2e/node's own) and the given OCI archives
                              imported (see e2e/node/README.md)
  down [--purge]              stop nodes and components; --purge also deletes the state directory
  status                      show each component, its pid and health (exit 1 unless all healthy)
  kubeconfig <user> [group…]  mint a client-certificate kubeconfig for <user> and print its path
  env                         print shell exports: eval "$(npm run -s cluster -- env)"
  build                       build/cache the control-plane binaries and extract kubectl + helm

environment: STRATUS_CLUSTER_DIR (default <repo>/.cluster), STRATUS_CACHE_DIR (default ~/.cache/stratus),
  STRATUS_ETCD_PORT (23790), STRATUS_ETCD_PEER_PORT (23800), STRATUS_APISERVER_PORT (16443), STRATUS_KCM_PORT (16457),
  STRATUS_SCHEDULER_PORT (KCM port + 100), STRATUS_API_HOST_IFACE (stkapi0), STRATUS_API_HOST_ADDRESS (172.31.253.1),
  STRATUS_NODE_PORT_BASE (17250)`;

/** Values of a repeatable `--flag value` option. */
function optionValues(args: readonly string[], flag: string): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++)
    if (args[i] === flag && args[i + 1] !== undefined) out.push(args[++i] as string);
  return out;
}

function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  const log = (m: string) => console.error(m);
  switch (cmd) {
    case 'up': {
      const withNode = rest.includes('--node');
      const res = await up({ log, node: withNode || undefined });
      console.log(
        res.started.length === 0
          ? `cluster already running at ${res.server}`
          : `cluster up at ${res.server} in ${res.seconds.toFixed(1)} s (started ${res.started.join(', ')})`,
      );
      if (withNode) {
        const { startNode } = await import('../node/node.ts');
        let pauseArchive = optionValues(rest, '--pause')[0] ?? path.join(repoRoot, '.images', 'pause.oci.tar');
        if (!rest.includes('--pause') && !existsSync(pauseArchive)) {
          // No `npm run images` output: the test node's own pause image (gcc -static).
          const { ensureTestImages } = await import('../node/testimages.ts');
          pauseArchive = (await ensureTestImages()).pause.archive;
        }
        const node = await startNode({
          name: optionValues(rest, '--name')[0],
          pauseArchive,
          images: optionValues(rest, '--image'),
          log,
        });
        console.log(`node ${node.name} Ready in ${node.readySeconds.toFixed(1)} s (state ${node.dir})`);
      }
      console.log(`admin kubeconfig: ${res.kubeconfig}`);
      console.log(`kubectl: ${kubectlPath()}`);
      return 0;
    }
    case 'down':
      await down({ purge: rest.includes('--purge'), log });
      return 0;
    case 'status': {
      const cfg = await effectiveConfig();
      const rows = await status();
      for (const r of rows) {
        const state = r.running ? (r.healthy ? 'healthy' : 'running, NOT healthy') : 'stopped';
        console.log(
          `${r.name.padEnd(24)} ${(r.pid === undefined ? '-' : `pid ${r.pid}`).padEnd(11)} ${state.padEnd(20)} ${r.url}`,
        );
      }
      console.log(`state dir: ${cfg.stateDir}`);
      console.log(`admin kubeconfig: ${adminKubeconfigPath(cfg)}`);
      console.log(`controllers: ${controllers(cfg).join(',')}`);
      if (cfg.node) {
        const { listNodes } = await import('../node/node.ts');
        for (const n of await listNodes()) {
          console.log(`node ${n.name.padEnd(19)} ${n.running ? 'running' : 'STOPPED'} (${n.components}) ${n.dir}`);
        }
      }
      return rows.every((r) => r.healthy) ? 0 : 1;
    }
    case 'kubeconfig': {
      const [user, ...groups] = rest;
      if (!user) {
        console.error('usage: npm run cluster -- kubeconfig <user> [group...]');
        return 2;
      }
      console.log(await mintKubeconfig(user, groups));
      return 0;
    }
    case 'env': {
      const cfg = clusterConfig();
      const tools = path.dirname(kubectlPath());
      helmPath();
      console.log(`export STRATUS_KUBECONFIG=${shellQuote(adminKubeconfigPath(cfg))}`);
      console.log(`export KUBECONFIG=${shellQuote(adminKubeconfigPath(cfg))}`);
      console.log(`export STRATUS_APISERVER_URL=${shellQuote(apiserverUrl(cfg))}`);
      console.log(`export PATH=${shellQuote(tools)}:"$PATH"`);
      return 0;
    }
    case 'build': {
      const res = await buildAll(log);
      const info = await readBuildInfo();
      console.log(
        res.built
          ? `built control-plane binaries in ${res.seconds.toFixed(0)} s: ${binariesDir()}/bin`
          : `control-plane binaries cached: ${binariesDir()}/bin${info ? ` (built with ${String(info.go)})` : ''}`,
      );
      console.log(`kubectl: ${kubectlPath()}`);
      console.log(`helm: ${helmPath()}`);
      return 0;
    }
    case undefined:
    case 'help':
    case '--help':
    case '-h':
      console.log(USAGE);
      return cmd === undefined ? 2 : 0;
    default:
      console.error(`unknown command ${JSON.stringify(cmd)}\n\n${USAGE}`);
      return 2;
  }
}

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (err) {
  if (err instanceof PrerequisiteError) console.error(`missing prerequisite: ${err.message}`);
  else console.error(err instanceof Error ? err.message : err);
  process.exitCode = 1;
}
