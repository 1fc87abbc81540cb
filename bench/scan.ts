// Full-scan throughput: xxh64 of every chunk of a RAM image (a huge-page tmpfs file mapped as
// the daemon maps it) on the daemon's thread, against the scan pool (src/flush/scan-pool.ts:
// worker threads reading the daemon's mapping by address) and two other ways threads could
// reach the image: pread into each thread's own buffer, and a read-only mapping of each
// thread's own (mapped once, kept). Rounds interleaved, contenders in rotating order; every
// contender's hashes are compared with the single thread's.

import { randomBytes } from 'node:crypto';
import { closeSync, constants as fsc, ftruncateSync, mkdirSync, openSync, rmSync, writeSync } from 'node:fs';
import { availableParallelism, loadavg } from 'node:os';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { fileURLToPath } from 'node:url';
import { runOk } from '../src/common/exec.js';
import { ChunkViews, hashItems, pieceItems } from '../src/flush/scan-job.js';
import { ScanPool } from '../src/flush/scan-pool.js';
import { mapShared, pointerAddress, unmap, viewOf } from '../src/sys/libc.js';
import { median, table } from './lib.js';

const CHUNK = 65536;
const WINDOW = 2 ** 30;
const MiB = 2 ** 20;

/** The two alternatives, as eval'd workers: the same piece protocol as the pool's threads. */
const ALTERNATIVE = `
const { parentPort, workerData } = require('node:worker_threads');
const { createRequire } = require('node:module');
const fs = require('node:fs');
const req = createRequire(workerData.root);
const { xxh64 } = req('@node-rs/xxhash');
const { mode, fd, size, chunkSize, window } = workerData;
let views = [];
const maps = [];
let munmap;
if (mode === 'mmap') {
  const koffi = req('koffi');
  const libc = koffi.load('libc.so.6');
  const mmap = libc.func('void *mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset)');
  munmap = libc.func('int munmap(void *addr, size_t length)');
  for (let off = 0; off < size; off += window) {
    const len = Math.min(window, size - off);
    const ptr = mmap(null, len, 1, 1 | 0x4000, fd, off);
    maps.push([ptr, len]);
    views.push(Buffer.from(koffi.view(ptr, len)));
  }
}
const buf = Buffer.allocUnsafeSlow(16 * 1024 * 1024);
parentPort.on('message', ({ close, next, out, pieceItems, count }) => {
  if (close) {
    views = [];
    for (const [ptr, len] of maps) munmap(ptr, len);
    parentPort.postMessage('closed');
    return;
  }
  for (;;) {
    const first = Atomics.add(next, 0, 1) * pieceItems;
    if (first >= count) break;
    const end = Math.min(count, first + pieceItems);
    if (mode === 'pread') {
      for (let c = first; c < end; ) {
        const n = Math.min(end - c, buf.length / chunkSize);
        let done = 0;
        while (done < n * chunkSize) done += fs.readSync(fd, buf, done, n * chunkSize - done, c * chunkSize + done);
        for (let i = 0; i < n; i++) out[c + i] = xxh64(buf.subarray(i * chunkSize, (i + 1) * chunkSize));
        c += n;
      }
    } else {
      for (let c = first; c < end; c++) {
        const at = c * chunkSize; const v = views[Math.floor(at / window)]; const o = at % window;
        out[c] = xxh64(v.subarray(o, o + chunkSize));
      }
    }
  }
  parentPort.postMessage('done');
});
parentPort.postMessage('ready');
`;

/** The control: pure arithmetic, no memory — the most any two threads could gain at that moment. */
const SPIN = `
const { parentPort } = require('node:worker_threads');
parentPort.on('message', (n) => { let x = 0; for (let i = 0; i < n; i++) x = (x * 31 + i) | 0; parentPort.postMessage(x); });
`;

function spin(n: number): number {
  let x = 0;
  for (let i = 0; i < n; i++) x = (x * 31 + i) | 0;
  return x;
}

