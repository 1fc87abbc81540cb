// Root's record of each sealed volume's epochs, on this machine: /var/lib/vbd-shadow/UID/UUID.json
// (root's; 0644 — epoch numbers are no secret, and offline commands may read them).
//
// The files alone cannot tell an old state from the current one: a copy of every file taken
// earlier decodes, authenticated, to an older epoch. Root remembers the last epoch it committed
// and refuses files that decode to an earlier one (unless the owner says she moved the volume
// or restored it on purpose). It also remembers how far epochs and the nonce budget may have
// been used, so a commit after a rollback never seals a slot under an epoch that sealed something
// else before, nor draws random nonces under a slot key as if its earlier seals had not happened:
// `reservedEpoch`, `keyGeneration` and `sealsReserved` cover every reservation the store makes
// (src/store/map.ts, Reservation), each written before the store writes that reservation, and
// each store opened for writing continues past them (SealedStore.resumeFrom).
//
// Records are keyed by the owner's uid and the volume's UUID (authenticated by the key wrap),
// never by a name she picked; the identity of the directory is kept inside, so a sealed volume
// whose manifest was swapped for a plain one in the same directory is recognised.

import { closeSync, fsyncSync, mkdirSync, openSync, readFileSync, readdirSync, renameSync, unlinkSync, writeSync, constants as fsc, fchmodSync } from 'node:fs';
import { VbdError, errnoCode, failure } from '../common/errors.js';
import { identityKey, type VolumeIdentity } from '../volume/volume.js';
import type { SealFloor, SealedState } from '../store/chunk-store.js';
import type { Reservation } from '../store/map.js';
import { checkRootOwnedPath } from './runtime.js';

export const STATE_DIR = '/var/lib/vbd-shadow';
/**
 * How far the recorded reservation runs ahead of the store's. The record is written after every
 * commit (a commit takes one or two epochs), so a small lead suffices; each start skips at most
 * this many epochs.
 */
const RESERVE_AHEAD = 16;
/** Renewed once fewer epochs than this are left in the recorded reservation. */
const RESERVE_LOW = 4;
/**
 * The recorded seal count runs ahead of the store's by this part of the re-key point (2^20 of the
 * real 2^32 − 2^28; 0 for the tiny points tests set), so it is rewritten about once per that many
 * seals, not before every commit; each start may skip at most that many seals.
 */
const SEALS_AHEAD_SHARE = 4096;

export interface EpochRecord {
  uuid: string;
  /** The last epoch a commit of this volume made durable here. */
  committedEpoch: number;
  /** Epochs up to this may have been used by a commit (the store's epoch floor at the next open). */
  reservedEpoch: number;
  /**
   * No slot key generation above this one has sealed a slot of this volume here, and under it at
   * most `sealsReserved` slots were sealed (the store's SealFloor at the next open). Both missing:
   * a record written before they were kept, read as unknown.
   */
  keyGeneration?: number;
  sealsReserved?: number;
  /** identityKey() of the directory it was served from and that directory's birth time (ns): a new directory on a reused inode is another one. The path is for messages. */
  identity: string;
  bornNs: string;
  dir: string;
  at: string;
}

function ownerDir(uid: number): string {
  return `${STATE_DIR}/${uid}`;
}

export function epochRecordPath(uid: number, uuid: string): string {
  if (!/^[0-9a-f]{32}$/.test(uuid)) throw new VbdError(`internal: '${uuid}' is not a volume UUID`);
  return `${ownerDir(uid)}/${uuid}.json`;
}

function parseRecord(text: string, path: string): EpochRecord {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (err) {
    throw failure(`root's epoch record ${path} is not valid JSON (damaged?); remove it to start anew`, err);
  }
  const r = v as Partial<Record<keyof EpochRecord, unknown>>;
  const count = (x: unknown): x is number => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;
  // The seal fields came later: both absent is an older record; one without the other is damage.
  const seals = r.keyGeneration === undefined && r.sealsReserved === undefined ? undefined
    : count(r.keyGeneration) && count(r.sealsReserved) ? { keyGeneration: r.keyGeneration, sealsReserved: r.sealsReserved } : null;
  if (typeof v !== 'object' || v === null || typeof r.uuid !== 'string' || !count(r.committedEpoch) || !count(r.reservedEpoch) || seals === null ||
    typeof r.identity !== 'string' || typeof r.bornNs !== 'string' || typeof r.dir !== 'string' || typeof r.at !== 'string') {
    throw new VbdError(`root's epoch record ${path} is damaged (a field is missing or of the wrong type); remove it to start anew`);
  }
  return { uuid: r.uuid, committedEpoch: r.committedEpoch, reservedEpoch: r.reservedEpoch, ...seals, identity: r.identity, bornNs: r.bornNs, dir: r.dir, at: r.at };
}

