// compute.stratus.io — Nova: flavors, hypervisors, key pairs, server groups and servers.
import * as z from 'zod';
import { defineKind } from './kind.ts';
import {
  byteQuantity,
  conditions,
  decimalRatio,
  dnsLabel,
  fixedPresence,
  immutable,
  ipAddress,
  objectName,
  observedGeneration,
  parseBytes,
  timestamp,
} from './meta.ts';
import { DesiredPowerState, PowerState, ServerStatusValue, TaskState, VmState } from './nova-states.ts';

export const COMPUTE_GROUP = 'compute.stratus.io';

/** Label the scheduler puts on a bound Server; each node agent watches the Servers with its node name. */
export const SERVER_NODE_LABEL = 'compute.stratus.io/node';
/** The operator's finalizer on Servers: releases the claim and network resources. */
export const SERVER_FINALIZER = 'compute.stratus.io/server';
/** The node agent's finalizer on Servers: the guest and its files are gone. */
export const GUEST_FINALIZER = 'compute.stratus.io/guest';
/**
 * Node liveness (as kubelets do): each node agent renews a coordination.k8s.io/v1 Lease named nodeLeaseName(node),
 * labelled NODE_LEASE_LABEL=<node>, in the operator's namespace (default NODE_LEASE_NAMESPACE).
 */
export const NODE_LEASE_LABEL = 'compute.stratus.io/node-lease';
export const NODE_LEASE_NAMESPACE = 'stratus-system';
export const nodeLeaseName = (node: string): string => `stratus-agent-${node}`;

const NON_ZERO = "!self.matches('^0+(\\\\.0+)?[A-Za-z]*$')";

// ---------------------------------------------------------------------------------------------
// Flavor

export const FlavorSpec = z
  .object({
    vcpus: immutable(z.int().min(1).max(1024).describe('Number of virtual CPUs. Immutable.'), 'vcpus'),
    ram: immutable(
      byteQuantity('Guest memory as a quantity, e.g. 512Mi or 4Gi (Nova ram). Must not be zero. Immutable.')
        .refine((q) => parseBytes(q) > 0n, { message: 'ram must not be zero' })
        .meta({ 'x-kubernetes-validations': [{ rule: NON_ZERO, message: 'ram must not be zero' }] }),
      'ram',
    ),
    disk: immutable(
      byteQuantity('Root disk size, e.g. 10Gi; 0 sizes the root disk to the image (Nova disk). Immutable.'),
      'disk',
    ),
    ephemeral: immutable(
      byteQuantity('Size of an extra, empty ephemeral disk; 0 for none. Immutable.').default('0'),
      'ephemeral',
    ),
    swap: immutable(byteQuantity('Size of a swap disk; 0 for none. Immutable.').default('0'), 'swap'),
    isPublic: z.boolean().default(true).describe('Whether every project may use the flavor.'),
    description: z.string().max(65535).optional().describe('Free-form description.'),
    extraSpecs: z
      .record(z.string().max(255), z.string().max(255))
      .optional()
      .describe('Extra specs refining placement and the guest, e.g. hw:cpu_policy, hw_rng:allowed (Nova extra_specs).'),
  })
  .describe('The virtual hardware template of a server. Sizes cannot change; create a new flavor and resize.');

export const FlavorKind = defineKind({
  group: COMPUTE_GROUP,
  kind: 'Flavor',
  plural: 'flavors',
  scope: 'Cluster',
  shortNames: ['flv'],
  categories: ['stratus-compute'],
  description: 'A Flavor (Nova flavor) is a server size: vCPUs, RAM, root, ephemeral and swap disks.',
  spec: FlavorSpec,
  status: z.object({ observedGeneration: observedGeneration() }).describe('Flavors have no observed state.'),
  columns: [
    { name: 'VCPUs', type: 'integer', jsonPath: '.spec.vcpus', description: 'Virtual CPUs.' },
    { name: 'RAM', type: 'string', jsonPath: '.spec.ram', description: 'Guest memory.' },
    { name: 'Disk', type: 'string', jsonPath: '.spec.disk', description: 'Root disk.' },
    { name: 'Ephemeral', type: 'string', jsonPath: '.spec.ephemeral', description: 'Ephemeral disk.', priority: 1 },
    { name: 'Swap', type: 'string', jsonPath: '.spec.swap', description: 'Swap disk.', priority: 1 },
    { name: 'Public', type: 'boolean', jsonPath: '.spec.isPublic', description: 'Public.', priority: 1 },
  ],
});

