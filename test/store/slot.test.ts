// The sealed slot format with real AES-256-GCM: round trips, tampering, misplaced slots, nonces, budget.

import { createDecipheriv, randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { VbdError } from '../../src/common/errors.js';
import { VolumeKeys, slotKeyOf, type SlotKey } from '../../src/store/keys.js';
import {
  NONCE_MARGIN, NonceBudget, RANDOM_NONCE_LIMIT, SLOT_OVERHEAD, SlotAuthError, SlotSealer, openChunk, sealChunk, slotAD, slotSize,
} from '../../src/store/slot.js';

const uuid = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
const keys = new VolumeKeys(randomBytes(32), uuid);
const key0 = keys.slotKey(0);

function sealed(key: SlotKey, chunk: number, epoch: number, plaintext: Buffer): Buffer {
  const slot = Buffer.alloc(slotSize(plaintext.length));
  sealChunk(key, { chunk, epoch }, plaintext, slot);
  return slot;
}

function authFailure(fn: () => void): SlotAuthError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(SlotAuthError);
    expect(err).toBeInstanceOf(VbdError);
    return err as SlotAuthError;
  }
  throw new Error('expected the slot to fail authentication');
}

describe('sealed slots', () => {
  it('round trip at several chunk sizes, reusing the caller\'s buffers', () => {
    for (const size of [512, 4096, 65536, 1 << 20]) {
      const slot = Buffer.alloc(slotSize(size));
      const out = Buffer.alloc(size);
      for (let i = 0; i < 3; i++) {
        const plain = randomBytes(size);
        sealChunk(key0, { chunk: 42 + i, epoch: 7 }, plain, slot);
        expect(slot.length).toBe(size + 28);
        openChunk(key0, { chunk: 42 + i, epoch: 7 }, slot, out);
        expect(out.equals(plain)).toBe(true);
      }
    }
  });

  it('is nonce ‖ tag ‖ ciphertext with the documented AD, and holds no plaintext', () => {
    const plain = Buffer.alloc(4096, 0x41);
    plain.write('a distinctive marker string', 100);
    const slot = sealed(key0, 5, 9, plain);
    expect(slot.includes(Buffer.from('distinctive marker'))).toBe(false);
    expect(slot.includes(Buffer.alloc(32, 0x41))).toBe(false);
    const ad = Buffer.concat([uuid, Buffer.from([0, 0, 0, 0, 0, 0, 0, 5]), Buffer.from([0, 0, 0, 0, 0, 0, 0, 9]), Buffer.from([0, 0, 0, 0])]);
    expect(slotAD(uuid, 5, 9, 0).equals(ad)).toBe(true);
    const d = createDecipheriv('aes-256-gcm', key0.key, slot.subarray(0, 12));
    d.setAAD(ad);
    d.setAuthTag(slot.subarray(12, 28));
    expect(Buffer.concat([d.update(slot.subarray(28)), d.final()]).equals(plain)).toBe(true);
  });

  it('a flipped bit in the nonce, the tag or the ciphertext fails and names the chunk and epoch', () => {
    const plain = randomBytes(4096);
    const good = sealed(key0, 123, 45, plain);
    for (const at of [0, 11, 12, 27, 28, 28 + 2048, good.length - 1]) {
      for (const bit of [0x01, 0x80]) {
        const bad = Buffer.from(good);
        bad[at] = (bad[at] ?? 0) ^ bit;
        const out = Buffer.alloc(4096, 0xee);
        const err = authFailure(() => openChunk(key0, { chunk: 123, epoch: 45 }, bad, out));
        expect([err.chunk, err.epoch, err.generation]).toEqual([123, 45, 0]);
        expect(err.message).toMatch(/^chunk 123, epoch 45 \(key generation 0\): the slot fails authentication/);
        expect(out.equals(Buffer.alloc(4096, 0xee))).toBe(true); // nothing unverified reaches the caller
      }
    }
  });

  it('a slot opened as another chunk, epoch, volume or key generation fails', () => {
    const plain = randomBytes(4096);
    const slot = sealed(key0, 10, 3, plain);
    const out = Buffer.alloc(4096);
    expect(authFailure(() => openChunk(key0, { chunk: 11, epoch: 3 }, slot, out)).chunk).toBe(11);
    expect(authFailure(() => openChunk(key0, { chunk: 10, epoch: 2 }, slot, out)).epoch).toBe(2); // an older epoch: a replay
    expect(authFailure(() => openChunk(key0, { chunk: 10, epoch: 4 }, slot, out)).epoch).toBe(4);
    // Chunk numbers and epochs past 2^32 are distinct too (u64 in the AD).
    expect(authFailure(() => openChunk(key0, { chunk: 10 + 2 ** 32, epoch: 3 }, slot, out)).chunk).toBe(10 + 2 ** 32);
    // Same key bytes, another volume's UUID: the AD alone refuses it.
    const otherVolume: SlotKey = slotKeyOf(key0.key, 0, Buffer.alloc(16, 0xab));
    authFailure(() => openChunk(otherVolume, { chunk: 10, epoch: 3 }, slot, out));
    // Same key bytes, another generation in the AD.
    const otherGenAD: SlotKey = slotKeyOf(key0.key, 1, uuid);
    expect(authFailure(() => openChunk(otherGenAD, { chunk: 10, epoch: 3 }, slot, out)).generation).toBe(1);
    // The real next generation: another key and another AD.
    authFailure(() => openChunk(keys.slotKey(1), { chunk: 10, epoch: 3 }, slot, out));
    // Another volume's real keys with the same UUID.
    authFailure(() => openChunk(new VolumeKeys(randomBytes(32), uuid).slotKey(0), { chunk: 10, epoch: 3 }, slot, out));
    // And it still opens where it belongs.
    openChunk(key0, { chunk: 10, epoch: 3 }, slot, out);
    expect(out.equals(plain)).toBe(true);
  });

  it('slots swapped between two chunks both fail', () => {
    const a = sealed(key0, 1, 8, randomBytes(512));
    const b = sealed(key0, 2, 8, randomBytes(512));
    const out = Buffer.alloc(512);
    authFailure(() => openChunk(key0, { chunk: 1, epoch: 8 }, b, out));
    authFailure(() => openChunk(key0, { chunk: 2, epoch: 8 }, a, out));
  });

  it('every seal draws a fresh nonce: 100k seals, 100k distinct nonces, and the same chunk twice differs', () => {
    const nonces = new Set<string>();
    const plain = Buffer.alloc(512);
    const slot = Buffer.alloc(slotSize(512));
    for (let i = 0; i < 100_000; i++) {
      sealChunk(key0, { chunk: 0, epoch: 0 }, plain, slot);
      nonces.add(slot.toString('hex', 0, 12));
    }
    expect(nonces.size).toBe(100_000);
    expect(nonces.has('0'.repeat(24))).toBe(false);
    const x = sealed(key0, 0, 0, plain);
    const y = sealed(key0, 0, 0, plain);
    expect(x.equals(y)).toBe(false);
  });

  it('wrong buffer sizes and bad addresses are refused with one line', () => {
    const plain = Buffer.alloc(4096);
    expect(() => sealChunk(key0, { chunk: 0, epoch: 0 }, plain, Buffer.alloc(4096))).toThrow(/slot buffer is 4096 bytes, a chunk of 4096 needs 4124/);
    expect(() => sealChunk(key0, { chunk: 0, epoch: 0 }, Buffer.alloc(0), Buffer.alloc(28))).toThrow(/cannot seal an empty chunk/);
    const slot = sealed(key0, 0, 0, plain);
    expect(() => openChunk(key0, { chunk: 0, epoch: 0 }, slot, Buffer.alloc(4095))).toThrow(/chunk buffer is 4095 bytes, a slot of 4124 holds 4096/);
    expect(() => openChunk(key0, { chunk: 0, epoch: 0 }, Buffer.alloc(28), Buffer.alloc(0))).toThrow(/too short/);
    expect(() => sealChunk(key0, { chunk: -1, epoch: 0 }, plain, slot)).toThrow(/chunk number must be a non-negative safe integer/);
    expect(() => sealChunk(key0, { chunk: 0, epoch: 2 ** 53 }, plain, slot)).toThrow(/epoch must be a non-negative safe integer/);
    expect(SLOT_OVERHEAD).toBe(28);
  });
});

