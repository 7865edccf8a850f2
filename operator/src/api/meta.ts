// Shared building blocks of the Stratus v1alpha1 API.
//
// Every schema here carries two kinds of validation:
//  - zod checks (including refinements) that the operator and the node agent run on what they read;
//  - CEL rules (`x-kubernetes-validations`, attached with `.meta`) that the API server runs at apply time.
// Refinements are invisible to the CRD generator, so a rule that must hold at admission is always also
// written as CEL. The integration tests run every invalid manifest through both.
//
// This module imports nothing from the rest of Stratus.
import { isIP } from 'node:net';
import * as z from 'zod';

/** One CEL validation rule as the API server takes it (`x-kubernetes-validations[]`). */
export interface CelRule {
  rule: string;
  message: string;
  /** JSON path relative to the node the rule is attached to, so errors name the offending field. */
  fieldPath?: string;
  reason?: 'FieldValueInvalid' | 'FieldValueForbidden' | 'FieldValueRequired' | 'FieldValueDuplicate';
}

/** Attaches CEL rules to a schema node (merging with rules already there). */
export function cel<T extends z.ZodType>(schema: T, ...rules: CelRule[]): T {
  const existing = (schema.meta()?.['x-kubernetes-validations'] as CelRule[] | undefined) ?? [];
  return schema.meta({ ...schema.meta(), 'x-kubernetes-validations': [...existing, ...rules] }) as T;
}

/** Marks a field immutable once set: the API server refuses any change on update. */
export function immutable<T extends z.ZodType>(schema: T, what = 'this field'): T {
  return cel(schema, { rule: 'self == oldSelf', message: `${what} is immutable` });
}

/**
 * Rule for an object whose optional child `field` may be set at creation but never added or removed
 * later. Pair it with {@link immutable} on the field itself, which forbids changes. (One combined rule
 * `!has(self.f) || self.f == oldSelf.f` is estimated far costlier by the API server and refused.)
 */
export function fixedPresence(field: string): CelRule {
  return {
    rule: `has(self.${field}) == has(oldSelf.${field})`,
    message: `${field} cannot be added or removed after creation`,
    fieldPath: `.${field}`,
  };
}

const DNS1123_SUBDOMAIN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;
const DNS1123_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;

/** The name of another Stratus object (a DNS-1123 subdomain, like every Kubernetes object name). */
export function objectName(description: string) {
  return z.string().min(1).max(253).regex(DNS1123_SUBDOMAIN).describe(description);
}

/** A DNS-1123 label (hostnames, subnet names, namespace names). */
export function dnsLabel(description: string) {
  return z.string().min(1).max(63).regex(DNS1123_LABEL).describe(description);
}

/**
 * A non-negative size in bytes written as a Kubernetes quantity without exponent or fraction
 * of a byte: `512Mi`, `20Gi`, `1G`, `0`. Plain numbers are bytes, so `ram: 512` would be
 * 512 bytes; the schema therefore requires a string (YAML `512` is refused) to avoid that trap.
 */
