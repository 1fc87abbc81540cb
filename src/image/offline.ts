// `export` and `import`: the whole device image assembled from / scattered into the files,
// offline, without root or a loop device. Also how tests see what the files really hold.

import { closeSync, fstatSync, fsyncSync, openSync, readSync, renameSync, unlinkSync, writeSync, constants as fsc } from 'node:fs';
import { VbdError, failure } from '../common/errors.js';
import { startProgress } from '../common/progress.js';
import type { PlacementTable } from '../layouts/layout.js';
import { fileName, type Volume } from '../volume/volume.js';
import { readRuns, runsFor, windows, writeRuns } from './transfer.js';

const WINDOW_BYTES = 64 * 2 ** 20;

const namer = (volume: Volume) => (file: number): string => fileName(volume, file);

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

/** Writes the device image to `outPath` (created anew via a temporary name, mode 0600). */
export function exportImage(volume: Volume, table: PlacementTable, outPath: string): void {
  const { chunkSize, deviceSize } = volume.manifest;
  const temp = `${outPath}.partial-${process.pid}`;
  let out: number;
  try {
    out = openSync(temp, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
  } catch (err) {
    throw failure(`cannot create ${temp}`, err);
  }
  const progress = startProgress('export', deviceSize);
  try {
    const window = Buffer.allocUnsafe(Math.min(deviceSize, Math.max(WINDOW_BYTES, chunkSize)));
    for (const { first, end } of windows(deviceSize / chunkSize, chunkSize, window.length)) {
      readRuns(volume.fds, runsFor(table, chunkSize, first, end), window, first * chunkSize, namer(volume));
      writeAll(out, window, (end - first) * chunkSize, `write to ${temp}`);
      progress.advance((end - first) * chunkSize);
    }
    fsyncSync(out);
    closeSync(out);
    renameSync(temp, outPath);
  } catch (err) {
    try {
      closeSync(out);
    } catch {
      /* already closed */
    }
    unlinkSync(temp);
    throw err;
  } finally {
    progress.done();
  }
}

/** Scatters the image in `inPath` (exactly the device size) into the backing files, then syncs them. */
export function importImage(volume: Volume, table: PlacementTable, inPath: string): void {
  if (!volume.writable) throw new VbdError('internal: import needs a volume opened writable');
  const { chunkSize, deviceSize } = volume.manifest;
  let input: number;
  try {
    input = openSync(inPath, fsc.O_RDONLY);
  } catch (err) {
    throw failure(`cannot open image ${inPath}`, err);
  }
  const progress = startProgress('import', deviceSize);
  try {
    const st = fstatSync(input);
    if (!st.isFile()) throw new VbdError(`image ${inPath} is not a regular file`);
    if (st.size !== deviceSize) throw new VbdError(`image ${inPath} is ${st.size} bytes, the device is ${deviceSize}`);
    const window = Buffer.allocUnsafe(Math.min(deviceSize, Math.max(WINDOW_BYTES, chunkSize)));
    for (const { first, end } of windows(deviceSize / chunkSize, chunkSize, window.length)) {
      readAll(input, window, (end - first) * chunkSize, `image ${inPath}`);
      writeRuns(volume.fds, runsFor(table, chunkSize, first, end), window, first * chunkSize, namer(volume));
      progress.advance((end - first) * chunkSize);
    }
    volume.fds.forEach((fd, i) => {
      try {
        fsyncSync(fd);
      } catch (err) {
        throw failure(`fsync of backing file '${namer(volume)(i)}'`, err);
      }
    });
  } finally {
    closeSync(input);
    progress.done();
  }
}
