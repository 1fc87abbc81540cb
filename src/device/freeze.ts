// FIFREEZE/FITHAW on a mounted filesystem: while frozen, the filesystem is consistent on the
// device and writers block, so a capture taken then is a snapshot a later fsck accepts.

import { closeSync, openSync, constants as fsc } from 'node:fs';
import { ioctl, ioctlAsync, ioctls, syncFilesystem } from '../sys/libc.js';

/** Freezes the filesystem mounted at `mountpoint`, runs `capture`, and always thaws. */
export async function whileFrozen<T>(mountpoint: string, capture: () => T): Promise<{ result: T; freezeMs: number; frozenMs: number }> {
  const fd = openSync(mountpoint, fsc.O_RDONLY | fsc.O_DIRECTORY);
  try {
    // Dirty data is written out before (the caller synced) while writers still run: FIFREEZE
    // blocks them first and then syncs, so whatever is still dirty lengthens their stall.
    const t0 = performance.now();
    await ioctlAsync(fd, ioctls.FIFREEZE, 0, `FIFREEZE of ${mountpoint}`);
    const t1 = performance.now();
    try {
      return { result: capture(), freezeMs: t1 - t0, frozenMs: performance.now() - t0 };
    } finally {
      ioctl(fd, ioctls.FITHAW, 0, `FITHAW of ${mountpoint}`);
    }
  } finally {
    closeSync(fd);
  }
}

/**
 * Thaws a filesystem a killed daemon may have left frozen (its writers would hang forever and
 * it could never be unmounted). Returns whether it was frozen.
 */
export function thawIfFrozen(mountpoint: string): boolean {
  const fd = openSync(mountpoint, fsc.O_RDONLY | fsc.O_DIRECTORY);
  try {
    ioctl(fd, ioctls.FITHAW, 0, `FITHAW of ${mountpoint}`);
    return true;
  } catch (err) {
    if ((err as { code?: string }).code === 'EINVAL') return false; // was not frozen
    throw err;
  } finally {
    closeSync(fd);
  }
}

/** syncfs of a mounted filesystem: its dirty pages reach the device (and so the RAM image). */
export async function syncMountedFilesystem(mountpoint: string): Promise<void> {
  const fd = openSync(mountpoint, fsc.O_RDONLY | fsc.O_DIRECTORY);
  try {
    await syncFilesystem(fd, `the filesystem at ${mountpoint}`);
  } finally {
    closeSync(fd);
  }
}
