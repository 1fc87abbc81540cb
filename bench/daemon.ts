// Driving a real daemon from a benchmark: start, wait live, flush, read its status, stop.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { rmSync } from 'node:fs';
import { findVolumeByName, readStatus, type DaemonStatus } from '../src/daemon/runtime.js';

const BIN = fileURLToPath(new URL('../../bin/vbd-shadow', import.meta.url));

export interface BenchDaemon {
  child: ChildProcess;
  name: string;
  status: () => DaemonStatus;
  flush: () => DaemonStatus;
  /** SIGTERM and wait for the exit: how long the teardown took, and the daemon's last status. */
  stop: () => Promise<{ exitMs: number; last: DaemonStatus | undefined }>;
}

export function cli(args: string[]): string {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`vbd-shadow ${args.join(' ')}: ${r.stderr.trim()}`);
  return r.stdout;
}

export async function startBenchDaemon(name: string, args: string[], env: Record<string, string> = {}): Promise<BenchDaemon> {
  const child = spawn(process.execPath, [BIN, 'start', ...args, '--foreground', '--interval', '1h', '--max-dirty', '64G'], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...env } });
  // Its stderr goes on to ours; the last of it names why a daemon that exits early refused.
  let errTail = '';
  child.stderr?.on('data', (b: Buffer) => {
    process.stderr.write(b);
    errTail = (errTail + b.toString()).slice(-2000);
  });
  const exited = new Promise((r) => child.once('close', r)); // after its stderr is read
  for (;;) {
    const s = readStatus(name);
    if (s?.pid === child.pid && s?.state === 'live') break;
    if (child.exitCode !== null || child.signalCode !== null) {
      await exited;
      throw new Error(`daemon for ${name} exited ${child.exitCode ?? child.signalCode}: ${errTail.trim().split('\n').pop() ?? ''}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  const status = (): DaemonStatus => {
    const s = readStatus(name);
    if (s === undefined) throw new Error(`no status for ${name}`);
    return s;
  };
  return {
    child, name, status,
    flush: () => {
      cli(['flush', name]);
      return status();
    },
    stop: async () => {
      const { paths } = findVolumeByName(name);
      const t = performance.now();
      child.kill('SIGTERM');
      await exited;
      const exitMs = performance.now() - t;
      const last = readStatus(name);
      rmSync(paths.dir, { recursive: true, force: true }); // its last status, no longer needed
      return { exitMs, last };
    },
  };
}
