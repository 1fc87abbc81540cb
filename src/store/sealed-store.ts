// The sealed side of the chunk store (docs/FORMAT.md, "Position map" and "Commit"). Every chunk
// is a slot of C + 28 bytes (src/store/slot.ts) somewhere in the backing files; the position map
// (src/store/map.ts) says which slot, sealed in which epoch under which key generation.
//
// A read opens each slot with (chunk, epoch, generation) from the map: nothing unverified reaches
// the buffer. A write is copy-on-write:
//
//   reserve (epoch, seal count; fdatasync)  →  seal the chunks into free slots (syncfs, sync-files.ts)
//   →  a map log record of what changed, or a whole checkpoint copy (src/store/map-log.ts;
//      fdatasync): committed.
//
// A write of more chunks than there are free slots seals the chunks that do not fit into the
// overflow journal; the map that commits them marks them pending (their final slot is their own
// old slot, free once the map commits); then the journal is copied into place, a map without
// pending chunks is committed, and the journal removed. A crash leaves the files decoding to the
// previous epoch (map not yet written) or the new one (pending chunks read from the journal until
// the next writable open completes it), never a mix.

import { readExactly } from '../common/fd.js';
import { randomBytes, randomFillSync } from 'node:crypto';
import { closeSync, fchownSync, fstatSync, fsyncSync, ftruncateSync, openSync, unlinkSync, constants as fsc } from 'node:fs';
import { VbdError, errnoCode, failure } from '../common/errors.js';
import { formatSize } from '../common/size.js';
import { keyedPermutation } from '../layouts/keyed.js';
import { chunkSlots, placeSlot, type Slots } from '../layouts/layout.js';
import { windows } from '../image/transfer.js';
import type { ShadowImage } from '../shadow/image.js';
import { availableMemory } from '../sys/memory.js';
import { serializeManifest, type SealedManifest } from '../volume/manifest.js';
import { MAP_NAME, SEALED_JOURNAL_NAME, entryPath, fileName, openVolumeEntry, rereadManifest, writeManifest, type SealedVolume } from '../volume/volume.js';
import type { BudgetResumed, ChunkPlace, ChunkStore, CommitReport, DamagedChunk, FillOptions, FillResult, OpenStoreOptions, ReadOptions, SealFloor, SealedState, SlotSealPool, StoreWrite } from './chunk-store.js';
import type { VolumeKeys } from './keys.js';
import {
  RESERVE_RECORD_BYTES, checkMapFormat, clearPending, clonePositionMap, datasync, loadReservation, mapFileBytes, newPositionMap,
  pendingChunks, setPending, writeAt, writePositionMap, writeReservation, type MapKey, type PositionMap, type Region, type Reservation,
} from './map.js';
import { MapCommitter, loadMapState } from './map-log.js';
import { atKeyGeneration, unlockSealedManifest } from './sealed-manifest.js';
import { NONCE_MARGIN, NonceBudget, RANDOM_NONCE_LIMIT, SlotAuthError, SlotSealer, slotSize, type NonceBudgetState } from './slot.js';
import { newSlotSources, openSlots, type SealTargets, type SlotSources } from './slot-runs.js';
import { syncBackingFiles } from './sync-files.js';

/** Bytes moved per read or write call: runs of neighbouring slots up to this size. */
const RUN_BYTES = 8 * 2 ** 20;
/** Populate opens this much of the image between two turns of the event loop. */
const FILL_BYTES = 64 * 2 ** 20;
const NONE = 0xffffffff;
/** A chunk planned through the journal, before its rank is known. */
const OVERFLOW = -2;
/** The epoch of the slots and map written by init. */
export const INIT_EPOCH = 1;

export const JOURNAL_MAGIC = Buffer.from('VBDSJRN\0', 'ascii');
export const JOURNAL_HEADER_BYTES = 64;
const JOURNAL_VERSION = 1;

/** The slots of a sealed volume's files: numbered file by file, slotSize(C) bytes each. */
export function slotsOf(manifest: Pick<SealedManifest, 'chunkSize' | 'files'>): Slots {
  const size = slotSize(manifest.chunkSize);
  return chunkSlots({ chunkSize: size, fileSizes: manifest.files.map((f) => f.size), deviceSize: 0, chunkCount: 0 });
}

/** Bytes a sealed volume of this shape needs in memory to be opened and written (maps, map log, plans, buffers). */
export function sealedStoreBytes(chunks: number, slots: number): number {
  return chunks * (2 * 16 + 2 * 17 + 9 + 8 + 16) + 5 * slots + 4 * RUN_BYTES;
}

function checkMemory(name: string, chunks: number, slots: number): void {
  const need = sealedStoreBytes(chunks, slots);
  const { bytes, source } = availableMemory();
  if (need + 64 * 2 ** 20 > bytes) {
    throw new VbdError(`volume '${name}': its position map of ${chunks} chunks needs ${formatSize(need)} of memory, only ${formatSize(bytes)} is available (${source})`);
  }
}

function mapKeyOf(keys: VolumeKeys): MapKey {
  return { key: keys.mapKey, uuid: keys.uuid };
}

function readInto(fd: number, buf: Buffer, length: number, position: number, name: string): void {
  readExactly(fd, buf, length, position, `'${name}'`);
}

/** The journal's header: magic ‖ version u32 ‖ epoch u64 ‖ count u32 ‖ slot size u32 ‖ UUID, zero-padded to 64. */
export function journalHeader(uuid: Buffer, epoch: number, count: number, slotBytes: number): Buffer {
  const h = Buffer.alloc(JOURNAL_HEADER_BYTES);
  JOURNAL_MAGIC.copy(h, 0);
  h.writeUInt32BE(JOURNAL_VERSION, 8);
  h.writeBigUInt64BE(BigInt(epoch), 12);
  h.writeUInt32BE(count, 20);
  h.writeUInt32BE(slotBytes, 24);
  uuid.copy(h, 28);
  return h;
}

