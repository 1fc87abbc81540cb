// The sealed chunk store through the library, on real files with real crypto: round trips over
// every built-in layout, copy-on-write (committed slots never written), epochs that never repeat,
// the overflow journal, an interrupted write, and where chunks are said to live.

import { randomBytes } from 'node:crypto';
import { closeSync, existsSync, openSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { exportImage, importImage } from '../../src/image/offline.js';
import { SlotAuthError, sealChunk, slotSize } from '../../src/store/slot.js';
import { initSealedVolume, type SealedLayoutChoice, type SpareChoice } from '../../src/volume/init.js';
import { MAP_NAME, SEALED_JOURNAL_NAME, closeVolume, openVolume } from '../../src/volume/volume.js';
import { MANIFEST_NAME, type SealedManifest } from '../../src/volume/manifest.js';
import { MAP_HEADER_BYTES, clonePositionMap, mapPayloadBytes, mapRegionBytes, setPending, writePositionMap } from '../../src/store/map.js';
import { loadMapState } from '../../src/store/map-log.js';
import { journalHeader } from '../../src/store/sealed-store.js';
import { unlockSealedManifest } from '../../src/store/sealed-manifest.js';
import { openChunkStore, type ChunkStore } from '../../src/store/chunk-store.js';
import type { SealedStore } from '../../src/store/sealed-store.js';
import { sha256 } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { withStore } from '../helpers/volumes.js';

const PASS = Buffer.from('a sealed passphrase');
/** Cheap scrypt for library tests (the CLI tests use the default cost). */
const FAST_KDF = { N: 1024, r: 8, p: 1 };
const LAYOUTS: SealedLayoutChoice['kind'][] = ['linear', 'striped', 'keyed'];

async function sealedVolume(dir: string, size: number, files: number, chunk: number, layout: SealedLayoutChoice, spare?: SpareChoice): Promise<void> {
  await initSealedVolume({ dir, deviceSize: size, fileCount: files, chunkSize: chunk, layout, passphrase: Buffer.from(PASS), spare, kdf: FAST_KDF });
}

function sealed(store: ChunkStore): SealedStore {
  if (store.kind !== 'sealed') throw new Error('expected a sealed store');
  return store as SealedStore;
}

async function importBuf(dir: string, image: Buffer): Promise<ReturnType<typeof importImage>> {
  const path = join(dir, '..', `in-${sha256(image).slice(0, 8)}.img`);
  writeFileSync(path, image);
  return withStore(dir, PASS, true, (store) => importImage(store, path));
}

async function exportBuf(dir: string): Promise<Buffer> {
  const path = join(dir, '..', 'out.img');
  await withStore(dir, PASS, false, (store) => exportImage(store, path));
  return readFileSync(path);
}

function files(dir: string): Map<string, Buffer> {
  return new Map(readdirSync(dir).filter((n) => n.startsWith('file')).map((n) => [n, readFileSync(join(dir, n))]));
}

describe('sealed chunk store: round trips', () => {
  const shapes = [
    { chunk: 512, files: 1, size: 128 * 1024 },
    { chunk: 4096, files: 7, size: 1024 * 1024 },
    { chunk: 65536, files: 13, size: 8 * 2 ** 20 },
    { chunk: 2 ** 20, files: 3, size: 8 * 2 ** 20 },
  ];
  for (const kind of LAYOUTS) {
    for (const s of shapes) {
      for (const spare of [{ percent: 100 }, { count: 3 }] as const) {
        it(`${kind}: ${s.files} files, ${s.chunk} B chunks, ${s.size} B, spare ${JSON.stringify(spare)}`, async () => {
          const dir = join(tempDir(), 'vol');
          await sealedVolume(dir, s.size, s.files, s.chunk, { kind }, spare);
          expect(sha256(await exportBuf(dir))).toBe(sha256(Buffer.alloc(s.size))); // a new volume reads as zeros
          for (let round = 0; round < 2; round++) {
            const image = randomBytes(s.size);
            const report = await importBuf(dir, image);
            expect(report.kind).toBe('sealed');
            if (report.kind === 'sealed') expect(report.throughJournal > 0).toBe('count' in spare);
            expect(sha256(await exportBuf(dir))).toBe(sha256(image));
            expect(existsSync(join(dir, SEALED_JOURNAL_NAME))).toBe(false);
          }
        });
      }
    }
  }
});

describe('sealed chunk store: commits', () => {
  it('a copy-on-write commit writes only free slots: every slot of the committed map stays byte for byte', async () => {
    const dir = join(tempDir(), 'vol');
    await sealedVolume(dir, 256 * 1024, 4, 4096, { kind: 'keyed' }, { percent: 100 });
    await importBuf(dir, randomBytes(256 * 1024));
    const before = files(dir);
    const places = await withStore(dir, PASS, false, (store) => Array.from({ length: store.chunkCount }, (_, c) => store.locate(c)));
    const image = randomBytes(256 * 1024);
    await importBuf(dir, image);
    const after = files(dir);
    for (const p of places) {
      const was = before.get(p.name)?.subarray(p.offset, p.offset + p.bytes);
      const now = after.get(p.name)?.subarray(p.offset, p.offset + p.bytes);
      expect(now?.equals(was ?? Buffer.alloc(0))).toBe(true);
    }
    expect(sha256(await exportBuf(dir))).toBe(sha256(image));
  });

  it('epochs only grow, a written-but-uncommitted attempt (a crash before the map) changes nothing and its epoch is never used again', async () => {
    const dir = join(tempDir(), 'vol');
    const size = 128 * 1024;
    for (const spare of [{ percent: 50 }, { percent: 100 }]) {
      await initSealedVolume({ dir, deviceSize: size, fileCount: 2, chunkSize: 4096, layout: { kind: 'striped' }, passphrase: Buffer.from(PASS), spare, kdf: FAST_KDF, force: true });
      const first = randomBytes(size);
      await importBuf(dir, first);
      const entries = (): Promise<number[]> => withStore(dir, PASS, false, (store) => Array.from({ length: store.chunkCount }, (_, c) => sealed(store).entry(c).epoch));
      const committed = await entries();
      // Write every chunk of a second image, but never commit: what a kill -9 before the map leaves.
      const attempt = await withStore(dir, PASS, true, (store) => {
        const w = store.begin('all');
        w.write(0, store.chunkCount, randomBytes(size));
        return w.epoch ?? 0;
      });
      expect(attempt).toBeGreaterThan(Math.max(...committed));
      expect(await entries()).toEqual(committed);
      expect(sha256(await exportBuf(dir))).toBe(sha256(first));
      const second = randomBytes(size);
      await importBuf(dir, second);
      for (const e of await entries()) expect(e).toBeGreaterThan(attempt);
      expect(sha256(await exportBuf(dir))).toBe(sha256(second));
    }
  });

  it('an aborted write keeps the committed epoch; the next one takes a fresh epoch', async () => {
    const dir = join(tempDir(), 'vol');
    await sealedVolume(dir, 64 * 1024, 1, 4096, { kind: 'linear' }, { count: 2 });
    const image = randomBytes(64 * 1024);
    await importBuf(dir, image);
    await withStore(dir, PASS, true, (store) => {
      const epoch = store.epoch ?? 0;
      const w = store.begin(Uint32Array.of(1, 2, 3));
      expect(w.epoch).toBeGreaterThan(epoch);
      w.write(1, 3, randomBytes(2 * 4096));
      expect(() => w.commit()).toThrow(/1 of the 3 chunks of epoch \d+ were not written; nothing was committed/);
      expect(store.epoch).toBe(epoch);
      const again = store.begin(Uint32Array.of(5));
      expect(again.epoch).toBeGreaterThan(w.epoch ?? 0);
      again.write(5, 6, Buffer.alloc(4096, 7));
      const r = again.commit();
      expect(r.kind === 'sealed' && r.epoch).toBe(again.epoch);
      expect(existsSync(join(dir, SEALED_JOURNAL_NAME))).toBe(false);
    });
    const back = await exportBuf(dir);
    expect(back.subarray(5 * 4096, 6 * 4096).equals(Buffer.alloc(4096, 7))).toBe(true);
    expect(back.subarray(0, 5 * 4096).equals(image.subarray(0, 5 * 4096))).toBe(true);
  });

  it('more chunks than free slots: one commit through the journal, the journal removed, the nonce budget counts every seal', async () => {
    const dir = join(tempDir(), 'vol');
    const size = 64 * 4096;
    await sealedVolume(dir, size, 3, 4096, { kind: 'keyed' }, { count: 5 });
    const image = randomBytes(size);
    const r = await importBuf(dir, image);
    expect(r).toEqual({ kind: 'sealed', epoch: expect.any(Number), chunks: 64, inFreeSlots: 5, throughJournal: 59, mapBytes: expect.any(Number), keyGeneration: 0 });
    expect(existsSync(join(dir, SEALED_JOURNAL_NAME))).toBe(false);
    expect(sha256(await exportBuf(dir))).toBe(sha256(image));
  });

  it('which chunk goes to which free slot, and which chunks stay in place, is random: the files show which slots a commit wrote, not where a chunk went', async () => {
    const dir = join(tempDir(), 'vol');
    await sealedVolume(dir, 128 * 4096, 2, 4096, { kind: 'linear' }, { count: 64 });
    const slotsNow = (): Promise<number[]> => withStore(dir, PASS, false, (store) => Array.from({ length: store.chunkCount }, (_, c) => sealed(store).entry(c).slot));
    const before = await slotsNow();
    expect(before).toEqual(Array.from({ length: 128 }, (_, c) => c)); // linear: chunk c in slot c
    await importBuf(dir, randomBytes(128 * 4096));
    const after = await slotsNow();
    const moved = after.map((s, c) => (s !== before[c] ? c : -1)).filter((c) => c >= 0);
    const stayed = after.map((s, c) => (s === before[c] ? c : -1)).filter((c) => c >= 0);
    expect(moved.length).toBe(64);
    expect(stayed.length).toBe(64);
    // Not the first 64 chunks into the 64 spare slots in order, nor the last 64 kept in place.
    expect(moved).not.toEqual(Array.from({ length: 64 }, (_, i) => i));
    const targets = moved.map((c) => after[c] ?? 0);
    expect(targets).not.toEqual([...targets].sort((a, b) => a - b));
    expect(new Set(targets)).toEqual(new Set(Array.from({ length: 64 }, (_, i) => 128 + i)));
  });

  it('an epoch floor (root\'s record) is honoured: the next commit takes a later epoch even if the reservations were rolled back', async () => {
    const dir = join(tempDir(), 'vol');
    await sealedVolume(dir, 16 * 4096, 1, 4096, { kind: 'linear' }, { percent: 100 });
    const volume = openVolume(dir, { writable: true });
    try {
      const store = sealed(await openChunkStore(volume, { writable: true, secret: Buffer.from(PASS), epochFloor: 40 }));
      try {
        expect(store.epoch).toBe(2);
        expect(store.reservedEpoch).toBe(40);
        const w = store.begin(Uint32Array.of(3));
        expect(w.epoch).toBe(41);
        w.write(3, 4, Buffer.alloc(4096, 1));
        // The reservation (64) and one map log record: header 64 ‖ budget and counts 20 ‖ one entry 20.
        expect(w.commit()).toEqual({ kind: 'sealed', epoch: 41, chunks: 1, inFreeSlots: 1, throughJournal: 0, mapBytes: 64 + 64 + 20 + 20, keyGeneration: 0 });
        expect(store.reservedEpoch).toBe(41);
        expect(store.budget).toEqual({ generation: 0, used: 17 });
      } finally {
        store.close();
      }
    } finally {
      closeVolume(volume);
    }
  });

  it('a commit interrupted after its map (chunks pending in the journal): export reads them from the journal, the next writable open completes it; a journal that does not match is refused for writing', async () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    const size = 16 * 4096;
    await sealedVolume(dir, size, 2, 4096, { kind: 'keyed' }, { percent: 100 });
    const image = randomBytes(size);
    await importBuf(dir, image);
    // Build, with the real keys and formats, what a kill -9 between steps 3 and 4 leaves (that
    // commit's map as a checkpoint: too large for a small volume's log).
    const manifest = JSON.parse(readFileSync(join(dir, MANIFEST_NAME), 'utf8')) as SealedManifest;
    const keys = unlockSealedManifest(PASS, manifest);
    const mapKey = { key: keys.mapKey, uuid: keys.uuid };
    const mapPath = join(dir, MAP_NAME);
    const fd = openSync(mapPath, 'r+');
    const want = Buffer.from(image);
    try {
      const loaded = loadMapState(fd, MAP_NAME, mapKey, 16, 32);
      const pending = clonePositionMap(loaded.map);
      pending.epoch = loaded.map.epoch + 5;
      const journal: Buffer[] = [journalHeader(keys.uuid, pending.epoch, 2, slotSize(4096))];
      for (const c of [2, 5]) {
        const data = randomBytes(4096);
        data.copy(want, c * 4096);
        const slot = Buffer.alloc(slotSize(4096));
        sealChunk(keys.slotKey(0), { chunk: c, epoch: pending.epoch }, data, slot);
        journal.push(slot);
        setPending(pending, c);
        pending.epochs[c] = pending.epoch;
      }
      writeFileSync(join(dir, SEALED_JOURNAL_NAME), Buffer.concat(journal), { mode: 0o600 });
      writePositionMap(fd, MAP_NAME, mapKey, pending, loaded.region === 0 ? 1 : 0);
    } finally {
      closeSync(fd);
      keys.wipe();
    }
    const out = join(scratch, 'out.img');
    await withStore(dir, PASS, false, async (store) => {
      expect(store.notices).toEqual([expect.stringMatching(/^the commit of epoch \d+ was interrupted while copying 2 chunks from vbd-shadow.sealed-journal into place: they are read from the journal/)]);
      expect(store.locate(5)).toEqual({ file: -1, name: SEALED_JOURNAL_NAME, offset: 64 + slotSize(4096), bytes: slotSize(4096) });
      await exportImage(store, out);
    });
    expect(readFileSync(out).equals(want)).toBe(true);

    // A journal whose header was changed: reads fall back to the slots (which fail: named), writes are refused.
    const journalPath = join(dir, SEALED_JOURNAL_NAME);
    const good = readFileSync(journalPath);
    const bad = Buffer.from(good);
    bad[15] ^= 1;
    writeFileSync(journalPath, bad);
    await withStore(dir, PASS, false, async (store) => {
      expect(store.notices[0]).toMatch(/put 2 chunks through vbd-shadow.sealed-journal, which belongs to another commit or volume: those chunks are read from their slots/);
      await expect(exportImage(store, out)).rejects.toThrow(/export refused: 2 chunks fail authentication .*: chunk 2 \(file00\d at offset \d+, epoch \d+\), chunk 5 /);
    });
    await expect(withStore(dir, PASS, true, () => undefined)).rejects.toThrow(/waits to be completed from vbd-shadow.sealed-journal, which belongs to another commit or volume: refusing to write/);
    writeFileSync(journalPath, good);

    // The next writable open completes it: copied into place, a map without pending chunks, journal gone.
    const notices = await withStore(dir, PASS, true, (store) => [...store.notices]);
    expect(notices).toEqual([expect.stringMatching(/^completed the interrupted commit of epoch \d+: 2 chunks copied from vbd-shadow.sealed-journal into place/)]);
    expect(existsSync(journalPath)).toBe(false);
    expect((await exportBuf(dir)).equals(want)).toBe(true);
  });

  it('says where each chunk lives, and a damaged slot is named with file, offset and chunk', async () => {
    const dir = join(tempDir(), 'vol');
    await sealedVolume(dir, 64 * 1024, 3, 4096, { kind: 'keyed' });
    await importBuf(dir, randomBytes(64 * 1024));
    const place = await withStore(dir, PASS, false, (store) => store.locate(9));
    expect(place.bytes).toBe(slotSize(4096));
    expect(place.offset % slotSize(4096)).toBe(0);
    const path = join(dir, place.name);
    const bytes = readFileSync(path);
    bytes[place.offset + 100] ^= 1;
    writeFileSync(path, bytes);
    await withStore(dir, PASS, false, (store) => {
      const buf = Buffer.alloc(16 * 4096);
      let caught: unknown;
      try {
        store.read(0, 16, buf);
      } catch (err) {
        caught = err;
      }
      expect(caught).toBeInstanceOf(SlotAuthError);
      expect((caught as SlotAuthError).message).toMatch(new RegExp(`^${place.name} at offset ${place.offset}: chunk 9, epoch \\d+ \\(key generation 0\\): the slot fails authentication`));
      const damaged = store.read(0, 16, buf, { damaged: 'zero' });
      expect(damaged).toEqual([{ chunk: 9, name: place.name, offset: place.offset, epoch: expect.any(Number) }]);
      expect(buf.subarray(9 * 4096, 10 * 4096).every((b) => b === 0)).toBe(true);
    });
  });
});