describe('nonce budget', () => {
  it('has the NIST limit and the documented margin by default', () => {
    const b = new NonceBudget({ generation: 0, used: 0 });
    expect(b.limit).toBe(RANDOM_NONCE_LIMIT);
    expect(RANDOM_NONCE_LIMIT).toBe(2 ** 32);
    expect(b.threshold).toBe(2 ** 32 - NONCE_MARGIN);
    expect(b.remaining).toBe(2 ** 32 - 2 ** 28);
    expect(b.rekeyDue).toBe(false);
  });

  it('at a small test limit: plans, counts, falls due, refuses past the limit, re-keys', () => {
    const b = new NonceBudget({ generation: 3, used: 0 }, { limit: 100, margin: 10 });
    expect(b.allows(90)).toBe(true);
    expect(b.allows(91)).toBe(false);
    b.consume(85);
    expect([b.used, b.remaining, b.rekeyDue]).toEqual([85, 5, false]);
    expect(b.allows(5)).toBe(true);
    expect(b.allows(6)).toBe(false); // the caller re-keys before this flush
    b.consume(5);
    expect([b.remaining, b.rekeyDue]).toEqual([0, true]);
    b.consume(10); // the margin absorbs a flush already under way, up to the hard limit
    expect(b.used).toBe(100);
    expect(() => b.consume(1)).toThrow(/key generation 3 has sealed 100 slots; 1 more would pass the limit of 100 random nonces per key: re-key first/);
    expect(b.used).toBe(100); // a refused consume changes nothing
    b.rekey();
    expect(b.state).toEqual({ generation: 4, used: 0 });
    expect([b.rekeyDue, b.remaining]).toEqual([false, 90]);
  });

  it('resumes from a recorded state and refuses impossible states', () => {
    expect(new NonceBudget({ generation: 1, used: 95 }, { limit: 100, margin: 10 }).rekeyDue).toBe(true);
    expect(() => new NonceBudget({ generation: 0, used: 101 }, { limit: 100, margin: 10 })).toThrow(/write count must be from 0 to 100, got 101/);
    expect(() => new NonceBudget({ generation: -1, used: 0 })).toThrow(/key generation must be an integer/);
    expect(() => new NonceBudget({ generation: 0, used: 0 }, { limit: 10, margin: 10 })).toThrow(/margin 10 must be from 0 to below the limit 10/);
    expect(() => new NonceBudget({ generation: 0, used: 0 }).consume(-1)).toThrow(/non-negative integer/);
    const last = new NonceBudget({ generation: 2 ** 32 - 1, used: 0 });
    expect(() => last.rekey()).toThrow(/no key generation left/);
  });

  it('a SlotSealer counts every seal and refuses once the budget has moved to another generation', () => {
    const budget = new NonceBudget({ generation: 0, used: 0 }, { limit: 3, margin: 1 });
    const sealer = new SlotSealer(key0, budget);
    const plain = randomBytes(512);
    const slot = Buffer.alloc(slotSize(512));
    for (let i = 0; i < 3; i++) sealer.seal({ chunk: i, epoch: 1 }, plain, slot);
    expect(budget.used).toBe(3);
    expect(() => sealer.seal({ chunk: 3, epoch: 1 }, plain, slot)).toThrow(/would pass the limit of 3/);
    budget.rekey();
    expect(() => sealer.seal({ chunk: 3, epoch: 1 }, plain, slot)).toThrow(/slot key is of generation 0, the budget is at generation 1/);
    const next = new SlotSealer(keys.slotKey(1), budget);
    next.seal({ chunk: 3, epoch: 2 }, plain, slot);
    const out = Buffer.alloc(512);
    openChunk(keys.slotKey(1), { chunk: 3, epoch: 2 }, slot, out);
    expect(out.equals(plain)).toBe(true);
  });
});
