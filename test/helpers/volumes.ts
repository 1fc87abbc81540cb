// Making volumes and moving images through the library, as the CLI does.

import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { exportImage, importImage } from '../../src/image/offline.js';
import { resolvePlacement } from '../../src/layouts/index.js';
import type { PlacementTable } from '../../src/layouts/layout.js';
import { initVolume, type LayoutChoice } from '../../src/volume/init.js';
import { closeVolume, openVolume } from '../../src/volume/volume.js';

export async function makeVolume(dir: string, deviceSize: number, fileCount: number, chunkSize: number, layout: LayoutChoice): Promise<void> {
  await initVolume({ dir, deviceSize, fileCount, chunkSize, layout: layout.kind === 'keyed' ? { kind: 'keyed', secret: Buffer.from(layout.secret) } : layout });
}

export async function placement(dir: string, secret?: Buffer): Promise<PlacementTable> {
  const volume = openVolume(dir);
  try {
    return await resolvePlacement(volume.manifest, { owner: volume.owner, secret });
  } finally {
    closeVolume(volume);
  }
}

/** Imports `image` into the volume and returns what export gives back. */
export async function importThenExport(dir: string, image: Buffer, scratch: string, secret?: Buffer): Promise<Buffer> {
  const inPath = join(scratch, 'in.img');
  const outPath = join(scratch, 'out.img');
  writeFileSync(inPath, image);
  const writable = openVolume(dir, { writable: true });
  try {
    importImage(writable, await resolvePlacement(writable.manifest, { owner: writable.owner, secret }), inPath);
  } finally {
    closeVolume(writable);
  }
  const readable = openVolume(dir);
  try {
    exportImage(readable, await resolvePlacement(readable.manifest, { owner: readable.owner, secret }), outPath);
  } finally {
    closeVolume(readable);
  }
  return readFileSync(outPath);
}

export function randomImage(size: number): Buffer {
  return randomBytes(size);
}
