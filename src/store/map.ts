// The position map of a sealed volume (docs/FORMAT.md, "Position map"): logical chunk → slot,
// write epoch and key generation, plus the nonce budget of the key generation new slots are
// sealed under. It lives in the map file of the volume directory:
//
//   [reservation page: record 0 at 0, record 1 at 512] [map copy A] [map copy B] [map log]
//
// Each copy (a checkpoint) is the whole map, sealed with AES-256-GCM under the map key; its
// cleartext header (epoch, counts) is authenticated with it. A checkpoint is written into the copy
// that does not hold the current one, so a torn or lost write leaves the other; the newer valid
// copy wins and using the older because the newer fails is reported. Between checkpoints, commits
// append sealed records of what changed to the map log (src/store/map-log.ts). The reservation
// records say which epochs and how many seals a commit under way may have used, so neither is
// ever used twice, even after a crash (they are written, and synced, before the first slot of a
// commit).
//
// Pure format + positioned I/O on an fd the caller opened: no paths here.

import { readExactly, readFully } from '../common/fd.js';
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { fdatasyncSync, writeSync } from 'node:fs';
import { VbdError, failure } from '../common/errors.js';
import { wipe } from './keys.js';
import { NONCE_BYTES, TAG_BYTES, type NonceBudgetState } from './slot.js';

/** 2: checkpoints and a log of deltas (1 wrote the whole map at every commit; not read any more). */
export const MAP_FORMAT_VERSION = 2;
export const MAP_MAGIC = Buffer.from('VBDSMAP\0', 'ascii');
export const RESERVE_MAGIC = Buffer.from('VBDSRSV\0', 'ascii');
export const MAP_AD_LABEL = 'vbd-shadow/map';
export const RESERVE_AD_LABEL = 'vbd-shadow/reserve';

/** The reservation page, and the alignment of each map copy. */
export const MAP_PAGE = 4096;
export const MAP_HEADER_BYTES = 64;
/** Bytes of the header the map AD covers: magic … payload length (before nonce and tag). */
const MAP_HEADER_AD_BYTES = 36;
/** Per chunk: slot u32 ‖ key generation u32 ‖ epoch u64. */
export const MAP_ENTRY_BYTES = 16;
/** The nonce budget at the head of the payload: generation u32 ‖ seals used u64. */
const BUDGET_BYTES = 12;
export const RESERVE_RECORD_BYTES = 64;
export const RESERVE_OFFSETS = [0, 512] as const;
const RESERVE_PLAIN_BYTES = 20;
export const COPY_NAMES = ['A', 'B'] as const;

export type Region = 0 | 1;

/** The key that seals map copies and reservations, and the volume it belongs to. */
export interface MapKey {
  key: Buffer;
  uuid: Buffer;
}

export interface PositionMap {
  /** The commit that wrote this copy. Every commit takes a fresh, larger epoch. */
  epoch: number;
  chunkCount: number;
  slotCount: number;
  /** Per chunk: its slot (slots are numbered file by file, C + 28 bytes each). */
  slot: Uint32Array;
  /** Per chunk: the epoch its slot was sealed in (part of the slot's AD). */
  epochs: Float64Array;
  /** Per chunk: the key generation its slot was sealed under. */
  generation: Uint32Array;
  /** Bitmap: chunks whose new slot still waits in the overflow journal (docs/FORMAT.md). */
  pending: Uint8Array;
  pendingCount: number;
  /** Seals made under the key generation new slots use. */
  budget: NonceBudgetState;
}

/** What a reservation covers: no epoch above epochHigh, no seal count above sealsHigh. */
export interface Reservation {
  epochHigh: number;
  generation: number;
  sealsHigh: number;
}

export function mapPayloadBytes(chunkCount: number): number {
  return BUDGET_BYTES + chunkCount * MAP_ENTRY_BYTES + Math.ceil(chunkCount / 8);
}

/** Bytes of one map copy's region: header and sealed payload, rounded up to whole pages. */
export function mapRegionBytes(chunkCount: number): number {
  return Math.ceil((MAP_HEADER_BYTES + mapPayloadBytes(chunkCount)) / MAP_PAGE) * MAP_PAGE;
}

/**
 * Bytes of the map log's region: as large as one copy, so that the records between two
 * checkpoints never add up to more than a checkpoint costs (a commit writes at most twice its
 * delta, amortised).
 */
export function logRegionBytes(chunkCount: number): number {
  return mapRegionBytes(chunkCount);
}

/** Where the map log's region starts: after the two copies. */
export function logOffset(chunkCount: number): number {
  return MAP_PAGE + 2 * mapRegionBytes(chunkCount);
}