// ---------------------------------------------------------------------------------------------
// Hypervisor

const ResourceAmounts = (what: string) =>
  z
    .object({
      vcpus: z.int().min(0).optional().describe(`Virtual CPUs ${what}.`),
      ram: byteQuantity(`Memory ${what}.`).optional(),
      disk: byteQuantity(`Local disk ${what}.`).optional(),
    })
    .describe(`Resources ${what}.`);

export const Accelerator = z.enum(['kvm', 'tcg']);

export const HypervisorSpec = z
  .object({
    enabled: z
      .boolean()
      .default(true)
      .describe('A disabled hypervisor gets no new servers; running ones are untouched (nova service disable).'),
    disabledReason: z.string().max(255).optional().describe('Why the hypervisor was disabled.'),
    accelerator: z
      .enum(['auto', 'kvm', 'tcg'])
      .default('auto')
      .describe('QEMU accelerator: kvm, tcg (software emulation), or auto (KVM when it really works, else TCG).'),
    cpuAllocationRatio: decimalRatio('Virtual CPUs per physical CPU that may be allocated.').default('4.0'),
    ramAllocationRatio: decimalRatio('Memory overcommit ratio.').default('1.0'),
    diskAllocationRatio: decimalRatio('Disk overcommit ratio.').default('1.0'),
    reserved: z
      .object({
        vcpus: z.int().min(0).default(0).describe('Physical CPUs kept for the host.'),
        ram: byteQuantity('Memory kept for the host and QEMU overhead.').default('512Mi'),
        disk: byteQuantity('Local disk kept for the host.').default('0'),
      })
      .default({ vcpus: 0, ram: '512Mi', disk: '0' })
      .describe('Host resources never given to servers (Nova reserved_host_*).'),
  })
  .describe('Operator-settable behaviour of the hypervisor. The node agent creates the object with these defaults.');

export const HypervisorStatus = z
  .object({
    state: z
      .enum(['up', 'down'])
      .optional()
      .describe('up while the agent heartbeats within the grace period, else down.'),
    status: z.enum(['enabled', 'disabled']).optional().describe('Mirrors spec.enabled as Nova shows it.'),
    hostIP: ipAddress('Underlay address of the node (tunnel endpoint).').optional(),
    accelerator: Accelerator.optional().describe('The accelerator actually used: kvm or tcg.'),
    acceleratorReason: z.string().max(1024).optional().describe('Why that accelerator was chosen.'),
    cpu: z
      .object({
        architecture: z.string().max(32).optional().describe('CPU architecture, e.g. x86_64.'),
        model: z.string().max(255).optional().describe('CPU model name.'),
        vendor: z.string().max(64).optional().describe('CPU vendor.'),
      })
      .optional()
      .describe('Host CPU.'),
    capacity: ResourceAmounts('the node has').optional(),
    allocatable: ResourceAmounts('schedulable after reservations and allocation ratios').optional(),
    usage: ResourceAmounts('used by the servers placed on this node')
      .extend({ servers: z.int().min(0).optional().describe('Servers placed on this node.') })
      .describe('Resources used by the servers placed on this node.')
      .optional(),
    networkBackend: z
      .enum(['linuxbridge', 'ovs', 'noop'])
      .optional()
      .describe('Network backend the agent wires ports with.'),
    volumeBackends: z
      .array(
        z
          .object({
            name: z.string().describe('Backend name: local, rbd.'),
            ok: z.boolean().describe('Whether this node can run the backend and attach its volumes.'),
            reason: z.string().max(1024).optional().describe('Why not.'),
          })
          .describe('A volume backend as this node can use it.'),
      )
      .max(8)
      .optional()
      .describe('Volume backends this node can reach (from each backend probe).'),
    agentVersion: z.string().max(64).optional().describe('Version of the node agent.'),
    qemuVersion: z.string().max(64).optional().describe('Version of QEMU on the node.'),
    driver: z.string().max(32).optional().describe('Hypervisor driver: qemu or fake.'),
    observedGeneration: observedGeneration(),
    conditions: conditions(),
  })
  .describe('State reported by the node agent.');

