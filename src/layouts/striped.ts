// `striped`: chunk c goes to file c mod N, at slot floor(c / N) — RAID-0 over the files.

import { newTable, type Geometry, type Layout, type Placement } from './layout.js';

export function createStripedLayout(geometry: Geometry): Layout {
  const fileCount = geometry.fileSizes.length;
  const place = (chunk: number): Placement => ({
    file: chunk % fileCount,
    offset: Math.floor(chunk / fileCount) * geometry.chunkSize,
  });
  return {
    place,
    table() {
      const table = newTable(geometry.chunkCount);
      for (let chunk = 0; chunk < geometry.chunkCount; chunk++) {
        table.file[chunk] = chunk % fileCount;
        table.offset[chunk] = Math.floor(chunk / fileCount) * geometry.chunkSize;
      }
      return table;
    },
  };
}