/** The map file's size: the reservation page, two copies and the log. */
export function mapFileBytes(chunkCount: number): number {
  return logOffset(chunkCount) + logRegionBytes(chunkCount);
}

export function regionOffset(chunkCount: number, region: Region): number {
  return MAP_PAGE + region * mapRegionBytes(chunkCount);
}

export function newPositionMap(chunkCount: number, slotCount: number): PositionMap {
  return {
    epoch: 0, chunkCount, slotCount,
    slot: new Uint32Array(chunkCount), epochs: new Float64Array(chunkCount), generation: new Uint32Array(chunkCount),
    pending: new Uint8Array(Math.ceil(chunkCount / 8)), pendingCount: 0, budget: { generation: 0, used: 0 },
  };
}

export function clonePositionMap(m: PositionMap): PositionMap {
  return {
    ...m, slot: m.slot.slice(), epochs: m.epochs.slice(), generation: m.generation.slice(),
    pending: m.pending.slice(), budget: { ...m.budget },
  };
}

export function isPending(m: PositionMap, chunk: number): boolean {
  return ((m.pending[chunk >> 3] ?? 0) & (1 << (chunk & 7))) !== 0;
}

export function setPending(m: PositionMap, chunk: number): void {
  const i = chunk >> 3;
  const bit = 1 << (chunk & 7);
  if (((m.pending[i] ?? 0) & bit) === 0) {
    m.pending[i] = (m.pending[i] ?? 0) | bit;
    m.pendingCount += 1;
  }
}

export function clearPending(m: PositionMap): void {
  m.pending.fill(0);
  m.pendingCount = 0;
}

/** The pending chunks in ascending order: the i-th one's slot is the i-th slot of the journal. */
export function pendingChunks(m: PositionMap): Uint32Array {
  const out = new Uint32Array(m.pendingCount);
  let n = 0;
  for (let c = 0; c < m.chunkCount && n < out.length; c++) if (isPending(m, c)) out[n++] = c;
  return out;
}

export function label(text: string): Buffer {
  return Buffer.from(`${text}\0`, 'ascii');
}

function mapAD(key: MapKey, headerStart: Buffer): Buffer {
  return Buffer.concat([label(MAP_AD_LABEL), key.uuid, headerStart]);
}

/** Why a sealed map copy or map log record fails its tag: what cannot be told apart. */
export const AUTH_FAILURE = 'fails authentication (corrupted, tampered with, torn by a crash, or of another volume)';

/** A map copy (or map log record) that cannot be used, and why. */
export class MapCopyError extends VbdError {}

export function u64(buf: Buffer, at: number, value: number): void {
  buf.writeBigUInt64BE(BigInt(value), at);
}

export function readU64(buf: Buffer, at: number, what: string): number {
  const v = buf.readBigUInt64BE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new MapCopyError(`${what} ${v} is out of range`);
  return Number(v);
}

/** The sealed copy: header (64) ‖ ciphertext of the payload. */
export function sealPositionMap(m: PositionMap, key: MapKey): Buffer {
  const n = m.chunkCount;
  const payload = Buffer.alloc(mapPayloadBytes(n));
  try {
    payload.writeUInt32BE(m.budget.generation, 0);
    u64(payload, 4, m.budget.used);
    for (let c = 0; c < n; c++) {
      const at = BUDGET_BYTES + c * MAP_ENTRY_BYTES;
      payload.writeUInt32BE(m.slot[c] ?? 0, at);
      payload.writeUInt32BE(m.generation[c] ?? 0, at + 4);
      u64(payload, at + 8, m.epochs[c] ?? 0);
    }
    Buffer.from(m.pending.buffer, m.pending.byteOffset, m.pending.byteLength).copy(payload, BUDGET_BYTES + n * MAP_ENTRY_BYTES);
    const out = Buffer.alloc(MAP_HEADER_BYTES + payload.length);
    MAP_MAGIC.copy(out, 0);
    out.writeUInt32BE(MAP_FORMAT_VERSION, 8);
    u64(out, 12, m.epoch);
    out.writeUInt32BE(n, 20);
    out.writeUInt32BE(m.slotCount, 24);
    out.writeUInt32BE(m.pendingCount, 28);
    out.writeUInt32BE(payload.length, 32);
    const nonce = randomBytes(NONCE_BYTES);
    nonce.copy(out, MAP_HEADER_AD_BYTES);
    const cipher = createCipheriv('aes-256-gcm', key.key, nonce, { authTagLength: TAG_BYTES });
    cipher.setAAD(mapAD(key, out.subarray(0, MAP_HEADER_AD_BYTES)));
    const ct = cipher.update(payload);
    cipher.final();
    ct.copy(out, MAP_HEADER_BYTES);
    cipher.getAuthTag().copy(out, MAP_HEADER_AD_BYTES + NONCE_BYTES);
    return out;
  } finally {
    wipe(payload);
  }
}

