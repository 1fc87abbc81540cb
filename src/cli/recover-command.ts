// `vbd-shadow recover`: after a crash, settles an interrupted flush and (root) writes a leftover
// RAM image back into the files. Loaded only by `recover`.

import { closeSync } from 'node:fs';
import { BusyError } from '../common/errors.js';
import { settleJournal } from '../flush/apply.js';
import { createReporter } from '../daemon/events.js';
import { openJournal } from '../flush/journal.js';
import { acquireLock, releaseLock } from '../daemon/lock.js';
import { recoverLeftover } from '../daemon/recover.js';
import { daemonRunning, readStatusAt, requireRoot, runtimePaths } from '../daemon/runtime.js';
import { checkNotStripped, openServedStore } from '../daemon/served-store.js';
import { isTmpfsMounted } from '../shadow/tmpfs.js';
import { closeVolume, isPlainVolume, isSealedVolume, openVolume } from '../volume/volume.js';
import { secretFor } from './key-input.js';

export interface RecoverOptions {
  keyFile?: string;
  acceptRollback?: boolean;
}

export async function recoverCommand(dir: string, o: RecoverOptions): Promise<void> {
  const volume = openVolume(dir, { writable: true });
  const { name } = volume.manifest;
  const paths = runtimePaths(volume.identity);
  // recover runs in the foreground: the events go to the terminal, one line each.
  const say = createReporter((line) => console.log(line));
  let secret: Buffer | undefined;
  let journalFd: number | undefined;
  try {
    const current = readStatusAt(paths);
    if (current !== undefined && daemonRunning(current)) throw new BusyError(`volume '${name}' is live (pid ${current.pid}); stop it first`);
    let settled = 'empty';
    checkNotStripped({ volume, report: say, setStatus: () => undefined }, o.acceptRollback === true, process.geteuid?.() === 0);
    if (isPlainVolume(volume)) {
      journalFd = openJournal(volume);
      settled = await settleJournal(volume, journalFd, say);
    }
    const leftover = isTmpfsMounted(paths.shadow);
    if (!leftover && !isSealedVolume(volume)) {
      console.log(`volume '${name}': ${settled === 'empty' ? 'nothing to recover' : 'journal settled'}; no RAM image left behind`);
      return;
    }
    if (leftover) requireRoot('vbd-shadow recover (of a leftover RAM image)');
    secret = await secretFor(volume.manifest, o.keyFile);
    const lock = leftover ? acquireLock(paths, name) : undefined;
    try {
      // Root keeps the record of a sealed volume's epochs; the owner's recover checks against it.
      const served = await openServedStore({ volume, report: say, setStatus: () => undefined }, secret, o.acceptRollback === true, leftover);
      try {
        if (!leftover) {
          console.log(`volume '${name}': sealed, epoch ${served.store.epoch}${served.store.notices.length === 0 ? ', every map copy authentic' : ''}; no RAM image left behind`);
          return;
        }
        const { epochs, store } = served;
        await recoverLeftover(paths, volume, store, journalFd, say, { afterCommit: () => epochs?.committed() });
        console.log(`volume '${name}' recovered into the files`);
      } finally {
        served.store.close();
      }
    } finally {
      if (lock !== undefined) releaseLock(lock);
    }
  } finally {
    if (journalFd !== undefined) closeSync(journalFd);
    secret?.fill(0);
    closeVolume(volume);
  }
}
