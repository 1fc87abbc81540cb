// Moving chunks between the RAM mapping and the backing files. Chunks are visited in file
// order (file, then offset), so every stretch of consecutive file bytes becomes one
// preadv/pwritev whose iovecs point at the chunks' places in the mapping (merged when those
// are adjacent too): a linear volume moves as long sequential streams, a keyed one as up to
// 1024 chunks per syscall, at any volume size.

import { VbdError } from '../common/errors.js';
import { chunkSlots, type PlacementTable } from '../layouts/layout.js';
import { vectorIo } from '../sys/libc.js';
import type { FileNamer } from '../image/transfer.js';
import { WINDOW_BYTES, type ShadowImage } from './image.js';

const IOV_MAX = 1024;
const MAX_CALL_BYTES = 256 * 2 ** 20;
const UNUSED = 0xffffffff;

/**
 * All chunk indices in file order. O(chunks) with no sort: a validated layout is a bijection
 * onto chunk slots, so a chunk's slot number is its rank.
 */
export function fileOrder(table: PlacementTable, chunkSize: number, fileSizes: readonly number[]): Uint32Array {
  const slots = chunkSlots({ chunkSize, fileSizes, deviceSize: 0, chunkCount: table.file.length });
  const bySlot = new Uint32Array(slots.total).fill(UNUSED);
  for (let chunk = 0; chunk < table.file.length; chunk++) {
    bySlot[(slots.first[table.file[chunk] ?? 0] ?? 0) + (table.offset[chunk] ?? 0) / chunkSize] = chunk;
  }
  return bySlot.filter((chunk) => chunk !== UNUSED);
}

export interface ChunkIo {
  image: ShadowImage;
  table: PlacementTable;
  chunkSize: number;
  fds: readonly number[];
  name: FileNamer;
}

/**
 * Reads (`read`) or writes (`write`) the chunks listed in `order` — which must be in file
 * order, e.g. from fileOrder() or a subset of it — between the files and the image.
 */
export function transferChunks(kind: 'read' | 'write', io: ChunkIo, order: Uint32Array, progress?: (bytes: number) => void): void {
  const { image, table, chunkSize, fds, name } = io;
  // iovec = { void *base; size_t len }: written as 32-bit halves (addresses fit in 2^53).
  const iov = new Uint32Array(IOV_MAX * 4);
  const address = (chunk: number): number => {
    const at = chunk * chunkSize;
    const window = image.windows[Math.floor(at / WINDOW_BYTES)];
    if (window === undefined) throw new VbdError(`internal: chunk ${chunk} is outside the image`);
    return Number(window.address) + (at - window.offset);
  };
  let i = 0;
  while (i < order.length) {
    const first = order[i] ?? 0;
    const file = table.file[first] ?? 0;
    const fileOffset = table.offset[first] ?? 0;
    let count = 0;
    let bytes = 0;
    let lastEnd = -1;
    while (i < order.length && bytes < MAX_CALL_BYTES) {
      const chunk = order[i] ?? 0;
      if (table.file[chunk] !== file || table.offset[chunk] !== fileOffset + bytes) break;
      const base = address(chunk);
      if (base === lastEnd) {
        iov[(count - 1) * 4 + 2] = (iov[(count - 1) * 4 + 2] ?? 0) + chunkSize; // extend the previous iovec
      } else {
        if (count === IOV_MAX) break;
        iov[count * 4] = base % 2 ** 32;
        iov[count * 4 + 1] = Math.floor(base / 2 ** 32);
        iov[count * 4 + 2] = chunkSize;
        iov[count * 4 + 3] = 0;
        count++;
      }
      lastEnd = base + chunkSize;
      bytes += chunkSize;
      i++;
    }
    const what = `backing file '${name(file)}' at offset ${fileOffset} (${bytes} bytes)`;
    const moved = vectorIo(kind, fds[file] ?? -1, iov, count, fileOffset, what);
    if (moved !== bytes) throw new VbdError(`short ${kind} of ${what}: ${moved} bytes${kind === 'read' ? ' (was the file truncated?)' : ''}`);
    progress?.(bytes);
  }
}

/** Fills the whole image from the files (`read`) or writes all of it back (`write`). */
export function transferImage(kind: 'read' | 'write', io: ChunkIo, fileSizes: readonly number[], progress?: (bytes: number) => void): void {
  transferChunks(kind, io, fileOrder(io.table, io.chunkSize, fileSizes), progress);
}
