// The SecurityGroup controller: validates groups and reports Ready with observedGeneration. Enforcement is the node
// agent's (it turns the rules of the groups of its ports into nftables); a rule naming a remote group that does not
// exist matches no peer until the group appears.
import type { KubernetesObject } from '@kubernetes/client-node';
import {
  DEFAULT_SECURITY_GROUP,
  defaultSecurityGroupRules,
  type SecurityGroup,
  SecurityGroupKind,
} from '../api/index.ts';
import {
  generationChanged,
  isAlreadyExists,
  type KubeClient,
  type Manager,
  type ReconcileContext,
  type Request,
} from '../runtime/index.ts';
import { applyStatusIfChanged, gvrOf, requeueOnConflict, withConditions } from './common.ts';

export const SECURITY_GROUPS = gvrOf(SecurityGroupKind);

/** The manifest of a namespace's `default` security group with OpenStack's default rules. */
export function defaultSecurityGroup(namespace: string): SecurityGroup & KubernetesObject {
  return {
    apiVersion: SecurityGroupKind.apiVersion,
    kind: SecurityGroupKind.kind,
    metadata: {
      name: DEFAULT_SECURITY_GROUP,
      namespace,
      labels: { 'app.kubernetes.io/managed-by': 'stratus' },
    },
    spec: {
      description: 'Default security group',
      stateful: true,
      rules: defaultSecurityGroupRules(),
    },
  };
}

/** Creates the namespace's default security group unless it exists. Returns true when it created it. */
export async function ensureDefaultSecurityGroup(client: KubeClient, namespace: string): Promise<boolean> {
  try {
    await client.create(SECURITY_GROUPS, defaultSecurityGroup(namespace));
    return true;
  } catch (e) {
    if (isAlreadyExists(e)) return false;
    throw e;
  }
}

export function registerSecurityGroupController(mgr: Manager, opts: { concurrency?: number } = {}) {
  const groups = mgr.informer<SecurityGroup>(SECURITY_GROUPS);
  const client = mgr.client;

  async function reconcile(req: Request, _ctx: ReconcileContext) {
    const sg = groups.get(req.name, req.namespace);
    if (!sg || sg.metadata.deletionTimestamp) return undefined;
    const gen = sg.metadata.generation;
    const parsed = SecurityGroupKind.spec.safeParse(sg.spec);
    let ready: { status: 'True' | 'False'; reason: string; message: string };
    if (!parsed.success) {
      ready = { status: 'False', reason: 'InvalidSpec', message: parsed.error.message.slice(0, 2000) };
    } else {
      ready = { status: 'True', reason: 'Valid', message: `${parsed.data.rules.length} rules` };
    }
    await applyStatusIfChanged(client, SecurityGroupKind, sg as SecurityGroup & KubernetesObject, {
      observedGeneration: gen,
      conditions: withConditions(sg.status?.conditions, [{ type: 'Ready', ...ready }], gen),
    });
    return undefined;
  }

  const controller = mgr.addController({
    name: 'securitygroup',
    reconcile: requeueOnConflict(reconcile),
    maxConcurrentReconciles: opts.concurrency ?? 2,
  });
  controller.for(groups, { updatePredicate: generationChanged });
  return { controller };
}
