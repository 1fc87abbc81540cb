// Writing the RAM image back into the backing files.

import { fsyncSync } from 'node:fs';
import { failure } from '../common/errors.js';
import type { PlacementTable } from '../layouts/layout.js';
import { transferImage, type ChunkIo } from '../shadow/populate.js';
import type { ShadowImage } from '../shadow/image.js';
import type { Volume } from '../volume/volume.js';

export function fileNamer(volume: Volume): (file: number) => string {
  return (file) => volume.manifest.files[file]?.path ?? `#${file}`;
}

export function syncFiles(volume: Volume, files: Iterable<number> = volume.fds.keys()): void {
  for (const file of files) {
    try {
      fsyncSync(volume.fds[file] ?? -1);
    } catch (err) {
      throw failure(`fsync of backing file '${fileNamer(volume)(file)}'`, err);
    }
  }
}

/** What chunk transfers between this volume's files and its RAM image need. */
export function chunkIo(image: ShadowImage, table: PlacementTable, volume: Volume): ChunkIo {
  return { image, table, chunkSize: volume.manifest.chunkSize, fds: volume.fds, name: fileNamer(volume) };
}

/** Fills the image from the files. */
export function populateImage(image: ShadowImage, table: PlacementTable, volume: Volume, progress?: (bytes: number) => void): void {
  transferImage('read', chunkIo(image, table, volume), volume.manifest.files.map((f) => f.size), progress);
}

/** Writes every chunk of the image to its place and syncs the files. */
export function writeBackAll(image: ShadowImage, table: PlacementTable, volume: Volume): void {
  transferImage('write', chunkIo(image, table, volume), volume.manifest.files.map((f) => f.size));
  syncFiles(volume);
}
