// The map log with real AES-256-GCM on a real map file: records between checkpoints, torn and
// damaged records, reordered and replayed ones, checkpoints and what a crash around them leaves.

import { randomBytes, randomInt } from 'node:crypto';
import { closeSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  LOG_HEADER_BYTES, MapCommitter, loadMapState, logRecordBytes, sealLogRecord, changedChunks, type LoadedMapState,
} from '../../src/store/map-log.js';
import {
  clonePositionMap, logOffset, logRegionBytes, mapFileBytes, mapRegionBytes, newPositionMap, regionOffset, setPending, clearPending,
  writePositionMap, type MapKey, type PositionMap,
} from '../../src/store/map.js';
import { tempDir } from '../helpers/tmp.js';

const key: MapKey = { key: randomBytes(32), uuid: randomBytes(16) };
const N = 100;
const T = 130;
const NAME = 'vbd-shadow.map';

/** A map file as init leaves it: A at epoch 1, B at epoch 2 (the same map), an empty log. */
class MapFile {
  readonly path = join(tempDir(), NAME);
  readonly fd: number;
  readonly committer: MapCommitter;
  /** Every committed map, by epoch. */
  readonly maps = new Map<number, PositionMap>();
  current: PositionMap;

  constructor() {
    writeFileSync(this.path, Buffer.alloc(mapFileBytes(N)));
    this.fd = openSync(this.path, 'r+');
    const m = newPositionMap(N, T);
    for (let c = 0; c < N; c++) m.slot[c] = c;
    m.epochs.fill(1);
    m.epoch = 1;
    writePositionMap(this.fd, NAME, key, m, 0);
    m.epoch = 2;
    writePositionMap(this.fd, NAME, key, m, 1);
    this.current = m;
    this.maps.set(2, clonePositionMap(m));
    this.committer = new MapCommitter(this.fd, NAME, key, { region: 1, baseEpoch: 2, logEnd: 0 });
  }

  /** A commit that moves `k` random chunks into free slots (and marks `pending` chunks pending); returns the map bytes written. */
  commit(k: number, pending: number[] = []): number {
    const next = clonePositionMap(this.current);
    next.epoch = this.current.epoch + 1 + randomInt(3); // epochs skip what failed attempts reserved
    const used = new Set(next.slot);
    const free = Array.from({ length: T }, (_, s) => s).filter((s) => !used.has(s));
    const chunks = new Set<number>();
    while (chunks.size < k) chunks.add(randomInt(N));
    let i = 0;
    for (const c of chunks) {
      next.slot[c] = free[i++] ?? 0;
      next.epochs[c] = next.epoch;
    }
    clearPending(next);
    for (const c of pending) setPending(next, c);
    next.budget = { generation: 0, used: next.budget.used + k };
    const bytes = this.committer.commit(this.current, next);
    this.current = next;
    this.maps.set(next.epoch, clonePositionMap(next));
    return bytes;
  }

  /** Commits of these sizes on a fresh log; where each record ends and the epochs, from the checkpoint's on. */
  commits(sizes: number[]): { ends: number[]; epochs: number[] } {
    const ends = [this.committer.place.logEnd];
    const epochs = [this.current.epoch];
    for (const k of sizes) {
      this.commit(k);
      ends.push(this.committer.place.logEnd);
      epochs.push(this.current.epoch);
    }
    return { ends, epochs };
  }

  load(): LoadedMapState {
    return loadMapState(this.fd, NAME, key, N, T);
  }

  bytes(): Buffer {
    return readFileSync(this.path);
  }

  put(bytes: Buffer): void {
    writeFileSync(this.path, bytes);
  }

  close(): void {
    closeSync(this.fd);
  }
}

/** Loads and checks the files decode to exactly the map of `epoch`; returns the notices. */
function expectEpoch(f: MapFile, epoch: number): string[] {
  const loaded = f.load();
  expect(loaded.map.epoch).toBe(epoch);
  expect(loaded.map).toEqual(f.maps.get(epoch));
  return loaded.notices;
}

