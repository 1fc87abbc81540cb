// The manifest: what a volume is (name, sizes, backing files, layout). Parsed strictly,
// because the root daemon reads it from a directory the user controls: every field is
// checked for type and range, unknown fields are refused, names come from a safe set.

import { VbdError } from '../common/errors.js';
import { isPowerOfTwo } from '../common/size.js';

export const MANIFEST_NAME = 'vbd-shadow.json';
export const MANIFEST_FORMAT = 1;

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

/** Volume and backing-file names: no slash, no leading dot, so never `..` nor a path. */
const NAME_RE = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$/;

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

export function isValidName(name: string): boolean {
  return NAME_RE.test(name);
}

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
      const N = integer(kdf, 'N', 'layout.kdf', 1024, 2 ** 20);
      if (!isPowerOfTwo(N)) bad(`layout.kdf.N must be a power of two, got ${N}`);
      const params = { N, r: integer(kdf, 'r', 'layout.kdf', 1, 32), p: integer(kdf, 'p', 'layout.kdf', 1, 16) };
      const costly = scryptCostProblem(params);
      if (costly !== undefined) bad(`layout.kdf ${costly}`);
      return {
        kind,
        salt: string(obj, 'salt', 'layout', HEX(16), 'must be 32 hex digits'),
        kdf: params,
        keyCheck: string(obj, 'keyCheck', 'layout', HEX(32), 'must be 64 hex digits'),
      };
    }
    case 'module': {
      onlyKeys(obj, ['kind', 'path', 'params', 'fingerprint'], 'layout');
      const path = string(obj, 'path', 'layout', /^\/[^\0-\x1f\x7f]{0,4095}$/, 'must be an absolute path to a JS module (no control characters)');
      return {
        kind,
        path,
        params: object(obj['params'] ?? {}, 'layout.params'),
        fingerprint: string(obj, 'fingerprint', 'layout', HEX(32), 'must be 64 hex digits'),
      };
    }
    default:
      return bad(`layout.kind must be one of ${LAYOUT_KINDS.join(', ')}, got ${JSON.stringify(kind)}`);
  }
}

/** Parses and checks manifest text. Every rule broken is reported with the value that broke it. */
export function parseManifest(text: string): Manifest {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    bad(`not valid JSON (${(err as Error).message})`);
  }
  const obj = object(raw, 'manifest');
  onlyKeys(obj, ['format', 'name', 'deviceSize', 'chunkSize', 'files', 'layout'], 'manifest');
  if (obj['format'] !== MANIFEST_FORMAT) bad(`format must be ${MANIFEST_FORMAT}, got ${JSON.stringify(obj['format'])}`);
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
  const total = files.reduce((sum, f) => sum + f.size, 0);
  if (total < deviceSize) bad(`the files hold ${total} bytes in all, less than deviceSize ${deviceSize}`);
  const slots = files.reduce((sum, f) => sum + Math.floor(f.size / chunkSize), 0);
  const tooManySlots = chunkCountProblem(slots);
  if (tooManySlots !== undefined) bad(`the files hold ${slots} chunk slots of ${chunkSize} bytes, more than the ${MAX_CHUNKS} allowed`);

  return { format: MANIFEST_FORMAT, name, deviceSize, chunkSize, files, layout: parseLayout(obj['layout']) };
}

export function serializeManifest(manifest: Manifest): string {
  return `${JSON.stringify(manifest, null, 2)}\n`;
}
