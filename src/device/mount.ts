// The owner's filesystem on the device, handled through file descriptors only. The mount point's
// parent is opened once with no symlink anywhere on the path, the mount point below it and
// checked with fstat; the mount lands on that directory fd; freeze, thaw and syncfs go through
// a held fd of the mount's root; unmount finds the mount by its id and verifies it before
// unmounting (a mount point cannot be renamed while mounted, but its parents can).

import { closeSync, fchmodSync, fchownSync, fstatSync, mkdirSync, openSync, readFileSync, readdirSync, readlinkSync, constants as fsc } from 'node:fs';
import { basename, dirname, resolve } from 'node:path';
import { VbdError, errnoCode, failure } from '../common/errors.js';
import { MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID, fdPath, mountIdOf, mountOnFd, unmountEntry } from '../sys/mount.js';
import { O_PATH, openNoSymlinks } from '../sys/open.js';
import type { Owner } from '../volume/volume.js';
import type { LoopDevice } from './loop.js';
import { messageOf, type Report } from '../daemon/events.js';

/** A directory the owner asked us to mount on, reached through its held parent. */
export interface MountPoint {
  /** The path as given (messages only). */
  path: string;
  parentFd: number;
  name: string;
}

/** Our mount: its id, and an fd of its root for freeze/thaw/syncfs (closed to unmount). */
export interface Mounted {
  /** Where it was mounted (messages; the owner may have renamed things since). */
  path: string;
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
    const code = (err as { code?: string }).code;
    if (code === 'ELOOP') throw new VbdError(`--mount ${absolute}: a component of the path is a symbolic link (refused: give the real path)`);
    if (code === 'ENOENT' || code === 'ENOTDIR') throw new VbdError(`--mount ${absolute}: its parent directory does not exist`);
    throw failure(`--mount ${absolute}: cannot open its parent directory`, (err as { cause?: unknown }).cause ?? err);
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
    fchmodSync(created, 0o755);
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
 * Mounts the device on the owner's directory (nosuid,nodev: the contents are hers), trying
 * `type` or else each block filesystem the kernel knows. The mount is made detached and moved
 * onto the directory fd, so we hold its root from the start: whatever the owner renames
 * meanwhile, the mount is on the directory we checked and its root is ours.
 */
export function mountDevice(loop: LoopDevice, point: MountPoint, owner: Owner, type: string | undefined): Mounted {
  const target = openMountTarget(point, owner);
  const tried: string[] = [];
  let mntFd: number | undefined;
  try {
    for (const fsType of type !== undefined ? [type] : blockFilesystems()) {
      try {
        mntFd = mountOnFd(loop.path, fsType, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, target, `of ${loop.path} on ${point.path}`);
        break;
      } catch (err) {
        if (type !== undefined || (err as { code?: string }).code !== 'EINVAL') throw err;
        tried.push(fsType);
      }
    }
  } finally {
    closeSync(target);
  }
  if (mntFd === undefined) throw new VbdError(`--mount ${point.path}: ${loop.path} holds no filesystem the kernel can mount (tried ${tried.join(', ')}); use --mkfs on a new volume`);
  try {
    const mountId = mountIdOf(mntFd);
    const rootFd = openSync(fdPath(mntFd), fsc.O_RDONLY | fsc.O_DIRECTORY);
    if (fstatSync(rootFd).dev !== fstatSync(loop.fd).rdev) {
      closeSync(rootFd);
      throw new VbdError(`internal: the mount on ${point.path} is not ${loop.path}'s filesystem`);
    }
    return { path: point.path, mountId, rootFd };
  } finally {
    closeSync(mntFd);
  }
}

/** Mount ids in this namespace with their mount points (from /proc/self/mountinfo). */
function mountTable(): Map<number, { point: string; majorMinor: string }> {
  const table = new Map<number, { point: string; majorMinor: string }>();
  const unescape = (p: string): string => p.replace(/\\([0-7]{3})/g, (_m, oct: string) => String.fromCharCode(parseInt(oct, 8)));
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const f = line.split(' ');
    if (f.length > 4) table.set(Number(f[0]), { majorMinor: f[2] ?? '', point: unescape(f[4] ?? '') });
  }
  return table;
}

/**
 * Where our mount is now, as a held parent fd and a name, verified: the path the kernel reports
 * is walked without symlinks and the entry found must be the root of mount `mountId` (the owner
 * may rename its parents at any time; then this fails and the caller retries later).
 * Undefined if the mount is gone.
 */
function locateMount(m: Mounted): { parentFd: number; name: string; point: string } | undefined {
  const found = mountTable().get(m.mountId);
  if (found === undefined) return undefined;
  const name = basename(found.point);
  const parentFd = openNoSymlinks(dirname(found.point), O_PATH | fsc.O_DIRECTORY, `the parent of ${found.point}`);
  try {
    const check = openBeneath(parentFd, name, O_PATH | fsc.O_DIRECTORY, `mount point ${found.point}`);
    const ours = mountIdOf(check) === m.mountId && mountIdOf(parentFd) !== m.mountId;
    closeSync(check);
    if (!ours) throw new VbdError(`${found.point} is not the root of our mount (moved meanwhile, or something is mounted over it)`);
    return { parentFd, name, point: found.point };
  } catch (err) {
    closeSync(parentFd);
    throw err;
  }
}

/** The mount's root fd, reopened (and verified) if it was closed for an unmount attempt. */
export function mountRoot(m: Mounted): number {
  if (m.rootFd !== undefined) return m.rootFd;
  const where = locateMount(m);
  if (where === undefined) throw new VbdError(`our mount of ${m.path} is gone`);
  try {
    const fd = openBeneath(where.parentFd, where.name, fsc.O_RDONLY | fsc.O_DIRECTORY, `the mount on ${where.point}`);
    if (mountIdOf(fd) !== m.mountId) {
      closeSync(fd);
      throw new VbdError(`the mount on ${where.point} is no longer ours`);
    }
    m.rootFd = fd;
    return fd;
  } finally {
    closeSync(where.parentFd);
  }
}

/** Gives a new filesystem's root to the owner (ext* does it in mkfs; others need this). */
export function chownMountRoot(m: Mounted, owner: Owner): void {
  fchownSync(mountRoot(m), owner.uid, owner.gid);
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
 * A real (never lazy) unmount of our mount, found by its id. Resolves false if it cannot be
 * done now — busy (who holds it is logged, and handed to `onBusy`), or its path is being moved
 * around — to be retried.
 */
export function unmountDevice(m: Mounted, report: Report, onBusy?: (point: string, holders: string[]) => void): boolean {
  if (m.rootFd !== undefined) {
    closeSync(m.rootFd);
    m.rootFd = undefined;
  }
  let where: ReturnType<typeof locateMount>;
  try {
    where = locateMount(m);
  } catch (err) {
    report({ kind: 'unmount-retry', path: m.path, error: messageOf(err) });
    return false;
  }
  if (where === undefined) return true; // someone (root) unmounted it already
  try {
    if (unmountEntry(where.parentFd, where.name, `of ${where.point}`) === 'unmounted') return true;
  } finally {
    closeSync(where.parentFd);
  }
  const holders = holdersOf(where.point);
  report({ kind: 'unmount-busy', path: where.point, holders });
  onBusy?.(where.point, holders);
  return false;
}

/** The filesystems mounted from loop device `index` (a killed daemon's, at recovery). */
export function mountsOfLoop(index: number): Mounted[] {
  return [...mountTable()].filter(([, m]) => m.majorMinor === `7:${index}`).map(([mountId, m]) => ({ path: m.point, mountId, rootFd: undefined }));
}
