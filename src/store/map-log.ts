// The map log of a sealed volume (docs/FORMAT.md, "Map log"). The map copies A/B (src/store/map.ts)
// are checkpoints; between two of them each commit appends one sealed record of what it changed —
// the entries of the chunks it moved, the pending set, the nonce budget — to the log region of the
// map file. So a commit writes map bytes in proportion to the chunks it changed, not to the volume.
// When a record would not fit the rest of the region, the commit writes a whole checkpoint into the
// copy that does not hold the current one instead, and the log starts over at its beginning.
//
// A record's header (authenticated with it) names the checkpoint it builds on (the base epoch),
// the epoch it follows and its own epoch: it applies only onto that checkpoint, right after that
// epoch. So records cannot be reordered, dropped from the middle, replayed from another volume or
// spliced onto another checkpoint. The log is read from its start and stops at the first record
// that does not apply: every prefix of the log is one whole commit, so a record torn by a crash
// leaves the files decoding to the epoch before it. What is reported:
//   - a record of the checkpoint that fails, when it is the last: that commit did not happen;
//   - any record of the checkpoint found anywhere past where the log stopped, whatever stopped it
//     (a failing record, a damaged header, zeros): a crash tears only the last record, so records
//     after the stop mean damage or tampering; they are not applied (an older epoch, which root's
//     record of the epoch catches as a rollback).
// A log that ends in zeros, in bytes that are no record header, or in records of another
// checkpoint, with no record of this checkpoint after them, has simply ended: silent.
//
// A new checkpoint needs no reset of the log: the records there name the old checkpoint, so they
// end the log at once, whatever is left of them, and the new log overwrites them from the start.

import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { VbdError } from '../common/errors.js';
import { wipe } from './keys.js';
import {
  AUTH_FAILURE, COPY_NAMES, MAP_FORMAT_VERSION, MapCopyError, clearPending, datasync, fallbackNotice, label, loadPositionMap, logOffset,
  logRegionBytes, pendingChunks, readAt, readU64, setPending, u64, writeAt, writePositionMap, type MapKey, type PositionMap, type Region,
} from './map.js';
import { NONCE_BYTES, TAG_BYTES } from './slot.js';

export const LOG_MAGIC = Buffer.from('VBDSLOG\0', 'ascii');
export const LOG_AD_LABEL = 'vbd-shadow/map-log';
/** magic(8) ‖ body length u32 ‖ base epoch u64 ‖ previous epoch u64 ‖ epoch u64 ‖ nonce(12) ‖ tag(16). */
export const LOG_HEADER_BYTES = 64;
/** Bytes of the header the AD covers: magic … epoch (before nonce and tag). */
const LOG_HEADER_AD_BYTES = 36;
/** Body head: budget generation u32 ‖ seals used u64 ‖ entry count u32 ‖ pending count u32. */
const BODY_HEAD_BYTES = 20;
/** Per changed chunk: chunk u32 ‖ slot u32 ‖ key generation u32 ‖ epoch u64. */
export const LOG_ENTRY_BYTES = 20;
/** Per pending chunk (ascending): chunk u32. */
const PENDING_BYTES = 4;

/** Bytes of a record of `entries` changed chunks and `pending` pending chunks. */
export function logRecordBytes(entries: number, pending: number): number {
  return LOG_HEADER_BYTES + BODY_HEAD_BYTES + entries * LOG_ENTRY_BYTES + pending * PENDING_BYTES;
}

/** The record's cleartext header, parsed. */
interface RecordHead {
  length: number;
  base: number;
  prev: number;
  epoch: number;
}

function parseHead(head: Buffer): RecordHead {
  return {
    length: head.readUInt32BE(8),
    base: readU64(head, 12, 'base epoch'),
    prev: readU64(head, 20, 'previous epoch'),
    epoch: readU64(head, 28, 'epoch'),
  };
}

/** AD: label ‖ UUID ‖ map format u32 ‖ header bytes 0–35 (magic, length, base, previous and own epoch). */
function logAD(key: MapKey, head: Buffer): Buffer {
  const version = Buffer.alloc(4);
  version.writeUInt32BE(MAP_FORMAT_VERSION, 0);
  return Buffer.concat([label(LOG_AD_LABEL), key.uuid, version, head.subarray(0, LOG_HEADER_AD_BYTES)]);
}

/** The chunks whose entry (slot, epoch or key generation) differs between two maps, ascending. */
export function changedChunks(from: PositionMap, to: PositionMap): Uint32Array {
  const out: number[] = [];
  for (let c = 0; c < to.chunkCount; c++) {
    if (from.slot[c] !== to.slot[c] || from.epochs[c] !== to.epochs[c] || from.generation[c] !== to.generation[c]) out.push(c);
  }
  return Uint32Array.from(out);
}

