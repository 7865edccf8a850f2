// Root logger factory: JSON lines (pino) with ISO timestamps; children add controller/key/reconcileID.

import { type DestinationStream, type Level, type Logger, pino } from 'pino';

export type { Logger };

export type LogLevel = Level | 'silent';

export interface LoggerOptions {
  level?: LogLevel;
  /** Added to every line as `name` (e.g. the binary). */
  name?: string;
  /** Defaults to stdout. */
  destination?: DestinationStream;
  /** Extra fields on every line. */
  base?: Record<string, unknown>;
}

export function createLogger(opts: LoggerOptions = {}): Logger {
  const options = {
    level: opts.level ?? 'info',
    base: { ...(opts.name ? { name: opts.name } : {}), ...opts.base },
    timestamp: pino.stdTimeFunctions.isoTime,
    formatters: { level: (label: string) => ({ level: label }) },
  };
  return opts.destination ? pino(options, opts.destination) : pino(options);
}

/** A logger that drops everything (tests, library defaults). */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
