// The keyed layout's key derivation is unchanged by the shared scryptDerive helper.
import { createHmac, scryptSync } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { deriveKeys, scryptDerive } from '../../src/layouts/secret.js';

describe('scryptDerive (shared by keyed layouts and sealed volumes)', () => {
  it('gives the keyed layout exactly the keys it had before', () => {
    const salt = '00112233445566778899aabbccddeeff';
    const raw = scryptSync(Buffer.from('pw'), Buffer.from(salt, 'hex'), 64, { N: 1024, r: 8, p: 1 });
    const { layoutKey, keyCheck } = deriveKeys(Buffer.from('pw'), salt, { N: 1024, r: 8, p: 1 });
    expect(layoutKey.equals(raw.subarray(0, 32))).toBe(true);
    expect(keyCheck).toBe(createHmac('sha256', raw.subarray(32)).update('vbd-shadow key-check v1').digest('hex'));
  });
  it('refuses parameters above the caps before any work', () => {
    expect(() => scryptDerive(Buffer.from('x'), Buffer.alloc(16), { N: 2 ** 20, r: 8, p: 1 }, 32)).toThrow(/scrypt parameters refused: needs 1024 MiB/);
    expect(() => scryptDerive(Buffer.from('x'), Buffer.alloc(16), { N: 1024, r: 8, p: 5 }, 32)).toThrow(/p=5 is more than the 4 allowed/);
  });
});
