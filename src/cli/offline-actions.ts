// The offline commands' work (init, export, import, passwd), all through the chunk store: loaded
// only when one of them runs (src/cli/offline-commands.ts registers them), so that `status` and
// `--help` never load volumes, stores or crypto.

import { closeSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { BusyError, InterruptedError, RefusedError, UsageError, VbdError } from '../common/errors.js';
import { formatSize, parseSize } from '../common/size.js';
import { liveDaemon } from '../daemon/runtime.js';
import { journalPending } from '../flush/journal.js';
import { STDIO, exportImage, importImage, spoolStdin } from '../image/offline.js';
import { describeDamaged, describeResumed, isSealedStore, openChunkStore, type ChunkStore, type CommitReport } from '../store/chunk-store.js';
import { isRolledBack, readEpochRecord, sealFloorOf } from '../daemon/epoch-record.js';
import { changePassphrase, unlockSealedManifest } from '../store/sealed-manifest.js';
import { slotSize } from '../store/slot.js';
import { initSealedVolume, initVolume, reuseTarget, type ReuseTarget, type LayoutChoice, type SealedLayoutChoice, type SpareChoice } from '../volume/init.js';
import { closeVolume, isPlainVolume, isSealedVolume, openVolume, sameIdentity, writeManifest, type AnyVolume, type VolumeIdentity } from '../volume/volume.js';
import { newSecret, withSecret } from './key-input.js';

/** --spare: `25%` of the chunk count, or a count of slots. */
export function parseSpare(text: string): SpareChoice {
  const percent = /^(\d+(?:\.\d+)?)%$/.exec(text);
  if (percent !== null) {
    const p = Number(percent[1]);
    if (p <= 0 || p > 1000) throw new UsageError(`--spare: a percentage from above 0 to 1000%, got '${text}'`);
    return { percent: p };
  }
  if (/^\d+$/.test(text) && Number(text) >= 1) return { count: Number(text) };
  throw new UsageError(`--spare: expected PERCENT% or a number of slots (at least 1), got '${text}'`);
}

function parseParams(text: string | undefined): Record<string, unknown> {
  if (text === undefined) return {};
  try {
    const value: unknown = JSON.parse(text);
    if (typeof value === 'object' && value !== null && !Array.isArray(value)) return value as Record<string, unknown>;
  } catch {
    /* reported below */
  }
  throw new UsageError(`--layout-params: expected a JSON object, got '${text}'`);
}

function sealedLayoutChoice(kind: string, params: string | undefined): SealedLayoutChoice {
  if (kind === 'linear' || kind === 'striped' || kind === 'keyed') return { kind };
  if (kind.startsWith('module:') && kind.length > 'module:'.length) {
    return { kind: 'module', path: kind.slice('module:'.length), params: parseParams(params) };
  }
  throw new UsageError(`--layout must be linear, striped, keyed or module:PATH, got '${kind}'`);
}

async function layoutChoice(kind: string, keyFile: string | undefined, params: string | undefined): Promise<LayoutChoice> {
  const choice = sealedLayoutChoice(kind, params);
  if (choice.kind === 'keyed') return { kind: 'keyed', secret: await newSecret(keyFile) };
  return choice;
}

/**
 * Refuses (busy, exit 6) a volume a daemon serves here: its status in the runtime directory of
 * the volume's identity (readable by the owner) names a running daemon. `read`: a daemon waiting
 * for its agent holds no RAM image, so the files may be read then.
 */
function refuseLive(identity: VolumeIdentity, name: string, access: 'read' | 'write'): void {
  const daemon = liveDaemon(identity);
  if (daemon === undefined || (access === 'read' && daemon.state === 'waiting')) return;
  throw new BusyError(`volume '${name}' is live (daemon pid ${daemon.pid}): its RAM image is the truth; stop it first`);
}

/** Prints what opening found (an older map copy used, an interrupted commit completed …). */
function printNotices(store: ChunkStore): void {
  for (const notice of store.notices) process.stderr.write(`vbd-shadow: warning: ${notice}\n`);
}

/**
 * Opens a volume and its chunk store (with the key it needs: --key-file, else the default key
 * file, else asked on the terminal, three tries), runs `work`, and always closes and wipes.
 * Refused while a daemon holds the volume's RAM image, or (plain) while an interrupted flush
 * waits in its journal.
 */
async function withStore(dir: string, keyFile: string | undefined, writable: boolean, work: (store: ChunkStore, volume: AnyVolume) => Promise<void> | void): Promise<void> {
  const volume = openVolume(dir, { writable });
  try {
    const { name } = volume.manifest;
    // Between sessions (waiting for its agent) a daemon holds no RAM image: the files are the
    // truth and may be read; writing them behind its back is still refused.
    refuseLive(volume.identity, name, writable ? 'write' : 'read');
    if (isPlainVolume(volume) && journalPending(volume)) throw new RefusedError(`volume '${name}' has an interrupted flush in its journal; run 'vbd-shadow recover ${dir}' first`);
    // Root's record of a sealed volume's epochs (readable by all): a write takes epochs above any
    // this machine may have used, and files older than the last commit here are said to be so.
    const record = isSealedVolume(volume) ? readEpochRecord(volume.owner.uid, volume.manifest.sealed.uuid) : undefined;
    const store = await withSecret(volume.manifest, keyFile, (secret) => openChunkStore(volume, { writable, secret, epochFloor: record?.reservedEpoch, sealFloor: sealFloorOf(record) }));
    try {
      printNotices(store);
      const rolledBack = record !== undefined && isSealedStore(store) && isRolledBack(record, store.epoch);
      if (rolledBack) {
        process.stderr.write(`vbd-shadow: warning: the files decode to epoch ${store.epoch}, older than epoch ${record.committedEpoch} committed here (${record.at}): restored from an older copy? 'start' refuses them without --accept-rollback\n`);
      }
      // A count raised by root's record running a little ahead is routine; a rollback or a new generation is said.
      const resumed = store.sealedState()?.resumed;
      if (writable && resumed !== undefined && (rolledBack || resumed.how === 'fresh-generation')) process.stderr.write(`vbd-shadow: nonce budget: ${describeResumed(resumed)}\n`);
      await work(store, volume);
    } finally {
      store.close();
    }
  } finally {
    closeVolume(volume);
  }
}

/** Seconds with two decimals, for the one-line summaries. */
function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(2)} s`;
}

/**
 * Runs `work` with an AbortSignal that Ctrl-C (SIGINT) fires: the export stops between two
 * windows, removes its partial file and the command ends with status 130.
 */
async function cancellable<T>(work: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const controller = new AbortController();
  const onSigint = (): void => controller.abort();
  process.on('SIGINT', onSigint);
  try {
    return await work(controller.signal);
  } finally {
    process.off('SIGINT', onSigint);
  }
}

/** What an import did, for its summary line. */
function describeCommit(r: CommitReport): string {
  if (r.kind === 'plain') return `${r.chunks} chunks written in place`;
  const how = r.throughJournal === 0
    ? `all into free slots (copy-on-write)`
    : `${r.inFreeSlots} into free slots, ${r.throughJournal} through the overflow journal (more chunks than free slots: committed as one whole snapshot, those written twice)`;
  const rekey = r.rekeyedFrom === undefined ? '' : `; re-keyed from key generation ${r.rekeyedFrom} to ${r.keyGeneration} (its nonce budget was spent)`;
  return `${r.chunks} chunks sealed and committed as epoch ${r.epoch}, ${how}${rekey}`;
}

export interface InitFlags {
  size: string;
  files: number;
  chunk: string;
  layout: string;
  layoutParams?: string;
  name?: string;
  keyFile?: string;
  force?: boolean;
  yes?: boolean;
  sealed?: boolean;
  spare?: string;
}

/** Options that mean nothing with the others given are refused, not silently ignored. */
function checkInitOptions(o: InitFlags): void {
  const keyed = o.layout === 'keyed';
  const module = o.layout.startsWith('module:');
  if (o.keyFile !== undefined && o.sealed !== true && !keyed) {
    throw new UsageError(`--key-file: a ${o.layout} volume has no key; it goes with --layout keyed (the layout's secret) or --sealed (the passphrase)`);
  }
  if (o.layoutParams !== undefined && !module) throw new UsageError(`--layout-params: only a module:PATH layout takes parameters, not ${o.layout}`);
  if (o.spare !== undefined && o.sealed !== true) throw new UsageError('--spare only applies to a sealed volume (--sealed)');
  if (o.yes === true && o.force !== true) throw new UsageError('--yes confirms --force (replacing an old volume); without --force there is nothing to confirm');
}

