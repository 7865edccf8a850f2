import { describe, expect, it } from 'vitest';
import { agentFieldManager } from './fieldmanager.ts';

describe('agentFieldManager', () => {
  it('is stratus-agent/<node>', () => {
    expect(agentFieldManager('node-1')).toBe('stratus-agent/node-1');
  });

  it('fits the API server limit of 128 bytes for the longest node names, distinct and stable', () => {
    const a = `${'a'.repeat(200)}.example.com`;
    const b = `${'a'.repeat(200)}.example.org`;
    expect(agentFieldManager(a).length).toBeLessThanOrEqual(128);
    expect(agentFieldManager(a)).toMatch(/^stratus-agent\/a+-[0-9a-f]{8}$/);
    expect(agentFieldManager(a)).not.toBe(agentFieldManager(b));
    expect(agentFieldManager(a)).toBe(agentFieldManager(a));
    expect(agentFieldManager('x'.repeat(114))).toBe(`stratus-agent/${'x'.repeat(114)}`);
  });
});
