// Builds CustomResourceDefinitions from KindDefinitions.
import type { KindDefinition } from '../api/kind.ts';
import { type JSONSchema, StructuralSchemaError, toStructural, walkProperties } from './structural.ts';

export interface CustomResourceDefinition {
  apiVersion: 'apiextensions.k8s.io/v1';
  kind: 'CustomResourceDefinition';
  metadata: { name: string; labels: Record<string, string> };
  spec: JSONSchema;
}

/** The full openAPIV3Schema of a kind: apiVersion, kind, metadata, spec and status. */
export function kindSchema(k: KindDefinition): JSONSchema {
  const spec = toStructural(k.spec, `${k.kind}.spec`);
  const status = toStructural(k.status, `${k.kind}.status`);
  const specRequired = ((spec.required as string[] | undefined) ?? []).length > 0;
  if (!specRequired) spec.default = {};
  const schema: JSONSchema = {
    type: 'object',
    description: k.description,
    properties: {
      apiVersion: {
        type: 'string',
        description: 'APIVersion defines the versioned schema of this representation of an object.',
      },
      kind: { type: 'string', description: 'Kind is a string value representing the REST resource of this object.' },
      metadata: { type: 'object' },
      spec,
      status,
    },
    ...(specRequired ? { required: ['spec'] } : {}),
  };
  if (k.rules.length > 0) schema['x-kubernetes-validations'] = k.rules;
  assertDescribed(k.kind, schema);
  return schema;
}

/** Every field must explain itself to `kubectl explain`. */
function assertDescribed(kind: string, schema: JSONSchema): void {
  const missing: string[] = [];
  walkProperties(schema, (path, node) => {
    if (path === 'metadata') return; // the API server owns it and forbids describing it
    if (typeof node.description !== 'string' || node.description.trim() === '') missing.push(path);
  });
  if (missing.length > 0)
    throw new StructuralSchemaError(`${kind}: fields without a description: ${missing.join(', ')}`);
}

export function buildCRD(k: KindDefinition): CustomResourceDefinition {
  return {
    apiVersion: 'apiextensions.k8s.io/v1',
    kind: 'CustomResourceDefinition',
    metadata: {
      name: `${k.plural}.${k.group}`,
      labels: { 'app.kubernetes.io/part-of': 'stratus' },
    },
    spec: {
      group: k.group,
      names: {
        kind: k.kind,
        listKind: k.listKind,
        plural: k.plural,
        singular: k.singular,
        ...(k.shortNames.length > 0 ? { shortNames: k.shortNames } : {}),
        categories: k.categories,
      },
      scope: k.scope,
      versions: [
        {
          name: k.version,
          served: true,
          storage: true,
          schema: { openAPIV3Schema: kindSchema(k) },
          subresources: { status: {} },
          additionalPrinterColumns: k.columns.map((c) => ({
            name: c.name,
            type: c.type,
            jsonPath: c.jsonPath,
            description: c.description,
            ...(c.priority ? { priority: c.priority } : {}),
          })),
        },
      ],
    },
  };
}
