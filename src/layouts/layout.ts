// The one small interface every layout fills: chunk index → (file index, byte offset).
// Built-ins and a user's `module:` layout are loaded the same way and pass the same check.

/** What a layout is told about the volume. */
export interface Geometry {
  readonly deviceSize: number;
  readonly chunkSize: number;
  readonly chunkCount: number;
  /** Size in bytes of each backing file, in manifest order. */
  readonly fileSizes: readonly number[];
}

export interface Placement {
  file: number;
  offset: number;
}

/** The whole mapping at once, indexed by chunk; offsets in bytes (exact below 2^53). */
export interface PlacementTable {
  file: Uint32Array;
  offset: Float64Array;
}

export interface Layout {
  place(chunk: number): Placement;
}

export function newTable(chunkCount: number): PlacementTable {
  return { file: new Uint32Array(chunkCount), offset: new Float64Array(chunkCount) };
}

/** The whole table of a layout, the form populate, flush and the bijection check work from. */
export function placementTable(layout: Layout, geometry: Geometry): PlacementTable {
  const table = newTable(geometry.chunkCount);
  for (let chunk = 0; chunk < geometry.chunkCount; chunk++) {
    const { file, offset } = layout.place(chunk);
    table.file[chunk] = file;
    table.offset[chunk] = offset;
  }
  return table;
}

/**
 * The chunk-sized slots of the backing files, numbered file by file: slot s of file f is
 * at byte (s - first[f]) * chunkSize. Built-in layouts are permutations of these slots.
 */
export interface Slots {
  /** first[f] = number of slots in files before f; first[fileCount] = total slots. */
  first: Float64Array;
  total: number;
}

export function chunkSlots(geometry: Geometry): Slots {
  const first = new Float64Array(geometry.fileSizes.length + 1);
  geometry.fileSizes.forEach((size, f) => {
    first[f + 1] = (first[f] ?? 0) + Math.floor(size / geometry.chunkSize);
  });
  return { first, total: first[geometry.fileSizes.length] ?? 0 };
}

/** Where slot `slot` lies: its file (binary search) and byte offset. */
export function placeSlot(slots: Slots, chunkSize: number, slot: number): Placement {
  let lo = 0;
  let hi = slots.first.length - 2;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if ((slots.first[mid] ?? 0) <= slot) lo = mid;
    else hi = mid - 1;
  }
  return { file: lo, offset: (slot - (slots.first[lo] ?? 0)) * chunkSize };
}