export function byteQuantity(description: string) {
  return z
    .string()
    .max(32)
    .regex(/^(0|[1-9][0-9]*)(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$/)
    .describe(description);
}

const UNIT: Record<string, bigint> = {
  '': 1n,
  k: 1000n,
  M: 1000n ** 2n,
  G: 1000n ** 3n,
  T: 1000n ** 4n,
  P: 1000n ** 5n,
  E: 1000n ** 6n,
  Ki: 1024n,
  Mi: 1024n ** 2n,
  Gi: 1024n ** 3n,
  Ti: 1024n ** 4n,
  Pi: 1024n ** 5n,
  Ei: 1024n ** 6n,
};

/** Parses a byte quantity (see {@link byteQuantity}) to bytes, rounding a fractional byte up. */
export function parseBytes(q: string): bigint {
  const m = /^(0|[1-9][0-9]*)(?:\.([0-9]+))?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$/.exec(q);
  if (!m) throw new Error(`invalid quantity ${JSON.stringify(q)}`);
  const unit = UNIT[m[3] ?? '']!;
  const whole = BigInt(m[1]!) * unit;
  if (!m[2]) return whole;
  const scale = 10n ** BigInt(m[2].length);
  const frac = BigInt(m[2]) * unit;
  return whole + (frac + scale - 1n) / scale;
}

/** Bytes expressed in whole MiB, rounded up (QEMU's -m, Nova's ram). */
export function toMiB(q: string): number {
  return Number((parseBytes(q) + 1024n * 1024n - 1n) / (1024n * 1024n));
}

/** Bytes expressed in whole GiB, rounded up (Nova's disk). */
export function toGiB(q: string): number {
  return Number((parseBytes(q) + 1024n ** 3n - 1n) / 1024n ** 3n);
}

/**
 * A decimal ratio written as a string (`"4.0"`, `"1.5"`): Kubernetes API conventions avoid floats.
 * At most three fractional digits.
 */
export function decimalRatio(description: string) {
  return z
    .string()
    .max(16)
    .regex(/^(0|[1-9][0-9]*)(\.[0-9]{1,3})?$/)
    .describe(description);
}

/** Parses a {@link decimalRatio} into thousandths, exactly (`"1.5"` → 1500). */
export function parseMilli(ratio: string): number {
  const [whole, frac = ''] = ratio.split('.');
  return Number(whole) * 1000 + Number(frac.padEnd(3, '0'));
}

/** An IPv4 or IPv6 address. */
export function ipAddress(description: string) {
  return cel(
    z
      .string()
      .max(45)
      .refine((v) => isIP(v) !== 0, { message: 'must be a valid IP address' })
      .describe(description),
    { rule: 'isIP(self)', message: 'must be a valid IPv4 or IPv6 address' },
  );
}

/** Parses `a.b.c.d/n` or `x::/n` into its parts, or undefined if malformed. */
export function parseCidr(v: string): { address: string; prefix: number; family: 4 | 6 } | undefined {
  const slash = v.indexOf('/');
  if (slash < 0) return undefined;
  const address = v.slice(0, slash);
  const prefixText = v.slice(slash + 1);
  const family = isIP(address);
  if (family === 0 || !/^[0-9]{1,3}$/.test(prefixText)) return undefined;
  const prefix = Number(prefixText);
  if (prefix > (family === 4 ? 32 : 128)) return undefined;
  return { address, prefix, family: family as 4 | 6 };
}

/** A CIDR (`10.0.0.0/24`, `fd00::/64`). */
export function cidrString(description: string) {
  return cel(
    z
      .string()
      .max(49)
      .refine((v) => parseCidr(v) !== undefined, { message: 'must be a valid CIDR' })
      .describe(description),
    { rule: 'isCIDR(self)', message: 'must be a valid CIDR such as 10.0.0.0/24 or fd00::/64' },
  );
}

/** An Ethernet MAC address in lower-case colon notation. */
export function macAddress(description: string) {
  return z
    .string()
    .regex(/^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/)
    .describe(description);
}

// ---------------------------------------------------------------------------------------------
// Status building blocks

/** metav1.Condition, exactly as Kubernetes defines it. */
export const Condition = z
  .object({
    type: z
      .string()
      .max(316)
      .regex(
        /^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$/,
      )
      .describe('Type of condition in CamelCase, e.g. Ready.'),
    status: z.enum(['True', 'False', 'Unknown']).describe('Status of the condition: True, False or Unknown.'),
    observedGeneration: z
      .int()
      .min(0)
      .optional()
      .describe('The .metadata.generation that the condition was set based upon.'),
    lastTransitionTime: z
      .string()
      .describe('Last time the condition transitioned from one status to another (RFC 3339).')
      .meta({ format: 'date-time' }),
    reason: z
      .string()
      .min(1)
      .max(1024)
      .regex(/^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$/)
      .describe('A programmatic identifier in CamelCase indicating the reason for the last transition.'),
    message: z.string().max(32768).describe('A human readable message with details about the transition.'),
  })
  .describe('A condition of the object (metav1.Condition).');
export type Condition = z.infer<typeof Condition>;

export const conditions = () =>
  z
    .array(Condition)
    .max(32)
    .optional()
    .describe('Latest observations of the object state. Ready summarises them.')
    .meta({ 'x-kubernetes-list-type': 'map', 'x-kubernetes-list-map-keys': ['type'] });

export const observedGeneration = () =>
  z.int().min(0).optional().describe('The .metadata.generation the controller last acted on.');

export const timestamp = (description: string) => z.string().describe(description).meta({ format: 'date-time' });

// ---------------------------------------------------------------------------------------------
// Object metadata, as read by Stratus code (the API server owns its validation).

export const OwnerReference = z.object({
  apiVersion: z.string(),
  kind: z.string(),
  name: z.string(),
  uid: z.string(),
  controller: z.boolean().optional(),
  blockOwnerDeletion: z.boolean().optional(),
});

const apiTime = z.custom<Date>((v) => typeof v === 'string' || v instanceof Date, 'must be a timestamp');

export const ObjectMeta = z.looseObject({
  name: z.string().optional(),
  generateName: z.string().optional(),
  namespace: z.string().optional(),
  uid: z.string().optional(),
  resourceVersion: z.string().optional(),
  generation: z.int().optional(),
  // Typed as Date like @kubernetes/client-node's models; raw JSON from the API carries RFC 3339 strings.
  creationTimestamp: apiTime.optional(),
  deletionTimestamp: apiTime.optional(),
  labels: z.record(z.string(), z.string()).optional(),
  annotations: z.record(z.string(), z.string()).optional(),
  finalizers: z.array(z.string()).optional(),
  ownerReferences: z.array(OwnerReference).optional(),
});
export type ObjectMeta = z.infer<typeof ObjectMeta>;
