// The offline commands (init, export, import, inspect, passwd): their options here, their work in
// src/cli/offline-actions.ts and src/cli/inspect-command.ts, imported by the command that runs so
// that `status` and `--help` never load volumes, stores or crypto.

import { InvalidArgumentError, type Command } from 'commander';
import type { InitFlags } from './offline-actions.js';

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
    .option('--force', 'reuse a non-empty directory holding an old volume (its data is lost): asks for its name on a terminal')
    .option('--yes', 'with --force: replace the old volume without asking (for scripts)')
    .action(async (dir: string, o: InitFlags) => (await import('./offline-actions.js')).initCommand(dir, o));

  program
    .command('export')
    .description('assemble the whole device image from the files into OUT (offline, no root); a sealed volume is verified chunk by chunk')
    .argument('<dir>', 'volume directory')
    .argument('<out>', 'image file to write (replaced atomically); - = standard output')
    .option('--key-file <file>', 'keyed layout: the secret; sealed: the passphrase (- = standard input; default ~/.config/vbd-shadow/NAME.key if present, else asked on a terminal)')
    .option('--zero-damaged', 'sealed: export chunks whose slot fails authentication as zeros, and list them (default: refuse)')
    .action(async (dir: string, out: string, o: { keyFile?: string; zeroDamaged?: boolean }) => (await import('./offline-actions.js')).exportCommand(dir, out, o));

  program
    .command('import')
    .description('write a whole device image IN as the volume\'s content (offline, no root; the volume must not be live); a sealed volume commits it as one new epoch')
    .argument('<dir>', 'volume directory')
    .argument('<in>', 'image file, exactly the device size; - = standard input')
    .option('--key-file <file>', 'keyed layout: the secret; sealed: the passphrase (- = standard input, unless the image comes from there; default ~/.config/vbd-shadow/NAME.key if present, else asked on a terminal)')
    .action(async (dir: string, input: string, o: { keyFile?: string }) => (await import('./offline-actions.js')).importCommand(dir, input, o));

  program
    .command('inspect')
    .description('show what a volume is, offline (no root, no key needed): geometry, layout, files, journal and last flush; sealed: identity, and with the passphrase its epochs, seals and free slots')
    .argument('<dir>', 'volume directory')
    .option('--key-file <file>', 'sealed: the passphrase, for the epoch, seal and slot details (- = standard input; default ~/.config/vbd-shadow/NAME.key if present, else asked on a terminal, Enter skips)')
    .option('--json', 'one JSON object (the same keys for every volume; null where a part does not apply)')
    .action(async (dir: string, o: { keyFile?: string; json?: boolean }) => (await import('./inspect-command.js')).inspectCommand(dir, o));

  program
    .command('passwd')
    .description('sealed: change the passphrase (re-wraps the volume key in the manifest; no data moves)')
    .argument('<dir>', 'volume directory')
    .option('--key-file <file>', 'the current passphrase (- = standard input; else asked)')
    .option('--new-key-file <file>', 'the new passphrase (- = standard input; else asked twice)')
    .action(async (dir: string, o: { keyFile?: string; newKeyFile?: string }) => (await import('./offline-actions.js')).passwdCommand(dir, o));
}

