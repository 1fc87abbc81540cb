// The key hierarchy of a sealed volume (format of docs/FORMAT.md, "Key wrap" and "Subkeys").
//
//   passphrase ──scrypt(salt, N, r, p)──▶ KEK ──AES-256-GCM unwrap (AD = geometry)──▶ volume key
//   volume key ──HKDF-SHA256(salt = volume UUID, info = label)──▶ slot key (per key generation),
//                                                                 map key, placement key
//
// The volume key is random and never leaves this module unwrapped: callers get subkeys. The
// wrap's authenticated data covers the volume's identity and geometry, so the wrap IS the key
// check: a wrong passphrase and an edited manifest both fail the same way, and nothing can tell
// them apart. A passphrase change re-wraps the one volume key; no slot is touched.

import { createCipheriv, createDecipheriv, createSecretKey, hkdfSync, randomBytes, type KeyObject } from 'node:crypto';
import { VbdError } from '../common/errors.js';
import { scryptDerive } from '../layouts/secret.js';
import type { ScryptParams } from '../volume/manifest.js';

export const VOLUME_KEY_BYTES = 32;
export const VOLUME_UUID_BYTES = 16;
export const KDF_SALT_BYTES = 16;
export const WRAP_NONCE_BYTES = 12;
export const WRAP_TAG_BYTES = 16;
/** nonce ‖ tag ‖ wrapped volume key: the same layout as a slot holding a 32-byte chunk. */
export const WRAPPED_KEY_BYTES = WRAP_NONCE_BYTES + WRAP_TAG_BYTES + VOLUME_KEY_BYTES;
export const MAX_KEY_GENERATION = 2 ** 32 - 1;

/** Prefix of the wrap's authenticated data (domain separation from every other AD). */
export const WRAP_AD_LABEL = 'vbd-shadow/wrap';
/** HKDF info labels; the slot label is followed by the key generation (u32 big-endian). */
export const HKDF_LABELS = {
  slot: 'vbd-shadow/slot',
  map: 'vbd-shadow/map',
  placement: 'vbd-shadow/placement',
} as const;

/** The scrypt parameters of a wrap, with its salt (hex): what the manifest stores. */
export interface WrapKdf extends ScryptParams {
  salt: string;
}

/** The wrapped volume key as the manifest stores it (JSON-able). */
export interface WrappedVolumeKey {
  kdf: WrapKdf;
  /** Hex of nonce(12) ‖ tag(16) ‖ AES-256-GCM ciphertext of the volume key (32). */
  wrappedKey: string;
}

/**
 * What the wrap's authenticated data covers: the volume's identity and everything that says
 * where its data is. Any change to one of these makes the unwrap fail.
 */
export interface SealedGeometry {
  /** The volume UUID: 16 random bytes. */
  uuid: Buffer;
  /** The manifest format version. */
  format: number;
  /** Whether the volume is sealed (always true for a manifest that has a wrap; bound all the same). */
  sealed: boolean;
  /** The volume's name (bound too, so that nothing of the manifest but the wrap itself can change). */
  name: string;
  deviceSize: number;
  chunkSize: number;
  /** The backing files in manifest order. */
  files: readonly { path: string; size: number }[];
  /** Slots kept free for copy-on-write commits. */
  spareSlots: number;
  /** The slot key generation new slots are sealed under. */
  keyGeneration: number;
  /** The layout spec in canonical JSON (its kind and every parameter). */
  layout: string;
}

/** The key that seals slots of one key generation of one volume. */
export interface SlotKey {
  readonly key: Buffer;
  /** The same key as OpenSSL holds it: a cipher made from it skips the key import (~6 µs a slot). */
  readonly secret: KeyObject;
  readonly generation: number;
  readonly uuid: Buffer;
}

/** A slot key from its bytes (which it keeps: wipe them to wipe it). */
export function slotKeyOf(key: Buffer, generation: number, uuid: Buffer): SlotKey {
  return { key, secret: createSecretKey(key), generation, uuid };
}

/** Fills buffers with zeros: for keys, passphrases and plaintext once they are no longer needed. */
export function wipe(...buffers: (Buffer | undefined)[]): void {
  for (const b of buffers) b?.fill(0);
}

/** A fresh random volume UUID (16 bytes; written in the manifest as 32 hex digits). */
export function newVolumeUuid(): Buffer {
  return randomBytes(VOLUME_UUID_BYTES);
}

function u32ok(n: number): boolean {
  return Number.isSafeInteger(n) && n >= 0 && n <= 0xffffffff;
}

