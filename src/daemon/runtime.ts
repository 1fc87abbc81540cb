// Where a live volume's state lives: /run/vbd-shadow/NAME/ (0755, so the owner can reach the
// status file and, later, the agent's pipe), holding the root-only tmpfs `shadow/`, the pid
// lock and status.json.

import { closeSync, mkdirSync, openSync, readFileSync, readdirSync, renameSync, rmSync, writeSync, constants as fsc } from 'node:fs';
import { join } from 'node:path';
import { VbdError, errnoCode, failure } from '../common/errors.js';

export const RUN_ROOT = '/run/vbd-shadow';

export interface RuntimePaths {
  dir: string;
  shadow: string;
  pidFile: string;
  statusFile: string;
}

export function runtimePaths(name: string): RuntimePaths {
  const dir = join(RUN_ROOT, name);
  return { dir, shadow: join(dir, 'shadow'), pidFile: join(dir, 'daemon.pid'), statusFile: join(dir, 'status.json') };
}

export interface FlushReport {
  at: string;
  ok: boolean;
  durationMs: number;
  /** Bytes written to the backing files (the journal's bytes are counted apart). */
  bytesWritten: number;
  journalBytes?: number;
  chunksChanged: number;
  reason: string;
  error?: string;
  /** Where the time went: sync, freeze, frozen (writer stall), scan, journal, apply (ms). */
  timings?: Record<string, number> | undefined;
}

/** The latest flush check, idle or not (an idle check does no scan and no I/O). */
export interface FlushCheck {
  at: string;
  idle: boolean;
  ok: boolean;
  durationMs: number;
}

export type DaemonState = 'starting' | 'waiting' | 'recovering' | 'populating' | 'live' | 'stopping' | 'stopped' | 'failed';

export interface DaemonStatus {
  name: string;
  volumeDir: string;
  state: DaemonState;
  pid: number;
  owner: { uid: number; gid: number };
  /** What decides attach and teardown: none, spawn (our own agent) or wait (the owner's agent). */
  canary: string;
  /** Sessions served so far (attach … teardown). */
  sessions: number;
  intervalMs: number;
  deviceSize: number;
  chunkSize: number;
  layout: string;
  device?: string;
  link?: string;
  mountpoint?: string;
  image?: string;
  startedAt: string;
  populateMs?: number;
  /** The latest flush that wrote (or tried to write) something. */
  lastFlush?: FlushReport;
  lastCheck?: FlushCheck;
  /** Flush checks done, idle ones included: `vbd-shadow flush` waits for this to grow. */
  flushChecks: number;
  flushFailures: number;
  /** The start time of the latest flush that completed: the files hold at least that state. */
  lastGoodFlush?: string;
  externalChanges: number;
  /** The latest agent session refused (e.g. a wrong key), for the agent to report. */
  refused?: { at: string; reason: string };
  lastExternalChange?: { at: string; name: string; what: string; keptAs: string | undefined };
  error?: string;
}

export function writeStatus(paths: RuntimePaths, status: DaemonStatus): void {
  const temp = `${paths.statusFile}.new`;
  const fd = openSync(temp, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_TRUNC | fsc.O_NOFOLLOW, 0o644);
  try {
    writeSync(fd, `${JSON.stringify(status, null, 2)}\n`);
  } finally {
    closeSync(fd);
  }
  renameSync(temp, paths.statusFile);
}

export function readStatus(name: string): DaemonStatus | undefined {
  try {
    return JSON.parse(readFileSync(runtimePaths(name).statusFile, 'utf8')) as DaemonStatus;
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return undefined;
    throw failure(`cannot read the status of volume '${name}'`, err);
  }
}

export function knownVolumes(): string[] {
  try {
    return readdirSync(RUN_ROOT).sort();
  } catch {
    return [];
  }
}

/** Whether `pid` runs (a zombie, dead but not yet reaped by its parent, does not). */
export function isAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

/** The pid holding the volume's lock, if that process is alive. */
export function lockHolder(name: string): number | undefined {
  try {
    const pid = Number(readFileSync(runtimePaths(name).pidFile, 'utf8').trim());
    return Number.isSafeInteger(pid) && pid > 0 && isAlive(pid) ? pid : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Takes the volume's lock (an O_EXCL pid file). A lock left by a dead daemon is taken over;
 * a live holder is refused. Returns whether a dead daemon's lock was found (recovery due).
 */
export function acquireLock(paths: RuntimePaths, name: string): { stale: boolean } {
  mkdirSync(RUN_ROOT, { recursive: true, mode: 0o755 });
  mkdirSync(paths.dir, { recursive: true, mode: 0o755 });
  let stale = false;
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fd = openSync(paths.pidFile, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o644);
      writeSync(fd, `${process.pid}\n`);
      closeSync(fd);
      return { stale };
    } catch (err) {
      if (errnoCode(err) !== 'EEXIST') throw failure(`cannot create lock ${paths.pidFile}`, err);
    }
    const holder = lockHolder(name);
    if (holder !== undefined) throw new VbdError(`volume '${name}' is already served by pid ${holder}`);
    stale = true;
    rmSync(paths.pidFile, { force: true });
  }
  throw new VbdError(`cannot take the lock ${paths.pidFile}: another start raced us`);
}

export function releaseLock(paths: RuntimePaths): void {
  rmSync(paths.pidFile, { force: true });
}
