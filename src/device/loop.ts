// The session's own loop device over the RAM image: created for the session (LOOP_CTL_ADD),
// bound and checked through the daemon's fd, which it holds for the whole session, and removed
// at teardown. A loop number is never looked up by name and never handed to anyone else while
// an owner may still hold it open: any fd of a loop node can issue LOOP_CLR_FD and reads
// whatever is bound to that number later. A number the kernel will not remove (still open) is
// quarantined: recorded per owner, retried at the next start, and bounded.

import { chmodSync, closeSync, fchmodSync, fchownSync, fstatSync, fsyncSync, lstatSync, mkdirSync, openSync, readFileSync, readSync, readdirSync, readlinkSync, renameSync, rmSync, symlinkSync, writeFileSync, constants as fsc } from 'node:fs';
import { join } from 'node:path';
import { VbdError, errnoCode, failure } from '../common/errors.js';
import { sleep } from '../common/fd.js';
import { addLoopDevice, clearLoop, configureLoop, loopBacking, loopStatus, removeLoopDevice } from '../sys/loop.js';
import type { Owner } from '../volume/volume.js';
import type { Report } from '../daemon/events.js';

export const NAME_DIR = '/dev/vbd-shadow';
const LOOP_MAJOR = 7;

export interface LoopDevice {
  index: number;
  /** /dev/loopN: for messages, mount(2)'s source and the owner's link. */
  path: string;
  /** The daemon's fd of the device, held for the session. */
  fd: number;
  /**
   * /sys/block/loopN/stat, opened once the number is ours and re-read in place (pread): the
   * write counter is read at every flush check and by the tracker's cuts.
   */
  statFd: number;
}

/** The file bound to a loop device, as the kernel identifies it. */
export interface Backing {
  dev: bigint;
  ino: bigint;
}

