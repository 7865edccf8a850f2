// The Project controller (Keystone projects): a Project owns one namespace, labelled with the
// project, with Neutron's `default` security group in it. The namespace is created (or adopted when
// it exists unowned) after the finalizer is in place; on deletion the controller deletes the namespace and releases the finalizer only once the
// namespace is gone, so nothing a tenant created outlives its project.
import { PatchStrategy, type V1Namespace } from '@kubernetes/client-node';
import { DEFAULT_SECURITY_GROUP, type Project, ProjectKind, type SecurityGroup } from '../api/index.ts';
import {
  addFinalizer,
  type EventRecorder,
  type GVR,
  hasFinalizer,
  isAlreadyExists,
  isNotFound,
  type Manager,
  ownerReference,
  type ReconcileContext,
  type Request,
  removeFinalizer,
} from '../runtime/index.ts';
import { applyStatusIfChanged, gvrOf, requeueOnConflict, specOrMetaChanged, withConditions } from './common.ts';
import { ensureDefaultSecurityGroup, SECURITY_GROUPS } from './securitygroup.ts';

export const PROJECT_LABEL = 'identity.stratus.io/project';
export const PROJECT_FINALIZER = 'identity.stratus.io/namespace';
const NAMESPACES: GVR = { group: '', version: 'v1', plural: 'namespaces' };
const PROJECTS = gvrOf(ProjectKind);

/** Namespaces a project may never own. */
const RESERVED = /^(default|kube-.*|stratus-system)$/;

export interface ProjectControllerOptions {
  /** Identity of this operator replica, reported in Events. */
  instance: string;
  concurrency?: number;
  /** How often to look again while a namespace is terminating (ms). */
  terminatingPollMs?: number;
}