const LOG = logOffset(N);

describe('map log', () => {
  it('round trip through records and checkpoints: after every commit the files decode to it, silently', () => {
    const f = new MapFile();
    try {
      let checkpoints = 0;
      for (let i = 0; i < 80; i++) {
        const k = 1 + randomInt(12);
        const pending = i % 7 === 3 ? [4, 50, 99] : [];
        const before = f.committer.place;
        const bytes = f.commit(k, pending);
        const after = f.committer.place;
        if (after.baseEpoch !== before.baseEpoch) {
          checkpoints++;
          expect(after.region).not.toBe(before.region);
          expect(after.logEnd).toBe(0);
          expect(bytes).toBeGreaterThan(logRecordBytes(k, pending.length));
        } else {
          expect(bytes).toBe(logRecordBytes(k, pending.length));
          expect(after.logEnd).toBe(before.logEnd + bytes);
        }
        const loaded = f.load();
        expect(loaded.notices).toEqual([]);
        expect(loaded.map).toEqual(f.current);
        expect({ region: loaded.region, baseEpoch: loaded.baseEpoch, logEnd: loaded.logEnd }).toEqual({ region: after.region, baseEpoch: after.baseEpoch, logEnd: after.logEnd });
      }
      // A log of one copy's size: 80 commits of up to 12 chunks (some 17 KB of records) fill it several times.
      expect(logRegionBytes(N)).toBe(mapRegionBytes(N));
      expect(checkpoints).toBeGreaterThanOrEqual(2);
    } finally {
      f.close();
    }
  });

  it('a commit that changes nothing but the pending set is a record too', () => {
    const f = new MapFile();
    try {
      f.commit(3, [1, 2]);
      const next = clonePositionMap(f.current);
      next.epoch += 1;
      clearPending(next);
      expect(changedChunks(f.current, next).length).toBe(0);
      expect(f.committer.commit(f.current, next)).toBe(logRecordBytes(0, 0));
      f.current = next;
      f.maps.set(next.epoch, clonePositionMap(next));
      expect(expectEpoch(f, next.epoch)).toEqual([]);
    } finally {
      f.close();
    }
  });

  for (const where of ['onto zeros (a fresh log)', 'over the records of an older checkpoint'] as const) {
    it(`a last record torn at every byte ${where}: the previous epoch, exactly`, () => {
      const f = new MapFile();
      try {
        if (where !== 'onto zeros (a fresh log)') {
          // Fill the log with records of the first checkpoint, then checkpoint: the next
          // records are written over them.
          while (f.committer.place.baseEpoch === 2) f.commit(10);
          f.commit(2);
        }
        f.commit(3);
        const prev = f.current.epoch;
        const start = f.committer.place.logEnd;
        const before = f.bytes();
        f.commit(4);
        const end = f.committer.place.logEnd;
        expect(end - start).toBe(logRecordBytes(4, 0));
        const after = f.bytes();
        for (let t = LOG + start; t < LOG + end; t++) {
          // Reached the disk: the record's first t bytes (or, sectors written out of order, all but them).
          const tears = [Buffer.concat([after.subarray(0, t), before.subarray(t)])];
          if (t > LOG + start) tears.push(Buffer.concat([before.subarray(0, t), after.subarray(t)]));
          for (const torn of tears) {
            if (torn.equals(after)) continue; // the bytes not written were those the record has already (a ciphertext byte of 0)
            f.put(torn);
            const notices = expectEpoch(f, prev);
            for (const n of notices) expect(n).toMatch(new RegExp(`^the last map log record \\(${NAME} at offset ${LOG + start}, epoch \\d+\\) .*: the commit it holds did not happen; the files decode to epoch ${prev}$`));
          }
          // Garbage from byte t on: every byte changed.
          const garbage = Buffer.from(after);
          for (let i = t; i < LOG + end; i++) garbage[i] = (garbage[i] ?? 0) ^ (1 + randomInt(255));
          f.put(garbage);
          expectEpoch(f, prev);
        }
        f.put(after);
        expect(expectEpoch(f, f.current.epoch)).toEqual([]);
      } finally {
        f.close();
      }
    });
  }

  it('a flipped byte anywhere in a middle record is reported, and nothing from it on is applied', () => {
    const f = new MapFile();
    try {
      const { ends, epochs } = f.commits([2, 3, 4, 5, 6]);
      const good = f.bytes();
      const start = ends[2] ?? 0;
      const end = ends[3] ?? 0;
      for (let at = start; at < end; at++) {
        const bad = Buffer.from(good);
        bad[LOG + at] = (bad[LOG + at] ?? 0) ^ (1 << randomInt(8));
        f.put(bad);
        const notices = expectEpoch(f, epochs[2] ?? 0);
        expect(notices, `byte ${at - start} of the record`).toHaveLength(1);
        expect(notices[0]).toMatch(new RegExp(
          `^(map log record \\(${NAME} at offset ${LOG + start}, epoch \\d+\\) .*; it and 2 later records of the log are not applied|` +
          `the map log stops at ${NAME} at offset ${LOG + start} \\(no record of its checkpoint there\\), but 2 records of that checkpoint follow further on: not applied) ` +
          `\\(a crash tears only the last record: the log was damaged or tampered with\\); the files decode to epoch ${epochs[2]}$`,
        ));
      }
      // A zeroed middle record: the same.
      const zeroed = Buffer.from(good);
      zeroed.fill(0, LOG + start, LOG + end);
      f.put(zeroed);
      expect(expectEpoch(f, epochs[2] ?? 0)).toEqual([expect.stringMatching(/but 2 records of that checkpoint follow further on: not applied/)]);
    } finally {
      f.close();
    }
  });

  it('records reordered, dropped, replayed, from another volume or spliced onto another checkpoint are refused and reported', () => {
    const f = new MapFile();
    try {
      const { ends, epochs } = f.commits([5, 5, 5, 5]); // same size: records can change places
      const good = f.bytes();
      const record = (i: number): Buffer => Buffer.from(good.subarray(LOG + (ends[i] ?? 0), LOG + (ends[i + 1] ?? 0)));
      const withLog = (records: Buffer[]): Buffer => {
        const out = Buffer.from(good);
        out.fill(0, LOG, LOG + logRegionBytes(N));
        Buffer.concat(records).copy(out, LOG);
        return out;
      };
      const follows = /does not follow epoch \d+ \(it claims to follow \d+: reordered, replayed or spliced\)/;

      // Swapped: records 1 and 2.
      f.put(withLog([record(0), record(2), record(1), record(3)]));
      expect(expectEpoch(f, epochs[1] ?? 0)).toEqual([expect.stringMatching(follows)]);
      // Dropped from the middle.
      f.put(withLog([record(0), record(2), record(3)]));
      expect(expectEpoch(f, epochs[1] ?? 0)).toEqual([expect.stringMatching(follows)]);
      // An older record replayed at the end.
      f.put(withLog([record(0), record(1), record(2), record(3), record(1)]));
      expect(expectEpoch(f, epochs[4] ?? 0)).toEqual([expect.stringMatching(new RegExp(`^the last map log record .* ${follows.source}`))]);
      // Another volume's record (another UUID, same key) in the same place.
      const next = clonePositionMap(f.current);
      next.epoch += 1;
      const foreign = sealLogRecord({ key: key.key, uuid: randomBytes(16) }, 2, f.current.epoch, next, Uint32Array.of(0));
      f.put(withLog([record(0), record(1), record(2), record(3), foreign]));
      expect(expectEpoch(f, epochs[4] ?? 0)).toEqual([expect.stringMatching(/^the last map log record .* fails authentication/)]);
      // A record of this log spliced onto another checkpoint: its header rewritten to name it.
      f.put(good);
      while (f.committer.place.baseEpoch === 2) f.commit(10);
      const base = f.committer.place.baseEpoch;
      const spliced = record(0);
      spliced.writeBigUInt64BE(BigInt(base), 12);
      spliced.writeBigUInt64BE(BigInt(base), 20);
      spliced.writeBigUInt64BE(BigInt(base + 1), 28);
      const now = f.bytes();
      spliced.copy(now, LOG);
      f.put(now);
      expect(expectEpoch(f, base)).toEqual([expect.stringMatching(/^the last map log record .* fails authentication/)]);
    } finally {
      f.close();
    }
  });

  it('a crash around a checkpoint: before its first record, and during its own write', () => {
    const f = new MapFile();
    try {
      while (f.committer.place.logEnd + logRecordBytes(10, 0) <= logRegionBytes(N)) f.commit(10);
      const prev = f.current.epoch;
      const before = f.bytes();
      const old = f.committer.place;
      f.commit(10); // does not fit: a checkpoint, the log left as it was
      const now = f.committer.place;
      expect(now).toEqual({ region: old.region === 0 ? 1 : 0, baseEpoch: f.current.epoch, logEnd: 0, copy: now.copy });
      const after = f.bytes();
      // The crash right after the checkpoint: the old records name the old checkpoint, so they are no log of the new one.
      expect(after.subarray(LOG).equals(before.subarray(LOG))).toBe(true);
      expect(expectEpoch(f, f.current.epoch)).toEqual([]);
      // The checkpoint torn: the other copy and its log, whole, and the failing copy reported.
      const at = regionOffset(N, now.region);
      f.put(before);
      expect(expectEpoch(f, prev)).toEqual([]); // not a byte of it written: the older copy it replaces is whole
      for (const t of [at + 20, at + 40, at + 64, at + 65, at + 1000, at + logRecordBytes(0, 0) + mapRegionBytes(N) / 4]) {
        f.put(Buffer.concat([after.subarray(0, t), before.subarray(t)]));
        const notices = expectEpoch(f, prev);
        expect(notices).toEqual([expect.stringMatching(new RegExp(`^map ${now.copy} \\(${NAME} at offset ${at}\\) .*; using map ${old.copy} \\(${NAME} at offset ${regionOffset(N, old.region)}\\) and the map log after it, epoch ${prev} \\(if the failed copy held a later commit, that commit is lost\\)$`))]);
      }
      f.put(after);
      // The next commit writes the new log over the old one; the old records after it still name the old checkpoint.
      f.commit(1);
      expect(f.committer.place.logEnd).toBe(logRecordBytes(1, 0));
      expect(expectEpoch(f, f.current.epoch)).toEqual([]);
    } finally {
      f.close();
    }
  });

  it('after a failed map write the next commit is a whole checkpoint over the same copy', () => {
    const f = new MapFile();
    try {
      f.commit(2);
      const next = clonePositionMap(f.current);
      next.epoch += 1;
      // A write that fails: through a descriptor opened read-only.
      const ro = openSync(f.path, 'r');
      const broken = new MapCommitter(ro, NAME, key, f.committer.place);
      try {
        expect(() => broken.commit(f.current, next)).toThrow(new RegExp(`^write of ${NAME} \\(map log, epoch ${next.epoch}\\) at offset ${LOG + logRecordBytes(2, 0)}: `));
        expect(() => broken.commit(f.current, next)).toThrow(new RegExp(`^write of ${NAME} \\(map A\\) at offset ${regionOffset(N, 0)}: `));
      } finally {
        closeSync(ro);
      }
    } finally {
      f.close();
    }
  });

  it('a commit of k chunks writes a record of 64 + 20 + 20·k bytes, independent of the volume', () => {
    expect(logRecordBytes(1, 0)).toBe(LOG_HEADER_BYTES + 40);
    const f = new MapFile();
    try {
      for (const k of [1, 5, 20]) expect(f.commit(k)).toBe(84 + 20 * k);
    } finally {
      f.close();
    }
  });
});
