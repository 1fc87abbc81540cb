// One thread of the scan pool (src/flush/scan-pool.ts). Each job names the image's windows by
// address (the daemon's mapping; threads share the address space), and the thread claims
// pieces of the job from a shared counter until none is left: a scan writes each chunk's hash
// into the shared result array; an open (sealed populate) reads slots from the volume's files
// (the process's fds) and opens them into the image, marking failed slots in a shared array;
// a seal (large sealed flush) seals staged chunks into their slots and writes them.
// A piece that fails stops the job for every thread and is reported with its number, so the
// daemon can name its chunks.
//
// The views over the windows are kept from job to job: making one costs V8 a note of external
// memory as large as the window (and, measured, up to ~15 ms of garbage collection per 256 MiB),
// which per job made the pool slower than one thread. A view is only an address and a length,
// kept only for the windows the latest job named, and used only when a job names that range again.

import { parentPort } from 'node:worker_threads';
import { viewAtAddress } from '../sys/libc.js';
import { VbdError } from '../common/errors.js';
import { slotKeyOf, type SlotKey } from '../store/keys.js';
import { openSlots, sealSlots } from '../store/slot-runs.js';
import { ChunkViews, STOP_CLAIMS, hashItems, itemCount, type PoolJob, type PoolKey, type ScanReply } from './scan-job.js';

let kept = new Map<string, Buffer>();

/** Views of the job's windows: those of the previous job reused, the others made. */
function viewsOf(job: PoolJob): ChunkViews {
  // A job without windows (a seal reads the staging buffers) keeps the views of the last one.
  if (job.windows.length === 0) return new ChunkViews([], job.chunkSize);
  const now = new Map<string, Buffer>();
  const windows = job.windows.map((w) => {
    const key = `${w.address}:${w.length}`;
    const view = kept.get(key) ?? viewAtAddress(w.address, w.length);
    now.set(key, view);
    return { offset: w.offset, length: w.length, view };
  });
  kept = now;
  return new ChunkViews(windows, job.chunkSize);
}

/** Work of pieces [first, end) of a job's items. */
type PieceWork = (first: number, end: number) => void;

/** A job's slot key, its bytes as Buffers (they arrive as plain Uint8Arrays; the same bytes, wiped after the job). */
function slotKeyFrom(k: PoolKey): SlotKey {
  const asBuffer = (b: Uint8Array): Buffer => Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  return slotKeyOf(asBuffer(k.key), k.generation, asBuffer(k.uuid));
}

/** This thread's buffer of whole slots for one read or write call, kept from job to job. */
function slotBufferFor(slotBytes: number): Buffer {
  const bytes = Math.max(1, Math.floor(SLOT_RUN_BYTES / slotBytes)) * slotBytes;
  if (slotBuffer?.length !== bytes) slotBuffer = Buffer.alloc(bytes);
  return slotBuffer;
}

function workOf(job: PoolJob, views: ChunkViews): { count: number; work: PieceWork; done(): void } {
  switch (job.kind) {
    case 'scan':
      return { count: itemCount(job.items), work: (first, end) => hashItems(views, job.items, first, end, job.out), done: () => undefined };
    case 'open': {
      const keys = new Map(job.keys.map((k) => [k.generation, slotKeyFrom(k)]));
      const keyOf = (g: number): SlotKey => {
        const key = keys.get(g);
        if (key === undefined) throw new VbdError(`internal: no slot key of generation ${g} was sent with the job`);
        return key;
      };
      const target = { chunk: (i: number) => views.view(job.src.first + i), damaged: job.damaged, zero: job.zero };
      const buf = slotBufferFor(job.src.slotBytes);
      return {
        count: job.src.count,
        work: (first, end) => openSlots(job.src, first, end, keyOf, target, buf),
        done: () => {
          for (const k of job.keys) k.key.fill(0);
        },
      };
    }
    case 'seal': {
      const key = slotKeyFrom(job.key);
      const buf = slotBufferFor(job.targets.slotBytes);
      return { count: job.targets.chunk.length, work: (first, end) => sealSlots(job.targets, first, end, key, buf), done: () => job.key.key.fill(0) };
    }
  }
}

/** Bytes of slots read or written per call by this thread. */
const SLOT_RUN_BYTES = 2 ** 20;
let slotBuffer: Buffer | undefined;

function run(job: PoolJob): ScanReply {
  let piece = -1;
  let done = (): void => undefined;
  try {
    const views = viewsOf(job);
    const { count, work, done: end } = workOf(job, views);
    done = end;
    for (;;) {
      piece = Atomics.add(job.next, 0, 1);
      const first = piece * job.pieceItems;
      if (first >= count) break;
      Atomics.store(job.busy, job.slot, piece);
      work(first, Math.min(count, first + job.pieceItems));
    }
    Atomics.store(job.busy, job.slot, -1);
    return { kind: 'done' };
  } catch (err) {
    Atomics.store(job.next, 0, STOP_CLAIMS);
    return { kind: 'failed', piece, message: err instanceof Error ? err.message : String(err) };
  } finally {
    done();
  }
}

const port = parentPort;
if (port === null) throw new Error('scan-worker.js runs as a worker thread of the scan pool');
port.on('message', (job: PoolJob) => port.postMessage(run(job)));
port.postMessage({ kind: 'ready' } satisfies ScanReply);
