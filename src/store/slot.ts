// The sealed slot format (docs/FORMAT.md, "Slot"): one chunk of C bytes is stored as
//
//   nonce (12) ‖ tag (16) ‖ AES-256-GCM ciphertext (C)        → a slot of C + 28 bytes
//
// with a fresh random 96-bit nonce per write and authenticated data
//
//   volume UUID (16) ‖ logical chunk u64 ‖ write epoch u64 ‖ key generation u32   (36 bytes, BE)
//
// so a slot copied to another chunk, replayed from another epoch, moved from another volume or
// sealed under another key generation fails to open. A slot carries its own nonce and tag: it
// can be checked, copied and reported on without the position map, and the map stays small.
// The price is that slots are not a power of two in the files (C + 28); see FORMAT.md.

import { createCipheriv, createDecipheriv, randomFillSync } from 'node:crypto';
import { VbdError } from '../common/errors.js';
import type { SlotKey } from './keys.js';

export const NONCE_BYTES = 12;
export const TAG_BYTES = 16;
/** Bytes a slot adds to its chunk: the nonce and the tag. */
export const SLOT_OVERHEAD = NONCE_BYTES + TAG_BYTES;
export const SLOT_AD_BYTES = 16 + 8 + 8 + 4;

/** Bytes of the slot that holds a chunk of `chunkSize` bytes. */
export function slotSize(chunkSize: number): number {
  return chunkSize + SLOT_OVERHEAD;
}

/** Where a slot belongs: the logical chunk it holds and the epoch (flush) that wrote it. */
export interface SlotAddress {
  chunk: number;
  epoch: number;
}

function checkCounter(n: number, what: string): void {
  if (!Number.isSafeInteger(n) || n < 0) throw new VbdError(`slot ${what} must be a non-negative safe integer, got ${n}`);
}

/** The slot's authenticated data: uuid(16) ‖ chunk u64 ‖ epoch u64 ‖ generation u32, big-endian. */
export function slotAD(uuid: Buffer, chunk: number, epoch: number, generation: number, out: Buffer = Buffer.alloc(SLOT_AD_BYTES)): Buffer {
  if (uuid.length !== 16) throw new VbdError(`slot AD: the volume UUID must be 16 bytes, got ${uuid.length}`);
  checkCounter(chunk, 'chunk number');
  checkCounter(epoch, 'epoch');
  if (!Number.isSafeInteger(generation) || generation < 0 || generation > 0xffffffff) throw new VbdError(`slot key generation must be an integer from 0 to 2^32-1, got ${generation}`);
  uuid.copy(out, 0);
  out.writeBigUInt64BE(BigInt(chunk), 16);
  out.writeBigUInt64BE(BigInt(epoch), 24);
  out.writeUInt32BE(generation, 32);
  return out;
}

// Random nonces come from a pool refilled 4096 at a time: one randomFillSync call costs ~5 µs
// whatever its size, as much as sealing a 4 KiB chunk. Each pooled nonce is handed out once.
const POOL_NONCES = 4096;
const noncePool = Buffer.alloc(POOL_NONCES * NONCE_BYTES);
let poolNext = POOL_NONCES;

/** Writes a fresh random 96-bit nonce at out[at..at+12). */
function freshNonce(out: Buffer, at: number): void {
  if (poolNext === POOL_NONCES) {
    randomFillSync(noncePool);
    poolNext = 0;
  }
  const from = poolNext * NONCE_BYTES;
  noncePool.copy(out, at, from, from + NONCE_BYTES);
  noncePool.fill(0, from, from + NONCE_BYTES);
  poolNext += 1;
}

// The AD is built in one scratch buffer: sealing and opening are synchronous, so it is never shared.
const scratchAD = Buffer.alloc(SLOT_AD_BYTES);

/**
 * Seals `plaintext` (one chunk) for `at` into `out`, which must be exactly slotSize(plaintext.length)
 * bytes: the caller owns and reuses it. Draws a fresh random nonce; count every call against the
 * key generation's NonceBudget.
 */