function u64ok(n: number): boolean {
  return Number.isSafeInteger(n) && n >= 0;
}

/** Big-endian writer for authenticated data. */
class Writer {
  private readonly parts: Buffer[] = [];
  bytes(b: Buffer): this {
    this.parts.push(Buffer.from(b));
    return this;
  }
  u8(n: number): this {
    this.parts.push(Buffer.of(n));
    return this;
  }
  u32(n: number, what: string): this {
    if (!u32ok(n)) throw new VbdError(`sealed geometry: ${what} must be an integer from 0 to 2^32-1, got ${n}`);
    const b = Buffer.alloc(4);
    b.writeUInt32BE(n);
    this.parts.push(b);
    return this;
  }
  u64(n: number, what: string): this {
    if (!u64ok(n)) throw new VbdError(`sealed geometry: ${what} must be a non-negative safe integer, got ${n}`);
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt(n));
    this.parts.push(b);
    return this;
  }
  /** u32 length ‖ UTF-8 bytes. */
  text(s: string, what: string): this {
    const b = Buffer.from(s, 'utf8');
    return this.u32(b.length, `${what} length`).bytes(b);
  }
  done(): Buffer {
    return Buffer.concat(this.parts);
  }
}

/**
 * The wrap's authenticated data, byte for byte as docs/FORMAT.md gives it:
 * label ‖ 0x00 ‖ uuid(16) ‖ format u32 ‖ sealed u8 ‖ name text ‖ deviceSize u64 ‖ chunkSize u32 ‖
 * spareSlots u32 ‖ keyGeneration u32 ‖ fileCount u32 ‖ (path text ‖ size u64)* ‖ layout text,
 * where text = u32 length ‖ UTF-8 bytes. Every field has a fixed size or a length prefix, so two
 * different geometries never encode to the same bytes.
 */
export function encodeGeometryAD(g: SealedGeometry): Buffer {
  if (g.uuid.length !== VOLUME_UUID_BYTES) throw new VbdError(`sealed geometry: the volume UUID must be ${VOLUME_UUID_BYTES} bytes, got ${g.uuid.length}`);
  const w = new Writer()
    .bytes(Buffer.from(`${WRAP_AD_LABEL}\0`, 'ascii'))
    .bytes(g.uuid)
    .u32(g.format, 'format')
    .u8(g.sealed ? 1 : 0)
    .text(g.name, 'name')
    .u64(g.deviceSize, 'deviceSize')
    .u32(g.chunkSize, 'chunkSize')
    .u32(g.spareSlots, 'spareSlots')
    .u32(g.keyGeneration, 'keyGeneration')
    .u32(g.files.length, 'file count');
  g.files.forEach((f, i) => w.text(f.path, `files[${i}].path`).u64(f.size, `files[${i}].size`));
  return w.text(g.layout, 'layout').done();
}

function hkdf(volumeKey: Buffer, uuid: Buffer, info: Buffer): Buffer {
  return Buffer.from(hkdfSync('sha256', volumeKey, uuid, info, 32));
}

/** The HKDF info of the slot key of `generation`: label ‖ 0x00 ‖ generation u32. */
export function slotKeyInfo(generation: number): Buffer {
  if (!u32ok(generation)) throw new VbdError(`key generation must be an integer from 0 to 2^32-1, got ${generation}`);
  const info = Buffer.alloc(HKDF_LABELS.slot.length + 1 + 4);
  info.write(HKDF_LABELS.slot, 0, 'ascii');
  info.writeUInt32BE(generation, HKDF_LABELS.slot.length + 1);
  return info;
}

function labelInfo(label: string): Buffer {
  return Buffer.from(`${label}\0`, 'ascii');
}

/**
 * The unwrapped keys of one sealed volume. The volume key stays inside; callers get subkeys.
 * `wipe()` zeroes every key it holds or handed out; using it afterwards throws.
 */
export class VolumeKeys {
  readonly uuid: Buffer;
  /** Seals the position map (next step: the copy-on-write commit). */
  readonly mapKey: Buffer;
  /** Keys a `keyed` placement of a sealed volume. */
  readonly placementKey: Buffer;
  #volumeKey: Buffer;
  readonly #slotKeys = new Map<number, SlotKey>();
  /** The KEK that unwrapped the volume key, with its salt and cost: lets a re-key re-wrap without the passphrase. */
  readonly #wrapping: WrappingKey | undefined;
  #wiped = false;

