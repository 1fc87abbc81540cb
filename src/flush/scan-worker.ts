// One thread of the scan pool (src/flush/scan-pool.ts). Each job names the image's windows by
// address (the daemon's mapping; threads share the address space), and the thread claims
// pieces of the job from a shared counter until none is left, writing each chunk's hash into
// the shared result array. A piece that fails stops the job for every thread and is reported
// with its number, so the daemon can name its chunks.
//
// The views over the windows are kept from job to job: making one costs V8 a note of external
// memory as large as the window (and, measured, up to ~15 ms of garbage collection per 256 MiB),
// which per job made the pool slower than one thread. A view is only an address and a length,
// kept only for the windows the latest job named, and used only when a job names that range again.

import { parentPort } from 'node:worker_threads';
import { viewAtAddress } from '../sys/libc.js';
import { ChunkViews, STOP_CLAIMS, hashItems, itemCount, type ScanJob, type ScanReply } from './scan-job.js';

let kept = new Map<string, Buffer>();

/** Views of the job's windows: those of the previous job reused, the others made. */
function viewsOf(job: ScanJob): ChunkViews {
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

function run(job: ScanJob): ScanReply {
  let piece = -1;
  try {
    const views = viewsOf(job);
    const count = itemCount(job.items);
    for (;;) {
      piece = Atomics.add(job.next, 0, 1);
      const first = piece * job.pieceItems;
      if (first >= count) break;
      Atomics.store(job.busy, job.slot, piece);
      hashItems(views, job.items, first, Math.min(count, first + job.pieceItems), job.out);
    }
    Atomics.store(job.busy, job.slot, -1);
    return { kind: 'done' };
  } catch (err) {
    Atomics.store(job.next, 0, STOP_CLAIMS);
    return { kind: 'failed', piece, message: err instanceof Error ? err.message : String(err) };
  }
}

const port = parentPort;
if (port === null) throw new Error('scan-worker.js runs as a worker thread of the scan pool');
port.on('message', (job: ScanJob) => port.postMessage(run(job)));
port.postMessage({ kind: 'ready' } satisfies ScanReply);
