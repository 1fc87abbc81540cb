// The scan pool: worker threads that work on disjoint pieces of the RAM image, so the daemon's
// large jobs use every core while its own thread keeps answering its pipes: a full scan (and any
// large set of chunks) hashes there; a sealed volume's populate opens its slots there, and a
// large sealed commit seals its slots there (src/store/slot-runs.ts). One pool per daemon: its
// threads start at the first such job, serve every session of the daemon, and end with it (`close`).
//
// The threads read the daemon's own mapping of the image by address — no copy, no mapping of
// their own (measured against pread into each thread's buffer and a per-thread mmap of the
// image fd: docs/PERFORMANCE.md). The mapping outlives every job: the engine awaits a job
// before it flushes again, and the image is unmapped only after the session's final flush.
// Idle threads are unref'd (they never hold the daemon up at exit); a running job keeps it alive.
//
// Any failure — a thread's error, a thread that exits — fails the job with one line naming the
// thread and the chunks it was on; the pool then switches itself off for the rest of the
// daemon's life (scans, opens and seals run on the daemon's thread, slower but the same bytes:
// scan-job.ts, slot-runs.ts), and says why in `state()`.

import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { VbdError } from '../common/errors.js';
import type { SlotKey } from '../store/keys.js';
import type { SealTargets, SlotSources } from '../store/slot-runs.js';
import { describePiece, itemCount, pieceItems as piecesFor, type PoolJob, type PoolJobBody, type PoolKey, type ScanItems, type ScanReply } from './scan-job.js';

const WORKER_URL = new URL('./scan-worker.js', import.meta.url);

/** The image's windows as the pool needs them (ImageWindow has these). */
export interface PoolWindow {
  offset: number;
  length: number;
  address: bigint;
}

/** What `status` shows of the pool. */
export interface ScanPoolState {
  threads: number;
  /** Threads started over the daemon's life (one pool: stays `threads` from flush to flush). */
  started: number;
  /** Why the pool is off (scans run on the daemon's thread). */
  off?: string;
}

/** One job for the threads: what it is for error lines, and the message each thread gets. */
interface PoolTask {
  what: string;
  verb: string;
  count: number;
  pieceItems: number;
  job: PoolJobBody;
  describe(piece: number): string | undefined;
}

/** A slot key as a pool thread gets it: its bytes, copied into the message. */
function keyBytes(key: SlotKey): PoolKey {
  return { generation: key.generation, key: key.key, uuid: key.uuid };
}

function addresses(windows: readonly PoolWindow[]): PoolWindow[] {
  return windows.map((w) => ({ offset: w.offset, length: w.length, address: w.address }));
}

interface Member {
  worker: Worker;
  slot: number;
  ready: Promise<void>;
  /** Set while a job runs on this thread. */
  settle: ((reply: ScanReply | Error) => void) | undefined;
  gone: boolean;
}

export class ScanPool {
  readonly threads: number;
  private members: Member[] = [];
  private started = 0;
  private off: string | undefined;
  private closed = false;
  private running: Promise<unknown> = Promise.resolve();

  /** `threads`: how many (default: the cores the process may use). */
  constructor(threads = availableParallelism()) {
    this.threads = Math.max(1, Math.floor(threads));
    if (this.threads < 2) this.off = 'one thread only: scans run on the daemon\'s thread';
  }

  /** Whether scans may use the pool. */
  get usable(): boolean {
    return this.off === undefined && !this.closed;
  }

  state(): ScanPoolState {
    return { threads: this.usable ? this.threads : 1, started: this.started, ...(this.off !== undefined ? { off: this.off } : {}) };
  }

  private spawn(slot: number): Member {
    const worker = new Worker(WORKER_URL);
    this.started++;
    let markReady: () => void = () => undefined;
    let failReady: (err: Error) => void = () => undefined;
    const ready = new Promise<void>((resolve, reject) => {
      markReady = resolve;
      failReady = reject;
    });
    ready.catch(() => undefined);
    const member: Member = { worker, slot, ready, settle: undefined, gone: false };
    const end = (why: Error): void => {
      member.gone = true;
      failReady(why);
      const settle = member.settle;
      member.settle = undefined;
      settle?.(why);
    };
    worker.on('message', (reply: ScanReply) => {
      if (reply.kind === 'ready') return markReady();
      const settle = member.settle;
      member.settle = undefined;
      settle?.(reply);
    });
    worker.on('error', (err) => end(err));
    worker.on('exit', (code) => end(new Error(`the thread exited (code ${code})`)));
    worker.unref();
    return member;
  }

  /**
   * Hashes `items` of the image into out[chunk] (`out` on a SharedArrayBuffer), the threads
   * claiming pieces of it (scan-job.ts, pieceItems). Jobs run one at a time.
   */
  hash(windows: readonly PoolWindow[], chunkSize: number, items: ScanItems, out: BigUint64Array): Promise<void> {
    if (!(out.buffer instanceof SharedArrayBuffer)) throw new VbdError('internal: the scan pool writes its hashes into a SharedArrayBuffer');
    const count = itemCount(items);
    const pieceItems = piecesFor(chunkSize, count, this.threads);
    return this.queue({
      what: `full scan of ${count} chunks`, verb: 'hashing', count, pieceItems,
      job: { kind: 'scan', windows: addresses(windows), chunkSize, items, pieceItems, out },
      describe: (piece) => describePiece(items, pieceItems, piece, chunkSize),
    });
  }

