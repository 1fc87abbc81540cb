// The flush journal, `vbd-shadow.journal` in the volume directory: one batch at a time,
//
//   header (64 B)  magic "VBDJRNL1", seq, count, chunkSize, xxh64(entries)
//   entries        count × { file u32, pad u32, offset u64, xxh64(data) u64 }  (24 B each)
//   payload        count × chunkSize bytes, in entry order
//   commit (64 B)  magic "VBDCOMIT", seq, count, xxh64(header ‖ entries)
//
// written and fdatasync'ed before any backing file is touched, then applied, then retired
// (magic zeroed, synced). The file is overwritten in place, never truncated, so a flush pays
// no metadata commit. At recovery a batch counts as committed only if its header, commit
// record and every chunk's hash verify; then it is applied again (idempotent), otherwise
// discarded — the files never hold a mix of two flushes.

import { closeSync, fchownSync, fdatasyncSync, fstatSync, openSync, writeSync, constants as fsc } from 'node:fs';
import { xxh64 } from '@node-rs/xxhash';
import { VbdError, errnoCode, failure } from '../common/errors.js';
import { readFully } from '../common/fd.js';
import { JOURNAL_NAME, entryPath, type Volume } from '../volume/volume.js';

const HEADER_MAGIC = Buffer.from('VBDJRNL1');
const COMMIT_MAGIC = Buffer.from('VBDCOMIT');
const HEADER_BYTES = 64;
const ENTRY_BYTES = 24;
const COMMIT_BYTES = 64;
const MAX_ENTRIES = 2 ** 26;

/** One chunk of a batch: where it goes, and its data. */
export interface JournalEntry {
  file: number;
  offset: number;
  data: Buffer;
}

export interface Batch {
  seq: number;
  chunkSize: number;
  entries: JournalEntry[];
}

