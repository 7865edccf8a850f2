// Operator configuration: flags (--metrics-port=8080) and environment (STRATUS_METRICS_PORT=8080).
import { hostname } from 'node:os';
import * as z from 'zod';

export const OperatorConfig = z.object({
  kubeconfig: z.string().optional().describe('Path of a kubeconfig; default: in-cluster or $KUBECONFIG.'),
  metricsPort: z
    .int()
    .min(0)
    .max(65535)
    .default(8080)
    .describe('Port of /metrics, /healthz and /readyz (0: any free port).'),
  metricsHost: z.string().default('0.0.0.0').describe('Address the HTTP endpoints listen on.'),
  leaderElect: z
    .boolean()
    .default(true)
    .describe('Run only while holding the leader Lease (two replicas: one active).'),
  leaseName: z.string().default('stratus-operator').describe('Name of the leader election Lease.'),
  leaseNamespace: z.string().default('stratus-system').describe('Namespace of the Lease (created if missing).'),
  leaseDurationSeconds: z.number().positive().default(15).describe('How long a lease is valid without renewal.'),
  renewDeadlineSeconds: z
    .number()
    .positive()
    .default(10)
    .describe('The leader gives up if it cannot renew within this.'),
  retryPeriodSeconds: z.number().positive().default(2).describe('How often candidates and the leader retry.'),
  identity: z.string().default(`${hostname()}-${process.pid}`).describe('Identity in the Lease.'),
  installCrds: z.boolean().default(false).describe('Install or upgrade the CRDs at startup (server-side apply).'),
  installAdmissionPolicies: z
    .boolean()
    .default(false)
    .describe(
      'Install or upgrade the admission policies (admission/policies.yaml) at startup; the Helm chart ships them instead.',
    ),
  gracefulShutdownSeconds: z.number().positive().default(30).describe('Deadline for in-flight reconciles on SIGTERM.'),
  logLevel: z
    .enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'])
    .default('info')
    .describe('Log level.'),
  projectConcurrency: z.int().min(1).max(64).default(4).describe('Parallel Project reconciles.'),
  serverConcurrency: z.int().min(1).max(64).default(4).describe('Parallel Server reconciles.'),
  portConcurrency: z.int().min(1).max(64).default(8).describe('Parallel Port reconciles (address allocation).'),
  networkConcurrency: z.int().min(1).max(64).default(4).describe('Parallel Network reconciles.'),
  underlayMtu: z
    .int()
    .min(1280)
    .max(65535)
    .default(1500)
    .describe(
      "MTU of the node network carrying VXLAN (Neutron's global_physnet_mtu); networks default to this minus 50.",
    ),
  orphanGraceSeconds: z
    .number()
    .positive()
    .default(120)
    .describe('Address and segment claims whose holder is gone are released once older than this.'),
  heartbeatGraceSeconds: z
    .number()
    .positive()
    .default(60)
    .describe("A hypervisor whose agent has not reported for this long is down (Nova's service_down_time)."),
  resizeConfirmWindowSeconds: z
    .number()
    .min(0)
    .default(0)
    .describe(
      "A server in VERIFY_RESIZE is confirmed automatically after this long (Nova's resize_confirm_window); 0: never.",
    ),
  schedulerStrategy: z
    .enum(['spread', 'pack'])
    .default('spread')
    .describe('spread: prefer the emptiest hypervisor (Nova default); pack: fill hypervisors one by one.'),
});
export type OperatorConfig = z.infer<typeof OperatorConfig>;