class Control {
  private readonly workers = [0, 1].map(() => new Worker(SPIN, { eval: true }));
  async pair(n: number): Promise<void> {
    await Promise.all(this.workers.map((w) => new Promise((resolve) => {
      w.once('message', resolve);
      w.postMessage(n);
    })));
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}

class Alternative {
  private readonly workers: Worker[];
  readonly ready: Promise<unknown>;
  constructor(mode: 'pread' | 'mmap', fd: number, size: number, threads: number) {
    const root = fileURLToPath(new URL('../../package.json', import.meta.url));
    this.workers = Array.from({ length: threads }, () => new Worker(ALTERNATIVE, { eval: true, workerData: { mode, fd, size, chunkSize: CHUNK, window: WINDOW, root } }));
    this.ready = Promise.all(this.workers.map((w) => new Promise((r) => w.once('message', r))));
  }

  async hash(count: number, out: BigUint64Array): Promise<void> {
    const next = new Int32Array(new SharedArrayBuffer(4));
    await Promise.all(this.workers.map((w) => new Promise((resolve) => {
      w.once('message', resolve);
      w.postMessage({ next, out, pieceItems: pieceItems(CHUNK, count, this.workers.length), count });
    })));
  }

  /** Unmaps the threads' own mappings (the tmpfs could not be unmounted, nor its space reused), then ends them. */
  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => new Promise((resolve) => {
      w.once('message', resolve);
      w.postMessage({ close: true });
    })));
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}

interface Image {
  fd: number;
  size: number;
  windows: { offset: number; length: number; address: bigint; view: Buffer; ptr: unknown }[];
}

/** An image file of `size` bytes of random data in the huge-page tmpfs, mapped in 1 GiB windows. */
function makeImage(dir: string, size: number): Image {
  const path = join(dir, 'image');
  rmSync(path, { force: true });
  const fd = openSync(path, fsc.O_RDWR | fsc.O_CREAT | fsc.O_EXCL, 0o600);
  ftruncateSync(fd, size);
  const block = randomBytes(64 * MiB);
  for (let at = 0; at < size; at += block.length) writeSync(fd, block, 0, Math.min(block.length, size - at), at);
  const windows: Image['windows'] = [];
  for (let offset = 0; offset < size; offset += WINDOW) {
    const length = Math.min(WINDOW, size - offset);
    const ptr = mapShared(fd, offset, length, 'bench image');
    windows.push({ offset, length, address: pointerAddress(ptr), view: viewOf(ptr, length), ptr });
  }
  return { fd, size, windows };
}

function dropImage(dir: string, image: Image): void {
  for (const w of image.windows) unmap(w.ptr, w.length, 'bench image');
  closeSync(image.fd);
  rmSync(join(dir, 'image'), { force: true });
}

type Contender = 'single' | 'pool' | 'pread' | 'mmap' | 'spin1' | 'spin2';
const SPIN_N = 200_000_000;

/** Median ms per contender over `rounds` interleaved rounds, for an image of `size` bytes. */
async function measure(dir: string, size: number, rounds: number, contenders: Contender[]): Promise<Record<Contender, number>> {
  // The control's two timings carry one single-thread hash each (subtracted below via `single`).
  const image = makeImage(dir, size);
  const count = size / CHUNK;
  const views = new ChunkViews(image.windows, CHUNK);
  const threads = availableParallelism();
  const pool = new ScanPool(threads);
  const control = new Control();
  const alternatives = {
    pread: contenders.includes('pread') ? new Alternative('pread', image.fd, size, threads) : undefined,
    mmap: contenders.includes('mmap') ? new Alternative('mmap', image.fd, size, threads) : undefined,
  };
  try {
    await Promise.all([alternatives.pread?.ready, alternatives.mmap?.ready]);
    const reference = new BigUint64Array(count);
    hashItems(views, { from: 0, to: count }, 0, count, reference);
    const out = new BigUint64Array(new SharedArrayBuffer(count * 8));
    const run: Record<Contender, () => Promise<void>> = {
      single: async () => hashItems(views, { from: 0, to: count }, 0, count, out),
      pool: () => pool.hash(image.windows, CHUNK, { from: 0, to: count }, out),
      pread: () => alternatives.pread?.hash(count, out) ?? Promise.resolve(),
      mmap: () => alternatives.mmap?.hash(count, out) ?? Promise.resolve(),
      spin1: async () => {
        spin(2 * SPIN_N);
        hashItems(views, { from: 0, to: count }, 0, count, out); // (so the check below holds)
      },
      spin2: async () => {
        await control.pair(SPIN_N);
        hashItems(views, { from: 0, to: count }, 0, count, out);
      },
    };
    const times: Record<Contender, number[]> = { single: [], pool: [], pread: [], mmap: [], spin1: [], spin2: [] };
    // One warm-up round (threads started, pages of a thread's own mapping faulted in), not counted.
    for (let round = -1; round < rounds; round++) {
      const order = contenders.map((_, i) => contenders[(i + Math.max(0, round)) % contenders.length] as Contender);
      for (const c of order) {
        out.fill(0n);
        const t = performance.now();
        await run[c]();
        const ms = performance.now() - t;
        for (let i = 0; i < count; i++) if (out[i] !== reference[i]) throw new Error(`bench scan: ${c} hashed chunk ${i} differently`);
        if (round >= 0) times[c].push(ms);
      }
    }
    const m = (c: Contender): number => median(times[c]);
    return { single: m('single'), pool: m('pool'), pread: m('pread'), mmap: m('mmap'), spin1: m('spin1'), spin2: m('spin2') };
  } finally {
    await control.close();
    await pool.close();
    await alternatives.pread?.close();
    await alternatives.mmap?.close();
    dropImage(dir, image);
  }
}