/**
 * `init --force` over an old volume: on a terminal the owner types its name (or yes); --yes
 * confirms for scripts; without a terminal and without --yes it is refused (usage). Refused
 * before any secret is asked for, and before anything is touched.
 */
async function confirmReuse(dir: string, target: ReuseTarget, yes: boolean): Promise<void> {
  if (yes) return;
  const what = target.oldName !== undefined ? `volume '${target.oldName}'` : `${target.entries} entr${target.entries === 1 ? 'y' : 'ies'}`;
  if (process.stdin.isTTY !== true || process.stderr.isTTY !== true) {
    throw new UsageError(`init --force: ${dir} holds ${what}, whose data would be lost; confirm on a terminal, or give --yes`);
  }
  const accepted = target.oldName !== undefined ? [target.oldName, 'yes'] : ['yes'];
  const rl = createInterface({ input: process.stdin, output: process.stderr, terminal: true });
  try {
    const answer = await new Promise<string>((resolve, reject) => {
      rl.on('SIGINT', () => reject(new InterruptedError('cancelled; nothing changed')));
      rl.on('close', () => reject(new RefusedError('init --force: not confirmed; nothing changed')));
      rl.question(`${dir} holds ${what}: --force replaces it and its data is lost. Type ${target.oldName !== undefined ? `its name (${target.oldName}) or ` : ''}yes to go on: `, resolve);
    });
    if (!accepted.includes(answer.trim())) throw new RefusedError(`init --force: not confirmed (typed '${answer.trim()}'); nothing changed`);
  } finally {
    rl.removeAllListeners('close');
    rl.close();
  }
}

