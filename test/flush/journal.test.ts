// The journal on its own: a synced batch is found committed and applied; any batch cut short
// (torn anywhere, or corrupted) is found uncommitted and discarded without touching the files.

import { randomBytes } from 'node:crypto';
import { closeSync, ftruncateSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { settleJournal } from '../../src/flush/apply.js';
import { openJournal, readJournal, writeBatch, type Batch } from '../../src/flush/journal.js';
import { closeVolume, openVolume } from '../../src/volume/volume.js';
import { sha256 } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { makeVolume } from '../helpers/volumes.js';

const CHUNK = 4096;

async function volumeWithBatch(): Promise<{ dir: string; batch: Batch; size: number }> {
  const dir = join(tempDir(), 'vol');
  await makeVolume(dir, 64 * CHUNK, 4, CHUNK, { kind: 'linear' });
  const batch: Batch = {
    seq: 7,
    chunkSize: CHUNK,
    entries: [
      { file: 0, offset: 0, data: randomBytes(CHUNK) },
      { file: 0, offset: CHUNK, data: randomBytes(CHUNK) },
      { file: 3, offset: 5 * CHUNK, data: randomBytes(CHUNK) },
    ],
  };
  const volume = openVolume(dir, { writable: true });
  const fd = openJournal(volume);
  const size = writeBatch(fd, batch);
  closeSync(fd);
  closeVolume(volume);
  return { dir, batch, size };
}

describe('journal', () => {
  it('a synced batch is committed, applied by settle, then retired', async () => {
    const { dir, batch } = await volumeWithBatch();
    const volume = openVolume(dir, { writable: true });
    const fd = openJournal(volume);
    const state = readJournal(fd, volume);
    expect(state.kind).toBe('committed');
    expect(await settleJournal(volume, fd, () => undefined)).toBe('applied');
    expect(readJournal(fd, volume).kind).toBe('empty');
    closeSync(fd);
    closeVolume(volume);
    const file1 = readFileSync(join(dir, 'file001'));
    const file4 = readFileSync(join(dir, 'file004'));
    expect(sha256(file1.subarray(0, 2 * CHUNK))).toBe(sha256(Buffer.concat([batch.entries[0]?.data ?? Buffer.alloc(0), batch.entries[1]?.data ?? Buffer.alloc(0)])));
    expect(file4.subarray(5 * CHUNK, 6 * CHUNK).equals(batch.entries[2]?.data ?? Buffer.alloc(0))).toBe(true);
  });

  it('a batch torn at any length, or with a flipped byte, is discarded and the files untouched', async () => {
    const { dir, size } = await volumeWithBatch();
    const volume = openVolume(dir, { writable: true });
    const fd = openJournal(volume);
    const whole = Buffer.alloc(size);
    const { readSync } = await import('node:fs');
    readSync(fd, whole, 0, size, 0);
    const files = (): string => ['file001', 'file002', 'file003', 'file004'].map((n) => sha256(readFileSync(join(dir, n)))).join();
    const before = files();
    const cuts = [10, 64, 100, 64 + 72, 5000, size - 64, size - 1];
    for (const cut of cuts) {
      ftruncateSync(fd, 0);
      writeSync(fd, whole, 0, cut, 0);
      expect(readJournal(fd, volume).kind, `cut at ${cut}`).not.toBe('committed');
      expect(await settleJournal(volume, fd, () => undefined)).not.toBe('applied');
    }
    for (const flip of [20, 70, 64 + 72 + 100, size - 40]) {
      ftruncateSync(fd, 0);
      const copy = Buffer.from(whole);
      copy[flip] = (copy[flip] ?? 0) ^ 0xff;
      writeSync(fd, copy, 0, size, 0);
      expect(readJournal(fd, volume).kind, `flip at ${flip}`).not.toBe('committed');
    }
    expect(files()).toBe(before);
    closeSync(fd);
    closeVolume(volume);
  });
});
