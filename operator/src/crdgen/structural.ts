// Turns zod schemas into Kubernetes structural OpenAPI v3 schemas.
//
// zod's JSON Schema output (target openapi-3.0, io input) is close to what the API server accepts,
// but not quite: it emits keywords a CRD may not carry and constructs a structural schema may not
// contain. This rewriter fixes what can be fixed and refuses the rest, so a schema that would be
// rejected (or silently mean something else) fails at generation time, not at install time.
import * as z from 'zod';

export type JSONSchema = { [key: string]: unknown };

const DROP_KEYS = [
  '$schema',
  '$id',
  'id',
  '$defs',
  'definitions',
  'examples',
  'readOnly',
  'writeOnly',
  'deprecated',
  'contentEncoding',
  'contentMediaType',
  'propertyNames',
];
const REFUSE_KEYS = ['$ref', 'patternProperties', 'oneOf', 'anyOf', 'allOf', 'not', 'const', 'dependencies'];
const SAFE_INT = 9007199254740991;

export class StructuralSchemaError extends Error {}

/** Converts a zod schema to a structural schema, throwing on anything a CRD cannot express. */
export function toStructural(schema: z.ZodType, path = ''): JSONSchema {
  const raw = z.toJSONSchema(schema, {
    target: 'openapi-3.0',
    io: 'input',
    unrepresentable: 'throw',
    cycles: 'throw',
    reused: 'inline',
  }) as JSONSchema;
  return rewrite(raw, path || '<root>');
}

function rewrite(node: JSONSchema, path: string): JSONSchema {
  const out: JSONSchema = {};
  for (const [k, v] of Object.entries(node)) {
    if (DROP_KEYS.includes(k)) continue;
    if (REFUSE_KEYS.includes(k)) {
      throw new StructuralSchemaError(
        `${path}: '${k}' cannot be expressed in a structural CRD schema; model alternatives as optional fields plus a CEL rule`,
      );
    }
    out[k] = v;
  }

  // Integers: zod bounds them by the JavaScript safe range; the API server's int64 needs no such bound.
  if (out.type === 'integer') {
    if (out.maximum === SAFE_INT) delete out.maximum;
    if (out.minimum === -SAFE_INT) delete out.minimum;
  }
  // z.literal([4, 6]) comes out as a number enum; integers are integers.
  if (out.type === 'number' && Array.isArray(out.enum) && out.enum.every((v) => Number.isInteger(v))) {
    out.type = 'integer';
  }
  // A format already constrains the value; RE2 patterns for it are redundant.
  if (typeof out.format === 'string' && out.pattern !== undefined) delete out.pattern;
  if (out.uniqueItems === true) {
    delete out.uniqueItems;
    out['x-kubernetes-list-type'] = 'set';
  }

  if (out.type === 'object') {
    const props = out.properties as Record<string, JSONSchema> | undefined;
    const extra = out.additionalProperties;
    if (extra === false) delete out.additionalProperties;
    if (props) {
      if (extra !== undefined && extra !== false && !isEmpty(extra)) {
        throw new StructuralSchemaError(`${path}: an object cannot have both properties and additionalProperties`);
      }
      if (extra !== undefined && isEmpty(extra)) {
        delete out.additionalProperties;
        out['x-kubernetes-preserve-unknown-fields'] = true;
      }
      const rewritten: Record<string, JSONSchema> = {};
      for (const [name, child] of Object.entries(props)) rewritten[name] = rewrite(child, `${path}.${name}`);
      // An empty map is dropped by the API server: keeping it makes the file differ from the stored CRD, and a
      // second server-side applier (helm's crds/, kubectl) then conflicts with the operator's CRD installer.
      if (Object.keys(rewritten).length > 0) out.properties = rewritten;
      else delete out.properties;
    } else if (extra !== undefined && extra !== false) {
      if (isEmpty(extra)) {
        delete out.additionalProperties;
        out['x-kubernetes-preserve-unknown-fields'] = true;
      } else {
        out.additionalProperties = rewrite(extra as JSONSchema, `${path}.*`);
      }
    }
  }
  if (out.type === 'array') {
    if (!out.items || Array.isArray(out.items))
      throw new StructuralSchemaError(`${path}: arrays need one items schema`);
    out.items = rewrite(out.items as JSONSchema, `${path}[]`);
  }

  const typed =
    typeof out.type === 'string' ||
    out['x-kubernetes-int-or-string'] === true ||
    out['x-kubernetes-preserve-unknown-fields'] === true;
  if (!typed) throw new StructuralSchemaError(`${path}: every node of a structural schema needs a type`);
  return out;
}

function isEmpty(v: unknown): boolean {
  return typeof v === 'object' && v !== null && Object.keys(v).length === 0;
}

/** Visits every property of a structural schema with its dotted path (arrays as `[]`). */
export function walkProperties(
  schema: JSONSchema,
  visit: (path: string, node: JSONSchema, required: boolean) => void,
  path = '',
): void {
  const props = schema.properties as Record<string, JSONSchema> | undefined;
  const required = new Set((schema.required as string[] | undefined) ?? []);
  for (const [name, child] of Object.entries(props ?? {})) {
    const p = path ? `${path}.${name}` : name;
    visit(p, child, required.has(name));
    walkProperties(child, visit, p);
    if (child.type === 'array' && child.items) walkProperties(child.items as JSONSchema, visit, `${p}[]`);
    if (child.additionalProperties && typeof child.additionalProperties === 'object') {
      walkProperties(child.additionalProperties as JSONSchema, visit, `${p}.*`);
    }
  }
}