/**
 * Opens a sealed copy (as read from its region) for a volume of `chunkCount` chunks and
 * `slotCount` slots. Refuses anything that does not authenticate or does not describe a
 * bijection of the chunks onto distinct slots.
 */
export function openPositionMap(region: Buffer, key: MapKey, chunkCount: number, slotCount: number): PositionMap {
  if (region.length < MAP_HEADER_BYTES) throw new MapCopyError('too short');
  if (!region.subarray(0, 8).equals(MAP_MAGIC)) throw new MapCopyError(region.subarray(0, MAP_HEADER_BYTES).every((b) => b === 0) ? 'never written (zeros)' : 'not a map copy (bad magic)');
  const version = region.readUInt32BE(8);
  if (version !== MAP_FORMAT_VERSION) throw new MapCopyError(`map format ${version}, expected ${MAP_FORMAT_VERSION}`);
  const epoch = readU64(region, 12, 'epoch');
  const n = region.readUInt32BE(20);
  const slots = region.readUInt32BE(24);
  const pendingCount = region.readUInt32BE(28);
  const length = region.readUInt32BE(32);
  if (n !== chunkCount || slots !== slotCount) throw new MapCopyError(`it describes ${n} chunks in ${slots} slots, the manifest ${chunkCount} in ${slotCount}`);
  if (length !== mapPayloadBytes(n) || region.length < MAP_HEADER_BYTES + length) throw new MapCopyError(`payload length ${length} does not fit ${n} chunks`);
  const decipher = createDecipheriv('aes-256-gcm', key.key, region.subarray(MAP_HEADER_AD_BYTES, MAP_HEADER_AD_BYTES + NONCE_BYTES), { authTagLength: TAG_BYTES });
  decipher.setAAD(mapAD(key, region.subarray(0, MAP_HEADER_AD_BYTES)));
  decipher.setAuthTag(region.subarray(MAP_HEADER_AD_BYTES + NONCE_BYTES, MAP_HEADER_BYTES));
  const payload = decipher.update(region.subarray(MAP_HEADER_BYTES, MAP_HEADER_BYTES + length));
  try {
    try {
      decipher.final();
    } catch {
      throw new MapCopyError(AUTH_FAILURE);
    }
    const m = newPositionMap(n, slots);
    m.epoch = epoch;
    m.budget = { generation: payload.readUInt32BE(0), used: readU64(payload, 4, 'seal count') };
    const seen = new Uint8Array(Math.ceil(slots / 8));
    for (let c = 0; c < n; c++) {
      const at = BUDGET_BYTES + c * MAP_ENTRY_BYTES;
      const slot = payload.readUInt32BE(at);
      const generation = payload.readUInt32BE(at + 4);
      const e = readU64(payload, at + 8, `epoch of chunk ${c}`);
      if (slot >= slots) throw new MapCopyError(`chunk ${c} is in slot ${slot}, past the ${slots} slots`);
      const bit = 1 << (slot & 7);
      if (((seen[slot >> 3] ?? 0) & bit) !== 0) throw new MapCopyError(`slot ${slot} holds two chunks (the second is chunk ${c})`);
      seen[slot >> 3] = (seen[slot >> 3] ?? 0) | bit;
      if (e > epoch) throw new MapCopyError(`chunk ${c} has epoch ${e}, after the map's own ${epoch}`);
      if (generation > m.budget.generation) throw new MapCopyError(`chunk ${c} has key generation ${generation}, after the map's ${m.budget.generation}`);
      m.slot[c] = slot;
      m.generation[c] = generation;
      m.epochs[c] = e;
    }
    payload.copy(m.pending, 0, BUDGET_BYTES + n * MAP_ENTRY_BYTES);
    let count = 0;
    for (let c = 0; c < n; c++) if (isPending(m, c)) count++;
    const spare = n % 8 === 0 ? 0 : (m.pending[m.pending.length - 1] ?? 0) >> (n % 8);
    if (count !== pendingCount || spare !== 0) throw new MapCopyError(`its pending bitmap holds ${count} chunks, its header says ${pendingCount}`);
    m.pendingCount = count;
    return m;
  } finally {
    wipe(payload);
  }
}

