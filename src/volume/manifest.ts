// The manifest: what a volume is (name, sizes, backing files, layout). Parsed strictly,
// because the root daemon reads it from a directory the user controls: every field is
// checked for type and range, unknown fields are refused, names come from a safe set.

import { canonicalJson } from '../common/canonical-json.js';
import { VbdError } from '../common/errors.js';
import { isPowerOfTwo } from '../common/size.js';
import { slotSize } from '../store/slot.js';
import { MANIFEST_NAME, NAME_RE } from './names.js';

export { MANIFEST_NAME, isValidName } from './names.js';
/** A plain volume: chunks stored as they are. */
export const MANIFEST_FORMAT = 1;
/** A sealed volume (docs/FORMAT.md): every chunk in an authenticated, encrypted slot. */
export const SEALED_MANIFEST_FORMAT = 2;

/** Largest device we accept: far above this machine's RAM, far below 2^53. */
export const MAX_DEVICE_SIZE = 2 ** 40;
export const MIN_CHUNK_SIZE = 512;
export const MAX_CHUNK_SIZE = 64 * 2 ** 20;
export const MAX_FILES = 10_000;
/**
 * Most chunks (and chunk slots in the files) a volume may have: every placement costs ~12 bytes
 * per chunk and 4 per slot in RAM, and root computes it; 2^24 chunks is 8 GiB of 512 B chunks.
 */
export const MAX_CHUNKS = 2 ** 24;
/** scrypt as root: at most 256 MiB (128·N·r) and p ≤ 4 — a few seconds at worst. */
export const MAX_SCRYPT_MEMORY = 256 * 2 ** 20;
export const MAX_SCRYPT_P = 4;
/** Names starting with this belong to the tool (manifest, journal, aside directory, …). */
export const RESERVED_PREFIX = 'vbd-shadow';

export interface BackingFile {
  /** A plain file name inside the volume directory. */
  path: string;
  size: number;
}

export interface ScryptParams {
  N: number;
  r: number;
  p: number;
}

export type LayoutSpec =
  | { kind: 'linear' }
  | { kind: 'striped' }
  | { kind: 'keyed'; salt: string; kdf: ScryptParams; keyCheck: string }
  | { kind: 'module'; path: string; params: Record<string, unknown>; fingerprint: string };

export type LayoutKind = LayoutSpec['kind'];
export const LAYOUT_KINDS: readonly LayoutKind[] = ['linear', 'striped', 'keyed', 'module'];

export interface Manifest {
  format: typeof MANIFEST_FORMAT;
  name: string;
  deviceSize: number;
  chunkSize: number;
  files: BackingFile[];
  layout: LayoutSpec;
}

/**
 * A sealed volume's layout places slots, not chunks. Its `keyed` placement takes its key from
 * the volume key (HKDF), so it has no salt or key-check value of its own.
 */
export type SealedLayoutSpec =
  | { kind: 'linear' }
  | { kind: 'striped' }
  | { kind: 'keyed' }
  | { kind: 'module'; path: string; params: Record<string, unknown>; fingerprint: string };

/** The `sealed` object of a format-2 manifest (docs/FORMAT.md). */
export interface SealedSpec {
  /** Volume UUID: 32 hex digits (16 random bytes). */
  uuid: string;
  /** scrypt parameters and salt of the key wrap. */
  kdf: ScryptParams & { salt: string };
  /** nonce ‖ tag ‖ ciphertext of the volume key, 120 hex digits. */
  wrappedKey: string;
  /** Slots beyond one per chunk, free for copy-on-write commits. */
  spareSlots: number;
  /** The slot key generation new slots are sealed under. */
  keyGeneration: number;
}

export interface SealedManifest {
  format: typeof SEALED_MANIFEST_FORMAT;
  name: string;
  deviceSize: number;
  chunkSize: number;
  files: BackingFile[];
  layout: SealedLayoutSpec;
  sealed: SealedSpec;
}

export type AnyManifest = Manifest | SealedManifest;

/** Why these scrypt parameters are refused (too costly for root), or undefined if they are fine. */
export function scryptCostProblem(kdf: ScryptParams): string | undefined {
  const memory = 128 * kdf.N * kdf.r;
  if (memory > MAX_SCRYPT_MEMORY) return `needs ${memory / 2 ** 20} MiB (128·N·r with N=${kdf.N}, r=${kdf.r}), more than the ${MAX_SCRYPT_MEMORY / 2 ** 20} MiB allowed`;
  if (kdf.p > MAX_SCRYPT_P) return `p=${kdf.p} is more than the ${MAX_SCRYPT_P} allowed`;
  return undefined;
}