  /**
   * Reads and opens the slots `src` names straight into the image (populate of a sealed volume),
   * marking in `damaged` (shared) the entries that fail authentication, zeroed if `zero`.
   */
  open(windows: readonly PoolWindow[], chunkSize: number, src: SlotSources, keyOf: (generation: number) => SlotKey, damaged: Uint8Array, zero: boolean): Promise<void> {
    if (!(damaged.buffer instanceof SharedArrayBuffer) || !(src.file.buffer instanceof SharedArrayBuffer)) throw new VbdError('internal: the pool opens slots from and into SharedArrayBuffers');
    // The threads get the slot keys' bytes (same process, same trust); each wipes its copies after the job.
    const keys = [...new Set(src.generation)].map((g) => keyBytes(keyOf(g)));
    const pieceItems = piecesFor(chunkSize, src.count, this.threads);
    return this.queue({
      what: `populate of chunks ${src.first}–${src.first + src.count - 1}`, verb: 'opening', count: src.count, pieceItems,
      job: { kind: 'open', windows: addresses(windows), chunkSize, src, keys, pieceItems, damaged, zero },
      describe: (piece) => describePiece({ from: src.first, to: src.first + src.count }, pieceItems, piece, chunkSize),
    });
  }

  /** Seals the chunks `t` names from their staging buffers and writes the slots (a large sealed flush). */
  seal(t: SealTargets, key: SlotKey): Promise<void> {
    const count = t.chunk.length;
    const pieceItems = piecesFor(t.chunkSize, count, this.threads);
    return this.queue({
      what: `sealing ${count} chunks for epoch ${t.epoch}`, verb: 'sealing', count, pieceItems,
      job: { kind: 'seal', windows: [], chunkSize: t.chunkSize, targets: t, key: keyBytes(key), pieceItems },
      describe: (piece) => {
        const first = piece * pieceItems;
        const end = Math.min(count, first + pieceItems);
        return piece < 0 || first >= end ? undefined : `${end - first} chunks (chunk ${t.chunk[first]} first)`;
      },
    });
  }

  private queue(task: PoolTask): Promise<void> {
    const run = this.running.then(() => this.run(task));
    this.running = run.catch(() => undefined);
    return run;
  }

  private async run(task: PoolTask): Promise<void> {
    if (!this.usable) throw new VbdError(`internal: the scan pool is off (${this.off ?? 'closed'})`);
    for (let slot = 0; slot < this.threads; slot++) {
      if (this.members[slot] === undefined || this.members[slot]?.gone === true) this.members[slot] = this.spawn(slot);
    }
    const members = this.members.slice(0, this.threads);
    const next = new Int32Array(new SharedArrayBuffer(4));
    const busy = new Int32Array(new SharedArrayBuffer(4 * members.length)).fill(-1);
    // Referenced while the job runs (their start included): an awaited job keeps the process alive.
    for (const m of members) m.worker.ref();
    const replies = await Promise.all(members.map(async (m): Promise<ScanReply | Error> => {
      try {
        await m.ready;
      } catch (err) {
        return err instanceof Error ? err : new Error(String(err));
      }
      return new Promise((resolve) => {
        m.settle = resolve;
        m.worker.postMessage({ ...task.job, next, busy, slot: m.slot } satisfies PoolJob);
      });
    }));
    for (const m of members) if (!m.gone) m.worker.unref();
    const failed = replies.flatMap((reply, slot) => {
      const who = `thread ${slot + 1} of ${members.length}`;
      if (reply instanceof Error) {
        const piece = task.describe(busy[slot] ?? -1);
        return [`${who} ended ${piece === undefined ? 'before it took a piece' : `while ${task.verb} ${piece}`}: ${reply.message}`];
      }
      if (reply.kind === 'failed') {
        const piece = task.describe(reply.piece);
        return [`${who} failed ${piece === undefined ? 'before its first piece' : `${task.verb} ${piece}`}: ${reply.message}`];
      }
      return [];
    });
    if (failed.length === 0) return;
    const line = `${task.what}: ${failed.join('; ')}`;
    this.switchOff(`a job failed (${line}); scans and populates run on the daemon's thread`);
    throw new VbdError(line);
  }

  private switchOff(why: string): void {
    this.off ??= why;
    void this.terminate();
  }

  private async terminate(): Promise<void> {
    const members = this.members;
    this.members = [];
    await Promise.all(members.map((m) => (m.gone ? undefined : m.worker.terminate())));
  }

  /** Ends the threads (daemon exit); waits for a running job first. */
  async close(): Promise<void> {
    this.closed = true;
    await this.running;
    await this.terminate();
  }
}
