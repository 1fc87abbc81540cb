import { UsageError } from './errors.js';

const UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** Parses "500ms", "30s", "5m", "1h" (a bare number is seconds) into milliseconds. */
export function parseDuration(text: string, what: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$/.exec(text);
  if (match === null) throw new UsageError(`${what}: expected a duration such as 30s, 5m or 500ms, got '${text}'`);
  const ms = Number(match[1]) * (UNITS[match[2] ?? 's'] ?? 1000);
  if (ms < 100) throw new UsageError(`${what}: at least 100ms, got '${text}'`);
  return Math.round(ms);
}
