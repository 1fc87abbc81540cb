// Pieces of the live sealed-volume crash trials: a writer run as the volume's owner that logs
// every file it has synced (name, sha256, time) outside the mount; decoding an exported image
// without mounting it (e2fsck, debugfs); flush requests to the daemon; a stopped process for
// sure; and root's epoch record of the test volume removed after the test.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chmodSync, chownSync, existsSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { readStatus, type DaemonStatus, type FlushReport } from '../../src/daemon/runtime.js';
import { epochRecordPath } from '../../src/daemon/epoch-record.js';
import { MANIFEST_NAME } from '../../src/volume/manifest.js';
import { sha256 } from './cli.js';
import { Stage, eachTestCleanup } from './cleanup.js';
import type { User } from './system.js';

/** A file the writer had written and fsync'd (file and directory) at `at` (ISO time, after the fsync). */
export interface SyncedFile {
  name: string;
  sha: string;
  at: string;
}

/**
 * Writes files `DIR/PREFIX/f<n>` of random content and size (4 KiB … 100 KiB, every 25th 256 KiB;
 * up to `maxBytes` in all, ~8 ms apart: some 5 MiB/s), fsyncs each file and the directory, then appends
 * "<name> <sha256> <ISO time>" to LOG. Stops quietly when the filesystem is full.
 */
const WRITER = `
const fs = require('node:fs');
const crypto = require('node:crypto');
const [root, prefix, log, maxBytes] = process.argv.slice(1);
const dir = root + '/' + prefix;
fs.mkdirSync(dir);
const dirFd = fs.openSync(dir, 'r');
const rootFd = fs.openSync(root, 'r');
fs.fsyncSync(rootFd);
const logFd = fs.openSync(log, 'a');
const pause = new Int32Array(new SharedArrayBuffer(4));
let total = 0;
for (let n = 0; total < Number(maxBytes); n++) {
  const size = n % 25 === 24 ? 2 ** 18 : 4096 * (1 + crypto.randomInt(24)) + crypto.randomInt(4096);
  const data = crypto.randomBytes(size);
  const name = prefix + '/f' + n;
  try {
    const fd = fs.openSync(root + '/' + name, 'w');
    fs.writeSync(fd, data);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fs.fsyncSync(dirFd);
  } catch (err) {
    if (err.code === 'ENOSPC') break;
    throw err;
  }
  const at = new Date().toISOString();
  fs.writeSync(logFd, name + ' ' + crypto.createHash('sha256').update(data).digest('hex') + ' ' + at + '\\n');
  total += size;
  Atomics.wait(pause, 0, 0, 8);
}`;

export interface UserWriter {
  child: ChildProcess;
  gone: Promise<unknown>;
  /** What the writer logged as synced so far. */
  synced: () => SyncedFile[];
}

const writers: UserWriter[] = [];
// A writer stuck on a filesystem a killed daemon left frozen exits only once that is thawed (by
// the sweep, a Kernel step registered before this one): killed first, awaited after the sweep.
eachTestCleanup(Stage.Processes, () => {
  for (const w of writers) if (w.child.exitCode === null && w.child.signalCode === null) w.child.kill('SIGKILL');
});
eachTestCleanup(Stage.Kernel, async () => {
  for (const w of writers.splice(0)) await Promise.race([w.gone, new Promise((r) => setTimeout(r, 10_000))]);
});