/**
 * The sealed record that turns the map of epoch `prev` (on the checkpoint of epoch `base`) into
 * `next`: the entries of `changed` as `next` has them, all of `next`'s pending chunks, its budget.
 */
export function sealLogRecord(key: MapKey, base: number, prev: number, next: PositionMap, changed: Uint32Array): Buffer {
  const pending = pendingChunks(next);
  const out = Buffer.alloc(logRecordBytes(changed.length, pending.length));
  const body = Buffer.alloc(out.length - LOG_HEADER_BYTES);
  try {
    body.writeUInt32BE(next.budget.generation, 0);
    u64(body, 4, next.budget.used);
    body.writeUInt32BE(changed.length, 12);
    body.writeUInt32BE(pending.length, 16);
    let at = BODY_HEAD_BYTES;
    for (const c of changed) {
      body.writeUInt32BE(c, at);
      body.writeUInt32BE(next.slot[c] ?? 0, at + 4);
      body.writeUInt32BE(next.generation[c] ?? 0, at + 8);
      u64(body, at + 12, next.epochs[c] ?? 0);
      at += LOG_ENTRY_BYTES;
    }
    for (const c of pending) {
      body.writeUInt32BE(c, at);
      at += PENDING_BYTES;
    }
    LOG_MAGIC.copy(out, 0);
    out.writeUInt32BE(body.length, 8);
    u64(out, 12, base);
    u64(out, 20, prev);
    u64(out, 28, next.epoch);
    const nonce = randomBytes(NONCE_BYTES);
    nonce.copy(out, LOG_HEADER_AD_BYTES);
    const cipher = createCipheriv('aes-256-gcm', key.key, nonce, { authTagLength: TAG_BYTES });
    cipher.setAAD(logAD(key, out));
    cipher.update(body).copy(out, LOG_HEADER_BYTES);
    cipher.final();
    cipher.getAuthTag().copy(out, LOG_HEADER_AD_BYTES + NONCE_BYTES);
    return out;
  } finally {
    wipe(body);
  }
}

/**
 * Authenticates one record (header and body, as read) against the map it must follow and applies
 * it to `m`; `owner` is slot → chunk of `m` (-1: free), kept up to date. Throws MapCopyError, with
 * `m` and `owner` untouched, when the record does not follow `m`, fails authentication, or
 * describes a map that is not a bijection of the chunks onto distinct slots.
 */
export function applyLogRecord(record: Buffer, key: MapKey, m: PositionMap, owner: Int32Array): void {
  const head = parseHead(record);
  if (head.prev !== m.epoch) throw new MapCopyError(`does not follow epoch ${m.epoch} (it claims to follow ${head.prev}: reordered, replayed or spliced)`);
  if (head.epoch <= head.prev) throw new MapCopyError(`has epoch ${head.epoch}, not after the epoch ${head.prev} it follows`);
  if (record.length !== LOG_HEADER_BYTES + head.length || head.length < BODY_HEAD_BYTES) throw new MapCopyError(`has a body length of ${head.length}, which does not fit`);
  const decipher = createDecipheriv('aes-256-gcm', key.key, record.subarray(LOG_HEADER_AD_BYTES, LOG_HEADER_AD_BYTES + NONCE_BYTES), { authTagLength: TAG_BYTES });
  decipher.setAAD(logAD(key, record));
  decipher.setAuthTag(record.subarray(LOG_HEADER_AD_BYTES + NONCE_BYTES, LOG_HEADER_BYTES));
  const body = decipher.update(record.subarray(LOG_HEADER_BYTES));
  try {
    try {
      decipher.final();
    } catch {
      throw new MapCopyError(AUTH_FAILURE);
    }
    const generation = body.readUInt32BE(0);
    const used = readU64(body, 4, 'seal count');
    const entries = body.readUInt32BE(12);
    const pendingCount = body.readUInt32BE(16);
    if (body.length !== logRecordBytes(entries, pendingCount) - LOG_HEADER_BYTES) throw new MapCopyError(`holds ${entries} entries and ${pendingCount} pending chunks in ${body.length} bytes`);
    if (generation < m.budget.generation) throw new MapCopyError(`moves the key generation back from ${m.budget.generation} to ${generation}`);
    // Check everything before changing anything: a record is applied whole or not at all.
    const chunks = new Uint32Array(entries);
    const moving = new Set<number>();
    const claimed = new Set<number>();
    for (let i = 0; i < entries; i++) {
      const at = BODY_HEAD_BYTES + i * LOG_ENTRY_BYTES;
      const c = body.readUInt32BE(at);
      const slot = body.readUInt32BE(at + 4);
      const g = body.readUInt32BE(at + 8);
      const e = readU64(body, at + 12, `epoch of chunk ${c}`);
      if (c >= m.chunkCount || (i > 0 && c <= (chunks[i - 1] ?? 0))) throw new MapCopyError(`lists chunk ${c} out of order or past the ${m.chunkCount} chunks`);
      if (slot >= m.slotCount) throw new MapCopyError(`puts chunk ${c} in slot ${slot}, past the ${m.slotCount} slots`);
      if (claimed.has(slot)) throw new MapCopyError(`puts two chunks in slot ${slot}`);
      if (e > head.epoch) throw new MapCopyError(`gives chunk ${c} epoch ${e}, after its own ${head.epoch}`);
      if (g > generation) throw new MapCopyError(`gives chunk ${c} key generation ${g}, after its budget's ${generation}`);
      chunks[i] = c;
      moving.add(c);
      claimed.add(slot);
    }
    for (let i = 0; i < entries; i++) {
      const slot = body.readUInt32BE(BODY_HEAD_BYTES + i * LOG_ENTRY_BYTES + 4);
      const holder = owner[slot] ?? -1;
      if (holder >= 0 && !moving.has(holder)) throw new MapCopyError(`puts chunk ${chunks[i] ?? 0} in slot ${slot}, which chunk ${holder} keeps`);
    }
    const pendingAt = BODY_HEAD_BYTES + entries * LOG_ENTRY_BYTES;
    for (let i = 0; i < pendingCount; i++) {
      const c = body.readUInt32BE(pendingAt + i * PENDING_BYTES);
      if (c >= m.chunkCount || (i > 0 && c <= body.readUInt32BE(pendingAt + (i - 1) * PENDING_BYTES))) throw new MapCopyError(`lists pending chunk ${c} out of order or past the ${m.chunkCount} chunks`);
    }

    for (const c of chunks) owner[m.slot[c] ?? 0] = -1;
    for (let i = 0; i < entries; i++) {
      const at = BODY_HEAD_BYTES + i * LOG_ENTRY_BYTES;
      const c = chunks[i] ?? 0;
      const slot = body.readUInt32BE(at + 4);
      owner[slot] = c;
      m.slot[c] = slot;
      m.generation[c] = body.readUInt32BE(at + 8);
      m.epochs[c] = readU64(body, at + 12, `epoch of chunk ${c}`);
    }
    clearPending(m);
    for (let i = 0; i < pendingCount; i++) setPending(m, body.readUInt32BE(pendingAt + i * PENDING_BYTES));
    m.budget = { generation, used };
    m.epoch = head.epoch;
  } finally {
    wipe(body);
  }
}

