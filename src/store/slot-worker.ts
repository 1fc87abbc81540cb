// A worker thread that opens slots straight into the RAM image (populate of a sealed volume):
// for each chunk of a batch it reads the slot from its file, opens it with the chunk's
// (chunk, epoch, key generation) and writes the plaintext into the image file at the chunk's
// place (the same page cache the daemon's mapping shows). A slot that fails authentication
// writes zeros there and is reported; nothing unverified reaches the image.

import { readSync, writeSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import type { SlotKey } from './keys.js';
import { openChunk, SlotAuthError } from './slot.js';
import type { OpenBatch, OpenResult, OpenWorkerData } from './slot-workers.js';

const data = workerData as OpenWorkerData;
const keys = new Map<number, SlotKey>(data.keys.map((k) => [k.generation, { key: Buffer.from(k.key), generation: k.generation, uuid: Buffer.from(data.uuid) }]));
for (const k of data.keys) k.key.fill(0);
const slot = Buffer.alloc(data.slotBytes);
const plain = Buffer.alloc(data.chunkSize);

function readSlot(fd: number, offset: number): void {
  let done = 0;
  while (done < slot.length) {
    const n = readSync(fd, slot, done, slot.length - done, offset + done);
    if (n === 0) throw new Error(`ends before offset ${offset + slot.length} (was it truncated?)`);
    done += n;
  }
}

function writePlain(chunk: number): void {
  const at = chunk * data.chunkSize;
  let done = 0;
  while (done < plain.length) done += writeSync(data.imageFd, plain, done, plain.length - done, at + done);
}

function run(batch: OpenBatch): OpenResult {
  const damaged: number[] = [];
  for (let i = 0; i < batch.chunks.length; i++) {
    const chunk = batch.chunks[i] ?? 0;
    const fd = batch.fds[i] ?? -1;
    const offset = batch.offsets[i] ?? 0;
    try {
      readSlot(fd, offset);
    } catch (err) {
      return { id: batch.id, damaged, error: { chunk, fd, offset, message: err instanceof Error ? err.message : String(err) } };
    }
    const generation = batch.generations[i] ?? 0;
    const key = keys.get(generation);
    if (key === undefined) return { id: batch.id, damaged, error: { chunk, fd, offset, message: `no slot key for generation ${generation}` } };
    try {
      openChunk(key, { chunk, epoch: batch.epochs[i] ?? 0 }, slot, plain);
    } catch (err) {
      if (!(err instanceof SlotAuthError)) throw err;
      plain.fill(0);
      damaged.push(chunk);
    }
    writePlain(chunk);
  }
  plain.fill(0);
  slot.fill(0);
  return { id: batch.id, damaged };
}

parentPort?.on('message', (message: OpenBatch | 'wipe') => {
  if (message === 'wipe') {
    for (const k of keys.values()) k.key.fill(0);
    keys.clear();
    parentPort?.close();
    return;
  }
  parentPort?.postMessage(run(message));
});