/** Starts the writer as `user`: files under `mnt/prefix`, its log at `log` (outside the mount). */
export function startUserWriter(user: User, mnt: string, prefix: string, log: string, maxBytes: number): UserWriter {
  const child = spawn('setpriv', [`--reuid=${user.uid}`, `--regid=${user.gid}`, '--clear-groups', process.execPath, '-e', WRITER, mnt, prefix, log, String(maxBytes)], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let errors = '';
  child.stderr?.on('data', (d: Buffer) => (errors += d.toString()));
  const gone = new Promise((r) => child.once('close', r));
  const synced = (): SyncedFile[] => {
    if (!existsSync(log)) return [];
    return readFileSync(log, 'utf8').split('\n').filter((l) => l.length > 0).map((l) => {
      const [name, sha, at] = l.split(' ');
      if (name === undefined || sha === undefined || at === undefined) throw new Error(`writer log line '${l}' (writer stderr: ${errors})`);
      return { name, sha, at };
    });
  };
  const writer = { child, gone, synced };
  writers.push(writer);
  return writer;
}

/** A passphrase file owned by `user` (mode 0600): root and the owner both read it. */
export function ownerKeyFile(dir: string, user: User, secret: string): string {
  const path = join(dir, 'passphrase');
  writeFileSync(path, `${secret}\n`, { mode: 0o600 });
  chmodSync(path, 0o600);
  chownSync(path, user.uid, user.gid);
  return path;
}

/** Removes root's epoch record of the sealed volume in `dir` after the test (/var/lib/vbd-shadow/UID/UUID.json). */
export function forgetRecordAfterTest(dir: string, user: User): string {
  const manifest = JSON.parse(readFileSync(join(dir, MANIFEST_NAME), 'utf8')) as { sealed: { uuid: string } };
  const path = epochRecordPath(user.uid, manifest.sealed.uuid);
  eachTestCleanup(Stage.Files, () => {
    rmSync(path, { force: true });
    rmSync(`${path}.new`, { force: true });
  });
  return path;
}

/** `e2fsck -fn`: exit status and output. */
export function fsckImage(image: string): { status: number | null; output: string } {
  const r = spawnSync('e2fsck', ['-fn', image], { encoding: 'utf8' });
  return { status: r.status, output: `${r.stdout}${r.stderr}` };
}

/** Copies directory `path` out of the ext4 image `image` into `into` (debugfs rdump: no mount). */
export function dumpFromImage(image: string, path: string, into: string): void {
  rmSync(into, { recursive: true, force: true });
  spawnSync('mkdir', ['-p', into]);
  const r = spawnSync('debugfs', ['-R', `rdump ${path} ${into}`, image], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`debugfs rdump ${path}: ${r.stderr}`);
}

/** Every file in `files` that is missing under `root` or differs from its sha256 (as "name: what"). */
export function missingOrWrong(root: string, files: readonly SyncedFile[]): string[] {
  const problems: string[] = [];
  for (const f of files) {
    const path = join(root, f.name);
    if (!existsSync(path)) problems.push(`${f.name} (synced ${f.at}): missing`);
    else {
      const got = sha256(readFileSync(path));
      if (got !== f.sha) problems.push(`${f.name} (synced ${f.at}): sha256 ${got}, written ${f.sha}`);
    }
  }
  return problems;
}

export function statusOf(name: string): DaemonStatus {
  const s = readStatus(name);
  if (s === undefined) throw new Error(`no status for ${name}`);
  return s;
}

/** Asks the daemon for a flush (SIGUSR1); resolves with its status once a flush check started after the request ended. */
export async function flushNow(name: string, pid: number, timeoutMs = 60_000): Promise<DaemonStatus> {
  const requested = new Date().toISOString();
  process.kill(pid, 'SIGUSR1');
  return flushDoneSince(name, requested, timeoutMs);
}

/** Waits for a flush check that started at or after `requested` (ISO time). */
export async function flushDoneSince(name: string, requested: string, timeoutMs = 60_000): Promise<DaemonStatus> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const s = statusOf(name);
    if (s.lastCheck !== undefined && s.lastCheck.at >= requested) {
      if (!s.lastCheck.ok) throw new Error(`flush of ${name} failed: ${s.lastFlush?.error ?? '?'}`);
      return s;
    }
    if (Date.now() > deadline) throw new Error(`no flush of ${name} within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** State letters of every thread of `pid` (from /proc/PID/task/TID/stat). */
function threadStates(pid: number): string[] {
  return readdirSync(`/proc/${pid}/task`).map((tid) => {
    const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
  });
}

/**
 * SIGSTOP, then waits until every thread is stopped: a thread inside a system call (an
 * fdatasync, a pwrite) stops only when it returns, and what it did is then done.
 */
export async function stopProcess(pid: number, timeoutMs = 30_000): Promise<void> {
  process.kill(pid, 'SIGSTOP');
  const deadline = Date.now() + timeoutMs;
  while (!threadStates(pid).every((s) => s === 'T' || s === 't')) {
    if (Date.now() > deadline) throw new Error(`pid ${pid} not stopped after ${timeoutMs} ms: ${threadStates(pid).join('')}`);
    await new Promise((r) => setImmediate(r));
  }
}

export type MomentMode = 'anywhere' | 'commit' | 'map';

export interface FlushMoment {
  /** ISO time just before the request. */
  requested: string;
  /** ms from the request ('anywhere'), from the first write to the map file ('commit'), or from the second ('map'). */
  delay: number;
}

/**
 * Asks the daemon for a flush (SIGUSR1) and returns at a random moment of it, judged by an
 * earlier flush of about the same size (`like`):
 *  - 'anywhere': uniform over its duration from the request (sync, scan, frozen scan, commit);
 *  - 'commit': from the first change of the sealed map file's bytes (the commit reserves its
 *    epoch there), uniform over its commit time;
 *  - 'map': from the second change (the new map is being written: the commit point), 0–2 ms.
 * A flush that ends before the change awaited is seen returns at once (the caller finds it over).
 */
export async function randomMomentOfFlush(name: string, pid: number, mapFile: string, like: FlushReport, mode: MomentMode): Promise<FlushMoment> {
  const requested = new Date().toISOString();
  let seen = readFileSync(mapFile);
  process.kill(pid, 'SIGUSR1');
  if (mode === 'anywhere') {
    const delay = Math.random() * like.durationMs;
    await sleep(delay);
    return { requested, delay };
  }
  const deadline = Date.now() + 30_000;
  for (let changes = 0; changes < (mode === 'commit' ? 1 : 2); ) {
    const now = readFileSync(mapFile);
    if (!now.equals(seen)) {
      changes++;
      seen = now;
      continue;
    }
    const s = readStatus(name);
    if (s?.lastCheck !== undefined && s.lastCheck.at >= requested) return { requested, delay: 0 };
    if (Date.now() > deadline) throw new Error(`${mapFile} not written within 30 s of a flush request`);
    await new Promise((r) => setImmediate(r));
  }
  const delay = Math.random() * (mode === 'commit' ? like.timings?.['applyMs'] ?? like.durationMs : 2);
  await sleep(delay);
  return { requested, delay };
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
