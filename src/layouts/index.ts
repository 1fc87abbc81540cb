// The one loader for every layout kind: manifest (+ secret) → validated placement table.

import { createHash } from 'node:crypto';
import { VbdError } from '../common/errors.js';
import { chunkCountProblem, type LayoutSpec, type Manifest, type SealedManifest } from '../volume/manifest.js';
import { slotSize } from '../store/slot.js';
import type { Owner } from '../volume/owner.js';
import { checkPlacementMemory } from './budget.js';
import { createKeyedLayout } from './keyed.js';
import { chunkSlots, placementTable, type Geometry, type Layout, type PlacementTable } from './layout.js';
import { createLinearLayout } from './linear.js';
import { unlockLayoutKey } from './secret.js';
import { createStripedLayout } from './striped.js';
import { userModuleTable } from './user-module.js';
import { validateTable } from './validate.js';

export interface LayoutContext {
  /**
   * Whom the volume belongs to. A module layout always runs in a confined child process: as
   * this owner when we are root, as ourselves otherwise — never in this process.
   */
  owner: Owner;
  /** The user's secret, for a keyed layout. The caller owns (and wipes) it. */
  secret?: Buffer | undefined;
}

export function geometryOf(manifest: Manifest): Geometry {
  return {
    deviceSize: manifest.deviceSize,
    chunkSize: manifest.chunkSize,
    chunkCount: manifest.deviceSize / manifest.chunkSize,
    fileSizes: manifest.files.map((f) => f.size),
  };
}

/** sha256 of the table: lets a volume notice that its module now places chunks differently. */
export function tableFingerprint(table: PlacementTable): string {
  return createHash('sha256')
    .update(new Uint8Array(table.file.buffer, table.file.byteOffset, table.file.byteLength))
    .update(new Uint8Array(table.offset.buffer, table.offset.byteOffset, table.offset.byteLength))
    .digest('hex');
}

/** Built-in layouts need whole chunks in every file. */
function requireWholeChunks(manifest: Manifest): void {
  for (const f of manifest.files) {
    if (f.size % manifest.chunkSize !== 0) {
      throw new VbdError(`layout ${manifest.layout.kind} needs file sizes that are multiples of the chunk size ${manifest.chunkSize}; '${f.path}' is ${f.size} bytes`);
    }
  }
}

function keyedLayout(manifest: Manifest, spec: Extract<LayoutSpec, { kind: 'keyed' }>, geometry: Geometry, ctx: LayoutContext): Layout {
  if (ctx.secret === undefined) throw new VbdError(`volume '${manifest.name}' uses a keyed layout: its key is needed (--key-file FILE or a terminal prompt)`);
  const key = unlockLayoutKey(ctx.secret, spec.salt, spec.kdf, spec.keyCheck);
  try {
    return createKeyedLayout(geometry, key);
  } finally {
    key.fill(0);
  }
}

/** Computes the placement of every chunk and checks it is a bijection onto the files. */
export async function computePlacement(manifest: Manifest, ctx: LayoutContext): Promise<PlacementTable> {
  const geometry = geometryOf(manifest);
  const spec = manifest.layout;
  const tooMany = chunkCountProblem(geometry.chunkCount) ?? chunkCountProblem(chunkSlots(geometry).total);
  if (tooMany !== undefined) throw new VbdError(`volume '${manifest.name}' has ${tooMany}; use larger chunks`);
  checkPlacementMemory(manifest.name, spec.kind, geometry.chunkCount, chunkSlots(geometry).total);
  let table: PlacementTable;
  switch (spec.kind) {
    case 'linear':
      requireWholeChunks(manifest);
      table = placementTable(createLinearLayout(geometry), geometry);
      break;
    case 'striped':
      requireWholeChunks(manifest);
      table = placementTable(createStripedLayout(geometry), geometry);
      break;
    case 'keyed':
      requireWholeChunks(manifest);
      table = placementTable(keyedLayout(manifest, spec, geometry, ctx), geometry);
      break;
    case 'module':
      table = await userModuleTable(ctx.owner, spec.path, geometry, spec.params);
      break;
  }
  validateTable(table, geometry, manifest.files.map((f) => f.path));
  return table;
}

