// The RAM image: a file in a private tmpfs that only root can enter, mounted with huge pages
// (one fault per 2 MiB instead of per 4 KiB: populate is ~5× faster) and sized to the image,
// so nobody else can fill the space it needs. It is mapped MAP_SHARED|MAP_NORESERVE in
// windows of at most 1 GiB (a Node Buffer holds < 4 GiB) and every window is mlocked, so
// the user's data never reaches swap. The tmpfs is `noswap` as well: an image left by a killed
// daemon is no longer locked, and must not reach swap either. Beside the image lies the
// identity of its volume, so a leftover is only ever recovered into the volume it came from.

import { closeSync, fstatSync, ftruncateSync, mkdirSync, openSync, readFileSync, rmSync, rmdirSync, unlinkSync, writeFileSync, constants as fsc } from 'node:fs';
import { join } from 'node:path';
import { VbdError, failure } from '../common/errors.js';
import { runOk } from '../common/exec.js';
import { formatSize } from '../common/size.js';
import { sameIdentity, type VolumeIdentity } from '../volume/volume.js';
import { lockMemory, mapShared, pointerAddress, unlockMemory, unmap, viewOf, type Pointer } from '../sys/libc.js';
import { unmountPath } from '../sys/mount.js';

export const WINDOW_BYTES = 2 ** 30;
const HUGE_PAGE = 2 * 2 ** 20;

export interface ImageWindow {
  /** Device offset of the window's first byte. */
  offset: number;
  length: number;
  ptr: Pointer;
  address: bigint;
  view: Buffer;
}

export interface ShadowImage {
  /** The tmpfs mountpoint (root-only) and the image file inside it. */
  mountpoint: string;
  path: string;
  size: number;
  fd: number;
  /** The image file as the kernel identifies it (what its loop device must be bound to). */
  backing: { dev: bigint; ino: bigint };
  windows: ImageWindow[];
  locked: boolean;
}

export { isTmpfsMounted } from './tmpfs.js';

/** Bytes of RAM the system can still give (MemAvailable). */
export function availableMemory(): number {
  const match = /^MemAvailable:\s+(\d+) kB$/m.exec(readFileSync('/proc/meminfo', 'utf8'));
  return match === null ? 0 : Number(match[1]) * 1024;
}

function mapWindows(fd: number, size: number, lock: boolean): ImageWindow[] {
  const windows: ImageWindow[] = [];
  try {
    for (let offset = 0; offset < size; offset += WINDOW_BYTES) {
      const length = Math.min(WINDOW_BYTES, size - offset);
      const what = `of the RAM image at ${formatSize(offset)} (${formatSize(length)})`;
      const ptr = mapShared(fd, offset, length, what);
      const window = { offset, length, ptr, address: pointerAddress(ptr), view: viewOf(ptr, length) };
      windows.push(window);
      if (lock) lockMemory(ptr, length, what);
    }
    return windows;
  } catch (err) {
    releaseWindows(windows);
    throw err;
  }
}

function releaseWindows(windows: ImageWindow[]): void {
  for (const w of windows) {
    try {
      unlockMemory(w.ptr, w.length, 'RAM image window');
    } catch {
      /* was not locked */
    }
    unmap(w.ptr, w.length, 'RAM image window');
  }
  windows.length = 0;
}

/** Mounts the private tmpfs, creates the image file, maps and locks it. Undone by `destroyImage`. */
function backingOf(fd: number): { dev: bigint; ino: bigint } {
  const st = fstatSync(fd, { bigint: true });
  return { dev: st.dev, ino: st.ino };
}

const IDENTITY_FILE = 'identity.json';

function writeIdentity(mountpoint: string, identity: VolumeIdentity): void {
  const text = JSON.stringify({ uid: identity.uid, dev: String(identity.dev), ino: String(identity.ino), bornNs: String(identity.bornNs) });
  writeFileSync(join(mountpoint, IDENTITY_FILE), `${text}\n`, { mode: 0o600, flag: 'wx' });
}

/** The identity recorded beside a leftover image, or undefined if it is missing or unreadable. */
function readIdentity(mountpoint: string): VolumeIdentity | undefined {
  try {
    const raw = JSON.parse(readFileSync(join(mountpoint, IDENTITY_FILE), 'utf8')) as Record<string, unknown>;
    return { uid: Number(raw['uid']), dev: BigInt(String(raw['dev'])), ino: BigInt(String(raw['ino'])), bornNs: BigInt(String(raw['bornNs'])) };
  } catch {
    return undefined;
  }
}