/** A record's SealFloor for the store: undefined without a record, 'unknown' for one written before seal counts were kept. */
export function sealFloorOf(record: EpochRecord | undefined): SealFloor | undefined {
  if (record === undefined) return undefined;
  if (record.keyGeneration === undefined || record.sealsReserved === undefined) return 'unknown';
  return { generation: record.keyGeneration, seals: record.sealsReserved };
}

export function readEpochRecord(uid: number, uuid: string): EpochRecord | undefined {
  return readEpochRecordAt(epochRecordPath(uid, uuid));
}

/** The record in the file at `path` (root's state directory; tests read one of their own), undefined if there is none. */
export function readEpochRecordAt(path: string): EpochRecord | undefined {
  try {
    const fd = openSync(path, fsc.O_RDONLY | fsc.O_NOFOLLOW);
    try {
      return parseRecord(readFileSync(fd, 'utf8'), path);
    } finally {
      closeSync(fd);
    }
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return undefined;
    throw err instanceof VbdError ? err : failure(`cannot read root's epoch record ${path}`, err);
  }
}

/** The records of sealed volumes served from this very directory, whatever their UUID. */
export function recordsOfDirectory(uid: number, identity: VolumeIdentity): EpochRecord[] {
  let names: string[];
  try {
    names = readdirSync(ownerDir(uid));
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return [];
    throw failure(`cannot list ${ownerDir(uid)}`, err);
  }
  const records: EpochRecord[] = [];
  for (const name of names.filter((n) => /^[0-9a-f]{32}\.json$/.test(n))) {
    let record: EpochRecord | undefined;
    try {
      record = readEpochRecord(uid, name.slice(0, 32));
    } catch {
      continue; // another volume's damaged record is that volume's problem, met when it starts
    }
    if (record !== undefined && record.identity === identityKey(identity) && record.bornNs === String(identity.bornNs)) records.push(record);
  }
  return records;
}

/** Removes the record of a volume (its directory now holds a plain volume, accepted by the owner). */
export function forgetEpochRecord(uid: number, uuid: string): void {
  try {
    unlinkSync(epochRecordPath(uid, uuid));
  } catch (err) {
    if (errnoCode(err) !== 'ENOENT') throw failure(`cannot remove root's epoch record ${epochRecordPath(uid, uuid)}`, err);
  }
}

/** Writes a record durably: a new file, fsync, rename over the old one, fsync of the directory. */
export function writeEpochRecord(uid: number, record: EpochRecord): void {
  const dir = ownerDir(uid);
  const path = epochRecordPath(uid, record.uuid);
  try {
    mkdirSync(STATE_DIR, { recursive: true, mode: 0o755 });
    mkdirSync(dir, { mode: 0o755 });
  } catch (err) {
    if (errnoCode(err) !== 'EEXIST') throw failure(`cannot create ${dir}`, err);
  }
  checkRootOwnedPath(dir);
  const temp = `${path}.new`;
  let fd: number;
  try {
    fd = openSync(temp, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_TRUNC | fsc.O_NOFOLLOW, 0o644);
  } catch (err) {
    throw failure(`cannot write root's epoch record ${temp}`, err);
  }
  try {
    fchmodSync(fd, 0o644);
    writeSync(fd, `${JSON.stringify(record, null, 2)}\n`);
    fsyncSync(fd);
  } catch (err) {
    throw failure(`cannot write root's epoch record ${temp}`, err);
  } finally {
    closeSync(fd);
  }
  try {
    renameSync(temp, path);
    const dirFd = openSync(dir, fsc.O_RDONLY | fsc.O_DIRECTORY);
    try {
      fsyncSync(dirFd);
    } finally {
      closeSync(dirFd);
    }
  } catch (err) {
    throw failure(`cannot put root's epoch record in place at ${path}`, err);
  }
}

