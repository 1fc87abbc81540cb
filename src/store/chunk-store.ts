// The chunk store: the one module that knows where chunk c of a volume lives and how it moves
// between a buffer (a window of the device image: RAM image, export, import) and the files.
//
//   plain  — the layout's placement table; runs of neighbouring chunks move as one read or
//            write (src/image/transfer.ts); a write is durable at commit (src/store/sync-files.ts).
//   sealed — the position map (src/store/map.ts): every chunk is an authenticated AES-256-GCM
//            slot; reads open and verify, writes seal into free slots and commit the map
//            copy-on-write (src/store/sealed-store.ts).
//
// Populate, flush, recovery, export and import all go through `openChunkStore`.

import { VbdError, failure } from '../common/errors.js';
import { resolvePlacement } from '../layouts/index.js';
import type { PlacementTable } from '../layouts/layout.js';
import { readRuns, runsFor, writeRuns } from '../image/transfer.js';
import type { ImageWindow, ShadowImage } from '../shadow/image.js';
import { fileOrder, transferImage } from '../shadow/populate.js';
import { fileName, isPlainVolume, isSealedVolume, type AnyVolume, type Volume } from '../volume/volume.js';
import type { Reservation } from './map.js';
import { openSealedStore } from './sealed-store.js';
import { syncBackingFiles } from './sync-files.js';
export { describeResumed, type BudgetResumed } from './budget-resumed.js';
import type { SlotKey } from './keys.js';
import type { SealTargets, SlotSources } from './slot-runs.js';
import type { BudgetResumed } from './budget-resumed.js';

/** Where a chunk's bytes are now. */
export interface ChunkPlace {
  /** Backing file index, or -1 for the sealed overflow journal. */
  file: number;
  /** The file's name, for messages. */
  name: string;
  offset: number;
  /** Bytes it takes there: the chunk size (plain) or the slot size, C + 28 (sealed). */
  bytes: number;
}

/** A chunk whose slot failed authentication: where, and which logical chunk. */
export interface DamagedChunk {
  chunk: number;
  name: string;
  offset: number;
  epoch: number;
}

/** One damaged chunk, for messages: `chunk 77 (file003 at offset 123456, epoch 3)`. */
export function describeDamaged(d: DamagedChunk): string {
  return `chunk ${d.chunk} (${d.name} at offset ${d.offset}, epoch ${d.epoch})`;
}

/** The first few damaged chunks named, the rest counted. */
export function listDamaged(damaged: readonly DamagedChunk[], named = 5): string {
  const more = damaged.length > named ? ` and ${damaged.length - named} more` : '';
  return `${damaged.slice(0, named).map(describeDamaged).join(', ')}${more}`;
}

export interface ReadOptions {
  /**
   * What a slot that fails authentication does: `throw` (default) a SlotAuthError naming file,
   * offset and chunk; `zero` fills the chunk with zeros in the buffer and lists it.
   */
  damaged?: 'throw' | 'zero';
}

/**
 * Threads that open slots straight into the RAM image (the daemon's image pool,
 * src/flush/scan-pool.ts): `damaged[i]` is set to 1 where entry i failed, zeroed if `zero`.
 */
export interface SlotOpenPool {
  readonly usable: boolean;
  readonly threads: number;
  open(windows: readonly ImageWindow[], chunkSize: number, src: SlotSources, keyOf: (generation: number) => SlotKey, damaged: Uint8Array, zero: boolean): Promise<void>;
}

/** Threads that seal chunks into their slots and write them (the daemon's image pool). */
export interface SlotSealPool {
  readonly usable: boolean;
  seal(targets: SealTargets, key: SlotKey): Promise<void>;
}

export interface FillResult {
  damaged: DamagedChunk[];
  /** Pool threads that opened the slots; 0: the daemon's own thread did (and a plain volume's reads). */
  threads: number;
}

export interface FillOptions extends ReadOptions {
  /** Open slots on these threads (sealed volumes; a plain populate is a copy, done by the kernel). */
  pool?: SlotOpenPool;
}

export type CommitReport =
  | { kind: 'plain'; chunks: number; files: number }
  | {
      kind: 'sealed';
      /** The epoch committed (0 when nothing was written). */
      epoch: number;
      chunks: number;
      /** Chunks sealed straight into free slots (copy-on-write). */
      inFreeSlots: number;
      /** Chunks that did not fit into free slots: sealed into the overflow journal, then put in place. */
      throughJournal: number;
      /**
       * Bytes this commit wrote to the map file: its epoch reservation and the map log record of
       * what changed (O(chunks)) or, when the log is full, a whole checkpoint copy (O(volume)).
       */
      mapBytes: number;
      /** The key generation the slots of this commit were sealed under. */
      keyGeneration: number;
      /** Set when this commit re-keyed: the generation it moved on from (its nonce budget was spent). */
      rekeyedFrom?: number;
    };

