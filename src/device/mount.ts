// The owner's filesystem on the device, handled through file descriptors only. The mount point
// (and its parent) are opened once with no symlink anywhere on the path and checked with
// fstat; the mount lands on the held directory; freeze, thaw and syncfs go through a held fd of
// the mount's root; unmount names the mount point through the held parent (a mount point cannot
// be renamed or removed while mounted) and only after checking it is still our mount.

import { closeSync, fchownSync, fstatSync, mkdirSync, readFileSync, readdirSync, readlinkSync, constants as fsc } from 'node:fs';
import { basename, dirname, resolve } from 'node:path';
import { VbdError, errnoCode, failure } from '../common/errors.js';
import { MS_NODEV, MS_NOSUID, mountIdOf, mountOnFd, unmountEntry } from '../sys/mount.js';
import { O_PATH, openNoSymlinks } from '../sys/open.js';
import type { Owner } from '../volume/volume.js';
import type { LoopDevice } from './loop.js';

const MS_SILENT = 0x8000;

/** A directory the owner asked us to mount on, reached through its held parent. */
export interface MountPoint {
  /** The path as given (messages only). */
  path: string;
  parentFd: number;
  name: string;
}

/** Our mount: its id, and an fd of its root for freeze/thaw/syncfs (closed to unmount). */
export interface Mounted {
  point: MountPoint;
  mountId: number;
  rootFd: number | undefined;
}

function openBeneath(parentFd: number, name: string, flags: number, what: string): number {
  try {
    return openNoSymlinks(name, flags, what, { dirFd: parentFd, beneath: true });
  } catch (err) {
    if ((err as { code?: string }).code === 'ELOOP') throw new VbdError(`${what}: is a symbolic link (refused)`);
    throw err;
  }
}

/**
 * Opens the mount point's parent for `owner` (no symlink on the path) and checks the mount
 * point itself (see openMountTarget). The parent stays held: the mount point is always
 * reached through it.
 */
export function openMountPoint(path: string, owner: Owner): MountPoint {
  const absolute = resolve(path);
  const name = basename(absolute);
  if (absolute === '/' || name === '..' || name === '.') throw new VbdError(`--mount ${absolute}: not a usable mount point`);
  let parentFd: number;
  try {
    parentFd = openNoSymlinks(dirname(absolute), O_PATH | fsc.O_DIRECTORY, `--mount ${absolute}`);
  } catch (err) {
    if ((err as { code?: string }).code === 'ELOOP') throw new VbdError(`--mount ${absolute}: a component of the path is a symbolic link (refused: give the real path)`);
    throw failure(`--mount ${absolute}: cannot open its parent directory`, err);
  }
  const point: MountPoint = { path: absolute, parentFd, name };
  try {
    closeSync(openMountTarget(point, owner));
  } catch (err) {
    closeSync(parentFd);
    throw err;
  }
  return point;
}

/**
 * Opens (O_PATH) the mount point below the held parent: it must be a directory the owner owns —
 * created for her, inside a directory she or root owns, if missing. Root never mounts her
 * filesystem over a directory she does not own.
 */
export function openMountTarget(point: MountPoint, owner: Owner): number {
  const { parentFd, name, path } = point;
  let dirFd: number;
  try {
    dirFd = openBeneath(parentFd, name, O_PATH | fsc.O_DIRECTORY, `--mount ${path}`);
  } catch (err) {
    if (errnoCode(err) !== 'ENOENT') throw failure(`--mount ${path}`, err);
    const parent = fstatSync(parentFd);
    if (parent.uid !== owner.uid && parent.uid !== 0) {
      throw new VbdError(`--mount ${path} does not exist and its parent belongs to uid ${parent.uid}, not the volume owner; create it as the owner`);
    }
    try {
      mkdirSync(`/proc/self/fd/${parentFd}/${name}`, { mode: 0o755 });
    } catch (err2) {
      throw failure(`--mount ${path}: cannot create it`, err2);
    }
    const created = openBeneath(parentFd, name, fsc.O_RDONLY | fsc.O_DIRECTORY, `--mount ${path}`);
    fchownSync(created, owner.uid, owner.gid);
    closeSync(created);
    dirFd = openBeneath(parentFd, name, O_PATH | fsc.O_DIRECTORY, `--mount ${path}`);
  }
  const st = fstatSync(dirFd);
  if (st.uid !== owner.uid) {
    closeSync(dirFd);
    throw new VbdError(`--mount ${path} is owned by uid ${st.uid}, not the volume owner (uid ${owner.uid}); root mounts the owner's filesystem only on a directory she owns`);
  }
  return dirFd;
}

