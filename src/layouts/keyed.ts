// `keyed`: a secret permutation of all chunk slots. Fisher–Yates driven by an AES-256-CTR
// keystream under a key derived from the user's secret (see secret.ts), with rejection
// sampling so every permutation is equally likely. Without the secret the placement is unknown.

import { createCipheriv } from 'node:crypto';
import { chunkSlots, placeSlot, type Geometry, type Layout } from './layout.js';

/** Uniform 32-bit random numbers from AES-256-CTR over zeros. */
function keystream(key: Buffer): () => number {
  const cipher = createCipheriv('aes-256-ctr', key, Buffer.alloc(16));
  const zeros = Buffer.alloc(64 * 1024);
  let block = Buffer.alloc(0);
  let pos = 0;
  return () => {
    if (pos + 4 > block.length) {
      block = cipher.update(zeros);
      pos = 0;
    }
    const value = block.readUInt32LE(pos);
    pos += 4;
    return value;
  };
}

/** slotOfChunk[c] for a volume of `slotCount` slots, the first `chunkCount` of a permutation. */
export function keyedPermutation(key: Buffer, slotCount: number, chunkCount: number): Float64Array {
  const next = keystream(key);
  const perm = new Float64Array(slotCount);
  for (let i = 0; i < slotCount; i++) perm[i] = i;
  for (let i = slotCount - 1; i > 0; i--) {
    const range = i + 1;
    const limit = Math.floor(2 ** 32 / range) * range;
    let r = next();
    while (r >= limit) r = next();
    const j = r % range;
    const tmp = perm[i] ?? 0;
    perm[i] = perm[j] ?? 0;
    perm[j] = tmp;
  }
  return perm.subarray(0, chunkCount);
}

export function createKeyedLayout(geometry: Geometry, layoutKey: Buffer): Layout {
  const slots = chunkSlots(geometry);
  const slotOfChunk = keyedPermutation(layoutKey, slots.total, Math.min(slots.total, geometry.chunkCount));
  return { place: (chunk) => placeSlot(slots, geometry.chunkSize, slotOfChunk[chunk] ?? Number.NaN) };
}
