// Populate time of the RAM image against `cat` of the same files into a new /dev/shm file,
// side by side in one run, warm (files in the page cache, RAM touched once before timing).

import { execFileSync } from 'node:child_process';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { createImage, destroyImage } from '../src/shadow/image.js';
import { openChunkStore } from '../src/store/chunk-store.js';
import { backingFileNames } from '../src/volume/init.js';
import { closeVolume, openVolume } from '../src/volume/volume.js';
import { filledVolume, median, table, timeMs } from './lib.js';

const GiB = 2 ** 30;
const KEY = Buffer.from('benchmark key');

async function populateMs(dir: string, mountpoint: string): Promise<number> {
  const volume = openVolume(dir);
  try {
    const store = await openChunkStore(volume, { writable: false, secret: KEY });
    try {
      const image = await createImage(mountpoint, volume.manifest.deviceSize, volume.identity);
      try {
        return await timeMs(() => store.fill(image));
      } finally {
        await destroyImage(image);
      }
    } finally {
      store.close();
    }
  } finally {
    closeVolume(volume);
  }
}

function catMs(dir: string, files: number): number {
  const out = '/dev/shm/vbd-bench-cat';
  const list = backingFileNames(files).map((n) => join(dir, n)).join(' ');
  const t = performance.now();
  execFileSync('sh', ['-c', `cat ${list} > ${out}`]);
  const ms = performance.now() - t;
  rmSync(out);
  return ms;
}

/** Median populate time of one volume, with `cat` of its own files beside it, interleaved. */
async function measure(dir: string, mountpoint: string, rounds: number): Promise<{ cat: number; populate: number }> {
  const cat: number[] = [];
  const populate: number[] = [];
  // The first round warms the page cache and the VM's memory; it is not counted.
  for (let round = 0; round <= rounds; round++) {
    const c = catMs(dir, 100);
    const p = await populateMs(dir, mountpoint);
    if (round > 0) {
      cat.push(c);
      populate.push(p);
    }
  }
  return { cat: median(cat), populate: median(populate) };
}

export async function benchPopulate(work: string, sizesGiB: number[], rounds: number): Promise<string> {
  const rows: (string | number)[][] = [];
  const mountpoint = join('/run/vbd-shadow-bench', 'shadow');
  for (const gib of sizesGiB) {
    // One volume at a time: files + image must fit in RAM for a warm figure.
    const results: { cat: number; populate: number }[] = [];
    for (const [kind, chunk] of [['linear', 65536], ['keyed', 4096]] as const) {
      const dir = join(work, `${kind}-${gib}g`);
      process.stderr.write(`populate: ${gib} GiB ${kind} volume, ${chunk / 1024}K chunks, 100 files\n`);
      await filledVolume(dir, gib * GiB, 100, chunk, kind === 'keyed' ? { kind, secret: KEY } : { kind });
      results.push(await measure(dir, mountpoint, rounds));
      rmSync(dir, { recursive: true, force: true });
    }
    const [lin, key] = results as [{ cat: number; populate: number }, { cat: number; populate: number }];
    rows.push([`${gib} GiB`, lin.cat.toFixed(0), lin.populate.toFixed(0), (lin.cat / lin.populate).toFixed(2), key.cat.toFixed(0), key.populate.toFixed(0), (key.cat / key.populate).toFixed(2), (lin.populate / gib).toFixed(0), (key.populate / gib).toFixed(0)]);
  }
  return table(['volume (100 files)', '`cat` linear files (ms)', 'populate linear 64K (ms)', 'ratio', '`cat` keyed files (ms)', 'populate keyed 4K (ms)', 'ratio', 'linear ms/GiB', 'keyed ms/GiB'], rows);
}
