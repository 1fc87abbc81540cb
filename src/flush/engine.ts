// The flush engine: writes back only what changed, as one crash-atomic, point-in-time batch.
//
//  1. idle check: syncfs the filesystem mounted on the device (or fsync the raw device), so
//     pending writes reach the image, then read the loop write counter; unchanged since the
//     last flush → nothing to do, no scan, no I/O;
//  2. capture: hash every chunk (xxh64) and stage those that differ from the files' state,
//     in file order, while writers run; then, with the filesystem frozen, hash everything
//     again and re-stage only what changed meanwhile (writers stall for one scan, not a copy);
//  3. journal the batch and sync it; 4. apply it to the files and sync them; 5. retire it.
// Only then are the chunk hashes updated: a failed flush leaves everything dirty, in RAM,
// and is retried.

import { readSync } from 'node:fs';
import { xxh64 } from '@node-rs/xxhash';
import { failure } from '../common/errors.js';
import { sectorsWritten, syncDevice, type LoopDevice } from '../device/loop.js';
import { syncMounted, whileFrozen } from '../device/freeze.js';
import type { Mounted } from '../device/mount.js';
import type { PlacementTable } from '../layouts/layout.js';
import { WINDOW_BYTES, type ShadowImage } from '../shadow/image.js';
import { fileOrder } from '../shadow/populate.js';
import { fileName, type Volume } from '../volume/volume.js';
import type { FlushReport } from '../daemon/runtime.js';
import { applyBatch, settleJournal } from './apply.js';
import { retireJournal, writeBatch, type JournalEntry } from './journal.js';

const STAGING_BLOCK = 64 * 2 ** 20;
/** Staging beyond this is given back after a flush (a one-off burst should not pin RAM). */
const STAGING_KEEP = 256 * 2 ** 20;

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

export interface FlushResult extends FlushReport {
  idle: boolean;
  journalBytes: number;
  timings?: FlushTimings;
}

export class FlushEngine {
  /** xxh64 of each chunk as the backing files hold it. */
  private readonly hashes: BigUint64Array;
  private readonly order: Uint32Array;
  /** Staging memory for captured chunks, reused from flush to flush. */
  private staging: Buffer[] = [];
  /** Set when the files changed behind our back: the next flush scans even if the device is idle. */
  private mustScan = false;
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

  constructor(
    private readonly volume: Volume,
    private readonly image: ShadowImage,
    private readonly table: PlacementTable,
    private readonly journalFd: number,
    private readonly log: (line: string) => void,
  ) {
    const { chunkSize, deviceSize, files } = volume.manifest;
    this.hashes = new BigUint64Array(deviceSize / chunkSize);
    this.order = fileOrder(table, chunkSize, files.map((f) => f.size));
  }

  private chunkView(chunk: number): Buffer {
    const { chunkSize } = this.volume.manifest;
    const at = chunk * chunkSize;
    const w = this.image.windows[Math.floor(at / WINDOW_BYTES)];
    if (w === undefined) throw new Error(`internal: chunk ${chunk} is outside the image`);
    return w.view.subarray(at - w.offset, at - w.offset + chunkSize);
  }

  /** Records the image as the files' state (right after populate). */
  hashImage(): void {
    for (let chunk = 0; chunk < this.hashes.length; chunk++) this.hashes[chunk] = xxh64(this.chunkView(chunk));
  }

  /**
   * Records what the files hold now, for all files (recovery of an image whose flush state was
   * lost) or one (changed behind our back): the next flush rewrites exactly the chunks that differ.
   */
  hashFiles(only?: number): void {
    const { chunkSize } = this.volume.manifest;
    const buf = Buffer.alloc(chunkSize);
    for (const chunk of this.order) {
      const file = this.table.file[chunk] ?? 0;
      if (only !== undefined && file !== only) continue;
      const offset = this.table.offset[chunk] ?? 0;
      try {
        const n = readSync(this.volume.fds[file] ?? -1, buf, 0, chunkSize, offset);
        buf.fill(0, n);
      } catch (err) {
        throw failure(`read of backing file '${fileName(this.volume, file)}' at offset ${offset}`, err);
      }
      this.hashes[chunk] = xxh64(buf);
    }
    this.mustScan = true;
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
    while (this.staging.length <= blockIndex) this.staging.push(Buffer.allocUnsafeSlow(perBlock * chunkSize));
    const at = (n % perBlock) * chunkSize;
    return (this.staging[blockIndex] as Buffer).subarray(at, at + chunkSize);
  }

