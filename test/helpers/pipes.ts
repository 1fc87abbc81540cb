// Running the CLI where a user's shell would put it: in a pipeline (`| head`), on a terminal
// (a pty, test/fixtures/pty-run.py), or with stdout on a given file descriptor.

import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { BIN } from './cli.js';
import { tempDir } from './tmp.js';

export interface PipelineResult {
  /** The CLI's exit status inside the pipeline (PIPESTATUS[0]). */
  status: number;
  stderr: string;
}

const quote = (s: string): string => `'${s.replaceAll("'", `'\\''`)}'`;

/** `vbd-shadow ARGS | READER`: the CLI's status and its stderr. */
export function pipeInto(args: readonly string[], reader: string): PipelineResult {
  const err = join(tempDir(), 'stderr');
  const script = `${quote(process.execPath)} ${quote(BIN)} ${args.map(quote).join(' ')} 2>${quote(err)} | ${reader} >/dev/null; echo "\${PIPESTATUS[0]}"`;
  const r = spawnSync('bash', ['-c', script], { encoding: 'utf8', timeout: 120_000 });
  return { status: Number(String(r.stdout).trim()), stderr: readFileSync(err, 'utf8') };
}

/** A dialogue with a program on a terminal: wait for text, or type keys. */
export type TerminalStep = ['expect' | 'send', string];

const PTY_RUN = fileURLToPath(new URL('../fixtures/pty-run.py', import.meta.url));

/**
 * The CLI on a pseudo-terminal (stdin, stdout and stderr), playing `steps` (test/fixtures/pty-run.py):
 * its exit status (128+N for signal N) and everything the terminal showed.
 */
export function onTerminal(args: readonly string[], steps: readonly TerminalStep[] = []): { status: number | null; output: string } {
  const r = spawnSync('python3', [PTY_RUN, JSON.stringify(steps), process.execPath, BIN, ...args], { encoding: 'utf8', timeout: 120_000 });
  return { status: r.status, output: String(r.stdout) };
}