interface Place {
  fd: number;
  file: number;
  name: string;
  offset: number;
}

/** The overflow journal of a pending commit, as reads see it. */
interface JournalOverlay {
  fd: number;
  /** Chunk → its slot's index in the journal, -1 if not pending. */
  index: Int32Array;
}

class SealedStore implements ChunkStore {
  readonly kind = 'sealed';
  readonly chunkSize: number;
  readonly chunkCount: number;
  readonly notices: string[] = [];
  readonly #volume: SealedVolume;
  readonly #keys: VolumeKeys;
  readonly #mapKey: MapKey;
  readonly #mapFd: number;
  readonly #writable: boolean;
  readonly #slotBytes: number;
  readonly #slots: Slots;
  /** The manifest as the files now hold it (a re-key replaces it: next key generation, re-wrapped). */
  #manifest: SealedManifest;
  #committed: PositionMap;
  readonly #mapCommitter: MapCommitter;
  #reservation: { reservation: Reservation; index: Region } | undefined;
  #writeBlocked: string | undefined;
  #nextEpoch: number;
  #budget: NonceBudget;
  #journal: JournalOverlay | undefined;
  #active = false;
  #scratch: Buffer | undefined;
  readonly #beforeReserve: ((reservation: Reservation) => void) | undefined;
  #resumed: BudgetResumed | undefined;

