// `init`: a new volume — backing files (sparse, mode 0600) and the manifest, written last and
// atomically, so a failed init never leaves something that looks like a volume.
// The directory is opened once (no symlink followed) and must belong to whoever runs init;
// everything inside is reached through that fd, never by path: a planted symlink is refused
// or replaced, never written through, and an old backing file is checked before it is cut.

import {
  closeSync, fstatSync, ftruncateSync, lstatSync, mkdirSync, openSync, readFileSync, readdirSync, unlinkSync,
  constants as fsc, type Stats,
} from 'node:fs';
import { basename, resolve } from 'node:path';
import { VbdError, errnoCode, failure } from '../common/errors.js';
import { formatSize, isPowerOfTwo } from '../common/size.js';
import { computePlacement, computeSlotPlacement, tableFingerprint } from '../layouts/index.js';
import { DEFAULT_KDF, deriveKeys, newSalt } from '../layouts/secret.js';
import type { VolumeKeys } from '../store/keys.js';
import { writeNewSealedVolume } from '../store/sealed-store.js';
import { createSealedManifest } from '../store/sealed-manifest.js';
import { slotSize } from '../store/slot.js';
import {
  MANIFEST_NAME, MAX_CHUNK_SIZE, MAX_DEVICE_SIZE, MAX_FILES, MIN_CHUNK_SIZE, SEALED_MANIFEST_FORMAT,
  chunkCountProblem, isValidName, parseAnyManifest,
  type AnyManifest, type BackingFile, type LayoutSpec, type Manifest, type ScryptParams, type SealedLayoutSpec, type SealedManifest,
} from './manifest.js';
import { currentUser, type Owner } from './owner.js';
import { MAP_NAME, SEALED_JOURNAL_NAME, identityOf, unexpectedEntries, writeManifest, type VolumeIdentity } from './volume.js';

export type LayoutChoice = { kind: 'linear' } | { kind: 'striped' } | { kind: 'keyed'; secret: Buffer } | { kind: 'module'; path: string; params: Record<string, unknown> };

export interface InitOptions {
  dir: string;
  deviceSize: number;
  fileCount: number;
  chunkSize: number;
  layout: LayoutChoice;
  name?: string | undefined;
  /** Allow a non-empty directory (only a previous volume's own entries may be in it). */
  force?: boolean;
  /**
   * Called (with --force) when the directory, held open, is not empty, before anything in it is
   * touched: throws to refuse (a live volume, a directory other than the one confirmed).
   */
  checkReuse?: ((identity: VolumeIdentity) => void) | undefined;
}

/** What `init --force` would replace: the directory's identity, the old volume's name if its manifest reads. */
export interface ReuseTarget {
  identity: VolumeIdentity;
  oldName: string | undefined;
  entries: number;
}

/** The old manifest's name, if the directory holds one that parses (else undefined). */
function oldVolumeName(dirFd: number): string | undefined {
  let fd: number;
  try {
    fd = openSync(at(dirFd, MANIFEST_NAME), fsc.O_RDONLY | fsc.O_NOFOLLOW | O_NONBLOCK);
  } catch {
    return undefined;
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile() || st.size > MAX_OLD_MANIFEST) return undefined;
    return parseAnyManifest(readFileSync(fd, 'utf8')).name;
  } catch {
    return undefined;
  } finally {
    closeSync(fd);
  }
}

/**
 * What `init --force DIR` would replace: undefined if DIR does not exist or is empty. The CLI
 * asks for confirmation with it, and refuses a live volume, before any secret is asked for.
 */
export function reuseTarget(dir: string): ReuseTarget | undefined {
  const dirFd = openDir(resolve(dir), true);
  if (dirFd === undefined) return undefined;
  try {
    const entries = readdirSync(at(dirFd, '')).length;
    if (entries === 0) return undefined;
    return { identity: identityOf(dirFd), oldName: oldVolumeName(dirFd), entries };
  } finally {
    closeSync(dirFd);
  }
}

/** Names like file001 … file100: zero-padded so `ls` shows them in order. */
export function backingFileNames(count: number): string[] {
  const width = Math.max(3, String(count).length);
  return Array.from({ length: count }, (_, i) => `file${String(i + 1).padStart(width, '0')}`);
}

