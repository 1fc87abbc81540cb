import { describe, expect, it } from 'vitest';
import { formatSize, parseSize } from '../../src/common/size.js';

describe('size parsing', () => {
  it('accepts plain bytes and binary units', () => {
    expect(parseSize('4096', 'x')).toBe(4096);
    expect(parseSize('512K', 'x')).toBe(512 * 1024);
    expect(parseSize('64M', 'x')).toBe(64 * 2 ** 20);
    expect(parseSize('1G', 'x')).toBe(2 ** 30);
    expect(parseSize('1.5g', 'x')).toBe(1.5 * 2 ** 30);
    expect(parseSize('2GiB', 'x')).toBe(2 * 2 ** 30);
  });
  it('refuses what is not a whole size, naming the option', () => {
    expect(() => parseSize('-1M', '--size')).toThrow(/--size: expected a size/);
    expect(() => parseSize('12Q', '--size')).toThrow(/got '12Q'/);
    expect(() => parseSize('0.3K', '--size')).toThrow(/not a whole number/);
  });
  it('formats exact units', () => {
    expect(formatSize(2 ** 30)).toBe('1G');
    expect(formatSize(1536)).toBe('1.5K');
    expect(formatSize(100)).toBe('100B');
  });
});
