// Re-keying a sealed volume when its slot key's nonce budget is spent, through the library on real
// files: the re-key point is lowered (the open option the daemon takes from VBD_SHADOW_REKEY_AT)
// so that a few small commits reach it.

import { randomBytes } from 'node:crypto';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { exportImage } from '../../src/image/offline.js';
import { openChunkStore, type ChunkStore, type CommitReport } from '../../src/store/chunk-store.js';
import { changePassphrase } from '../../src/store/sealed-manifest.js';
import type { SealedStore } from '../../src/store/sealed-store.js';
import { backingFileNames, initSealedVolume } from '../../src/volume/init.js';
import { MANIFEST_NAME, parseAnyManifest, type SealedManifest } from '../../src/volume/manifest.js';
import { closeVolume, isSealedVolume, openVolume, writeManifest } from '../../src/volume/volume.js';
import { sha256 } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';

const PASS = Buffer.from('a sealed passphrase');
const FAST_KDF = { N: 1024, r: 8, p: 1 };
const C = 4096;
const CHUNKS = 64;

function manifestOf(dir: string): SealedManifest {
  const m = parseAnyManifest(readFileSync(join(dir, MANIFEST_NAME), 'utf8'));
  if (m.format !== 2) throw new Error('expected a sealed manifest');
  return m;
}

/** Opens the store with the re-key point at `rekeyAt`, runs `work`, closes. */
async function withRekeyStore<T>(dir: string, rekeyAt: number | undefined, writable: boolean, work: (store: SealedStore) => T): Promise<T> {
  const volume = openVolume(dir, { writable });
  try {
    const store: ChunkStore = await openChunkStore(volume, { writable, secret: Buffer.from(PASS), rekeyAt });
    try {
      if (store.kind !== 'sealed') throw new Error('expected a sealed store');
      return await work(store as SealedStore);
    } finally {
      store.close();
    }
  } finally {
    closeVolume(volume);
  }
}

/** Writes `data` over chunks [first, first + data.length / C) in one commit. */
function writeChunks(store: SealedStore, first: number, data: Buffer): CommitReport {
  const end = first + data.length / C;
  const w = store.begin(Uint32Array.from({ length: end - first }, (_, i) => first + i));
  w.write(first, end, data);
  return w.commit();
}

async function exported(dir: string): Promise<Buffer> {
  const out = join(dir, '..', 'out.img');
  await withRekeyStore(dir, undefined, false, (store) => exportImage(store, out));
  return readFileSync(out);
}

async function newVolume(): Promise<{ dir: string; image: Buffer }> {
  const dir = join(tempDir(), 'vol');
  await initSealedVolume({ dir, deviceSize: CHUNKS * C, fileCount: 3, chunkSize: C, layout: { kind: 'keyed' }, passphrase: Buffer.from(PASS), spare: { percent: 100 }, kdf: FAST_KDF });
  return { dir, image: Buffer.alloc(CHUNKS * C) };
}

