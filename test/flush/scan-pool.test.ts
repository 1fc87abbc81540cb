// The scan pool against the daemon's own thread, on a real file mapped as the daemon maps its
// image: random content, edge sizes (one chunk, fewer chunks than threads, a tail window, pieces
// that straddle windows, 512-byte chunks), whole scans and lists in any order. Every hash must
// equal the single-thread one and xxh64 of the bytes read back from the file. A piece that
// fails names its chunks and switches the pool off; the threads are started once, not per job.
// Imports the built output: the pool's threads run dist/src/flush/scan-worker.js.

import { xxh64 } from '@node-rs/xxhash';
import { randomBytes } from 'node:crypto';
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { tempDir } from '../helpers/tmp.js';

type PoolModule = typeof import('../../src/flush/scan-pool.js');
type JobModule = typeof import('../../src/flush/scan-job.js');
type LibcModule = typeof import('../../src/sys/libc.js');
const { ScanPool } = (await import('../../dist/src/flush/scan-pool.js')) as PoolModule;
const { ChunkViews, hashItems } = (await import('../../dist/src/flush/scan-job.js')) as JobModule;
const { mapShared, pointerAddress, unmap, viewOf } = (await import('../../dist/src/sys/libc.js')) as LibcModule;

const MiB = 2 ** 20;

interface Mapped {
  windows: { offset: number; length: number; address: bigint; view: Buffer }[];
  release: () => void;
  /** xxh64 of each chunk as read back from the file (not through the mapping). */
  truth: BigUint64Array;
}

const open: Mapped[] = [];
const pools: InstanceType<PoolModule['ScanPool']>[] = [];
afterEach(async () => {
  while (open.length > 0) open.pop()?.release();
  while (pools.length > 0) await pools.pop()?.close();
});

/** A file of `size` random bytes mapped in windows of `window` bytes, as the image is. */
function mappedFile(size: number, chunkSize: number, window: number): Mapped {
  const path = join(tempDir(), 'image');
  const fd = openSync(path, 'w+', 0o600);
  for (let at = 0; at < size; at += 4 * MiB) writeSync(fd, randomBytes(Math.min(4 * MiB, size - at)), 0, Math.min(4 * MiB, size - at), at);
  const truth = new BigUint64Array(size / chunkSize);
  const buf = Buffer.alloc(chunkSize);
  for (let c = 0; c < truth.length; c++) {
    expect(readSync(fd, buf, 0, chunkSize, c * chunkSize)).toBe(chunkSize);
    truth[c] = xxh64(buf);
  }
  const maps: { ptr: unknown; length: number }[] = [];
  const windows: Mapped['windows'] = [];
  for (let offset = 0; offset < size; offset += window) {
    const length = Math.min(window, size - offset);
    const ptr = mapShared(fd, offset, length, 'test image');
    maps.push({ ptr, length });
    windows.push({ offset, length, address: pointerAddress(ptr), view: viewOf(ptr, length) });
  }
  const m = {
    windows, truth,
    release: () => {
      for (const x of maps) unmap(x.ptr, x.length, 'test image');
      closeSync(fd);
    },
  };
  open.push(m);
  return m;
}

function sharedHashes(n: number, fill: bigint): BigUint64Array {
  return new BigUint64Array(new SharedArrayBuffer(n * 8)).fill(fill);
}

function newPool(threads: number): InstanceType<PoolModule['ScanPool']> {
  const pool = new ScanPool(threads);
  pools.push(pool);
  return pool;
}

/** A random subset of 0..n-1 with the first and last chunk, shuffled. */
function someChunks(n: number): Uint32Array {
  const picked = new Set<number>([0, n - 1]);
  for (let i = 0; i < n / 3; i++) picked.add(Math.floor(Math.random() * n));
  const list = [...picked];
  for (let i = list.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [list[i], list[j]] = [list[j] as number, list[i] as number];
  }
  return Uint32Array.from(list);
}

