// `inspect DIR`: what a volume is, offline, without root and without its key — geometry, layout,
// sealed or not, the backing files (missing, wrong size), a plain volume's journal and last
// flush, a sealed volume's identity; with a sealed volume's passphrase (given, in the default
// key file, or typed — never asked without a terminal) also its epochs, nonce budget, free
// slots and map copy, read through the chunk store. `--json`: one object, always the same keys.

import { closeSync } from 'node:fs';
import { RefusedError, UsageError } from '../common/errors.js';
import { formatSize } from '../common/size.js';
import { readEpochRecord, sealFloorOf, type EpochRecord } from '../daemon/epoch-record.js';
import { liveDaemon } from '../daemon/runtime.js';
import { journalSummary } from '../flush/journal.js';
import { describeResumed, openChunkStore, type BudgetResumed } from '../store/chunk-store.js';
import { slotSize } from '../store/slot.js';
import { SEALED_JOURNAL_NAME, closeVolume, openVolume, openVolumeEntry, sameIdentity, surveyVolume, type VolumeSurvey } from '../volume/volume.js';
import { withSecret } from './key-input.js';

export interface InspectFileProblem {
  path: string;
  state: 'missing' | 'wrong-size' | 'refused';
  /** The size the manifest says, and the size found (wrong-size only; else null). */
  expectedBytes: number;
  actualBytes: number | null;
  reason: string | null;
}

/** What the passphrase opens: read through the chunk store. */
export interface InspectUnlocked {
  committedEpoch: number;
  reservedEpoch: number;
  keyGeneration: number;
  sealsUnderGeneration: number;
  rekeyAt: number;
  freeSlots: number;
  mapCopy: 'A' | 'B';
  mapLogBytes: number;
  notices: string[];
  /** Root's record is ahead of the files' nonce budget: where the next writable open continues (nothing changed yet); else null. */
  budgetAtNextWrite: BudgetResumed | null;
}

export interface InspectSealed {
  uuid: string;
  keyGeneration: number;
  spareSlots: number;
  slotBytes: number;
  /** The overflow journal is there: a commit larger than the free slots was interrupted. */
  overflowJournal: boolean;
  /**
   * Root's record of this volume's epochs and nonce budget on this machine (readable by all), if
   * any: no key generation above `keyGeneration` sealed, at most `sealsReserved` under it (both
   * null: a record from before they were kept).
   */
  epochRecord: { committedEpoch: number; reservedEpoch: number; keyGeneration: number | null; sealsReserved: number | null; at: string } | null;
  /** With the passphrase; else null and `unlockedSkipped` says why. */
  unlocked: InspectUnlocked | null;
  unlockedSkipped: string | null;
}

export interface InspectReport {
  name: string;
  dir: string;
  owner: { uid: number; name: string };
  layout: { kind: string; module: string | null };
  sealed: boolean;
  deviceSize: number;
  chunkSize: number;
  chunkCount: number;
  files: { count: number; totalBytes: number; problems: InspectFileProblem[] };
  unexpectedEntries: string[];
  live: { pid: number; state: string } | null;
  /** Plain volumes: the flush journal; null for a sealed one. */
  journal: { state: 'none' | 'empty' | 'pending' | 'torn'; batch: number | null; chunks: number | null; reason: string | null } | null;
  /** Plain volumes: the last flush through the journal (its batch number in its session), if recorded. */
  lastFlush: { at: string; batch: number | null } | null;
  /** Sealed volumes; null for a plain one. */
  seal: InspectSealed | null;
}

function fileProblems(survey: VolumeSurvey): InspectFileProblem[] {
  const problems: InspectFileProblem[] = [];
  for (const f of survey.files) {
    if (f.state === 'ok') continue;
    problems.push({
      path: f.path, state: f.state, expectedBytes: f.size,
      actualBytes: f.state === 'wrong-size' ? f.actual : null, reason: f.state === 'refused' ? f.reason : null,
    });
  }
  return problems;
}