export function sealChunk(key: SlotKey, at: SlotAddress, plaintext: Buffer, out: Buffer): void {
  if (plaintext.length === 0) throw new VbdError('cannot seal an empty chunk');
  if (out.length !== slotSize(plaintext.length)) throw new VbdError(`slot buffer is ${out.length} bytes, a chunk of ${plaintext.length} needs ${slotSize(plaintext.length)}`);
  const ad = slotAD(key.uuid, at.chunk, at.epoch, key.generation, scratchAD);
  freshNonce(out, 0);
  const cipher = createCipheriv('aes-256-gcm', key.secret, out.subarray(0, NONCE_BYTES), { authTagLength: TAG_BYTES });
  cipher.setAAD(ad);
  // Node's cipher API returns its output in a buffer of its own; one copy puts it in the slot.
  const ciphertext = cipher.update(plaintext);
  cipher.final();
  ciphertext.copy(out, SLOT_OVERHEAD);
  cipher.getAuthTag().copy(out, NONCE_BYTES);
}

/** Where a slot lies: the file (by name) and byte offset. */
export interface SlotWhere {
  file: string;
  offset: number;
}

/**
 * A slot that failed authentication: names the chunk, epoch and key generation it was opened
 * for and, once the chunk store knows it, the file and offset it was read from.
 */
export class SlotAuthError extends VbdError {
  constructor(
    readonly chunk: number,
    readonly epoch: number,
    readonly generation: number,
    readonly where?: SlotWhere,
  ) {
    const place = where === undefined ? '' : `${where.file} at offset ${where.offset}: `;
    super(`${place}chunk ${chunk}, epoch ${epoch} (key generation ${generation}): the slot fails authentication — corrupted, tampered with, or a slot of another chunk, epoch or volume`);
    this.name = 'SlotAuthError';
  }
}

/**
 * Opens `slot` as the chunk `at` into `out` (exactly slot.length − 28 bytes, the caller's buffer).
 * Throws SlotAuthError if the slot does not authenticate; `out` is then left untouched.
 */
export function openChunk(key: SlotKey, at: SlotAddress, slot: Buffer, out: Buffer): void {
  if (slot.length <= SLOT_OVERHEAD) throw new VbdError(`slot of ${slot.length} bytes is too short to hold a chunk`);
  if (out.length !== slot.length - SLOT_OVERHEAD) throw new VbdError(`chunk buffer is ${out.length} bytes, a slot of ${slot.length} holds ${slot.length - SLOT_OVERHEAD}`);
  const ad = slotAD(key.uuid, at.chunk, at.epoch, key.generation, scratchAD);
  const decipher = createDecipheriv('aes-256-gcm', key.secret, slot.subarray(0, NONCE_BYTES), { authTagLength: TAG_BYTES });
  decipher.setAAD(ad);
  decipher.setAuthTag(slot.subarray(NONCE_BYTES, SLOT_OVERHEAD));
  // The plaintext is unverified until final(): it reaches `out` only after, and is wiped either way.
  const plaintext = decipher.update(slot.subarray(SLOT_OVERHEAD));
  try {
    decipher.final();
  } catch {
    plaintext.fill(0);
    throw new SlotAuthError(at.chunk, at.epoch, key.generation);
  }
  plaintext.copy(out);
  plaintext.fill(0);
}

/** NIST SP 800-38D: at most 2^32 encryptions under one key with random 96-bit nonces. */
export const RANDOM_NONCE_LIMIT = 2 ** 32;
/**
 * Re-key this many encryptions before the limit. It must cover what may be sealed between the
 * re-key falling due and taking effect (one flush of at most 2^24 slots) and seals lost to a crash
 * before their count was committed: 2^28 is 16 whole flushes of the largest volume.
 */
export const NONCE_MARGIN = 2 ** 28;

