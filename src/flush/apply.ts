// Applying a journal batch to the backing files, and settling whatever batch a crash left.

import { writevSync } from 'node:fs';
import { failure } from '../common/errors.js';
import { syncFilesystem } from '../sys/libc.js';
import { fileName, type Volume } from '../volume/volume.js';
import { readJournal, retireJournal, type Batch, type JournalEntry } from './journal.js';
import type { Report } from '../daemon/events.js';

const IOV_MAX = 1024;

/** Writes the batch's chunks (one writev per run of consecutive file bytes) and makes them durable. */
export async function applyBatch(volume: Volume, batch: Batch): Promise<{ bytes: number; files: number }> {
  const entries = [...batch.entries].sort((a, b) => a.file - b.file || a.offset - b.offset);
  const touched = new Set<number>();
  let bytes = 0;
  let i = 0;
  while (i < entries.length) {
    const first = entries[i] as JournalEntry;
    const run: Buffer[] = [];
    let end = first.offset;
    while (i < entries.length && run.length < IOV_MAX) {
      const e = entries[i] as JournalEntry;
      if (e.file !== first.file || e.offset !== end) break;
      run.push(e.data);
      end += e.data.length;
      i++;
    }
    const length = end - first.offset;
    try {
      let done = writevSync(volume.fds[first.file] ?? -1, run, first.offset);
      // A short writev is rare (it precedes an error); finish it from where it stopped.
      while (done < length) {
        const rest = Buffer.concat(run).subarray(done);
        done += writevSync(volume.fds[first.file] ?? -1, [rest], first.offset + done);
      }
    } catch (err) {
      throw failure(`write of backing file '${fileName(volume, first.file)}' at offset ${first.offset} (${length} bytes)`, err);
    }
    touched.add(first.file);
    bytes += length;
  }
  // All backing files live in one directory, so on one filesystem: one syncfs makes them all
  // durable with a single journal commit, where an fdatasync per file costs one commit each.
  const [any] = touched;
  if (any !== undefined) await syncFilesystem(volume.fds[any] ?? -1, `the backing files' filesystem (after writing ${touched.size} files)`);
  return { bytes, files: touched.size };
}

export type SettleResult = 'empty' | 'discarded' | 'applied';

/**
 * Recovery of an interrupted flush: a committed batch is applied again (idempotent) and the
 * journal retired; an uncommitted one is discarded (the files were never touched by it).
 */
export async function settleJournal(volume: Volume, journalFd: number, report: Report): Promise<SettleResult> {
  const state = readJournal(journalFd, volume);
  switch (state.kind) {
    case 'empty':
      return 'empty';
    case 'uncommitted':
      report({ kind: 'journal-discarded', reason: state.reason });
      retireJournal(journalFd);
      return 'discarded';
    case 'committed': {
      const { bytes } = await applyBatch(volume, state.batch);
      retireJournal(journalFd);
      report({ kind: 'journal-completed', batch: state.batch.seq, chunks: state.batch.entries.length, bytes });
      return 'applied';
    }
  }
}