/** Files that decode to an epoch before the last one committed here were put back from an older copy. */
export function isRolledBack(record: EpochRecord, filesEpoch: number): boolean {
  return filesEpoch < record.committedEpoch;
}

/** What the files decode to against root's record: fine, or rolled back (refused unless accepted). */
export function rollbackRefusal(name: string, record: EpochRecord | undefined, filesEpoch: number): string | undefined {
  if (record === undefined || !isRolledBack(record, filesEpoch)) return undefined;
  return `volume '${name}': its files decode to epoch ${filesEpoch}, but epoch ${record.committedEpoch} was committed here (${record.at}, from ${record.dir}): ` +
    `the files were put back from an older copy (rolled back); nothing was exposed or written. If that is what you meant (restored on purpose, or the volume came from another machine), start it with --accept-rollback`;
}

/** What the record must cover: epochs up to `epoch`, and `seals` seals under key generation `generation`. */
interface Need {
  epoch: number;
  generation: number;
  seals: number;
}

function coversSeals(record: EpochRecord, need: Need): boolean {
  const g = record.keyGeneration;
  const s = record.sealsReserved;
  return g !== undefined && s !== undefined && (g > need.generation || (g === need.generation && s >= need.seals));
}

/**
 * Keeps root's record in step with one sealed store while it is served: written when the keeper
 * is made (the store just opened, its budget already continued past the record), before each
 * reservation of the store that the record does not cover (`cover`, the store's beforeReserve),
 * and after each durable commit. So the record covers every epoch and seal before the store can
 * use it, also after failed attempts and crashes.
 */
export class EpochKeeper {
  #record: EpochRecord;

  constructor(
    private readonly uid: number,
    base: Omit<EpochRecord, 'committedEpoch' | 'reservedEpoch' | 'keyGeneration' | 'sealsReserved' | 'at'>,
    previous: EpochRecord | undefined,
    private readonly store: { readonly epoch: number; readonly reservedEpoch: number; sealedState(): SealedState },
  ) {
    // A first record starts at 0: the store's own epochs and seals are taken just below.
    this.#record = {
      ...base, committedEpoch: previous?.committedEpoch ?? 0, reservedEpoch: previous?.reservedEpoch ?? 0,
      keyGeneration: previous?.keyGeneration, sealsReserved: previous?.sealsReserved, at: previous?.at ?? '',
    };
    this.#write(store.epoch, this.#storeNeed(), true);
  }

  get record(): EpochRecord {
    return this.#record;
  }

  /** After a durable commit: the store's epoch is the committed one. */
  committed(): void {
    this.#write(this.store.epoch, this.#storeNeed(), false);
  }

  /** Before the store writes `r` (its beforeReserve): the record must cover its epochs and seals first. */
  cover(r: Reservation): void {
    this.#write(this.#record.committedEpoch, { epoch: r.epochHigh, generation: r.generation, seals: r.sealsHigh }, false);
  }

  #storeNeed(): Need {
    const s = this.store.sealedState();
    return { epoch: this.store.reservedEpoch, generation: s.keyGeneration, seals: s.seals };
  }

  #write(epoch: number, need: Need, always: boolean): void {
    const old = this.#record;
    const renewEpochs = need.epoch + RESERVE_LOW > old.reservedEpoch;
    const renewSeals = !coversSeals(old, need);
    if (!always && !renewEpochs && !renewSeals && epoch === old.committedEpoch) return;
    // Ahead by a share of the re-key point, never past it: the store seals no more under this generation.
    const rekeyAt = this.store.sealedState().rekeyAt;
    const next: EpochRecord = {
      ...old,
      committedEpoch: epoch,
      reservedEpoch: renewEpochs ? Math.max(old.reservedEpoch, need.epoch) + RESERVE_AHEAD : old.reservedEpoch,
      ...(renewSeals ? { keyGeneration: need.generation, sealsReserved: Math.max(need.seals, Math.min(need.seals + Math.floor(rekeyAt / SEALS_AHEAD_SHARE), rekeyAt)) } : {}),
      at: new Date().toISOString(),
    };
    writeEpochRecord(this.uid, next);
    this.#record = next;
  }
}
