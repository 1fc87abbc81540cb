// The flush engine: writes back only what changed, as one crash-atomic, point-in-time batch.
//
//  1. idle check: syncfs the filesystem mounted on the device (or fsync the raw device), so
//     pending writes reach the image, then cut the change tracker's set (src/flush/tracking.ts:
//     the chunks the block layer saw written since the last cut); empty → nothing to do, no
//     scan, no I/O. Without tracking: the loop write counter unchanged since the last flush;
//  2. capture: hash the chunks the set names (every chunk when the set may be incomplete: a
//     full scan) and stage those that differ from the files' state (xxh64), in file order,
//     while writers run; then, with the filesystem frozen, cut again and hash those chunks and
//     the staged ones again, re-staging only what changed meanwhile (writers stall for that
//     pass, not a copy). Writes traced after a cut, and the thaw's, are the next flush's;
//  3. commit the batch through the chunk store —
//     plain: journal it and sync, apply it to the files and sync them, retire the journal;
//     sealed: seal the chunks into free slots, sync, commit the position map (copy-on-write:
//     no journal, no double write; src/store/sealed-store.ts).
// Only then are the chunk hashes updated: a failed flush leaves everything dirty, in RAM,
// and is retried. The hashes are of the plaintext in RAM and never leave the daemon.

import { xxh64 } from '@node-rs/xxhash';
import { VbdError, failure } from '../common/errors.js';
import { deviceCounters, sectorsWritten, syncDevice, type LoopDevice } from '../device/loop.js';
import { syncMounted, whileFrozen } from '../device/freeze.js';
import type { Mounted } from '../device/mount.js';
import type { ShadowImage } from '../shadow/image.js';
import type { ChunkStore, CommitReport } from '../store/chunk-store.js';
import { slotSize } from '../store/slot.js';
import { isPlainVolume, type AnyVolume } from '../volume/volume.js';
import type { FlushReport } from '../daemon/runtime.js';
import { applyBatch, settleJournal } from './apply.js';
import { retireJournal, writeBatch, type JournalEntry } from './journal.js';
import { ChunkViews, hashItems, itemCount, type ScanItems } from './scan-job.js';
import type { ScanPool, ScanPoolState } from './scan-pool.js';
import type { ChangeTracker } from './tracking.js';
import { formatEvent, messageOf, type DaemonEvent, type Report } from '../daemon/events.js';

/** Set (to 1) by the test suite: every tracked flush also scans and fails if the set missed a change. */
export const VERIFY_TRACKING_ENV = 'VBD_SHADOW_VERIFY_TRACKING';
/** How long the verification waits for the trace of a write still in flight at the cut. */
const VERIFY_GRACE_MS = 2000;

const STAGING_BLOCK = 64 * 2 ** 20;
/** Staging beyond this is given back after a flush (a one-off burst should not pin RAM). */
const STAGING_KEEP = 256 * 2 ** 20;
/** Files are re-read this much at a time when their state must be learned again. */
const REHASH_BYTES = 64 * 2 ** 20;
/**
 * Fewer bytes to hash than this are hashed on the daemon's thread: handing them to the pool
 * costs more than it saves (bench: `--only scan`).
 */
export const POOL_MIN_BYTES = 128 * 2 ** 20;
/** A sealed commit of at least this much seals on the pool: sealing costs ~1 ms per MiB on one thread. */
export const SEAL_POOL_MIN_BYTES = 16 * 2 ** 20;

interface StagedChunk {
  slot: number;
  hash: bigint;
}

export type FlushTimings = {
  syncMs: number;
  freezeMs: number;
  frozenMs: number;
  scanMs: number;
  journalMs: number;
  applyMs: number;
};

/** Which chunks a capture pass looks at: those named (file order), or all of them. */
type Selection = { all: true; reason: string } | { all: false; chunks: Uint32Array };

export interface FlushResult extends FlushReport {
  idle: boolean;
  journalBytes: number;
  timings?: FlushTimings;
}

export type SealedCommit = Extract<CommitReport, { kind: 'sealed' }>;