describe('scan pool', () => {
  const cases = [
    { what: 'one 64 KiB chunk', size: 64 * 1024, chunk: 64 * 1024, window: 64 * 1024, threads: 2 },
    { what: 'three 512-byte chunks, three threads', size: 1536, chunk: 512, window: 1536, threads: 3 },
    { what: '4 KiB chunks, 1 MiB windows and a tail window of 5 chunks', size: 3 * MiB + 5 * 4096, chunk: 4096, window: MiB, threads: 2 },
    { what: '512-byte chunks: 16 MiB pieces across 16 MiB windows, a remainder of 7 chunks', size: 40 * MiB + 7 * 512, chunk: 512, window: 16 * MiB, threads: 2 },
    { what: '64 KiB chunks, pieces straddling 3 MiB windows', size: 48 * MiB + 64 * 1024, chunk: 64 * 1024, window: 3 * MiB, threads: 2 },
  ];
  for (const c of cases) {
    it(`hashes exactly as the daemon's thread does: ${c.what}`, async () => {
      const m = mappedFile(c.size, c.chunk, c.window);
      const n = m.truth.length;
      const views = new ChunkViews(m.windows, c.chunk);
      const single = sharedHashes(n, 0n);
      hashItems(views, { from: 0, to: n }, 0, n, single);
      expect(single).toEqual(m.truth);

      const pool = newPool(c.threads);
      const all = sharedHashes(n, 0n);
      await pool.hash(m.windows, c.chunk, { from: 0, to: n }, all);
      expect(all).toEqual(single);

      // A list in any order: those chunks and no others.
      const list = someChunks(n);
      const listed = sharedHashes(n, 7n);
      await pool.hash(m.windows, c.chunk, list, listed);
      const expected = sharedHashes(n, 7n);
      for (const chunk of list) expected[chunk] = single[chunk] as bigint;
      expect(listed).toEqual(expected);
      // A tail run of chunks only.
      const tail = sharedHashes(n, 7n);
      await pool.hash(m.windows, c.chunk, { from: Math.floor(n / 2), to: n }, tail);
      expect(tail.subarray(Math.floor(n / 2))).toEqual(single.subarray(Math.floor(n / 2)));
      expect(tail.subarray(0, Math.floor(n / 2)).every((h) => h === 7n)).toBe(true);
      expect(pool.state()).toEqual({ threads: c.threads, started: c.threads });
    });
  }

  it('starts its threads once for many jobs, and ends them at close', async () => {
    const m = mappedFile(8 * MiB, 4096, 8 * MiB);
    const pool = newPool(2);
    const out = sharedHashes(m.truth.length, 0n);
    for (let i = 0; i < 5; i++) {
      out.fill(0n);
      await pool.hash(m.windows, 4096, { from: 0, to: m.truth.length }, out);
      expect(out).toEqual(m.truth);
    }
    expect(pool.state()).toEqual({ threads: 2, started: 2 });
    await pool.close();
    expect(pool.usable).toBe(false);
    await expect(pool.hash(m.windows, 4096, { from: 0, to: 1 }, out)).rejects.toThrow('the scan pool is off');
  });

  it('names the chunks of a piece that fails, and switches itself off', async () => {
    const m = mappedFile(MiB, 4096, MiB);
    const n = m.truth.length;
    const pool = newPool(2);
    // Chunk n + 5 does not exist: the thread that takes the piece fails on it.
    const list = Uint32Array.from([3, 1, n + 5, 2]);
    const out = sharedHashes(n, 0n);
    const err = await pool.hash(m.windows, 4096, list, out).then(() => undefined, (e: unknown) => e as Error);
    expect(err?.message).toContain('full scan of 4 chunks: thread ');
    expect(err?.message).toContain(`failed hashing chunks 3 … 2 (4 chunks of a list, items 0–3): internal: chunk ${n + 5} is outside the ${MiB}-byte image`);
    expect(pool.usable).toBe(false);
    expect(pool.state().threads).toBe(1);
    expect(pool.state().off).toContain(`chunk ${n + 5} is outside`);
    // The daemon's thread fails the same way on the same input: no chunk is silently skipped.
    expect(() => hashItems(new ChunkViews(m.windows, 4096), list, 0, list.length, out)).toThrow(`chunk ${n + 5} is outside`);
  });
});
