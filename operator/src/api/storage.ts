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
            // Cinder's refusal of an extend that does not grow the volume
            message: 'Invalid input: New size must be greater than current size',
            messageExpression:
              "'Invalid input: New size must be greater than current size (current: ' + oldSelf + ', new: ' + self + ').'",
          },
        ],
      }),
    description: z.string().max(1024).optional().describe('Free-form description.'),
    volumeType: immutable(
      dnsLabel('VolumeType name. Defaults to the default VolumeType (or the built-in local type). Immutable.'),
      'volumeType',
    ).optional(),
    availabilityZone: immutable(dnsLabel('Availability zone of the volume. Immutable.'), 'availabilityZone').optional(),
    source: immutable(VolumeSource, 'source').optional(),
    bootable: z
      .boolean()
      .optional()
      .describe(
        'Whether the volume holds a bootable image (Cinder os-set_bootable). Default: true when made from an image.',
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

/** Attach status of one attachment (Cinder's VolumeAttachStatus, the steps of the v3 attachment flow). */
export const AttachState = z.enum(['reserved', 'attaching', 'attached', 'detaching']);

export const VolumeAttachment = z
  .object({
    server: z.string().describe('Server the volume is attached to (same namespace).'),
    serverUID: z.string().optional().describe("That server's uid (an attachment is to one server object)."),
    node: z.string().optional().describe('Hypervisor of that server, once it is placed.'),
    state: AttachState.describe('reserved, attaching, attached or detaching (Cinder attach_status).'),
    device: z.string().optional().describe('Guest device id (QEMU qdev id; the guest finds the disk by its serial).'),
    bus: z.enum(['virtio', 'scsi']).optional().describe('Bus the disk is attached on.'),
    bootIndex: z.int().min(0).optional().describe('Boot order, for a boot volume.'),
    attachedAt: timestamp('When it was attached.').optional(),
  })
  .describe('An attachment (Cinder v3 attachment).');

/** Report states of the node agent that runs the backend for a volume or snapshot. */
export const BackendReportState = z.enum(['creating', 'available', 'extending', 'deleting', 'deleted', 'error']);

export const VolumeHostReport = z
  .object({
    node: z.string().describe('The node this report is about; its node agent is the only writer of this object.'),
    state: BackendReportState.describe(
      'What the backend holds: creating, available, extending, deleting, deleted, error.',
    ),
    location: z
      .string()
      .max(1024)
      .optional()
      .describe('Backend location (local://<node>/<uid>, rbd://<fsid>/<pool>/<image>).'),
    size: z.string().optional().describe('Virtual size the backend holds, as a quantity.'),
    allocated: z.string().optional().describe('Space used on the backend, as a quantity.'),
    fault: z.string().max(4096).optional().describe('Why the last backend operation failed.'),
    exports: z
      .array(
        z
          .object({
            server: z.string().describe('Server of the attachment this export serves.'),
            node: z.string().describe('Node of that server.'),
            host: z.string().describe('Address of the NBD server.'),
            port: z.int().min(1).max(65535).describe('Its TCP port.'),
            name: z.string().describe('Export name.'),
          })
          .describe('An NBD export of a local volume for a server on another node.'),
      )
      .max(16)
      .optional()
      .describe('NBD exports of this volume for attachments on other nodes (local backend, degraded mode).'),
  })
  .describe(
    "The volume host's report (Cinder's cinder-volume): what the node agent that runs the backend for this volume did. The operator derives status from it.",
  );

export const VolumeStatus = z
  .object({
    status: VolumeStatusValue.optional().describe('Cinder volume status: creating, available, in-use, error...'),
    attachments: z.array(VolumeAttachment).max(16).optional().describe('Current attachments.'),
    bootable: z.boolean().optional().describe('Whether the volume holds a bootable image.'),
    multiattach: z.boolean().optional().describe('Whether several servers may attach it at once (from its type).'),
    volumeType: z.string().optional().describe('The volume type it was created with (the default one if unset).'),
    backend: z.string().optional().describe('Backend of that type: local or rbd.'),
    size: z.string().optional().describe('Provisioned size (the last extend done).'),
    node: z
      .string()
      .optional()
      .describe('Volume host: the node holding a local volume, or the node that runs backend operations for it.'),
    host: VolumeHostReport.optional().describe(
      "Written only by the node agent of host.node (field manager stratus-agent/<node>); every other field is the operator's.",
    ),
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
    { name: 'Type', type: 'string', jsonPath: '.status.volumeType', description: 'Volume type.' },
    { name: 'Bootable', type: 'boolean', jsonPath: '.status.bootable', description: 'Bootable.' },
    { name: 'Attached-To', type: 'string', jsonPath: '.status.attachments[*].server', description: 'Servers.' },
    { name: 'Node', type: 'string', jsonPath: '.status.node', description: 'Volume host.' },
    { name: 'Backend', type: 'string', jsonPath: '.status.backend', description: 'Backend.', priority: 1 },
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
      node: z.string().optional().describe("Volume host of the snapshot (the source volume's)."),
      host: z
        .object({
          node: z.string().describe('The node this report is about; its node agent is the only writer of this object.'),
          state: BackendReportState.describe('creating, available, deleting, deleted or error.'),
          location: z.string().max(1024).optional().describe('Backend location of the snapshot.'),
          fault: z.string().max(4096).optional().describe('Why the last backend operation failed.'),
        })
        .optional()
        .describe(
          "The volume host's report (field manager stratus-agent/<node>); every other field is the operator's.",
        ),
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

/** Cinder front-end QoS specs (QEMU throttle limits per volume; 0 or absent: unlimited). */
const qosValue = (what: string) => z.int().min(0).optional().describe(what);
export const VolumeQosSpec = z
  .object({
    totalBytesSec: qosValue('total_bytes_sec: read+write bytes per second.'),
    readBytesSec: qosValue('read_bytes_sec.'),
    writeBytesSec: qosValue('write_bytes_sec.'),
    totalIopsSec: qosValue('total_iops_sec: read+write operations per second.'),
    readIopsSec: qosValue('read_iops_sec.'),
    writeIopsSec: qosValue('write_iops_sec.'),
    totalBytesSecMax: qosValue('total_bytes_sec_max: burst.'),
    readBytesSecMax: qosValue('read_bytes_sec_max: burst.'),
    writeBytesSecMax: qosValue('write_bytes_sec_max: burst.'),
    totalIopsSecMax: qosValue('total_iops_sec_max: burst.'),
    readIopsSecMax: qosValue('read_iops_sec_max: burst.'),
    writeIopsSecMax: qosValue('write_iops_sec_max: burst.'),
    sizeIopsSec: qosValue('size_iops_sec: requests larger than this many bytes count as several.'),
  })
  .describe(
    'Front-end QoS (Cinder qos specs, consumer front-end), applied by QEMU throttling on each volume of the type.',
  )
  .meta({
    'x-kubernetes-validations': [
      {
        rule: '!(has(self.totalBytesSec) && (has(self.readBytesSec) || has(self.writeBytesSec)))',
        message: 'totalBytesSec cannot be combined with readBytesSec or writeBytesSec',
      },
      {
        rule: '!(has(self.totalIopsSec) && (has(self.readIopsSec) || has(self.writeIopsSec)))',
        message: 'totalIopsSec cannot be combined with readIopsSec or writeIopsSec',
      },
    ],
  })
  .superRefine((q, ctx) => {
    if (q.totalBytesSec !== undefined && (q.readBytesSec !== undefined || q.writeBytesSec !== undefined)) {
      ctx.addIssue({ code: 'custom', message: 'totalBytesSec cannot be combined with readBytesSec or writeBytesSec' });
    }
    if (q.totalIopsSec !== undefined && (q.readIopsSec !== undefined || q.writeIopsSec !== undefined)) {
      ctx.addIssue({ code: 'custom', message: 'totalIopsSec cannot be combined with readIopsSec or writeIopsSec' });
    }
  });

export const VOLUME_BACKENDS = ['local', 'rbd'] as const;
export const VolumeBackendName = z.enum(VOLUME_BACKENDS);

/** The volume type used when a Volume names none and no VolumeType is the default. */
export const BUILTIN_VOLUME_TYPE = 'local';

export const VolumeTypeSpec = z
  .object({
    backend: immutable(
      VolumeBackendName.describe('Backend that holds volumes of this type: local or rbd. Immutable.'),
      'backend',
    ),
    description: z.string().max(1024).optional().describe('Free-form description.'),
    isDefault: z
      .boolean()
      .default(false)
      .describe('Volumes that name no type get this one (at most one type should be the default; the oldest wins).'),
    multiattach: z
      .boolean()
      .default(false)
      .describe('Volumes of this type may be attached to several servers at once.'),
    qos: VolumeQosSpec.optional(),
    local: z
      .object({
        maxSnapshotDepth: z
          .int()
          .min(1)
          .max(16)
          .default(5)
          .describe('Longest qcow2 backing chain of snapshots before older points are merged.'),
      })
      .optional()
      .describe('Options of the local backend.'),
    rbd: z
      .object({
        pool: z.string().min(1).max(128).default('volumes').describe('RBD pool of the volumes.'),
        user: z.string().min(1).max(128).default('stratus').describe('Ceph client name (without client.).'),
        monitors: z.array(z.string().min(1).max(255)).min(1).max(16).describe('Ceph monitors, host:port.'),
        secretRef: z
          .object({
            name: objectName('Secret name.'),
            namespace: dnsLabel('Secret namespace.'),
          })
          .describe('Secret whose key "key" is the cephx key of the user (as `ceph auth get-key` prints it).'),
      })
      .optional()
      .describe('Options of the rbd backend (required for it).'),
  })
  .describe('Desired state of the volume type.')
  .meta({
    'x-kubernetes-validations': [
      { rule: "self.backend != 'rbd' || has(self.rbd)", message: 'rbd options are required for the rbd backend' },
      { rule: "self.backend == 'rbd' || !has(self.rbd)", message: 'rbd options are only valid for the rbd backend' },
      {
        rule: "self.backend == 'local' || !has(self.local)",
        message: 'local options are only valid for the local backend',
      },
    ],
  })
  .superRefine((s, ctx) => {
    if (s.backend === 'rbd' && s.rbd === undefined) {
      ctx.addIssue({ code: 'custom', message: 'rbd options are required for the rbd backend' });
    }
    if (s.backend !== 'rbd' && s.rbd !== undefined) {
      ctx.addIssue({ code: 'custom', message: 'rbd options are only valid for the rbd backend' });
    }
    if (s.backend !== 'local' && s.local !== undefined) {
      ctx.addIssue({ code: 'custom', message: 'local options are only valid for the local backend' });
    }
  });

export const VolumeTypeKind = defineKind({
  group: STORAGE_GROUP,
  kind: 'VolumeType',
  plural: 'volumetypes',
  scope: 'Cluster',
  shortNames: ['voltype'],
  categories: ['stratus-storage'],
  description:
    'A VolumeType (Cinder volume type) names a backend and its options, QoS and multiattach capability. Volumes that name no type get the default one (isDefault), or the built-in local type when none is.',
  spec: VolumeTypeSpec,
  status: z
    .object({ observedGeneration: observedGeneration(), conditions: conditions() })
    .describe('Observed state of the volume type.'),
  columns: [
    { name: 'Backend', type: 'string', jsonPath: '.spec.backend', description: 'Backend.' },
    { name: 'Default', type: 'boolean', jsonPath: '.spec.isDefault', description: 'The default type.' },
    { name: 'Multiattach', type: 'boolean', jsonPath: '.spec.multiattach', description: 'Multiattach capable.' },
  ],
});

export type VolumeTypeSpec = z.infer<typeof VolumeTypeSpec>;
export type VolumeType = z.infer<typeof VolumeTypeKind.schema>;
export type VolumeQosSpec = z.infer<typeof VolumeQosSpec>;
export type VolumeAttachment = z.infer<typeof VolumeAttachment>;
export type VolumeHostReport = z.infer<typeof VolumeHostReport>;