function checkGeometry(o: Pick<InitOptions, 'chunkSize' | 'deviceSize' | 'fileCount'>): void {
  if (!isPowerOfTwo(o.chunkSize) || o.chunkSize < MIN_CHUNK_SIZE || o.chunkSize > MAX_CHUNK_SIZE) {
    throw new VbdError(`--chunk must be a power of two from ${formatSize(MIN_CHUNK_SIZE)} to ${formatSize(MAX_CHUNK_SIZE)}, got ${o.chunkSize}`, { kind: 'usage' });
  }
  if (o.deviceSize <= 0 || o.deviceSize > MAX_DEVICE_SIZE) throw new VbdError(`--size must be from 1 chunk to ${formatSize(MAX_DEVICE_SIZE)}, got ${o.deviceSize}`, { kind: 'usage' });
  if (o.deviceSize % 512 !== 0) throw new VbdError(`--size ${o.deviceSize} is not a whole number of 512-byte sectors`, { kind: 'usage' });
  if (o.deviceSize % o.chunkSize !== 0) throw new VbdError(`--size ${formatSize(o.deviceSize)} is not a whole number of ${formatSize(o.chunkSize)} chunks`, { kind: 'usage' });
  if (!Number.isSafeInteger(o.fileCount) || o.fileCount < 1 || o.fileCount > MAX_FILES) throw new VbdError(`--files must be from 1 to ${MAX_FILES}, got ${o.fileCount}`, { kind: 'usage' });
  const chunks = o.deviceSize / o.chunkSize;
  const tooMany = chunkCountProblem(chunks);
  if (tooMany !== undefined) throw new VbdError(`--size ${formatSize(o.deviceSize)} in ${formatSize(o.chunkSize)} chunks makes ${tooMany}; use a larger --chunk`, { kind: 'usage' });
  if (chunks < o.fileCount) throw new VbdError(`${o.fileCount} files need at least ${o.fileCount} chunks; the device has ${chunks}`, { kind: 'usage' });
}

function layoutSpec(choice: LayoutChoice): LayoutSpec {
  switch (choice.kind) {
    case 'linear':
    case 'striped':
      return { kind: choice.kind };
    case 'keyed': {
      const salt = newSalt();
      const { layoutKey, keyCheck } = deriveKeys(choice.secret, salt, DEFAULT_KDF);
      layoutKey.fill(0);
      return { kind: 'keyed', salt, kdf: DEFAULT_KDF, keyCheck };
    }
    case 'module':
      if (/[\0-\x1f\x7f]/.test(choice.path)) throw new VbdError(`--layout module:PATH: the path must not hold control characters, got ${JSON.stringify(choice.path)}`, { kind: 'usage' });
      // The fingerprint is filled in once the module's table has been computed.
      return { kind: 'module', path: resolve(choice.path), params: choice.params, fingerprint: '0'.repeat(64) };
  }
}

const O_NONBLOCK = fsc.O_NONBLOCK;
const MAX_OLD_MANIFEST = 4 * 2 ** 20;

/** Path of `name` in the directory held open as `dirFd` (a single component: never re-resolves the directory). */
function at(dirFd: number, name: string): string {
  return `/proc/self/fd/${dirFd}/${name}`;
}

/** Opens the volume directory without following a symlink; undefined if it does not exist. */
function openDir(dir: string, missingOk: boolean): number | undefined {
  try {
    return openSync(dir, fsc.O_RDONLY | fsc.O_DIRECTORY | fsc.O_NOFOLLOW);
  } catch (err) {
    if (missingOk && errnoCode(err) === 'ENOENT') return undefined;
    if (errnoCode(err) === 'ENOTDIR') {
      // O_DIRECTORY|O_NOFOLLOW on a symlink says ENOTDIR too: name which one it is.
      let link = false;
      try {
        link = lstatSync(dir).isSymbolicLink();
      } catch {
        /* gone meanwhile: still not a directory we opened */
      }
      throw new VbdError(link ? `cannot use ${dir}: is a symbolic link (refused)` : `${dir} exists and is not a directory`, { kind: 'refused' });
    }
    throw failure(`cannot use ${dir}`, err);
  }
}

