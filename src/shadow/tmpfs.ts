// Whether a RAM image's tmpfs is mounted: apart from image.ts (which maps and locks through
// koffi), so `status` can tell a kept image without loading the C library.

import { readFileSync } from 'node:fs';

/** Whether a tmpfs is mounted at `dir` (from /proc/self/mounts). */
export function isTmpfsMounted(dir: string): boolean {
  return readFileSync('/proc/self/mounts', 'utf8').split('\n').some((line) => {
    const [, mnt, type] = line.split(' ');
    return mnt === dir && type === 'tmpfs';
  });
}
