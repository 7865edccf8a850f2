import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import * as z from 'zod';
import { ALL_KINDS } from '../api/index.ts';
import { buildCRD, kindSchema } from './crd.ts';
import { generatedFiles } from './index.ts';
import { StructuralSchemaError, toStructural, walkProperties } from './structural.ts';

const root = resolve(import.meta.dirname, '../../..');

describe('structural schema rewriting', () => {
  it('leaves out an empty properties map (the API server drops it, so the stored CRD would differ from the file)', () => {
    // A difference between a CRD file and the stored CRD makes a second server-side applier (helm install of
    // charts/stratus/crds, kubectl apply --server-side) conflict with the operator's --install-crds field manager.
    const s = toStructural(z.object({ status: z.object({}).describe('none') }).describe('root'));
    const status = (s.properties as Record<string, Record<string, unknown>>).status;
    expect(status).toEqual({ type: 'object', description: 'none' });
  });

  it('drops what CRDs may not carry and keeps x-kubernetes extensions', () => {
    const s = toStructural(
      z
        .object({
          n: z.int().min(0).describe('n'),
          m: z.record(z.string(), z.unknown()).describe('free-form'),
          v: z.literal([4, 6]).describe('version'),
        })
        .describe('root')
        .meta({ 'x-kubernetes-validations': [{ rule: 'true', message: 'm' }] }),
    );
    expect(s.$schema).toBeUndefined();
    expect(s.additionalProperties).toBeUndefined();
    const props = s.properties as Record<string, Record<string, unknown>>;
    expect(props.n).toEqual({ type: 'integer', minimum: 0, description: 'n' });
    expect(props.m?.['x-kubernetes-preserve-unknown-fields']).toBe(true);
    expect(props.m?.additionalProperties).toBeUndefined();
    expect(props.v?.type).toBe('integer');
    expect(s['x-kubernetes-validations']).toEqual([{ rule: 'true', message: 'm' }]);
  });

  it('refuses unions, which are not structural', () => {
    expect(() => toStructural(z.object({ a: z.union([z.string(), z.int()]) }))).toThrow(StructuralSchemaError);
    expect(() => toStructural(z.object({ a: z.union([z.string(), z.int()]) }))).toThrow(/\.a: 'anyOf'/);
  });

  it('refuses nodes without a type', () => {
    expect(() => toStructural(z.object({ a: z.any() }))).toThrow(/needs a type/);
  });
});

describe('generated CRDs', () => {
  it('describe every field of every kind (kubectl explain)', () => {
    for (const k of ALL_KINDS) {
      walkProperties(kindSchema(k), (path, node) => {
        if (path === 'metadata') return;
        expect(typeof node.description, `${k.kind} ${path}`).toBe('string');
      });
    }
  });

  it('put every kind in the stratus category with a status subresource and printer columns', () => {
    const names = new Set<string>();
    for (const k of ALL_KINDS) {
      const crd = buildCRD(k);
      const spec = crd.spec as {
        names: { categories: string[]; shortNames?: string[]; plural: string };
        versions: { subresources: unknown; additionalPrinterColumns: { name: string }[] }[];
      };
      expect(spec.names.categories).toContain('stratus');
      expect(spec.versions[0]?.subresources).toEqual({ status: {} });
      expect(spec.versions[0]?.additionalPrinterColumns.map((c) => c.name)).toContain('Age');
      for (const n of [spec.names.plural, ...(spec.names.shortNames ?? [])]) {
        expect(names.has(n), `duplicate name ${n}`).toBe(false);
        names.add(n);
      }
    }
    const server = buildCRD(ALL_KINDS.find((k) => k.kind === 'Server')!).spec as {
      versions: { additionalPrinterColumns: { name: string }[] }[];
    };
    expect(server.versions[0]?.additionalPrinterColumns.map((c) => c.name.toUpperCase())).toEqual(
      expect.arrayContaining(['STATUS', 'POWER', 'NODE', 'ADDRESSES', 'FLAVOR', 'IMAGE', 'AGE']),
    );
  });

  it('are committed exactly as generated (run `npm run generate` after changing a schema)', () => {
    for (const [rel, content] of generatedFiles()) {
      expect(readFileSync(resolve(root, rel), 'utf8'), rel).toBe(content);
    }
  });
});
