// An ext4 of its own over a loop device, whose backing file (in /dev/shm) is "the disk": a copy
// of that file taken while nothing writes to the device is what the disk holds at a power cut —
// whatever is still in the ext4's page cache is not in it. The copy is then attached read-write
// on a loop device of its own and mounted, so ext4 replays its journal as after a reboot.
// Everything is unmounted, detached and removed after the test, also when it fails.

import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { basename, join } from 'node:path';
import { Stage, eachTestCleanup } from './cleanup.js';

export interface LoopExt4 {
  /** The backing file: the disk. */
  image: string;
  device: string;
  mountpoint: string;
}

const mounted: { mountpoint: string; device: string }[] = [];
const dirs: string[] = [];

function unmountAndDetach(mountpoint: string, device: string): void {
  if (spawnSync('umount', [mountpoint]).status !== 0) spawnSync('umount', ['-l', mountpoint]);
  spawnSync('losetup', ['--detach', device]);
}

eachTestCleanup(Stage.Kernel, () => {
  for (const { mountpoint, device } of mounted.splice(0).reverse()) unmountAndDetach(mountpoint, device);
});
eachTestCleanup(Stage.Files, () => {
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

/** A scratch directory in /dev/shm, removed after the test (after every mount is gone). */
export function shmDir(): string {
  const dir = mkdtempSync('/dev/shm/vbd-test-');
  dirs.push(dir);
  return dir;
}

function attachAndMount(image: string, mountpoint: string): LoopExt4 {
  const device = execFileSync('losetup', ['--find', '--show', image], { encoding: 'utf8' }).trim();
  mkdirSync(mountpoint, { recursive: true });
  mounted.push({ mountpoint, device });
  execFileSync('mount', ['-t', 'ext4', device, mountpoint]);
  return { image, device, mountpoint };
}

/** A fresh ext4 of `mib` MiB over a loop device, mounted on `mountpoint`; its backing file in `dir`. */
export function loopExt4(dir: string, mib: number, mountpoint: string): LoopExt4 {
  const image = join(dir, 'disk.img');
  execFileSync('truncate', ['-s', `${mib}M`, image]);
  execFileSync('mkfs.ext4', ['-q', '-m', '0', image]);
  return attachAndMount(image, mountpoint);
}

/** Unmounts and detaches now (the cleanup after the test does it otherwise). */
export function release(fs: LoopExt4): void {
  const i = mounted.findIndex((m) => m.device === fs.device);
  if (i >= 0) mounted.splice(i, 1);
  unmountAndDetach(fs.mountpoint, fs.device);
}

/** Writes completed by the device, and writes in flight (/sys/block/loopN/stat). */
function writeCounters(device: string): { writes: number; inFlight: number } {
  const f = readFileSync(`/sys/block/${basename(device)}/stat`, 'utf8').trim().split(/\s+/).map(Number);
  return { writes: f[4] ?? -1, inFlight: f[8] ?? -1 };
}

/**
 * Copies the disk to `to` as it is at this moment: the copy is taken again until no write
 * reached the device while it was read (the kernel's own writeback may run meanwhile), so it is
 * one state the disk really held. Returns how many copies that took; throws if none was still.
 */
export function copyDisk(fs: LoopExt4, to: string, attempts = 20): number {
  for (let n = 1; n <= attempts; n++) {
    const before = writeCounters(fs.device);
    copyFileSync(fs.image, to);
    const after = writeCounters(fs.device);
    if (before.inFlight === 0 && after.inFlight === 0 && before.writes === after.writes) return n;
  }
  throw new Error(`${fs.device} was written to during each of ${attempts} copies`);
}

/** Attaches a copy of a disk read-write (ext4 replays its journal) and mounts it on `mountpoint`. */
export function mountCopy(image: string, mountpoint: string): LoopExt4 {
  return attachAndMount(image, mountpoint);
}
