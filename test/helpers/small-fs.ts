// A small real ext4 filesystem for a test (to hit ENOSPC for real), removed after the test.

import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { Stage, eachTestCleanup } from './cleanup.js';
import { tempDir } from './tmp.js';

const made: { mountpoint: string; device: string }[] = [];

eachTestCleanup(Stage.Kernel, () => {
  for (const { mountpoint, device } of made.splice(0)) {
    spawnSync('umount', [mountpoint]);
    spawnSync('losetup', ['--detach', device]);
  }
});

/** Mounts a fresh ext4 of `mib` MiB and returns its mountpoint. */
export function smallExt4(mib: number): string {
  const scratch = tempDir('vbd-fs-');
  const image = join(scratch, 'fs.img');
  execFileSync('truncate', ['-s', `${mib}M`, image]);
  execFileSync('mkfs.ext4', ['-q', '-m', '0', image]);
  const device = execFileSync('losetup', ['--find', '--show', image], { encoding: 'utf8' }).trim();
  const mountpoint = join(scratch, 'fs');
  mkdirSync(mountpoint);
  made.push({ mountpoint, device });
  execFileSync('mount', [device, mountpoint]);
  return mountpoint;
}

export function freeBytes(mountpoint: string): number {
  const out = execFileSync('df', ['--output=avail', '-B1', mountpoint], { encoding: 'utf8' });
  return Number(out.trim().split('\n').pop());
}
