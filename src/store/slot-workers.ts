// Populate of a sealed volume on every core: AES-GCM in Node costs about 40 µs per 64 KiB slot on
// one core, so a 1 GiB volume would keep the daemon's only thread busy for most of a second —
// unable to answer its pipes — and leave the other cores idle. Batches of chunks go to worker
// threads (src/store/slot-worker.ts), each reading, opening and writing its chunks into the image
// file; the daemon's thread only hands out batches and counts progress.

import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { VbdError } from '../common/errors.js';

/** What a worker is started with (its copy of the keys is wiped when it is done). */
export interface OpenWorkerData {
  imageFd: number;
  chunkSize: number;
  slotBytes: number;
  uuid: Uint8Array;
  keys: { generation: number; key: Uint8Array }[];
}

/** Chunks to open: chunk number, the fd and offset of its slot, the epoch and key generation it was sealed for. */
export interface OpenBatch {
  id: number;
  chunks: Uint32Array;
  fds: Int32Array;
  offsets: Float64Array;
  epochs: Float64Array;
  generations: Uint32Array;
}

export interface OpenResult {
  id: number;
  /** Chunks whose slot failed authentication (written as zeros). */
  damaged: number[];
  /** A read that failed: the batch stopped there. */
  error?: { chunk: number; fd: number; offset: number; message: string };
}

export interface SlotSource {
  fd: number;
  /** The file's name, for messages. */
  name: string;
  offset: number;
  epoch: number;
  generation: number;
}

export interface OpenSlotsOptions {
  imageFd: number;
  chunkSize: number;
  slotBytes: number;
  chunkCount: number;
  uuid: Buffer;
  /** The slot key of every generation in use. */
  keys: ReadonlyMap<number, Buffer>;
  source: (chunk: number) => SlotSource;
  progress?: ((bytes: number) => void) | undefined;
}

/** Bytes of chunks per batch: small enough to spread the work and report progress, large enough to be cheap to hand out. */
const BATCH_BYTES = 16 * 2 ** 20;
const MAX_THREADS = 4;

function batchOf(o: OpenSlotsOptions, id: number, first: number, end: number): OpenBatch {
  const n = end - first;
  const batch: OpenBatch = {
    id, chunks: new Uint32Array(n), fds: new Int32Array(n), offsets: new Float64Array(n), epochs: new Float64Array(n), generations: new Uint32Array(n),
  };
  for (let i = 0; i < n; i++) {
    const s = o.source(first + i);
    batch.chunks[i] = first + i;
    batch.fds[i] = s.fd;
    batch.offsets[i] = s.offset;
    batch.epochs[i] = s.epoch;
    batch.generations[i] = s.generation;
  }
  return batch;
}

/**
 * Opens every chunk's slot into the image file (chunk c at byte c × chunkSize) on worker threads;
 * resolves with the chunks whose slots failed authentication (zeroed in the image).
 */
export async function openSlotsInto(o: OpenSlotsOptions): Promise<number[]> {
  const perBatch = Math.max(1, Math.floor(BATCH_BYTES / o.chunkSize));
  const batches = Math.ceil(o.chunkCount / perBatch);
  const threads = Math.max(1, Math.min(availableParallelism(), MAX_THREADS, batches));
  const keys = [...o.keys].map(([generation, key]) => ({ generation, key: Uint8Array.from(key) }));
  const data: OpenWorkerData = { imageFd: o.imageFd, chunkSize: o.chunkSize, slotBytes: o.slotBytes, uuid: Uint8Array.from(o.uuid), keys };
  const workers: Worker[] = [];
  try {
    // Each worker gets its own copy of the keys (structured clone); ours are wiped right after.
    for (let i = 0; i < threads; i++) workers.push(new Worker(new URL('./slot-worker.js', import.meta.url), { workerData: data }));
  } finally {
    for (const k of keys) k.key.fill(0);
  }
  const damaged: number[] = [];
  let next = 0;
  try {
    await Promise.all(workers.map((worker) => new Promise<void>((resolve, reject) => {
      const give = (): void => {
        if (next === batches) return resolve();
        const first = next * perBatch;
        const end = Math.min(o.chunkCount, first + perBatch);
        worker.postMessage(batchOf(o, next++, first, end));
      };
      worker.on('message', (result: OpenResult) => {
        damaged.push(...result.damaged);
        if (result.error !== undefined) {
          const e = result.error;
          return reject(new VbdError(`read of the slot of chunk ${e.chunk} in '${o.source(e.chunk).name}' at offset ${e.offset} failed: ${e.message}`));
        }
        const perResult = Math.min(perBatch, o.chunkCount - result.id * perBatch);
        o.progress?.(perResult * o.chunkSize);
        give();
      });
      worker.on('error', (err) => reject(new VbdError(`a slot-opening thread failed: ${err.message}`)));
      worker.on('exit', (code) => (code !== 0 ? reject(new VbdError(`a slot-opening thread exited with code ${code}`)) : undefined));
      give();
    })));
  } finally {
    // Each worker wipes its keys and buffers, then ends; one that does not within 10 s is stopped.
    await Promise.all(workers.map(async (worker) => {
      const exited = new Promise<void>((resolve) => worker.once('exit', () => resolve()));
      worker.postMessage('wipe');
      const timer = setTimeout(() => void worker.terminate(), 10_000);
      await exited;
      clearTimeout(timer);
    }));
  }
  return damaged.sort((a, b) => a - b);
}