/** One write: stage chunks with `write`, then `commit` (or `abort`). */
export interface StoreWrite {
  /** Sealed: the epoch this write seals its slots in (reserved: never used again, committed or not). Plain: undefined. */
  readonly epoch: number | undefined;
  /** Chunks [first, end) from `from` (from[0] = first byte of chunk `first`). */
  write(first: number, end: number, from: Buffer): void;
  /**
   * Sealed, with a pool: writes these chunks (each once, any order), each from its buffer, which
   * must lie on a SharedArrayBuffer; the pool's threads seal and write the slots. Undefined for a
   * plain volume (its flush writes through the journal, src/flush/apply.ts).
   */
  readonly writeOnPool?: (chunks: Uint32Array, from: (chunk: number) => Buffer, pool: SlotSealPool) => Promise<void>;
  /** Makes the written chunks durable and, for a sealed volume, the new epoch the volume's state. */
  commit(): CommitReport;
  /** Gives up: a sealed volume keeps its committed epoch; what was written is never referenced. */
  abort(): void;
}

/** What status and inspect show of a sealed store. */
export interface SealedState {
  /** The epoch the files decode to, and the highest epoch reserved so far. */
  epoch: number;
  reservedEpoch: number;
  keyGeneration: number;
  /** Slots sealed under the current key generation (random nonces: 2^32 at most per key). */
  seals: number;
  /** The count at which a re-key falls due. */
  rekeyAt: number;
  /** Slots no chunk uses: a flush of more changed chunks than this goes through the overflow journal. */
  freeSlots: number;
  /** The copy of the position map (A or B) the files decode from, and the bytes of map log appended to it since. */
  mapCopy: 'A' | 'B';
  mapLogBytes: number;
  /** Set when root's record was ahead of the files' nonce budget at open: where seals continue instead (SealFloor). */
  resumed?: BudgetResumed;
}

/**
 * Root's record of how far a sealed volume's nonce budget may have been spent on this machine
 * (src/daemon/epoch-record.ts): no slot key generation above `generation` has sealed anything,
 * and under `generation` at most `seals` slots were sealed. 'unknown': a record written before it
 * kept this (only its epochs are known).
 */
export type SealFloor = { generation: number; seals: number } | 'unknown';

export interface ChunkStore {
  readonly kind: 'plain' | 'sealed';
  readonly chunkSize: number;
  readonly chunkCount: number;
  /** What opening found that the user must hear (an older map copy used, a commit completed …). */
  readonly notices: readonly string[];
  /** The epoch the files decode to (sealed), undefined for a plain volume. */
  readonly epoch: number | undefined;
  /** Sealed: the highest epoch reserved so far (root's record keeps ahead of it); undefined for a plain volume. */
  readonly reservedEpoch: number | undefined;
  /** Sealed: epochs, nonce budget and free slots; undefined for a plain volume. */
  sealedState(): SealedState | undefined;
  locate(chunk: number): ChunkPlace;
  /** Every chunk, in the order writes go fastest: plain — file order (runs stream); sealed — ascending (what `begin` takes). */
  writeOrder(): Uint32Array;
  /** Fills the RAM image with every chunk (populate); resolves with the damaged ones (with `damaged: 'zero'`). */
  fill(image: ShadowImage, options?: FillOptions, progress?: (bytes: number) => void): Promise<FillResult>;
  /** Reads chunks [first, end) into `into` (into[0] = first byte of chunk `first`); returns the damaged ones (with `damaged: 'zero'`). */
  read(first: number, end: number, into: Buffer, options?: ReadOptions): DamagedChunk[];
  /**
   * Starts a write of exactly these chunks (ascending), or of all. A sealed volume plans their
   * slots up front (free slots first, then the overflow journal) and reserves the epoch.
   */
  begin(chunks: 'all' | Uint32Array): StoreWrite;
  /** Closes what the store opened and wipes its keys. The volume stays open (the caller's). */
  close(): void;
}

/** A sealed volume's store: its epochs and state are always there. */
export type SealedChunkStore = ChunkStore & {
  readonly kind: 'sealed';
  readonly epoch: number;
  readonly reservedEpoch: number;
  sealedState(): SealedState;
};

export function isSealedStore(store: ChunkStore): store is SealedChunkStore {
  return store.kind === 'sealed';
}

export interface OpenStoreOptions {
  /** Opens for writing: the volume must have been opened writable. */
  writable: boolean;
  /** A keyed plain volume's secret, or a sealed volume's passphrase. The caller owns and wipes it. */
  secret?: Buffer | undefined;
  /**
   * Sealed: an epoch known to have been used already (root's record of the highest epoch a
   * commit of this volume reserved): the next commit takes a later one even if the files'
   * reservation records were rolled back.
   */
  epochFloor?: number | undefined;
  /**
   * Sealed: called with the epoch the files decode to, before anything is written (an
   * interrupted commit is completed only after it returns); throw to refuse the files.
   */
  acceptEpoch?: ((epoch: number) => void) | undefined;
  /** Sealed: re-key after this many seals under one key (default and maximum 2^32 − 2^28); lower only to test the re-key. */
  rekeyAt?: number | undefined;
  /**
   * Sealed: root's record of the nonce budget (SealFloor). Where it is ahead of the files (put back
   * from an older copy), a writable store continues past it before anything is sealed.
   */
  sealFloor?: SealFloor | undefined;
  /** Sealed: called with each reservation of epochs and seals before it is written: root's record must cover it first. */
  beforeReserve?: ((reservation: Reservation) => void) | undefined;
}

