// Running the system tools we drive (mount for the tmpfs, mkfs, setpriv): one place that turns a
// failed run into one line naming the command and what it printed.

import { execFile } from 'node:child_process';
import { VbdError } from './errors.js';

export interface ExecResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a command; resolves with its exit code and output (never rejects on a non-zero exit). */
export function run(cmd: string, args: readonly string[]): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { encoding: 'utf8', maxBuffer: 16 * 2 ** 20 }, (err, stdout, stderr) => {
      if (err !== null && typeof err.code !== 'number') {
        reject(new VbdError(`cannot run ${cmd}: ${err.message}`, { cause: err }));
        return;
      }
      resolve({ code: err === null ? 0 : Number(err.code), stdout, stderr });
    });
  });
}

/** Runs a command and throws one line (command + its last stderr line) unless it exits 0. */
export async function runOk(cmd: string, args: readonly string[]): Promise<string> {
  const r = await run(cmd, args);
  if (r.code !== 0) {
    const why = r.stderr.trim().split('\n').pop() ?? '';
    throw new VbdError(`${cmd} ${args.join(' ')} failed (exit ${r.code}): ${why}`);
  }
  return r.stdout;
}
