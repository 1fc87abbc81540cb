// The commands that need no root: init, export, import, passwd — for plain and sealed volumes,
// all through the chunk store.

import { closeSync } from 'node:fs';
import { InvalidArgumentError, type Command } from 'commander';
import { BusyError, RefusedError, UsageError, VbdError } from '../common/errors.js';
import { formatSize, parseSize } from '../common/size.js';
import { daemonRunning, readStatusAt, runtimePaths } from '../daemon/runtime.js';
import type { ChunkStore, CommitReport } from '../store/chunk-store.js';
import type { LayoutChoice, SealedLayoutChoice, SpareChoice } from '../volume/init.js';
import type { AnyVolume } from '../volume/volume.js';

// The modules that open volumes, stores and images are imported by the command that runs
// (`await import(…)` below), so that `status` and `--help` never load them.

function parseCount(text: string): number {
  if (!/^\d+$/.test(text)) throw new InvalidArgumentError('expected a whole number.');
  return Number(text);
}

/** The layouts `--layout` takes; `module:PATH` is a user's module. */
export const LAYOUT_KINDS = ['linear', 'striped', 'keyed', 'module:PATH'] as const;

/** --layout: checked while parsing, so a wrong one is a usage error like any bad choice. */
function parseLayout(text: string): string {
  if (text === 'linear' || text === 'striped' || text === 'keyed') return text;
  if (text.startsWith('module:') && text.length > 'module:'.length) return text;
  throw new InvalidArgumentError(`Allowed choices are ${LAYOUT_KINDS.join(', ')}.`);
}

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
  const { newSecret } = await import('./key-input.js');
  const choice = sealedLayoutChoice(kind, params);
  if (choice.kind === 'keyed') return { kind: 'keyed', secret: await newSecret(keyFile) };
  return choice;
}

/** Prints what opening found (an older map copy used, an interrupted commit completed …). */
function printNotices(store: ChunkStore): void {
  for (const notice of store.notices) process.stderr.write(`vbd-shadow: warning: ${notice}\n`);
}

/**
 * Opens a volume and its chunk store (with the key it needs), runs `work`, and always closes
 * and wipes. Refused while a daemon holds the volume's RAM image, or (plain) while an
 * interrupted flush waits in its journal.
 */
async function withStore(dir: string, keyFile: string | undefined, writable: boolean, work: (store: ChunkStore, volume: AnyVolume) => void): Promise<void> {
  const { closeVolume, isPlainVolume, isSealedVolume, openVolume } = await import('../volume/volume.js');
  const { journalPending } = await import('../flush/journal.js');
  const { isRolledBack, readEpochRecord } = await import('../daemon/epoch-record.js');
  const { openChunkStore } = await import('../store/chunk-store.js');
  const { secretFor } = await import('./key-input.js');
  const volume = openVolume(dir, { writable });
  let secret: Buffer | undefined;
  try {
    const { name } = volume.manifest;
    // Between sessions (waiting for its agent) a daemon holds no RAM image: the files are the
    // truth and may be read; writing them behind its back is still refused.
    const daemon = readStatusAt(runtimePaths(volume.identity));
    if (daemon !== undefined && daemonRunning(daemon) && (writable || daemon.state !== 'waiting')) {
      throw new BusyError(`volume '${name}' is live (daemon pid ${daemon.pid}): its RAM image is the truth; stop it first`);
    }
    if (isPlainVolume(volume) && journalPending(volume)) throw new RefusedError(`volume '${name}' has an interrupted flush in its journal; run 'vbd-shadow recover ${dir}' first`);
    secret = await secretFor(volume.manifest, keyFile);
    // Root's record of a sealed volume's epochs (readable by all): a write takes epochs above any
    // this machine may have used, and files older than the last commit here are said to be so.
    const record = isSealedVolume(volume) ? readEpochRecord(volume.owner.uid, volume.manifest.sealed.uuid) : undefined;
    const store = await openChunkStore(volume, { writable, secret, epochFloor: record?.reservedEpoch });
    secret?.fill(0);
    try {
      printNotices(store);
      if (record !== undefined && isRolledBack(record, store.epoch ?? 0)) {
        process.stderr.write(`vbd-shadow: warning: the files decode to epoch ${store.epoch}, older than epoch ${record.committedEpoch} committed here (${record.at}): restored from an older copy? 'start' refuses them without --accept-rollback\n`);
      }
      work(store, volume);
    } finally {
      store.close();
    }
  } finally {
    secret?.fill(0);
    closeVolume(volume);
  }
}

function describeCommit(name: string, r: CommitReport): string {
  if (r.kind === 'plain') return `imported into '${name}': ${r.chunks} chunks written in place`;
  const how = r.throughJournal === 0
    ? `all into free slots (copy-on-write)`
    : `${r.inFreeSlots} into free slots, ${r.throughJournal} through the overflow journal (more chunks than free slots: committed as one whole snapshot, those written twice)`;
  return `imported into '${name}': ${r.chunks} chunks sealed and committed as epoch ${r.epoch}, ${how}`;
}

interface InitFlags {
  size: string;
  files: number;
  chunk: string;
  layout: string;
  layoutParams?: string;
  name?: string;
  keyFile?: string;
  force?: boolean;
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
}

