import { describe, expect, it } from 'vitest';
import { MAX_JSON_DEPTH, canonicalJson } from '../../src/common/canonical-json.js';

describe('canonical JSON', () => {
  it('one text whatever the key order or spacing of the source', () => {
    const a = JSON.parse('{ "b": 1, "a": { "y": [1, 2, {"q": null, "p": true}], "x": "s" } }') as unknown;
    const b = JSON.parse('{"a":{"x":"s","y":[1,2,{"p":true,"q":null}]},"b":1}') as unknown;
    expect(canonicalJson(a, 'v')).toBe('{"a":{"x":"s","y":[1,2,{"p":true,"q":null}]},"b":1}');
    expect(canonicalJson(b, 'v')).toBe(canonicalJson(a, 'v'));
  });
  it('keeps what differs different (array order, types, escapes)', () => {
    expect(canonicalJson([1, 2], 'v')).not.toBe(canonicalJson([2, 1], 'v'));
    expect(canonicalJson({ a: '1' }, 'v')).not.toBe(canonicalJson({ a: 1 }, 'v'));
    expect(canonicalJson({ 'a"b': 'c\n' }, 'v')).toBe('{"a\\"b":"c\\n"}');
    expect(canonicalJson(JSON.parse('{"__proto__": 1}') as unknown, 'v')).toBe('{"__proto__":1}');
  });
  it('refuses what JSON cannot hold, and deep nesting, naming where', () => {
    expect(() => canonicalJson({ a: [Number.NaN] }, 'params')).toThrow(/params\.a\[0\] holds a number JSON cannot write \(NaN\)/);
    expect(() => canonicalJson({ a: undefined }, 'params')).toThrow(/params\.a holds a value JSON cannot write \(undefined\)/);
    expect(() => canonicalJson(new Date(0), 'params')).toThrow(/params holds a value JSON cannot write/);
    const deep = JSON.parse('['.repeat(MAX_JSON_DEPTH + 2) + ']'.repeat(MAX_JSON_DEPTH + 2)) as unknown;
    expect(() => canonicalJson(deep, 'params')).toThrow(/nested deeper than 32 levels/);
    const ok = JSON.parse('['.repeat(MAX_JSON_DEPTH + 1) + ']'.repeat(MAX_JSON_DEPTH + 1)) as unknown;
    expect(canonicalJson(ok, 'params').length).toBe(2 * (MAX_JSON_DEPTH + 1));
  });
});
