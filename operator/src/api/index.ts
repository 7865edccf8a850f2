// The Stratus v1alpha1 API: every kind, its schemas and types. Imported by the operator, the
// node agent and the generators; imports nothing else of Stratus.
import { FlavorKind, HypervisorKind, KeyPairKind, ServerGroupKind, ServerKind } from './compute.ts';
import { ProjectKind } from './identity.ts';
import { ImageKind } from './image.ts';
import type { KindDefinition } from './kind.ts';
import { IPAllocationKind, NetworkKind, PortKind, SecurityGroupKind, SegmentAllocationKind } from './network.ts';
import { VolumeKind, VolumeSnapshotKind, VolumeTypeKind } from './storage.ts';

export * from './compute.ts';
export * from './identity.ts';
export * from './image.ts';
export * from './kind.ts';
export * from './meta.ts';
export * from './network.ts';
export * from './nova-actions.ts';
export * from './nova-states.ts';
export * from './server-state.ts';
export * from './storage.ts';
export * from './volume-state.ts';

/** Every kind of the API, in the order documentation lists them. */
export const ALL_KINDS: readonly KindDefinition[] = [
  ProjectKind,
  ImageKind,
  FlavorKind,
  HypervisorKind,
  KeyPairKind,
  ServerGroupKind,
  ServerKind,
  NetworkKind,
  PortKind,
  SecurityGroupKind,
  IPAllocationKind,
  SegmentAllocationKind,
  VolumeKind,
  VolumeSnapshotKind,
  VolumeTypeKind,
];