export function closeMountPoint(point: MountPoint): void {
  closeSync(point.parentFd);
}

/** Block filesystems the kernel knows, ext4 first (what mount(8) tries when blkid is not asked). */
function blockFilesystems(): string[] {
  const types = readFileSync('/proc/filesystems', 'utf8').split('\n')
    .filter((l) => l.length > 0 && !l.startsWith('nodev')).map((l) => l.trim());
  return [...types.filter((t) => t === 'ext4'), ...types.filter((t) => t !== 'ext4')];
}

/**
 * Mounts the device on the held directory (nosuid,nodev: the contents are the owner's), trying
 * `type` or else each block filesystem the kernel knows, then opens the mount's root and
 * checks that it is the device's filesystem.
 */
export function mountDevice(loop: LoopDevice, point: MountPoint, owner: Owner, type: string | undefined): Mounted {
  const target = openMountTarget(point, owner);
  try {
    return mountOn(loop, point, target, type);
  } finally {
    closeSync(target);
  }
}

function mountOn(loop: LoopDevice, point: MountPoint, target: number, type: string | undefined): Mounted {
  const tried: string[] = [];
  let mounted = false;
  for (const fsType of type !== undefined ? [type] : blockFilesystems()) {
    try {
      mountOnFd(loop.path, target, fsType, MS_NOSUID | MS_NODEV | MS_SILENT, null, `of ${loop.path} on ${point.path} as ${fsType}`);
      mounted = true;
      break;
    } catch (err) {
      const code = (err as { code?: string }).code;
      if (type !== undefined || (code !== 'EINVAL' && code !== 'ENODEV' && code !== 'ENOTBLK')) throw err;
      tried.push(fsType);
    }
  }
  if (!mounted) throw new VbdError(`--mount ${point.path}: ${loop.path} holds no filesystem the kernel can mount (tried ${tried.join(', ')}); use --mkfs on a new volume`);
  const rootFd = openBeneath(point.parentFd, point.name, fsc.O_RDONLY | fsc.O_DIRECTORY, `the new mount on ${point.path}`);
  const mountId = mountIdOf(rootFd);
  const deviceRdev = fstatSync(loop.fd).rdev;
  if (mountId === mountIdOf(target) || fstatSync(rootFd).dev !== deviceRdev) {
    closeSync(rootFd);
    throw new VbdError(`internal: the mount on ${point.path} is not ${loop.path}'s filesystem`);
  }
  return { point, mountId, rootFd };
}

/** The mount's root fd, reopened if it was closed for an unmount attempt (and still ours). */
export function mountRoot(m: Mounted): number {
  if (m.rootFd !== undefined) return m.rootFd;
  const fd = openBeneath(m.point.parentFd, m.point.name, fsc.O_RDONLY | fsc.O_DIRECTORY, `the mount on ${m.point.path}`);
  if (mountIdOf(fd) !== m.mountId) {
    closeSync(fd);
    throw new VbdError(`the mount on ${m.point.path} is no longer ours`);
  }
  m.rootFd = fd;
  return fd;
}

/** Gives a new filesystem's root to the owner (ext* does it in mkfs; others need this). */
export function chownMountRoot(m: Mounted, owner: Owner): void {
  fchownSync(mountRoot(m), owner.uid, owner.gid);
}