  /**
   * Copies every chunk whose hash differs from the files' into staging, in file order.
   * Given an earlier pass (`staged`), a chunk still equal to its staged copy is not copied
   * again: the pass made while writers run does the bulk, the frozen pass only verifies.
   * (The frozen pass is the one given `staged`; nothing changes under it.)
   */
  private stage(staged?: Map<number, StagedChunk>): Map<number, StagedChunk> {
    const result = new Map<number, StagedChunk>();
    let next = 0;
    for (const s of staged?.values() ?? []) next = Math.max(next, s.slot + 1);
    for (const chunk of this.order) {
      const hash = xxh64(this.chunkView(chunk));
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

  /** The capture as journal entries (file order), with the chunk each came from. */
  private entriesOf(staged: Map<number, StagedChunk>): { chunks: number[]; entries: JournalEntry[] } {
    const chunks: number[] = [];
    const entries: JournalEntry[] = [];
    for (const [chunk, s] of staged) {
      chunks.push(chunk);
      entries.push({ file: this.table.file[chunk] ?? 0, offset: this.table.offset[chunk] ?? 0, data: this.stagingSlot(s.slot) });
    }
    return { chunks, entries };
  }

  private async flushNow(reason: string, full: boolean): Promise<FlushResult> {
    const started = performance.now();
    const at = new Date().toISOString();
    const t: FlushTimings = { syncMs: 0, freezeMs: 0, frozenMs: 0, scanMs: 0, journalMs: 0, applyMs: 0 };
    try {
      // Push pending writes into the image, so the write counter sees them: a filesystem on
      // the device keeps its own dirty pages until synced; the raw device's buffers need fsync.
      const mounted = this.device !== undefined ? this.mounted : undefined;
      if (mounted !== undefined) await syncMounted(mounted);
      else if (this.device !== undefined) syncDevice(this.device);
      t.syncMs = performance.now() - started;
      const counter = this.device === undefined ? 0 : sectorsWritten(this.device);
      if (!full && this.device !== undefined && counter === this.baseline && !this.mustScan && !this.lastFailed) {
        return { at, ok: true, idle: true, reason, durationMs: performance.now() - started, bytesWritten: 0, journalBytes: 0, chunksChanged: 0 };
      }
      // A batch committed by a flush whose apply failed must reach the files first.
      if (this.lastFailed && (await settleJournal(this.volume, this.journalFd, this.log)) === 'applied') this.afterWrite?.();

      // Cleared before the scan: a file change noted during this flush asks for another.
      this.mustScan = false;
      const scanStart = performance.now();
      let staged: Map<number, StagedChunk>;
      if (mounted !== undefined) {
        const early = this.stage();
        const frozen = await whileFrozen(mounted, () => this.stage(early));
        staged = frozen.result;
        t.freezeMs = frozen.freezeMs;
        t.frozenMs = frozen.frozenMs;
        // Freeze and thaw write the superblock: count from after the thaw, or every tick looks dirty.
        this.resetBaseline();
      } else {
        this.baseline = counter;
        staged = this.stage();
      }
      const { chunks, entries } = this.entriesOf(staged);
      t.scanMs = performance.now() - scanStart - t.freezeMs; // both passes (FIFREEZE itself apart)

      let journalBytes = 0;
      let bytesWritten = 0;
      if (entries.length > 0) {
        const j0 = performance.now();
        journalBytes = writeBatch(this.journalFd, { seq: ++this.seq, chunkSize: this.volume.manifest.chunkSize, entries });
        t.journalMs = performance.now() - j0;
        const a0 = performance.now();
        this.lastFailed = true; // until the batch is in the files, the journal holds it
        bytesWritten = (await applyBatch(this.volume, { seq: this.seq, chunkSize: this.volume.manifest.chunkSize, entries })).bytes;
        retireJournal(this.journalFd);
        this.afterWrite?.();
        t.applyMs = performance.now() - a0;
        chunks.forEach((chunk) => (this.hashes[chunk] = staged.get(chunk)?.hash ?? 0n));
      }
      this.lastFailed = false;
      if (this.staging.length * STAGING_BLOCK > STAGING_KEEP) this.staging = [];
      const durationMs = performance.now() - started;
      return { at, ok: true, idle: false, reason, durationMs, bytesWritten, journalBytes, chunksChanged: entries.length, timings: t };
    } catch (err) {
      this.lastFailed = true;
      const error = failure('flush failed', err).message;
      return { at, ok: false, idle: false, reason, durationMs: performance.now() - started, bytesWritten: 0, journalBytes: 0, chunksChanged: 0, error, timings: t };
    }
  }
}
