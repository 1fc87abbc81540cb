// `init`: a new volume — backing files (sparse, mode 0600) and the manifest, written last and
// atomically, so a failed init never leaves something that looks like a volume.

import { closeSync, ftruncateSync, mkdirSync, openSync, readdirSync, renameSync, statSync, writeFileSync, constants as fsc, type Stats } from 'node:fs';
import { basename, join, resolve } from 'node:path';
import { VbdError, errnoCode, failure } from '../common/errors.js';
import { formatSize, isPowerOfTwo } from '../common/size.js';
import { computePlacement, tableFingerprint } from '../layouts/index.js';
import { DEFAULT_KDF, deriveKeys, newSalt } from '../layouts/secret.js';
import {
  MANIFEST_NAME, MAX_CHUNK_SIZE, MAX_DEVICE_SIZE, MAX_FILES, MIN_CHUNK_SIZE,
  isValidName, serializeManifest, type LayoutSpec, type Manifest,
} from './manifest.js';
import { unexpectedEntries } from './volume.js';

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
}

/** Names like file001 … file100: zero-padded so `ls` shows them in order. */
export function backingFileNames(count: number): string[] {
  const width = Math.max(3, String(count).length);
  return Array.from({ length: count }, (_, i) => `file${String(i + 1).padStart(width, '0')}`);
}

function checkGeometry(o: InitOptions): void {
  if (!isPowerOfTwo(o.chunkSize) || o.chunkSize < MIN_CHUNK_SIZE || o.chunkSize > MAX_CHUNK_SIZE) {
    throw new VbdError(`--chunk must be a power of two from ${formatSize(MIN_CHUNK_SIZE)} to ${formatSize(MAX_CHUNK_SIZE)}, got ${o.chunkSize}`);
  }
  if (o.deviceSize <= 0 || o.deviceSize > MAX_DEVICE_SIZE) throw new VbdError(`--size must be from 1 chunk to ${formatSize(MAX_DEVICE_SIZE)}, got ${o.deviceSize}`);
  if (o.deviceSize % 512 !== 0) throw new VbdError(`--size ${o.deviceSize} is not a whole number of 512-byte sectors`);
  if (o.deviceSize % o.chunkSize !== 0) throw new VbdError(`--size ${formatSize(o.deviceSize)} is not a whole number of ${formatSize(o.chunkSize)} chunks`);
  if (!Number.isSafeInteger(o.fileCount) || o.fileCount < 1 || o.fileCount > MAX_FILES) throw new VbdError(`--files must be from 1 to ${MAX_FILES}, got ${o.fileCount}`);
  const chunks = o.deviceSize / o.chunkSize;
  if (chunks < o.fileCount) throw new VbdError(`${o.fileCount} files need at least ${o.fileCount} chunks; the device has ${chunks}`);
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
      // The fingerprint is filled in once the module's table has been computed.
      return { kind: 'module', path: resolve(choice.path), params: choice.params, fingerprint: '0'.repeat(64) };
  }
}

/** Creates the volume; returns its manifest. Nothing is written until every check passed. */
export async function initVolume(o: InitOptions): Promise<Manifest> {
  checkGeometry(o);
  const dir = resolve(o.dir);
  const name = o.name ?? basename(dir).replace(/[^A-Za-z0-9_.-]/g, '_').replace(/^[.-]+/, '');
  if (!isValidName(name)) throw new VbdError(`volume name '${name}' must be 1-64 characters of A-Z a-z 0-9 _ . - not starting with . or - (use --name)`);

  const chunks = o.deviceSize / o.chunkSize;
  const base = Math.floor(chunks / o.fileCount);
  const extra = chunks % o.fileCount; // the first `extra` files hold one chunk more (so striping fits)
  const files = backingFileNames(o.fileCount).map((path, i) => ({ path, size: (base + (i < extra ? 1 : 0)) * o.chunkSize }));
  const manifest: Manifest = { format: 1, name, deviceSize: o.deviceSize, chunkSize: o.chunkSize, files, layout: layoutSpec(o.layout) };

  if (manifest.layout.kind === 'keyed' && o.layout.kind === 'keyed') {
    await computePlacement(manifest, { secret: o.layout.secret });
  } else {
    const table = await computePlacement(manifest);
    if (manifest.layout.kind === 'module') manifest.layout.fingerprint = tableFingerprint(table);
  }

  let existing: Stats | undefined;
  try {
    existing = statSync(dir);
  } catch (err) {
    if (errnoCode(err) !== 'ENOENT') throw failure(`cannot use ${dir}`, err);
  }
  if (existing !== undefined && !existing.isDirectory()) throw new VbdError(`${dir} exists and is not a directory`);
  if (existing !== undefined) {
    const entries = readdirSync(dir);
    if (entries.length > 0 && o.force !== true) throw new VbdError(`${dir} is not empty (use --force to reuse a directory that holds an old volume)`);
    const foreign = unexpectedEntries(dir, manifest);
    if (foreign.length > 0) throw new VbdError(`${dir} holds '${foreign[0]}', which is not part of the new volume; refusing to mix`);
  } else {
    try {
      mkdirSync(dir, { mode: 0o700, recursive: true });
    } catch (err) {
      throw failure(`cannot create ${dir}`, err);
    }
  }

  for (const file of files) {
    const path = join(dir, file.path);
    let fd: number;
    try {
      fd = openSync(path, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_TRUNC | fsc.O_NOFOLLOW, 0o600);
    } catch (err) {
      throw failure(`cannot create backing file ${path}`, err);
    }
    try {
      ftruncateSync(fd, file.size);
    } catch (err) {
      throw failure(`cannot size backing file ${path} to ${file.size} bytes`, err);
    } finally {
      closeSync(fd);
    }
  }
  const temp = join(dir, `.${MANIFEST_NAME}.tmp`);
  writeFileSync(temp, serializeManifest(manifest), { mode: 0o644 });
  renameSync(temp, join(dir, MANIFEST_NAME));
  return manifest;
}
