// A volume, opened once into one value: the directory is opened without following a symlink
// anywhere on its path (openat2), and every file inside is reached through that directory fd
// (/proc/self/fd/N/NAME — openat() for Node), opened with O_NOFOLLOW and checked with fstat:
// regular, owned by the volume owner, one link, the size the manifest says. Its identity
// (owner uid, device, inode, birth time of the directory) keys everything root keeps for it.

import { closeSync, fstatSync, openSync, readdirSync, constants as fsc, type Stats } from 'node:fs';
import { resolve } from 'node:path';
import { VbdError, failure } from '../common/errors.js';
import { readFully } from '../common/fd.js';
import { openNoSymlinks } from '../sys/open.js';
import { MANIFEST_NAME, parseManifest, type Manifest } from './manifest.js';
import { ownerOfUid, type Owner } from './owner.js';

export type { Owner } from './owner.js';

/** Entries the tool itself keeps in a volume directory besides the backing files. */
export const JOURNAL_NAME = 'vbd-shadow.journal';
export const ASIDE_DIR = 'vbd-shadow-aside';
const OWN_ENTRIES = new Set([MANIFEST_NAME, JOURNAL_NAME, ASIDE_DIR]);
const MAX_MANIFEST_BYTES = 4 * 2 ** 20;


/** What a volume is, whatever its path: root keys runtime state, logs and leftovers by it. */
export interface VolumeIdentity {
  uid: number;
  dev: bigint;
  ino: bigint;
  /** Birth time of the directory (ns): a new directory that reuses the inode is another volume. */
  bornNs: bigint;
}

/** `UID/DEV.INO`: the identity as a relative path (no user-chosen text in it). */
export function identityKey(id: VolumeIdentity): string {
  return `${id.uid}/${id.dev}.${id.ino}`;
}

export function sameIdentity(a: VolumeIdentity, b: VolumeIdentity): boolean {
  return a.uid === b.uid && a.dev === b.dev && a.ino === b.ino && a.bornNs === b.bornNs;
}

export interface Volume {
  /** Absolute path of the volume directory, as given (for messages only: never re-resolved). */
  dir: string;
  manifest: Manifest;
  owner: Owner;
  identity: VolumeIdentity;
  /** An fd of the directory itself; everything inside is reached through it. */
  dirFd: number;
  /** One fd per backing file, in manifest order. */
  fds: number[];
  writable: boolean;
}

/** Path of an entry reached through the already-open directory (never re-resolves `dir`). */
export function entryPath(volume: Pick<Volume, 'dirFd'>, name: string): string {
  return `/proc/self/fd/${volume.dirFd}/${name}`;
}

function openInDir(dirFd: number, name: string, flags: number, what: string): number {
  try {
    return openSync(`/proc/self/fd/${dirFd}/${name}`, flags | fsc.O_NOFOLLOW | fsc.O_NONBLOCK);
  } catch (err) {
    throw failure(`${what} '${name}'`, err);
  }
}

function checkOwnedRegular(st: Stats, name: string, owner: Owner, what: string): void {
  if (!st.isFile()) throw new VbdError(`${what} '${name}' is not a regular file`);
  if (st.uid !== owner.uid) throw new VbdError(`${what} '${name}' is owned by uid ${st.uid}, not the volume owner (uid ${owner.uid})`);
  if (st.nlink !== 1) throw new VbdError(`${what} '${name}' has ${st.nlink} hard links; backing files must have exactly one`);
}

function readManifest(dirFd: number, owner: Owner): Manifest {
  const fd = openInDir(dirFd, MANIFEST_NAME, fsc.O_RDONLY, 'cannot open manifest');
  try {
    const st = fstatSync(fd);
    checkOwnedRegular(st, MANIFEST_NAME, owner, 'manifest');
    if (st.size > MAX_MANIFEST_BYTES) throw new VbdError(`manifest is ${st.size} bytes, more than the ${MAX_MANIFEST_BYTES} allowed`);
    const text = readFully(fd, st.size, 0);
    if (text === undefined) throw new VbdError('manifest changed size while being read');
    return parseManifest(text.toString('utf8'));
  } finally {
    closeSync(fd);
  }
}

/** Names in the directory that are neither backing files nor the tool's own (dotfiles ignored). */
export function unexpectedEntries(dirPath: string, manifest: Pick<Manifest, 'files'>): string[] {
  const listed = new Set(manifest.files.map((f) => f.path));
  return readdirSync(dirPath).filter((name) => !name.startsWith('.') && !listed.has(name) && !OWN_ENTRIES.has(name));
}

export interface LoadOptions {
  /** Open backing files read-write (import, daemon) instead of read-only. */
  writable?: boolean;
}

/** Opens a directory path with no symlink anywhere on it (one clear line if there is one). */
export function openDirectoryNoSymlinks(path: string, what: string): number {
  try {
    return openNoSymlinks(path, fsc.O_RDONLY | fsc.O_DIRECTORY, what);
  } catch (err) {
    if ((err as { code?: string }).code === 'ELOOP') throw new VbdError(`${what}: a component of the path is a symbolic link (refused: give the real path)`);
    throw failure(what, err);
  }
}

/** The identity of an open volume directory. */
export function identityOf(dirFd: number): VolumeIdentity {
  const st = fstatSync(dirFd, { bigint: true });
  return { uid: Number(st.uid), dev: st.dev, ino: st.ino, bornNs: st.birthtimeNs };
}

/** Opens and checks a volume. The caller must `closeVolume` it. */
export function openVolume(dir: string, options: LoadOptions = {}): Volume {
  const absolute = resolve(dir);
  const dirFd = openDirectoryNoSymlinks(absolute, `cannot open volume directory ${absolute}`);
  const fds: number[] = [];
  try {
    const dirStat = fstatSync(dirFd);
    if ((dirStat.mode & 0o022) !== 0) {
      throw new VbdError(`volume directory ${absolute} is writable by group or others (mode ${(dirStat.mode & 0o777).toString(8)}); chmod go-w it`);
    }
    // The owner is whoever owns the directory; gid, name and home come from /etc/passwd.
    const owner = ownerOfUid(dirStat.uid, `volume directory ${absolute} is owned by uid ${dirStat.uid}, which`);
    const manifest = readManifest(dirFd, owner);
    const extra = unexpectedEntries(`/proc/self/fd/${dirFd}`, manifest);
    if (extra.length > 0) {
      throw new VbdError(`volume directory ${absolute} holds '${extra[0]}', which the manifest does not list (move it out)`);
    }
    const flags = options.writable === true ? fsc.O_RDWR : fsc.O_RDONLY;
    for (const file of manifest.files) {
      const fd = openInDir(dirFd, file.path, flags, 'cannot open backing file');
      fds.push(fd);
      const st = fstatSync(fd);
      checkOwnedRegular(st, file.path, owner, 'backing file');
      if (st.size !== file.size) throw new VbdError(`backing file '${file.path}' is ${st.size} bytes, the manifest says ${file.size}`);
    }
    return { dir: absolute, manifest, owner, identity: identityOf(dirFd), dirFd, fds, writable: options.writable === true };
  } catch (err) {
    for (const fd of fds) closeSync(fd);
    closeSync(dirFd);
    throw err;
  }
}

/** The name of backing file number `file`, for messages. */
export function fileName(volume: Volume, file: number): string {
  return volume.manifest.files[file]?.path ?? `#${file}`;
}

export function closeVolume(volume: Volume): void {
  for (const fd of volume.fds) closeSync(fd);
  volume.fds = [];
  closeSync(volume.dirFd);
}
