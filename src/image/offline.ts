// `export` and `import`: the whole device image assembled from / scattered into the files,
// offline, without root or a loop device, through the chunk store (plain or sealed alike).
// Also how tests see what the files really hold.

import { closeSync, fstatSync, fsyncSync, ftruncateSync, openSync, renameSync, unlinkSync, writeSync, constants as fsc } from 'node:fs';
import { InterruptedError, IoError, RefusedError, StdoutClosedError, UsageError, VbdError, errnoCode, failure } from '../common/errors.js';
import { readStream, writeStream } from '../common/fd.js';
import { startProgress } from '../common/progress.js';
import { listDamaged, type ChunkStore, type CommitReport, type DamagedChunk } from '../store/chunk-store.js';
import { windows } from './transfer.js';

const WINDOW_BYTES = 64 * 2 ** 20;
/** Damaged chunks named in a refusal; the rest are counted. */

/** Writes `length` bytes of `buf` from `offset`: at `position` of the file, or (undefined) at its current position. */
function writeAll(fd: number, buf: Uint8Array, length: number, what: string, offset = 0, position?: number): void {
  let done = 0;
  while (done < length) {
    try {
      done += writeSync(fd, buf, offset + done, length - done, position === undefined ? null : position + done);
    } catch (err) {
      throw failure(what, err);
    }
  }
}

