// One text for one JSON value: object keys sorted, no spaces. Authenticated data that covers a
// JSON value (a layout's parameters) must not depend on how the manifest happened to be written.

import { VbdError } from './errors.js';

/** Deepest nesting accepted: manifest values are small; a deeper one is refused, not recursed into. */
export const MAX_JSON_DEPTH = 32;

/**
 * The canonical text of a JSON value: objects with their keys in code-unit order, arrays in
 * order, numbers and strings as JSON.stringify writes them, no whitespace. Refuses what JSON
 * cannot hold (undefined, functions, NaN, Infinity, bigint) and nesting deeper than MAX_JSON_DEPTH;
 * `where` names the value in the error.
 */
export function canonicalJson(value: unknown, where: string): string {
  return encode(value, where, 0);
}

function encode(value: unknown, where: string, depth: number): string {
  if (depth > MAX_JSON_DEPTH) throw new VbdError(`${where} is nested deeper than ${MAX_JSON_DEPTH} levels`);
  if (value === null || typeof value === 'boolean' || typeof value === 'string') return JSON.stringify(value);
  if (typeof value === 'number') {
    if (!Number.isFinite(value)) throw new VbdError(`${where} holds a number JSON cannot write (${String(value)})`);
    return JSON.stringify(value);
  }
  if (Array.isArray(value)) return `[${value.map((item, i) => encode(item, `${where}[${i}]`, depth + 1)).join(',')}]`;
  if (typeof value === 'object' && Object.getPrototypeOf(value) === Object.prototype) {
    const obj = value as Record<string, unknown>;
    const keys = Object.keys(obj).sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${encode(obj[k], `${where}.${k}`, depth + 1)}`).join(',')}}`;
  }
  throw new VbdError(`${where} holds a value JSON cannot write (${typeof value})`);
}