export async function initCommand(dir: string, o: InitFlags): Promise<void> {
  checkInitOptions(o);
  const deviceSize = parseSize(o.size, '--size');
  const chunkSize = parseSize(o.chunk, '--chunk');
  // What --force would replace is confirmed (and a live volume refused) before any secret is asked.
  const target = o.force === true ? reuseTarget(dir) : undefined;
  if (target !== undefined) {
    refuseLive(target.identity, target.oldName ?? dir, 'write');
    await confirmReuse(dir, target, o.yes === true);
  }
  const checkReuse = (identity: VolumeIdentity): void => {
    refuseLive(identity, target?.oldName ?? dir, 'write');
    if (target === undefined || !sameIdentity(identity, target.identity)) {
      throw new RefusedError(`init --force: ${dir} changed since it was confirmed (another directory, or filled meanwhile); nothing changed`);
    }
  };
  const common = { dir, deviceSize, chunkSize, fileCount: o.files, name: o.name, force: o.force === true, checkReuse };
  if (o.sealed === true) {
    const layout = sealedLayoutChoice(o.layout, o.layoutParams);
    const spare = o.spare !== undefined ? parseSpare(o.spare) : undefined;
    const passphrase = await newSecret(o.keyFile, 'passphrase');
    try {
      const m = await initSealedVolume({ ...common, layout, passphrase, spare });
      const total = m.files.reduce((sum, f) => sum + f.size, 0);
      console.log(`created sealed volume '${m.name}' in ${dir}: ${formatSize(m.deviceSize)} in ${m.files.length} files, ${formatSize(m.chunkSize)} chunks, ${m.layout.kind} layout, ${m.sealed.spareSlots} spare slots (files ${formatSize(total)} in all: slots of ${slotSize(m.chunkSize)} bytes); losing the passphrase loses the data`);
    } finally {
      passphrase.fill(0);
    }
    return;
  }
  const layout = await layoutChoice(o.layout, o.keyFile, o.layoutParams);
  try {
    const m = await initVolume({ ...common, layout });
    console.log(`created volume '${m.name}' in ${dir}: ${formatSize(m.deviceSize)} in ${m.files.length} files, ${formatSize(m.chunkSize)} chunks, ${m.layout.kind} layout`);
  } finally {
    if (layout.kind === 'keyed') layout.secret.fill(0);
  }
}