function majorMinor(rdev: bigint): [number, number] {
  const major = Number(((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & ~0xfffn));
  const minor = Number((rdev & 0xffn) | ((rdev >> 12n) & ~0xffn));
  return [major, minor];
}

/** Opens /dev/loopN (devtmpfs makes the node as the device appears) and checks it is loop N. */
async function openLoopNode(index: number): Promise<number> {
  const path = `/dev/loop${index}`;
  for (let waited = 0; ; waited += 10) {
    try {
      const fd = openSync(path, fsc.O_RDWR | fsc.O_NOFOLLOW);
      const st = fstatSync(fd, { bigint: true });
      const [major, minor] = majorMinor(st.rdev);
      if (!st.isBlockDevice() || major !== LOOP_MAJOR || minor !== index) {
        closeSync(fd);
        throw new VbdError(`${path} is not loop device ${LOOP_MAJOR}:${index}`);
      }
      return fd;
    } catch (err) {
      if (errnoCode(err) !== 'ENOENT' || waited >= 2000) throw failure(`cannot open ${path}`, err);
    }
    await sleep(10);
  }
}

/** A new loop device bound to the image (`imageFd`, identified by `backing`). */
/**
 * VBD_SHADOW_LOOP_DIRECT_IO=1 binds the image with loop direct I/O (tmpfs takes O_DIRECT from
 * Linux 6.6). Off by default: the fio side-by-side (docs/BENCHMARKS.md, references) found it
 * 3–11 % faster on four workloads and 4 % slower on random 4 KiB writes at QD32, within what runs
 * swing here, so it does not earn a second I/O path.
 */
export const LOOP_DIRECT_IO_ENV = 'VBD_SHADOW_LOOP_DIRECT_IO';

export async function attachLoop(imageFd: number, imagePath: string, backing: Backing): Promise<LoopDevice> {
  const directIo = process.env[LOOP_DIRECT_IO_ENV] === '1';
  for (let attempt = 0; attempt < 8; attempt++) {
    const index = addLoopDevice();
    const path = `/dev/loop${index}`;
    const fd = await openLoopNode(index);
    let statFd: number;
    try {
      statFd = openStat({ index });
    } catch (err) {
      closeSync(fd);
      await removeLoopDevice(index);
      throw err;
    }
    try {
      configureLoop(fd, imageFd, imagePath, `LOOP_CONFIGURE of ${path}`, directIo);
    } catch (err) {
      closeSync(fd);
      closeSync(statFd);
      // Another tool (losetup --find) took the new device first: it is theirs now.
      if ((err as { code?: string }).code === 'EBUSY') continue;
      await removeLoopDevice(index);
      throw err;
    }
    const bound = loopBacking(fd, path);
    if (bound === undefined || bound.ino !== backing.ino || bound.dev !== backing.dev) {
      closeSync(fd);
      closeSync(statFd);
      throw new VbdError(`${path} is not bound to the RAM image after LOOP_CONFIGURE`);
    }
    return { index, path, fd, statFd };
  }
  throw new VbdError('could not get a loop device of our own after 8 tries (others keep taking them)');
}

function sysDir(loop: Pick<LoopDevice, 'index'>): string {
  return `/sys/block/loop${loop.index}`;
}

/**
 * Turns discard off. On a tmpfs image a discard punches holes: the freed pages leave the
 * mlocked mapping and later writes land in fresh, unlocked pages. With max 0 bytes the
 * kernel reports discard as unsupported (mkfs skips it, fstrim refuses).
 */
export function disableDiscard(loop: LoopDevice): void {
  const path = `${sysDir(loop)}/queue/discard_max_bytes`;
  try {
    writeFileSync(path, '0');
  } catch (err) {
    throw failure(`cannot turn off discard on ${loop.path} (${path})`, err);
  }
  if (readFileSync(path, 'utf8').trim() !== '0') throw new VbdError(`discard is still on for ${loop.path}; refusing to risk unlocked RAM`);
}

/** The device's own I/O counters (/sys/block/loopN/stat): only deltas count. */
export interface DeviceCounters {
  /** Sectors written (field 7): writes, write-zeroes and flushes with data; not discards. */
  written: number;
  /** Sectors discarded (field 14; 0 where the kernel has no such field). */
  discarded: number;
}

function openStat(loop: Pick<LoopDevice, 'index'>): number {
  try {
    return openSync(`${sysDir(loop)}/stat`, fsc.O_RDONLY);
  } catch (err) {
    throw failure(`cannot open ${sysDir(loop)}/stat`, err);
  }
}

const statText = Buffer.alloc(512);

export function deviceCounters(loop: Pick<LoopDevice, 'index' | 'statFd'>): DeviceCounters {
  // sysfs regenerates the text at every read from offset 0.
  const fields = statText.toString('latin1', 0, readSync(loop.statFd, statText, 0, statText.length, 0)).trim().split(/\s+/);
  const written = fields[6];
  if (written === undefined) throw new VbdError(`${sysDir(loop)}/stat has no write counter`);
  return { written: Number(written), discarded: Number(fields[13] ?? 0) };
}

/** Sectors written to the device so far (field 7 of /sys/block/loopN/stat; only deltas count). */
export function sectorsWritten(loop: LoopDevice): number {
  return deviceCounters(loop).written;
}

/**
 * Whether the block layer counts the device's I/O (queue/iostats): with it off (root can switch
 * it) the counters above stand still whatever is written.
 */
export function countsIo(loop: Pick<LoopDevice, 'index'>): boolean {
  return readFileSync(`${sysDir(loop)}/queue/iostats`, 'utf8').trim() === '1';
}

/** The device number as the kernel's tracepoints print it (major << 20 | minor). */
export function traceDeviceNumber(loop: Pick<LoopDevice, 'index'>): number {
  return LOOP_MAJOR * 2 ** 20 + loop.index;
}

/**
 * What the device is bound to and how (backing inode, offset, size limit, flags, size in
 * sectors), as one comparable string: a change means the sectors no longer map to the image
 * the way they did.
 */
export function loopSignature(loop: LoopDevice): string {
  const s = loopStatus(loop.fd, loop.path);
  if (s === undefined) return 'unbound';
  const size = readFileSync(`${sysDir(loop)}/size`, 'utf8').trim();
  return `backing ${s.dev}:${s.ino} offset ${s.offset} sizelimit ${s.sizeLimit} flags ${s.flags} size ${size}`;
}

/** Pushes buffered writes to the raw device into the image (cheap when clean). */
export function syncDevice(loop: LoopDevice): void {
  fsyncSync(loop.fd);
}

/** Hands the node to the owner (0600), through our fd. */
export function giveDevice(loop: LoopDevice, owner: Owner): void {
  fchmodSync(loop.fd, 0o600); // while still root's: no CAP_FOWNER needed
  fchownSync(loop.fd, owner.uid, owner.gid);
}

/** Takes the node back (root 0600): nobody else can open it any more. */
export function takeBackDevice(loop: LoopDevice): void {
  fchownSync(loop.fd, 0, 0);
  fchmodSync(loop.fd, 0o600);
}

/** "pid 123 (bash)" for every process holding /dev/loopN open. */
export function holdersOfDevice(path: string): string[] {
  const holders: string[] = [];
  for (const pid of readdirSync('/proc').filter((p) => /^\d+$/.test(p) && Number(p) !== process.pid)) {
    try {
      if (readdirSync(`/proc/${pid}/fd`).some((fd) => { try { return readlinkSync(`/proc/${pid}/fd/${fd}`) === path; } catch { return false; } })) {
        holders.push(`pid ${pid} (${readFileSync(`/proc/${pid}/comm`, 'utf8').trim()})`);
      }
    } catch {
      /* the process went away */
    }
  }
  return holders;
}

function stillBound(loop: Pick<LoopDevice, 'index'>): boolean {
  try {
    return readFileSync(`${sysDir(loop)}/loop/backing_file`, 'utf8').trim().length > 0;
  } catch {
    return false;
  }
}

/**
 * Detaches the session's device. The node is taken back first (no new opens); a device no
 * longer bound to our image (the owner cleared it; maybe someone else bound it since) is not
 * cleared by us. The kernel defers the unbinding until the last opener closes: we wait for that
 * (saying who holds it). When this returns no write can reach the image through the device any
 * more; the number is still ours until removeLoop.
 */
export async function unbindLoop(loop: LoopDevice, backing: Backing, report: Report): Promise<void> {
  takeBackDevice(loop);
  syncDevice(loop);
  const bound = loopBacking(loop.fd, loop.path);
  if (bound === undefined) report({ kind: 'loop-unbound-by-other', device: loop.path });
  else if (bound.ino !== backing.ino || bound.dev !== backing.dev) report({ kind: 'loop-rebound', device: loop.path });
  else clearLoop(loop.fd, `LOOP_CLR_FD of ${loop.path}`);
  closeSync(loop.fd);
  for (let waited = 0; bound !== undefined && bound.ino === backing.ino && stillBound(loop); waited++) {
    if (waited % 50 === 0) report({ kind: 'loop-busy-waiting', device: loop.path, holders: holdersOfDevice(loop.path) });
    await sleep(100);
  }
}

/** Removes the unbound device (unbindLoop); 'quarantined' if someone still holds it open. */
export async function removeLoop(loop: LoopDevice, report: Report): Promise<'removed' | 'quarantined'> {
  closeSync(loop.statFd);
  if ((await removeLoopDevice(loop.index)) === 'busy') {
    report({ kind: 'loop-quarantined', device: loop.path, holders: holdersOfDevice(loop.path) });
    return 'quarantined';
  }
  return 'removed';
}

/** Loop devices bound to the image file at `imagePath` (a killed daemon's), with an fd each. */
export async function loopsBoundTo(backing: Backing): Promise<LoopDevice[]> {
  const found: LoopDevice[] = [];
  for (const entry of readdirSync('/sys/block').filter((n) => /^loop\d+$/.test(n))) {
    const index = Number(entry.slice(4));
    if (!stillBound({ index })) continue;
    const fd = await openLoopNode(index);
    const bound = loopBacking(fd, `/dev/loop${index}`);
    if (bound === undefined || bound.ino !== backing.ino || bound.dev !== backing.dev) {
      closeSync(fd);
      continue;
    }
    try {
      found.push({ index, path: `/dev/loop${index}`, fd, statFd: openStat({ index }) });
    } catch (err) {
      closeSync(fd);
      throw err;
    }
  }
  return found;
}

// --- quarantine: loop numbers that could not be removed, per owner ---------------------------

export const MAX_QUARANTINED = 4;

function quarantineFile(uid: number): string {
  return `/run/vbd-shadow/${uid}/quarantined-loops`;
}

function readQuarantine(uid: number): number[] {
  try {
    return readFileSync(quarantineFile(uid), 'utf8').split('\n').filter((l) => /^\d+$/.test(l)).map(Number);
  } catch {
    return [];
  }
}

function writeQuarantine(uid: number, list: number[]): void {
  const file = quarantineFile(uid);
  writeFileSync(`${file}.new`, list.map((n) => `${n}\n`).join(''), { mode: 0o644 });
  renameSync(`${file}.new`, file);
}

/** Records a loop number that is still held open; returns the owner's whole list. */
export function quarantine(uid: number, index: number): number[] {
  const list = [...new Set([...readQuarantine(uid), index])];
  writeQuarantine(uid, list);
  return list;
}

/** Retries removing the owner's quarantined devices; returns those still held. */
export async function retryQuarantine(uid: number): Promise<number[]> {
  const before = readQuarantine(uid);
  const left: number[] = [];
  for (const index of before) if ((await removeLoopDevice(index)) === 'busy') left.push(index);
  if (left.length !== before.length) writeQuarantine(uid, left);
  return left;
}

// --- the owner's stable name: /dev/vbd-shadow/USER/NAME -> /dev/loopN ------------------------

/** The owner's directory of names: per owner, so nobody can squat or redirect another's name. */
function ownerNameDir(owner: Owner): string {
  return join(NAME_DIR, /^[a-z_][a-z0-9_.-]{0,31}$/i.test(owner.name) ? owner.name : `uid${owner.uid}`);
}

function makeRootDir(path: string): void {
  try {
    mkdirSync(path, { mode: 0o755 });
    chmodSync(path, 0o755); // whatever the umask: owners resolve their names through it
  } catch (err) {
    if (errnoCode(err) !== 'EEXIST') throw failure(`cannot create ${path}`, err);
  }
  const st = lstatSync(path);
  if (!st.isDirectory() || st.uid !== 0 || (st.mode & 0o022) !== 0) throw new VbdError(`${path} is not root's directory; refusing to use it`);
}

/** Publishes /dev/vbd-shadow/USER/NAME -> /dev/loopN; refuses a name the owner already uses live. */
export function publishName(owner: Owner, name: string, loop: LoopDevice): string {
  makeRootDir(NAME_DIR);
  const dir = ownerNameDir(owner);
  makeRootDir(dir);
  const link = join(dir, name);
  try {
    const current = readlinkSync(link);
    const index = /^\/dev\/loop(\d+)$/.exec(current)?.[1];
    if (index !== undefined && stillBound({ index: Number(index) }) && current !== loop.path) {
      throw new VbdError(`${link} already names ${current}, another of your live volumes; give this one another name`);
    }
  } catch (err) {
    if (errnoCode(err) !== 'ENOENT' && errnoCode(err) !== 'EINVAL') throw err;
  }
  const temp = join(dir, `.${name}.${process.pid}.new`);
  rmSync(temp, { force: true });
  symlinkSync(loop.path, temp);
  renameSync(temp, link);
  return link;
}

/** Removes the name if it still points at `loop`. */
export function unpublishName(owner: Owner, name: string, loop: Pick<LoopDevice, 'path'>): void {
  const link = join(ownerNameDir(owner), name);
  try {
    if (readlinkSync(link) === loop.path) rmSync(link);
  } catch (err) {
    if (errnoCode(err) !== 'ENOENT') throw failure(`cannot remove ${link}`, err);
  }
}
