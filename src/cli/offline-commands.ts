// The commands that need no root: init, export, import.

import type { Command } from 'commander';
import { VbdError } from '../common/errors.js';
import { formatSize, parseSize } from '../common/size.js';
import { daemonRunning, readStatusAt, runtimePaths } from '../daemon/runtime.js';
import { journalPending } from '../flush/journal.js';
import { exportImage, importImage } from '../image/offline.js';
import { resolvePlacement } from '../layouts/index.js';
import { initVolume, type LayoutChoice } from '../volume/init.js';
import { closeVolume, openVolume, requirePlainVolume, type Volume } from '../volume/volume.js';
import { newSecret, secretFor } from './key-input.js';

function parseCount(text: string): number {
  if (!/^\d+$/.test(text)) throw new VbdError(`--files: expected a whole number, got '${text}'`);
  return Number(text);
}

function parseParams(text: string | undefined): Record<string, unknown> {
  if (text === undefined) return {};
  try {
    const value: unknown = JSON.parse(text);
    if (typeof value === 'object' && value !== null && !Array.isArray(value)) return value as Record<string, unknown>;
  } catch {
    /* reported below */
  }
  throw new VbdError(`--layout-params: expected a JSON object, got '${text}'`);
}

async function layoutChoice(kind: string, keyFile: string | undefined, params: string | undefined): Promise<LayoutChoice> {
  if (kind === 'linear' || kind === 'striped') return { kind };
  if (kind === 'keyed') return { kind, secret: await newSecret(keyFile) };
  if (kind.startsWith('module:') && kind.length > 'module:'.length) {
    return { kind: 'module', path: kind.slice('module:'.length), params: parseParams(params) };
  }
  throw new VbdError(`--layout must be linear, striped, keyed or module:PATH, got '${kind}'`);
}

/** Loads a volume and its validated placement, runs `work`, and always closes and wipes. */
async function withVolume(dir: string, keyFile: string | undefined, writable: boolean, work: (v: Volume, t: Awaited<ReturnType<typeof resolvePlacement>>) => void): Promise<void> {
  const opened = openVolume(dir, { writable });
  let secret: Buffer | undefined;
  try {
    const volume = requirePlainVolume(opened, (name) => `volume '${name}' is sealed: this command does not open sealed volumes yet`);
    const { name } = volume.manifest;
    // Between sessions (waiting for its agent) a daemon holds no RAM image: the files are the
    // truth and may be read; writing them behind its back is still refused.
    const daemon = readStatusAt(runtimePaths(volume.identity));
    if (daemon !== undefined && daemonRunning(daemon) && (writable || daemon.state !== 'waiting')) {
      throw new VbdError(`volume '${name}' is live (daemon pid ${daemon.pid}): its RAM image is the truth; stop it first`);
    }
    if (journalPending(volume)) throw new VbdError(`volume '${name}' has an interrupted flush in its journal; run 'vbd-shadow recover ${dir}' first`);
    secret = await secretFor(volume.manifest, keyFile);
    const table = await resolvePlacement(volume.manifest, { owner: volume.owner, secret });
    secret?.fill(0);
    work(volume, table);
  } finally {
    secret?.fill(0);
    closeVolume(opened);
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
    .option('--layout <kind>', 'linear | striped | keyed | module:PATH', 'linear')
    .option('--layout-params <json>', 'parameters handed to a module: layout (JSON object)')
    .option('--name <name>', 'volume name (default: the directory name)')
    .option('--key-file <file>', 'keyed layout: read the secret from FILE (mode 0600) instead of asking')
    .option('--force', 'reuse a non-empty directory holding an old volume of the same shape')
    .action(async (dir: string, o: { size: string; files: number; chunk: string; layout: string; layoutParams?: string; name?: string; keyFile?: string; force?: boolean }) => {
      const layout = await layoutChoice(o.layout, o.keyFile, o.layoutParams);
      try {
        const m = await initVolume({
          dir, deviceSize: parseSize(o.size, '--size'), chunkSize: parseSize(o.chunk, '--chunk'),
          fileCount: o.files, layout, name: o.name, force: o.force === true,
        });
        console.log(`created volume '${m.name}' in ${dir}: ${formatSize(m.deviceSize)} in ${m.files.length} files, ${formatSize(m.chunkSize)} chunks, ${m.layout.kind} layout`);
      } finally {
        if (layout.kind === 'keyed') layout.secret.fill(0);
      }
    });

  program
    .command('export')
    .description('assemble the whole device image from the files into OUT (offline, no root)')
    .argument('<dir>', 'volume directory')
    .argument('<out>', 'image file to write (replaced atomically)')
    .option('--key-file <file>', 'keyed layout: the secret')
    .action(async (dir: string, out: string, o: { keyFile?: string }) => {
      await withVolume(dir, o.keyFile, false, (volume, table) => exportImage(volume, table, out));
    });

  program
    .command('import')
    .description('scatter a whole device image IN into the files (offline, no root; the volume must not be live)')
    .argument('<dir>', 'volume directory')
    .argument('<in>', 'image file, exactly the device size')
    .option('--key-file <file>', 'keyed layout: the secret')
    .action(async (dir: string, input: string, o: { keyFile?: string }) => {
      await withVolume(dir, o.keyFile, true, (volume, table) => importImage(volume, table, input));
    });
}