  constructor(volume: SealedVolume, keys: VolumeKeys, mapFd: number, writable: boolean, options: SealedStoreOptions = {}) {
    const { epochFloor = 0, rekeyAt = RANDOM_NONCE_LIMIT - NONCE_MARGIN } = options;
    this.#beforeReserve = options.beforeReserve;
    const m = volume.manifest;
    this.#volume = volume;
    this.#manifest = m;
    this.#keys = keys;
    this.#mapKey = mapKeyOf(keys);
    this.#mapFd = mapFd;
    this.#writable = writable;
    this.chunkSize = m.chunkSize;
    this.chunkCount = m.deviceSize / m.chunkSize;
    this.#slotBytes = slotSize(m.chunkSize);
    this.#slots = slotsOf(m);

    checkMapFormat(mapFd, MAP_NAME, this.chunkCount);
    const size = fstatSync(mapFd).size;
    const expected = mapFileBytes(this.chunkCount);
    if (size !== expected) throw new VbdError(`position map ${MAP_NAME} is ${size} bytes, a volume of ${this.chunkCount} chunks has one of ${expected} (truncated or replaced?); nothing was read or written`);
    const loaded = loadMapState(mapFd, MAP_NAME, this.#mapKey, this.chunkCount, this.#slots.total);
    this.#committed = loaded.map;
    this.#mapCommitter = new MapCommitter(mapFd, MAP_NAME, this.#mapKey, loaded);
    this.notices.push(...loaded.notices);

    const res = loadReservation(mapFd, MAP_NAME, this.#mapKey);
    this.notices.push(...res.problems);
    this.#reservation = res.newest;
    if (res.newest === undefined) {
      this.#writeBlocked = `no valid epoch reservation in ${MAP_NAME}: a write could reuse an epoch, so writing is refused (export still works)`;
    }
    const reserved = res.newest?.reservation;
    this.#nextEpoch = Math.max(this.#committed.epoch, reserved?.epochHigh ?? 0, epochFloor) + 1;

    const mapBudget = this.#committed.budget;
    const generation = m.sealed.keyGeneration;
    if (mapBudget.generation > generation) {
      throw new VbdError(`the position map seals under key generation ${mapBudget.generation}, the manifest says ${generation}: wrong key or manifest edited (rolled back?); nothing was read or written`);
    }
    // A manifest ahead of the map: a re-key whose first commit did not happen; its count starts at 0.
    const state: NonceBudgetState = mapBudget.generation === generation ? { ...mapBudget } : { generation, used: 0 };
    // Seals a crashed commit may have made count as made.
    if (reserved !== undefined && reserved.generation === state.generation) state.used = Math.max(state.used, reserved.sealsHigh);
    // A lower re-key point (tests) only ever moves the re-key earlier.
    const threshold = Math.min(rekeyAt, RANDOM_NONCE_LIMIT - NONCE_MARGIN);
    if (!Number.isSafeInteger(threshold) || threshold < 1) throw new VbdError(`re-key point must be a positive number of seals, got ${rekeyAt}`);
    this.#budget = new NonceBudget(state, { limit: RANDOM_NONCE_LIMIT, margin: RANDOM_NONCE_LIMIT - threshold });
  }

  get epoch(): number {
    return this.#committed.epoch;
  }

  /** The highest epoch reserved so far (durably): what root records after each commit, as the next open's epochFloor. */
  get reservedEpoch(): number {
    return this.#nextEpoch - 1;
  }

  sealedState(): SealedState {
    const m = this.#committed;
    const place = this.#mapCommitter.place;
    return {
      epoch: m.epoch, reservedEpoch: this.reservedEpoch, keyGeneration: this.#budget.generation, seals: this.#budget.used,
      rekeyAt: this.#budget.threshold, freeSlots: m.slotCount - m.chunkCount, mapCopy: place.copy, mapLogBytes: place.logEnd,
      ...(this.#resumed === undefined ? {} : { resumed: { ...this.#resumed } }),
    };
  }

  /**
   * Continues the nonce budget past root's record where the record is ahead of the files (they
   * were put back from an older copy, say, and the owner accepted it): no seal is ever made again
   * under a (key generation, count) that may have been used. Called once the files' epoch was
   * accepted, before anything is written; a read-only store only says what a write would do.
   *
   * The rule, one of two sound ones:
   *  - the record's generation is the files' own: the count is raised to the record's high-water
   *    (the record covers every seal under that generation, being written before each
   *    reservation). Nothing is written at open, no generation is spent: this is also what a plain
   *    restart meets, as the record reserves seals a little ahead (src/daemon/epoch-record.ts).
   *  - the record knows a later generation than the files, or (an older record) no generation at
   *    all: seals move to a fresh generation above any the record allows (re-key to
   *    max(files, record) + 1, count 0; the manifest re-wrapped for it, as #rekey does), never to
   *    the record's own generation at its count. A manifest ahead of its map opens with a count of
   *    0 (the constructor): that must stay true of every generation the manifest moves to. For an
   *    older record the bound is the files' generation plus the epochs reserved past the files'
   *    epoch: every re-key is followed by a reservation of at least one epoch before it seals.
   */
  resumeFrom(floor: SealFloor): void {
    const files = this.#budget.state;
    let record: BudgetResumed['record'];
    let now: NonceBudgetState;
    if (floor === 'unknown') {
      record = 'unknown';
      now = { generation: files.generation + Math.max(0, this.reservedEpoch - this.#committed.epoch) + 1, used: 0 };
    } else {
      record = { generation: floor.generation, used: floor.seals };
      if (floor.generation < files.generation || (floor.generation === files.generation && floor.seals <= files.used)) return;
      // A count past the hard limit is due for a re-key all the same.
      now = floor.generation === files.generation ? { generation: files.generation, used: Math.min(floor.seals, this.#budget.limit) } : { generation: floor.generation + 1, used: 0 };
    }
    const how = now.generation === files.generation ? 'count-raised' : 'fresh-generation';
    this.#resumed = { files, record, now, how, applied: this.#writable };
    if (!this.#writable) return;
    if (how === 'fresh-generation') this.#moveManifestTo(now.generation, `root's record is ahead of the files' nonce budget (key generation ${files.generation})`);
    this.#budget = new NonceBudget(now, { limit: this.#budget.limit, margin: this.#budget.margin });
  }

  /** Seals made under the current key generation (the nonce budget; for status). */
  get budget(): NonceBudgetState {
    return this.#budget.state;
  }

  /** The pending commit's journal, stale journals, and (writable) completing an interrupted commit. */
  settle(): void {
    const m = this.#committed;
    const fd = openVolumeEntry(this.#volume, SEALED_JOURNAL_NAME, this.#writable ? 'write' : 'read');
    if (m.pendingCount === 0) {
      if (fd === undefined) return;
      closeSync(fd);
      if (this.#writable) {
        this.#removeJournal();
        this.notices.push(`removed ${SEALED_JOURNAL_NAME}, left by a commit that never completed (the files hold epoch ${m.epoch})`);
      } else {
        this.notices.push(`ignoring ${SEALED_JOURNAL_NAME}, left by a commit that never completed (the files hold epoch ${m.epoch}); the next import removes it`);
      }
      return;
    }
    const problem = fd === undefined ? 'is missing' : this.#journalProblem(fd, m);
    if (problem === undefined && fd !== undefined) {
      const index = new Int32Array(this.chunkCount).fill(-1);
      pendingChunks(m).forEach((chunk, i) => {
        index[chunk] = i;
      });
      this.#journal = { fd, index };
    } else {
      if (fd !== undefined) closeSync(fd);
      this.notices.push(`the commit of epoch ${m.epoch} put ${m.pendingCount} chunks through ${SEALED_JOURNAL_NAME}, which ${problem}: those chunks are read from their slots`);
    }
    if (!this.#writable) {
      if (this.#journal !== undefined) this.notices.push(`the commit of epoch ${m.epoch} was interrupted while copying ${m.pendingCount} chunks from ${SEALED_JOURNAL_NAME} into place: they are read from the journal; the next import completes it`);
      return;
    }
    if (this.#writeBlocked !== undefined) throw new VbdError(`the commit of epoch ${m.epoch} waits to be completed, but ${this.#writeBlocked}`);
    // A journal that is there but does not match is not ours to drop: refuse to write (reads go on).
    if (problem !== undefined && fd !== undefined) {
      throw new VbdError(`the commit of epoch ${m.epoch} waits to be completed from ${SEALED_JOURNAL_NAME}, which ${problem}: refusing to write (export still reads the volume)`);
    }
    const clearEpoch = this.#reserve(1, 0);
    this.#completeJournal(clearEpoch);
    this.notices.push(`completed the interrupted commit of epoch ${m.epoch}: ${m.pendingCount} chunks copied from ${SEALED_JOURNAL_NAME} into place (epoch ${clearEpoch})`);
  }

  #journalProblem(fd: number, m: PositionMap): string | undefined {
    const size = fstatSync(fd).size;
    const want = JOURNAL_HEADER_BYTES + m.pendingCount * this.#slotBytes;
    if (size !== want) return `is ${size} bytes, not ${want}`;
    const header = Buffer.alloc(JOURNAL_HEADER_BYTES);
    readInto(fd, header, JOURNAL_HEADER_BYTES, 0, SEALED_JOURNAL_NAME);
    if (!header.equals(journalHeader(this.#keys.uuid, m.epoch, m.pendingCount, this.#slotBytes))) return 'belongs to another commit or volume';
    return undefined;
  }

  #slotPlace(slot: number): Place {
    const { file, offset } = placeSlot(this.#slots, this.#slotBytes, slot);
    return { fd: this.#volume.fds[file] ?? -1, file, name: fileName(this.#volume, file), offset };
  }

  #journalPlace(index: number, fd: number): Place {
    return { fd, file: -1, name: SEALED_JOURNAL_NAME, offset: JOURNAL_HEADER_BYTES + index * this.#slotBytes };
  }

  /** Where chunk c's slot is read from now: its slot, or the journal while its commit completes. */
  #placeOf(chunk: number): Place {
    const j = this.#journal;
    if (j !== undefined) {
      const i = j.index[chunk] ?? -1;
      if (i >= 0) return this.#journalPlace(i, j.fd);
    }
    return this.#slotPlace(this.#committed.slot[chunk] ?? 0);
  }

  locate(chunk: number): ChunkPlace {
    checkChunks(chunk, chunk + 1, this.chunkCount);
    const p = this.#placeOf(chunk);
    return { file: p.file, name: p.name, offset: p.offset, bytes: this.#slotBytes };
  }

  /** The slot's epoch and generation as the committed map has them (for tests and reports). */
  entry(chunk: number): { slot: number; epoch: number; generation: number } {
    checkChunks(chunk, chunk + 1, this.chunkCount);
    const m = this.#committed;
    return { slot: m.slot[chunk] ?? 0, epoch: m.epochs[chunk] ?? 0, generation: m.generation[chunk] ?? 0 };
  }

  writeOrder(): Uint32Array {
    const order = new Uint32Array(this.chunkCount);
    for (let c = 0; c < order.length; c++) order[c] = c;
    return order;
  }

  /**
   * Opens every slot into the image, FILL_BYTES of it at a time. With a pool (`options.pool`),
   * its threads read and open each part straight into the image while this thread waits, free
   * for the daemon's pipes; without one, this thread does it, yielding to the event loop between
   * parts. Damaged slots are listed after the whole image is read (the caller refuses or zeroes).
   */
  async fill(image: ShadowImage, options: FillOptions = {}, progress?: (bytes: number) => void): Promise<FillResult> {
    const damaged: DamagedChunk[] = [];
    const C = this.chunkSize;
    const pool = options.pool?.usable === true ? options.pool : undefined;
    for (const window of image.windows) {
      const first = window.offset / C;
      for (const part of windows(window.length / C, C, FILL_BYTES)) {
        if (pool === undefined) {
          damaged.push(...this.read(first + part.first, first + part.end, window.view.subarray(part.first * C, part.end * C), options));
          await new Promise((resolve) => setImmediate(resolve));
        } else {
          const src = this.#sources(first + part.first, first + part.end, true);
          const marks = new Uint8Array(new SharedArrayBuffer(src.count));
          await pool.open(image.windows, C, src, (g) => this.#keys.slotKey(g), marks, options.damaged === 'zero');
          damaged.push(...this.#damaged(src, marks, options));
        }
        progress?.((part.end - part.first) * C);
      }
    }
    return { damaged, threads: pool?.threads ?? 0 };
  }

  #buffer(): Buffer {
    this.#scratch ??= Buffer.alloc(Math.max(1, Math.floor(RUN_BYTES / this.#slotBytes)) * this.#slotBytes);
    return this.#scratch;
  }

  /** Where the slots of chunks [first, end) are read from now, as slot-runs.ts takes them. */
  #sources(first: number, end: number, shared: boolean): SlotSources {
    const files = this.#volume.fds.map((fd, i) => ({ fd, name: fileName(this.#volume, i) }));
    const journal = files.length;
    if (this.#journal !== undefined) files.push({ fd: this.#journal.fd, name: SEALED_JOURNAL_NAME });
    const src = newSlotSources(first, end - first, this.#slotBytes, files, shared);
    const m = this.#committed;
    for (let c = first; c < end; c++) {
      const p = this.#placeOf(c);
      const i = c - first;
      src.file[i] = p.file < 0 ? journal : p.file;
      src.offset[i] = p.offset;
      src.epoch[i] = m.epochs[c] ?? 0;
      src.generation[i] = m.generation[c] ?? 0;
    }
    return src;
  }

  /** The chunks `marks` says failed, as the caller asked: listed, or the first one thrown. */
  #damaged(src: SlotSources, marks: Uint8Array, options: ReadOptions): DamagedChunk[] {
    const damaged: DamagedChunk[] = [];
    for (let i = 0; i < src.count; i++) {
      if (marks[i] !== 1) continue;
      const chunk = src.first + i;
      const epoch = src.epoch[i] as number;
      const file = src.files[src.file[i] as number];
      if (file === undefined) throw new VbdError(`internal: chunk ${chunk} names slot file ${src.file[i]} of ${src.files.length}`);
      const offset = src.offset[i] as number;
      if (options.damaged !== 'zero') throw new SlotAuthError(chunk, epoch, src.generation[i] as number, { file: file.name, offset });
      damaged.push({ chunk, name: file.name, offset, epoch });
    }
    return damaged;
  }

  read(first: number, end: number, into: Buffer, options: ReadOptions = {}): DamagedChunk[] {
    checkChunks(first, end, this.chunkCount);
    const C = this.chunkSize;
    if (into.length < (end - first) * C) throw new VbdError(`internal: a buffer of ${into.length} bytes for ${end - first} chunks`);
    const src = this.#sources(first, end, false);
    const marks = new Uint8Array(src.count);
    const target = { chunk: (i: number) => into.subarray(i * C, (i + 1) * C), damaged: marks, zero: options.damaged === 'zero' };
    openSlots(src, 0, src.count, (g) => this.#keys.slotKey(g), target, this.#buffer());
    return this.#damaged(src, marks, options);
  }

  /** Free slots under the committed map, ascending. */
  #freeSlots(): Uint32Array {
    const m = this.#committed;
    const used = new Uint8Array(m.slotCount);
    for (let c = 0; c < m.chunkCount; c++) used[m.slot[c] ?? 0] = 1;
    const free = new Uint32Array(m.slotCount - m.chunkCount);
    let n = 0;
    for (let s = 0; s < m.slotCount; s++) if (used[s] === 0) free[n++] = s;
    return free;
  }

  /**
   * Makes the next `epochs` epochs and `seals` seals durable as reserved before anything they
   * cover is written; returns the first epoch. After this, those epochs are never used again.
   */
  #reserve(epochs: number, seals: number): number {
    if (this.#writeBlocked !== undefined) throw new VbdError(this.#writeBlocked);
    const first = this.#nextEpoch;
    const reservation: Reservation = { epochHigh: first + epochs - 1, generation: this.#budget.generation, sealsHigh: this.#budget.used + seals };
    const index: Region = this.#reservation === undefined ? 0 : this.#reservation.index === 0 ? 1 : 0;
    this.#beforeReserve?.(reservation);
    // From here on, whatever happens, these epochs count as used.
    this.#nextEpoch = reservation.epochHigh + 1;
    writeReservation(this.#mapFd, MAP_NAME, this.#mapKey, reservation, index);
    this.#reservation = { reservation, index };
    return first;
  }

  /** The commit point: `next` becomes the map the files decode to. Returns the map bytes written. */
  #commitMap(next: PositionMap): number {
    const bytes = this.#mapCommitter.commit(this.#committed, next);
    this.#committed = next;
    return bytes;
  }

  /** For tests: the checkpoint copy in use, its epoch, and where the map log ends. */
  get mapPlace(): MapCommitter['place'] {
    return this.#mapCommitter.place;
  }

  #removeJournal(): void {
    try {
      unlinkSync(entryPath(this.#volume, SEALED_JOURNAL_NAME));
    } catch (err) {
      if (errnoCode(err) !== 'ENOENT') throw failure(`cannot remove ${SEALED_JOURNAL_NAME}`, err);
    }
    try {
      fsyncSync(this.#volume.dirFd);
    } catch (err) {
      throw failure('fsync of the volume directory', err);
    }
  }

  /** Copies the pending chunks from the journal into their slots, commits a map without them at `clearEpoch`, removes the journal; returns the map bytes written. */
  #completeJournal(clearEpoch: number): number {
    const m = this.#committed;
    const S = this.#slotBytes;
    const j = this.#journal;
    if (j !== undefined) {
      const buf = this.#buffer();
      const perRead = buf.length / S;
      const pending = pendingChunks(m);
      const touched = new Set<number>();
      for (let i = 0; i < pending.length; i += perRead) {
        const count = Math.min(perRead, pending.length - i);
        readInto(j.fd, buf, count * S, JOURNAL_HEADER_BYTES + i * S, SEALED_JOURNAL_NAME);
        let k = 0;
        while (k < count) {
          const p0 = this.#slotPlace(m.slot[pending[i + k] ?? 0] ?? 0);
          let n = 1;
          while (k + n < count) {
            const p = this.#slotPlace(m.slot[pending[i + k + n] ?? 0] ?? 0);
            if (p.fd !== p0.fd || p.offset !== p0.offset + n * S) break;
            n++;
          }
          writeAt(p0.fd, buf.subarray(k * S, (k + n) * S), p0.offset, `backing file '${p0.name}'`);
          touched.add(p0.file);
          k += n;
        }
      }
      syncBackingFiles(this.#volume, touched);
    }
    const cleared = clonePositionMap(m);
    clearPending(cleared);
    cleared.epoch = clearEpoch;
    cleared.budget = this.#budget.state;
    const mapBytes = this.#commitMap(cleared);
    if (j !== undefined) closeSync(j.fd);
    this.#journal = undefined;
    this.#removeJournal();
    return mapBytes;
  }

  begin(chunks: 'all' | Uint32Array): StoreWrite {
    if (!this.#writable) throw new VbdError('internal: a write through a store opened read-only');
    if (this.#active) throw new VbdError('internal: a second write while one is under way');
    if (this.#committed.pendingCount > 0) throw new VbdError(`the commit of epoch ${this.#committed.epoch} is not complete yet (its journal); reopen the volume to complete it`);
    if (this.#writeBlocked !== undefined) throw new VbdError(this.#writeBlocked);
    const n = this.chunkCount;
    const k = chunks === 'all' ? n : chunks.length;
    if (chunks !== 'all') {
      for (let i = 0; i < chunks.length; i++) {
        const c = chunks[i] ?? 0;
        if (c >= n || (i > 0 && c <= (chunks[i - 1] ?? 0))) throw new VbdError(`internal: the chunks of a write must be ascending and below ${n}`);
      }
    }
    const rekeyedFrom = this.#budget.allows(k) ? undefined : this.#rekey(k);
    const free = this.#freeSlots();
    const inFree = Math.min(k, free.length);
    const overflow = k - inFree;
    const dest = new Uint32Array(n).fill(NONE);
    const viaJournal = overflow > 0 ? new Int32Array(n).fill(-1) : undefined;
    // Which chunk gets which free slot, and which chunks overflow, is drawn at random: the files
    // show which slots a commit wrote, never which chunk went where (nor which ones stayed put).
    const draw = keyedPermutation(randomBytes(32), k, k);
    for (let i = 0; i < k; i++) {
      const at = draw[i] ?? 0;
      const c = chunks === 'all' ? at : chunks[at] ?? 0;
      // A chunk that finds no free slot goes back into its own: free once the map commits, written after.
      dest[c] = i < inFree ? free[i] ?? 0 : this.#committed.slot[c] ?? 0;
      if (i >= inFree && viaJournal !== undefined) viaJournal[c] = OVERFLOW;
    }
    if (viaJournal !== undefined) {
      // The journal holds the pending chunks in ascending order: a chunk's rank is its place in it.
      let rank = 0;
      for (let c = 0; c < n; c++) if (viaJournal[c] === OVERFLOW) viaJournal[c] = rank++;
    }
    const epoch = this.#reserve(overflow > 0 ? 2 : 1, k);
    let journalFd: number | undefined;
    if (overflow > 0) journalFd = this.#createJournal(epoch, overflow);
    this.#active = true;
    return new SealedWrite(this, {
      epoch, dest, viaJournal, journalFd, planned: k, inFree, overflow, mapBytes: RESERVE_RECORD_BYTES, rekeyedFrom,
      sealer: new SlotSealer(this.#keys.slotKey(this.#budget.generation), this.#budget),
    });
  }

  /**
   * Moves new seals to the next key generation because `k` more would pass the re-key point:
   * the manifest, re-wrapped for generation g + 1 under the KEK that opened the volume, is put in
   * place (synced) before anything is sealed under the new slot key. A crash after that leaves a
   * manifest ahead of the map, which opens with a fresh count (see the constructor). Slots of
   * older generations stay as they are, opened with their own keys, until a write moves them:
   * the budget counts encryptions, and they are not encrypted again. Returns the old generation.
   */
  #rekey(k: number): number {
    const from = this.#budget.generation;
    if (k > this.#budget.threshold) {
      throw new VbdError(`a write of ${k} slots is more than one key generation may seal (${this.#budget.threshold}); nothing was written`);
    }
    this.#moveManifestTo(from + 1, `key generation ${from} has sealed ${this.#budget.used} slots and is due for a re-key`);
    this.#budget.rekey();
    return from;
  }

  /** Puts the manifest, re-wrapped for key generation `generation`, in place (synced) before anything is sealed under it; `why` a re-key is due. */
  #moveManifestTo(generation: number, why: string): void {
    const onDisk = rereadManifest(this.#volume);
    if (serializeManifest(onDisk) !== serializeManifest(this.#manifest)) {
      throw new VbdError(`${why}, but the manifest changed since the volume was opened (passwd while it was live?): restart the volume to re-key; nothing was written`);
    }
    const next = atKeyGeneration(this.#keys, this.#manifest, generation);
    writeManifest(this.#volume.dirFd, this.#volume.dir, next, this.#volume.owner);
    this.#manifest = next;
    this.#volume.manifest = next;
  }

  #createJournal(epoch: number, count: number): number {
    this.#removeJournal();
    let fd: number;
    try {
      fd = openSync(entryPath(this.#volume, SEALED_JOURNAL_NAME), fsc.O_RDWR | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
    } catch (err) {
      throw failure(`cannot create ${SEALED_JOURNAL_NAME}`, err);
    }
    try {
      if (process.geteuid?.() === 0) fchownSync(fd, this.#volume.owner.uid, this.#volume.owner.gid);
      ftruncateSync(fd, JOURNAL_HEADER_BYTES + count * this.#slotBytes);
      writeAt(fd, journalHeader(this.#keys.uuid, epoch, count, this.#slotBytes), 0, SEALED_JOURNAL_NAME);
      return fd;
    } catch (err) {
      closeSync(fd);
      throw failure(`cannot prepare ${SEALED_JOURNAL_NAME}`, err);
    }
  }

  // --- used by SealedWrite ---

  get slotBytes(): number {
    return this.#slotBytes;
  }

  get volume(): SealedVolume {
    return this.#volume;
  }

  placeForWrite(plan: WritePlan, chunk: number): Place {
    const j = plan.viaJournal?.[chunk] ?? -1;
    if (j >= 0 && plan.journalFd !== undefined) return this.#journalPlace(j, plan.journalFd);
    return this.#slotPlace(plan.dest[chunk] ?? 0);
  }

  finishWrite(plan: WritePlan, touched: ReadonlySet<number>): CommitReport {
    try {
      syncBackingFiles(this.#volume, touched);
      if (plan.journalFd !== undefined) {
        datasync(plan.journalFd, SEALED_JOURNAL_NAME);
        fsyncSync(this.#volume.dirFd);
      }
      const next = clonePositionMap(this.#committed);
      for (let c = 0; c < this.chunkCount; c++) {
        const slot = plan.dest[c] ?? NONE;
        if (slot === NONE) continue;
        next.slot[c] = slot;
        next.epochs[c] = plan.epoch;
        next.generation[c] = this.#budget.generation;
        if ((plan.viaJournal?.[c] ?? -1) >= 0) setPending(next, c);
      }
      next.epoch = plan.epoch;
      next.budget = this.#budget.state;
      plan.mapBytes += this.#commitMap(next); // the commit point
      if (plan.journalFd !== undefined) {
        const index = plan.viaJournal ?? new Int32Array(0);
        this.#journal = { fd: plan.journalFd, index };
        plan.journalFd = undefined;
        plan.mapBytes += this.#completeJournal(plan.epoch + 1);
      }
      return {
        kind: 'sealed', epoch: this.#committed.epoch, chunks: plan.planned, inFreeSlots: plan.inFree, throughJournal: plan.overflow, mapBytes: plan.mapBytes,
        keyGeneration: this.#budget.generation, ...(plan.rekeyedFrom === undefined ? {} : { rekeyedFrom: plan.rekeyedFrom }),
      };
    } finally {
      this.#active = false;
      // Never removed here: once the map write was tried, the journal may be what the files need.
      if (plan.journalFd !== undefined) closeSync(plan.journalFd);
      plan.journalFd = undefined;
    }
  }

  abortWrite(plan: WritePlan): void {
    this.#active = false;
    if (plan.journalFd !== undefined) {
      closeSync(plan.journalFd);
      plan.journalFd = undefined;
      try {
        this.#removeJournal();
      } catch {
        /* removed at the next writable open */
      }
    }
  }

  close(): void {
    if (this.#journal !== undefined) closeSync(this.#journal.fd);
    this.#journal = undefined;
    closeSync(this.#mapFd);
    this.#scratch?.fill(0);
    this.#keys.wipe();
  }
}

interface WritePlan {
  epoch: number;
  /** Chunk → the slot it is sealed for (NONE: not in this write). */
  dest: Uint32Array;
  /** Chunk → its index in the overflow journal (-1: straight into its slot). */
  viaJournal: Int32Array | undefined;
  journalFd: number | undefined;
  planned: number;
  inFree: number;
  overflow: number;
  /** Bytes written to the map file so far: the epoch reservation, then the map record or checkpoint(s). */
  mapBytes: number;
  /** The key generation this write re-keyed from, if it did. */
  rekeyedFrom: number | undefined;
  sealer: SlotSealer;
}

class SealedWrite implements StoreWrite {
  readonly #written: Uint8Array;
  #count = 0;
  #done = false;
  readonly #touched = new Set<number>();
  readonly #buf: Buffer;

  constructor(
    private readonly store: SealedStore,
    private readonly plan: WritePlan,
  ) {
    this.#written = new Uint8Array(store.chunkCount);
    const S = store.slotBytes;
    this.#buf = Buffer.alloc(Math.max(1, Math.floor(RUN_BYTES / S)) * S);
  }

  get epoch(): number {
    return this.plan.epoch;
  }

  write(first: number, end: number, from: Buffer): void {
    if (this.#done) throw new VbdError('internal: a write after commit or abort');
    checkChunks(first, end, this.store.chunkCount);
    const C = this.store.chunkSize;
    const S = this.store.slotBytes;
    if (from.length < (end - first) * C) throw new VbdError(`internal: a buffer of ${from.length} bytes for ${end - first} chunks`);
    let run: Place | undefined;
    let length = 0;
    const flush = (): void => {
      if (run === undefined || length === 0) return;
      writeAt(run.fd, this.#buf.subarray(0, length), run.offset, run.file < 0 ? SEALED_JOURNAL_NAME : `backing file '${run.name}'`);
      if (run.file >= 0) this.#touched.add(run.file);
      this.#buf.fill(0, 0, length);
      run = undefined;
      length = 0;
    };
    for (let c = first; c < end; c++) {
      if ((this.plan.dest[c] ?? NONE) === NONE) throw new VbdError(`internal: chunk ${c} is not part of this write`);
      if (this.#written[c] === 1) throw new VbdError(`internal: chunk ${c} written twice in one commit`);
      const place = this.store.placeForWrite(this.plan, c);
      if (run !== undefined && (place.fd !== run.fd || place.offset !== run.offset + length || length + S > this.#buf.length)) flush();
      if (run === undefined) run = place;
      this.plan.sealer.seal({ chunk: c, epoch: this.plan.epoch }, from.subarray((c - first) * C, (c - first + 1) * C), this.#buf.subarray(length, length + S));
      length += S;
      this.#written[c] = 1;
      this.#count++;
    }
    flush();
  }

  readonly writeOnPool = async (chunks: Uint32Array, from: (chunk: number) => Buffer, pool: SlotSealPool): Promise<void> => {
    if (this.#done) throw new VbdError('internal: a write after commit or abort');
    const { store, plan } = this;
    const C = store.chunkSize;
    const files = store.volume.fds.map((fd, i) => ({ fd, name: `backing file '${fileName(store.volume, i)}'` }));
    const journal = files.length;
    if (plan.journalFd !== undefined) files.push({ fd: plan.journalFd, name: SEALED_JOURNAL_NAME });
    const n = chunks.length;
    const fileOf = new Int32Array(n);
    const offsetOf = new Float64Array(n);
    chunks.forEach((c, i) => {
      if (c >= store.chunkCount || (plan.dest[c] ?? NONE) === NONE) throw new VbdError(`internal: chunk ${c} is not part of this write`);
      if (this.#written[c] === 1) throw new VbdError(`internal: chunk ${c} written twice in one commit`);
      this.#written[c] = 1;
      const p = store.placeForWrite(plan, c);
      fileOf[i] = p.file < 0 ? journal : p.file;
      offsetOf[i] = p.offset;
    });
    // In the files' order: neighbouring slots go out in one write.
    const order = new Uint32Array(n).map((_, i) => i).sort((a, b) => (fileOf[a] as number) - (fileOf[b] as number) || (offsetOf[a] as number) - (offsetOf[b] as number));
    const shared = (bytes: number): SharedArrayBuffer => new SharedArrayBuffer(bytes);
    const buffers: SharedArrayBuffer[] = [];
    const t: SealTargets = {
      slotBytes: store.slotBytes, chunkSize: C, epoch: plan.epoch, generation: plan.sealer.key.generation, files,
      chunk: new Uint32Array(shared(4 * n)), file: new Int32Array(shared(4 * n)), offset: new Float64Array(shared(8 * n)),
      buffers, buffer: new Int32Array(shared(4 * n)), at: new Float64Array(shared(8 * n)),
    };
    order.forEach((k, i) => {
      const chunk = chunks[k] as number;
      const source = from(chunk);
      if (!(source.buffer instanceof SharedArrayBuffer) || source.length !== C) throw new VbdError(`internal: chunk ${chunk} must come from ${C} bytes of shared memory to be sealed on the pool`);
      let b = buffers.indexOf(source.buffer);
      if (b < 0) b = buffers.push(source.buffer) - 1;
      t.chunk[i] = chunk;
      t.file[i] = fileOf[k] as number;
      t.offset[i] = offsetOf[k] as number;
      t.buffer[i] = b;
      t.at[i] = source.byteOffset;
      if (fileOf[k] !== journal) this.#touched.add(fileOf[k] as number);
    });
    // Counted before any is sealed: a seal made and lost to a failure still spent its nonce.
    const key = plan.sealer.take(n);
    this.#count += n;
    try {
      await pool.seal(t, key);
    } catch (err) {
      this.abort();
      throw err;
    }
  };

  commit(): CommitReport {
    if (this.#done) throw new VbdError('internal: commit after commit or abort');
    if (this.#count !== this.plan.planned) {
      this.abort();
      throw new VbdError(`internal: ${this.plan.planned - this.#count} of the ${this.plan.planned} chunks of epoch ${this.plan.epoch} were not written; nothing was committed`);
    }
    this.#done = true;
    return this.store.finishWrite(this.plan, this.#touched);
  }

  abort(): void {
    if (this.#done) return;
    this.#done = true;
    this.store.abortWrite(this.plan);
  }
}

function checkChunks(first: number, end: number, chunkCount: number): void {
  if (!Number.isSafeInteger(first) || !Number.isSafeInteger(end) || first < 0 || end > chunkCount || first > end) {
    throw new VbdError(`internal: chunks [${first}, ${end}) outside the volume's ${chunkCount}`);
  }
}

/** What the constructor takes of the open options. */
type SealedStoreOptions = Pick<OpenStoreOptions, 'epochFloor' | 'rekeyAt' | 'beforeReserve'>;

/**
 * Unlocks a sealed volume and opens its store (see the top of this file): the files' epoch is
 * accepted (or refused) first, then the nonce budget continues past root's record, then an
 * interrupted commit is completed. The caller wipes `passphrase`.
 */
export function openSealedStore(volume: SealedVolume, passphrase: Buffer, writable: boolean, options: Pick<OpenStoreOptions, 'acceptEpoch' | 'sealFloor'> & SealedStoreOptions = {}): SealedStore {
  const m = volume.manifest;
  const chunks = m.deviceSize / m.chunkSize;
  checkMemory(m.name, chunks, slotsOf(m).total);
  const keys = unlockSealedManifest(passphrase, m);
  let mapFd: number | undefined;
  try {
    mapFd = openVolumeEntry(volume, MAP_NAME, writable ? 'write' : 'read');
    if (mapFd === undefined) throw new VbdError(`volume '${m.name}': its position map ${MAP_NAME} is missing, so no slot can be found (nothing was read or written)`);
    const store = new SealedStore(volume, keys, mapFd, writable, options);
    try {
      options.acceptEpoch?.(store.epoch);
      if (options.sealFloor !== undefined) store.resumeFrom(options.sealFloor);
      store.settle();
    } catch (err) {
      store.close();
      throw err;
    }
    return store;
  } catch (err) {
    if (!keys.wiped) {
      if (mapFd !== undefined) {
        try {
          closeSync(mapFd);
        } catch {
          /* closed by the store */
        }
      }
      keys.wipe();
    }
    throw err;
  }
}

export type { SealedStore };

/** Where init writes a new sealed volume: its backing files (write fds) and its map file. */
export interface NewSealedFiles {
  fds: readonly number[];
  names: readonly string[];
  mapFd: number;
}

/**
 * Fills a new sealed volume: every slot gets ciphertext (the chunks' slots a sealed zero chunk of
 * epoch 1 at their initial place, the spare slots random bytes), every file is synced, then the
 * map file gets both copies (A at epoch 1, B at epoch 2: the same map, so that from the start a
 * copy that fails is always reported) and a reservation covering them. The manifest comes last
 * (the caller's).
 */
export function writeNewSealedVolume(files: NewSealedFiles, manifest: SealedManifest, keys: VolumeKeys, slotOfChunk: Uint32Array): void {
  const C = manifest.chunkSize;
  const S = slotSize(C);
  const n = manifest.deviceSize / C;
  const slots = slotsOf(manifest);
  if (slotOfChunk.length !== n) throw new VbdError(`internal: an initial placement of ${slotOfChunk.length} chunks for ${n}`);
  const owner = new Uint32Array(slots.total).fill(NONE);
  for (let c = 0; c < n; c++) {
    const s = slotOfChunk[c] ?? NONE;
    if (s >= slots.total || owner[s] !== NONE) throw new VbdError(`internal: the initial placement puts chunk ${c} in slot ${s}, taken or out of range`);
    owner[s] = c;
  }
  const generation = manifest.sealed.keyGeneration;
  const sealer = new SlotSealer(keys.slotKey(generation), new NonceBudget({ generation, used: 0 }));
  const zero = Buffer.alloc(C);
  const buf = Buffer.alloc(Math.max(1, Math.floor(RUN_BYTES / S)) * S);
  files.fds.forEach((fd, f) => {
    const name = `backing file '${files.names[f] ?? `#${f}`}'`;
    const firstSlot = slots.first[f] ?? 0;
    const endSlot = slots.first[f + 1] ?? 0;
    let s = firstSlot;
    while (s < endSlot) {
      const count = Math.min(endSlot - s, buf.length / S);
      for (let i = 0; i < count; i++) {
        const out = buf.subarray(i * S, (i + 1) * S);
        const chunk = owner[s + i] ?? NONE;
        if (chunk === NONE) randomFillSync(out);
        else sealer.seal({ chunk, epoch: INIT_EPOCH }, zero, out);
      }
      writeAt(fd, buf.subarray(0, count * S), (s - firstSlot) * S, name);
      s += count;
    }
    datasync(fd, name);
  });
  const map = newPositionMap(n, slots.total);
  map.slot.set(slotOfChunk);
  map.epochs.fill(INIT_EPOCH);
  map.generation.fill(generation);
  map.budget = sealer.budget.state;
  const key = mapKeyOf(keys);
  try {
    ftruncateSync(files.mapFd, 0);
    ftruncateSync(files.mapFd, mapFileBytes(n));
  } catch (err) {
    throw failure(`cannot size ${MAP_NAME}`, err);
  }
  writeReservation(files.mapFd, MAP_NAME, key, { epochHigh: INIT_EPOCH + 1, generation, sealsHigh: map.budget.used }, 0);
  map.epoch = INIT_EPOCH;
  writePositionMap(files.mapFd, MAP_NAME, key, map, 0);
  map.epoch = INIT_EPOCH + 1;
  writePositionMap(files.mapFd, MAP_NAME, key, map, 1);
}
