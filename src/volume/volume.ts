// A volume, opened once into one value: the directory is opened without following a symlink
// anywhere on its path (openat2), and every file inside is reached through that directory fd
// (/proc/self/fd/N/NAME — openat() for Node), opened with O_NOFOLLOW and checked with fstat:
// regular, owned by the volume owner, one link, the size the manifest says. Its identity
// (owner uid, device, inode, birth time of the directory) keys everything root keeps for it.

import { closeSync, fchownSync, fstatSync, fsyncSync, openSync, readdirSync, renameSync, unlinkSync, writeSync, constants as fsc, type Stats } from 'node:fs';
import { resolve } from 'node:path';
import { errnoCode, failure, RefusedError, VbdError } from '../common/errors.js';
import { readFully } from '../common/fd.js';
import { openNoSymlinks } from '../sys/open.js';
import { MANIFEST_NAME, parseAnyManifest, serializeManifest, type AnyManifest, type Manifest, type SealedManifest } from './manifest.js';
import { ownerOfUid, type Owner } from './owner.js';
import type { VolumeIdentity } from './identity.js';

export { identityKey, sameIdentity, type VolumeIdentity } from './identity.js';

export type { Owner } from './owner.js';

/** Entries the tool itself keeps in a volume directory besides the backing files. */
export const JOURNAL_NAME = 'vbd-shadow.journal';
export const ASIDE_DIR = 'vbd-shadow-aside';
/** A sealed volume's position map (docs/FORMAT.md, "Position map"). */
export const MAP_NAME = 'vbd-shadow.map';
/** A sealed volume's overflow journal: only while a commit larger than the free slots completes. */
export const SEALED_JOURNAL_NAME = 'vbd-shadow.sealed-journal';
const OWN_ENTRIES = new Set([MANIFEST_NAME, JOURNAL_NAME, ASIDE_DIR, MAP_NAME, SEALED_JOURNAL_NAME]);
const MAX_MANIFEST_BYTES = 4 * 2 ** 20;


/**
 * An opened volume. `M` says what kind its manifest is: `Volume` (plain, the default: what the
 * daemon serves), `SealedVolume`, or `AnyVolume` (what openVolume returns; narrow it with
 * isSealedVolume or requirePlainVolume).
 */
export interface Volume<M extends AnyManifest = Manifest> {
  /** Absolute path of the volume directory, as given (for messages only: never re-resolved). */
  dir: string;
  manifest: M;
  owner: Owner;
  identity: VolumeIdentity;
  /** An fd of the directory itself; everything inside is reached through it. */
  dirFd: number;
  /** One fd per backing file, in manifest order. */
  fds: number[];
  writable: boolean;
}

export type AnyVolume = Volume<AnyManifest>;
export type SealedVolume = Volume<SealedManifest>;

export function isSealedVolume(volume: AnyVolume): volume is SealedVolume {
  return volume.manifest.format === 2;
}

export function isPlainVolume(volume: AnyVolume): volume is Volume {
  return volume.manifest.format === 1;
}

/** The volume as a plain one; a sealed volume is refused (the volume is left open). */
export function requirePlainVolume(volume: AnyVolume): Volume {
  if (!isPlainVolume(volume)) throw new VbdError(`volume '${volume.manifest.name}' is sealed: this needs a plain volume`);
  return volume;
}

/** Path of an entry reached through the already-open directory (never re-resolves `dir`). */
export function entryPath(volume: Pick<AnyVolume, 'dirFd'>, name: string): string {
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
  if (!st.isFile()) throw new VbdError(`${what} '${name}' is not a regular file`, { kind: 'refused' });
  if (st.uid !== owner.uid) throw new VbdError(`${what} '${name}' is owned by uid ${st.uid}, not the volume owner (uid ${owner.uid})`, { kind: 'refused' });
  if (st.nlink !== 1) throw new VbdError(`${what} '${name}' has ${st.nlink} hard links; backing files must have exactly one`, { kind: 'refused' });
}

function readManifest(dirFd: number, owner: Owner): AnyManifest {
  const fd = openInDir(dirFd, MANIFEST_NAME, fsc.O_RDONLY, 'cannot open manifest');
  try {
    const st = fstatSync(fd);
    checkOwnedRegular(st, MANIFEST_NAME, owner, 'manifest');
    if (st.size > MAX_MANIFEST_BYTES) throw new VbdError(`manifest is ${st.size} bytes, more than the ${MAX_MANIFEST_BYTES} allowed`);
    const text = readFully(fd, st.size, 0);
    if (text === undefined) throw new VbdError('manifest changed size while being read');
    return parseAnyManifest(text.toString('utf8'));
  } finally {
    closeSync(fd);
  }
}

