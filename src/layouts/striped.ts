// `striped`: chunk c goes to file c mod N, at slot floor(c / N) — RAID-0 over the files.

import type { Geometry, Layout } from './layout.js';

export function createStripedLayout(geometry: Geometry): Layout {
  const fileCount = geometry.fileSizes.length;
  return {
    place: (chunk) => ({ file: chunk % fileCount, offset: Math.floor(chunk / fileCount) * geometry.chunkSize }),
  };
}
