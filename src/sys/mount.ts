// mount and umount through file descriptors. A mount lands on the directory an O_PATH fd holds
// (its /proc/self/fd/N magic link names that exact dentry, whatever its path is now), and an
// unmount names the mount point through a held fd of its parent, without following symlinks.

import { readFileSync } from 'node:fs';
import { libc, syscallError, type SyscallError } from './ffi.js';

export const MS_NOSUID = 0x2;
export const MS_NODEV = 0x4;
export const MS_NOEXEC = 0x8;
const UMOUNT_NOFOLLOW = 0x8;

const c = {
  mount: libc.func('int mount(const char *source, const char *target, const char *type, unsigned long flags, const char *data)'),
  umount2: libc.func('int umount2(const char *target, int flags)'),
};

/** The /proc path naming what `fd` holds (for calls that take a path, never a user's path). */
export function fdPath(fd: number, name?: string): string {
  return name === undefined ? `/proc/self/fd/${fd}` : `/proc/self/fd/${fd}/${name}`;
}

/** mount(2) of `source` onto the directory held by `targetFd`. */
export function mountOnFd(source: string, targetFd: number, type: string, flags: number, data: string | null, what: string): void {
  if (c.mount(source, fdPath(targetFd), type, flags, data) !== 0) throw syscallError('mount', what);
}

/** umount2(UMOUNT_NOFOLLOW) of entry `name` of the directory `parentFd`: 'busy' if in use. */
export function unmountEntry(parentFd: number, name: string, what: string): 'unmounted' | 'busy' {
  if (c.umount2(fdPath(parentFd, name), UMOUNT_NOFOLLOW) === 0) return 'unmounted';
  const err: SyscallError = syscallError('umount2', what);
  if (err.code === 'EBUSY') return 'busy';
  throw err;
}

/** The id of the mount an open fd lies on (as /proc/self/mountinfo numbers mounts). */
export function mountIdOf(fd: number): number {
  const match = /^mnt_id:\s+(\d+)$/m.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
  if (match === null) throw new Error(`internal: no mnt_id in /proc/self/fdinfo/${fd}`);
  return Number(match[1]);
}