/** The directory must be ours, not writable by group or others, and hold nothing foreign. */
function checkDir(dirFd: number, dir: string, me: Owner, files: readonly BackingFile[], force: boolean): void {
  const st = fstatSync(dirFd);
  if (st.uid !== me.uid) {
    throw new VbdError(`${dir} is owned by uid ${st.uid}, not by uid ${me.uid} (${me.name}) who runs init; run init as the directory's owner`, { kind: 'refused' });
  }
  if ((st.mode & 0o022) !== 0) {
    throw new VbdError(`${dir} is writable by group or others (mode ${(st.mode & 0o777).toString(8)}); chmod go-w it`, { kind: 'refused' });
  }
  const entries = readdirSync(at(dirFd, ''));
  if (entries.length > 0 && !force) throw new VbdError(`${dir} is not empty (use --force to reuse a directory that holds an old volume)`, { kind: 'refused' });
  const foreign = unexpectedEntries(at(dirFd, ''), { files: [...files] });
  if (foreign.length > 0) throw new VbdError(`${dir} holds '${foreign[0]}', which is not part of the new volume; refusing to mix`, { kind: 'refused' });
  let old: Stats | undefined;
  try {
    old = lstatSync(at(dirFd, MANIFEST_NAME));
  } catch (err) {
    if (errnoCode(err) !== 'ENOENT') throw failure(`cannot check ${dir}/${MANIFEST_NAME}`, err);
  }
  if (old?.isDirectory() === true) throw new VbdError(`${dir}/${MANIFEST_NAME} is a directory; refusing to replace it`, { kind: 'refused' });
}

/** An existing backing file, opened for writing without following a symlink and checked; undefined if absent. */
function openOldBackingFile(dirFd: number, dir: string, name: string, me: Owner): number | undefined {
  let fd: number;
  try {
    fd = openSync(at(dirFd, name), fsc.O_WRONLY | fsc.O_NOFOLLOW | O_NONBLOCK);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return undefined;
    throw failure(`cannot reuse backing file ${dir}/${name}`, err);
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new VbdError(`cannot reuse backing file ${dir}/${name}: not a regular file`, { kind: 'refused' });
    if (st.nlink !== 1) throw new VbdError(`cannot reuse backing file ${dir}/${name}: it has ${st.nlink} hard links; backing files must have exactly one`, { kind: 'refused' });
    if (st.uid !== me.uid) throw new VbdError(`cannot reuse backing file ${dir}/${name}: owned by uid ${st.uid}, not uid ${me.uid}`, { kind: 'refused' });
    return fd;
  } catch (err) {
    closeSync(fd);
    throw err;
  }
}

/** The volume's name: --name, else the directory's name made safe. */
function volumeName(dir: string, name: string | undefined): string {
  const chosen = name ?? basename(dir).replace(/[^A-Za-z0-9_.-]/g, '_').replace(/^[.-]+/, '');
  if (!isValidName(chosen)) throw new VbdError(`volume name '${chosen}' must be 1-64 characters of A-Z a-z 0-9 _ . - not starting with . or - (use --name)`, { kind: 'usage' });
  return chosen;
}

/** `units` (chunks or slots) spread over the files, the first ones one more, each `unitBytes` bytes. */
function spread(fileCount: number, units: number, unitBytes: number): BackingFile[] {
  const base = Math.floor(units / fileCount);
  const extra = units % fileCount; // the first `extra` files hold one more (so striping fits)
  return backingFileNames(fileCount).map((path, i) => ({ path, size: (base + (i < extra ? 1 : 0)) * unitBytes }));
}

function unlinkOwnEntry(dirFd: number, dir: string, name: string): void {
  try {
    unlinkSync(at(dirFd, name));
  } catch (err) {
    if (errnoCode(err) !== 'ENOENT') throw failure(`cannot remove ${dir}/${name}`, err);
  }
}

interface Creation<M extends AnyManifest> {
  dir: string;
  files: BackingFile[];
  force: boolean;
  me: Owner;
  /** The manifest (runs layout code: only after an existing directory was checked). */
  build: () => Promise<M>;
  checkReuse?: ((identity: VolumeIdentity) => void) | undefined;
  /** Writes the files' contents (sealed: every slot, and the map) once they exist at their sizes. */
  fill?: (fds: number[], dirFd: number, manifest: M) => void;
}

