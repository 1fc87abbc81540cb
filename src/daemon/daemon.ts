// The root daemon's lifecycle for one volume: check → lock → recover → RAM image → populate
// → loop device → name → (mkfs) → (mount) → live … signal → teardown. Every acquired resource
// pushes its undo step, so a failure halfway and a normal stop unwind the same way, and the
// writeback step guards the image: if it fails, the RAM is not freed.

import { chownSync, closeSync, existsSync, mkdirSync, statSync } from 'node:fs';
import { resolve } from 'node:path';
import { VbdError } from '../common/errors.js';
import { startProgress } from '../common/progress.js';
import { formatSize } from '../common/size.js';
import { attachLoop, detachLoop, disableDiscard, giveDevice, publishName, restoreDevice, unpublishName } from '../device/loop.js';
import { filesystemType, makeFilesystem, mountFilesystem, unmountFilesystem } from '../device/mount.js';
import { settleJournal } from '../flush/apply.js';
import { FlushEngine, type FlushResult } from '../flush/engine.js';
import { ExternalChangeWatcher } from '../flush/external.js';
import { openJournal } from '../flush/journal.js';
import { populateImage } from '../shadow/fill.js';
import { resolvePlacement } from '../layouts/index.js';
import { checkLockable, createImage, destroyImage, isAllZero, type ShadowImage } from '../shadow/image.js';
import { closeVolume, loadVolume, type Owner } from '../volume/volume.js';
import { CleanupStack } from './cleanup.js';
import type { Log } from './log.js';
import { recoverLeftover } from './recover.js';
import { FlushScheduler } from './scheduler.js';
import { acquireLock, releaseLock, runtimePaths, writeStatus, type DaemonStatus } from './runtime.js';

export interface DaemonOptions {
  dir: string;
  mount?: string | undefined;
  mkfs?: string | undefined;
  intervalMs: number;
  /** Flush early once this many bytes were written since the last flush. */
  maxDirtyBytes: number;
  /** The keyed layout's secret; wiped as soon as the placement is computed. */
  secret?: Buffer | undefined;
  log: Log;
}

export function requireRoot(command: string): void {
  if (process.geteuid?.() !== 0) {
    throw new VbdError(`${command} needs root (it mounts a tmpfs, locks RAM and attaches a loop device); run it with sudo`);
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Resolves on the first SIGTERM or SIGINT (the signal's name). */
function stopSignal(log: Log): Promise<string> {
  return new Promise((resolveStop) => {
    const onSignal = (signal: NodeJS.Signals): void => {
      log(`received ${signal}: tearing down`);
      process.removeListener('SIGTERM', onSignal);
      process.removeListener('SIGINT', onSignal);
      // A second signal during teardown must not kill us halfway: log and carry on.
      const again = (s: NodeJS.Signals): void => log(`received ${s} during teardown: still writing back, please wait`);
      process.on('SIGTERM', again);
      process.on('SIGINT', again);
      resolveStop(signal);
    };
    process.on('SIGTERM', onSignal);
    process.on('SIGINT', onSignal);
  });
}

/** Runs the daemon until a stop signal; returns the process exit code. */
export async function runDaemon(o: DaemonOptions): Promise<number> {
  requireRoot('vbd-shadow start');
  const { log } = o;
  const stopping = stopSignal(log);
  const volume = loadVolume(o.dir, { writable: true });
  const { manifest, owner } = volume;
  const paths = runtimePaths(manifest.name);
  const cleanup = new CleanupStack();
  let status: DaemonStatus | undefined;
  const setStatus = (change: Partial<DaemonStatus>): void => {
    if (status === undefined) return;
    status = { ...status, ...change };
    writeStatus(paths, status);
  };

  try {
    const table = await resolvePlacement(manifest, { secret: o.secret, runAs: owner.uid !== 0 ? owner : undefined });
    o.secret?.fill(0);
    if (o.mount !== undefined) checkMountpoint(o.mount);
    checkLockable(manifest.deviceSize);

    const { stale } = acquireLock(paths, manifest.name);
    cleanup.push('release the lock', () => releaseLock(paths));
    const journalFd = openJournal(volume);
    cleanup.push('close the journal', () => closeSync(journalFd));
    status = {
      name: manifest.name, volumeDir: volume.dir, state: 'starting', pid: process.pid, owner,
      deviceSize: manifest.deviceSize, chunkSize: manifest.chunkSize, layout: manifest.layout.kind,
      startedAt: new Date().toISOString(), flushFailures: 0, flushChecks: 0, externalChanges: 0,
    };
    setStatus({});
    log(`starting: volume ${volume.dir}, ${formatSize(manifest.deviceSize)}, ${manifest.files.length} files, ${manifest.layout.kind} layout, ${formatSize(manifest.chunkSize)} chunks`);
    if (stale) log('found the lock of a daemon that is gone');
    setStatus({ state: 'recovering' });
    await settleJournal(volume, journalFd, log);
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
      const { timings: _t, idle, ...rest } = r;
      setStatus({ lastCheck: { at: r.at, idle, ok: r.ok, durationMs: r.durationMs }, flushChecks: (status?.flushChecks ?? 0) + 1 });
      if (!idle) setStatus({ lastFlush: { ...rest, timings: r.timings }, flushFailures: (status?.flushFailures ?? 0) + (r.ok ? 0 : 1) });
      if (r.ok) setStatus({ lastGoodFlush: r.at });
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
      process.removeListener('SIGUSR1', onFlushSignal);
    });
    const onFlushSignal = (): void => void scheduler.request('signal');
    process.on('SIGUSR1', onFlushSignal);
    scheduler.start();
    const watcher = new ExternalChangeWatcher(volume, () => engine.settled(), (change) => {
      log(`EXTERNAL CHANGE: backing file '${change.name}' was ${change.what} by someone else; kept aside as ${change.keptAs ?? '(nothing to keep)'}; the chunks that differ from RAM will be rewritten`);
      setStatus({ externalChanges: (status?.externalChanges ?? 0) + 1, lastExternalChange: { at: new Date().toISOString(), ...change } });
      engine.hashFiles(change.file);
      void scheduler.request('external change');
    }, log);
    engine.afterWrite = () => watcher.recordOwnWrites();
    await watcher.start();
    cleanup.push('stop watching the backing files', () => watcher.stop());
    setStatus({ state: 'live' });
    log(`live; flushing every ${o.intervalMs / 1000} s or after ${formatSize(o.maxDirtyBytes)} written`);
    await stopping;
    setStatus({ state: 'stopping' });
  } catch (err) {
    log(`start failed: ${err instanceof Error ? err.message : String(err)}`);
    const undoError = await cleanup.unwind(log);
    if (undoError !== undefined) keepImageNotice(paths.shadow, volume.dir, log);
    setStatus({ state: 'failed', error: err instanceof Error ? err.message : String(err) });
    closeVolume(volume);
    throw err;
  }

  const error = await cleanup.unwind(log);
  closeVolume(volume);
  if (error !== undefined) {
    keepImageNotice(paths.shadow, volume.dir, log);
    setStatus({ state: 'failed', error: error.message });
    return 1;
  }
  setStatus({ state: 'stopped' });
  log('stopped: everything written back, device detached, RAM freed');
  return 0;
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

function checkMountpoint(mountpoint: string): void {
  const dir = resolve(mountpoint);
  if (!existsSync(dir)) mkdirSync(dir, { recursive: true, mode: 0o755 });
  if (!statSync(dir).isDirectory()) throw new VbdError(`--mount ${dir} is not a directory`);
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