describe('sealed re-key', () => {
  it('a commit that would pass the re-key point moves to the next key generation: manifest re-wrapped, same passphrase, old slots still open, counts start over', async () => {
    const { dir, image } = await newVolume();
    const before = manifestOf(dir);
    const owner = statSync(join(dir, MANIFEST_NAME)).uid;
    // init sealed the 64 chunks under generation 0: 64 seals; the re-key point is 100.
    const first = randomBytes(30 * C);
    const r1 = await withRekeyStore(dir, 100, true, (store) => writeChunks(store, 0, first));
    first.copy(image, 0);
    expect(r1).toMatchObject({ kind: 'sealed', keyGeneration: 0 });
    expect(r1.kind === 'sealed' && r1.rekeyedFrom).toBe(undefined);
    expect(manifestOf(dir).sealed.keyGeneration).toBe(0);

    // 94 + 10 > 100: this commit re-keys first.
    const second = randomBytes(10 * C);
    const { report, state, generations } = await withRekeyStore(dir, 100, true, (store) => ({
      report: writeChunks(store, 40, second),
      state: store.sealedState(),
      generations: Array.from({ length: CHUNKS }, (_, c) => store.entry(c).generation),
    }));
    second.copy(image, 40 * C);
    expect(report).toMatchObject({ kind: 'sealed', keyGeneration: 1, rekeyedFrom: 0, chunks: 10 });
    expect(state).toMatchObject({ keyGeneration: 1, seals: 10, rekeyAt: 100 });
    // Only the rewritten chunks moved to the new key; the rest stay sealed under generation 0.
    expect(generations.filter((g) => g === 1)).toHaveLength(10);
    expect(generations.slice(40, 50).every((g) => g === 1)).toBe(true);

    const after = manifestOf(dir);
    expect(after.sealed.keyGeneration).toBe(1);
    expect(after.sealed.wrappedKey).not.toBe(before.sealed.wrappedKey);
    expect(after.sealed.kdf).toEqual(before.sealed.kdf);
    expect(statSync(join(dir, MANIFEST_NAME)).uid).toBe(owner);
    // Both generations decode, with the same passphrase, on a fresh open with the default re-key point.
    expect(sha256(await exported(dir))).toBe(sha256(image));
  });

  it('a crash after the re-keyed manifest but before the commit: the files keep the old epoch, the reopened volume seals under the new generation', async () => {
    const { dir, image } = await newVolume();
    const epoch = await withRekeyStore(dir, 70, true, (store) => {
      const e = store.epoch;
      // begin() re-keys (64 + 10 > 70) and reserves; the write is never committed: a kill -9 here.
      const w = store.begin(Uint32Array.from({ length: 10 }, (_, i) => i));
      w.write(0, 10, randomBytes(10 * C));
      return e;
    });
    expect(manifestOf(dir).sealed.keyGeneration).toBe(1);
    const reopened = await withRekeyStore(dir, 70, true, (store) => ({ epoch: store.epoch, state: store.sealedState() }));
    expect(reopened.epoch).toBe(epoch);
    // The uncommitted attempt's 10 seals count (its reservation said so).
    expect(reopened.state).toMatchObject({ keyGeneration: 1, seals: 10 });
    expect(sha256(await exported(dir))).toBe(sha256(image));
    const data = randomBytes(5 * C);
    const r = await withRekeyStore(dir, 70, true, (store) => writeChunks(store, 3, data));
    data.copy(image, 3 * C);
    expect(r).toMatchObject({ kind: 'sealed', keyGeneration: 1 });
    expect(sha256(await exported(dir))).toBe(sha256(image));
  });

  it('a manifest put back to the generation before the re-key is refused: the map seals under a later one', async () => {
    const { dir } = await newVolume();
    const old = readFileSync(join(dir, MANIFEST_NAME));
    await withRekeyStore(dir, 70, true, (store) => writeChunks(store, 0, randomBytes(10 * C)));
    writeFileSync(join(dir, MANIFEST_NAME), old);
    await expect(withRekeyStore(dir, undefined, false, () => 0)).rejects.toThrow(/the position map seals under key generation 1, the manifest says 0/);
  });

  it('a manifest changed while the volume is open (a passphrase change) is not overwritten by the re-key: the write is refused, nothing written', async () => {
    const { dir, image } = await newVolume();
    const files = (): string[] => backingFileNames(3).map((name) => sha256(readFileSync(join(dir, name))));
    const volume = openVolume(dir, { writable: true });
    try {
      const store = await openChunkStore(volume, { writable: true, secret: Buffer.from(PASS), rekeyAt: 70 });
      try {
        // What `vbd-shadow passwd` does from another process while this store is open.
        if (!isSealedVolume(volume)) throw new Error('expected a sealed volume');
        const other = openVolume(dir, { writable: true });
        try {
          if (!isSealedVolume(other)) throw new Error('expected a sealed volume');
          writeManifest(other.dirFd, other.dir, changePassphrase(PASS, Buffer.from('a new passphrase'), other.manifest, FAST_KDF));
        } finally {
          closeVolume(other);
        }
        const changed = readFileSync(join(dir, MANIFEST_NAME), 'utf8');
        const filesBefore = files();
        expect(() => store.begin(Uint32Array.of(1, 2, 3, 4, 5, 6, 7))).toThrow(/due for a re-key, but the manifest changed since the volume was opened/);
        expect(readFileSync(join(dir, MANIFEST_NAME), 'utf8')).toBe(changed);
        expect(files()).toEqual(filesBefore);
      } finally {
        store.close();
      }
    } finally {
      closeVolume(volume);
    }
    const out = join(dir, '..', 'out.img');
    const volume2 = openVolume(dir);
    try {
      const store = await openChunkStore(volume2, { writable: false, secret: Buffer.from('a new passphrase') });
      try {
        await exportImage(store, out);
      } finally {
        store.close();
      }
    } finally {
      closeVolume(volume2);
    }
    expect(sha256(readFileSync(out))).toBe(sha256(image));
  });
});
