// storage.stratus.io — Cinder: volumes and volume snapshots.
import * as z from 'zod';
import { defineKind } from './kind.ts';
import {
  byteQuantity,
  conditions,
  dnsLabel,
  fixedPresence,
  immutable,
  objectName,
  observedGeneration,
  parseBytes,
  timestamp,
} from './meta.ts';

export const STORAGE_GROUP = 'storage.stratus.io';

/** Cinder's volume statuses. */
export const VolumeStatusValue = z.enum([
  'creating',
  'available',
  'reserved',
  'attaching',
  'detaching',
  'in-use',
  'maintenance',
  'deleting',
  'awaiting-transfer',
  'error',
  'error_deleting',
  'backing-up',
  'restoring-backup',
  'error_backing-up',
  'error_restoring',
  'error_extending',
  'downloading',
  'uploading',
  'retyping',
  'extending',
]);

export const VolumeSource = z
  .object({
    image: objectName('Image to copy into the volume (makes it bootable).').optional(),
    snapshot: objectName('VolumeSnapshot to restore.').optional(),
    volume: objectName('Volume to clone.').optional(),
  })
  .describe('What the volume starts with. Omit for an empty volume. At most one source.')
  .meta({
    'x-kubernetes-validations': [
      {
        rule: '[has(self.image), has(self.snapshot), has(self.volume)].filter(x, x).size() <= 1',
        message: 'at most one of image, snapshot and volume may be set',
      },
    ],
  })
  .superRefine((s, ctx) => {
    if ([s.image, s.snapshot, s.volume].filter((x) => x !== undefined).length > 1) {
      ctx.addIssue({ code: 'custom', message: 'at most one of image, snapshot and volume may be set' });
    }
  });

export const VolumeSpec = z
  .object({
    size: byteQuantity('Size of the volume, e.g. 10Gi. It may grow (extend) but never shrink.')
      .refine((q) => parseBytes(q) > 0n, { message: 'size must not be zero' })
      .meta({
        'x-kubernetes-validations': [
          { rule: "!self.matches('^0+(\\\\.0+)?[A-Za-z]*$')", message: 'size must not be zero' },
          {
            rule: 'quantity(self).compareTo(quantity(oldSelf)) >= 0',
            message: 'a volume can be extended but not shrunk',
          },
        ],
      }),
    description: z.string().max(1024).optional().describe('Free-form description.'),
    volumeType: immutable(
      dnsLabel('Volume type (backend class), e.g. local or nbd. Defaults to the cluster default. Immutable.'),
      'volumeType',
    ).optional(),
    availabilityZone: immutable(dnsLabel('Availability zone of the volume. Immutable.'), 'availabilityZone').optional(),
    source: immutable(VolumeSource, 'source').optional(),
    multiattach: immutable(
      z.boolean().default(false).describe('Whether several servers may attach it at once. Immutable.'),
      'multiattach',
    ),
  })
  .describe('Desired state of the volume.')
  .meta({
    'x-kubernetes-validations': [
      fixedPresence('source'),
      fixedPresence('availabilityZone'),
      fixedPresence('volumeType'),
    ],
  });

export const VolumeStatus = z
  .object({
    status: VolumeStatusValue.optional().describe('Cinder volume status: creating, available, in-use, error...'),
    attachments: z
      .array(
        z
          .object({
            server: z.string().describe('Server the volume is attached to.'),
            node: z.string().optional().describe('Hypervisor of that server.'),
            device: z.string().optional().describe('Device name in the guest, e.g. /dev/vdb.'),
            attachedAt: timestamp('When it was attached.').optional(),
          })
          .describe('An attachment.'),
      )
      .max(16)
      .optional()
      .describe('Current attachments.'),
    bootable: z.boolean().optional().describe('Whether the volume holds a bootable image.'),
    size: z.string().optional().describe('Provisioned size.'),
    node: z.string().optional().describe('Node holding a node-local volume.'),
    observedGeneration: observedGeneration(),
    conditions: conditions(),
  })
  .describe('Observed state of the volume.');

export const VolumeKind = defineKind({
  group: STORAGE_GROUP,
  kind: 'Volume',
  plural: 'volumes',
  scope: 'Namespaced',
  shortNames: ['vol'],
  categories: ['stratus-storage'],
  description: 'A Volume (Cinder volume) is a block device that outlives servers and can be attached to them.',
  spec: VolumeSpec,
  status: VolumeStatus,
  columns: [
    { name: 'Status', type: 'string', jsonPath: '.status.status', description: 'Cinder status.' },
    { name: 'Size', type: 'string', jsonPath: '.spec.size', description: 'Requested size.' },
    { name: 'Type', type: 'string', jsonPath: '.spec.volumeType', description: 'Volume type.' },
    { name: 'Bootable', type: 'boolean', jsonPath: '.status.bootable', description: 'Bootable.' },
    { name: 'Attached-To', type: 'string', jsonPath: '.status.attachments[*].server', description: 'Servers.' },
  ],
});

export const VolumeSnapshotSpec = z
  .object({
    volume: immutable(objectName('Volume to snapshot. Immutable.'), 'volume'),
    force: z.boolean().default(false).describe('Snapshot even while the volume is attached (in-use).'),
    description: z.string().max(1024).optional().describe('Free-form description.'),
  })
  .describe('Desired state of the snapshot.');

export const VolumeSnapshotKind = defineKind({
  group: STORAGE_GROUP,
  kind: 'VolumeSnapshot',
  plural: 'volumesnapshots',
  scope: 'Namespaced',
  shortNames: ['volsnap'],
  categories: ['stratus-storage'],
  description: 'A VolumeSnapshot (Cinder snapshot) is a point-in-time copy of a volume.',
  spec: VolumeSnapshotSpec,
  status: z
    .object({
      status: z
        .enum(['creating', 'available', 'deleting', 'deleted', 'updating', 'error', 'error_deleting', 'restoring'])
        .optional()
        .describe('Cinder snapshot status.'),
      size: z.string().optional().describe('Size of the source volume.'),
      observedGeneration: observedGeneration(),
      conditions: conditions(),
    })
    .describe('Observed state of the snapshot.'),
  columns: [
    { name: 'Status', type: 'string', jsonPath: '.status.status', description: 'Cinder status.' },
    { name: 'Volume', type: 'string', jsonPath: '.spec.volume', description: 'Source volume.' },
    { name: 'Size', type: 'string', jsonPath: '.status.size', description: 'Size.' },
  ],
});

export type VolumeSpec = z.infer<typeof VolumeSpec>;
export type VolumeStatus = z.infer<typeof VolumeStatus>;
export type Volume = z.infer<typeof VolumeKind.schema>;
export type VolumeSnapshot = z.infer<typeof VolumeSnapshotKind.schema>;
