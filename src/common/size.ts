import { VbdError } from './errors.js';

// Human sizes ("512K", "64M", "1G", "4096") ↔ bytes. Binary units: K = 1024.

const UNITS: Record<string, number> = { '': 1, B: 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/** Parses a size such as "512K", "1.5G" or "4096"; `what` names the option for errors. */
export function parseSize(text: string, what: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$/i.exec(text);
  if (match === null) {
    throw new VbdError(`${what}: expected a size such as 4096, 512K, 64M or 1G, got '${text}'`);
  }
  const unit = UNITS[(match[2] ?? '').toUpperCase()] ?? 1;
  const bytes = Number(match[1]) * unit;
  if (!Number.isSafeInteger(bytes)) {
    throw new VbdError(`${what}: '${text}' is not a whole number of bytes`);
  }
  return bytes;
}

/** Formats bytes with the largest binary unit that divides it exactly, else with one decimal. */
export function formatSize(bytes: number): string {
  for (const unit of ['T', 'G', 'M', 'K'] as const) {
    const factor = UNITS[unit] ?? 1;
    if (bytes >= factor) {
      return bytes % factor === 0 ? `${bytes / factor}${unit}` : `${(bytes / factor).toFixed(1)}${unit}`;
    }
  }
  return `${bytes}B`;
}

export function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;
}
