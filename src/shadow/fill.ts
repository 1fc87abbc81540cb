// Filling a volume's RAM image from its backing files (start).

import type { PlacementTable } from '../layouts/layout.js';
import { fileName, type Volume } from '../volume/volume.js';
import type { ShadowImage } from './image.js';
import { transferImage } from './populate.js';

/** Reads every chunk from its place in the files into the image, in file order. */
export function populateImage(image: ShadowImage, table: PlacementTable, volume: Volume, progress?: (bytes: number) => void): void {
  const io = { image, table, chunkSize: volume.manifest.chunkSize, fds: volume.fds, name: (file: number) => fileName(volume, file) };
  transferImage('read', io, volume.manifest.files.map((f) => f.size), progress);
}