/** The write count of one key generation, as the sealed map records it. */
export interface NonceBudgetState {
  generation: number;
  used: number;
}

/**
 * How many encryptions one slot key generation has left. `allows(n)` before sealing n slots:
 * false means re-key first (`rekey()`: generation + 1, count 0). `consume(n)` counts seals and
 * refuses outright past the hard limit, so no caller can go beyond it by forgetting to ask.
 * Pure logic: the caller persists `state` (sealed) with its commit.
 */
export class NonceBudget {
  #generation: number;
  #used: number;
  readonly limit: number;
  readonly margin: number;

  constructor(state: NonceBudgetState, limits: { limit: number; margin: number } = { limit: RANDOM_NONCE_LIMIT, margin: NONCE_MARGIN }) {
    if (!Number.isSafeInteger(limits.limit) || !Number.isSafeInteger(limits.margin) || limits.margin < 0 || limits.margin >= limits.limit) {
      throw new VbdError(`nonce budget: margin ${limits.margin} must be from 0 to below the limit ${limits.limit}`);
    }
    if (!Number.isSafeInteger(state.generation) || state.generation < 0 || state.generation > 0xffffffff) throw new VbdError(`nonce budget: key generation must be an integer from 0 to 2^32-1, got ${state.generation}`);
    if (!Number.isSafeInteger(state.used) || state.used < 0 || state.used > limits.limit) throw new VbdError(`nonce budget: write count must be from 0 to ${limits.limit}, got ${state.used}`);
    this.#generation = state.generation;
    this.#used = state.used;
    this.limit = limits.limit;
    this.margin = limits.margin;
  }

  get generation(): number {
    return this.#generation;
  }

  get used(): number {
    return this.#used;
  }

  /** The count at which a re-key falls due: limit − margin. */
  get threshold(): number {
    return this.limit - this.margin;
  }

  /** Encryptions left before the re-key falls due (0 once it has). */
  get remaining(): number {
    return Math.max(0, this.threshold - this.#used);
  }

  /** True once the count has reached the threshold: re-key before sealing more. */
  get rekeyDue(): boolean {
    return this.#used >= this.threshold;
  }

  /** Whether `count` more seals stay within the threshold (plan a flush with this first). */
  allows(count: number): boolean {
    return this.#used + count <= this.threshold;
  }

  /** Counts `count` seals. Refuses (changing nothing) if they would pass the hard limit. */
  consume(count: number): void {
    if (!Number.isSafeInteger(count) || count < 0) throw new VbdError(`nonce budget: a seal count must be a non-negative integer, got ${count}`);
    if (this.#used + count > this.limit) {
      throw new VbdError(`key generation ${this.#generation} has sealed ${this.#used} slots; ${count} more would pass the limit of ${this.limit} random nonces per key: re-key first`);
    }
    this.#used += count;
  }

  /** Moves to the next key generation with a fresh count. */
  rekey(): void {
    if (this.#generation >= 0xffffffff) throw new VbdError('nonce budget: no key generation left after 2^32-1');
    this.#generation += 1;
    this.#used = 0;
  }

  get state(): NonceBudgetState {
    return { generation: this.#generation, used: this.#used };
  }
}

/**
 * Seals slots under one key generation and counts every seal against its budget, so a caller
 * cannot seal uncounted nor under a key whose generation the budget has moved past.
 */
export class SlotSealer {
  constructor(
    readonly key: SlotKey,
    readonly budget: NonceBudget,
  ) {}

  seal(at: SlotAddress, plaintext: Buffer, out: Buffer): void {
    sealChunk(this.take(1), at, plaintext, out);
  }

  /** Counts `count` seals made elsewhere (the pool's threads) and gives the key to make them with. */
  take(count: number): SlotKey {
    if (this.budget.generation !== this.key.generation) {
      throw new VbdError(`slot key is of generation ${this.key.generation}, the budget is at generation ${this.budget.generation}: derive the new slot key`);
    }
    this.budget.consume(count);
    return this.key;
  }
}
