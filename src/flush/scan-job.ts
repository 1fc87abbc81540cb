// The full scan's unit of work, shared by the daemon's thread and the scan pool's threads
// (src/flush/scan-pool.ts): xxh64 of chunks of the RAM image, read through views of its
// windows, written into an array indexed by chunk. Both paths run this same code, so a chunk
// hashes the same whichever thread hashed it.

import { xxh64 } from '@node-rs/xxhash';
import { VbdError } from '../common/errors.js';
import type { SealTargets, SlotSources } from '../store/slot-runs.js';

/** A window of the image as a view: the daemon's thread has them, a worker makes them from the address. */
export interface WindowView {
  /** Device offset of the window's first byte. */
  offset: number;
  length: number;
  view: Buffer;
}

/** Which chunks a scan hashes: a run of chunk numbers [from, to), or a list (any order). */
export type ScanItems = { from: number; to: number } | Uint32Array;

export function itemCount(items: ScanItems): number {
  return items instanceof Uint32Array ? items.length : items.to - items.from;
}

/** Chunk `c`'s bytes. The windows are in device order and all of one length but the last. */
export class ChunkViews {
  private readonly stride: number;
  /** The image's size in bytes. */
  readonly size: number;

  constructor(private readonly windows: readonly WindowView[], private readonly chunkSize: number) {
    this.stride = windows[0]?.length ?? 0;
    windows.forEach((w, i) => {
      const last = i === windows.length - 1;
      if (w.offset !== i * this.stride || (!last && w.length !== this.stride) || w.length > this.stride || w.length % chunkSize !== 0) {
        throw new VbdError(`internal: image window ${i} (${w.length} bytes at ${w.offset}) does not tile the image in ${chunkSize}-byte chunks`);
      }
    });
    const tail = windows[windows.length - 1];
    this.size = tail === undefined ? 0 : tail.offset + tail.length;
  }

  view(chunk: number): Buffer {
    const at = chunk * this.chunkSize;
    const w = this.stride === 0 ? undefined : this.windows[Math.floor(at / this.stride)];
    if (w === undefined || !(chunk >= 0) || at + this.chunkSize > w.offset + w.length) {
      throw new VbdError(`internal: chunk ${chunk} is outside the ${this.size}-byte image`);
    }
    return w.view.subarray(at - w.offset, at - w.offset + this.chunkSize);
  }
}

/** Hashes the items [first, end) of `items` into out[chunk]. */
export function hashItems(views: ChunkViews, items: ScanItems, first: number, end: number, out: BigUint64Array): void {
  if (items instanceof Uint32Array) {
    for (let i = first; i < end; i++) {
      const chunk = items[i] as number;
      out[chunk] = xxh64(views.view(chunk));
    }
    return;
  }
  for (let chunk = items.from + first; chunk < items.from + end; chunk++) out[chunk] = xxh64(views.view(chunk));
}

/**
 * A job is cut into pieces that the threads claim one at a time (an atomic counter), so a
 * thread the machine slows down takes fewer of them: at most PIECE_BYTES, at least
 * MIN_PIECE_BYTES, and else small enough that each thread can take about four.
 */
export const PIECE_BYTES = 16 * 2 ** 20;
const MIN_PIECE_BYTES = 2 ** 20;

/** Items per piece for a job of `count` chunks on `threads` threads. */
export function pieceItems(chunkSize: number, count: number, threads: number): number {
  const most = Math.max(1, Math.floor(PIECE_BYTES / chunkSize));
  const least = Math.max(1, Math.floor(MIN_PIECE_BYTES / chunkSize));
  return Math.max(least, Math.min(most, Math.ceil(count / (threads * 4))));
}

/** A claim counter set to this stops every thread at its next claim (one of them failed). */
export const STOP_CLAIMS = 2 ** 30;

/** What every pool job carries: the windows by address (threads share the address space) and the claims. */
interface JobCommon {
  windows: { offset: number; length: number; address: bigint }[];
  chunkSize: number;
  /** Items per piece. */
  pieceItems: number;
  /** [0]: the next piece to claim (shared). */
  next: Int32Array;
  /** Per thread: the piece it is on, or -1 (shared: what a thread that died was on). */
  busy: Int32Array;
  /** This thread's index into `busy`. */
  slot: number;
}

/** Hash `items` into out[chunk] (shared). */
export interface ScanJob extends JobCommon {
  kind: 'scan';
  items: ScanItems;
  /** Hashes by chunk number (shared). */
  out: BigUint64Array;
}

/** Open the slots `src` names into the image (src/store/slot-runs.ts); damaged[i] = 1 where entry i fails. */
export interface OpenJob extends JobCommon {
  kind: 'open';
  src: SlotSources;
  keys: PoolKey[];
  damaged: Uint8Array;
  zero: boolean;
}

/** A slot key's bytes as a job carries them (the thread wipes its copy after the job). */
export interface PoolKey {
  generation: number;
  key: Buffer;
  uuid: Buffer;
}

/** Seal the chunks `targets` names from their staging buffers into their slots, and write them. */
export interface SealJob extends JobCommon {
  kind: 'seal';
  targets: SealTargets;
  key: PoolKey;
}

export type PoolJob = ScanJob | OpenJob | SealJob;
/** A job as the pool builds it, before each thread's claim counters and slot are added. */
type PerThread = keyof Omit<JobCommon, 'windows' | 'chunkSize' | 'pieceItems'>;
export type PoolJobBody = Omit<ScanJob, PerThread> | Omit<OpenJob, PerThread> | Omit<SealJob, PerThread>;

/** What a pool thread answers: once when it has started, then once per job. */
export type ScanReply = { kind: 'ready' } | { kind: 'done' } | { kind: 'failed'; piece: number; message: string };

/** The chunks of one piece, for an error message (undefined: no piece, -1 or past the end). */
export function describePiece(items: ScanItems, pieceItems: number, piece: number, chunkSize: number): string | undefined {
  const first = piece * pieceItems;
  const end = Math.min(itemCount(items), first + pieceItems);
  if (piece < 0 || first >= end) return undefined;
  if (items instanceof Uint32Array) {
    return `chunks ${items[first]} … ${items[end - 1]} (${end - first} chunks of a list, items ${first}–${end - 1})`;
  }
  const from = items.from + first;
  const to = items.from + end - 1;
  return `chunks ${from}–${to} (image bytes ${from * chunkSize}–${(to + 1) * chunkSize - 1})`;
}