export class FlushEngine {
  /** xxh64 of each chunk as the backing files hold it. */
  private readonly hashes: BigUint64Array;
  private readonly order: Uint32Array;
  /** Each chunk's position in `order`. */
  private readonly rank: Uint32Array;
  private readonly views: ChunkViews;
  /** The scan pool's answers, by chunk (shared with its threads); made at the first pooled scan. */
  private current: BigUint64Array | undefined;
  /** Staging memory for captured chunks, reused from flush to flush. */
  private staging: Buffer[] = [];
  /** Set when the files changed behind our back: the next flush scans even if the device is idle. */
  private mustScan = false;
  /** Why the next flush must scan everything (the engine's reasons; the tracker has its own). */
  private scanReason: string | undefined;
  private baseline = 0;
  private seq = 0;
  private lastFailed = false;
  private queue: Promise<unknown> = Promise.resolve();
  /** The loop device, while attached: the write counter and fsync target. */
  device: LoopDevice | undefined;
  /** Our mount of the device's filesystem, while mounted: synced and frozen through its root fd. */
  mounted: Mounted | undefined;
  /** Called right after the engine wrote to the backing files (so those writes are known as ours). */
  afterWrite: (() => void) | undefined;
  /** Sealed: called once a commit is durable (root's record of epochs; its reservations are kept by the store's own hook). */
  afterCommit: ((commit: SealedCommit) => void) | undefined;
  /** The session's change tracker; without one every flush scans (recovery). */
  tracker: ChangeTracker | undefined;
  /** The daemon's threads for large scans; without it (or while it is off) the daemon's thread hashes. */
  scanPool: ScanPool | undefined;
  /** Every tracked flush also scans, and fails if the tracked set missed a changed chunk. */
  verifyTracking = process.env[VERIFY_TRACKING_ENV] === '1';

  /** `journalFd`: the plain volume's flush journal (a sealed volume commits copy-on-write, without one). */
  constructor(
    private readonly volume: AnyVolume,
    private readonly image: ShadowImage,
    private readonly store: ChunkStore,
    private readonly journalFd: number | undefined,
    private readonly report: Report,
  ) {
    const { chunkSize, deviceSize } = volume.manifest;
    if (store.kind === 'plain' && journalFd === undefined) throw new VbdError('internal: a plain volume flushes through its journal');
    this.hashes = new BigUint64Array(deviceSize / chunkSize);
    this.views = new ChunkViews(image.windows, chunkSize);
    this.order = store.writeOrder();
    this.rank = new Uint32Array(this.order.length);
    this.order.forEach((chunk, i) => (this.rank[chunk] = i));
  }

  /** 'block-layer', or why flushes scan the whole image. */
  trackingMode(): string {
    if (this.tracker === undefined) return 'full-scan (no change tracking)';
    const mode = this.tracker.mode();
    return this.scanReason !== undefined && mode === 'block-layer' ? `full-scan (${this.scanReason})` : mode;
  }

  /** The next flush scans everything (and says why). */
  private requireScan(reason: string): void {
    this.mustScan = true;
    this.scanReason ??= reason;
    this.tracker?.requireScan(reason);
  }

  /** The chunks in file order. */
  private inFileOrder(chunks: Iterable<number>): Uint32Array {
    const list = Uint32Array.from(new Set(chunks));
    return list.sort((a, b) => (this.rank[a] ?? 0) - (this.rank[b] ?? 0));
  }

  private chunkView(chunk: number): Buffer {
    return this.views.view(chunk);
  }

  /** The threads large scans use: the pool's, or 1 (the daemon's thread). */
  scanState(): ScanPoolState {
    return this.scanPool?.state() ?? { threads: 1, started: 0 };
  }