describe('sealed chunk store: map bytes per commit', () => {
  /** One commit of `chunks` (random data); returns its report's mapBytes and what was written. */
  function commitChunks(store: ChunkStore, chunks: Uint32Array): { mapBytes: number; data: Buffer } {
    const C = store.chunkSize;
    const data = randomBytes(chunks.length * C);
    const w = store.begin(chunks);
    chunks.forEach((c, i) => w.write(c, c + 1, data.subarray(i * C, (i + 1) * C)));
    const r = w.commit();
    if (r.kind !== 'sealed') throw new Error('expected a sealed commit');
    return { mapBytes: r.mapBytes, data };
  }

  it('grows with the changed chunks, not the volume: 1 and 1% of 16384 chunks against the whole map', async () => {
    const dir = join(tempDir(), 'vol');
    const chunks = 16384;
    await sealedVolume(dir, chunks * 512, 4, 512, { kind: 'keyed' });
    const full = mapRegionBytes(chunks);
    const onePercent = Math.ceil(chunks / 100);
    const image = await exportBuf(dir);
    const measured = await withStore(dir, PASS, true, (store) => {
      const one = commitChunks(store, Uint32Array.of(1234));
      one.data.copy(image, 1234 * 512);
      const picked = Uint32Array.from(Array.from({ length: onePercent }, (_, i) => i * 100 + 7));
      const many = commitChunks(store, picked);
      picked.forEach((c, i) => many.data.copy(image, c * 512, i * 512, (i + 1) * 512));
      return { one: one.mapBytes, many: many.mapBytes };
    });
    console.log(`map bytes per commit on ${chunks} chunks: 1 chunk ${measured.one} B, ${onePercent} chunks (1%) ${measured.many} B; the whole map (one copy) ${MAP_HEADER_BYTES + mapPayloadBytes(chunks)} B, ${full} B with its pages`);
    // The reservation (64) ‖ record header (64) ‖ budget and counts (20) ‖ 20 a chunk.
    expect(measured.one).toBe(64 + 64 + 20 + 20);
    expect(measured.many).toBe(64 + 64 + 20 + 20 * onePercent);
    expect(measured.one + 4096).toBeLessThan(full / 50);
    expect(sha256(await exportBuf(dir))).toBe(sha256(image));
  });

  it('a checkpoint now and then: the commit that finds the log full writes a whole copy, the log starts over, every reopen decodes the last commit', async () => {
    const dir = join(tempDir(), 'vol');
    await sealedVolume(dir, 16 * 4096, 2, 4096, { kind: 'linear' }, { percent: 100 });
    const image = await exportBuf(dir);
    const checkpoint = MAP_HEADER_BYTES + mapPayloadBytes(16);
    const sizes: number[] = [];
    for (let round = 0; round < 12; round++) {
      await withStore(dir, PASS, true, (store) => {
        expect(store.notices).toEqual([]);
        for (let i = 0; i < 5; i++) {
          const chunk = (round * 5 + i) % 16;
          const { mapBytes, data } = commitChunks(store, Uint32Array.of(chunk));
          data.copy(image, chunk * 4096);
          sizes.push(mapBytes);
          const place = sealed(store).mapPlace;
          if (mapBytes === 64 + checkpoint) expect(place).toEqual({ region: expect.any(Number), baseEpoch: store.epoch, logEnd: 0, copy: expect.any(String) });
        }
      });
      expect(sha256(await exportBuf(dir))).toBe(sha256(image));
    }
    // 60 records of 104 bytes do not fit a log of 4096: at least one commit was a checkpoint.
    expect(sizes.filter((b) => b === 64 + checkpoint).length).toBeGreaterThanOrEqual(1);
    expect(sizes.every((b) => b === 64 + 104 || b === 64 + checkpoint)).toBe(true);
  });

  it('a map file of the previous map format is refused with one line', async () => {
    const dir = join(tempDir(), 'vol');
    await sealedVolume(dir, 16 * 4096, 1, 4096, { kind: 'linear' });
    const path = join(dir, MAP_NAME);
    const bytes = readFileSync(path);
    bytes.writeUInt32BE(1, 4096 + 8); // map A's format field
    writeFileSync(path, bytes);
    await expect(withStore(dir, PASS, false, () => undefined)).rejects.toThrow(
      /^vbd-shadow.map is position map format 1 \(map A at offset 4096\); this version of vbd-shadow reads only format 2 \(the sealed format is not stable yet: export the volume with the version that wrote it, then init and import\); nothing was read or written$/,
    );
  });
});