/** computePlacement, plus: a module layout must still place chunks as it did at `init`. */
export async function resolvePlacement(manifest: Manifest, ctx: LayoutContext): Promise<PlacementTable> {
  const table = await computePlacement(manifest, ctx);
  const spec = manifest.layout;
  if (spec.kind === 'module' && spec.fingerprint !== tableFingerprint(table)) {
    throw new VbdError(`layout module ${spec.path} now places chunks differently than when volume '${manifest.name}' was created; refusing to read or write`);
  }
  return table;
}

/**
 * A sealed volume's layout places chunks on slots: the same layouts over a geometry whose
 * "chunks" are slots of C + 28 bytes. Only the initial placement comes from it (init); after
 * that, the position map says where each chunk is.
 */
export function slotGeometry(manifest: SealedManifest): Geometry {
  const size = slotSize(manifest.chunkSize);
  const chunkCount = manifest.deviceSize / manifest.chunkSize;
  return { deviceSize: chunkCount * size, chunkSize: size, chunkCount, fileSizes: manifest.files.map((f) => f.size) };
}

export interface SlotPlacementContext {
  owner: Owner;
  /** The placement subkey of the volume key (keys.placementKey), for a keyed layout. */
  placementKey?: Buffer | undefined;
}

/**
 * The initial slot of every chunk of a sealed volume, from its layout (validated: distinct,
 * in-bounds slots). A module layout runs confined, like for a plain volume; its table's
 * fingerprint is returned so init can record it.
 */
export async function computeSlotPlacement(manifest: SealedManifest, ctx: SlotPlacementContext): Promise<{ slotOfChunk: Uint32Array; fingerprint: string }> {
  const geometry = slotGeometry(manifest);
  const slots = chunkSlots(geometry);
  const spec = manifest.layout;
  const tooMany = chunkCountProblem(geometry.chunkCount) ?? chunkCountProblem(slots.total);
  if (tooMany !== undefined) throw new VbdError(`volume '${manifest.name}' has ${tooMany}; use larger chunks`);
  checkPlacementMemory(manifest.name, spec.kind, geometry.chunkCount, slots.total);
  const wholeSlots = (): void => {
    for (const f of manifest.files) {
      if (f.size % geometry.chunkSize !== 0) throw new VbdError(`layout ${spec.kind} of a sealed volume needs file sizes that are multiples of the slot size ${geometry.chunkSize}; '${f.path}' is ${f.size} bytes`);
    }
  };
  let table: PlacementTable;
  switch (spec.kind) {
    case 'linear':
      wholeSlots();
      table = placementTable(createLinearLayout(geometry), geometry);
      break;
    case 'striped':
      wholeSlots();
      table = placementTable(createStripedLayout(geometry), geometry);
      break;
    case 'keyed':
      wholeSlots();
      if (ctx.placementKey === undefined) throw new VbdError('internal: a sealed keyed layout needs the placement key');
      table = placementTable(createKeyedLayout(geometry, ctx.placementKey), geometry);
      break;
    case 'module':
      table = await userModuleTable(ctx.owner, spec.path, geometry, spec.params);
      break;
  }
  validateTable(table, geometry, manifest.files.map((f) => f.path));
  const slotOfChunk = new Uint32Array(geometry.chunkCount);
  for (let c = 0; c < geometry.chunkCount; c++) {
    slotOfChunk[c] = (slots.first[table.file[c] ?? 0] ?? 0) + (table.offset[c] ?? 0) / geometry.chunkSize;
  }
  return { slotOfChunk, fingerprint: tableFingerprint(table) };
}