  /**
   * Hashes `items` on the scan pool's threads when they are worth it: returns the hashes by
   * chunk (valid for `items` only, until the next call), or undefined — the caller hashes on
   * the daemon's thread (small scans, no pool, the pool off).
   */
  private async hashMany(items: ScanItems): Promise<BigUint64Array | undefined> {
    const pool = this.scanPool;
    if (pool === undefined || !pool.usable || itemCount(items) * this.volume.manifest.chunkSize < POOL_MIN_BYTES) return undefined;
    this.current ??= new BigUint64Array(new SharedArrayBuffer(this.hashes.length * 8));
    await pool.hash(this.image.windows, this.volume.manifest.chunkSize, items, this.current);
    return this.current;
  }

  /** Records the image as the files' state (right after populate). */
  async hashImage(): Promise<void> {
    const all = { from: 0, to: this.hashes.length };
    let current: BigUint64Array | undefined;
    try {
      current = await this.hashMany(all);
    } catch (err) {
      // Nothing to retry here (no flush): said once, and hashed on the daemon's thread (the pool is off now).
      this.report({ kind: 'scan-pool-failed', error: messageOf(err) });
    }
    if (current !== undefined) this.hashes.set(current);
    else hashItems(this.views, all, 0, this.hashes.length, this.hashes);
  }

  /**
   * Records what the files hold now, for all files (recovery of an image whose flush state was
   * lost) or one (changed behind our back): the next flush rewrites exactly the chunks that
   * differ. A sealed slot that fails authentication counts as differing from anything.
   */
  hashFiles(only?: number): void {
    const { chunkSize } = this.volume.manifest;
    const perRead = Math.max(1, Math.floor(REHASH_BYTES / chunkSize));
    const wanted = (chunk: number): boolean => only === undefined || this.store.locate(chunk).file === only;
    const runs: [number, number][] = [];
    for (let chunk = 0; chunk < this.hashes.length; ) {
      if (!wanted(chunk)) {
        chunk++;
        continue;
      }
      let end = chunk + 1;
      while (end < this.hashes.length && end - chunk < perRead && wanted(end)) end++;
      runs.push([chunk, end]);
      chunk = end;
    }
    const buf = Buffer.alloc(runs.reduce((most, [first, end]) => Math.max(most, end - first), 0) * chunkSize);
    for (const [first, end] of runs) {
      const damaged = this.store.read(first, end, buf, { damaged: 'zero' });
      for (let c = first; c < end; c++) this.hashes[c] = xxh64(buf.subarray((c - first) * chunkSize, (c - first + 1) * chunkSize));
      this.markDirty(damaged.map((d) => d.chunk));
    }
    buf.fill(0);
    this.requireScan(only === undefined ? 'the files\' state was learned again (recovery)' : 'external change of the files');
  }

  /** Makes these chunks differ from the files' recorded state: the next flush rewrites them. */
  markDirty(chunks: readonly number[]): void {
    for (const chunk of chunks) this.hashes[chunk] = xxh64(this.chunkView(chunk)) ^ 1n;
    if (chunks.length > 0) this.mustScan = true;
    this.tracker?.mark(chunks);
  }

  /** Sectors written to the device since the last completed capture. */
  pendingSectors(): number {
    return this.device === undefined ? 0 : sectorsWritten(this.device) - this.baseline;
  }

  /** Sets the write-counter baseline (after attach, and after each capture). */
  resetBaseline(): void {
    if (this.device !== undefined) this.baseline = sectorsWritten(this.device);
  }

  /** Resolves when no flush is running or queued. */
  settled(): Promise<unknown> {
    return this.queue;
  }

  /** Queues a flush (flushes never overlap). `full` skips the idle shortcut (teardown). */
  flush(reason: string, full = false): Promise<FlushResult> {
    const run = this.queue.then(() => this.flushNow(reason, full));
    this.queue = run.catch(() => undefined);
    return run;
  }

  /** A staging slot for the n-th captured chunk; the blocks are kept for the next flushes. */
  private stagingSlot(n: number): Buffer {
    const { chunkSize } = this.volume.manifest;
    const perBlock = Math.max(1, Math.floor(STAGING_BLOCK / chunkSize));
    const blockIndex = Math.floor(n / perBlock);
    // On shared memory: a large sealed commit seals from here on the pool's threads.
    while (this.staging.length <= blockIndex) this.staging.push(Buffer.from(new SharedArrayBuffer(perBlock * chunkSize)));
    const at = (n % perBlock) * chunkSize;
    return (this.staging[blockIndex] as Buffer).subarray(at, at + chunkSize);
  }

