// FIFREEZE/FITHAW and syncfs on our mounted filesystem, through the fd of its root that the
// session holds: while frozen the filesystem is consistent on the device and writers block, so
// a capture taken then is a snapshot a later fsck accepts.

import { ioctl, ioctlAsync, ioctls, syncFilesystem } from '../sys/libc.js';
import { mountRoot, type Mounted } from './mount.js';

/** Around FITHAW: `before` right before it, `after` right after it (also when it fails). */
export interface ThawHooks {
  before: () => void;
  after: () => void;
}

/**
 * Freezes the filesystem, runs `capture` (awaited: the thaw comes after it settles), and
 * always thaws. The caller keeps anything else from using the mount meanwhile (the flush
 * queue; teardown waits for it before it unmounts).
 */
export async function whileFrozen<T>(m: Mounted, capture: () => T | Promise<T>, thaw?: ThawHooks): Promise<{ result: T; freezeMs: number; frozenMs: number }> {
  const fd = mountRoot(m);
  // Dirty data is written out before (the caller synced) while writers still run: FIFREEZE
  // blocks them first and then syncs, so whatever is still dirty lengthens their stall.
  const t0 = performance.now();
  await ioctlAsync(fd, ioctls.FIFREEZE, 0, `FIFREEZE of ${m.path}`);
  const t1 = performance.now();
  try {
    const result = await capture();
    return { result, freezeMs: t1 - t0, frozenMs: performance.now() - t0 };
  } finally {
    thaw?.before();
    try {
      ioctl(fd, ioctls.FITHAW, 0, `FITHAW of ${m.path}`);
    } finally {
      thaw?.after();
    }
  }
}

/**
 * Thaws a filesystem a killed daemon may have left frozen (its writers would hang forever and
 * it could never be unmounted). Returns whether it was frozen.
 */
export function thawIfFrozen(m: Mounted): boolean {
  try {
    ioctl(mountRoot(m), ioctls.FITHAW, 0, `FITHAW of ${m.path}`);
    return true;
  } catch (err) {
    if ((err as { code?: string }).code === 'EINVAL') return false; // was not frozen
    throw err;
  }
}

/** syncfs of the mounted filesystem: its dirty pages reach the device (and so the RAM image). */
export async function syncMounted(m: Mounted): Promise<void> {
  await syncFilesystem(mountRoot(m), `the filesystem on ${m.path}`);
}