export const HypervisorKind = defineKind({
  group: COMPUTE_GROUP,
  kind: 'Hypervisor',
  plural: 'hypervisors',
  scope: 'Cluster',
  shortNames: ['hv'],
  categories: ['stratus-compute'],
  description:
    'A Hypervisor is one compute node, created and kept current by the node agent running there. Its labels (e.g. topology.kubernetes.io/zone) drive availability zones and node selectors. Liveness is the node agent renewing the Lease stratus-agent-<node> (namespace stratus-system); the operator sets status.state from when it saw renewals.',
  spec: HypervisorSpec,
  status: HypervisorStatus,
  columns: [
    { name: 'State', type: 'string', jsonPath: '.status.state', description: 'up or down.' },
    { name: 'Status', type: 'string', jsonPath: '.status.status', description: 'enabled or disabled.' },
    { name: 'Accel', type: 'string', jsonPath: '.status.accelerator', description: 'kvm or tcg.' },
    { name: 'VCPUs', type: 'integer', jsonPath: '.status.allocatable.vcpus', description: 'Schedulable vCPUs.' },
    { name: 'Used', type: 'integer', jsonPath: '.status.usage.vcpus', description: 'vCPUs in use.' },
    { name: 'RAM', type: 'string', jsonPath: '.status.allocatable.ram', description: 'Schedulable memory.' },
    { name: 'Servers', type: 'integer', jsonPath: '.status.usage.servers', description: 'Servers placed.' },
    { name: 'Host-IP', type: 'string', jsonPath: '.status.hostIP', description: 'Underlay address.', priority: 1 },
    { name: 'Arch', type: 'string', jsonPath: '.status.cpu.architecture', description: 'CPU arch.', priority: 1 },
  ],
});

// ---------------------------------------------------------------------------------------------
// KeyPair

// No backslashes, so the same text is a valid JavaScript RegExp and a valid CEL string literal.
const SSH_KEY =
  '^(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh[.]com) [A-Za-z0-9+/]+=*( .*)?$';

export const KeyPairSpec = z
  .object({
    publicKey: immutable(
      z.string().min(1).max(16384).describe('The public key, e.g. the contents of ~/.ssh/id_ed25519.pub. Immutable.'),
      'publicKey',
    ),
    type: immutable(z.enum(['ssh', 'x509']).default('ssh').describe('Key type (Nova key pair type).'), 'type'),
  })
  .describe('A public key injected into servers that name this key pair.')
  .meta({
    'x-kubernetes-validations': [
      {
        rule: `self.type != 'ssh' || self.publicKey.trim().matches('${SSH_KEY}')`,
        message: 'publicKey must be an OpenSSH public key line such as "ssh-ed25519 AAAA... comment"',
        fieldPath: '.publicKey',
      },
    ],
  })
  .superRefine((s, ctx) => {
    if (s.type === 'ssh' && !new RegExp(SSH_KEY).test(s.publicKey.trim())) {
      ctx.addIssue({ code: 'custom', path: ['publicKey'], message: 'publicKey must be an OpenSSH public key line' });
    }
  });

export const KeyPairKind = defineKind({
  group: COMPUTE_GROUP,
  kind: 'KeyPair',
  plural: 'keypairs',
  scope: 'Namespaced',
  shortNames: ['kp'],
  categories: ['stratus-compute'],
  description: 'A KeyPair (Nova key pair) holds a public key that cloud-init installs in servers.',
  spec: KeyPairSpec,
  status: z
    .object({
      fingerprint: z.string().max(128).optional().describe('SHA256 fingerprint of the key, as ssh-keygen -l shows.'),
      observedGeneration: observedGeneration(),
      conditions: conditions(),
    })
    .describe('Observed state of the key pair.'),
  columns: [
    { name: 'Type', type: 'string', jsonPath: '.spec.type', description: 'Key type.' },
    { name: 'Fingerprint', type: 'string', jsonPath: '.status.fingerprint', description: 'Key fingerprint.' },
  ],
});

// ---------------------------------------------------------------------------------------------
// ServerGroup

