// The daemon lock of a volume's runtime directory: an flock (through koffi, so apart from
// runtime.ts, which status, flush and stop read without loading the C library).

import { closeSync, fstatSync, lstatSync, openSync, readFileSync, rmSync, rmdirSync, writeSync, ftruncateSync, constants as fsc } from 'node:fs';
import { VbdError, failure } from '../common/errors.js';
import { tryLockExclusive } from '../sys/libc.js';
import { endedLongAgo, makeRuntimeDir, presenceOf, readStatusAt, type KnownVolume, type RuntimePaths } from './runtime.js';

/** The daemon lock: an flock held for the daemon's life (the kernel drops it if it dies). */
export interface DaemonLock {
  fd: number;
  paths: RuntimePaths;
}

/** Takes the volume's lock, or refuses naming the live holder. Root only (the directory is root's). */
export function acquireLock(paths: RuntimePaths, name: string): DaemonLock {
  // A lock file removed by a holder that gave up (see releaseLock) may be the one we opened:
  // the lock counts only if the file we hold is still the one at the path.
  for (let attempt = 0; attempt < 3; attempt++) {
    makeRuntimeDir(paths);
    let fd: number;
    try {
      fd = openSync(paths.lockFile, fsc.O_RDWR | fsc.O_CREAT | fsc.O_NOFOLLOW, 0o644);
    } catch (err) {
      throw failure(`cannot open lock ${paths.lockFile}`, err);
    }
    const st = fstatSync(fd);
    if (!st.isFile() || st.uid !== 0) {
      closeSync(fd);
      throw new VbdError(`lock ${paths.lockFile} is not root's regular file`);
    }
    if (!tryLockExclusive(fd, paths.lockFile)) {
      const holder = readFileSync(paths.lockFile, 'utf8').trim();
      closeSync(fd);
      throw new VbdError(`volume '${name}' is already served by ${/^\d+$/.test(holder) ? `pid ${holder}` : 'another daemon'}`);
    }
    let atPath: number | undefined;
    try {
      atPath = lstatSync(paths.lockFile).ino;
    } catch {
      atPath = undefined;
    }
    if (atPath !== st.ino) {
      closeSync(fd);
      continue;
    }
    ftruncateSync(fd, 0);
    writeSync(fd, `${process.pid}\n`, 0);
    return { fd, paths };
  }
  throw new VbdError(`cannot take the lock ${paths.lockFile}: it keeps being replaced`);
}

/**
 * Releases the lock. `forget`: a daemon that never got as far as a status removes what it made
 * (the lock file, then the directory if empty) while still holding the lock.
 */
export function releaseLock(lock: DaemonLock, forget = false): void {
  ftruncateSync(lock.fd, 0);
  if (forget) {
    rmSync(lock.paths.lockFile, { force: true });
    try {
      rmdirSync(lock.paths.dir);
    } catch {
      /* not empty (FIFOs, a tmpfs): kept */
    }
  }
  closeSync(lock.fd);
}

/**
 * Removes (root) the runtime directory of an entry that has ended and left nothing behind (see
 * presenceOf), once it is older than ENDED_KEPT_MS: under its lock, so a daemon starting for the
 * same volume either holds the lock first (nothing is removed) or takes it afterwards on a new
 * lock file (acquireLock checks the file it locked is still the one at the path). Returns
 * whether it was removed; anything unexpected inside keeps the directory.
 */
export function pruneEnded(v: KnownVolume): boolean {
  let fd: number;
  try {
    fd = openSync(v.paths.lockFile, fsc.O_RDWR | fsc.O_NOFOLLOW);
  } catch {
    return false; // no lock file: a daemon is creating the directory, or it is not ours to judge
  }
  const st = fstatSync(fd);
  if (!st.isFile() || st.uid !== 0 || !tryLockExclusive(fd, v.paths.lockFile)) {
    closeSync(fd);
    return false;
  }
  // Judged again under the lock: a daemon may have started (and ended) since the list was read.
  const status = readStatusAt(v.paths);
  const now = { paths: v.paths, status: status ?? v.status };
  if (status === undefined || status.pid !== v.status.pid || presenceOf(now) !== 'ended' || !endedLongAgo(now)) {
    closeSync(fd);
    return false;
  }
  for (const name of ['status.json', 'status.json.new', 'agent.fifo', 'control.fifo']) rmSync(`${v.paths.dir}/${name}`, { force: true });
  try {
    rmdirSync(v.paths.shadow);
  } catch {
    /* absent, or not empty: the directory stays (below) */
  }
  releaseLock({ fd, paths: v.paths }, true);
  return true;
}

