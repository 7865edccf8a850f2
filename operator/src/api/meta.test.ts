import { describe, expect, it } from 'vitest';
import { parseBytes, parseCidr, parseMilli, toGiB, toMiB } from './meta.ts';
import { cidrContains, compareIP, ipToBigInt } from './network.ts';
import { deriveServerStatus } from './nova-states.ts';

describe('quantities', () => {
  it('parses binary and decimal suffixes exactly', () => {
    expect(parseBytes('0')).toBe(0n);
    expect(parseBytes('512Mi')).toBe(512n * 1024n * 1024n);
    expect(parseBytes('1G')).toBe(1_000_000_000n);
    expect(parseBytes('1.5Gi')).toBe(1610612736n);
    expect(parseBytes('20Ti')).toBe(20n * 1024n ** 4n);
  });
  it('rounds fractional bytes up and converts to MiB/GiB rounding up', () => {
    expect(parseBytes('0.5')).toBe(1n);
    expect(toMiB('1Gi')).toBe(1024);
    expect(toMiB('1G')).toBe(954);
    expect(toMiB('1')).toBe(1);
    expect(toGiB('1Gi')).toBe(1);
    expect(toGiB('1025Mi')).toBe(2);
  });
  it('refuses malformed quantities', () => {
    expect(() => parseBytes('-1Gi')).toThrow(/invalid quantity/);
    expect(() => parseBytes('1gi')).toThrow(/invalid quantity/);
    expect(() => parseBytes('1e3')).toThrow(/invalid quantity/);
  });
  it('parses decimal ratios into thousandths', () => {
    expect(parseMilli('4.0')).toBe(4000);
    expect(parseMilli('1.5')).toBe(1500);
    expect(parseMilli('16')).toBe(16000);
    expect(parseMilli('0.125')).toBe(125);
  });
});

describe('addresses', () => {
  it('parses CIDRs of both families and refuses bad ones', () => {
    expect(parseCidr('10.0.0.0/24')).toEqual({ address: '10.0.0.0', prefix: 24, family: 4 });
    expect(parseCidr('fd00::/64')).toEqual({ address: 'fd00::', prefix: 64, family: 6 });
    expect(parseCidr('10.0.0.0/33')).toBeUndefined();
    expect(parseCidr('10.0.0/24')).toBeUndefined();
    expect(parseCidr('10.0.0.0')).toBeUndefined();
  });
  it('orders addresses numerically', () => {
    expect(compareIP('10.0.0.9', '10.0.0.10')).toBe(-1);
    expect(compareIP('10.0.1.0', '10.0.0.255')).toBe(1);
    expect(compareIP('fd00::1', 'fd00::1')).toBe(0);
    expect(compareIP('fd00::a', 'fd00::1:0')).toBe(-1);
    expect(ipToBigInt('::ffff:10.0.0.1')).toBe((0xffffn << 32n) | 0x0a000001n);
  });
  it('tests CIDR membership', () => {
    expect(cidrContains('10.0.0.0/24', '10.0.0.255')).toBe(true);
    expect(cidrContains('10.0.0.0/24', '10.0.1.0')).toBe(false);
    expect(cidrContains('10.0.0.0/0', '192.168.1.1')).toBe(true);
    expect(cidrContains('fd00::/64', 'fd00::ffff:1')).toBe(true);
    expect(cidrContains('fd00::/64', 'fd00:0:0:1::1')).toBe(false);
    expect(cidrContains('10.0.0.0/24', 'fd00::1')).toBe(false);
  });
});

describe('Nova status derivation', () => {
  it('maps vm_state and task_state as nova-api does', () => {
    expect(deriveServerStatus('active')).toBe('ACTIVE');
    expect(deriveServerStatus('active', 'rebooting')).toBe('REBOOT');
    expect(deriveServerStatus('active', 'reboot_started_hard')).toBe('HARD_REBOOT');
    expect(deriveServerStatus('active', 'resize_migrating')).toBe('RESIZE');
    expect(deriveServerStatus('active', 'powering-off')).toBe('ACTIVE');
    expect(deriveServerStatus('building', 'spawning')).toBe('BUILD');
    expect(deriveServerStatus('stopped')).toBe('SHUTOFF');
    expect(deriveServerStatus('stopped', 'rebuilding')).toBe('REBUILD');
    expect(deriveServerStatus('resized')).toBe('VERIFY_RESIZE');
    expect(deriveServerStatus('resized', 'resize_reverting')).toBe('REVERT_RESIZE');
    expect(deriveServerStatus('paused', 'migrating')).toBe('MIGRATING');
    expect(deriveServerStatus('error')).toBe('ERROR');
    expect(deriveServerStatus('error', 'rebuild_spawning')).toBe('REBUILD');
    expect(deriveServerStatus('soft-delete')).toBe('SOFT_DELETED');
    expect(deriveServerStatus(undefined)).toBe('UNKNOWN');
  });
});