/** The key-dependent part of a sealed volume, or why it was left out. */
async function unlockedPart(survey: VolumeSurvey, keyFile: string | undefined, live: boolean, record: EpochRecord | undefined): Promise<{ unlocked: InspectUnlocked | null; skipped: string | null }> {
  if (survey.files.some((f) => f.state !== 'ok')) return { unlocked: null, skipped: 'backing files missing or damaged' };
  if (survey.unexpected.length > 0) return { unlocked: null, skipped: `the directory holds '${survey.unexpected[0]}', which the manifest does not list (move it out)` };
  if (live) return { unlocked: null, skipped: 'the volume is live: its RAM image is the truth, the files may be mid-commit' };
  const volume = openVolume(survey.dir);
  try {
    if (!sameIdentity(volume.identity, survey.identity)) throw new RefusedError(`volume directory ${survey.dir} was replaced while being inspected`);
    return await withSecret(volume.manifest, keyFile, async (secret) => {
      if (secret === undefined) return { unlocked: null, skipped: 'no passphrase given (--key-file, the default key file, or a terminal to ask on)' };
      // Read-only: the floors of root's record only say what a write would do.
      const store = await openChunkStore(volume, { writable: false, secret, epochFloor: record?.reservedEpoch, sealFloor: sealFloorOf(record) });
      try {
        const s = store.sealedState();
        if (s === undefined) return { unlocked: null, skipped: 'internal: no sealed state' };
        return {
          unlocked: {
            committedEpoch: s.epoch, reservedEpoch: s.reservedEpoch, keyGeneration: s.keyGeneration, sealsUnderGeneration: s.seals,
            rekeyAt: s.rekeyAt, freeSlots: s.freeSlots, mapCopy: s.mapCopy, mapLogBytes: s.mapLogBytes, notices: [...store.notices],
            budgetAtNextWrite: s.resumed ?? null,
          },
          skipped: null,
        };
      } finally {
        store.close();
      }
    }, { optional: true });
  } finally {
    closeVolume(volume);
  }
}