/** A record's header at `at` of the log, if one is there and names the checkpoint `base`. */
function headOfBase(log: Buffer, at: number, base: number): RecordHead | undefined {
  if (at + LOG_HEADER_BYTES > log.length || !log.subarray(at, at + LOG_MAGIC.length).equals(LOG_MAGIC)) return undefined;
  try {
    const head = parseHead(log.subarray(at, at + LOG_HEADER_BYTES));
    return head.base === base ? head : undefined;
  } catch {
    return undefined;
  }
}

export interface LoadedLog {
  /** Where the next record goes: the end of the last one applied (relative to the log region). */
  end: number;
  /** Records applied. */
  applied: number;
  /** A record that claims the checkpoint but was not applied: reported. */
  problem?: string;
}

/**
 * Applies the log region's records (as read, `log`) to `m`, the checkpoint of epoch `m.epoch`,
 * in order, up to the first one that does not apply (see the top of this file for what is
 * reported). `offset` and `fileName` are for messages; `fellBack`: the checkpoint is the older
 * copy because the newer one fails.
 */
export function applyMapLog(log: Buffer, key: MapKey, m: PositionMap, fileName: string, offset: number, fellBack = false): LoadedLog {
  const base = m.epoch;
  const owner = new Int32Array(m.slotCount).fill(-1);
  for (let c = 0; c < m.chunkCount; c++) owner[m.slot[c] ?? 0] = c;
  let at = 0;
  let applied = 0;
  for (;;) {
    const head = headOfBase(log, at, base);
    let failure: string | undefined;
    if (head !== undefined) {
      const end = at + LOG_HEADER_BYTES + head.length;
      try {
        if (end > log.length) throw new MapCopyError(`claims ${head.length} bytes, past the end of the log`);
        applyLogRecord(log.subarray(at, end), key, m, owner);
        at = end;
        applied++;
        continue;
      } catch (err) {
        if (!(err instanceof MapCopyError)) throw err;
        failure = err.message;
      }
    }
    const later = recordsOfBase(log, at + 1, base);
    const why = later === 0 ? '' : `(a crash tears only the last record: the log was damaged or tampered with${fellBack ? ', or these are what is left of the older checkpoint\'s log' : ''}); the files decode to epoch ${m.epoch}`;
    const where = `${fileName} at offset ${offset + at}`;
    let problem: string | undefined;
    if (head !== undefined && failure !== undefined) {
      problem = later === 0
        ? `the last map log record (${where}, epoch ${head.epoch}) ${failure}: the commit it holds did not happen; the files decode to epoch ${m.epoch}`
        : `map log record (${where}, epoch ${head.epoch}) ${failure}; it and ${plural(later, 'later record')} of the log are not applied ${why}`;
    } else if (later > 0) {
      problem = `the map log stops at ${where} (no record of its checkpoint there), but ${plural(later, 'record')} of that checkpoint follow further on: not applied ${why}`;
    }
    return problem === undefined ? { end: at, applied } : { end: at, applied, problem };
  }
}

