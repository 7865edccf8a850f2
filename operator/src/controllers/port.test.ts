// Unit tests: the port status the operator derives from the binding its node agent reports.
import { describe, expect, it } from 'vitest';
import { PORT_BOUND, type Port } from '../api/index.ts';
import { allocatedPortStatus, bindingChanged } from './port.ts';

const bound = (reason: string) => [{ type: PORT_BOUND, status: reason === 'Wired' ? 'True' : 'False', reason }];

describe('allocatedPortStatus', () => {
  it('is DOWN for a port no agent binds, whatever the operator wrote while it waited or failed', () => {
    expect(allocatedPortStatus({})).toBe('DOWN');
    expect(allocatedPortStatus({ conditions: bound('Wired') as never })).toBe('DOWN');
    expect(allocatedPortStatus({ bindingHost: 'n1' })).toBe('DOWN');
  });

  it('is ACTIVE when the agent reports it wired, BUILD while bound but not wired', () => {
    expect(allocatedPortStatus({ bindingHost: 'n1', conditions: bound('Wired') as never })).toBe('ACTIVE');
    expect(allocatedPortStatus({ bindingHost: 'n1', conditions: bound('WiringFailed') as never })).toBe('BUILD');
  });

  it('is DOWN once the agent unbinds it', () => {
    expect(allocatedPortStatus({ conditions: bound('Unbound') as never })).toBe('DOWN');
    expect(allocatedPortStatus({ bindingHost: 'n1', conditions: bound('Unbound') as never })).toBe('DOWN');
  });
});

describe('bindingChanged', () => {
  const port = (status: Port['status']) => ({ metadata: {}, spec: { network: 'n' }, status }) as unknown as Port;
  it('passes the agent binding changes the port status follows, not other status writes', () => {
    const a = port({ bindingHost: 'n1', conditions: bound('Wired') as never });
    expect(bindingChanged(a, port({ bindingHost: 'n1', conditions: bound('Wired') as never }))).toBe(false);
    expect(bindingChanged(a, port({ bindingHost: 'n1', conditions: bound('WiringFailed') as never }))).toBe(true);
    expect(bindingChanged(a, port({ conditions: bound('Unbound') as never }))).toBe(true);
    expect(bindingChanged(a, port({ bindingHost: 'n1', conditions: bound('Wired') as never, macAddress: 'x' }))).toBe(
      false,
    );
  });
});