/** Why a volume of this many chunks is refused, or undefined. */
export function chunkCountProblem(chunks: number): string | undefined {
  return chunks > MAX_CHUNKS ? `${chunks} chunks, more than the ${MAX_CHUNKS} allowed` : undefined;
}

type Json = Record<string, unknown>;

function bad(rule: string): never {
  throw new VbdError(`invalid manifest: ${rule}`);
}

function object(value: unknown, where: string): Json {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) bad(`${where} must be an object`);
  return value as Json;
}

function onlyKeys(obj: Json, allowed: readonly string[], where: string): void {
  for (const key of Object.keys(obj)) {
    if (!allowed.includes(key)) bad(`${where} has an unknown field '${key}'`);
  }
}

function integer(obj: Json, key: string, where: string, min: number, max: number): number {
  const value = obj[key];
  if (typeof value !== 'number' || !Number.isSafeInteger(value)) bad(`${where}.${key} must be an integer, got ${JSON.stringify(value)}`);
  if (value < min || value > max) bad(`${where}.${key} must be between ${min} and ${max}, got ${value}`);
  return value;
}

function string(obj: Json, key: string, where: string, re: RegExp, rule: string): string {
  const value = obj[key];
  if (typeof value !== 'string') bad(`${where}.${key} must be a string, got ${JSON.stringify(value)}`);
  if (!re.test(value)) bad(`${where}.${key} ${rule}, got ${JSON.stringify(value)}`);
  return value;
}

const HEX = (bytes: number): RegExp => new RegExp(`^[0-9a-f]{${bytes * 2}}$`);

/** N, r and p of an scrypt object whose keys the caller has checked; capped for root. */
function scryptFields(kdf: Json, where: string): ScryptParams {
  const N = integer(kdf, 'N', where, 1024, 2 ** 20);
  if (!isPowerOfTwo(N)) bad(`${where}.N must be a power of two, got ${N}`);
  const params = { N, r: integer(kdf, 'r', where, 1, 32), p: integer(kdf, 'p', where, 1, 16) };
  const costly = scryptCostProblem(params);
  if (costly !== undefined) bad(`${where} ${costly}`);
  return params;
}

function moduleLayout(obj: Json): { kind: 'module'; path: string; params: Record<string, unknown>; fingerprint: string } {
  onlyKeys(obj, ['kind', 'path', 'params', 'fingerprint'], 'layout');
  const path = string(obj, 'path', 'layout', /^\/[^\0-\x1f\x7f]{0,4095}$/, 'must be an absolute path to a JS module (no control characters)');
  return {
    kind: 'module',
    path,
    params: object(obj['params'] ?? {}, 'layout.params'),
    fingerprint: string(obj, 'fingerprint', 'layout', HEX(32), 'must be 64 hex digits'),
  };
}

function parseLayout(value: unknown): LayoutSpec {
  const obj = object(value, 'layout');
  const kind = obj['kind'];
  switch (kind) {
    case 'linear':
    case 'striped':
      onlyKeys(obj, ['kind'], 'layout');
      return { kind };
    case 'keyed': {
      onlyKeys(obj, ['kind', 'salt', 'kdf', 'keyCheck'], 'layout');
      const kdf = object(obj['kdf'], 'layout.kdf');
      onlyKeys(kdf, ['N', 'r', 'p'], 'layout.kdf');
      const params = scryptFields(kdf, 'layout.kdf');
      return {
        kind,
        salt: string(obj, 'salt', 'layout', HEX(16), 'must be 32 hex digits'),
        kdf: params,
        keyCheck: string(obj, 'keyCheck', 'layout', HEX(32), 'must be 64 hex digits'),
      };
    }
    case 'module':
      return moduleLayout(obj);
    default:
      return bad(`layout.kind must be one of ${LAYOUT_KINDS.join(', ')}, got ${JSON.stringify(kind)}`);
  }
}