/** Opens (creating if needed, owned by the volume owner) the journal, through the volume's directory fd. */
export function openJournal(volume: Volume): number {
  const path = entryPath(volume, JOURNAL_NAME);
  let fd: number;
  try {
    fd = openSync(path, fsc.O_RDWR | fsc.O_NOFOLLOW);
  } catch (err) {
    if (errnoCode(err) !== 'ENOENT') throw failure(`cannot open journal '${JOURNAL_NAME}'`, err);
    try {
      fd = openSync(path, fsc.O_RDWR | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
      fchownSync(fd, volume.owner.uid, volume.owner.gid);
    } catch (err2) {
      throw failure(`cannot create journal '${JOURNAL_NAME}'`, err2);
    }
  }
  const st = fstatSync(fd);
  if (!st.isFile() || st.uid !== volume.owner.uid || st.nlink !== 1) {
    closeSync(fd);
    throw new VbdError(`journal '${JOURNAL_NAME}' must be a regular file owned by the volume owner with one link`);
  }
  return fd;
}

function header(seq: number, count: number, chunkSize: number, entries: Buffer): Buffer {
  const h = Buffer.alloc(HEADER_BYTES);
  HEADER_MAGIC.copy(h, 0);
  h.writeUInt32LE(1, 8); // format
  h.writeBigUInt64LE(BigInt(seq), 16);
  h.writeUInt32LE(count, 24);
  h.writeUInt32LE(chunkSize, 28);
  h.writeBigUInt64LE(xxh64(entries), 32);
  return h;
}

function commit(seq: number, count: number, head: Buffer, entries: Buffer): Buffer {
  const c = Buffer.alloc(COMMIT_BYTES);
  COMMIT_MAGIC.copy(c, 0);
  c.writeBigUInt64LE(BigInt(seq), 16);
  c.writeUInt32LE(count, 24);
  c.writeBigUInt64LE(xxh64(Buffer.concat([head, entries])), 32);
  return c;
}

function writeFully(fd: number, data: Buffer, position: number): void {
  let done = 0;
  while (done < data.length) done += writeSync(fd, data, done, data.length - done, position + done);
}

/** Writes a whole batch and syncs it: after this returns, the batch survives a crash. */
export function writeBatch(fd: number, batch: Batch): number {
  const count = batch.entries.length;
  const entries = Buffer.alloc(count * ENTRY_BYTES);
  batch.entries.forEach((e, i) => {
    entries.writeUInt32LE(e.file, i * ENTRY_BYTES);
    entries.writeBigUInt64LE(BigInt(e.offset), i * ENTRY_BYTES + 8);
    entries.writeBigUInt64LE(xxh64(e.data), i * ENTRY_BYTES + 16);
  });
  const head = header(batch.seq, count, batch.chunkSize, entries);
  let at = 0;
  try {
    writeFully(fd, head, at);
    at += HEADER_BYTES;
    writeFully(fd, entries, at);
    at += entries.length;
    for (const e of batch.entries) {
      writeFully(fd, e.data, at);
      at += e.data.length;
    }
    writeFully(fd, commit(batch.seq, count, head, entries), at);
    at += COMMIT_BYTES;
    fdatasyncSync(fd);
  } catch (err) {
    throw failure(`write of journal '${JOURNAL_NAME}' (${count} chunks)`, err);
  }
  return at;
}

/** Marks the journal empty (the batch is in the files). */
export function retireJournal(fd: number): void {
  try {
    writeFully(fd, Buffer.alloc(HEADER_MAGIC.length), 0);
    fdatasyncSync(fd);
  } catch (err) {
    throw failure(`retire of journal '${JOURNAL_NAME}'`, err);
  }
}

export type JournalState =
  | { kind: 'empty' }
  | { kind: 'uncommitted'; reason: string }
  | { kind: 'committed'; batch: Batch };

/**
 * Reads the journal's batch and checks everything: a batch whose commit record, header or any
 * chunk does not verify was interrupted before it was synced, and is reported uncommitted.
 * Entries are checked against the volume (file index, alignment, bounds) as well.
 */
export function readJournal(fd: number, volume: Pick<Volume, 'manifest'>): JournalState {
  const head = readFully(fd, HEADER_BYTES, 0);
  if (head === undefined || !head.subarray(0, 8).equals(HEADER_MAGIC)) return { kind: 'empty' };
  const seq = Number(head.readBigUInt64LE(16));
  const count = head.readUInt32LE(24);
  const chunkSize = head.readUInt32LE(28);
  if (head.readUInt32LE(8) !== 1 || count > MAX_ENTRIES || chunkSize !== volume.manifest.chunkSize) {
    return { kind: 'uncommitted', reason: 'header does not match this volume' };
  }
  const entries = readFully(fd, count * ENTRY_BYTES, HEADER_BYTES);
  if (entries === undefined || xxh64(entries) !== head.readBigUInt64LE(32)) return { kind: 'uncommitted', reason: 'entry table incomplete' };
  const payloadAt = HEADER_BYTES + count * ENTRY_BYTES;
  const tail = readFully(fd, COMMIT_BYTES, payloadAt + count * chunkSize);
  const expected = commit(seq, count, head, entries);
  if (tail === undefined || !tail.equals(expected)) return { kind: 'uncommitted', reason: 'no commit record' };
  const list: JournalEntry[] = [];
  for (let i = 0; i < count; i++) {
    const file = entries.readUInt32LE(i * ENTRY_BYTES);
    const offset = Number(entries.readBigUInt64LE(i * ENTRY_BYTES + 8));
    const size = volume.manifest.files[file]?.size;
    if (size === undefined || offset % chunkSize !== 0 || offset + chunkSize > size) {
      throw new VbdError(`journal '${JOURNAL_NAME}' entry ${i} points outside the volume (file ${file}, offset ${offset}); refusing to apply it`);
    }
    const data = readFully(fd, chunkSize, payloadAt + i * chunkSize);
    if (data === undefined || xxh64(data) !== entries.readBigUInt64LE(i * ENTRY_BYTES + 16)) {
      return { kind: 'uncommitted', reason: `chunk ${i} of the batch does not verify` };
    }
    list.push({ file, offset, data });
  }
  return { kind: 'committed', batch: { seq, chunkSize, entries: list } };
}

/** Whether the journal holds a batch (an interrupted flush) — checked read-only. */
export function journalPending(volume: Volume): boolean {
  let fd: number;
  try {
    fd = openSync(entryPath(volume, JOURNAL_NAME), fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return false;
    throw failure(`cannot read journal '${JOURNAL_NAME}'`, err);
  }
  try {
    const magic = readFully(fd, HEADER_MAGIC.length, 0);
    return magic !== undefined && magic.equals(HEADER_MAGIC);
  } finally {
    closeSync(fd);
  }
}

/**
 * What the journal says, for `inspect` (read-only): no journal yet; empty (the last batch was
 * applied and retired: its number in its session, and when); a batch waiting for recovery
 * (complete: applied by the next start or recover) or torn (discarded there).
 */
export type JournalSummary =
  | { state: 'none' }
  | { state: 'empty'; lastBatch: number | undefined; at: Date }
  | { state: 'pending'; batch: number; chunks: number }
  | { state: 'torn'; reason: string };

export function journalSummary(volume: Pick<Volume, 'dirFd' | 'manifest'>): JournalSummary {
  let fd: number;
  try {
    fd = openSync(entryPath(volume, JOURNAL_NAME), fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return { state: 'none' };
    throw failure(`cannot read journal '${JOURNAL_NAME}'`, err);
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new VbdError(`journal '${JOURNAL_NAME}' is not a regular file`);
    const head = readFully(fd, HEADER_BYTES, 0);
    if (head === undefined || !head.subarray(0, 8).equals(HEADER_MAGIC)) {
      // Retired: only the magic was zeroed; the rest of the last header is still there.
      const retired = head !== undefined && head.readUInt32LE(8) === 1 && head.readUInt32LE(28) === volume.manifest.chunkSize;
      return { state: 'empty', lastBatch: retired ? Number(head.readBigUInt64LE(16)) : undefined, at: st.mtime };
    }
    const found = readJournal(fd, volume);
    if (found.kind === 'committed') return { state: 'pending', batch: found.batch.seq, chunks: found.batch.entries.length };
    return { state: 'torn', reason: found.kind === 'uncommitted' ? found.reason : 'empty' };
  } finally {
    closeSync(fd);
  }
}
