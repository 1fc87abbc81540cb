// The daemon lock of a volume's runtime directory: an flock (through koffi, so apart from
// runtime.ts, which status, flush and stop read without loading the C library).

import { closeSync, fstatSync, lstatSync, openSync, readFileSync, rmSync, rmdirSync, writeSync, ftruncateSync, constants as fsc } from 'node:fs';
import { VbdError, failure } from '../common/errors.js';
import { tryLockExclusive } from '../sys/libc.js';
import { makeRuntimeDir, type RuntimePaths } from './runtime.js';

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