/** Mount ids in this namespace with their mount points (from /proc/self/mountinfo). */
function mountTable(): Map<number, { point: string; majorMinor: string }> {
  const table = new Map<number, { point: string; majorMinor: string }>();
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const f = line.split(' ');
    if (f.length > 4) table.set(Number(f[0]), { majorMinor: f[2] ?? '', point: (f[4] ?? '').replace(/\\040/g, ' ') });
  }
  return table;
}

/** "pid 123 (bash)" for every process whose cwd, root or open files are under `mountpoint`. */
export function holdersOf(mountpoint: string): string[] {
  const under = (p: string): boolean => p === mountpoint || p.startsWith(`${mountpoint}/`);
  const holders: string[] = [];
  for (const pid of readdirSync('/proc').filter((p) => /^\d+$/.test(p) && Number(p) !== process.pid)) {
    try {
      const links = ['cwd', 'root'].map((l) => `/proc/${pid}/${l}`);
      for (const fd of readdirSync(`/proc/${pid}/fd`)) links.push(`/proc/${pid}/fd/${fd}`);
      if (links.some((l) => { try { return under(readlinkSync(l)); } catch { return false; } })) {
        holders.push(`pid ${pid} (${readFileSync(`/proc/${pid}/comm`, 'utf8').trim()})`);
      }
    } catch {
      /* the process went away */
    }
  }
  return holders;
}

/**
 * A real (never lazy) unmount of our mount. Resolves false if busy, after logging who holds it.
 * The entry is unmounted only while it is still our mount (checked by mount id).
 */
export function unmountDevice(m: Mounted, log: (line: string) => void): boolean {
  if (m.rootFd !== undefined) {
    closeSync(m.rootFd);
    m.rootFd = undefined;
  }
  const table = mountTable();
  if (!table.has(m.mountId)) return true; // someone (root) unmounted it already
  const check = openBeneath(m.point.parentFd, m.point.name, O_PATH | fsc.O_DIRECTORY, `the mount on ${m.point.path}`);
  const topId = mountIdOf(check);
  closeSync(check);
  if (topId !== m.mountId) throw new VbdError(`something else is mounted over our mount on ${m.point.path}; not unmounting it`);
  if (unmountEntry(m.point.parentFd, m.point.name, `of ${m.point.path}`) === 'unmounted') return true;
  const where = table.get(m.mountId)?.point ?? m.point.path;
  const holders = holdersOf(where);
  log(`unmount of ${where} failed: busy; held by ${holders.length > 0 ? holders.join(', ') : 'an unknown user'}; retrying`);
  return false;
}

/** Mount ids of the filesystems mounted from loop device `index` (a killed daemon's, at recovery). */
export function mountsOfLoop(index: number): { mountId: number; point: string }[] {
  return [...mountTable()].filter(([, m]) => m.majorMinor === `7:${index}`).map(([mountId, m]) => ({ mountId, point: m.point }));
}

/**
 * Opens a mount found in mountinfo (at recovery) safely: the path is walked without symlinks and
 * the directory found must be the root of that very mount, else it is refused.
 */
export function openFoundMount(found: { mountId: number; point: string }): Mounted {
  const parentFd = openNoSymlinks(dirname(found.point), O_PATH | fsc.O_DIRECTORY, `mount point ${found.point}`);
  const name = basename(found.point);
  try {
    // (An fd inside the mount would keep it busy: checked, then closed.)
    const check = openBeneath(parentFd, name, O_PATH | fsc.O_DIRECTORY, `mount point ${found.point}`);
    const ours = mountIdOf(check) === found.mountId && mountIdOf(parentFd) !== found.mountId;
    closeSync(check);
    if (!ours) throw new VbdError(`${found.point} is no longer the mount point of mount ${found.mountId}; refusing to touch it`);
    const point = { path: found.point, parentFd, name };
    return { point, mountId: found.mountId, rootFd: undefined };
  } catch (err) {
    closeSync(parentFd);
    throw err;
  }
}
