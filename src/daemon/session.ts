// One session of a volume: RAM image → populate → loop device → (mkfs) → (mount) → live,
// until `ended` resolves (a stop signal, the agent's pipe closing, a stop command); then
// teardown. Every acquired resource pushes its undo step, so a failure halfway and a normal
// end unwind the same way, and the final flush guards the image: if it fails, the RAM image
// is kept for `recover`.

import { chownSync, existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { sleep } from '../common/fd.js';
import { VbdError } from '../common/errors.js';
import { startProgress } from '../common/progress.js';
import { formatSize } from '../common/size.js';
import { attachLoop, detachLoop, disableDiscard, giveDevice, publishName, restoreDevice, unpublishName } from '../device/loop.js';
import { filesystemType, makeFilesystem, mountFilesystem, unmountFilesystem } from '../device/mount.js';
import { FlushEngine, type FlushResult } from '../flush/engine.js';
import { ExternalChangeWatcher } from '../flush/external.js';
import type { PlacementTable } from '../layouts/layout.js';
import { populateImage } from '../shadow/fill.js';
import { createImage, destroyImage, isAllZero, type ShadowImage } from '../shadow/image.js';
import type { Owner, Volume } from '../volume/volume.js';
import { CleanupStack } from './cleanup.js';
import type { Log } from './log.js';
import { recoverLeftover } from './recover.js';
import type { DaemonStatus, RuntimePaths } from './runtime.js';
import { FlushScheduler } from './scheduler.js';

export interface SessionOptions {
  mount?: string | undefined;
  mkfs?: string | undefined;
  intervalMs: number;
  maxDirtyBytes: number;
}

export interface SessionContext {
  volume: Volume;
  paths: RuntimePaths;
  journalFd: number;
  log: Log;
  status: () => DaemonStatus;
  setStatus: (change: Partial<DaemonStatus>) => void;
  /** Set while live: how flush requests (signal, control pipe, agent) reach this session. */
  requestFlush: ((reason: string) => void) | undefined;
}


/** Serves the volume until `ended` resolves; returns the teardown's error, if any (image kept). */
export async function serveSession(ctx: SessionContext, table: PlacementTable, o: SessionOptions, ended: Promise<string>): Promise<Error | undefined> {
  const { volume, paths, journalFd, log, setStatus } = ctx;
  const { manifest, owner } = volume;
  const status = ctx.status;
  const cleanup = new CleanupStack();
  try {
    setStatus({ state: 'recovering' });
    await recoverLeftover(paths, volume, table, journalFd, log);

    const image = await createImage(paths.shadow, manifest.deviceSize);
    cleanup.push('free the RAM image', () => destroyImage(image));
    log(`RAM image: ${formatSize(image.size)} in ${image.path}, mapped and locked`);

    setStatus({ state: 'populating', image: image.path });
    const started = performance.now();
    const progress = startProgress('populate', manifest.deviceSize);
    populateImage(image, table, volume, (n) => progress.advance(n));
    progress.done();
    const populateMs = Math.round(performance.now() - started);
    log(`populated ${formatSize(manifest.deviceSize)} from the files in ${populateMs} ms`);
    setStatus({ populateMs });
    const engine = new FlushEngine(volume, image, table, journalFd, log);
    engine.hashImage();
    const report = (r: FlushResult): void => {
      const { idle, ...flush } = r;
      // One status write per flush check (each is a file write and a rename).
      setStatus({
        lastCheck: { at: r.at, idle, ok: r.ok, durationMs: r.durationMs },
        flushChecks: status().flushChecks + 1,
        ...(idle ? {} : { lastFlush: flush, flushFailures: status().flushFailures + (r.ok ? 0 : 1) }),
        ...(r.ok ? { lastGoodFlush: r.at } : {}),
      });
    };
    cleanup.push('final writeback to the files', () => finalFlush(engine, report, log), { guard: true });

    const device = await attachLoop(image.path);
    cleanup.push(`detach ${device}`, async () => {
      await detachLoop(device, image.path, log);
      engine.device = undefined;
    });
    disableDiscard(device);
    engine.device = device;
    engine.resetBaseline();
    const link = publishName(manifest.name, device);
    cleanup.push(`remove ${link}`, () => unpublishName(manifest.name, device));
    giveDevice(device, owner);
    cleanup.push(`give ${device} back to root`, () => restoreDevice(device));
    log(`attached ${device} as ${link}, owned by uid ${owner.uid}`);
    setStatus({ device, link });

    const formatted = o.mkfs !== undefined && (await formatIfNew(device, o.mkfs, image, owner, log));
    if (o.mount !== undefined) {
      const mountpoint = resolve(o.mount);
      await mountFilesystem(device, mountpoint);
      // ext* got its root owner from mkfs; other new filesystems get it here.
      if (formatted && !o.mkfs?.startsWith('ext')) chownSync(mountpoint, owner.uid, owner.gid);
      cleanup.push(`unmount ${mountpoint}`, async () => {
        // Busy: say who holds it (unmountFilesystem logs), keep the files current, retry.
        while (!(await unmountFilesystem(mountpoint, log))) {
          report(await engine.flush('waiting for unmount'));
          await sleep(2000);
        }
        log(`unmounted ${mountpoint}`);
      });
      log(`mounted ${device} on ${mountpoint} (nosuid,nodev)`);
      setStatus({ mountpoint });
    }

    // The scheduler's timers also keep Node's event loop alive (signal handlers alone do not).
    const scheduler = new FlushScheduler(engine, { intervalMs: o.intervalMs, maxDirtyBytes: o.maxDirtyBytes, onResult: report, log });
    cleanup.push('stop periodic flushes', () => {
      scheduler.stop();
      ctx.requestFlush = undefined;
    });
    ctx.requestFlush = (why) => void scheduler.request(why);
    scheduler.start();
    const watcher = new ExternalChangeWatcher(volume, () => engine.settled(), (change) => {
      log(`EXTERNAL CHANGE: backing file '${change.name}' was ${change.what} by someone else; kept aside as ${change.keptAs ?? '(nothing to keep)'}; the chunks that differ from RAM will be rewritten`);
      setStatus({ externalChanges: status().externalChanges + 1, lastExternalChange: { at: new Date().toISOString(), ...change } });
      engine.hashFiles(change.file);
      void scheduler.request('external change');
    }, log);
    engine.afterWrite = () => watcher.recordOwnWrites();
    await watcher.start();
    cleanup.push('stop watching the backing files', () => watcher.stop());
    setStatus({ state: 'live' });
    log(`live; flushing every ${o.intervalMs / 1000} s or after ${formatSize(o.maxDirtyBytes)} written`);
    const reason = await ended;
    log(`tearing down: ${reason}`);
    setStatus({ state: 'stopping' });
  } catch (err) {
    log(`start failed: ${err instanceof Error ? err.message : String(err)}`);
    const undoError = await cleanup.unwind(log);
    if (undoError !== undefined) keepImageNotice(paths.shadow, volume.dir, log);
    throw err;
  }
  const error = await cleanup.unwind(log);
  if (error !== undefined) keepImageNotice(paths.shadow, volume.dir, log);
  else log('session over: everything written back, device detached, RAM freed');
  return error;
}

/** The last flush, after detach: everything that differs from the files, retried twice. */
async function finalFlush(engine: FlushEngine, report: (r: FlushResult) => void, log: Log): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    const r = await engine.flush('teardown', true);
    report(r);
    if (r.ok) {
      log(`final flush: ${r.chunksChanged} chunks, ${formatSize(r.bytesWritten)} to the files in ${r.durationMs.toFixed(0)} ms`);
      return;
    }
    log(`final flush failed (attempt ${attempt} of 3): ${r.error}`);
    if (attempt === 3) throw new VbdError(r.error ?? 'final flush failed');
    await sleep(1000 * attempt);
  }
}

function keepImageNotice(shadow: string, dir: string, log: Log): void {
  if (existsSync(`${shadow}/image`)) {
    log(`the RAM image is KEPT at ${shadow}/image (root-only) so nothing is lost; fix the cause, then run 'vbd-shadow recover ${dir}' or start the volume again`);
  }
}

/** Formats only a device that has never held data: never mkfs over a user's bytes. */
async function formatIfNew(device: string, type: string, image: ShadowImage, owner: Owner, log: Log): Promise<boolean> {
  const found = await filesystemType(device);
  if (found !== undefined) {
    log(`--mkfs ${type}: the device already holds ${found}; not formatting`);
    return false;
  }
  if (!isAllZero(image)) throw new VbdError(`--mkfs ${type}: the device holds data but no filesystem blkid knows; refusing to format over it`);
  await makeFilesystem(device, type, owner);
  log(`formatted ${device} as ${type} (no discard)`);
  return true;
}
