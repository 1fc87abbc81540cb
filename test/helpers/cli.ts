// Running the built CLI as a user would, and hashing a tree to prove a command changed nothing.

import { spawnSync, type SpawnSyncOptions } from 'node:child_process';
import { createHash } from 'node:crypto';
import { lstatSync, readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const BIN = fileURLToPath(new URL('../../bin/vbd-shadow', import.meta.url));

/** The unit's umask when run by scripts/test.sh (the daemon's); 0022 otherwise. */
export const DAEMON_UMASK = process.env['VBD_TEST_DAEMON_UMASK'] ?? '0022';

/** argv for running the CLI as root under the daemon's umask. */
export function cliArgv(args: readonly string[]): [string, string[]] {
  return ['sh', ['-c', `umask ${DAEMON_UMASK} && exec "$0" "$@"`, process.execPath, BIN, ...args]];
}

export interface CliResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

export function cli(args: string[], options: SpawnSyncOptions = {}): CliResult {
  const [cmd, argv] = cliArgv(args);
  const r = spawnSync(cmd, argv, { encoding: 'utf8', timeout: 120_000, ...options });
  return { status: r.status, stdout: String(r.stdout), stderr: String(r.stderr) };
}

/** Runs the CLI with its output as bytes (an image on stdout). */
export function cliBytes(args: string[], options: SpawnSyncOptions = {}): { status: number | null; stdout: Buffer; stderr: string } {
  const [cmd, argv] = cliArgv(args);
  const r = spawnSync(cmd, argv, { timeout: 120_000, maxBuffer: 256 * 2 ** 20, ...options, encoding: 'buffer' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr.toString('utf8') };
}

/** Runs the CLI and throws with its stderr unless it exits 0. */
export function cliOk(args: string[], options: SpawnSyncOptions = {}): CliResult {
  const r = cli(args, options);
  if (r.status !== 0) throw new Error(`vbd-shadow ${args.join(' ')} exited ${r.status}: ${r.stderr}`);
  return r;
}

/** sha256 over every entry of a tree: names, types, modes, link targets and contents. */
export function treeHash(root: string): string {
  const hash = createHash('sha256');
  const walk = (dir: string): void => {
    for (const name of readdirSync(dir).sort()) {
      const path = join(dir, name);
      const st = lstatSync(path);
      hash.update(`${path}\0${st.mode}\0${st.size}\0`);
      if (st.isSymbolicLink()) hash.update(readlinkSync(path));
      else if (st.isDirectory()) walk(path);
      else if (st.isFile()) hash.update(readFileSync(path));
    }
  };
  walk(root);
  return hash.digest('hex');
}

export function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}
