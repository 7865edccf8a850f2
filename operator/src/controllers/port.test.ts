import { describe, expect, it } from 'vitest';
import { PORT_BOUND } from '../api/index.ts';
import { allocatedPortStatus } from './port.ts';

const bound = (reason: string) => [{ type: PORT_BOUND, status: reason === 'Wired' ? 'True' : 'False', reason }];

describe('allocatedPortStatus', () => {
  it('is DOWN for a port no agent ever bound, whatever the operator wrote while it waited or failed', () => {
    expect(allocatedPortStatus({})).toBe('DOWN');
    expect(allocatedPortStatus({ status: 'BUILD' })).toBe('DOWN');
    expect(allocatedPortStatus({ status: 'ERROR' })).toBe('DOWN');
  });

  it("keeps the agent's status while a node binds the port (BUILD: bound but not wired is not flapped to DOWN)", () => {
    const conditions = bound('WiringFailed') as never;
    expect(allocatedPortStatus({ status: 'BUILD', bindingHost: 'n1', conditions })).toBe('BUILD');
    expect(allocatedPortStatus({ status: 'ACTIVE', bindingHost: 'n1', conditions: bound('Wired') as never })).toBe(
      'ACTIVE',
    );
  });

  it('replaces a BUILD or ERROR of a port that is no longer bound', () => {
    const conditions = bound('Unbound') as never;
    expect(allocatedPortStatus({ status: 'BUILD', conditions })).toBe('DOWN');
    expect(allocatedPortStatus({ status: 'ERROR', bindingHost: 'n1', conditions })).toBe('DOWN');
    expect(allocatedPortStatus({ status: 'DOWN', conditions })).toBe('DOWN');
  });
});
