// The few syscalls Node lacks, declared once through koffi, each checked and errno-decoded.

import koffi from 'koffi';
import { libc, syscallError } from './ffi.js';

const PROT_READ = 0x1;
const PROT_WRITE = 0x2;
const MAP_SHARED = 0x01;
const MAP_NORESERVE = 0x4000;
const MAP_FAILED = 2n ** 64n - 1n;

const c = {
  mmap: libc.func('void *mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset)'),
  munmap: libc.func('int munmap(void *addr, size_t length)'),
  mlock: libc.func('int mlock(void *addr, size_t len)'),
  munlock: libc.func('int munlock(void *addr, size_t len)'),
  ioctlInt: libc.func('int ioctl(int fd, unsigned long request, long arg)'),
  ioctlPtr: libc.func('int ioctl(int fd, unsigned long request, void *arg)'),
  flock: libc.func('int flock(int fd, int operation)'),
  syncfs: libc.func('int syncfs(int fd)'),
  mkfifo: libc.func('int mkfifo(const char *path, uint32_t mode)'),
  preadv: libc.func('int64_t preadv(int fd, void *iov, int iovcnt, int64_t offset)'),
  pwritev: libc.func('int64_t pwritev(int fd, void *iov, int iovcnt, int64_t offset)'),
  exit: libc.func('void _exit(int status)'),
};

/** An opaque pointer into a mapping, as koffi hands it out. */
export type Pointer = unknown;

export function pointerAddress(ptr: Pointer): bigint {
  return BigInt(koffi.address(ptr));
}

/** mmap(MAP_SHARED | MAP_NORESERVE) of `length` bytes of `fd` from `offset`, read-write. */
export function mapShared(fd: number, offset: number, length: number, what: string): Pointer {
  const ptr: Pointer = c.mmap(null, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, offset);
  if (ptr === null || pointerAddress(ptr) === MAP_FAILED) throw syscallError('mmap', what);
  return ptr;
}

export function unmap(ptr: Pointer, length: number, what: string): void {
  if (c.munmap(ptr, length) !== 0) throw syscallError('munmap', what);
}

export function lockMemory(ptr: Pointer, length: number, what: string): void {
  if (c.mlock(ptr, length) !== 0) throw syscallError('mlock', what);
}

export function unlockMemory(ptr: Pointer, length: number, what: string): void {
  if (c.munlock(ptr, length) !== 0) throw syscallError('munlock', what);
}

/** A Buffer over the first `length` bytes of a mapping (no copy). At most 2^32 − 1 bytes. */
export function viewOf(ptr: Pointer, length: number): Buffer {
  return Buffer.from(koffi.view(ptr, length) as ArrayBuffer);
}

/**
 * A Buffer over `length` bytes at `address` in this process (no copy): how a worker thread
 * reads a mapping the daemon's thread made (threads share the address space). The mapping
 * must outlive every use of the view; nothing here can check that.
 */
export function viewAtAddress(address: bigint, length: number): Buffer {
  const ptr: Pointer = koffi.decode(new BigUint64Array([address]), 'void *');
  return viewOf(ptr, length);
}

/** ioctl with an int (or no) argument; returns its result. */
export function ioctl(fd: number, request: number, arg: number, what: string): number {
  const r = c.ioctlInt(fd, request, arg) as number;
  if (r < 0) throw syscallError('ioctl', what);
  return r;
}

/** ioctl whose argument is a struct in `arg` (read and/or written by the kernel). */
export function ioctlStruct(fd: number, request: number, arg: Buffer, what: string): number {
  const r = c.ioctlPtr(fd, request, arg) as number;
  if (r < 0) throw syscallError('ioctl', what);
  return r;
}

const LOCK_EX = 2;
const LOCK_NB = 4;

/**
 * flock(LOCK_EX | LOCK_NB): true if taken, false if another open file holds it. The kernel
 * drops the lock with the holder's last fd, so a killed holder never leaves a stale lock.
 */
export function tryLockExclusive(fd: number, what: string): boolean {
  if (c.flock(fd, LOCK_EX | LOCK_NB) === 0) return true;
  const err = syscallError('flock', what);
  if (err.code === 'EAGAIN') return false;
  throw err;
}

/** flock(LOCK_EX), waiting on a libuv thread until the lock is ours (released with the fd). */
export function lockExclusive(fd: number, what: string): Promise<void> {
  return new Promise((resolve, reject) => {
    c.flock.async(fd, LOCK_EX, (err: unknown, r: number) => {
      if (err !== null && err !== undefined) reject(err);
      else if (r !== 0) reject(syscallError('flock', what));
      else resolve();
    });
  });
}

/** Async ioctl for calls that can block a while (FIFREEZE syncs the filesystem first). */
export function ioctlAsync(fd: number, request: number, arg: number, what: string): Promise<number> {
  return new Promise((resolve, reject) => {
    c.ioctlInt.async(fd, request, arg, (err: unknown, r: number) => {
      if (err !== null && err !== undefined) reject(err);
      else if (r < 0) reject(syscallError('ioctl', what));
      else resolve(r);
    });
  });
}

/**
 * preadv/pwritev with an iovec array of (address, length) pairs; returns bytes moved.
 * Used to scatter one file range into many places of the image in one call.
 */
export function vectorIo(kind: 'read' | 'write', fd: number, iov: Uint32Array, count: number, offset: number, what: string): number {
  const fn = kind === 'read' ? c.preadv : c.pwritev;
  const n = Number(fn(fd, iov, count, offset));
  if (n < 0) throw syscallError(kind === 'read' ? 'preadv' : 'pwritev', what);
  return n;
}

/** mkfifo(3): Node has no way to make a FIFO. */
export function makeFifo(path: string, mode: number): void {
  if (c.mkfifo(path, mode) !== 0) throw syscallError('mkfifo', path);
}

/** syncfs(2) on this thread: for code that is synchronous anyway (a sealed commit). */
export function syncFilesystemSync(fd: number, what: string): void {
  if (c.syncfs(fd) < 0) throw syscallError('syncfs', what);
}

/** syncfs(2) on a worker thread: writes out everything dirty on the filesystem holding `fd`. */
export function syncFilesystem(fd: number, what: string): Promise<void> {
  return new Promise((resolve, reject) => {
    c.syncfs.async(fd, (err: unknown, r: number) => {
      if (err !== null && err !== undefined) reject(err);
      else if (r < 0) reject(syscallError('syncfs', what));
      else resolve();
    });
  });
}

export const ioctls = {
  FIFREEZE: 0xc0045877,
  FITHAW: 0xc0045878,
  BLKFLSBUF: 0x1261,
} as const;

/**
 * Ends the process now with `code` (_exit(2)): process 'exit' listeners run first, Node's own
 * teardown does not (joining the libuv threads, the worker threads, disposing the heaps).
 * Only for a process whose work is done and whose output went out with synchronous writes.
 */
export function exitNow(code: number): never {
  process.exitCode = code;
  process.emit('exit', code);
  c.exit(code);
  throw new Error('internal: _exit returned');
}