/** Section (a): full-scan GiB/s, one thread against the pool and the alternatives; and the small sizes where the pool stops paying. */
export async function benchScan(work: string, sizesMiB: number[], smallMiB: number[], rounds: number): Promise<string> {
  const dir = join(work, 'scan-tmpfs');
  mkdirSync(dir, { recursive: true });
  const largest = Math.max(...sizesMiB, ...smallMiB) * MiB;
  // Like the daemon's image: a private huge-page tmpfs.
  await runOk('mount', ['-t', 'tmpfs', '-o', `size=${largest + 4 * MiB},huge=within_size,mode=0700`, 'vbd-bench-scan', dir]);
  const gibs = (size: number, ms: number): string => (size / 2 ** 30 / (ms / 1000)).toFixed(2);
  try {
    const big: (string | number)[][] = [];
    for (const mib of sizesMiB) {
      process.stderr.write(`scan: ${mib} MiB, single thread / pool / pread / own mapping\n`);
      const m = await measure(dir, mib * MiB, rounds, ['single', 'pool', 'pread', 'mmap', 'spin1', 'spin2']);
      const size = mib * MiB;
      const control = (m.spin1 - m.single) / Math.max(1, m.spin2 - m.single);
      big.push([`${mib / 1024} GiB`, `${m.single.toFixed(0)} ms (${gibs(size, m.single)})`, `${m.pool.toFixed(0)} ms (${gibs(size, m.pool)})`, `${(m.single / m.pool).toFixed(2)}×`,
        `${control.toFixed(2)}×`, `${m.pread.toFixed(0)} ms (${gibs(size, m.pread)})`, `${m.mmap.toFixed(0)} ms (${gibs(size, m.mmap)})`]);
    }
    const small: (string | number)[][] = [];
    for (const mib of smallMiB) {
      process.stderr.write(`scan: ${mib} MiB, single thread / pool\n`);
      const m = await measure(dir, mib * MiB, Math.max(rounds, 9), ['single', 'pool']);
      small.push([`${mib} MiB`, m.single.toFixed(2), m.pool.toFixed(2), `${(m.single / m.pool).toFixed(2)}×`]);
    }
    return [
      `Load average when the section ended: ${loadavg().map((x) => x.toFixed(2)).join(', ')} (on ${availableParallelism()} cores). The control column is what any two threads gained over one in the same rounds: the ceiling for the pool at that moment.`,
      '',
      table(['image', 'daemon\'s thread: ms (GiB/s)', `pool, ${availableParallelism()} threads on the daemon's mapping: ms (GiB/s)`, 'pool speed-up', 'control: 2 threads of arithmetic ÷ 1, same rounds', 'pread into each thread\'s buffer: ms (GiB/s)', 'each thread\'s own mapping: ms (GiB/s)'], big),
      '',
      'Small scans, where handing the work to the pool may cost more than it saves (median ms; below `POOL_MIN_BYTES`, 128 MiB, the engine hashes on the daemon\'s thread):',
      '',
      table(['hashed', 'daemon\'s thread (ms)', 'pool (ms)', 'pool speed-up'], small),
    ].join('\n');
  } finally {
    await runOk('umount', [dir]);
    rmSync(dir, { recursive: true, force: true });
  }
}