const TEMP_MANIFEST = `.${MANIFEST_NAME}.tmp`;

/**
 * Puts `manifest` in place in the directory held open as `dirFd`: written to a temporary name,
 * synced, renamed over the old one, directory synced. Readers see the old or the new, whole.
 */
export function writeManifest(dirFd: number, dir: string, manifest: AnyManifest, owner?: Owner): void {
  try {
    unlinkSync(`/proc/self/fd/${dirFd}/${TEMP_MANIFEST}`); // a stale one, or whatever was planted there (unlink never follows)
  } catch (err) {
    if (errnoCode(err) !== 'ENOENT') throw failure(`cannot remove stale ${dir}/${TEMP_MANIFEST}`, err);
  }
  let fd: number;
  try {
    fd = openSync(`/proc/self/fd/${dirFd}/${TEMP_MANIFEST}`, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o644);
  } catch (err) {
    throw failure(`cannot create ${dir}/${TEMP_MANIFEST}`, err);
  }
  try {
    // Root (a re-key by the daemon) writes it as the owner's, as the owner's own tools would.
    if (owner !== undefined && process.geteuid?.() === 0) fchownSync(fd, owner.uid, owner.gid);
    const text = Buffer.from(serializeManifest(manifest));
    let done = 0;
    while (done < text.length) done += writeSync(fd, text, done, text.length - done);
    fsyncSync(fd);
  } catch (err) {
    throw failure(`cannot write ${dir}/${TEMP_MANIFEST}`, err);
  } finally {
    closeSync(fd);
  }
  try {
    renameSync(`/proc/self/fd/${dirFd}/${TEMP_MANIFEST}`, `/proc/self/fd/${dirFd}/${MANIFEST_NAME}`);
    fsyncSync(dirFd);
  } catch (err) {
    throw failure(`cannot put the manifest in place in ${dir}`, err);
  }
}

/** The manifest as the directory holds it now (read through the directory fd, checked like at open). */
export function rereadManifest(volume: Pick<AnyVolume, 'dirFd' | 'owner'>): AnyManifest {
  return readManifest(volume.dirFd, volume.owner);
}

/** Names in the directory that are neither backing files nor the tool's own (dotfiles ignored). */
export function unexpectedEntries(dirPath: string, manifest: Pick<AnyManifest, 'files'>): string[] {
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
    if ((err as { code?: string }).code === 'ELOOP') throw new VbdError(`${what}: a component of the path is a symbolic link (refused: give the real path)`, { kind: 'refused' });
    throw failure(what, err);
  }
}

/** The identity of an open volume directory. */
export function identityOf(dirFd: number): VolumeIdentity {
  const st = fstatSync(dirFd, { bigint: true });
  return { uid: Number(st.uid), dev: st.dev, ino: st.ino, bornNs: st.birthtimeNs };
}

/**
 * Opens and checks a volume, plain or sealed. The caller must `closeVolume` it. A plain manifest
 * in a directory that holds a sealed volume's position map is refused: that is a sealed volume
 * whose manifest was rewritten as plain, and writing plaintext into it would undo the sealing.
 */
