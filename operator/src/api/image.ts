// image.stratus.io — Glance's images.
import * as z from 'zod';
import { defineKind } from './kind.ts';
import { conditions, fixedPresence, immutable, observedGeneration, timestamp } from './meta.ts';

export const IMAGE_GROUP = 'image.stratus.io';

/** Glance's disk formats. */
export const DiskFormat = z
  .enum(['raw', 'qcow2', 'vmdk', 'vdi', 'vhd', 'vhdx', 'iso', 'ploop', 'aki', 'ari', 'ami'])
  .describe('Format of the disk image (Glance disk_format). The node agent refuses data whose format differs.');

/** Glance's image statuses. */
export const ImageStatusValue = z.enum([
  'queued',
  'saving',
  'uploading',
  'importing',
  'active',
  'killed',
  'deleted',
  'pending_delete',
  'deactivated',
]);

export const ImageChecksum = z
  .object({
    algorithm: z.enum(['sha256', 'sha512']).describe('Hash algorithm (Glance os_hash_algo).'),
    value: z
      .string()
      .regex(/^[0-9a-f]{64}([0-9a-f]{64})?$/)
      .describe('Lower-case hex digest of the image data (Glance os_hash_value).'),
  })
  .describe('Expected digest of the image data; a download that does not match is refused.')
  .meta({
    'x-kubernetes-validations': [
      {
        rule: "(self.algorithm == 'sha256' && self.value.size() == 64) || (self.algorithm == 'sha512' && self.value.size() == 128)",
        message: 'value must be 64 hex digits for sha256 and 128 for sha512',
        fieldPath: '.value',
      },
    ],
  })
  .superRefine((c, ctx) => {
    if (c.value.length !== (c.algorithm === 'sha256' ? 64 : 128)) {
      ctx.addIssue({ code: 'custom', path: ['value'], message: 'digest length does not match the algorithm' });
    }
  });

export const ImageSource = z
  .object({
    url: z
      .string()
      .max(2048)
      .regex(/^https?:\/\/[^\s]+$/)
      .describe("HTTP(S) address the image data is downloaded from (Glance's web-download import)."),
  })
  .describe('Where the image data comes from. Exactly one source must be given.');

export const ImageSpec = z
  .object({
    source: immutable(ImageSource, 'source'),
    diskFormat: immutable(DiskFormat, 'diskFormat'),
    containerFormat: immutable(
      z
        .enum(['bare', 'ovf', 'ova', 'aki', 'ari', 'ami', 'docker', 'compressed'])
        .default('bare')
        .describe('Container format (Glance container_format). Only bare is booted today.'),
      'containerFormat',
    ),
    checksum: immutable(ImageChecksum, 'checksum').optional(),
    minDisk: z.int().min(0).max(65536).default(0).describe('Minimum root disk in GiB a flavor needs to boot it.'),
    minRAM: z.int().min(0).max(16777216).default(0).describe('Minimum RAM in MiB a flavor needs to boot it.'),
    visibility: z
      .enum(['public', 'private', 'shared', 'community'])
      .default('shared')
      .describe('Who may use the image (Glance visibility). Today only its own namespace boots from it.'),
    protected: z.boolean().default(false).describe('A protected image cannot be deleted.'),
    properties: z
      .record(z.string().max(255), z.string().max(255))
      .optional()
      .describe(
        'Free-form image properties such as hw_architecture (x86_64), hw_disk_bus, hw_firmware_type, os_distro (Glance properties).',
      )
      .meta({
        'x-kubernetes-validations': [{ rule: 'self.size() <= 128', message: 'at most 128 properties' }],
      }),
  })
  .describe('Desired state of the image.')
  .meta({
    'x-kubernetes-validations': [fixedPresence('checksum')],
  });

export const ImageStatus = z
  .object({
    status: ImageStatusValue.optional().describe('Glance image status: queued, saving, active, killed, deactivated...'),
    size: z.int().min(0).optional().describe('Size of the image data in bytes.'),
    virtualSize: z.int().min(0).optional().describe('Virtual size of the disk in bytes, as qemu-img reports it.'),
    checksum: z.string().optional().describe('Digest computed when the image was first fetched.'),
    observedGeneration: observedGeneration(),
    conditions: conditions(),
    updatedAt: timestamp('Time of the last status change.').optional(),
  })
  .describe('Observed state of the image.');

export const ImageKind = defineKind({
  group: IMAGE_GROUP,
  kind: 'Image',
  plural: 'images',
  scope: 'Namespaced',
  shortNames: ['img'],
  categories: ['stratus-image'],
  description: 'A bootable disk image (Glance image), downloaded to and cached on the nodes that boot it.',
  spec: ImageSpec,
  status: ImageStatus,
  columns: [
    { name: 'Status', type: 'string', jsonPath: '.status.status', description: 'Glance image status.' },
    { name: 'Format', type: 'string', jsonPath: '.spec.diskFormat', description: 'Disk format.' },
    { name: 'Size', type: 'integer', jsonPath: '.status.size', description: 'Size in bytes.' },
    { name: 'Visibility', type: 'string', jsonPath: '.spec.visibility', description: 'Visibility.' },
    { name: 'Source', type: 'string', jsonPath: '.spec.source.url', description: 'Source URL.', priority: 1 },
  ],
});

export type ImageSpec = z.infer<typeof ImageSpec>;
export type ImageStatus = z.infer<typeof ImageStatus>;
export type Image = z.infer<typeof ImageKind.schema>;