export function readAt(fd: number, length: number, position: number, what: string): Buffer {
  const buf = Buffer.alloc(length);
  readExactly(fd, buf, length, position, what);
  return buf;
}

export function writeAt(fd: number, buf: Buffer, position: number, what: string): void {
  let done = 0;
  while (done < buf.length) {
    try {
      done += writeSync(fd, buf, done, buf.length - done, position + done);
    } catch (err) {
      throw failure(`write of ${what} at offset ${position + done}`, err);
    }
  }
}

export function datasync(fd: number, what: string): void {
  try {
    fdatasyncSync(fd);
  } catch (err) {
    throw failure(`fdatasync of ${what}`, err);
  }
}

export interface CopyState {
  region: Region;
  /** 'A' or 'B', and where it is, for messages. */
  name: string;
  offset: number;
  epoch?: number;
  problem?: string;
}

export interface LoadedMap {
  map: PositionMap;
  region: Region;
  copies: [CopyState, CopyState];
  /** Set when the newest valid copy is not the only valid one because the other failed: reported. */
  fallback?: string;
}

/**
 * Reads both copies and takes the newer valid one. A copy that fails is reported in `fallback`
 * (the one sentence the CLI prints): whether it held a newer commit cannot be known, so the
 * report says the last commit may be lost. Refuses when neither copy is valid.
 */
export function loadPositionMap(fd: number, fileName: string, key: MapKey, chunkCount: number, slotCount: number): LoadedMap {
  const size = MAP_HEADER_BYTES + mapPayloadBytes(chunkCount);
  const states: CopyState[] = [];
  const maps: (PositionMap | undefined)[] = [];
  for (const region of [0, 1] as const) {
    const offset = regionOffset(chunkCount, region);
    const state: CopyState = { region, name: `map ${COPY_NAMES[region]} (${fileName} at offset ${offset})`, offset };
    try {
      const m = openPositionMap(readAt(fd, size, offset, fileName), key, chunkCount, slotCount);
      state.epoch = m.epoch;
      maps.push(m);
    } catch (err) {
      if (!(err instanceof MapCopyError)) throw err;
      state.problem = err.message;
      maps.push(undefined);
    }
    states.push(state);
  }
  const [a, b] = states as [CopyState, CopyState];
  const [ma, mb] = maps;
  if (ma === undefined && mb === undefined) {
    throw new VbdError(`no valid position map: ${a.name} ${a.problem}; ${b.name} ${b.problem}; the volume cannot be decoded (nothing was read or written)`);
  }
  let region: Region;
  if (ma !== undefined && mb !== undefined) {
    if (ma.epoch === mb.epoch) throw new VbdError(`${a.name} and ${b.name} both claim epoch ${ma.epoch}: tampered with (nothing was read or written)`);
    region = ma.epoch > mb.epoch ? 0 : 1;
  } else {
    region = ma !== undefined ? 0 : 1;
  }
  const map = (region === 0 ? ma : mb) as PositionMap;
  const loaded: LoadedMap = { map, region, copies: [a, b] };
  const fallback = fallbackNotice(loaded, map.epoch, false);
  if (fallback !== undefined) loaded.fallback = fallback;
  return loaded;
}

/**
 * The sentence that reports using one copy because the other fails (undefined when it does not),
 * naming the epoch the files decode to (`epoch`: the copy's own, or the end of its map log).
 */
export function fallbackNotice(loaded: LoadedMap, epoch: number, withLog: boolean): string | undefined {
  const used = loaded.copies[loaded.region];
  const other = loaded.copies[loaded.region === 0 ? 1 : 0];
  if (other.problem === undefined) return undefined;
  return `${other.name} ${other.problem}; using ${used.name}${withLog ? ' and the map log after it' : ''}, epoch ${epoch} (if the failed copy held a later commit, that commit is lost)`;
}

/** Writes `m` as the copy in `region` and makes it durable (fdatasync); returns the bytes written. */
export function writePositionMap(fd: number, fileName: string, key: MapKey, m: PositionMap, region: Region): number {
  const sealed = sealPositionMap(m, key);
  writeAt(fd, sealed, regionOffset(m.chunkCount, region), `${fileName} (map ${COPY_NAMES[region]})`);
  datasync(fd, fileName);
  return sealed.length;
}

/**
 * Refuses, with one line, a map file written in another map format, before its size or its copies
 * are judged (a format-1 file has no log, so it would otherwise read as truncated or damaged).
 * Either copy's header tells: a copy with our magic and another version.
 */