/**
 * The steps every init shares: check (or make) the directory, build the manifest, check every
 * old backing file before any is cut, make the files at their sizes, fill them, and put the
 * manifest in place last. A sealed volume's map and journal of an old volume are removed first
 * (--force), so no old state outlives it.
 */
async function createVolume<M extends AnyManifest>(c: Creation<M>): Promise<M> {
  const { dir, files, force, me } = c;
  let dirFd = openDir(dir, true);
  const fds: (number | undefined)[] = [];
  try {
    if (dirFd !== undefined) {
      checkDir(dirFd, dir, me, files, force);
      if (readdirSync(at(dirFd, '')).length > 0) c.checkReuse?.(identityOf(dirFd));
    }
    const manifest = await c.build();
    if (dirFd === undefined) {
      try {
        mkdirSync(dir, { mode: 0o700, recursive: true });
      } catch (err) {
        throw failure(`cannot create ${dir}`, err);
      }
      dirFd = openDir(dir, false) ?? -1;
      checkDir(dirFd, dir, me, files, force);
    }
    const held = dirFd;

    // Every old backing file is checked before any is cut or any new one is made.
    for (const file of files) fds.push(openOldBackingFile(held, dir, file.path, me));
    unlinkOwnEntry(held, dir, MAP_NAME);
    unlinkOwnEntry(held, dir, SEALED_JOURNAL_NAME);
    files.forEach((file, i) => {
      if (fds[i] !== undefined) return;
      try {
        fds[i] = openSync(at(held, file.path), fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW | O_NONBLOCK, 0o600);
      } catch (err) {
        throw failure(`cannot create backing file ${dir}/${file.path}`, err);
      }
    });
    files.forEach((file, i) => {
      try {
        ftruncateSync(fds[i] ?? -1, 0);
        ftruncateSync(fds[i] ?? -1, file.size);
      } catch (err) {
        throw failure(`cannot size backing file ${dir}/${file.path} to ${file.size} bytes`, err);
      }
    });
    c.fill?.(fds.map((fd) => fd ?? -1), held, manifest);
    writeManifest(held, dir, manifest);
    return manifest;
  } finally {
    for (const fd of fds) if (fd !== undefined) closeSync(fd);
    if (dirFd !== undefined && dirFd >= 0) closeSync(dirFd);
  }
}

/** Creates the volume; returns its manifest. Nothing is written until every check passed. */
export async function initVolume(o: InitOptions): Promise<Manifest> {
  checkGeometry(o);
  const dir = resolve(o.dir);
  const name = volumeName(dir, o.name);
  const me = currentUser();
  const files = spread(o.fileCount, o.deviceSize / o.chunkSize, o.chunkSize);
  return createVolume({
    dir, files, force: o.force === true, me, checkReuse: o.checkReuse,
    build: async () => {
      const manifest: Manifest = { format: 1, name, deviceSize: o.deviceSize, chunkSize: o.chunkSize, files, layout: layoutSpec(o.layout) };
      // The placement: a module layout runs confined, as whoever runs init.
      const table = await computePlacement(manifest, { owner: me, secret: o.layout.kind === 'keyed' ? o.layout.secret : undefined });
      if (manifest.layout.kind === 'module') manifest.layout.fingerprint = tableFingerprint(table);
      return manifest;
    },
  });
}

/** A sealed volume's layout: no secret of its own (a keyed placement takes the volume key's placement subkey). */
export type SealedLayoutChoice = { kind: 'linear' } | { kind: 'striped' } | { kind: 'keyed' } | { kind: 'module'; path: string; params: Record<string, unknown> };

/** Spare slots: a percentage of the chunk count (rounded up) or a count. */
export type SpareChoice = { percent: number } | { count: number };

/** The default: a fifth of the device can change between two commits without the overflow journal. */
export const DEFAULT_SPARE: SpareChoice = { percent: 20 };

export interface SealedInitOptions extends Omit<InitOptions, 'layout'> {
  layout: SealedLayoutChoice;
  /** The passphrase the volume key is wrapped under. The caller owns and wipes it. */
  passphrase: Buffer;
  spare?: SpareChoice | undefined;
  /** scrypt cost of the wrap (default: the keyed layout's). */
  kdf?: ScryptParams | undefined;
}