  /**
   * Copies every chunk whose hash differs from the files' into staging, in file order.
   * Given an earlier pass (`staged`), a chunk still equal to its staged copy is not copied
   * again: the pass made while writers run does the bulk, the frozen pass only verifies.
   * (The frozen pass is the one given `staged`; nothing changes under it.)
   */
  private async stage(selection: Selection, staged?: Map<number, StagedChunk>): Promise<Map<number, StagedChunk>> {
    const result = new Map<number, StagedChunk>();
    let next = 0;
    for (const s of staged?.values() ?? []) next = Math.max(next, s.slot + 1);
    // A full scan hashes in device order (one sweep of the mapping), the copies go in file order.
    const current = await this.hashMany(selection.all ? { from: 0, to: this.hashes.length } : selection.chunks);
    for (const chunk of selection.all ? this.order : selection.chunks) {
      const hash = current?.[chunk] ?? xxh64(this.chunkView(chunk));
      if (hash === this.hashes[chunk]) continue;
      const earlier = staged?.get(chunk);
      if (earlier !== undefined && earlier.hash === hash) {
        result.set(chunk, earlier);
        continue;
      }
      const slot = earlier?.slot ?? next++;
      const copy = this.stagingSlot(slot);
      this.chunkView(chunk).copy(copy);
      // Live writers may change the chunk between hash and copy: record what was copied.
      result.set(chunk, { slot, hash: staged === undefined ? xxh64(copy) : hash });
    }
    return result;
  }

  /** The capture as journal entries (file order), for a plain volume. */
  private entriesOf(staged: Map<number, StagedChunk>): JournalEntry[] {
    const entries: JournalEntry[] = [];
    for (const [chunk, s] of staged) {
      const place = this.store.locate(chunk);
      entries.push({ file: place.file, offset: place.offset, data: this.stagingSlot(s.slot) });
    }
    return entries;
  }

  /** Plain: journal → sync → files → sync → retire. */
  private async commitPlain(staged: Map<number, StagedChunk>, t: FlushTimings): Promise<{ journalBytes: number; bytesWritten: number }> {
    const volume = this.volume;
    const journalFd = this.journalFd;
    if (!isPlainVolume(volume) || journalFd === undefined) throw new VbdError('internal: a journaled commit of a sealed volume');
    const entries = this.entriesOf(staged);
    const batch = { seq: ++this.seq, chunkSize: volume.manifest.chunkSize, entries };
    const j0 = performance.now();
    const journalBytes = writeBatch(journalFd, batch);
    t.journalMs = performance.now() - j0;
    const a0 = performance.now();
    this.lastFailed = true; // until the batch is in the files, the journal holds it
    const bytesWritten = (await applyBatch(volume, batch)).bytes;
    retireJournal(journalFd);
    t.applyMs = performance.now() - a0;
    return { journalBytes, bytesWritten };
  }

  /** Sealed: every changed chunk sealed into a free slot, then the map: one copy-on-write commit. */
  private async commitSealed(staged: Map<number, StagedChunk>, t: FlushTimings): Promise<{ bytesWritten: number; commit: SealedCommit; threads: number }> {
    const chunks = Uint32Array.from(staged.keys()).sort();
    const a0 = performance.now();
    const write = this.store.begin(chunks);
    const from = (chunk: number): Buffer => {
      const s = staged.get(chunk);
      if (s === undefined) throw new VbdError(`internal: chunk ${chunk} was not staged`);
      return this.stagingSlot(s.slot);
    };
    const pool = this.scanPool;
    let report: CommitReport;
    let threads = 0;
    try {
      // Many chunks are sealed on the pool's threads (the daemon keeps answering its pipes); a few here.
      if (write.writeOnPool !== undefined && pool?.usable === true && chunks.length * this.volume.manifest.chunkSize >= SEAL_POOL_MIN_BYTES) {
        threads = pool.threads;
        await write.writeOnPool(chunks, from, pool);
      } else {
        for (const chunk of chunks) write.write(chunk, chunk + 1, from(chunk));
      }
      report = write.commit();
    } catch (err) {
      write.abort();
      throw err;
    }
    t.applyMs = performance.now() - a0;
    if (report.kind !== 'sealed') throw new VbdError('internal: a sealed store reported a plain commit');
    this.afterCommit?.(report);
    // Overflowing chunks are written twice: into the journal, then into place.
    const slots = report.chunks + report.throughJournal;
    return { bytesWritten: slots * slotSize(this.volume.manifest.chunkSize), commit: report, threads };
  }

