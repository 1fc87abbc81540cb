// Shared bits of the benchmarks: timing, medians, volumes filled with data, markdown tables.

import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, constants as fsc, mkdirSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { initVolume, type LayoutChoice } from '../src/volume/init.js';
import { lockExclusive } from '../src/sys/libc.js';

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? (sorted[mid] ?? 0) : ((sorted[mid - 1] ?? 0) + (sorted[mid] ?? 0)) / 2;
}

export async function timeMs(fn: () => unknown): Promise<number> {
  const t = performance.now();
  await fn();
  return performance.now() - t;
}

/** A volume whose files hold non-zero data (sparse files would read as free zeros). */
export async function filledVolume(dir: string, size: number, files: number, chunk: number, layout: LayoutChoice): Promise<void> {
  const manifest = await initVolume({ dir, deviceSize: size, fileCount: files, chunkSize: chunk, layout, force: true });
  const block = randomBytes(4 * 2 ** 20);
  for (const file of manifest.files) {
    const fd = openSync(join(dir, file.path), 'r+');
    for (let at = 0; at < file.size; at += block.length) writeSync(fd, block, 0, Math.min(block.length, file.size - at), at);
    closeSync(fd);
  }
}

export function table(header: string[], rows: (string | number)[][]): string {
  const line = (cells: (string | number)[]): string => `| ${cells.join(' | ')} |`;
  return [line(header), line(header.map(() => '---')), ...rows.map(line)].join('\n');
}

export function machine(): string {
  const cpu = execFileSync('sh', ['-c', "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], { encoding: 'utf8' }).trim();
  const mem = execFileSync('sh', ['-c', "grep MemTotal /proc/meminfo | awk '{print $2}'"], { encoding: 'utf8' }).trim();
  return `${new Date().toISOString().slice(0, 10)}, ${execFileSync('nproc', { encoding: 'utf8' }).trim()} cores (${cpu}), ${Math.round(Number(mem) / 2 ** 20)} GiB RAM, kernel ${execFileSync('uname', ['-r'], { encoding: 'utf8' }).trim()}, Node ${process.version}`;
}

export function ensureDir(dir: string): string {
  mkdirSync(dir, { recursive: true });
  return dir;
}

/**
 * Runs `work` holding flock(2) on `path` (the machine's loop devices are shared: each part of a
 * benchmark that attaches some holds the lock, briefly); without a path, runs it as is.
 */
export async function withLock<T>(path: string | undefined, what: string, work: () => Promise<T>): Promise<T> {
  if (path === undefined) return work();
  const fd = openSync(path, fsc.O_RDONLY | fsc.O_CREAT, 0o644);
  try {
    process.stderr.write(`bench: waiting for ${path} (${what})\n`);
    await lockExclusive(fd, path);
    process.stderr.write(`bench: holding ${path} (${what})\n`);
    return await work();
  } finally {
    closeSync(fd); // releases the lock
  }
}