export const ServerGroupSpec = z
  .object({
    policy: immutable(
      z
        .enum(['affinity', 'anti-affinity', 'soft-affinity', 'soft-anti-affinity'])
        .describe('Placement policy of the members (Nova server group policy). Immutable.'),
      'policy',
    ),
    rules: immutable(
      z
        .object({
          maxServerPerHost: z
            .int()
            .min(1)
            .max(1000)
            .optional()
            .describe('With anti-affinity: at most this many members per host (default 1).'),
        })
        .default({})
        .describe('Policy rules. Immutable.'),
      'rules',
    ),
  })
  .describe('Placement policy for the servers that join this group.')
  .meta({
    'x-kubernetes-validations': [
      {
        rule: "!has(self.rules.maxServerPerHost) || self.policy == 'anti-affinity'",
        message: 'rules.maxServerPerHost is only valid with the anti-affinity policy',
        fieldPath: '.rules.maxServerPerHost',
      },
    ],
  })
  .superRefine((s, ctx) => {
    if (s.rules.maxServerPerHost !== undefined && s.policy !== 'anti-affinity') {
      ctx.addIssue({
        code: 'custom',
        path: ['rules', 'maxServerPerHost'],
        message: 'only valid with anti-affinity',
      });
    }
  });

export const ServerGroupKind = defineKind({
  group: COMPUTE_GROUP,
  kind: 'ServerGroup',
  plural: 'servergroups',
  scope: 'Namespaced',
  shortNames: ['srvgrp'],
  categories: ['stratus-compute'],
  description:
    'A ServerGroup (Nova server group) places its member servers on the same host (affinity) or on different hosts (anti-affinity), strictly or as a preference (soft-).',
  spec: ServerGroupSpec,
  status: z
    .object({
      members: z.array(z.string()).max(1000).optional().describe('Names of the member servers.'),
      observedGeneration: observedGeneration(),
      conditions: conditions(),
    })
    .describe('Observed state of the group.'),
  columns: [
    { name: 'Policy', type: 'string', jsonPath: '.spec.policy', description: 'Placement policy.' },
    { name: 'Members', type: 'string', jsonPath: '.status.members', description: 'Member servers.' },
  ],
});

// ---------------------------------------------------------------------------------------------
// Server

export const ServerNetwork = z
  .object({
    network: objectName('Network to create a port on (in the server namespace).').optional(),
    port: objectName('An existing, unbound Port to use instead of creating one.').optional(),
    fixedIP: ipAddress('Address to request on the network (only with network).').optional(),
  })
  .describe('One NIC of the server: a new port on a network, or an existing port.')
  .meta({
    'x-kubernetes-validations': [
      { rule: 'has(self.network) != has(self.port)', message: 'exactly one of network and port must be set' },
      {
        rule: '!has(self.fixedIP) || has(self.network)',
        message: 'fixedIP is only valid with network',
        fieldPath: '.fixedIP',
      },
    ],
  })
  .superRefine((n, ctx) => {
    if ((n.network === undefined) === (n.port === undefined)) {
      ctx.addIssue({ code: 'custom', message: 'exactly one of network and port must be set' });
    }
    if (n.fixedIP !== undefined && n.network === undefined) {
      ctx.addIssue({ code: 'custom', path: ['fixedIP'], message: 'fixedIP is only valid with network' });
    }
  });

const TRIGGER = (what: string) =>
  z
    .string()
    .min(1)
    .max(64)
    .optional()
    .describe(
      `Set to a new value (a timestamp is a good choice) to ${what} once. The value last acted on is in status.triggers.`,
    );

export const ServerTriggers = z
  .object({
    softReboot: TRIGGER('reboot the guest gracefully (ACPI, then hard after a timeout)'),
    hardReboot: TRIGGER('reset the guest'),
    rebuild: TRIGGER('rebuild the root disk from spec.image'),
    migrate: TRIGGER('cold-migrate the server to another hypervisor'),
    confirmResize: TRIGGER(
      'confirm a resize or migration in VERIFY_RESIZE (the previous disks, on the old hypervisor or kept for a revert, are dropped)',
    ),
    revertResize: TRIGGER(
      'revert a resize or migration in VERIFY_RESIZE (the guest goes back to its previous flavor, disks and hypervisor)',
    ),
  })
  .describe(
    'One-shot actions that have no desired-state form. Each runs once per new value, so a value committed to Git does not repeat an action.',
  );

export const SecretKeyRef = z
  .object({
    name: objectName('Name of the Secret in the server namespace.'),
    key: z.string().min(1).max(253).default('userdata').describe('Key within the Secret.'),
  })
  .describe('A key of a Secret.');