  /** The selection a cut gives: its chunks (and `extra`) in file order, or everything with a reason. */
  private select(cutChunks: Iterable<number>, scanReason: string | undefined, extra: Iterable<number> = []): Selection {
    const reason = this.scanReason ?? scanReason;
    if (reason !== undefined) return { all: true, reason };
    return { all: false, chunks: this.inFileOrder([...cutChunks, ...extra]) };
  }

  private async flushNow(reason: string, full: boolean): Promise<FlushResult> {
    const started = performance.now();
    const at = new Date().toISOString();
    const t: FlushTimings = { syncMs: 0, freezeMs: 0, frozenMs: 0, scanMs: 0, journalMs: 0, applyMs: 0 };
    const tracker = this.tracker?.active === true ? this.tracker : undefined;
    /** Chunks cut from the tracker by this flush: back into the set if it fails. */
    const taken: number[] = [];
    let tracking = this.trackingMode();
    let chunksHashed = 0;
    try {
      // Push pending writes into the image, so the write counter and the trace see them: a
      // filesystem on the device keeps its own dirty pages until synced; the raw device's
      // buffers need fsync.
      const mounted = this.device !== undefined ? this.mounted : undefined;
      if (mounted !== undefined) await syncMounted(mounted);
      else if (this.device !== undefined) syncDevice(this.device);
      t.syncMs = performance.now() - started;
      const counters = this.device === undefined ? undefined : deviceCounters(this.device);
      const counter = counters?.written ?? 0;
      // The capture point: the set of chunks written up to now.
      const first = this.tracker?.cut(counters) ?? { chunks: [], scanReason: 'no change tracking' };
      taken.push(...first.chunks);
      const quiet = tracker !== undefined
        ? first.chunks.length === 0 && first.scanReason === undefined && this.scanReason === undefined
        : this.device !== undefined && counter === this.baseline && !this.mustScan;
      if (!full && quiet && !this.lastFailed) {
        return { at, ok: true, idle: true, reason, durationMs: performance.now() - started, bytesWritten: 0, journalBytes: 0, chunksChanged: 0, tracking };
      }
      // A batch committed by a flush whose apply failed must reach the files first (a sealed
      // commit is whole or absent: there is nothing to settle).
      if (this.lastFailed && isPlainVolume(this.volume) && this.journalFd !== undefined && (await settleJournal(this.volume, this.journalFd, this.report)) === 'applied') this.afterWrite?.();

      // The thaw's own writes ride along with a flush that runs anyway.
      const deferred = tracker?.takeDeferred() ?? [];
      taken.push(...deferred);
      let selection = this.select(first.chunks, first.scanReason, deferred);
      // Cleared before the scan: a file change noted during this flush asks for another.
      this.mustScan = false;
      this.scanReason = undefined;
      const scanStart = performance.now();
      let staged: Map<number, StagedChunk>;
      if (mounted !== undefined) {
        const early = await this.stage(selection);
        const thaw = tracker === undefined ? undefined : { before: () => tracker.beginThaw(), after: () => tracker.endThaw() };
        const frozen = await whileFrozen(mounted, () => {
          // Inside the freeze: the second cut; its chunks and the first's are hashed again.
          const second = this.tracker?.cut() ?? { chunks: [], scanReason: 'no change tracking' };
          taken.push(...second.chunks);
          if (!selection.all) selection = this.select([...(selection.chunks), ...second.chunks], second.scanReason, early.keys());
          return this.stage(selection, early);
        }, thaw);
        staged = frozen.result;
        t.freezeMs = frozen.freezeMs;
        t.frozenMs = frozen.frozenMs;
        // Without tracking: freeze and thaw write the superblock; count from after the thaw, or
        // every tick looks dirty (a write landing in between waits for a later one: tracking
        // has no such gap, it sorts the thaw's own writes from others').
        if (tracker === undefined) this.resetBaseline();
        else this.baseline = counter;
      } else {
        this.baseline = counter;
        staged = await this.stage(selection);
      }
      t.scanMs = performance.now() - scanStart - t.freezeMs; // both passes (FIFREEZE itself apart)
      chunksHashed = selection.all ? this.order.length : selection.chunks.length;
      tracking = selection.all ? `full-scan (${selection.reason})` : 'block-layer';
      if (tracker !== undefined && !selection.all && this.verifyTracking) await this.verify(selection.chunks, staged, tracker);

      let journalBytes = 0;
      let bytesWritten = 0;
      let sealed: SealedCommit | undefined;
      let sealThreads = 1;
      if (staged.size > 0) {
        if (this.store.kind === 'plain') ({ journalBytes, bytesWritten } = await this.commitPlain(staged, t));
        else ({ bytesWritten, commit: sealed, threads: sealThreads } = await this.commitSealed(staged, t));
        this.afterWrite?.();
        for (const [chunk, s] of staged) this.hashes[chunk] = s.hash;
      }
      this.lastFailed = false;
      if (this.staging.length * STAGING_BLOCK > STAGING_KEEP) this.staging = [];
      const durationMs = performance.now() - started;
      const sealedReport = sealed === undefined ? {} : { sealed: { epoch: sealed.epoch, inFreeSlots: sealed.inFreeSlots, throughJournal: sealed.throughJournal, mapBytes: sealed.mapBytes, threads: sealThreads } };
      return { at, ok: true, idle: false, reason, durationMs, bytesWritten, journalBytes, chunksChanged: staged.size, chunksHashed, tracking, timings: t, ...sealedReport };
    } catch (err) {
      this.lastFailed = true;
      // The set is kept (never cleared by a failure), and the next flush scans everything.
      this.tracker?.requeue(taken);
      this.requireScan('after a failed flush');
      const error = failure('flush failed', err).message;
      return { at, ok: false, idle: false, reason, durationMs: performance.now() - started, bytesWritten: 0, journalBytes: 0, chunksChanged: 0, chunksHashed, tracking, error, timings: t };
    }
  }

