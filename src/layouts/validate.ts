// Every layout must be a bijection onto distinct, in-bounds, chunk-aligned slots of the files:
// two device chunks on the same file bytes would silently destroy data. Checked in O(chunks)
// with one owner entry per slot.

import { VbdError } from '../common/errors.js';
import { chunkSlots, type Geometry, type PlacementTable } from './layout.js';

const FREE = 0xffffffff;

/** Throws naming the first chunk out of bounds, or the two chunks that collide. */
export function validateTable(table: PlacementTable, geometry: Geometry, fileNames: readonly string[]): void {
  const { chunkSize, chunkCount, fileSizes } = geometry;
  if (table.file.length !== chunkCount || table.offset.length !== chunkCount) {
    throw new VbdError(`layout gave ${table.file.length} placements for ${chunkCount} chunks`);
  }
  const slots = chunkSlots(geometry);
  const owner = new Uint32Array(slots.total).fill(FREE);
  for (let chunk = 0; chunk < chunkCount; chunk++) {
    const file = table.file[chunk] ?? 0;
    const offset = table.offset[chunk] ?? Number.NaN;
    const size = fileSizes[file];
    if (size === undefined) {
      throw new VbdError(`layout places chunk ${chunk} in file index ${file}, but the volume has ${fileSizes.length} files`);
    }
    const name = fileNames[file] ?? `#${file}`;
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + chunkSize > size) {
      throw new VbdError(`layout places chunk ${chunk} outside file '${name}': offset ${offset} + chunk ${chunkSize} > size ${size}`);
    }
    if (offset % chunkSize !== 0) {
      throw new VbdError(`layout places chunk ${chunk} at offset ${offset} of file '${name}', not a multiple of the chunk size ${chunkSize}`);
    }
    const slot = (slots.first[file] ?? 0) + offset / chunkSize;
    const other = owner[slot] ?? FREE;
    if (other !== FREE) {
      throw new VbdError(`layout places chunks ${other} and ${chunk} on the same bytes: file '${name}' offset ${offset}`);
    }
    owner[slot] = chunk;
  }
}