/** A volume attached to the server (Nova block device mapping, destination volume). */
export const ServerVolume = z
  .object({
    volume: objectName('Volume to attach (same namespace).'),
    bus: z
      .enum(['virtio', 'scsi'])
      .default('virtio')
      .describe(
        'Disk bus: virtio (virtio-blk on a spare PCIe port, /dev/vdX) or scsi (virtio-scsi, /dev/sdX; unplugs without guest help).',
      ),
    bootIndex: z.int().min(0).max(64).optional().describe('Boot order of the disk (lower first).'),
    deleteOnTermination: z.boolean().default(false).describe('Delete the volume when the server is deleted.'),
  })
  .describe('A volume attached to the server. Adding an entry hot-plugs it; removing it unplugs it.');

export const ServerSpec = z
  .object({
    flavor: objectName('Flavor of the server. Changing it resizes the server.'),
    image: objectName(
      'Image to boot from (in the server namespace). Changing it rebuilds the root disk. Exactly one of image and bootVolume.',
    ).optional(),
    bootVolume: immutable(objectName('Volume to boot from instead of an image. Immutable.'), 'bootVolume').optional(),
    bootVolumeDeleteOnTermination: immutable(
      z.boolean().default(false).describe('Delete the boot volume when the server is deleted. Immutable.'),
      'bootVolumeDeleteOnTermination',
    ),
    volumes: z
      .array(ServerVolume)
      .max(16)
      .optional()
      .describe(
        'Volumes attached to the server (besides bootVolume). Adding an entry hot-plugs it; removing one unplugs it.',
      )
      .meta({
        'x-kubernetes-validations': [
          { rule: 'self.all(v, self.exists_one(w, w.volume == v.volume))', message: 'each volume may be listed once' },
        ],
      }),
    keyPair: immutable(
      objectName('KeyPair whose public key is installed in the guest. Immutable.'),
      'keyPair',
    ).optional(),
    networks: immutable(
      z
        .array(ServerNetwork)
        .max(16)
        .describe('NICs of the server in order. Omit for a server without network. Immutable for now.'),
      'networks',
    ).optional(),
    securityGroups: z
      .array(objectName('A SecurityGroup name.'))
      .max(10)
      .default(['default'])
      .describe('Security groups applied to the ports this server creates (default: the project default group).'),
    userData: immutable(
      z.string().max(65535).describe('cloud-init user data, as text. Immutable.'),
      'userData',
    ).optional(),
    userDataSecretRef: immutable(
      SecretKeyRef.describe('Read user data from a Secret instead of userData. Immutable.'),
      'userDataSecretRef',
    ).optional(),
    configDrive: z.boolean().default(false).describe('Also attach an OpenStack config drive (label config-2).'),
    metadata: z
      .record(z.string().max(255), z.string().max(255))
      .optional()
      .describe('Server metadata (Nova metadata key/values), visible to the guest.')
      .meta({ 'x-kubernetes-validations': [{ rule: 'self.size() <= 128', message: 'at most 128 items' }] }),
    hostname: immutable(dnsLabel('Guest hostname. Defaults to the server name. Immutable.'), 'hostname').optional(),
    availabilityZone: immutable(
      dnsLabel('Availability zone to place the server in. Immutable.'),
      'availabilityZone',
    ).optional(),
    serverGroup: immutable(
      objectName('ServerGroup the server joins at creation. Immutable.'),
      'serverGroup',
    ).optional(),
    nodeSelector: z
      .record(z.string().max(317), z.string().max(63))
      .optional()
      .describe('Labels a Hypervisor must have to host the server.'),
    powerState: DesiredPowerState.default('Running').describe(
      'Desired power state: Running, Stopped (graceful shutdown), Paused (vCPUs stopped, RAM kept) or Suspended (state saved).',
    ),
    triggers: ServerTriggers.optional(),
  })
  .describe('Desired state of the server.')
  .meta({
    'x-kubernetes-validations': [
      { rule: 'has(self.image) != has(self.bootVolume)', message: 'exactly one of image and bootVolume must be set' },
      {
        rule: '!has(self.bootVolume) || !has(self.volumes) || self.volumes.all(v, v.volume != self.bootVolume)',
        message: 'bootVolume must not be listed in volumes',
      },
      {
        rule: '!(has(self.userData) && has(self.userDataSecretRef))',
        message: 'userData and userDataSecretRef are mutually exclusive',
      },
      fixedPresence('bootVolume'),
      fixedPresence('keyPair'),
      fixedPresence('userData'),
      fixedPresence('userDataSecretRef'),
      fixedPresence('hostname'),
      fixedPresence('availabilityZone'),
      fixedPresence('serverGroup'),
      fixedPresence('networks'),
    ],
  })
  .superRefine((s, ctx) => {
    if ((s.image === undefined) === (s.bootVolume === undefined)) {
      ctx.addIssue({ code: 'custom', message: 'exactly one of image and bootVolume must be set' });
    }
    if (s.userData !== undefined && s.userDataSecretRef !== undefined) {
      ctx.addIssue({ code: 'custom', message: 'userData and userDataSecretRef are mutually exclusive' });
    }
    const names = (s.volumes ?? []).map((v) => v.volume);
    if (new Set(names).size !== names.length)
      ctx.addIssue({ code: 'custom', message: 'each volume may be listed once' });
    if (s.bootVolume !== undefined && names.includes(s.bootVolume)) {
      ctx.addIssue({ code: 'custom', message: 'bootVolume must not be listed in volumes' });
    }
  });

