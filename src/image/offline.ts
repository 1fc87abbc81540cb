// `export` and `import`: the whole device image assembled from / scattered into the files,
// offline, without root or a loop device, through the chunk store (plain or sealed alike).
// Also how tests see what the files really hold.

import { closeSync, fstatSync, fsyncSync, openSync, readSync, renameSync, unlinkSync, writeSync, constants as fsc } from 'node:fs';
import { VbdError, failure } from '../common/errors.js';
import { startProgress } from '../common/progress.js';
import { listDamaged, type ChunkStore, type CommitReport, type DamagedChunk } from '../store/chunk-store.js';
import { windows } from './transfer.js';

const WINDOW_BYTES = 64 * 2 ** 20;
/** Damaged chunks named in a refusal; the rest are counted. */

function writeAll(fd: number, buf: Uint8Array, length: number, what: string): void {
  let done = 0;
  while (done < length) {
    try {
      done += writeSync(fd, buf, done, length - done);
    } catch (err) {
      throw failure(what, err);
    }
  }
}

function readAll(fd: number, buf: Uint8Array, length: number, what: string): void {
  let done = 0;
  while (done < length) {
    const n = readSync(fd, buf, done, length - done, null);
    if (n === 0) throw new VbdError(`${what}: ends early`);
    done += n;
  }
}

/** "chunk 3 (file002 at offset 65564, epoch 2)". */
export interface ExportOptions {
  /** Write zeros for chunks whose slot fails authentication (and list them) instead of refusing. */
  zeroDamaged?: boolean;
}

export interface ExportResult {
  /** Chunks written as zeros because their slot failed authentication (only with zeroDamaged). */
  damaged: DamagedChunk[];
}

function imageWindow(store: ChunkStore): Buffer {
  const size = store.chunkCount * store.chunkSize;
  return Buffer.alloc(Math.min(size, Math.max(WINDOW_BYTES, store.chunkSize)));
}

/**
 * Writes the device image to `outPath` (created anew via a temporary name, mode 0600). Every
 * chunk of a sealed volume is verified; if any fails, nothing is written and the export is
 * refused naming them (file, offset, chunk) — unless `zeroDamaged`.
 */
export function exportImage(store: ChunkStore, outPath: string, options: ExportOptions = {}): ExportResult {
  const { chunkSize, chunkCount } = store;
  const temp = `${outPath}.partial-${process.pid}`;
  let out: number;
  try {
    out = openSync(temp, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
  } catch (err) {
    throw failure(`cannot create ${temp}`, err);
  }
  const progress = startProgress('export', chunkCount * chunkSize);
  const window = imageWindow(store);
  let closed = false;
  try {
    const damaged: DamagedChunk[] = [];
    for (const { first, end } of windows(chunkCount, chunkSize, window.length)) {
      damaged.push(...store.read(first, end, window, { damaged: 'zero' }));
      writeAll(out, window, (end - first) * chunkSize, `write to ${temp}`);
      progress.advance((end - first) * chunkSize);
    }
    if (damaged.length > 0 && options.zeroDamaged !== true) {
      throw new VbdError(`export refused: ${damaged.length} chunk${damaged.length === 1 ? '' : 's'} fail${damaged.length === 1 ? 's' : ''} authentication (corrupted, tampered with, or an old or misplaced slot): ${listDamaged(damaged)}; nothing was written (--zero-damaged exports them as zeros)`);
    }
    fsyncSync(out);
    closeSync(out);
    closed = true;
    renameSync(temp, outPath);
    return { damaged };
  } catch (err) {
    if (!closed) closeSync(out);
    unlinkSync(temp);
    throw err;
  } finally {
    window.fill(0);
    progress.done();
  }
}

/**
 * Writes the image in `inPath` (exactly the device size) as every chunk of the volume, in one
 * commit: plain in place, then synced; sealed copy-on-write into free slots as one new epoch
 * (through the overflow journal for what does not fit), never a mix of old and new.
 */
export function importImage(store: ChunkStore, inPath: string): CommitReport {
  const { chunkSize, chunkCount } = store;
  const deviceSize = chunkSize * chunkCount;
  let input: number;
  try {
    input = openSync(inPath, fsc.O_RDONLY);
  } catch (err) {
    throw failure(`cannot open image ${inPath}`, err);
  }
  const progress = startProgress('import', deviceSize);
  const window = imageWindow(store);
  try {
    const st = fstatSync(input);
    if (!st.isFile()) throw new VbdError(`image ${inPath} is not a regular file`);
    if (st.size !== deviceSize) throw new VbdError(`image ${inPath} is ${st.size} bytes, the device is ${deviceSize}`);
    const write = store.begin('all');
    try {
      for (const { first, end } of windows(chunkCount, chunkSize, window.length)) {
        readAll(input, window, (end - first) * chunkSize, `image ${inPath}`);
        write.write(first, end, window);
        progress.advance((end - first) * chunkSize);
      }
    } catch (err) {
      write.abort();
      throw err;
    }
    return write.commit();
  } finally {
    window.fill(0);
    closeSync(input);
    progress.done();
  }
}
