// Moving bytes between the backing files and a device image held in a buffer (a window of
// the RAM image, or of an export). The placement table is turned into runs: consecutive
// device chunks that are also consecutive in one file become one read or write, so a
// linear volume moves as long sequential streams.

import { readSync, writeSync } from 'node:fs';
import { VbdError, failure } from '../common/errors.js';
import type { PlacementTable } from '../layouts/layout.js';

/** One contiguous transfer: `length` bytes at `fileOffset` of file `file` ↔ device `deviceOffset`. */
export interface Run {
  file: number;
  fileOffset: number;
  deviceOffset: number;
  length: number;
}

/** Runs covering chunks [firstChunk, endChunk), merging neighbours in both device and file. */
export function runsFor(table: PlacementTable, chunkSize: number, firstChunk: number, endChunk: number): Run[] {
  const runs: Run[] = [];
  let current: Run | undefined;
  for (let chunk = firstChunk; chunk < endChunk; chunk++) {
    const file = table.file[chunk] ?? 0;
    const fileOffset = table.offset[chunk] ?? 0;
    if (current !== undefined && current.file === file && current.fileOffset + current.length === fileOffset) {
      current.length += chunkSize;
    } else {
      current = { file, fileOffset, deviceOffset: chunk * chunkSize, length: chunkSize };
      runs.push(current);
    }
  }
  return runs;
}

/** Names a run's file for error messages. */
export type FileNamer = (file: number) => string;

/** Reads each run from its file into `image`, where image[0] is device byte `imageBase`. */
export function readRuns(fds: readonly number[], runs: readonly Run[], image: Uint8Array, imageBase: number, name: FileNamer): void {
  for (const run of runs) {
    const fd = fds[run.file] ?? -1;
    let done = 0;
    while (done < run.length) {
      let n: number;
      try {
        n = readSync(fd, image, run.deviceOffset - imageBase + done, run.length - done, run.fileOffset + done);
      } catch (err) {
        throw failure(`read of backing file '${name(run.file)}' at offset ${run.fileOffset + done}`, err);
      }
      if (n === 0) throw new VbdError(`backing file '${name(run.file)}' ends before offset ${run.fileOffset + run.length} (was it truncated?)`);
      done += n;
    }
  }
}

/** Writes each run from `image` (image[0] = device byte `imageBase`) into its file. */
export function writeRuns(fds: readonly number[], runs: readonly Run[], image: Uint8Array, imageBase: number, name: FileNamer): void {
  for (const run of runs) {
    const fd = fds[run.file] ?? -1;
    let done = 0;
    while (done < run.length) {
      try {
        done += writeSync(fd, image, run.deviceOffset - imageBase + done, run.length - done, run.fileOffset + done);
      } catch (err) {
        throw failure(`write of backing file '${name(run.file)}' at offset ${run.fileOffset + done}`, err);
      }
    }
  }
}

/** Splits chunks [0, chunkCount) into windows of at most `windowBytes` (whole chunks). */
export function* windows(chunkCount: number, chunkSize: number, windowBytes: number): Generator<{ first: number; end: number }> {
  const perWindow = Math.max(1, Math.floor(windowBytes / chunkSize));
  for (let first = 0; first < chunkCount; first += perWindow) {
    yield { first, end: Math.min(chunkCount, first + perWindow) };
  }
}