export const ServerAddress = z
  .object({
    network: z.string().describe('Network name.'),
    ip: z.string().describe('The address.'),
    version: z.literal([4, 6]).describe('IP version.'),
    macAddress: z.string().optional().describe('MAC of the port (OS-EXT-IPS-MAC:mac_addr).'),
    type: z.enum(['fixed', 'floating']).describe('fixed or floating (OS-EXT-IPS:type).'),
    port: z.string().optional().describe('Port the address belongs to.'),
  })
  .describe('An address of the server.');

export const ServerAction = z
  .object({
    action: z.string().max(64).describe('Action name, e.g. create, stop, start, reboot, resize, rebuild, delete.'),
    startTime: timestamp('When the action started.'),
    finishTime: timestamp('When it finished.').optional(),
    result: z.enum(['InProgress', 'Success', 'Error']).describe('Outcome.'),
    message: z.string().max(1024).optional().describe('Details, e.g. the error.'),
  })
  .describe('One entry of the action history (Nova instance actions).');

const FlavorSnapshot = z
  .object({
    name: z.string().describe('Flavor name.'),
    vcpus: z.int().describe('Virtual CPUs.'),
    ram: z.string().describe('Guest memory.'),
    disk: z.string().describe('Root disk size.'),
    ephemeral: z.string().optional().describe('Ephemeral disk size.'),
    swap: z.string().optional().describe('Swap disk size.'),
  })
  .describe('A copy of a flavor.');

const Allocation = z
  .object({
    vcpus: z.int().min(0).describe('Virtual CPUs claimed on the node.'),
    ramMiB: z.int().min(0).describe('Memory claimed on the node, in MiB.'),
    diskGiB: z.int().min(0).describe('Local disk claimed on the node (root + ephemeral + swap), in GiB.'),
  })
  .describe('Resources claimed on a node.');

const ServerFault = z
  .object({
    code: z.int().describe('HTTP-style code: 500 for errors, 400 for bad requests.'),
    message: z.string().max(4096).describe('What went wrong.'),
    time: timestamp('When.'),
  })
  .describe('A Nova fault: why a server is in ERROR.');

/**
 * What the node agent of a hypervisor reports about a server's guest (status.compute): the only status fields that
 * agent writes about the guest's state. The operator alone writes the user-facing vmState, taskState, status,
 * powerState, fault and actions, derived from this report while it is about the server's current node
 * (docs/design/status-ownership.md).
 */
const ServerComputeReport = z
  .object({
    node: z.string().describe('The hypervisor this report is about; its node agent is the only writer of this object.'),
    vmState: VmState.optional().describe('vm_state as the compute host sees it.'),
    taskState: TaskState.optional().describe(
      'task_state as the compute host sees it (the operation it runs, or the operator request it took up).',
    ),
    powerState: PowerState.optional().describe("The guest's power state as the hypervisor reports it."),
    fault: ServerFault.optional().describe('Why the compute host put the server in ERROR.'),
    actions: z
      .array(ServerAction)
      .max(20)
      .optional()
      .describe("The action history as the compute host keeps it (the operator's entries it took up, and its own)."),
    volumes: z
      .array(
        z
          .object({
            volume: z.string().describe('Volume name.'),
            volumeUID: z.string().describe('Volume uid.'),
            serial: z.string().optional().describe('Serial the guest sees (/dev/disk/by-id/*<serial>).'),
            bus: z.enum(['virtio', 'scsi']).optional().describe('Disk bus.'),
            device: z.string().optional().describe('QEMU device id.'),
            state: z.enum(['attached', 'error']).describe('attached, or error (fault says why).'),
            fault: z.string().max(4096).optional().describe('Why attaching or detaching failed.'),
            size: z.string().optional().describe('Size the guest sees, as a quantity.'),
          })
          .describe('A volume as the compute host sees it on the guest.'),
      )
      .max(17)
      .optional()
      .describe('Volumes attached to the guest, as the hypervisor reports them.'),
  })
  .describe(
    "The node agent's report on the guest (nova-compute's view). The operator derives the user-facing state fields from it while node is the server's status.node; a report from another node (e.g. the source of a move) is ignored.",
  );