export function openVolume(dir: string, options: LoadOptions = {}): AnyVolume {
  const absolute = resolve(dir);
  const dirFd = openDirectoryNoSymlinks(absolute, `cannot open volume directory ${absolute}`);
  const fds: number[] = [];
  try {
    const dirStat = fstatSync(dirFd);
    if ((dirStat.mode & 0o022) !== 0) {
      throw new VbdError(`volume directory ${absolute} is writable by group or others (mode ${(dirStat.mode & 0o777).toString(8)}); chmod go-w it`, { kind: 'refused' });
    }
    // The owner is whoever owns the directory; gid, name and home come from /etc/passwd.
    const owner = ownerOfUid(dirStat.uid, `volume directory ${absolute} is owned by uid ${dirStat.uid}, which`);
    const manifest = readManifest(dirFd, owner);
    const entries = `/proc/self/fd/${dirFd}`;
    const extra = unexpectedEntries(entries, manifest);
    if (extra.length > 0) {
      throw new VbdError(`volume directory ${absolute} holds '${extra[0]}', which the manifest does not list (move it out)`);
    }
    if (manifest.format === 1 && readdirSync(entries).includes(MAP_NAME)) {
      throw new RefusedError(`volume directory ${absolute} holds a sealed volume's position map (${MAP_NAME}) but its manifest is plain (format 1): wrong key or manifest edited (the sealed object removed?); refusing to read or write`);
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

/** What `inspect` found of one backing file, without requiring it to be right. */
export type FileSurvey =
  | { path: string; size: number; state: 'ok' }
  | { path: string; size: number; state: 'missing' }
  | { path: string; size: number; state: 'wrong-size'; actual: number }
  | { path: string; size: number; state: 'refused'; reason: string };

/** A volume looked at, not opened for use: the manifest and what each backing file is. */
export interface VolumeSurvey {
  dir: string;
  manifest: AnyManifest;
  owner: Owner;
  identity: VolumeIdentity;
  /** The directory, held open while `work` runs (entries are reached through it). */
  dirFd: number;
  files: FileSurvey[];
  /** Names in the directory that are neither backing files nor the tool's own. */
  unexpected: string[];
}

function surveyFile(dirFd: number, file: { path: string; size: number }, owner: Owner): FileSurvey {
  let fd: number;
  try {
    fd = openSync(`/proc/self/fd/${dirFd}/${file.path}`, fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK);
  } catch (err) {
    const code = errnoCode(err);
    if (code === 'ENOENT') return { ...file, state: 'missing' };
    return { ...file, state: 'refused', reason: code === 'ELOOP' ? 'a symbolic link' : failure('cannot open it', err).message };
  }
  try {
    const st = fstatSync(fd);
    try {
      checkOwnedRegular(st, file.path, owner, 'backing file');
    } catch (err) {
      return { ...file, state: 'refused', reason: err instanceof Error ? err.message : String(err) };
    }
    return st.size === file.size ? { ...file, state: 'ok' } : { ...file, state: 'wrong-size', actual: st.size };
  } finally {
    closeSync(fd);
  }
}

/**
 * Looks at a volume without opening it for use (inspect): the directory and the manifest are
 * checked as openVolume checks them, but each backing file is only reported (missing, wrong
 * size, refused), never required. `work` runs with the directory held open.
 */
export function surveyVolume<T>(dir: string, work: (survey: VolumeSurvey) => T): T {
  const absolute = resolve(dir);
  const dirFd = openDirectoryNoSymlinks(absolute, `cannot open volume directory ${absolute}`);
  try {
    const { uid } = fstatSync(dirFd);
    const owner = ownerOfUid(uid, `volume directory ${absolute} is owned by uid ${uid}, which`);
    const manifest = readManifest(dirFd, owner);
    const files = manifest.files.map((f) => surveyFile(dirFd, f, owner));
    const unexpected = unexpectedEntries(`/proc/self/fd/${dirFd}`, manifest);
    return work({ dir: absolute, manifest, owner, identity: identityOf(dirFd), dirFd, files, unexpected });
  } finally {
    closeSync(dirFd);
  }
}

/**
 * Opens an entry of the volume directory that the tool keeps (map, journal) through the
 * directory fd, never following a symlink, and checks it like a backing file: regular, owned by
 * the volume owner, one link. `create`: made (mode 0600, owned by the owner) if missing.
 * Returns undefined if it does not exist and `create` is not set.
 */
export function openVolumeEntry(volume: Pick<AnyVolume, 'dirFd' | 'owner'>, name: string, mode: 'read' | 'write' | 'create'): number | undefined {
  const flags = mode === 'read' ? fsc.O_RDONLY : fsc.O_RDWR;
  let fd: number;
  try {
    fd = openSync(entryPath(volume, name), flags | fsc.O_NOFOLLOW | fsc.O_NONBLOCK | (mode === 'create' ? fsc.O_CREAT : 0), 0o600);
  } catch (err) {
    if (mode !== 'create' && errnoCode(err) === 'ENOENT') return undefined;
    throw failure(`cannot open '${name}' in the volume directory`, err);
  }
  try {
    let st = fstatSync(fd);
    if (mode === 'create' && st.isFile() && st.size === 0 && st.uid !== volume.owner.uid && process.geteuid?.() === 0) {
      fchownSync(fd, volume.owner.uid, volume.owner.gid); // made just now by root for the owner
      st = fstatSync(fd);
    }
    checkOwnedRegular(st, name, volume.owner, 'volume entry');
    return fd;
  } catch (err) {
    closeSync(fd);
    throw err;
  }
}

/** The name of backing file number `file`, for messages. */
export function fileName(volume: Pick<AnyVolume, 'manifest'>, file: number): string {
  return volume.manifest.files[file]?.path ?? `#${file}`;
}

export function closeVolume(volume: AnyVolume): void {
  for (const fd of volume.fds) closeSync(fd);
  volume.fds = [];
  closeSync(volume.dirFd);
}
