// Root's epoch record and the nonce budget, without a daemon (no root needed): a record written
// before it kept the key generation and seal count reads as unknown; a sealed store opened against
// a record ahead of its files (put back from an older copy) continues past it — the same
// generation: its count raised; a later generation, or an unknown one: a fresh generation with
// the manifest re-wrapped — and a read-only open only says what a write would do.
// The daemon's side (the record written, --accept-rollback) is in sealed-serve.test.ts.

import { randomBytes } from 'node:crypto';
import { cpSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readEpochRecordAt, sealFloorOf, type EpochRecord } from '../../src/daemon/epoch-record.js';
import { exportImage } from '../../src/image/offline.js';
import type { ChunkStore, OpenStoreOptions, SealedState } from '../../src/store/chunk-store.js';
import type { SealedStore } from '../../src/store/sealed-store.js';
import { initSealedVolume } from '../../src/volume/init.js';
import { MANIFEST_NAME } from '../../src/volume/manifest.js';
import { sha256 } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { withStore } from '../helpers/volumes.js';

const PASS = Buffer.from('a sealed passphrase');
const C = 4096;
const CHUNKS = 64;
const UUID = '0123456789abcdef0123456789abcdef';

/** A record as an older vbd-shadow wrote it: epochs only. */
const OLD_RECORD = {
  uuid: UUID, committedEpoch: 21, reservedEpoch: 37, identity: '1000/2049.131', bornNs: '1700000000000000000',
  dir: '/home/alice/vault', at: '2026-11-26T07:05:51.759Z',
};

function recordAt(fields: object): EpochRecord | undefined {
  const path = join(tempDir(), `${UUID}.json`);
  writeFileSync(path, `${JSON.stringify(fields, null, 2)}\n`);
  return readEpochRecordAt(path);
}

function keyGenerationOf(dir: string): number {
  return (JSON.parse(readFileSync(join(dir, MANIFEST_NAME), 'utf8')) as { sealed: { keyGeneration: number } }).sealed.keyGeneration;
}

/** A sealed volume of 64 zero chunks (init sealed each once: 64 seals under generation 0, epoch 2), and a copy of its directory. */
async function volumeWithCopy(): Promise<{ dir: string; copy: string; image: Buffer }> {
  const scratch = tempDir();
  const dir = join(scratch, 'vol');
  await initSealedVolume({ dir, deviceSize: CHUNKS * C, fileCount: 3, chunkSize: C, layout: { kind: 'linear' }, passphrase: Buffer.from(PASS), spare: { percent: 100 }, kdf: { N: 1024, r: 8, p: 1 } });
  const copy = join(scratch, 'copy');
  cpSync(dir, copy, { recursive: true });
  return { dir, copy, image: Buffer.alloc(CHUNKS * C) };
}

function sealed(store: ChunkStore): SealedStore {
  if (store.kind !== 'sealed') throw new Error('expected a sealed store');
  return store as SealedStore;
}

/** One commit of `count` random chunks from `first` (under `options`), copied into `image`; the store's state after it and each written chunk's generation. */
async function commitChunks(dir: string, image: Buffer, first: number, count: number, options: Omit<OpenStoreOptions, 'writable' | 'secret'> = {}): Promise<{ state: SealedState; generations: number[] }> {
  const data = randomBytes(count * C);
  const out = await withStore(dir, PASS, true, (store) => {
    const s = sealed(store);
    const w = s.begin(Uint32Array.from({ length: count }, (_, i) => first + i));
    w.write(first, first + count, data);
    w.commit();
    return { state: s.sealedState(), generations: Array.from({ length: count }, (_, i) => s.entry(first + i).generation) };
  }, options);
  data.copy(image, first * C);
  return out;
}

async function exported(dir: string): Promise<string> {
  const out = join(tempDir(), 'out.img');
  await withStore(dir, PASS, false, (store) => exportImage(store, out));
  return sha256(readFileSync(out));
}

describe("root's epoch record", () => {
  it('a record written before it kept the key generation and seal count reads, and its nonce budget is unknown', () => {
    const record = recordAt(OLD_RECORD);
    expect(record).toMatchObject({ committedEpoch: 21, reservedEpoch: 37 });
    expect(record?.keyGeneration).toBeUndefined();
    expect(record?.sealsReserved).toBeUndefined();
    expect(sealFloorOf(record)).toBe('unknown');
    expect(sealFloorOf(undefined)).toBeUndefined();
  });

  it('with both seal fields it gives the store its floor; one without the other is damage', () => {
    expect(sealFloorOf(recordAt({ ...OLD_RECORD, keyGeneration: 3, sealsReserved: 1234 }))).toEqual({ generation: 3, seals: 1234 });
    expect(() => recordAt({ ...OLD_RECORD, keyGeneration: 3 })).toThrow(/is damaged/);
    expect(() => recordAt({ ...OLD_RECORD, keyGeneration: 3, sealsReserved: -1 })).toThrow(/is damaged/);
  });
});

