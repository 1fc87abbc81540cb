// A sealed manifest ↔ the key wrap: what the wrap binds (every field of the manifest but the wrap
// itself), unlocking, creating and re-wrapping. Pure: no files are read or written here; init and
// the daemon (next step) do the I/O.

import { canonicalJson } from '../common/canonical-json.js';
import { VbdError } from '../common/errors.js';
import {
  SEALED_MANIFEST_FORMAT, parseAnyManifest, sealedSlotCount, serializeManifest,
  type BackingFile, type ScryptParams, type SealedLayoutSpec, type SealedManifest,
} from '../volume/manifest.js';
import {
  MAX_KEY_GENERATION, createVolumeKeys, newVolumeUuid, rewrapVolumeKey, unwrapVolumeKeys,
  type SealedGeometry, type VolumeKeys, type WrappedVolumeKey,
} from './keys.js';

/** What the wrap of this manifest authenticates: its UUID, format, sealed flag, name and geometry. */
export function sealedGeometry(manifest: SealedManifest): SealedGeometry {
  return {
    uuid: Buffer.from(manifest.sealed.uuid, 'hex'),
    format: manifest.format,
    sealed: true,
    name: manifest.name,
    deviceSize: manifest.deviceSize,
    chunkSize: manifest.chunkSize,
    files: manifest.files.map((f) => ({ path: f.path, size: f.size })),
    spareSlots: manifest.sealed.spareSlots,
    keyGeneration: manifest.sealed.keyGeneration,
    layout: canonicalJson(manifest.layout, 'layout'),
  };
}

/** The wrapped volume key as stored in the manifest. */
export function wrappedKeyOf(manifest: SealedManifest): WrappedVolumeKey {
  const { N, r, p, salt } = manifest.sealed.kdf;
  return { kdf: { N, r, p, salt }, wrappedKey: manifest.sealed.wrappedKey };
}

/** Slots of C + 28 bytes the volume's files hold (chunks + spare slots at least; the parser checked). */
export function slotCountOf(manifest: SealedManifest): number {
  return sealedSlotCount(manifest.chunkSize, manifest.files);
}

/**
 * The volume's keys, if `passphrase` unwraps its key with this manifest as it is. Refuses a wrong
 * passphrase and an edited manifest alike ("wrong key or manifest edited"). The caller wipes them.
 */
export function unlockSealedManifest(passphrase: Buffer, manifest: SealedManifest): VolumeKeys {
  return unwrapVolumeKeys(passphrase, wrappedKeyOf(manifest), sealedGeometry(manifest));
}

export interface NewSealedVolume {
  name: string;
  deviceSize: number;
  chunkSize: number;
  files: BackingFile[];
  layout: SealedLayoutSpec;
  spareSlots: number;
  kdf: ScryptParams;
}

function withWrap(manifest: SealedManifest, wrapped: WrappedVolumeKey): SealedManifest {
  return { ...manifest, sealed: { ...manifest.sealed, kdf: { ...wrapped.kdf }, wrappedKey: wrapped.wrappedKey } };
}

/** Parses what we built: a manifest this module makes is one the strict parser accepts. */
function checked(manifest: SealedManifest): SealedManifest {
  const back = parseAnyManifest(serializeManifest(manifest));
  if (back.format !== SEALED_MANIFEST_FORMAT) throw new VbdError('internal: a sealed manifest parsed as a plain one');
  return back;
}

/**
 * A new sealed volume's manifest and keys: a fresh UUID and volume key, key generation 0, the
 * volume key wrapped under `passphrase`. Refused (with the parser's message) if the geometry is
 * invalid, e.g. the files hold fewer slots than chunks + spare slots.
 */
export function createSealedManifest(passphrase: Buffer, volume: NewSealedVolume): { manifest: SealedManifest; keys: VolumeKeys } {
  const draft: SealedManifest = checked({
    format: SEALED_MANIFEST_FORMAT,
    name: volume.name,
    deviceSize: volume.deviceSize,
    chunkSize: volume.chunkSize,
    files: volume.files.map((f) => ({ path: f.path, size: f.size })),
    layout: volume.layout,
    sealed: {
      uuid: newVolumeUuid().toString('hex'),
      kdf: { ...volume.kdf, salt: '0'.repeat(32) },
      wrappedKey: '0'.repeat(120),
      spareSlots: volume.spareSlots,
      keyGeneration: 0,
    },
  });
  const { wrapped, keys } = createVolumeKeys(passphrase, sealedGeometry(draft), volume.kdf);
  return { manifest: withWrap(draft, wrapped), keys };
}

/** A passphrase change: the same manifest with the volume key re-wrapped. No slot changes. */
export function changePassphrase(oldPassphrase: Buffer, newPassphrase: Buffer, manifest: SealedManifest, kdf?: ScryptParams): SealedManifest {
  const wrapped = rewrapVolumeKey(oldPassphrase, newPassphrase, wrappedKeyOf(manifest), sealedGeometry(manifest), kdf === undefined ? {} : { kdf });
  return checked(withWrap(manifest, wrapped));
}

/**
 * The manifest moved to the next slot key generation (a re-key), re-wrapped because the wrap binds
 * the generation: under the KEK that unlocked `keys`, so the passphrase stays what it was and is
 * not needed. Slots of older generations stay readable with their own slot keys.
 */
export function nextKeyGeneration(keys: VolumeKeys, manifest: SealedManifest): SealedManifest {
  return atKeyGeneration(keys, manifest, manifest.sealed.keyGeneration + 1);
}

/** The manifest moved on to key generation `generation` (above its own; generations in between are skipped), re-wrapped as nextKeyGeneration does. */
export function atKeyGeneration(keys: VolumeKeys, manifest: SealedManifest, generation: number): SealedManifest {
  if (!Number.isSafeInteger(generation) || generation <= manifest.sealed.keyGeneration) {
    throw new VbdError(`internal: key generation ${generation} is not after the manifest's ${manifest.sealed.keyGeneration}`);
  }
  if (generation > MAX_KEY_GENERATION) throw new VbdError(`no key generation left: ${generation} is past 2^32-1`);
  const next: SealedManifest = { ...manifest, sealed: { ...manifest.sealed, keyGeneration: generation } };
  return checked(withWrap(next, keys.rewrapFor(sealedGeometry(next))));
}
