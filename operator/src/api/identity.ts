// identity.stratus.io — Keystone's projects. A Project owns one namespace; everything its
// tenants create lives there. Roles and quotas are added to this kind in a later milestone.
import * as z from 'zod';
import { conditionColumn, defineKind } from './kind.ts';
import { conditions, dnsLabel, fixedPresence, immutable, observedGeneration } from './meta.ts';

export const IDENTITY_GROUP = 'identity.stratus.io';

export const ProjectSpec = z
  .object({
    description: z.string().max(1024).optional().describe('Free-form description of the project.'),
    enabled: z
      .boolean()
      .default(true)
      .describe('Whether the project is enabled (Keystone `enabled`). Reserved for the tenancy milestone.'),
    namespace: immutable(
      dnsLabel('Namespace the project owns and keeps, created if absent. Defaults to the project name. Immutable.'),
      'namespace',
    ).optional(),
  })
  .describe('Desired state of the project.')
  .meta({ 'x-kubernetes-validations': [fixedPresence('namespace')] });

export const ProjectStatus = z
  .object({
    namespace: z.string().optional().describe('The namespace owned by this project.'),
    phase: z
      .enum(['Pending', 'Active', 'Terminating', 'Failed'])
      .optional()
      .describe('Coarse lifecycle phase: Pending, Active, Terminating or Failed.'),
    observedGeneration: observedGeneration(),
    conditions: conditions(),
  })
  .describe('Observed state of the project.');

export const ProjectKind = defineKind({
  group: IDENTITY_GROUP,
  kind: 'Project',
  plural: 'projects',
  scope: 'Cluster',
  shortNames: ['proj'],
  categories: ['stratus-identity'],
  description:
    'A Project (Keystone project, tenant) owns one namespace in which its servers, networks, images and volumes live.',
  spec: ProjectSpec,
  status: ProjectStatus,
  columns: [
    { name: 'Namespace', type: 'string', jsonPath: '.status.namespace', description: 'The namespace owned.' },
    { name: 'Phase', type: 'string', jsonPath: '.status.phase', description: 'Lifecycle phase.' },
    conditionColumn('Ready'),
    { name: 'Enabled', type: 'boolean', jsonPath: '.spec.enabled', description: 'Whether enabled.', priority: 1 },
  ],
  rules: [
    {
      rule: "has(self.spec.namespace) || (self.metadata.name.size() <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'))",
      message:
        'without spec.namespace the project name is its namespace name and must be a DNS label (at most 63 characters, no dots)',
    },
  ],
});

export type ProjectSpec = z.infer<typeof ProjectSpec>;
export type ProjectStatus = z.infer<typeof ProjectStatus>;
export type Project = z.infer<typeof ProjectKind.schema>;
