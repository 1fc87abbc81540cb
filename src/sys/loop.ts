// Loop-device ioctls (linux/loop.h). A session gets a loop device of its own (LOOP_CTL_ADD),
// bound through the daemon's fd (LOOP_CONFIGURE), checked through that fd (LOOP_GET_STATUS64)
// and removed at teardown (LOOP_CTL_REMOVE) — no number is looked up by name or reused while
// someone may still hold it open.

import { closeSync, openSync, constants as fsc } from 'node:fs';
import { ioctl, ioctlAsync, ioctlStruct } from './libc.js';

const LOOP_CTL_ADD = 0x4c80;
const LOOP_CTL_REMOVE = 0x4c81;
const LOOP_CLR_FD = 0x4c01;
const LOOP_GET_STATUS64 = 0x4c05;
const LOOP_CONFIGURE = 0x4c0a;

/** struct loop_info64: 232 bytes; struct loop_config: fd, block_size, info, 8 reserved u64. */
const INFO64_BYTES = 232;
const CONFIG_BYTES = 8 + INFO64_BYTES + 64;
const FILE_NAME_AT = 56;
/** loop_info64.lo_flags, and its direct I/O flag (uapi linux/loop.h). */
const FLAGS_AT = 52;
const LO_FLAGS_DIRECT_IO = 16;
const FILE_NAME_BYTES = 64;

function withControl<T>(fn: (fd: number) => T): T {
  const fd = openSync('/dev/loop-control', fsc.O_RDWR);
  try {
    return fn(fd);
  } finally {
    closeSync(fd);
  }
}

/** Creates a new loop device (the lowest free index) and returns its index. */
export function addLoopDevice(): number {
  return withControl((fd) => ioctl(fd, LOOP_CTL_ADD, -1, 'LOOP_CTL_ADD on /dev/loop-control'));
}

/**
 * Removes loop device `index`: 'busy' while anyone holds it open or it is bound. On a libuv
 * thread: the kernel takes tens of ms (del_gendisk), which a teardown spends on other work.
 */
export async function removeLoopDevice(index: number): Promise<'removed' | 'busy' | 'gone'> {
  const fd = openSync('/dev/loop-control', fsc.O_RDWR);
  try {
    await ioctlAsync(fd, LOOP_CTL_REMOVE, index, `LOOP_CTL_REMOVE of loop${index}`);
    return 'removed';
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (code === 'EBUSY') return 'busy';
    if (code === 'ENODEV') return 'gone';
    throw err;
  } finally {
    closeSync(fd);
  }
}

/**
 * Binds `backingFd` to the loop device open as `loopFd`: 512-byte sectors, buffered I/O unless
 * `directIo` (set in the same call, atomically with the block size).
 */
export function configureLoop(loopFd: number, backingFd: number, name: string, what: string, directIo = false): void {
  const config = Buffer.alloc(CONFIG_BYTES);
  config.writeUInt32LE(backingFd, 0);
  config.writeUInt32LE(512, 4);
  if (directIo) config.writeUInt32LE(LO_FLAGS_DIRECT_IO, 8 + FLAGS_AT);
  Buffer.from(name).copy(config, 8 + FILE_NAME_AT, 0, FILE_NAME_BYTES - 1);
  ioctlStruct(loopFd, LOOP_CONFIGURE, config, what);
}

/** Unbinds the loop device (deferred by the kernel until its last opener closes it). */
export function clearLoop(loopFd: number, what: string): void {
  ioctl(loopFd, LOOP_CLR_FD, 0, what);
}

/** What LOOP_GET_STATUS64 says of a bound loop device (struct loop_info64). */
export interface LoopStatus {
  dev: bigint;
  ino: bigint;
  offset: bigint;
  sizeLimit: bigint;
  flags: number;
}

/** The loop device's status, or undefined if it is unbound. */
export function loopStatus(loopFd: number, what: string): LoopStatus | undefined {
  const info = Buffer.alloc(INFO64_BYTES);
  try {
    ioctlStruct(loopFd, LOOP_GET_STATUS64, info, what);
  } catch (err) {
    if ((err as { code?: string }).code === 'ENXIO') return undefined;
    throw err;
  }
  return { dev: info.readBigUInt64LE(0), ino: info.readBigUInt64LE(8), offset: info.readBigUInt64LE(24), sizeLimit: info.readBigUInt64LE(32), flags: info.readUInt32LE(52) };
}

/** The (device, inode) of the file bound to the loop device, or undefined if it is unbound. */
export function loopBacking(loopFd: number, what: string): { dev: bigint; ino: bigint } | undefined {
  const s = loopStatus(loopFd, what);
  return s === undefined ? undefined : { dev: s.dev, ino: s.ino };
}
