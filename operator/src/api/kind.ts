// The description of one API kind: its identity, its zod schemas and what `kubectl` shows of it.
// The CRD generator turns a KindDefinition into a CustomResourceDefinition; controllers and the
// node agent use the same object to address the API (group, version, plural) and to validate.
import * as z from 'zod';
import { type CelRule, ObjectMeta } from './meta.ts';

export const VERSION = 'v1alpha1';

export interface PrinterColumn {
  name: string;
  type: 'string' | 'integer' | 'number' | 'boolean' | 'date';
  jsonPath: string;
  description: string;
  /** 0: shown by `kubectl get`; 1: only with `-o wide`. */
  priority?: 0 | 1;
}

export interface KindOptions<Spec extends z.ZodType, Status extends z.ZodType> {
  group: string;
  kind: string;
  plural: string;
  scope: 'Namespaced' | 'Cluster';
  shortNames: string[];
  /** Categories besides `stratus`, which every kind is in. */
  categories?: string[];
  description: string;
  spec: Spec;
  status: Status;
  /** Printer columns; AGE is appended. */
  columns: PrinterColumn[];
  /** CEL rules at the root of the object (may use self.metadata.name). */
  rules?: CelRule[];
}

export interface KindDefinition<Spec extends z.ZodType = z.ZodType, Status extends z.ZodType = z.ZodType>
  extends Required<Omit<KindOptions<Spec, Status>, 'rules'>> {
  rules: CelRule[];
  version: string;
  apiVersion: string;
  singular: string;
  listKind: string;
  /** Schema of a whole object as read from the API server (status optional). */
  schema: z.ZodObject<{
    apiVersion: z.ZodOptional<z.ZodString>;
    kind: z.ZodOptional<z.ZodString>;
    metadata: typeof ObjectMeta;
    spec: Spec;
    status: z.ZodOptional<Status>;
  }>;
}

export function defineKind<Spec extends z.ZodType, Status extends z.ZodType>(
  o: KindOptions<Spec, Status>,
): KindDefinition<Spec, Status> {
  return {
    ...o,
    categories: ['stratus', ...(o.categories ?? [])],
    rules: o.rules ?? [],
    columns: [
      ...o.columns,
      { name: 'Age', type: 'date', jsonPath: '.metadata.creationTimestamp', description: 'Time since creation.' },
    ],
    version: VERSION,
    apiVersion: `${o.group}/${VERSION}`,
    singular: o.kind.toLowerCase(),
    listKind: `${o.kind}List`,
    schema: z.object({
      apiVersion: z.string().optional(),
      kind: z.string().optional(),
      metadata: ObjectMeta,
      spec: o.spec,
      status: o.status.optional(),
    }),
  };
}

/** The `[?(@.type=="X")].status` column of a condition. */
export function conditionColumn(type: string, name = type): PrinterColumn {
  return {
    name,
    type: 'string',
    jsonPath: `.status.conditions[?(@.type=="${type}")].status`,
    description: `Status of the ${type} condition.`,
  };
}
