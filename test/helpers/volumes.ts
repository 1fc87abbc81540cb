// Making volumes and moving images through the library, as the CLI does (through the chunk store).

import { randomBytes } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { expect } from 'vitest';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { exportImage, importImage } from '../../src/image/offline.js';
import { cliOk } from './cli.js';
import { resolvePlacement } from '../../src/layouts/index.js';
import type { PlacementTable } from '../../src/layouts/layout.js';
import { openChunkStore, type ChunkStore, type OpenStoreOptions } from '../../src/store/chunk-store.js';
import { initVolume, type LayoutChoice } from '../../src/volume/init.js';
import { closeVolume, openVolume, requirePlainVolume } from '../../src/volume/volume.js';

export async function makeVolume(dir: string, deviceSize: number, fileCount: number, chunkSize: number, layout: LayoutChoice): Promise<void> {
  await initVolume({ dir, deviceSize, fileCount, chunkSize, layout: layout.kind === 'keyed' ? { kind: 'keyed', secret: Buffer.from(layout.secret) } : layout });
}

export async function placement(dir: string, secret?: Buffer): Promise<PlacementTable> {
  const volume = openVolume(dir);
  try {
    const plain = requirePlainVolume(volume);
    return await resolvePlacement(plain.manifest, { owner: plain.owner, secret });
  } finally {
    closeVolume(volume);
  }
}

/** Runs `work` with the volume's chunk store (a keyed secret or a sealed passphrase in `secret`; `options`: a sealed store's floors, re-key point …). */
export async function withStore<T>(dir: string, secret: Buffer | undefined, writable: boolean, work: (store: ChunkStore) => T | Promise<T>, options: Omit<OpenStoreOptions, 'writable' | 'secret'> = {}): Promise<T> {
  const volume = openVolume(dir, { writable });
  try {
    const store = await openChunkStore(volume, { ...options, writable, secret: secret === undefined ? undefined : Buffer.from(secret) });
    try {
      return await work(store);
    } finally {
      store.close();
    }
  } finally {
    closeVolume(volume);
  }
}

/** Imports `image` into the volume and returns what export gives back. */
export async function importThenExport(dir: string, image: Buffer, scratch: string, secret?: Buffer): Promise<Buffer> {
  const inPath = join(scratch, 'in.img');
  const outPath = join(scratch, 'out.img');
  writeFileSync(inPath, image);
  await withStore(dir, secret, true, (store) => importImage(store, inPath));
  await withStore(dir, secret, false, (store) => exportImage(store, outPath));
  return readFileSync(outPath);
}

export function randomImage(size: number): Buffer {
  return randomBytes(size);
}

/**
 * Exports the volume in `dir` (offline, through the CLI) and checks the ext4 it holds: `e2fsck
 * -fn` clean, and the file at `fsPath` equal to `data`.
 */
export function expectExportedExt4File(dir: string, scratch: string, fsPath: string, data: Buffer): void {
  const image = join(scratch, 'final.img');
  cliOk(['export', dir, image]);
  const fsck = spawnSync('e2fsck', ['-fn', image], { encoding: 'utf8' });
  expect(fsck.status, fsck.stdout).toBe(0);
  const dumped = join(scratch, 'dumped');
  expect(spawnSync('debugfs', ['-R', `dump ${fsPath} ${dumped}`, image]).status).toBe(0);
  expect(readFileSync(dumped).equals(data)).toBe(true);
}

/** Chunks of `chunkSize` where the files differ from `image` (exported through the chunk store, as `export` does; the CLI refuses while live). */
export async function differingChunks(dir: string, image: Buffer, scratch: string, chunkSize: number): Promise<number[]> {
  const out = join(scratch, `export-${Date.now()}.img`);
  await withStore(dir, undefined, false, (store) => exportImage(store, out));
  const files = readFileSync(out);
  expect(files.length).toBe(image.length);
  const diff: number[] = [];
  for (let c = 0; c < image.length / chunkSize; c++) if (!files.subarray(c * chunkSize, (c + 1) * chunkSize).equals(image.subarray(c * chunkSize, (c + 1) * chunkSize))) diff.push(c);
  return diff;
}
