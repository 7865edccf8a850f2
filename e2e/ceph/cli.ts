// npm run ceph -- up [--bind IP] | down | status: the single-node test Ceph cluster (e2e/ceph/README.md).
import { cephRss, cephStatus, defaultCephDir, startCeph, stopCeph } from './ceph.ts';

const USAGE = `usage: npm run ceph -- <command>

  up [--bind IP]   start the cluster (idempotent; reuses a running one) and print its mon address and client key
  down             stop every daemon and remove the state directory
  status           show the cluster, its daemons and their memory (exit 1 when it is not running)

environment: STRATUS_CEPH_DIR (default \${STRATUS_CACHE_DIR:-~/.cache/stratus}/ceph-run), STRATUS_CEPH_BIND_IP
  (default 127.0.0.1)`;

const mib = (b: number) => `${(b / 1048576).toFixed(0)} MiB`;

async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  const log = (m: string) => console.error(m);
  switch (cmd) {
    case 'up': {
      const i = rest.indexOf('--bind');
      const c = await startCeph({ log, bindIP: i >= 0 ? rest[i + 1] : undefined });
      console.log(c.started ? `ceph up in ${c.seconds.toFixed(1)} s` : 'ceph already running');
      console.log(`fsid:     ${c.fsid}`);
      console.log(`monHost:  ${c.monHost}`);
      console.log(`user:     client.${c.user}`);
      console.log(`key:      ${c.key}`);
      console.log(`pools:    ${c.pools.volumes}, ${c.pools.images}`);
      console.log(`admin:    ceph ${c.adminArgs().join(' ')} -s`);
      return 0;
    }
    case 'down':
      await stopCeph({ log });
      console.log(`ceph down (${defaultCephDir()} removed)`);
      return 0;
    case 'status': {
      const s = await cephStatus();
      if (!s.running) {
        console.log(`ceph not running (${defaultCephDir()})`);
        return 1;
      }
      const rss = await cephRss();
      console.log(`fsid ${s.cluster.fsid}, mon ${s.cluster.monHost}, dir ${s.cluster.dir}`);
      for (const [d, pid] of Object.entries(s.pids))
        console.log(`  ${d.padEnd(6)} pid ${pid}  rss ${mib(rss[d] ?? 0)}`);
      return 0;
    }
    default:
      console.error(USAGE);
      return cmd === undefined || cmd === 'help' || cmd === '--help' ? 0 : 2;
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    console.error(err instanceof Error ? err.message : String(err));
    process.exit(1);
  },
);
