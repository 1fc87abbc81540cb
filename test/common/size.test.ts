import { describe, expect, it } from 'vitest';
import { formatSize, parseSize } from '../../src/common/size.js';
import { UsageError } from '../../src/common/errors.js';

describe('size parsing (as util-linux reads sizes)', () => {
  it('accepts plain bytes and binary units: K, KiB = 1024', () => {
    expect(parseSize('4096', 'x')).toBe(4096);
    expect(parseSize('4096B', 'x')).toBe(4096);
    expect(parseSize('512K', 'x')).toBe(512 * 1024);
    expect(parseSize('512k', 'x')).toBe(512 * 1024);
    expect(parseSize('512KiB', 'x')).toBe(512 * 1024);
    expect(parseSize('64M', 'x')).toBe(64 * 2 ** 20);
    expect(parseSize('1G', 'x')).toBe(2 ** 30);
    expect(parseSize('1.5g', 'x')).toBe(1.5 * 2 ** 30);
    expect(parseSize('2GiB', 'x')).toBe(2 * 2 ** 30);
    expect(parseSize('1T', 'x')).toBe(2 ** 40);
    expect(parseSize('1P', 'x')).toBe(2 ** 50);
  });
  it('reads KB, MB, GB … as decimal: KB = 1000', () => {
    expect(parseSize('1KB', 'x')).toBe(1000);
    expect(parseSize('1kB', 'x')).toBe(1000);
    expect(parseSize('100MB', 'x')).toBe(100_000_000);
    expect(parseSize('1GB', 'x')).toBe(1_000_000_000);
    expect(parseSize('1.5KB', 'x')).toBe(1500);
    expect(parseSize('2TB', 'x')).toBe(2e12);
  });
  it('refuses what is not a whole size, naming the option, as a usage error', () => {
    expect(() => parseSize('-1M', '--size')).toThrow(/--size: expected a size/);
    expect(() => parseSize('12Q', '--size')).toThrow(/got '12Q'/);
    expect(() => parseSize('1iB', '--size')).toThrow(/got '1iB'/);
    expect(() => parseSize('1KiBB', '--size')).toThrow(/got '1KiBB'/);
    expect(() => parseSize('0.3K', '--size')).toThrow(/not a whole number/);
    expect(() => parseSize('1E', '--size')).toThrow(/too large/);
    expect(() => parseSize('1M', 'x') && parseSize('x', '--size')).toThrow(UsageError);
  });
  it('formats exact binary units (which read back as the same bytes)', () => {
    expect(formatSize(2 ** 30)).toBe('1G');
    expect(formatSize(1536)).toBe('1.5K');
    expect(formatSize(100)).toBe('100B');
    for (const n of [512, 65536, 3 * 2 ** 20, 2 ** 40]) expect(parseSize(formatSize(n), 'x')).toBe(n);
  });
});
