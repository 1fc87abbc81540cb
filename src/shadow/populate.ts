// Moving the whole image between the RAM mapping and the backing files. Runs (see
// image/transfer.ts) are sorted by file position and grouped into one preadv/pwritev per
// stretch of consecutive file bytes, each iovec pointing at its chunk in the mapping:
// a linear volume moves as long sequential streams, a keyed one as ~1024 chunks per syscall.

import { VbdError } from '../common/errors.js';
import type { PlacementTable } from '../layouts/layout.js';
import { vectorIo } from '../sys/libc.js';
import { runsFor, windows, type FileNamer, type Run } from '../image/transfer.js';
import { WINDOW_BYTES, type ImageWindow, type ShadowImage } from './image.js';

const IOV_MAX = 1024;
const MAX_CALL_BYTES = 256 * 2 ** 20;

/** One preadv/pwritev per group of runs that are consecutive in one file. */
function vectorRuns(kind: 'read' | 'write', fds: readonly number[], runs: Run[], window: ImageWindow, name: FileNamer): void {
  runs.sort((a, b) => a.file - b.file || a.fileOffset - b.fileOffset);
  const iov = new BigUint64Array(IOV_MAX * 2);
  let i = 0;
  while (i < runs.length) {
    const first = runs[i] as Run;
    let count = 0;
    let bytes = 0;
    let next = first.fileOffset;
    while (i < runs.length && count < IOV_MAX && bytes < MAX_CALL_BYTES) {
      const run = runs[i] as Run;
      if (run.file !== first.file || run.fileOffset !== next) break;
      iov[count * 2] = window.address + BigInt(run.deviceOffset - window.offset);
      iov[count * 2 + 1] = BigInt(run.length);
      count++;
      bytes += run.length;
      next += run.length;
      i++;
    }
    const what = `backing file '${name(first.file)}' at offset ${first.fileOffset} (${bytes} bytes)`;
    const moved = vectorIo(kind, fds[first.file] ?? -1, iov, count, first.fileOffset, what);
    if (moved !== bytes) throw new VbdError(`short ${kind} of ${what}: ${moved} bytes (was the file truncated?)`);
  }
}

/** Fills the image from the files (`read`) or writes it all back to them (`write`). */
export function transferImage(kind: 'read' | 'write', image: ShadowImage, table: PlacementTable, chunkSize: number, fds: readonly number[], name: FileNamer, progress?: (bytes: number) => void): void {
  for (const window of image.windows) {
    const firstChunk = window.offset / chunkSize;
    // Sub-windows keep the run list small (runs are plain objects).
    for (const { first, end } of windows(window.length / chunkSize, chunkSize, Math.min(WINDOW_BYTES, 64 * 2 ** 20))) {
      vectorRuns(kind, fds, runsFor(table, chunkSize, firstChunk + first, firstChunk + end), window, name);
      progress?.((end - first) * chunkSize);
    }
  }
}
