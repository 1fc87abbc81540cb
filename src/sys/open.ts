// Opening a path a user may control, without ever following a symlink: openat2(2) with
// RESOLVE_NO_SYMLINKS (no symlink in any component, magic links included), optionally
// RESOLVE_BENEATH (no escape from the starting directory). One call, no check-then-use walk.

import { libc, syscallError } from './ffi.js';

const SYS_openat2 = 437;
const AT_FDCWD = -100;
const RESOLVE_NO_MAGICLINKS = 0x02;
const RESOLVE_NO_SYMLINKS = 0x04;
const RESOLVE_BENEATH = 0x08;

export const O_PATH = 0o10000000;
export const O_CLOEXEC = 0o2000000;

const syscall = libc.func('long syscall(long number, ...)');

export interface OpenOptions {
  /** Resolve `path` relative to this directory fd (default: the working directory / root). */
  dirFd?: number;
  /** Refuse paths that leave `dirFd` (`..`, absolute paths). */
  beneath?: boolean;
  /** Mode for O_CREAT. */
  mode?: number;
}

/**
 * openat2 with no symlink following anywhere on the path; O_CLOEXEC always (children such as
 * mkfs or a user's module never inherit it). Throws a syscall error (ELOOP for a symlink).
 */
export function openNoSymlinks(path: string, flags: number, what: string, o: OpenOptions = {}): number {
  const how = Buffer.alloc(24);
  how.writeBigUInt64LE(BigInt(flags | O_CLOEXEC), 0);
  how.writeBigUInt64LE(BigInt(o.mode ?? 0), 8);
  how.writeBigUInt64LE(BigInt(RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | (o.beneath === true ? RESOLVE_BENEATH : 0)), 16);
  const fd = Number(syscall(SYS_openat2, 'int', o.dirFd ?? AT_FDCWD, 'const char *', path, 'void *', how, 'size_t', how.length));
  if (fd < 0) throw syscallError('openat2', what);
  return fd;
}