export function checkMapFormat(fd: number, fileName: string, chunkCount: number): void {
  for (const region of [0, 1] as const) {
    const offset = MAP_PAGE + region * mapRegionBytes(chunkCount);
    const head = readFully(fd, 12, offset);
    if (head === undefined || !head.subarray(0, 8).equals(MAP_MAGIC)) continue;
    const version = head.readUInt32BE(8);
    if (version !== MAP_FORMAT_VERSION) {
      throw new VbdError(`${fileName} is position map format ${version} (map ${COPY_NAMES[region]} at offset ${offset}); this version of vbd-shadow reads only format ${MAP_FORMAT_VERSION} (the sealed format is not stable yet: export the volume with the version that wrote it, then init and import); nothing was read or written`);
    }
  }
}

function reserveAD(key: MapKey): Buffer {
  const head = Buffer.alloc(12);
  RESERVE_MAGIC.copy(head, 0);
  head.writeUInt32BE(MAP_FORMAT_VERSION, 8);
  return Buffer.concat([label(RESERVE_AD_LABEL), key.uuid, head]);
}

/** magic(8) ‖ version u32 ‖ nonce(12) ‖ tag(16) ‖ ciphertext of epochHigh u64 ‖ generation u32 ‖ sealsHigh u64, zero-padded to 64. */
export function sealReservation(r: Reservation, key: MapKey): Buffer {
  const plain = Buffer.alloc(RESERVE_PLAIN_BYTES);
  u64(plain, 0, r.epochHigh);
  plain.writeUInt32BE(r.generation, 8);
  u64(plain, 12, r.sealsHigh);
  const out = Buffer.alloc(RESERVE_RECORD_BYTES);
  RESERVE_MAGIC.copy(out, 0);
  out.writeUInt32BE(MAP_FORMAT_VERSION, 8);
  const nonce = randomBytes(NONCE_BYTES);
  nonce.copy(out, 12);
  const cipher = createCipheriv('aes-256-gcm', key.key, nonce, { authTagLength: TAG_BYTES });
  cipher.setAAD(reserveAD(key));
  cipher.update(plain).copy(out, 12 + NONCE_BYTES + TAG_BYTES);
  cipher.final();
  cipher.getAuthTag().copy(out, 12 + NONCE_BYTES);
  return out;
}

export function openReservation(record: Buffer, key: MapKey): Reservation {
  if (!record.subarray(0, 8).equals(RESERVE_MAGIC) || record.readUInt32BE(8) !== MAP_FORMAT_VERSION) throw new MapCopyError('not a reservation record');
  const decipher = createDecipheriv('aes-256-gcm', key.key, record.subarray(12, 12 + NONCE_BYTES), { authTagLength: TAG_BYTES });
  decipher.setAAD(reserveAD(key));
  decipher.setAuthTag(record.subarray(12 + NONCE_BYTES, 12 + NONCE_BYTES + TAG_BYTES));
  const start = 12 + NONCE_BYTES + TAG_BYTES;
  const plain = decipher.update(record.subarray(start, start + RESERVE_PLAIN_BYTES));
  try {
    decipher.final();
  } catch {
    throw new MapCopyError('fails authentication');
  }
  return { epochHigh: readU64(plain, 0, 'reserved epoch'), generation: plain.readUInt32BE(8), sealsHigh: readU64(plain, 12, 'reserved seal count') };
}

export interface LoadedReservation {
  /** The newest valid record (largest epochHigh) and where it is. */
  newest?: { reservation: Reservation; index: Region };
  /** Records that are neither valid nor never written. */
  problems: string[];
}

export function loadReservation(fd: number, fileName: string, key: MapKey): LoadedReservation {
  const out: LoadedReservation = { problems: [] };
  for (const index of [0, 1] as const) {
    const offset = RESERVE_OFFSETS[index];
    const record = readAt(fd, RESERVE_RECORD_BYTES, offset, fileName);
    if (record.every((b) => b === 0)) continue;
    try {
      const r = openReservation(record, key);
      if (out.newest === undefined || r.epochHigh > out.newest.reservation.epochHigh) out.newest = { reservation: r, index };
    } catch (err) {
      if (!(err instanceof MapCopyError)) throw err;
      out.problems.push(`epoch reservation ${index} (${fileName} at offset ${offset}) ${err.message}`);
    }
  }
  return out;
}

/** Writes a reservation record at `index` and makes it durable, before anything it covers is written. */
export function writeReservation(fd: number, fileName: string, key: MapKey, r: Reservation, index: Region): void {
  writeAt(fd, sealReservation(r, key), RESERVE_OFFSETS[index], `${fileName} (epoch reservation ${index})`);
  datasync(fd, fileName);
}