  /**
   * The test mode's check (VBD_SHADOW_VERIFY_TRACKING=1): every chunk outside the tracked set
   * is hashed too; one that differs from the files without a write traced since the cut (a
   * write in flight at the cut completes, and is traced, within the grace time) means the set
   * missed a change: the flush fails loudly.
   */
  private async verify(selected: Uint32Array, staged: Map<number, StagedChunk>, tracker: ChangeTracker): Promise<void> {
    const inSet = new Uint8Array(this.hashes.length);
    for (const c of selected) inSet[c] = 1;
    for (const c of staged.keys()) inSet[c] = 1;
    let missed: number[] = [];
    const current = await this.hashMany({ from: 0, to: this.hashes.length });
    for (let chunk = 0; chunk < this.hashes.length; chunk++) {
      if (inSet[chunk] === 0 && (current?.[chunk] ?? xxh64(this.chunkView(chunk))) !== this.hashes[chunk]) missed.push(chunk);
    }
    const deadline = performance.now() + VERIFY_GRACE_MS;
    for (;;) {
      tracker.collect();
      missed = missed.filter((c) => !tracker.tracedSinceCut(c) && xxh64(this.chunkView(c)) !== this.hashes[c]);
      if (missed.length === 0) return;
      if (performance.now() > deadline) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    const event: DaemonEvent = { kind: 'tracking-verification-failed', chunks: missed };
    this.report(event);
    throw new VbdError(formatEvent(event).text);
  }
}