export function spareSlotCount(chunks: number, spare: SpareChoice): number {
  const count = 'count' in spare ? spare.count : Math.ceil((chunks * spare.percent) / 100);
  if (!Number.isSafeInteger(count) || count < 1) throw new VbdError(`--spare must give at least 1 spare slot, got ${count}`, { kind: 'usage' });
  const tooMany = chunkCountProblem(chunks + count);
  if (tooMany !== undefined) throw new VbdError(`--spare: ${chunks} chunks and ${count} spare slots make ${tooMany.replace('chunks', 'slots')}; use fewer spares or larger chunks`, { kind: 'usage' });
  return count;
}

function sealedLayoutSpec(choice: SealedLayoutChoice): SealedLayoutSpec {
  if (choice.kind !== 'module') return { kind: choice.kind };
  if (/[\0-\x1f\x7f]/.test(choice.path)) throw new VbdError(`--layout module:PATH: the path must not hold control characters, got ${JSON.stringify(choice.path)}`, { kind: 'usage' });
  return { kind: 'module', path: resolve(choice.path), params: choice.params, fingerprint: '0'.repeat(64) };
}

/**
 * Creates a sealed volume (docs/FORMAT.md): a random volume key wrapped under the passphrase,
 * files of slots (chunk + 28 bytes) for every chunk and every spare, EVERY slot filled with
 * ciphertext (the chunks' slots sealed zero chunks of epoch 1 where the layout puts them, the
 * spares random bytes), the position map, and the manifest last.
 */
export async function initSealedVolume(o: SealedInitOptions): Promise<SealedManifest> {
  checkGeometry(o);
  const dir = resolve(o.dir);
  const name = volumeName(dir, o.name);
  const me = currentUser();
  const chunks = o.deviceSize / o.chunkSize;
  const spareSlots = spareSlotCount(chunks, o.spare ?? DEFAULT_SPARE);
  const files = spread(o.fileCount, chunks + spareSlots, slotSize(o.chunkSize));
  let keys: VolumeKeys | undefined;
  let slotOfChunk: Uint32Array | undefined;
  try {
    return await createVolume<SealedManifest>({
      dir, files, force: o.force === true, me, checkReuse: o.checkReuse,
      build: async () => {
        const layout = sealedLayoutSpec(o.layout);
        const draft = { name, deviceSize: o.deviceSize, chunkSize: o.chunkSize, files, layout, spareSlots, kdf: o.kdf ?? DEFAULT_KDF };
        if (layout.kind === 'module') {
          // The wrap binds the layout, fingerprint included: place first (no key needed), then wrap.
          const probe: SealedManifest = { format: SEALED_MANIFEST_FORMAT, name, deviceSize: o.deviceSize, chunkSize: o.chunkSize, files, layout, sealed: { uuid: '0'.repeat(32), kdf: { ...draft.kdf, salt: '0'.repeat(32) }, wrappedKey: '0'.repeat(120), spareSlots, keyGeneration: 0 } };
          const placed = await computeSlotPlacement(probe, { owner: me });
          layout.fingerprint = placed.fingerprint;
          slotOfChunk = placed.slotOfChunk;
        }
        const created = createSealedManifest(o.passphrase, draft);
        keys = created.keys;
        if (slotOfChunk === undefined) {
          slotOfChunk = (await computeSlotPlacement(created.manifest, { owner: me, placementKey: created.keys.placementKey })).slotOfChunk;
        }
        return created.manifest;
      },
      fill: (fds, dirFd, manifest) => {
        if (keys === undefined || slotOfChunk === undefined) throw new VbdError('internal: sealed init without keys or placement');
        let mapFd: number;
        try {
          mapFd = openSync(at(dirFd, MAP_NAME), fsc.O_RDWR | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW | O_NONBLOCK, 0o600);
        } catch (err) {
          throw failure(`cannot create ${dir}/${MAP_NAME}`, err);
        }
        try {
          writeNewSealedVolume({ fds, names: files.map((f) => f.path), mapFd }, manifest, keys, slotOfChunk);
        } finally {
          closeSync(mapFd);
        }
      },
    });
  } finally {
    keys?.wipe();
  }
}
