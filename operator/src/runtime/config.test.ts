import { describe, expect, it } from 'vitest';
import * as z from 'zod';
import { ConfigError, configUsage, envName, flagName, loadConfig } from './config.ts';

const schema = z.object({
  metricsPort: z.int().min(0).max(65535).default(8080).describe('metrics port'),
  leaderElect: z.boolean().default(false),
  logLevel: z.enum(['debug', 'info', 'warn']).default('info'),
  namespaces: z.array(z.string()).default([]),
  leaseName: z.string().min(1),
  extra: z.record(z.string(), z.string()).optional(),
});

describe('names', () => {
  it('derives kebab-case flags and prefixed SCREAMING_SNAKE env vars', () => {
    expect(flagName('metricsPort')).toBe('--metrics-port');
    expect(envName('metricsPort')).toBe('STRATUS_METRICS_PORT');
    expect(envName('leaseName', 'X_')).toBe('X_LEASE_NAME');
  });
});

describe('loadConfig', () => {
  it('applies defaults and coerces env and flags by field type', () => {
    const cfg = loadConfig(schema, {
      argv: ['--metrics-port=9090', '--leader-elect', '--namespaces', 'a, b'],
      env: { STRATUS_LEASE_NAME: 'stratus', STRATUS_EXTRA: '{"k":"v"}', STRATUS_LOG_LEVEL: 'debug' },
    });
    expect(cfg).toEqual({
      metricsPort: 9090,
      leaderElect: true,
      logLevel: 'debug',
      namespaces: ['a', 'b'],
      leaseName: 'stratus',
      extra: { k: 'v' },
    });
  });

  it('lets a flag override the environment, and --no-x turn a boolean off', () => {
    const cfg = loadConfig(schema, {
      argv: ['--lease-name=fromflag', '--no-leader-elect'],
      env: { STRATUS_LEASE_NAME: 'fromenv', STRATUS_LEADER_ELECT: 'true', STRATUS_METRICS_PORT: '1' },
    });
    expect(cfg.leaseName).toBe('fromflag');
    expect(cfg.leaderElect).toBe(false);
    expect(cfg.metricsPort).toBe(1);
  });

  it('adds up a list flag given more than once (over the environment); other flags: the last wins', () => {
    const cfg = loadConfig(schema, {
      argv: ['--namespaces=a', '--lease-name=x', '--namespaces', 'b,c', '--lease-name=y'],
      env: { STRATUS_NAMESPACES: 'fromenv' },
    });
    expect(cfg.namespaces).toEqual(['a', 'b', 'c']);
    expect(cfg.leaseName).toBe('y');
  });

  it('names the offending flag or env var and the value in errors', () => {
    const err = (() => {
      try {
        loadConfig(schema, { argv: ['--metrics-port=abc', '--bogus=1'], env: { STRATUS_LOG_LEVEL: 'loud' } });
      } catch (e) {
        return e;
      }
    })();
    expect(err).toBeInstanceOf(ConfigError);
    const problems = (err as ConfigError).problems.join('\n');
    expect(problems).toContain('unknown flag --bogus');
    expect(problems).toMatch(/--metrics-port="abc": .*expected number/);
    expect(problems).toMatch(/STRATUS_LOG_LEVEL="loud": /);
    expect(problems).toMatch(/--lease-name \/ STRATUS_LEASE_NAME: /); // required, given nowhere
  });

  it('reports range violations and missing values; can ignore unknown flags', () => {
    expect(() => loadConfig(schema, { argv: ['--metrics-port=70000', '--lease-name=x'], env: {} })).toThrow(
      /--metrics-port="70000"/,
    );
    expect(() => loadConfig(schema, { argv: ['--lease-name'], env: {} })).toThrow(/--lease-name: missing value/);
    expect(() => loadConfig(schema, { argv: ['stray'], env: { STRATUS_LEASE_NAME: 'x' } })).toThrow(/unexpected/);
    expect(
      loadConfig(schema, { argv: ['--other=1', '--lease-name=x'], env: {}, allowUnknownFlags: true }).leaseName,
    ).toBe('x');
  });

  it('supports a custom prefix and prints usage', () => {
    expect(loadConfig(schema, { argv: [], env: { APP_LEASE_NAME: 'n' }, envPrefix: 'APP_' }).leaseName).toBe('n');
    expect(configUsage(schema)).toContain('--metrics-port  (STRATUS_METRICS_PORT)  metrics port');
  });
});