async function initCommand(dir: string, o: InitFlags): Promise<void> {
  const { initSealedVolume, initVolume } = await import('../volume/init.js');
  const { slotSize } = await import('../store/slot.js');
  const { newSecret } = await import('./key-input.js');
  checkInitOptions(o);
  const common = {
    dir, deviceSize: parseSize(o.size, '--size'), chunkSize: parseSize(o.chunk, '--chunk'),
    fileCount: o.files, name: o.name, force: o.force === true,
  };
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

async function passwdCommand(dir: string, o: { keyFile?: string; newKeyFile?: string }): Promise<void> {
  const { closeVolume, isSealedVolume, openVolume } = await import('../volume/volume.js');
  const { changePassphrase, unlockSealedManifest } = await import('../store/sealed-manifest.js');
  const { writeManifest } = await import('../volume/init.js');
  const { newSecret, secretFor } = await import('./key-input.js');
  if (o.keyFile === '-' && o.newKeyFile === '-') throw new UsageError('passwd: --key-file and --new-key-file cannot both come from standard input');
  const volume = openVolume(dir);
  let old: Buffer | undefined;
  let fresh: Buffer | undefined;
  try {
    if (!isSealedVolume(volume)) {
      throw new VbdError(`volume '${volume.manifest.name}' is not sealed: only a sealed volume has a passphrase to change (a keyed layout's key decides where every chunk is)`);
    }
    const uid = process.getuid?.();
    if (uid !== volume.owner.uid) throw new VbdError(`passwd runs as the volume's owner (uid ${volume.owner.uid}, ${volume.owner.name}), not uid ${uid}`);
    old = await secretFor(volume.manifest, o.keyFile);
    if (old === undefined) throw new VbdError('internal: no passphrase read');
    // The old passphrase is checked (unwrapped) before a new one is asked for.
    unlockSealedManifest(old, volume.manifest).wipe();
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

export function registerOfflineCommands(program: Command): void {
  program
    .command('init')
    .description('create a volume: backing files and a manifest in DIR (no root needed)')
    .argument('<dir>', 'volume directory (created if missing; must be empty unless --force)')
    .requiredOption('--size <size>', 'device size, e.g. 512M, 1G (a whole number of chunks)')
    .requiredOption('--files <n>', 'number of backing files', parseCount)
    .option('--chunk <size>', 'chunk size: a power of two from 512 to 64M', '64K')
    .option('--layout <kind>', `where each chunk lives (choices: ${LAYOUT_KINDS.map((k) => `"${k}"`).join(', ')})`, parseLayout, 'linear')
    .option('--layout-params <json>', 'parameters handed to a module: layout (JSON object)')
    .option('--name <name>', 'volume name (default: the directory name)')
    .option('--sealed', 'seal every chunk (AES-256-GCM under a key wrapped by your passphrase): the files show nothing of the content')
    .option('--spare <n>', 'sealed: spare slots for copy-on-write commits, PERCENT% of the chunks or a count (default 20%)')
    .option('--key-file <file>', 'keyed layout: the secret; sealed: the passphrase (mode 0600; - = standard input) — else asked twice')
    .option('--force', 'reuse a non-empty directory holding an old volume of the same shape')
    .action(initCommand);

  program
    .command('export')
    .description('assemble the whole device image from the files into OUT (offline, no root); a sealed volume is verified chunk by chunk')
    .argument('<dir>', 'volume directory')
    .argument('<out>', 'image file to write (replaced atomically); - = standard output')
    .option('--key-file <file>', 'keyed layout: the secret; sealed: the passphrase (- = standard input)')
    .option('--zero-damaged', 'sealed: export chunks whose slot fails authentication as zeros, and list them (default: refuse)')
    .action(async (dir: string, out: string, o: { keyFile?: string; zeroDamaged?: boolean }) => {
      const { STDIO, exportImage } = await import('../image/offline.js');
      const { describeDamaged } = await import('../store/chunk-store.js');
      // With the image on stdout, what is said goes to stderr.
      const say = (line: string): void => void (out === STDIO ? process.stderr.write(`${line}\n`) : console.log(line));
      await withStore(dir, o.keyFile, false, (store) => {
        const { damaged } = exportImage(store, out, { zeroDamaged: o.zeroDamaged === true });
        for (const d of damaged) say(`zeroed damaged ${describeDamaged(d)}`);
        if (store.kind === 'sealed') say(`exported epoch ${store.epoch}: ${store.chunkCount - damaged.length} chunks verified${damaged.length > 0 ? `, ${damaged.length} damaged written as zeros` : ''}`);
      });
    });

  program
    .command('import')
    .description('write a whole device image IN as the volume\'s content (offline, no root; the volume must not be live); a sealed volume commits it as one new epoch')
    .argument('<dir>', 'volume directory')
    .argument('<in>', 'image file, exactly the device size; - = standard input')
    .option('--key-file <file>', 'keyed layout: the secret; sealed: the passphrase (- = standard input, unless the image comes from there)')
    .action(async (dir: string, input: string, o: { keyFile?: string }) => {
      const { STDIO, importImage, spoolStdin } = await import('../image/offline.js');
      if (input === STDIO && o.keyFile === STDIO) throw new UsageError('import: the image and --key-file cannot both come from standard input');
      await withStore(dir, o.keyFile, true, (store, volume) => {
        // A plain volume is written in place: a stream is spooled first, so one that ends short changes nothing.
        const spool = input === STDIO && store.kind === 'plain' ? spoolStdin(volume.dir) : undefined;
        try {
          const report = spool === undefined ? importImage(store, input) : importImage(store, `/proc/self/fd/${spool}`, 'the image on standard input');
          if (report.kind === 'sealed') console.log(describeCommit(volume.manifest.name, report));
        } finally {
          if (spool !== undefined) closeSync(spool);
        }
      });
    });

  program
    .command('passwd')
    .description('sealed: change the passphrase (re-wraps the volume key in the manifest; no data moves)')
    .argument('<dir>', 'volume directory')
    .option('--key-file <file>', 'the current passphrase (- = standard input; else asked)')
    .option('--new-key-file <file>', 'the new passphrase (- = standard input; else asked twice)')
    .action(passwdCommand);
}

