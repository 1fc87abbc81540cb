// Memory a placement will take, checked against what the machine (and this process's limits)
// can give before anything proportional to the chunk count is allocated: the table, the
// bijection check's slot array, the keyed permutation, the module runner's output buffer.

import { VbdError } from '../common/errors.js';
import { formatSize } from '../common/size.js';
import { availableMemory } from '../sys/memory.js';
import type { LayoutKind } from '../volume/manifest.js';
import { RUNNER_BYTES_PER_CHUNK } from './user-module.js';

/** Headroom left for everything else (the V8 heap, I/O buffers). */
const MARGIN = 64 * 2 ** 20;

/** Bytes needed to compute and check a placement of `chunks` chunks over `slots` slots. */
export function placementBytes(kind: LayoutKind, chunks: number, slots: number): number {
  const table = chunks * RUNNER_BYTES_PER_CHUNK; // u32 file + f64 offset (for a module: the runner's output, used in place)
  const check = slots * 4; // validateTable: one owner entry per slot
  const permutation = kind === 'keyed' ? slots * 8 : 0;
  return table + check + permutation;
}

/** Refuses with one line when the placement would not fit in available memory. */
export function checkPlacementMemory(volume: string, kind: LayoutKind, chunks: number, slots: number): void {
  const need = placementBytes(kind, chunks, slots);
  const { bytes, source } = availableMemory();
  if (need + MARGIN > bytes) {
    throw new VbdError(`volume '${volume}': placing ${chunks} chunks needs ${formatSize(need)} of memory, only ${formatSize(bytes)} is available (${source}); use larger chunks`);
  }
}