export const ServerStatus = z
  .object({
    status: ServerStatusValue.optional().describe(
      'User-facing status derived from vmState and taskState: ACTIVE, BUILD, SHUTOFF, PAUSED, SUSPENDED, REBOOT, HARD_REBOOT, RESIZE, REBUILD, MIGRATING, ERROR...',
    ),
    vmState: VmState.optional().describe('Nova vm_state: the stable state (active, building, stopped, error...).'),
    taskState: TaskState.optional().describe('Nova task_state: the operation in progress; absent when idle.'),
    powerState: PowerState.optional().describe(
      'Nova power_state as the hypervisor reports it: NOSTATE, RUNNING, PAUSED, SHUTDOWN, CRASHED, SUSPENDED.',
    ),
    node: z.string().optional().describe('Hypervisor the server is placed on.'),
    accelerator: Accelerator.optional().describe('Accelerator the guest runs with: kvm or tcg.'),
    addresses: z.array(ServerAddress).max(64).optional().describe('Addresses of the server, per network.'),
    flavor: FlavorSnapshot.optional().describe(
      'The flavor the server currently runs with (a copy, as Nova embeds it).',
    ),
    image: z.string().optional().describe('Image the root disk was last built from.'),
    allocation: Allocation.optional().describe(
      'Resources the scheduler claimed for the server on its node; rebuilt into claims after a restart.',
    ),
    launchedAt: timestamp('When the guest was first started.').optional(),
    fault: ServerFault.optional().describe('Why the server is in ERROR (Nova fault).'),
    triggers: ServerTriggers.optional().describe('The spec.triggers values already acted on.'),
    migration: z
      .object({
        source: z.string().describe('Hypervisor the server moves from (its disks are copied from there).'),
        target: z.string().describe('Hypervisor the server moves to.'),
        sourceFenced: timestamp(
          'When the operator recorded the source as fenced: down beyond the grace period and annotated compute.stratus.io/fenced by an admin.',
        ).optional(),
      })
      .optional()
      .describe(
        'A resize or cold migration to another hypervisor, from placement until it is confirmed (written by the operator).',
      ),
    resize: z
      .object({
        oldFlavor: FlavorSnapshot.optional().describe('The flavor before the resize (a revert restores it).'),
        oldNode: z.string().describe('The hypervisor before the resize or migration.'),
        oldVmState: VmState.optional().describe(
          'vm_state before the resize (active or stopped; a revert restores it).',
        ),
        oldAllocation: Allocation.optional().describe('The claim before the resize or migration.'),
      })
      .optional()
      .describe('What a revert needs, from placement until confirm or revert (written by the operator).'),
    migrationSource: z
      .object({
        node: z.string().describe('The source hypervisor (whose agent writes this field).'),
        guestStoppedAt: timestamp('When the source agent confirmed the guest stopped.'),
        export: z
          .object({
            host: z.string().describe('Address of the NBD server (the source node host IP).'),
            port: z.int().min(1).max(65535).describe('TCP port of the NBD server.'),
            disks: z
              .object({
                root: z.string().describe('Export name of the root disk.'),
                ephemeral: z.string().optional().describe('Export name of the ephemeral disk.'),
              })
              .describe('Export names, one per disk (guest-visible contents, raw).'),
            imageSha256: z
              .string()
              .optional()
              .describe('sha256 of the image the root disk is an overlay on (the target rebases onto its own copy).'),
          })
          .optional()
          .describe('NBD export of the stopped guest disks (read-only), while the target copies them.'),
      })
      .optional()
      .describe(
        'Written only by the source node agent of a move: the guest is stopped there and where its disks are served.',
      ),
    actions: z.array(ServerAction).max(20).optional().describe('The most recent actions, newest last (bounded).'),
    volumesAttached: z
      .array(
        z
          .object({
            volume: z.string().describe('Volume name.'),
            device: z.string().optional().describe('QEMU device id.'),
            bus: z.enum(['virtio', 'scsi']).optional().describe('Disk bus.'),
            bootIndex: z.int().min(0).optional().describe('Boot order.'),
            deleteOnTermination: z.boolean().optional().describe('Deleted with the server.'),
          })
          .describe('An attached volume.'),
      )
      .max(17)
      .optional()
      .describe(
        "Volumes attached to the server (Nova's os-extended-volumes:volumes_attached), written by the operator.",
      ),
    compute: ServerComputeReport.optional().describe(
      "Written only by the node agent of compute.node (field manager stratus-agent/<node>): the guest's state as that compute host sees it. vmState, taskState, status, powerState, fault and actions are written only by the operator, which derives them from this report.",
    ),
    observedGeneration: observedGeneration(),
    conditions: conditions(),
  })
  .describe('Observed state of the server.');

