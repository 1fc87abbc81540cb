// The chunk store a session (or a recovery) serves, opened after the daemon's lock: a sealed
// volume unlocked and checked against root's record of its epoch before anything is written
// (src/daemon/epoch-record.ts), a plain one against the record of a sealed volume that lived in
// the same directory.

import { RefusedError, UsageError, VbdError } from '../common/errors.js';
import { isSealedStore, openChunkStore, type ChunkStore } from '../store/chunk-store.js';
import { identityKey, isSealedVolume, type AnyVolume } from '../volume/volume.js';
import { EpochKeeper, forgetEpochRecord, readEpochRecord, recordsOfDirectory, rollbackRefusal, sealFloorOf } from './epoch-record.js';
import type { DaemonStatus } from './runtime.js';
import type { Report } from './events.js';

/** The chunk store a session moves chunks through, and (sealed) root's record of its epochs. */
export interface ServedStore {
  store: ChunkStore;
  epochs: EpochKeeper | undefined;
}

export interface StoreContext {
  volume: AnyVolume;
  report: Report;
  setStatus: (change: Partial<DaemonStatus>) => void;
}

/**
 * A plain volume in a directory that held a sealed one (its record names this very directory):
 * a manifest stripped of its `sealed` object would make the daemon write plaintext. Refused
 * before anything is written (the plain journal included), unless the owner accepts it; then
 * root forgets the sealed volume (`forget`: root's own run).
 */
export function checkNotStripped(ctx: StoreContext, acceptRollback: boolean, forget: boolean): void {
  const { volume, report } = ctx;
  if (isSealedVolume(volume)) return;
  const { uid } = volume.owner;
  for (const record of recordsOfDirectory(uid, volume.identity)) {
    if (!acceptRollback) {
      throw new RefusedError(`volume '${volume.manifest.name}' has a plain manifest, but this directory held sealed volume ${record.uuid} (epoch ${record.committedEpoch}, ${record.at}): ` +
        `its manifest was replaced, which would make the daemon write plaintext; nothing was exposed or written. If you replaced it on purpose, start it with --accept-rollback`);
    }
    if (forget) forgetEpochRecord(uid, record.uuid);
    report({ kind: 'sealed-record-dropped', uuid: record.uuid, forgotten: forget });
  }
}

/** VBD_SHADOW_REKEY_AT=N moves the re-key point of sealed volumes down to N seals (tests reach it; never up). */
export const REKEY_AT_ENV = 'VBD_SHADOW_REKEY_AT';

function rekeyPointFromEnv(): number | undefined {
  const text = process.env[REKEY_AT_ENV];
  if (text === undefined || text === '') return undefined;
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < 1) throw new UsageError(`${REKEY_AT_ENV}=${text}: must be a positive whole number of seals`);
  return n;
}

/**
 * Opens the volume's chunk store for a session (after the lock: a sealed store may complete an
 * interrupted commit). A sealed volume is checked against root's record of its epoch before
 * anything is written (a plain one was checked by checkNotStripped before its journal opened),
 * and its nonce budget continues past the record's (SealedStore.resumeFrom): an accepted
 * rollback says where seals continue. `keepRecord`: root keeps the epoch record up to date (the
 * daemon; root's recover), covering each reservation before the store writes it; else it is only
 * checked (the owner's recover).
 */
export async function openServedStore(ctx: StoreContext, secret: Buffer | undefined, acceptRollback: boolean, keepRecord = true): Promise<ServedStore> {
  const { volume, report } = ctx;
  const { uid } = volume.owner;
  const name = volume.manifest.name;
  if (!isSealedVolume(volume)) {
    return { store: await openChunkStore(volume, { writable: true, secret }), epochs: undefined };
  }
  const uuid = volume.manifest.sealed.uuid;
  const record = readEpochRecord(uid, uuid);
  let rolledBack: { filesEpoch: number; committedEpoch: number; reservedEpoch: number } | undefined;
  // Set once the store is open: reservations made while it opens (completing a commit) seal nothing.
  let epochs: EpochKeeper | undefined;
  const store = await openChunkStore(volume, {
    writable: true, secret, epochFloor: record?.reservedEpoch, sealFloor: sealFloorOf(record), rekeyAt: rekeyPointFromEnv(),
    acceptEpoch: (epoch) => {
      const refusal = rollbackRefusal(name, record, epoch);
      if (refusal === undefined || record === undefined) return;
      if (!acceptRollback) throw new RefusedError(refusal);
      rolledBack = { filesEpoch: epoch, committedEpoch: record.committedEpoch, reservedEpoch: record.reservedEpoch };
    },
    beforeReserve: keepRecord ? (r) => epochs?.cover(r) : undefined,
  });
  try {
    if (!isSealedStore(store)) throw new VbdError(`internal: sealed volume '${name}' opened as a plain store`);
    const resumed = store.sealedState()?.resumed;
    if (rolledBack !== undefined) report({ kind: 'rollback-accepted', ...rolledBack, budget: resumed });
    else if (resumed !== undefined) report({ kind: 'budget-resumed', budget: resumed });
    for (const notice of store.notices) report({ kind: 'store-notice', notice });
    ctx.setStatus({ notices: [...store.notices] });
    if (!keepRecord) return { store, epochs: undefined };
    epochs = new EpochKeeper(uid, { uuid, identity: identityKey(volume.identity), bornNs: String(volume.identity.bornNs), dir: volume.dir }, record, store);
    return { store, epochs };
  } catch (err) {
    store.close();
    throw err;
  }
}