function plural(n: number, what: string): string {
  return `${n} ${what}${n === 1 ? '' : 's'}`;
}

/** How many record headers of the checkpoint `base` start at or after `from`, anywhere. */
function recordsOfBase(log: Buffer, from: number, base: number): number {
  let n = 0;
  for (let i = log.indexOf(LOG_MAGIC, from); i >= 0; i = log.indexOf(LOG_MAGIC, i + 1)) if (headOfBase(log, i, base) !== undefined) n++;
  return n;
}

/** Where the map state is: the checkpoint copy, its epoch, and the end of its log. */
export interface MapPlace {
  region: Region;
  baseEpoch: number;
  logEnd: number;
}

/** The committed map of a map file: the newer valid checkpoint with its log applied, and what must be reported. */
export interface LoadedMapState extends MapPlace {
  map: PositionMap;
  notices: string[];
}

export function loadMapState(fd: number, fileName: string, key: MapKey, chunkCount: number, slotCount: number): LoadedMapState {
  const loaded = loadPositionMap(fd, fileName, key, chunkCount, slotCount);
  const baseEpoch = loaded.map.epoch;
  const offset = logOffset(chunkCount);
  const log = applyMapLog(readAt(fd, logRegionBytes(chunkCount), offset, fileName), key, loaded.map, fileName, offset, loaded.fallback !== undefined);
  const notices: string[] = [];
  const fallback = fallbackNotice(loaded, loaded.map.epoch, log.applied > 0);
  if (fallback !== undefined) notices.push(fallback);
  if (log.problem !== undefined) notices.push(log.problem);
  return { map: loaded.map, region: loaded.region, baseEpoch, logEnd: log.end, notices };
}

/**
 * Commits maps to a map file: each as a log record when it fits the rest of the log region, else
 * as a checkpoint into the other copy. The caller wrote (and synced) the slots first; the record's
 * or the checkpoint's fdatasync is the commit point.
 */
export class MapCommitter {
  readonly #place: MapPlace;
  /** Set when a map write failed: what it wrote may be on disk, so the next commit rewrites that copy whole (see commit). */
  #checkpointNext = false;

  constructor(
    private readonly fd: number,
    private readonly fileName: string,
    private readonly key: MapKey,
    place: MapPlace,
  ) {
    this.#place = { region: place.region, baseEpoch: place.baseEpoch, logEnd: place.logEnd };
  }

  /** Commits `next` (which follows `committed`, the map the files decode to now); returns the map bytes written. */
  commit(committed: PositionMap, next: PositionMap): number {
    if (next.epoch <= committed.epoch) throw new VbdError(`internal: committing epoch ${next.epoch} after ${committed.epoch}`);
    const place = this.#place;
    const n = next.chunkCount;
    const changed = changedChunks(committed, next);
    const bytes = logRecordBytes(changed.length, next.pendingCount);
    try {
      if (!this.#checkpointNext && place.logEnd + bytes <= logRegionBytes(n)) {
        const record = sealLogRecord(this.key, place.baseEpoch, committed.epoch, next, changed);
        writeAt(this.fd, record, logOffset(n) + place.logEnd, `${this.fileName} (map log, epoch ${next.epoch})`);
        datasync(this.fd, this.fileName);
        place.logEnd += record.length;
        return record.length;
      }
      // A checkpoint goes into the copy that does not hold the current one, which stays whole,
      // with its log, until this write is durable.
      const region: Region = place.region === 0 ? 1 : 0;
      const written = writePositionMap(this.fd, this.fileName, this.key, next, region);
      Object.assign(place, { region, baseEpoch: next.epoch, logEnd: 0 });
      this.#checkpointNext = false;
      return written;
    } catch (err) {
      // A failed write may still reach the disk: a checkpoint newer than the records appended
      // after it would hide them at the next open, so the next commit overwrites it with one.
      this.#checkpointNext = true;
      throw err;
    }
  }

  /** For tests and reports: the checkpoint copy in use, its epoch, and the end of its log. */
  get place(): MapPlace & { copy: (typeof COPY_NAMES)[number] } {
    return { ...this.#place, copy: COPY_NAMES[this.#place.region] };
  }
}
