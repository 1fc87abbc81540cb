// Mounting through file descriptors (the new mount API): the filesystem is created and mounted
// detached (fsopen/fsconfig/fsmount), which gives an fd of the new mount's root, then moved
// onto the directory an O_PATH fd holds (move_mount, both paths empty). Nothing is looked up by
// name. Unmount takes a path: callers build it from a held parent fd and verify the mount id.

import { readFileSync } from 'node:fs';
import { libc, syscallError, type SyscallError } from './ffi.js';

const SYS_move_mount = 429;
const SYS_fsopen = 430;
const SYS_fsconfig = 431;
const SYS_fsmount = 432;
const FSOPEN_CLOEXEC = 0x1;
const FSCONFIG_SET_STRING = 1;
const FSCONFIG_CMD_CREATE = 6;
const FSMOUNT_CLOEXEC = 0x1;
const MOVE_MOUNT_F_EMPTY_PATH = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH = 0x40;
const UMOUNT_NOFOLLOW = 0x8;

export const MOUNT_ATTR_NOSUID = 0x2;
export const MOUNT_ATTR_NODEV = 0x4;

const syscall = libc.func('long syscall(long number, ...)');
const c = {
  umount2: libc.func('int umount2(const char *target, int flags)'),
  close: libc.func('int close(int fd)'),
};

/** The /proc path naming what `fd` holds (for calls that take a path, never a user's path). */
export function fdPath(fd: number, name?: string): string {
  return name === undefined ? `/proc/self/fd/${fd}` : `/proc/self/fd/${fd}/${name}`;
}

/**
 * Mounts `source` (a block device path root controls) as `type` onto the directory held by
 * `targetFd`, with `attrs` (MOUNT_ATTR_*). Returns an fd of the new mount's root (O_PATH-like).
 * A wrong filesystem type fails with EINVAL at creation, before anything is attached.
 */
export function mountOnFd(source: string, type: string, attrs: number, targetFd: number, what: string): number {
  const fsFd = Number(syscall(SYS_fsopen, 'const char *', type, 'unsigned int', FSOPEN_CLOEXEC));
  if (fsFd < 0) throw syscallError('fsopen', `${type} ${what}`);
  try {
    if (Number(syscall(SYS_fsconfig, 'int', fsFd, 'unsigned int', FSCONFIG_SET_STRING, 'const char *', 'source', 'const char *', source, 'int', 0)) < 0) {
      throw syscallError('fsconfig source', what);
    }
    if (Number(syscall(SYS_fsconfig, 'int', fsFd, 'unsigned int', FSCONFIG_CMD_CREATE, 'void *', null, 'void *', null, 'int', 0)) < 0) {
      throw syscallError(`fsconfig create (${type})`, what);
    }
    const mntFd = Number(syscall(SYS_fsmount, 'int', fsFd, 'unsigned int', FSMOUNT_CLOEXEC, 'unsigned int', attrs));
    if (mntFd < 0) throw syscallError('fsmount', what);
    if (Number(syscall(SYS_move_mount, 'int', mntFd, 'const char *', '', 'int', targetFd, 'const char *', '', 'unsigned int', MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH)) < 0) {
      const err = syscallError('move_mount', what);
      c.close(mntFd); // a detached mount goes away with its last fd
      throw err;
    }
    return mntFd;
  } finally {
    c.close(fsFd);
  }
}

function unmounted(result: number, what: string): 'unmounted' | 'busy' {
  if (result === 0) return 'unmounted';
  const err: SyscallError = syscallError('umount2', what);
  if (err.code === 'EBUSY') return 'busy';
  throw err;
}

/** umount2(UMOUNT_NOFOLLOW) of entry `name` of the directory `parentFd`: 'busy' if in use. */
export function unmountEntry(parentFd: number, name: string, what: string): 'unmounted' | 'busy' {
  return unmounted(c.umount2(fdPath(parentFd, name), UMOUNT_NOFOLLOW), what);
}

/**
 * umount2(UMOUNT_NOFOLLOW) of `path` — a path only root can change (the daemon's private tmpfs
 * under its runtime directory) — on a libuv thread: unmounting a tmpfs frees what it still
 * holds. 'busy' if in use.
 */
export function unmountPath(path: string, what: string): Promise<'unmounted' | 'busy'> {
  return new Promise((resolve, reject) => {
    c.umount2.async(path, UMOUNT_NOFOLLOW, (err: unknown, result: number) => {
      if (err !== null && err !== undefined) return reject(err);
      try {
        resolve(unmounted(result, what));
      } catch (failed) {
        reject(failed);
      }
    });
  });
}

/** The id of the mount an open fd lies on (as /proc/self/mountinfo numbers mounts). */
export function mountIdOf(fd: number): number {
  const match = /^mnt_id:\s+(\d+)$/m.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
  if (match === null) throw new Error(`internal: no mnt_id in /proc/self/fdinfo/${fd}`);
  return Number(match[1]);
}