  /** Takes ownership of `volumeKey` and `wrapping` (wiped with the rest). */
  constructor(volumeKey: Buffer, uuid: Buffer, wrapping?: WrappingKey) {
    if (volumeKey.length !== VOLUME_KEY_BYTES) throw new VbdError(`volume key must be ${VOLUME_KEY_BYTES} bytes, got ${volumeKey.length}`);
    if (uuid.length !== VOLUME_UUID_BYTES) throw new VbdError(`volume UUID must be ${VOLUME_UUID_BYTES} bytes, got ${uuid.length}`);
    this.#volumeKey = volumeKey;
    this.#wrapping = wrapping;
    this.uuid = Buffer.from(uuid);
    this.mapKey = hkdf(volumeKey, this.uuid, labelInfo(HKDF_LABELS.map));
    this.placementKey = hkdf(volumeKey, this.uuid, labelInfo(HKDF_LABELS.placement));
  }

  /** The slot key of a key generation (a re-key moves to generation + 1: a new, unrelated key). */
  slotKey(generation: number): SlotKey {
    this.#live();
    const known = this.#slotKeys.get(generation);
    if (known !== undefined) return known;
    const key = slotKeyOf(hkdf(this.#volumeKey, this.uuid, slotKeyInfo(generation)), generation, this.uuid);
    this.#slotKeys.set(generation, key);
    return key;
  }

  get wiped(): boolean {
    return this.#wiped;
  }

  /**
   * Wraps the volume key again under the KEK that unwrapped it (same salt and scrypt cost, a fresh
   * nonce) with `geometry` as authenticated data: how a re-key binds the next key generation while
   * the passphrase itself is long wiped. The KEK protects nothing the volume key in this process
   * does not already give, and testing a passphrase against it costs the same scrypt as the wrap.
   */
  rewrapFor(geometry: SealedGeometry): WrappedVolumeKey {
    this.#live();
    if (this.#wrapping === undefined) throw new VbdError('internal: these volume keys were not unwrapped with a passphrase, so they cannot re-wrap');
    if (!this.uuid.equals(geometry.uuid)) throw new VbdError('sealed geometry: its volume UUID is not the UUID these keys belong to');
    const { key, kdf } = this.#wrapping;
    return { kdf: { ...kdf }, wrappedKey: wrapWithKek(this.#volumeKey, key, geometry).toString('hex') };
  }

  /** Zeroes the volume key, the KEK, the map and placement keys and every slot key handed out. */
  wipe(): void {
    wipe(this.#volumeKey, this.mapKey, this.placementKey);
    if (this.#wrapping !== undefined) wipe(this.#wrapping.key);
    for (const k of this.#slotKeys.values()) wipe(k.key);
    this.#slotKeys.clear();
    this.#wiped = true;
  }

  /** Wraps this volume key under a passphrase (internal: createVolumeKeys and rewrapVolumeKey). */
  wrapUnder(passphrase: Buffer, kdf: ScryptParams, geometry: SealedGeometry): WrappedVolumeKey {
    this.#live();
    if (!this.uuid.equals(geometry.uuid)) throw new VbdError('sealed geometry: its volume UUID is not the UUID these keys belong to');
    return wrap(this.#volumeKey, passphrase, kdf, geometry);
  }

  #live(): void {
    if (this.#wiped) throw new VbdError('volume keys used after they were wiped');
  }
}

/** The key-encryption key: scrypt(passphrase, salt) under the capped parameters. */
function kek(passphrase: Buffer, salt: Buffer, kdf: ScryptParams): Buffer {
  if (passphrase.length === 0) throw new VbdError('empty passphrase');
  try {
    return scryptDerive(passphrase, salt, kdf, 32);
  } catch (err) {
    if (err instanceof VbdError) throw err;
    throw new VbdError(`scrypt parameters refused (N=${kdf.N}, r=${kdf.r}, p=${kdf.p}): ${(err as Error).message}`);
  }
}

/** A KEK with the scrypt parameters and salt it came from. */
interface WrappingKey {
  key: Buffer;
  kdf: WrapKdf;
}

/** nonce ‖ tag ‖ AES-256-GCM(kek, volume key) with the geometry as authenticated data. */
function wrapWithKek(volumeKey: Buffer, key: Buffer, geometry: SealedGeometry): Buffer {
  const nonce = randomBytes(WRAP_NONCE_BYTES);
  const cipher = createCipheriv('aes-256-gcm', key, nonce, { authTagLength: WRAP_TAG_BYTES });
  cipher.setAAD(encodeGeometryAD(geometry));
  const ciphertext = Buffer.concat([cipher.update(volumeKey), cipher.final()]);
  return Buffer.concat([nonce, cipher.getAuthTag(), ciphertext]);
}

function wrap(volumeKey: Buffer, passphrase: Buffer, kdf: ScryptParams, geometry: SealedGeometry): WrappedVolumeKey {
  const salt = randomBytes(KDF_SALT_BYTES);
  const key = kek(passphrase, salt, kdf);
  try {
    return { kdf: { N: kdf.N, r: kdf.r, p: kdf.p, salt: salt.toString('hex') }, wrappedKey: wrapWithKek(volumeKey, key, geometry).toString('hex') };
  } finally {
    wipe(key);
  }
}

function hexField(text: string, bytes: number, what: string): Buffer {
  if (!new RegExp(`^[0-9a-f]{${bytes * 2}}$`).test(text)) throw new VbdError(`${what} must be ${bytes * 2} hex digits`);
  return Buffer.from(text, 'hex');
}

/**
 * Creates the keys of a new sealed volume: a random volume key, wrapped under `passphrase`
 * (scrypt with `kdf` and a random salt) with `geometry` as authenticated data. The caller stores
 * `wrapped` in the manifest and wipes `keys` (and its passphrase) when done.
 */
export function createVolumeKeys(passphrase: Buffer, geometry: SealedGeometry, kdf: ScryptParams): { wrapped: WrappedVolumeKey; keys: VolumeKeys } {
  const keys = new VolumeKeys(randomBytes(VOLUME_KEY_BYTES), geometry.uuid);
  try {
    return { wrapped: keys.wrapUnder(passphrase, kdf, geometry), keys };
  } catch (err) {
    keys.wipe();
    throw err;
  }
}

/** The message for a failed unwrap: both causes look the same to AES-GCM, so it names both. */
export const UNWRAP_FAILED =
  'wrong key or manifest edited: the volume key does not unwrap under this passphrase with this manifest\'s UUID and geometry (nothing was read or written)';

/**
 * Unwraps the volume key with `passphrase` and the manifest's `geometry` as authenticated data.
 * Throws UNWRAP_FAILED when the passphrase is wrong or any bound field was edited.
 */
export function unwrapVolumeKeys(passphrase: Buffer, wrapped: WrappedVolumeKey, geometry: SealedGeometry): VolumeKeys {
  const salt = hexField(wrapped.kdf.salt, KDF_SALT_BYTES, 'wrap salt');
  const blob = hexField(wrapped.wrappedKey, WRAPPED_KEY_BYTES, 'wrapped key');
  const ad = encodeGeometryAD(geometry);
  const key = kek(passphrase, salt, wrapped.kdf);
  let volumeKey: Buffer;
  let kept = false;
  try {
    const decipher = createDecipheriv('aes-256-gcm', key, blob.subarray(0, WRAP_NONCE_BYTES), { authTagLength: WRAP_TAG_BYTES });
    decipher.setAAD(ad);
    decipher.setAuthTag(blob.subarray(WRAP_NONCE_BYTES, WRAP_NONCE_BYTES + WRAP_TAG_BYTES));
    const first = decipher.update(blob.subarray(WRAP_NONCE_BYTES + WRAP_TAG_BYTES));
    try {
      decipher.final();
    } catch {
      wipe(first);
      throw new VbdError(UNWRAP_FAILED, { kind: 'wrong-key' });
    }
    volumeKey = first;
    const { N, r, p } = wrapped.kdf;
    const keys = new VolumeKeys(volumeKey, geometry.uuid, { key, kdf: { N, r, p, salt: wrapped.kdf.salt } });
    kept = true;
    return keys;
  } finally {
    if (!kept) wipe(key);
  }
}

/**
 * A passphrase change: unwraps with `oldPassphrase` and re-wraps the same volume key under
 * `newPassphrase` with a fresh salt and nonce. No slot changes. `newGeometry` (default: the same)
 * lets the one re-wrap also move the binding, e.g. to the next key generation; `kdf` (default:
 * the old parameters) lets it change the scrypt cost.
 */
export function rewrapVolumeKey(
  oldPassphrase: Buffer,
  newPassphrase: Buffer,
  wrapped: WrappedVolumeKey,
  geometry: SealedGeometry,
  options: { newGeometry?: SealedGeometry; kdf?: ScryptParams } = {},
): WrappedVolumeKey {
  const keys = unwrapVolumeKeys(oldPassphrase, wrapped, geometry);
  try {
    const { N, r, p } = options.kdf ?? wrapped.kdf;
    return keys.wrapUnder(newPassphrase, { N, r, p }, options.newGeometry ?? geometry);
  } finally {
    keys.wipe();
  }
}