/** Inspects the volume in `dir` (see the top of this file). */
export async function inspectVolume(dir: string, keyFile: string | undefined): Promise<InspectReport> {
  // The survey is synchronous; the key part (a prompt, scrypt) runs after it, on a fresh open checked to be the same directory.
  let record: EpochRecord | undefined;
  const { report, survey } = surveyVolume(dir, (survey) => {
    const m = survey.manifest;
    const daemon = liveDaemon(survey.identity);
    let journal: InspectReport['journal'] = null;
    let lastFlush: InspectReport['lastFlush'] = null;
    let seal: InspectSealed | null = null;
    if (m.format === 1) {
      const j = journalSummary({ dirFd: survey.dirFd, manifest: m });
      journal = {
        state: j.state, batch: j.state === 'pending' ? j.batch : null, chunks: j.state === 'pending' ? j.chunks : null,
        reason: j.state === 'torn' ? j.reason : null,
      };
      if (j.state === 'empty' && j.lastBatch !== undefined) lastFlush = { at: j.at.toISOString(), batch: j.lastBatch };
    } else {
      const overflow = openVolumeEntry(survey, SEALED_JOURNAL_NAME, 'read');
      if (overflow !== undefined) closeSync(overflow);
      record = readEpochRecord(survey.owner.uid, m.sealed.uuid);
      seal = {
        uuid: m.sealed.uuid, keyGeneration: m.sealed.keyGeneration, spareSlots: m.sealed.spareSlots, slotBytes: slotSize(m.chunkSize),
        overflowJournal: overflow !== undefined,
        epochRecord: record === undefined ? null : {
          committedEpoch: record.committedEpoch, reservedEpoch: record.reservedEpoch,
          keyGeneration: record.keyGeneration ?? null, sealsReserved: record.sealsReserved ?? null, at: record.at,
        },
        unlocked: null, unlockedSkipped: null,
      };
    }
    const r: InspectReport = {
      name: m.name, dir: survey.dir, owner: { uid: survey.owner.uid, name: survey.owner.name },
      layout: { kind: m.layout.kind, module: m.layout.kind === 'module' ? m.layout.path : null },
      sealed: m.format === 2, deviceSize: m.deviceSize, chunkSize: m.chunkSize, chunkCount: m.deviceSize / m.chunkSize,
      files: { count: m.files.length, totalBytes: m.files.reduce((sum, f) => sum + f.size, 0), problems: fileProblems(survey) },
      unexpectedEntries: [...survey.unexpected],
      live: daemon === undefined ? null : { pid: daemon.pid, state: daemon.state },
      journal, lastFlush, seal,
    };
    return { report: r, survey };
  });
  if (keyFile !== undefined && report.seal === null) throw new UsageError(`inspect --key-file: volume '${report.name}' is not sealed; inspect needs no key for it`);
  if (report.seal !== null) {
    const { unlocked, skipped } = await unlockedPart(survey, keyFile, report.live !== null && report.live.state !== 'waiting', record);
    report.seal.unlocked = unlocked;
    report.seal.unlockedSkipped = skipped;
  }
  return report;
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

function describeProblem(p: InspectFileProblem): string {
  if (p.state === 'missing') return `${p.path}: missing (${p.expectedBytes} bytes expected)`;
  if (p.state === 'wrong-size') return `${p.path}: ${p.actualBytes} bytes, the manifest says ${p.expectedBytes}`;
  return `${p.path}: refused: ${p.reason}`;
}

/** The report as lines for a terminal. */
export function formatInspect(r: InspectReport): string[] {
  const lines = [`volume '${r.name}' in ${r.dir} (owner ${r.owner.name}, uid ${r.owner.uid})`];
  const row = (label: string, text: string): void => void lines.push(`  ${label.padEnd(10)} ${text}`);
  row('geometry', `${formatSize(r.deviceSize)}: ${r.chunkCount} chunks of ${formatSize(r.chunkSize)}`);
  row('layout', r.layout.module === null ? r.layout.kind : `module ${r.layout.module}`);
  const bad = r.files.problems.length;
  row('files', `${plural(r.files.count, 'file')}, ${formatSize(r.files.totalBytes)} in all; ${bad === 0 ? 'all present at their sizes' : `${bad} missing or wrong`}`);
  for (const p of r.files.problems) row('', describeProblem(p));
  for (const name of r.unexpectedEntries) row('', `'${name}' is not part of the volume (start and export refuse until it is moved out)`);
  row('live', r.live === null ? 'no (no daemon serves it here)' : `yes: daemon pid ${r.live.pid}, ${r.live.state}`);
  if (r.journal !== null) {
    const j = r.journal;
    const text = j.state === 'none' ? 'none (never flushed by a daemon)'
      : j.state === 'empty' ? 'empty'
        : j.state === 'pending' ? `pending: batch ${j.batch} of ${plural(j.chunks ?? 0, 'chunk')}, complete; the next start or 'recover' applies it`
          : `torn (${j.reason}): an interrupted flush, discarded by the next start or 'recover'`;
    row('journal', text);
    row('last flush', r.lastFlush === null ? 'not recorded' : `${r.lastFlush.at} (batch ${r.lastFlush.batch} of its session)`);
  }
  const s = r.seal;
  row('sealed', s === null ? 'no' : `yes: UUID ${s.uuid}, key generation ${s.keyGeneration}, ${plural(s.spareSlots, 'spare slot')} (slots of ${s.slotBytes} bytes)`);
  if (s !== null) {
    if (s.overflowJournal) row('', `${SEALED_JOURNAL_NAME} is there: a commit larger than the free slots was interrupted (the next import or start completes it)`);
    const r = s.epochRecord;
    row('recorded', r === null ? 'no epoch record of root\'s on this machine' : `root committed epoch ${r.committedEpoch} here (${r.at}); epochs reserved up to ${r.reservedEpoch}; ${
      r.keyGeneration === null ? 'seal counts not recorded (an older record)' : `seals reserved up to ${r.sealsReserved} under key generation ${r.keyGeneration}`}`);
    const u = s.unlocked;
    if (u === null) row('unlocked', `no: ${s.unlockedSkipped ?? ''}`);
    else {
      row('committed', `epoch ${u.committedEpoch} (epochs reserved up to ${u.reservedEpoch}); map copy ${u.mapCopy}${u.mapLogBytes > 0 ? ` and ${u.mapLogBytes} bytes of map log` : ''}`);
      row('seals', `${u.sealsUnderGeneration} under key generation ${u.keyGeneration}; re-key due at ${u.rekeyAt}`);
      if (u.budgetAtNextWrite !== null) row('', describeResumed(u.budgetAtNextWrite));
      row('free', `${plural(u.freeSlots, 'free slot')} (a flush of more changed chunks goes through the overflow journal)`);
      for (const n of u.notices) row('notice', n);
    }
  }
  return lines;
}

/** inspect DIR: the report as text or JSON on stdout. */
export async function inspectCommand(dir: string, o: { keyFile?: string; json?: boolean }): Promise<void> {
  const report = await inspectVolume(dir, o.keyFile);
  process.stdout.write(o.json === true ? `${JSON.stringify(report, null, 2)}\n` : `${formatInspect(report).join('\n')}\n`);
}