export function registerProjectController(mgr: Manager, opts: ProjectControllerOptions) {
  const projects = mgr.informer<Project>(PROJECTS);
  const namespaces = mgr.informer<V1Namespace>(NAMESPACES, { labelSelector: PROJECT_LABEL });
  const groups = mgr.informer<SecurityGroup>(SECURITY_GROUPS);
  const events = mgr.eventRecorder({
    reportingController: 'stratus.io/project-controller',
    reportingInstance: opts.instance,
  });
  const client = mgr.client;
  const poll = opts.terminatingPollMs ?? 2000;

  async function reconcile(req: Request, ctx: ReconcileContext) {
    let cached = projects.get(req.name);
    if (!cached) return undefined;
    const parsed = ProjectKind.schema.safeParse(cached);
    const generation = cached.metadata.generation;

    // The controller owns every Project status field; each path sets phase and Ready, the namespace keeps the value
    // the happy path last wrote (an invalid, conflicting or terminating project still names its namespace).
    const setStatus = async (
      phase: NonNullable<Project['status']>['phase'],
      ready: { status: 'True' | 'False' | 'Unknown'; reason: string; message: string },
      namespace?: string,
    ) => {
      const obj = cached as Project;
      const conditions = withConditions(obj.status?.conditions, [{ type: 'Ready', ...ready }], generation);
      await applyStatusIfChanged(client, ProjectKind, obj, {
        ...(namespace ? { namespace } : {}),
        phase,
        observedGeneration: generation,
        conditions,
      });
    };

    if (!parsed.success) {
      // Not retried: the next spec change brings it back.
      await setStatus('Failed', {
        status: 'False',
        reason: 'InvalidSpec',
        message: parsed.error.message.slice(0, 1024),
      });
      return undefined;
    }
    const project = parsed.data;
    const nsName = project.spec.namespace ?? req.name;
    const ns = await readNamespace(nsName);

    // ---- deletion ----
    if (project.metadata.deletionTimestamp) {
      if (!hasFinalizer(cached, PROJECT_FINALIZER)) return undefined;
      if (ns && ns.metadata?.labels?.[PROJECT_LABEL] === req.name) {
        if (!ns.metadata.deletionTimestamp) {
          await client.delete(NAMESPACES, nsName).catch((e: unknown) => {
            if (!isNotFound(e)) throw e;
          });
          events.normal(cached, 'NamespaceDeleting', 'Delete', `deleting namespace ${nsName}`);
          ctx.log.info({ namespace: nsName }, 'deleting the project namespace');
        }
        await setStatus('Terminating', {
          status: 'False',
          reason: 'NamespaceTerminating',
          message: `waiting for namespace ${nsName} and everything in it to be deleted`,
        });
        return { requeueAfter: poll };
      }
      await removeFinalizer(client, PROJECTS, req.name, undefined, PROJECT_FINALIZER);
      ctx.log.info({ namespace: nsName }, 'namespace gone; finalizer released');
      return undefined;
    }

    // ---- creation / steady state ----
    if (RESERVED.test(nsName)) {
      await setStatus('Failed', {
        status: 'False',
        reason: 'InvalidSpec',
        message: `namespace ${nsName} is reserved and cannot be owned by a project`,
      });
      return undefined;
    }
    if (!hasFinalizer(cached, PROJECT_FINALIZER)) {
      // Status writes are guarded by the resourceVersion of the object they were computed from: this one.
      cached = await addFinalizer<Project>(client, PROJECTS, req.name, undefined, PROJECT_FINALIZER, {
        current: cached,
      });
    }
    const owner = ns?.metadata?.labels?.[PROJECT_LABEL];
    if (ns && owner !== undefined && owner !== req.name) {
      events.warning(cached, 'NamespaceConflict', 'Create', `namespace ${nsName} belongs to project ${owner}`);
      await setStatus('Failed', {
        status: 'False',
        reason: 'NamespaceConflict',
        message: `namespace ${nsName} is owned by project ${owner}`,
      });
      return undefined; // requeued when that namespace or this project changes
    }
    if (ns?.metadata?.deletionTimestamp) {
      await setStatus('Pending', {
        status: 'False',
        reason: 'NamespaceTerminating',
        message: `namespace ${nsName} is still being deleted; it is recreated once gone`,
      });
      return { requeueAfter: poll };
    }
    const labels = { [PROJECT_LABEL]: req.name, 'app.kubernetes.io/managed-by': 'stratus' };
    const ownerRefs = [ownerReference(cached, { controller: true, blockOwnerDeletion: false })];
    if (!ns) {
      try {
        await client.create(NAMESPACES, {
          apiVersion: 'v1',
          kind: 'Namespace',
          metadata: { name: nsName, labels, ownerReferences: ownerRefs },
        });
        events.normal(cached, 'NamespaceCreated', 'Create', `created namespace ${nsName}`);
        ctx.log.info({ namespace: nsName }, 'created the project namespace');
      } catch (e) {
        if (!isAlreadyExists(e)) throw e;
        return { requeue: true }; // created meanwhile (perhaps unowned): look again
      }
    } else if (owner === undefined) {
      await client.patch(
        NAMESPACES,
        nsName,
        undefined,
        { metadata: { labels, ownerReferences: ownerRefs } },
        PatchStrategy.MergePatch,
      );
      events.normal(cached, 'NamespaceAdopted', 'Adopt', `adopted existing namespace ${nsName}`);
      ctx.log.info({ namespace: nsName }, 'adopted an existing namespace');
    }
    // Every project has Neutron's `default` security group (ports that name no group are in it).
    if (!groups.get(DEFAULT_SECURITY_GROUP, nsName) && (await ensureDefaultSecurityGroup(client, nsName))) {
      events.normal(cached, 'DefaultSecurityGroupCreated', 'Create', `created security group default in ${nsName}`);
    }
    await setStatus(
      'Active',
      { status: 'True', reason: 'NamespaceReady', message: `namespace ${nsName} is ready` },
      nsName,
    );
    return undefined;
  }

  /** The namespace from the cache when labelled (ours or another project's), else from the API. */
  async function readNamespace(name: string): Promise<V1Namespace | undefined> {
    const cachedNs = namespaces.get(name);
    if (cachedNs) return cachedNs;
    try {
      return await client.get<V1Namespace>(NAMESPACES, name);
    } catch (e) {
      if (isNotFound(e)) return undefined;
      throw e;
    }
  }

  const controller = mgr.addController({
    name: 'project',
    reconcile: requeueOnConflict(reconcile),
    maxConcurrentReconciles: opts.concurrency ?? 4,
  });
  controller.for(projects, { updatePredicate: specOrMetaChanged });
  controller.watches(namespaces, (ns) => {
    const p = ns.metadata?.labels?.[PROJECT_LABEL];
    return p ? [p] : [];
  });
  return { controller, events: events as EventRecorder };
}