export const ServerKind = defineKind({
  group: COMPUTE_GROUP,
  kind: 'Server',
  plural: 'servers',
  scope: 'Namespaced',
  shortNames: ['srv'],
  categories: ['stratus-compute'],
  description:
    'A Server (Nova server, instance) is a virtual machine booted from an image or volume with a flavor, networks, security groups and a key pair.',
  spec: ServerSpec,
  status: ServerStatus,
  columns: [
    { name: 'Status', type: 'string', jsonPath: '.status.status', description: 'Nova status.' },
    { name: 'Power', type: 'string', jsonPath: '.status.powerState', description: 'Power state.' },
    { name: 'Node', type: 'string', jsonPath: '.status.node', description: 'Hypervisor.' },
    { name: 'Addresses', type: 'string', jsonPath: '.status.addresses[*].ip', description: 'Addresses.' },
    { name: 'Flavor', type: 'string', jsonPath: '.spec.flavor', description: 'Flavor.' },
    { name: 'Image', type: 'string', jsonPath: '.spec.image', description: 'Image.' },
    { name: 'Task', type: 'string', jsonPath: '.status.taskState', description: 'Task in progress.', priority: 1 },
    { name: 'VM-State', type: 'string', jsonPath: '.status.vmState', description: 'vm_state.', priority: 1 },
    { name: 'Accel', type: 'string', jsonPath: '.status.accelerator', description: 'kvm or tcg.', priority: 1 },
  ],
});

/** How many actions status.actions keeps. */
export const MAX_SERVER_ACTIONS = 20;

/**
 * Records an action in status.actions (Nova's instance actions), newest last and bounded: an InProgress
 * entry of the same action is completed in place, anything else is appended.
 */
/** Hypervisor annotation an admin sets once a down host is fenced (powered off or isolated): its guests cannot run. */
export const FENCED_ANNOTATION = 'compute.stratus.io/fenced';

export function recordAction(
  status: { actions?: z.infer<typeof ServerAction>[] },
  action: string,
  result: 'InProgress' | 'Success' | 'Error',
  message: string | undefined,
  now: string,
): void {
  const actions = [...(status.actions ?? [])];
  const last = actions.at(-1);
  const done = result === 'InProgress' ? {} : { finishTime: now };
  const note = message ? { message: message.slice(0, 1024) } : {};
  if (last && last.action === action && last.result === 'InProgress') {
    actions[actions.length - 1] = { ...last, ...done, result, ...note };
  } else {
    actions.push({ action, startTime: now, ...done, result, ...note });
  }
  status.actions = actions.slice(-MAX_SERVER_ACTIONS);
}

export type FlavorSpec = z.infer<typeof FlavorSpec>;
export type Flavor = z.infer<typeof FlavorKind.schema>;
export type HypervisorSpec = z.infer<typeof HypervisorSpec>;
export type HypervisorStatus = z.infer<typeof HypervisorStatus>;
export type Hypervisor = z.infer<typeof HypervisorKind.schema>;
export type KeyPairSpec = z.infer<typeof KeyPairSpec>;
export type KeyPair = z.infer<typeof KeyPairKind.schema>;
export type ServerGroupSpec = z.infer<typeof ServerGroupSpec>;
export type ServerGroup = z.infer<typeof ServerGroupKind.schema>;
export type ServerSpec = z.infer<typeof ServerSpec>;
export type ServerStatus = z.infer<typeof ServerStatus>;
export type Server = z.infer<typeof ServerKind.schema>;