/** Lets signal handlers run between two windows (the copy itself is synchronous). */
function turn(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

function checkAborted(signal: AbortSignal | undefined, what: string): void {
  if (signal?.aborted === true) throw new InterruptedError(what);
}

/** Reads up to `length` bytes from the current position; fewer only at the end of the input. */
function readAll(fd: number, buf: Uint8Array, length: number, what: string): number {
  let done = 0;
  while (done < length) {
    let n: number;
    try {
      n = readStream(fd, buf, done, length - done);
    } catch (err) {
      throw failure(`read of ${what}`, err);
    }
    if (n === 0) break;
    done += n;
  }
  return done;
}

/** `-` as a file name: standard input or output. */
export const STDIO = '-';

/** "chunk 3 (file002 at offset 65564, epoch 2)". */
export interface ExportOptions {
  /** Write zeros for chunks whose slot fails authentication (and list them) instead of refusing. */
  zeroDamaged?: boolean;
  /** Stops the export between two windows (Ctrl-C): an InterruptedError, the partial file removed. */
  signal?: AbortSignal | undefined;
}

export interface ExportResult {
  /** Chunks written as zeros because their slot failed authentication (only with zeroDamaged). */
  damaged: DamagedChunk[];
  /** Bytes of the image (the device size). */
  bytes: number;
  /** Chunks written, and all-zero chunks skipped with a seek (a file stays sparse there; never on a stream). */
  chunksWritten: number;
  chunksSkipped: number;
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
function refuseDamaged(damaged: readonly DamagedChunk[], consequence: string): IoError {
  return new IoError(`export refused: ${damaged.length} chunk${damaged.length === 1 ? '' : 's'} fail${damaged.length === 1 ? 's' : ''} authentication (corrupted, tampered with, or an old or misplaced slot): ${listDamaged(damaged)}; ${consequence} (--zero-damaged exports them as zeros)`);
}

/**
 * Writes the device image to standard output, in order. A sealed chunk that fails
 * authentication stops it before that window is written (the reader gets a short image and
 * the command fails), unless `zeroDamaged`. A closed stdout (`| head`) ends it quietly.
 */
async function exportToStdout(store: ChunkStore, options: ExportOptions): Promise<ExportResult> {
  const { chunkSize, chunkCount } = store;
  if (process.stdout.isTTY) throw new RefusedError('export: standard output is a terminal; redirect it to a file or a pipe (or give a file name)');
  const progress = startProgress('export', chunkCount * chunkSize);
  const window = imageWindow(store);
  try {
    const damaged: DamagedChunk[] = [];
    for (const { first, end } of windows(chunkCount, chunkSize, window.length)) {
      await turn();
      checkAborted(options.signal, `export interrupted: standard output got the image only up to chunk ${first} (byte ${first * chunkSize}): incomplete`);
      const found = store.read(first, end, window, { damaged: 'zero' });
      if (found.length > 0 && options.zeroDamaged !== true) {
        throw refuseDamaged(found, `standard output got the image only up to chunk ${first} (byte ${first * chunkSize}): incomplete`);
      }
      damaged.push(...found);
      try {
        writeStream(1, window, (end - first) * chunkSize);
      } catch (err) {
        if (errnoCode(err) === 'EPIPE') throw new StdoutClosedError({ cause: err });
        throw failure('write to standard output', err);
      }
      progress.advance((end - first) * chunkSize);
    }
    return { damaged, bytes: chunkCount * chunkSize, chunksWritten: chunkCount, chunksSkipped: 0 };
  } finally {
    window.fill(0);
    progress.done();
  }
}

/**
 * Writes the chunks [first, end) held in `window` at their places in `out`, skipping all-zero
 * chunks (a seek: the file keeps a hole there); runs of non-zero chunks go as one write.
 * Returns how many chunks were written.
 */
function writeSparse(out: number, window: Buffer, first: number, end: number, chunkSize: number, zero: Buffer, what: string): number {
  let written = 0;
  let runStart = -1;
  const flush = (upTo: number): void => {
    if (runStart < 0) return;
    writeAll(out, window, (upTo - runStart) * chunkSize, what, (runStart - first) * chunkSize, runStart * chunkSize);
    written += upTo - runStart;
    runStart = -1;
  };
  for (let c = first; c < end; c++) {
    const at = (c - first) * chunkSize;
    if (window.subarray(at, at + chunkSize).equals(zero)) flush(c);
    else if (runStart < 0) runStart = c;
  }
  flush(end);
  return written;
}

export async function exportImage(store: ChunkStore, outPath: string, options: ExportOptions = {}): Promise<ExportResult> {
  if (outPath === STDIO) return exportToStdout(store, options);
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
  const zero = Buffer.alloc(chunkSize);
  let closed = false;
  try {
    const damaged: DamagedChunk[] = [];
    let written = 0;
    for (const { first, end } of windows(chunkCount, chunkSize, window.length)) {
      await turn();
      checkAborted(options.signal, `export interrupted; the partial image ${temp} was removed`);
      damaged.push(...store.read(first, end, window, { damaged: 'zero' }));
      written += writeSparse(out, window, first, end, chunkSize, zero, `write to ${temp}`);
      progress.advance((end - first) * chunkSize);
    }
    if (damaged.length > 0 && options.zeroDamaged !== true) throw refuseDamaged(damaged, 'nothing was written');
    // Skipped chunks at the end are a hole too: the file gets its full length.
    try {
      ftruncateSync(out, chunkCount * chunkSize);
    } catch (err) {
      throw failure(`cannot size ${temp} to ${chunkCount * chunkSize} bytes`, err);
    }
    fsyncSync(out);
    closeSync(out);
    closed = true;
    renameSync(temp, outPath);
    return { damaged, bytes: chunkCount * chunkSize, chunksWritten: written, chunksSkipped: chunkCount - written };
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
 * Writes the image in `inPath` (exactly the device size; `-`: standard input) as every chunk of
 * the volume (`label` names the input in messages), in one
 * commit: plain in place, then synced; sealed copy-on-write into free slots as one new epoch
 * (through the overflow journal for what does not fit), never a mix of old and new.
 */
export function importImage(store: ChunkStore, inPath: string, label?: string): CommitReport {
  const { chunkSize, chunkCount } = store;
  const deviceSize = chunkSize * chunkCount;
  const fromStdin = inPath === STDIO;
  const what = label ?? (fromStdin ? 'the image on standard input' : `image ${inPath}`);
  if (fromStdin && process.stdin.isTTY) throw new UsageError('import: standard input is a terminal; redirect an image into it (or give a file name)');
  let input: number;
  try {
    input = fromStdin ? 0 : openSync(inPath, fsc.O_RDONLY);
  } catch (err) {
    throw failure(`cannot open image ${inPath}`, err);
  }
  const progress = startProgress('import', deviceSize);
  const window = imageWindow(store);
  try {
    // A file is checked before anything is written; a stream is counted as it comes, and
    // nothing is committed unless it held exactly the device size.
    if (!fromStdin) {
      const st = fstatSync(input);
      if (!st.isFile()) throw new VbdError(`${what} is not a regular file (for standard input give -)`);
      if (st.size !== deviceSize) throw new VbdError(`${what} is ${st.size} bytes, the device is ${deviceSize}; nothing was imported`);
    }
    const write = store.begin('all');
    try {
      let got = 0;
      for (const { first, end } of windows(chunkCount, chunkSize, window.length)) {
        const length = (end - first) * chunkSize;
        const n = readAll(input, window, length, what);
        got += n;
        if (n < length) throw new VbdError(`${what} ends after ${got} bytes, the device is ${deviceSize}; nothing was imported`);
        write.write(first, end, window);
        progress.advance(length);
      }
      if (fromStdin && readAll(input, window, 1, what) !== 0) throw new VbdError(`${what} is longer than the device (${deviceSize} bytes); nothing was imported`);
    } catch (err) {
      write.abort();
      throw err;
    }
    return write.commit();
  } finally {
    window.fill(0);
    if (!fromStdin) closeSync(input);
    progress.done();
  }
}

/**
 * Copies standard input into an unnamed file in `dir` (created, then unlinked at once, so a
 * crash leaves no name behind) and returns its fd: a plain volume is written in place, so an
 * import from a stream that ends short must be caught before the first chunk is touched.
 */
export function spoolStdin(dir: string): number {
  if (process.stdin.isTTY) throw new UsageError('import: standard input is a terminal; redirect an image into it (or give a file name)');
  const path = `${dir}/.vbd-shadow-import.${process.pid}`;
  let fd: number;
  try {
    fd = openSync(path, fsc.O_RDWR | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
    unlinkSync(path);
  } catch (err) {
    throw failure(`cannot create a spool file for standard input in ${dir}`, err);
  }
  const buf = Buffer.alloc(WINDOW_BYTES);
  try {
    for (;;) {
      const n = readAll(0, buf, buf.length, 'the image on standard input');
      if (n === 0) break;
      writeAll(fd, buf, n, `write to a spool file in ${dir}`);
    }
    return fd;
  } catch (err) {
    closeSync(fd);
    throw err;
  } finally {
    buf.fill(0);
  }
}