export async function passwdCommand(dir: string, o: { keyFile?: string; newKeyFile?: string }): Promise<void> {
  if (o.keyFile === '-' && o.newKeyFile === '-') throw new UsageError('passwd: --key-file and --new-key-file cannot both come from standard input');
  const volume = openVolume(dir);
  let old: Buffer | undefined;
  let fresh: Buffer | undefined;
  try {
    if (!isSealedVolume(volume)) {
      if (volume.manifest.layout.kind !== 'keyed') throw new RefusedError(`volume '${volume.manifest.name}' has no passphrase (${volume.manifest.layout.kind} layout, not sealed)`);
      throw new RefusedError(`volume '${volume.manifest.name}' is not sealed: its keyed layout's key decides where every chunk is, so changing it moves every chunk ` +
        `(export, 'init --force' with the new key, import: the whole device written once); a sealed volume's passphrase change re-wraps one key and moves nothing`);
    }
    const uid = process.getuid?.();
    if (uid !== volume.owner.uid) throw new VbdError(`passwd runs as the volume's owner (uid ${volume.owner.uid}, ${volume.owner.name}), not uid ${uid}`);
    // A serving daemon re-wraps the manifest under the passphrase it opened with when it re-keys.
    refuseLive(volume.identity, volume.manifest.name, 'read');
    // The old passphrase is checked (unwrapped; typed: three tries) before a new one is asked for.
    const manifest = volume.manifest;
    old = await withSecret(manifest, o.keyFile, (secret) => {
      if (secret === undefined) throw new VbdError('internal: no passphrase read');
      unlockSealedManifest(secret, manifest).wipe();
      return Promise.resolve(Buffer.from(secret));
    });
    fresh = await newSecret(o.newKeyFile, 'passphrase');
    const rewrapped = changePassphrase(old, fresh, volume.manifest);
    writeManifest(volume.dirFd, volume.dir, rewrapped);
    console.log(`volume '${volume.manifest.name}': passphrase changed (the volume key re-wrapped; no slot or map was touched); the old passphrase no longer opens it`);
  } finally {
    old?.fill(0);
    fresh?.fill(0);
    closeVolume(volume);
  }
}

/** export DIR OUT */
export async function exportCommand(dir: string, out: string, o: { keyFile?: string; zeroDamaged?: boolean }): Promise<void> {
  // What is said goes to stderr: stdout may be the image itself.
  const say = (line: string): void => void process.stderr.write(`${line}\n`);
  await withStore(dir, o.keyFile, false, async (store, volume) => {
    const started = performance.now();
    const r = await cancellable((signal) => exportImage(store, out, { zeroDamaged: o.zeroDamaged === true, signal }));
    for (const d of r.damaged) say(`zeroed damaged ${describeDamaged(d)}`);
    const sealed = store.kind === 'sealed' ? `; epoch ${store.epoch}, ${store.chunkCount - r.damaged.length} chunks verified${r.damaged.length > 0 ? `, ${r.damaged.length} damaged written as zeros` : ''}` : '';
    say(`exported '${volume.manifest.name}' to ${out === STDIO ? 'standard output' : out}: ${r.bytes} bytes, ${r.chunksWritten} chunks written, ${r.chunksSkipped} all-zero skipped (left as holes), in ${seconds(performance.now() - started)}${sealed}`);
  });
}

/** import DIR IN */
export async function importCommand(dir: string, input: string, o: { keyFile?: string }): Promise<void> {
  if (input === STDIO && o.keyFile === STDIO) throw new UsageError('import: the image and --key-file cannot both come from standard input');
  await withStore(dir, o.keyFile, true, (store, volume) => {
    const started = performance.now();
    // A plain volume is written in place: a stream is spooled first, so one that ends short changes nothing.
    const spool = input === STDIO && store.kind === 'plain' ? spoolStdin(volume.dir) : undefined;
    try {
      const report = spool === undefined ? importImage(store, input) : importImage(store, `/proc/self/fd/${spool}`, 'the image on standard input');
      // On stderr, as export's: stdout stays clean for scripts.
      process.stderr.write(`imported into '${volume.manifest.name}' from ${input === STDIO ? 'standard input' : input}: ${store.chunkCount * store.chunkSize} bytes, ${describeCommit(report)}, in ${seconds(performance.now() - started)}\n`);
    } finally {
      if (spool !== undefined) closeSync(spool);
    }
  });
}