class PlainStore implements ChunkStore {
  readonly kind = 'plain';
  readonly chunkSize: number;
  readonly chunkCount: number;
  readonly notices: readonly string[] = [];
  readonly epoch = undefined;
  readonly reservedEpoch = undefined;
  sealedState(): undefined {
    return undefined;
  }
  readonly #name: (file: number) => string;

  constructor(
    private readonly volume: Volume,
    private readonly table: PlacementTable,
    private readonly writable: boolean,
  ) {
    this.chunkSize = volume.manifest.chunkSize;
    this.chunkCount = volume.manifest.deviceSize / volume.manifest.chunkSize;
    this.#name = (file) => fileName(volume, file);
  }

  locate(chunk: number): ChunkPlace {
    checkRange(chunk, chunk + 1, this.chunkCount);
    const file = this.table.file[chunk] ?? 0;
    return { file, name: this.#name(file), offset: this.table.offset[chunk] ?? 0, bytes: this.chunkSize };
  }

  writeOrder(): Uint32Array {
    return fileOrder(this.table, this.chunkSize, this.volume.manifest.files.map((f) => f.size));
  }

  fill(image: ShadowImage, _options?: FillOptions, progress?: (bytes: number) => void): Promise<FillResult> {
    // One preadv per run of consecutive file bytes, straight into the mapping, in file order.
    const io = { image, table: this.table, chunkSize: this.chunkSize, fds: this.volume.fds, name: this.#name };
    transferImage('read', io, this.volume.manifest.files.map((f) => f.size), progress);
    return Promise.resolve({ damaged: [], threads: 0 });
  }

  read(first: number, end: number, into: Buffer): DamagedChunk[] {
    checkRange(first, end, this.chunkCount);
    checkBuffer(into, (end - first) * this.chunkSize);
    readRuns(this.volume.fds, runsFor(this.table, this.chunkSize, first, end), into, first * this.chunkSize, this.#name);
    return [];
  }

  begin(): StoreWrite {
    if (!this.writable) throw new VbdError('internal: a write through a store opened read-only');
    const touched = new Set<number>();
    let chunks = 0;
    return {
      epoch: undefined,
      write: (first, end, from) => {
        checkRange(first, end, this.chunkCount);
        checkBuffer(from, (end - first) * this.chunkSize);
        const runs = runsFor(this.table, this.chunkSize, first, end);
        writeRuns(this.volume.fds, runs, from, first * this.chunkSize, this.#name);
        for (const run of runs) touched.add(run.file);
        chunks += end - first;
      },
      commit: () => {
        syncBackingFiles(this.volume, touched);
        return { kind: 'plain', chunks, files: touched.size };
      },
      abort: () => undefined,
    };
  }

  close(): void {
    /* the volume's fds are the caller's */
  }
}

export function checkRange(first: number, end: number, chunkCount: number): void {
  if (!Number.isSafeInteger(first) || !Number.isSafeInteger(end) || first < 0 || end > chunkCount || first > end) {
    throw new VbdError(`internal: chunks [${first}, ${end}) outside the volume's ${chunkCount}`);
  }
}

export function checkBuffer(buf: Buffer, bytes: number): void {
  if (buf.length < bytes) throw new VbdError(`internal: a buffer of ${buf.length} bytes for ${bytes} bytes of chunks`);
}

/**
 * Opens the chunk store of an opened volume: plain (its layout's placement, resolved and
 * validated; a module layout runs confined) or sealed (unlocked with the passphrase; map read,
 * an interrupted commit completed when writable). Refuses with one line what cannot be used.
 */
export async function openChunkStore(volume: AnyVolume, options: OpenStoreOptions): Promise<ChunkStore> {
  if (options.writable && !volume.writable) throw new VbdError('internal: a writable store over a volume opened read-only');
  if (isSealedVolume(volume)) {
    if (options.secret === undefined) throw new VbdError(`volume '${volume.manifest.name}' is sealed: its passphrase is needed (--key-file FILE or a terminal prompt)`);
    return openSealedStore(volume, options.secret, options.writable, options);
  }
  if (!isPlainVolume(volume)) throw new VbdError(`internal: volume '${volume.manifest.name}' is neither plain nor sealed`);
  const plain = volume;
  try {
    const table = await resolvePlacement(plain.manifest, { owner: plain.owner, secret: options.secret });
    return new PlainStore(plain, table, options.writable);
  } catch (err) {
    if (err instanceof VbdError) throw err;
    throw failure(`volume '${plain.manifest.name}'`, err);
  }
}
