// Opening a volume directory safely, also as root: the directory is opened once without
// following symlinks, and every file inside is reached through that directory fd
// (/proc/self/fd/N/NAME — openat() for Node), opened with O_NOFOLLOW and checked with fstat:
// regular, owned by the volume owner, one link, the size the manifest says.

import { closeSync, fstatSync, openSync, readdirSync, constants as fsc, type Stats } from 'node:fs';
import { resolve } from 'node:path';
import { VbdError, failure } from '../common/errors.js';
import { readFully } from '../common/fd.js';
import { MANIFEST_NAME, parseManifest, type Manifest } from './manifest.js';
import { ownerOfUid, type Owner } from './owner.js';

export type { Owner } from './owner.js';

/** Entries the tool itself keeps in a volume directory besides the backing files. */
export const JOURNAL_NAME = 'vbd-shadow.journal';
export const ASIDE_DIR = 'vbd-shadow-aside';
const OWN_ENTRIES = new Set([MANIFEST_NAME, JOURNAL_NAME, ASIDE_DIR]);
const MAX_MANIFEST_BYTES = 4 * 2 ** 20;

export interface Volume {
  /** Absolute path of the volume directory, as given (for messages). */
  dir: string;
  manifest: Manifest;
  owner: Owner;
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

/** Opens and checks a volume. The caller must `closeVolume` it. */
export function loadVolume(dir: string, options: LoadOptions = {}): Volume {
  const absolute = resolve(dir);
  let dirFd: number;
  try {
    dirFd = openSync(absolute, fsc.O_RDONLY | fsc.O_DIRECTORY | fsc.O_NOFOLLOW);
  } catch (err) {
    throw failure(`cannot open volume directory ${absolute}`, err);
  }
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
    return { dir: absolute, manifest, owner, dirFd, fds, writable: options.writable === true };
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
