// The CLI's top level: commander wiring, and the only place that turns errors into exit codes.

import { Command, CommanderError } from 'commander';
import { VbdError } from '../common/errors.js';
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
  return program;
}

export async function main(argv: string[]): Promise<number> {
  try {
    await buildProgram().parseAsync(argv);
    return 0;
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode === 0 ? 0 : 2;
    const message = err instanceof VbdError ? err.message : err instanceof Error ? `internal error: ${err.message}` : String(err);
    process.stderr.write(`vbd-shadow: ${message.replace(/\s*\n\s*/g, ' ')}\n`);
    if (process.env['VBD_SHADOW_DEBUG'] === '1' && err instanceof Error) process.stderr.write(`${err.stack}\n`);
    return 1;
  }
}
