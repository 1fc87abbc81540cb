// Opening a range of slots into chunk buffers: the one piece of code that reads sealed chunks,
// run by the sealed store on the daemon's thread (read, export, recovery) and by the threads of
// the image pool (populate, src/flush/scan-pool.ts) alike; and its converse for a large flush,
// sealing chunks into their slots on the pool's threads (sealSlots). The store says where each chunk's
// slot lies and what it opens as (SlotSources); this reads runs of neighbouring slots in one
// call and opens each into its chunk.
//
// SlotSources is plain typed arrays and numbers, so it crosses to a pool thread as is (on
// SharedArrayBuffers); file descriptors are the process's, valid in every thread.

import { VbdError } from '../common/errors.js';
import { readExactly } from '../common/fd.js';
import type { SlotKey } from './keys.js';
import { writeAt } from './map.js';
import { SlotAuthError, openChunk, sealChunk } from './slot.js';

/** Where the slots of chunks first … first + count − 1 lie, one entry per chunk. */
export interface SlotSources {
  /** The device chunk of entry 0. */
  first: number;
  count: number;
  slotBytes: number;
  /** The files read from (a backing file, or the overflow journal), by index: fd and name for errors. */
  files: { fd: number; name: string }[];
  /** Per entry: index into `files`. */
  file: Int32Array;
  /** Per entry: the slot's byte offset in its file. */
  offset: Float64Array;
  /** Per entry: the epoch and key generation the slot was sealed in (the map's). */
  epoch: Float64Array;
  generation: Uint32Array;
}

/** Entries for `count` chunks from `first`, on shared memory if a pool thread is to read them. */
export function newSlotSources(first: number, count: number, slotBytes: number, files: SlotSources['files'], shared: boolean): SlotSources {
  const bytes = (n: number): ArrayBuffer | SharedArrayBuffer => (shared ? new SharedArrayBuffer(n) : new ArrayBuffer(n));
  return {
    first, count, slotBytes, files,
    file: new Int32Array(bytes(4 * count)),
    offset: new Float64Array(bytes(8 * count)),
    epoch: new Float64Array(bytes(8 * count)),
    generation: new Uint32Array(bytes(4 * count)),
  };
}

/** The run of neighbouring slots of one file from entry i (before `end`, at most `bytes` of them). */
function runAt(e: Pick<SlotSources, 'files' | 'file' | 'offset'>, i: number, end: number, slotBytes: number, bytes: number): { where: { fd: number; name: string }; offset: number; n: number } {
  const file = e.file[i] as number;
  const offset = e.offset[i] as number;
  let n = 1;
  while (i + n < end && (n + 1) * slotBytes <= bytes && e.file[i + n] === file && e.offset[i + n] === offset + n * slotBytes) n++;
  const where = e.files[file];
  if (where === undefined) throw new VbdError(`internal: slot file ${file} of entry ${i} is not among the ${e.files.length} files`);
  return { where, offset, n };
}

/** A slot that failed authentication: marked in `damaged` (entry index), its chunk left as `zero` says. */
export interface OpenTarget {
  /** Chunk buffer of entry i (C bytes). */
  chunk(i: number): Buffer;
  /** 1 where entry i's slot failed authentication. */
  damaged: Uint8Array;
  /** Fill a failed chunk with zeros (else it is left as it was: the caller refuses the whole read). */
  zero: boolean;
}

/**
 * Opens entries [from, end) of `src`: reads each run of neighbouring slots of one file into `buf`
 * (whole slots; at least one fits) and opens every slot into its chunk. Read errors throw, naming
 * the file; authentication failures are marked, not thrown. `buf` is wiped after each run.
 */
export function openSlots(src: SlotSources, from: number, end: number, keyOf: (generation: number) => SlotKey, to: OpenTarget, buf: Buffer): void {
  const S = src.slotBytes;
  let i = from;
  while (i < end) {
    const { where, offset, n } = runAt(src, i, end, S, buf.length);
    readExactly(where.fd, buf, n * S, offset, `'${where.name}'`);
    for (let k = 0; k < n; k++) {
      const e = i + k;
      const out = to.chunk(e);
      try {
        openChunk(keyOf(src.generation[e] as number), { chunk: src.first + e, epoch: src.epoch[e] as number }, buf.subarray(k * S, (k + 1) * S), out);
      } catch (err) {
        if (!(err instanceof SlotAuthError)) throw err;
        to.damaged[e] = 1;
        if (to.zero) out.fill(0);
      }
    }
    buf.fill(0, 0, n * S);
    i += n;
  }
}

/**
 * A write's chunks as the slots they are sealed into, one entry per chunk, in the order of their
 * places in the files (so neighbouring slots go out in one write call). Each chunk is read from
 * a buffer on shared memory (the flush's staging), named by index into `buffers` and byte offset.
 */
export interface SealTargets {
  slotBytes: number;
  chunkSize: number;
  /** The epoch and key generation every slot of this write is sealed in. */
  epoch: number;
  generation: number;
  files: { fd: number; name: string }[];
  chunk: Uint32Array;
  file: Int32Array;
  offset: Float64Array;
  buffers: SharedArrayBuffer[];
  buffer: Int32Array;
  at: Float64Array;
}

/** Seals entries [from, end) of `t` under `key` (a fresh random nonce each) and writes their slots. */
export function sealSlots(t: SealTargets, from: number, end: number, key: SlotKey, buf: Buffer): void {
  const S = t.slotBytes;
  const C = t.chunkSize;
  const sources = t.buffers.map((b) => Buffer.from(b));
  let i = from;
  while (i < end) {
    const { where, offset, n } = runAt(t, i, end, S, buf.length);
    for (let k = 0; k < n; k++) {
      const e = i + k;
      const source = sources[t.buffer[e] as number];
      if (source === undefined) throw new VbdError(`internal: chunk ${t.chunk[e]} names staging buffer ${t.buffer[e]} of ${sources.length}`);
      const at = t.at[e] as number;
      sealChunk(key, { chunk: t.chunk[e] as number, epoch: t.epoch }, source.subarray(at, at + C), buf.subarray(k * S, (k + 1) * S));
    }
    writeAt(where.fd, buf.subarray(0, n * S), offset, where.name);
    i += n;
  }
}