export async function createImage(mountpoint: string, size: number, identity: VolumeIdentity): Promise<ShadowImage> {
  mkdirSync(mountpoint, { recursive: true, mode: 0o700 });
  const tmpfsSize = Math.ceil(size / HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE;
  await runOk('mount', ['-t', 'tmpfs', '-o', `size=${tmpfsSize},huge=within_size,noswap,mode=0700,nosuid,nodev,noexec`, 'vbd-shadow', mountpoint]);
  const path = join(mountpoint, 'image');
  let fd = -1;
  try {
    writeIdentity(mountpoint, identity);
    fd = openSync(path, fsc.O_RDWR | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600);
    ftruncateSync(fd, size);
    const windows = mapWindows(fd, size, true);
    return { mountpoint, path, size, fd, backing: backingOf(fd), windows, locked: true };
  } catch (err) {
    if (fd >= 0) closeSync(fd);
    await unmountTmpfs(mountpoint);
    throw failure(`cannot hold ${formatSize(size)} in locked RAM`, err);
  }
}

/**
 * Maps an image left behind by an earlier daemon (for recovery), without locking it — only if
 * the identity beside it is this volume's.
 */
export function openLeftoverImage(mountpoint: string, identity: VolumeIdentity): ShadowImage {
  const path = join(mountpoint, 'image');
  const recorded = readIdentity(mountpoint);
  if (recorded === undefined || !sameIdentity(recorded, identity)) {
    throw new VbdError(`the leftover RAM image ${path} does not carry this volume's identity; refusing to write it into this volume (inspect it by hand)`);
  }
  const fd = openSync(path, fsc.O_RDWR | fsc.O_NOFOLLOW);
  const size = fstatSync(fd).size;
  return { mountpoint, path, size, fd, backing: backingOf(fd), windows: mapWindows(fd, size, false), locked: false };
}

/** Unmounts the image's private tmpfs (umount2 itself, no umount(8) process). */
async function unmountTmpfs(mountpoint: string): Promise<void> {
  if ((await unmountPath(mountpoint, `the RAM image's tmpfs ${mountpoint}`)) === 'busy') throw new VbdError(`cannot unmount the RAM image's tmpfs ${mountpoint}: it is busy`);
}

/** Unlocks, unmaps and deletes the image, then unmounts its tmpfs. */
export async function destroyImage(image: ShadowImage): Promise<void> {
  releaseWindows(image.windows);
  closeSync(image.fd);
  unlinkSync(image.path);
  rmSync(join(image.mountpoint, IDENTITY_FILE), { force: true });
  await unmountTmpfs(image.mountpoint);
  try {
    rmdirSync(image.mountpoint);
  } catch {
    /* left for the next start */
  }
}

/** The window holding device byte `offset`. */
export function windowAt(image: ShadowImage, offset: number): ImageWindow {
  const w = image.windows[Math.floor(offset / WINDOW_BYTES)];
  if (w === undefined) throw new VbdError(`internal: offset ${offset} is outside the ${image.size}-byte image`);
  return w;
}

function lockLimit(): number {
  const line = readFileSync('/proc/self/limits', 'utf8').split('\n').find((l) => l.startsWith('Max locked memory'));
  const soft = line?.slice('Max locked memory'.length).trim().split(/\s+/)[0];
  return soft === undefined || soft === 'unlimited' ? Infinity : Number(soft);
}

function hasIpcLockCapability(): boolean {
  const match = /^CapEff:\s+([0-9a-f]+)$/m.exec(readFileSync('/proc/self/status', 'utf8'));
  const CAP_IPC_LOCK = 14n;
  return match !== null && ((BigInt(`0x${match[1]}`) >> CAP_IPC_LOCK) & 1n) === 1n;
}

/** Refuses, before anything is touched, an image that cannot be held in locked RAM. */
export function checkLockable(size: number): void {
  const margin = 256 * 2 ** 20;
  const available = availableMemory();
  if (size + margin > available) {
    throw new VbdError(`the RAM image needs ${formatSize(size)} of locked memory, but only ${formatSize(available)} is available (MemAvailable, keeping ${formatSize(margin)} spare)`);
  }
  const limit = lockLimit();
  if (!hasIpcLockCapability() && limit < size) {
    throw new VbdError(`the RAM image needs ${formatSize(size)} of locked memory, but the memlock limit is ${formatSize(limit)} and CAP_IPC_LOCK is missing (raise LimitMEMLOCK= / ulimit -l)`);
  }
}

/** Whether every byte of the image is zero (a never-used volume: safe to format). */
export function isAllZero(image: ShadowImage): boolean {
  const zero = Buffer.alloc(2 ** 20);
  for (const w of image.windows) {
    for (let at = 0; at < w.length; at += zero.length) {
      const part = w.view.subarray(at, Math.min(w.length, at + zero.length));
      if (part.compare(zero, 0, part.length) !== 0) return false;
    }
  }
  return true;
}
