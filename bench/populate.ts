// Populate time of the RAM image against `cat` of the same files into a new /dev/shm file,
// side by side in one run, warm (files in the page cache, RAM touched once before timing).

import { execFileSync } from 'node:child_process';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { resolvePlacement } from '../src/layouts/index.js';
import { createImage, destroyImage } from '../src/shadow/image.js';
import { populateImage } from '../src/flush/writeback.js';
import { backingFileNames } from '../src/volume/init.js';
import { closeVolume, loadVolume } from '../src/volume/volume.js';
import { filledVolume, median, table, timeMs } from './lib.js';

const GiB = 2 ** 30;
const KEY = Buffer.from('benchmark key');

async function populateMs(dir: string, mountpoint: string): Promise<number> {
  const volume = loadVolume(dir);
  try {
    const t = await resolvePlacement(volume.manifest, { secret: KEY });
    const image = await createImage(mountpoint, volume.manifest.deviceSize);
    try {
      return await timeMs(() => populateImage(image, t, volume));
    } finally {
      await destroyImage(image);
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

export async function benchPopulate(work: string, sizesGiB: number[], rounds: number): Promise<string> {
  const rows: (string | number)[][] = [];
  const mountpoint = join('/run/vbd-shadow-bench', 'shadow');
  for (const gib of sizesGiB) {
    const linear = join(work, `linear-${gib}g`);
    const keyed = join(work, `keyed-${gib}g`);
    process.stderr.write(`populate: building ${gib} GiB volumes (linear 64K, keyed 4K, 100 files)\n`);
    await filledVolume(linear, gib * GiB, 100, 65536, { kind: 'linear' });
    await filledVolume(keyed, gib * GiB, 100, 4096, { kind: 'keyed', secret: KEY });
    const cat: number[] = [];
    const lin: number[] = [];
    const key: number[] = [];
    // Interleaved rounds; the first round warms the page cache and the VM's memory.
    for (let round = 0; round <= rounds; round++) {
      const c = catMs(linear, 100);
      const l = await populateMs(linear, mountpoint);
      const k = await populateMs(keyed, mountpoint);
      if (round > 0) {
        cat.push(c);
        lin.push(l);
        key.push(k);
      }
    }
    const [c, l, k] = [median(cat), median(lin), median(key)];
    rows.push([`${gib} GiB`, c.toFixed(0), l.toFixed(0), (c / l).toFixed(2), k.toFixed(0), (c / k).toFixed(2), (l / gib).toFixed(0)]);
    rmSync(linear, { recursive: true, force: true });
    rmSync(keyed, { recursive: true, force: true });
  }
  return table(['volume (100 files)', '`cat` → /dev/shm (ms)', 'populate linear 64K (ms)', 'cat / linear', 'populate keyed 4K (ms)', 'cat / keyed', 'linear ms per GiB'], rows);
}