function parseSealedLayout(value: unknown): SealedLayoutSpec {
  const obj = object(value, 'layout');
  const kind = obj['kind'];
  switch (kind) {
    case 'keyed':
      for (const key of ['salt', 'kdf', 'keyCheck']) {
        if (key in obj) bad(`layout.${key} does not belong to a sealed volume: its keyed placement takes its key from the volume key`);
      }
      onlyKeys(obj, ['kind'], 'layout');
      return { kind };
    case 'linear':
    case 'striped':
      onlyKeys(obj, ['kind'], 'layout');
      return { kind };
    case 'module': {
      const spec = moduleLayout(obj);
      try {
        canonicalJson(spec.params, 'layout.params'); // the wrap binds it: it must have one canonical text
      } catch (err) {
        bad((err as Error).message);
      }
      return spec;
    }
    default:
      return bad(`layout.kind must be one of ${LAYOUT_KINDS.join(', ')}, got ${JSON.stringify(kind)}`);
  }
}

function parseJsonObject(text: string): Json {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    bad(`not valid JSON (${(err as Error).message})`);
  }
  return object(raw, 'manifest');
}

interface CommonFields {
  name: string;
  deviceSize: number;
  chunkSize: number;
  files: BackingFile[];
}

/** Name, sizes and files: the same rules for every format. */
function commonFields(obj: Json): CommonFields {
  const name = string(obj, 'name', 'manifest', NAME_RE, 'must be 1-64 characters of A-Z a-z 0-9 _ . - not starting with . or -');
  const chunkSize = integer(obj, 'chunkSize', 'manifest', MIN_CHUNK_SIZE, MAX_CHUNK_SIZE);
  if (!isPowerOfTwo(chunkSize)) bad(`chunkSize must be a power of two, got ${chunkSize}`);
  const deviceSize = integer(obj, 'deviceSize', 'manifest', chunkSize, MAX_DEVICE_SIZE);
  if (deviceSize % chunkSize !== 0) bad(`deviceSize ${deviceSize} is not a multiple of chunkSize ${chunkSize}`);
  const tooMany = chunkCountProblem(deviceSize / chunkSize);
  if (tooMany !== undefined) bad(`deviceSize ${deviceSize} in chunks of ${chunkSize} makes ${tooMany}`);

  const filesRaw = obj['files'];
  if (!Array.isArray(filesRaw) || filesRaw.length === 0) bad('files must be a non-empty array');
  if (filesRaw.length > MAX_FILES) bad(`at most ${MAX_FILES} files, got ${filesRaw.length}`);
  const seen = new Set<string>();
  const files = filesRaw.map((entry: unknown, i: number): BackingFile => {
    const where = `files[${i}]`;
    const file = object(entry, where);
    onlyKeys(file, ['path', 'size'], where);
    const path = string(file, 'path', where, NAME_RE, 'must be a plain file name in the volume directory (no "/", no "..", no leading ".")');
    if (path === MANIFEST_NAME) bad(`${where}.path must not be the manifest itself`);
    if (path.startsWith(RESERVED_PREFIX)) bad(`${where}.path '${path}' is reserved: names starting with '${RESERVED_PREFIX}' belong to the tool`);
    if (seen.has(path)) bad(`${where}.path '${path}' is listed twice`);
    seen.add(path);
    return { path, size: integer(file, 'size', where, 0, MAX_DEVICE_SIZE) };
  });
  return { name, deviceSize, chunkSize, files };
}

const PLAIN_KEYS = ['format', 'name', 'deviceSize', 'chunkSize', 'files', 'layout'] as const;

function plainManifest(obj: Json): Manifest {
  if ('sealed' in obj) bad(`format ${MANIFEST_FORMAT} with a sealed object: wrong key or manifest edited (a sealed volume is format ${SEALED_MANIFEST_FORMAT})`);
  onlyKeys(obj, PLAIN_KEYS, 'manifest');
  const { name, deviceSize, chunkSize, files } = commonFields(obj);
  const total = files.reduce((sum, f) => sum + f.size, 0);
  if (total < deviceSize) bad(`the files hold ${total} bytes in all, less than deviceSize ${deviceSize}`);
  const slots = files.reduce((sum, f) => sum + Math.floor(f.size / chunkSize), 0);
  const tooManySlots = chunkCountProblem(slots);
  if (tooManySlots !== undefined) bad(`the files hold ${slots} chunk slots of ${chunkSize} bytes, more than the ${MAX_CHUNKS} allowed`);
  return { format: MANIFEST_FORMAT, name, deviceSize, chunkSize, files, layout: parseLayout(obj['layout']) };
}