describe('a sealed store opened against a record ahead of its files', () => {
  it('the record knows a later key generation (a re-key after the copy): a write seals under a fresh one above it, the manifest re-wrapped; read-only only says so', async () => {
    const { dir, copy, image } = await volumeWithCopy();
    const old = Buffer.from(image);
    // After the copy: 30 seals (64 + 30 = 94), then 10 more pass the re-key point of 100.
    await commitChunks(dir, image, 0, 30, { rekeyAt: 100 });
    const ahead = await commitChunks(dir, image, 40, 10, { rekeyAt: 100 });
    expect(ahead.state).toMatchObject({ keyGeneration: 1, seals: 10 });
    const floor = { generation: 1, seals: 10 };
    cpSync(copy, dir, { recursive: true, force: true });
    expect(keyGenerationOf(dir)).toBe(0);

    const peek = await withStore(dir, PASS, false, (store) => sealed(store).sealedState(), { sealFloor: floor });
    expect(peek.resumed).toEqual({ files: { generation: 0, used: 64 }, record: { generation: 1, used: 10 }, now: { generation: 2, used: 0 }, how: 'fresh-generation', applied: false });
    expect(peek).toMatchObject({ keyGeneration: 0, seals: 64 });
    expect(keyGenerationOf(dir)).toBe(0);

    const written = await commitChunks(dir, old, 5, 3, { sealFloor: floor });
    expect(written.state).toMatchObject({ keyGeneration: 2, seals: 3 });
    expect(written.state.resumed).toMatchObject({ now: { generation: 2, used: 0 }, how: 'fresh-generation', applied: true });
    expect(written.generations).toEqual([2, 2, 2]);
    expect(keyGenerationOf(dir)).toBe(2);
    expect(await exported(dir)).toBe(sha256(old));
  });

  it('the record knows the same key generation: the count is raised to its high-water, nothing else changes; a record behind the files changes nothing', async () => {
    const { dir, copy, image } = await volumeWithCopy();
    const old = Buffer.from(image);
    expect((await commitChunks(dir, image, 0, 30)).state).toMatchObject({ keyGeneration: 0, seals: 94 });
    cpSync(copy, dir, { recursive: true, force: true });

    const behind = await withStore(dir, PASS, true, (store) => sealed(store).sealedState(), { sealFloor: { generation: 0, seals: 50 } });
    expect(behind).toMatchObject({ keyGeneration: 0, seals: 64 });
    expect(behind.resumed).toBeUndefined();

    const written = await commitChunks(dir, old, 10, 4, { sealFloor: { generation: 0, seals: 94 } });
    expect(written.state.resumed).toEqual({ files: { generation: 0, used: 64 }, record: { generation: 0, used: 94 }, now: { generation: 0, used: 94 }, how: 'count-raised', applied: true });
    expect(written.state).toMatchObject({ keyGeneration: 0, seals: 98 });
    expect(keyGenerationOf(dir)).toBe(0);
    expect(await exported(dir)).toBe(sha256(old));
  });

  it('an older record (no seal counts): a fresh generation above every one the epochs it reserved past the files could have re-keyed to', async () => {
    const { dir, copy, image } = await volumeWithCopy();
    const old = Buffer.from(image);
    await commitChunks(dir, image, 0, 8, { rekeyAt: 70 }); // re-keys: generation 1
    cpSync(copy, dir, { recursive: true, force: true });
    const record = recordAt({ ...OLD_RECORD, committedEpoch: 3, reservedEpoch: 20 });
    // The files are at epoch 2 (init): epochs 3 … 20 may have been reserved since, each re-keying at most once.
    const written = await commitChunks(dir, old, 0, 2, { epochFloor: record?.reservedEpoch, sealFloor: sealFloorOf(record) });
    expect(written.state.resumed).toEqual({ files: { generation: 0, used: 64 }, record: 'unknown', now: { generation: 19, used: 0 }, how: 'fresh-generation', applied: true });
    expect(written.state).toMatchObject({ keyGeneration: 19, seals: 2 });
    expect(written.generations).toEqual([19, 19]);
    expect(keyGenerationOf(dir)).toBe(19);
    expect(await exported(dir)).toBe(sha256(old));
  });
});
