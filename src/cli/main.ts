// The CLI's top level: commander wiring, and the only place that turns errors into exit codes.

import { Command, CommanderError } from 'commander';
import { VbdError, errnoCode, kindOf, type ErrorKind } from '../common/errors.js';
import { escapeText } from '../common/escape.js';
import { EXIT, EXIT_SUMMARY, type ExitStatus } from '../common/exit-codes.js';
import { priorityPrefix } from '../daemon/log.js';
import { registerDaemonCommands } from './daemon-commands.js';
import { packageInfo } from './package.js';
import { registerOfflineCommands } from './offline-commands.js';
import { registerSetupCommands } from './setup-commands.js';

/** The exit status of each kind of error; a new kind without a status does not compile. */
const EXIT_OF: Record<ErrorKind, ExitStatus> = {
  failed: EXIT.failed,
  usage: EXIT.usage,
  'not-found': EXIT.notFound,
  refused: EXIT.refused,
  'wrong-key': EXIT.wrongKey,
  busy: EXIT.busy,
  io: EXIT.io,
  interrupted: EXIT.interrupted,
  'stdout-closed': EXIT.stdoutClosed,
};

/** Commands that run on when stdout goes away: their data matters more than their log lines. */
const LONG_LIVED = new Set(['start', 'agent']);

export function buildProgram(): Command {
  const program = new Command('vbd-shadow')
    .description('A RAM-speed Linux block device whose data lives in many files, placed by a layout of your choice.')
    .version(packageInfo().version)
    .showHelpAfterError(false)
    .exitOverride()
    .configureOutput({ outputError: (text, write) => write(`${priorityPrefix(2, 'err')}vbd-shadow: ${text.replace(/^error: /, '')}`) });
  registerOfflineCommands(program);
  registerDaemonCommands(program);
  registerSetupCommands(program);
  const width = Math.max(...EXIT_SUMMARY.map(([status]) => String(status).length));
  program.addHelpText('after', `
Examples:
  vbd-shadow init ~/myvbd --size 1G --files 100 --layout keyed   # as you: files + manifest
  sudo vbd-shadow start ~/myvbd --mkfs ext4 --mount ~/vbd        # RAM-speed device; Ctrl-C writes back
  vbd-shadow status                                              # what is live, last flush
  vbd-shadow export ~/myvbd image.raw                            # the device's bytes, offline

Durability: data reaches the files at each flush (--interval, --max-dirty, 'flush', logout);
a power loss loses what was written since the last one, and never tears a flush.

Exit status:
${EXIT_SUMMARY.map(([status, text]) => `  ${String(status).padStart(width)}  ${text}`).join('\n')}

Manual: man 8 vbd-shadow`);
  return program;
}

/**
 * A closed stdout (`vbd-shadow status | head -1`) ends a command quietly with EXIT.stdoutClosed,
 * as SIGPIPE ends a C program; Node ignores SIGPIPE and reports EPIPE as an error event instead.
 */
function quietOnClosedStdout(): void {
  process.stdout.on('error', (err) => {
    const code = errnoCode(err);
    if (code !== 'EPIPE') process.stderr.write(`vbd-shadow: cannot write to standard output: ${err.message}\n`);
    process.exit(code === 'EPIPE' ? EXIT.stdoutClosed : EXIT.io);
  });
}

/**
 * The daemon and the agent run on when stdout goes away (they lose log lines, never data), and
 * their stdout is left exactly as it was handed over (the daemon's log writes to fd 1 itself).
 */
function isLongLived(argv: readonly string[]): boolean {
  const args = argv.slice(2);
  const command = args.find((a) => !a.startsWith('-'));
  return LONG_LIVED.has(command ?? '') && !args.some((a) => a === '-h' || a === '--help');
}

export async function main(argv: string[]): Promise<number> {
  if (!isLongLived(argv)) quietOnClosedStdout();
  try {
    // Only `start --options-file` reads a file (through the FFI): the other commands load none of it.
    const args = argv.some((a) => a.startsWith('--options-file')) ? (await import('./options-file.js')).expandOptionsFiles(argv) : argv;
    await buildProgram().parseAsync(args);
    // A command that ends with a code of its own (the daemon, the agent) set process.exitCode.
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode === 0 ? EXIT.ok : EXIT.usage;
    if (kindOf(err) === 'stdout-closed') return EXIT.stdoutClosed;
    const message = err instanceof VbdError ? err.message : err instanceof Error ? `internal error: ${err.message}` : String(err);
    // One line, and nothing a user typed or a file held can drive the terminal; under journald
    // (a unit's daemon or agent that fails) it is logged as an error.
    process.stderr.write(`${priorityPrefix(2, 'err')}vbd-shadow: ${escapeText(message.replace(/\s*\n\s*/g, ' '))}\n`);
    if (process.env['VBD_SHADOW_DEBUG'] === '1' && err instanceof Error) process.stderr.write(`${err.stack}\n`);
    return EXIT_OF[kindOf(err)];
  }
}