function sealedSpec(value: unknown): SealedSpec {
  const sealed = object(value, 'sealed');
  onlyKeys(sealed, ['uuid', 'kdf', 'wrappedKey', 'spareSlots', 'keyGeneration'], 'sealed');
  const uuid = string(sealed, 'uuid', 'sealed', HEX(16), 'must be 32 lowercase hex digits');
  const kdfObj = object(sealed['kdf'], 'sealed.kdf');
  onlyKeys(kdfObj, ['N', 'r', 'p', 'salt'], 'sealed.kdf');
  const kdf = { ...scryptFields(kdfObj, 'sealed.kdf'), salt: string(kdfObj, 'salt', 'sealed.kdf', HEX(16), 'must be 32 lowercase hex digits') };
  return {
    uuid,
    kdf,
    wrappedKey: string(sealed, 'wrappedKey', 'sealed', HEX(60), 'must be 120 lowercase hex digits (nonce, tag, wrapped key)'),
    spareSlots: integer(sealed, 'spareSlots', 'sealed', 1, MAX_CHUNKS),
    keyGeneration: integer(sealed, 'keyGeneration', 'sealed', 0, 2 ** 32 - 1),
  };
}

/** Slots of a sealed volume's chunk size (chunk + nonce + tag) that its files hold. */
export function sealedSlotCount(chunkSize: number, files: readonly BackingFile[]): number {
  const size = slotSize(chunkSize);
  return files.reduce((sum, f) => sum + Math.floor(f.size / size), 0);
}

function sealedManifest(obj: Json): SealedManifest {
  onlyKeys(obj, [...PLAIN_KEYS, 'sealed'], 'manifest');
  const { name, deviceSize, chunkSize, files } = commonFields(obj);
  if (!('sealed' in obj)) bad('a format 2 manifest needs its sealed object (a sealed volume without its wrapped key cannot be opened)');
  const sealed = sealedSpec(obj['sealed']);
  const slots = sealedSlotCount(chunkSize, files);
  const tooManySlots = chunkCountProblem(slots);
  if (tooManySlots !== undefined) bad(`the files hold ${slots} slots of ${slotSize(chunkSize)} bytes, more than the ${MAX_CHUNKS} allowed`);
  const chunks = deviceSize / chunkSize;
  if (slots < chunks + sealed.spareSlots) {
    bad(`the files hold ${slots} slots of ${slotSize(chunkSize)} bytes (chunk and 28 bytes of nonce and tag), fewer than the ${chunks} chunks plus ${sealed.spareSlots} spare slots`);
  }
  return { format: SEALED_MANIFEST_FORMAT, name, deviceSize, chunkSize, files, layout: parseSealedLayout(obj['layout']), sealed };
}

/**
 * Parses and checks a plain (format 1) manifest: what init, start, flush, export and import handle
 * today. A sealed (format 2) manifest is refused, so no plain code path ever writes plaintext into
 * a sealed volume's files. Every rule broken is reported with the value that broke it.
 */
export function parseManifest(text: string): Manifest {
  const obj = parseJsonObject(text);
  if (obj['format'] === SEALED_MANIFEST_FORMAT) bad(`format must be ${MANIFEST_FORMAT}, got ${SEALED_MANIFEST_FORMAT} (format ${SEALED_MANIFEST_FORMAT} is a sealed volume, which this command does not open yet)`);
  if (obj['format'] !== MANIFEST_FORMAT) bad(`format must be ${MANIFEST_FORMAT}, got ${JSON.stringify(obj['format'])}`);
  return plainManifest(obj);
}

/** Parses either format strictly: a plain manifest (1) or a sealed one (2). */
export function parseAnyManifest(text: string): AnyManifest {
  const obj = parseJsonObject(text);
  switch (obj['format']) {
    case MANIFEST_FORMAT:
      return plainManifest(obj);
    case SEALED_MANIFEST_FORMAT:
      return sealedManifest(obj);
    default:
      return bad(`format must be ${MANIFEST_FORMAT} (plain) or ${SEALED_MANIFEST_FORMAT} (sealed), got ${JSON.stringify(obj['format'])}`);
  }
}

export function serializeManifest(manifest: AnyManifest): string {
  return `${JSON.stringify(manifest, null, 2)}\n`;
}
