import { UsageError } from './errors.js';

// Human sizes ("512K", "64MiB", "1GB", "4096") ↔ bytes, read as util-linux reads them
// (losetup, fallocate, truncate): K, KiB = 1024; KB = 1000; likewise M, G, T, P, E, with the
// suffix letter in either case. A bare number is bytes.

const POWERS: Record<string, number> = { K: 1, M: 2, G: 3, T: 4, P: 5, E: 6 };
const BINARY: Record<string, number> = { K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/** Parses a size such as "512K", "1.5GiB", "100MB" or "4096"; `what` names the option for errors. */
export function parseSize(text: string, what: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*(?:([KMGTPE])(iB|B)?|B)?\s*$/i.exec(text);
  if (match === null) {
    throw new UsageError(`${what}: expected a size such as 4096, 512K (= 512KiB), 64M, 1G or 100MB (decimal), got '${text}'`);
  }
  const letter = (match[2] ?? '').toUpperCase();
  const decimal = (match[3] ?? '').toUpperCase() === 'B';
  const power = POWERS[letter] ?? 0;
  const bytes = Number(match[1]) * (decimal ? 1000 : 1024) ** power;
  if (bytes > Number.MAX_SAFE_INTEGER) throw new UsageError(`${what}: '${text}' is too large`);
  if (!Number.isSafeInteger(bytes)) {
    throw new UsageError(`${what}: '${text}' is not a whole number of bytes`);
  }
  return bytes;
}

/** Formats bytes with the largest binary unit that divides it exactly, else with one decimal. */
export function formatSize(bytes: number): string {
  for (const unit of ['T', 'G', 'M', 'K'] as const) {
    const factor = BINARY[unit] ?? 1;
    if (bytes >= factor) {
      return bytes % factor === 0 ? `${bytes / factor}${unit}` : `${(bytes / factor).toFixed(1)}${unit}`;
    }
  }
  return `${bytes}B`;
}

export function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;
}
