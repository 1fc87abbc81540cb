// The CLI's top level: commander wiring, and the only place that turns errors into exit codes.

import { Command, CommanderError } from 'commander';
import { VbdError } from '../common/errors.js';
import { escapeText } from '../common/escape.js';
import { registerDaemonCommands } from './daemon-commands.js';
import { registerOfflineCommands } from './offline-commands.js';

function buildProgram(): Command {
  const program = new Command('vbd-shadow')
    .description('A RAM-speed Linux block device whose data lives in many files, placed by a layout of your choice.')
    .version('0.1.0')
    .showHelpAfterError(false)
    .exitOverride()
    .configureOutput({ outputError: (text, write) => write(`vbd-shadow: ${text.replace(/^error: /, '')}`) });
  registerOfflineCommands(program);
  registerDaemonCommands(program);
  program.addHelpText('after', `
Examples:
  vbd-shadow init ~/myvbd --size 1G --files 100 --layout keyed   # as you: files + manifest
  sudo vbd-shadow start ~/myvbd --mkfs ext4 --mount ~/vbd        # RAM-speed device; Ctrl-C writes back
  vbd-shadow status                                              # what is live, last flush
  vbd-shadow export ~/myvbd image.raw                            # the device's bytes, offline

Durability: data reaches the files at each flush (--interval, --max-dirty, 'flush', logout);
a power loss loses what was written since the last one, and never tears a flush.`);
  return program;
}

export async function main(argv: string[]): Promise<number> {
  try {
    await buildProgram().parseAsync(argv);
    // A command that ends with a code of its own (the daemon, the agent) set process.exitCode.
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode === 0 ? 0 : 2;
    const message = err instanceof VbdError ? err.message : err instanceof Error ? `internal error: ${err.message}` : String(err);
    // One line, and nothing a user typed or a file held can drive the terminal.
    process.stderr.write(`vbd-shadow: ${escapeText(message.replace(/\s*\n\s*/g, ' '))}\n`);
    if (process.env['VBD_SHADOW_DEBUG'] === '1' && err instanceof Error) process.stderr.write(`${err.stack}\n`);
    return 1;
  }
}
