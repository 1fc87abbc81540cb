// `export` and `import`: the whole device image assembled from / scattered into the files,
// offline, without root or a loop device, through the chunk store (plain or sealed alike).
// Also how tests see what the files really hold.

import { closeSync, fstatSync, fsyncSync, openSync, renameSync, unlinkSync, writeSync, constants as fsc } from 'node:fs';
import { IoError, RefusedError, StdoutClosedError, UsageError, VbdError, errnoCode, failure } from '../common/errors.js';
import { readStream, writeStream } from '../common/fd.js';
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
function refuseDamaged(damaged: readonly DamagedChunk[], consequence: string): IoError {
  return new IoError(`export refused: ${damaged.length} chunk${damaged.length === 1 ? '' : 's'} fail${damaged.length === 1 ? 's' : ''} authentication (corrupted, tampered with, or an old or misplaced slot): ${listDamaged(damaged)}; ${consequence} (--zero-damaged exports them as zeros)`);
}

/**
 * Writes the device image to standard output, in order. A sealed chunk that fails
 * authentication stops it before that window is written (the reader gets a short image and
 * the command fails), unless `zeroDamaged`. A closed stdout (`| head`) ends it quietly.
 */
function exportToStdout(store: ChunkStore, options: ExportOptions): ExportResult {
  const { chunkSize, chunkCount } = store;
  if (process.stdout.isTTY) throw new RefusedError('export: standard output is a terminal; redirect it to a file or a pipe (or give a file name)');
  const progress = startProgress('export', chunkCount * chunkSize);
  const window = imageWindow(store);
  try {
    const damaged: DamagedChunk[] = [];
    for (const { first, end } of windows(chunkCount, chunkSize, window.length)) {
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
    return { damaged };
  } finally {
    window.fill(0);
    progress.done();
  }
}

export function exportImage(store: ChunkStore, outPath: string, options: ExportOptions = {}): ExportResult {
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
  let closed = false;
  try {
    const damaged: DamagedChunk[] = [];
    for (const { first, end } of windows(chunkCount, chunkSize, window.length)) {
      damaged.push(...store.read(first, end, window, { damaged: 'zero' }));
      writeAll(out, window, (end - first) * chunkSize, `write to ${temp}`);
      progress.advance((end - first) * chunkSize);
    }
    if (damaged.length > 0 && options.zeroDamaged !== true) throw refuseDamaged(damaged, 'nothing was written');
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
