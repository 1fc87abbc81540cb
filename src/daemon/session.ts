// One session of a volume: RAM image → populate → loop device → (mkfs) → (mount) → live,
// until `ended` resolves (a stop signal, the agent's pipe closing, a stop command); then
// teardown. Every acquired resource pushes its undo step, so a failure halfway and a normal
// end unwind the same way, and the final flush guards the image: if it fails, the RAM image
// is kept for `recover`.

import { existsSync } from 'node:fs';
import { sleep } from '../common/fd.js';
import { IoError, VbdError } from '../common/errors.js';
import { startProgress } from '../common/progress.js';
import { formatSize } from '../common/size.js';
import { MAX_QUARANTINED, attachLoop, detachLoop, disableDiscard, giveDevice, publishName, quarantine, retryQuarantine, unpublishName, type LoopDevice } from '../device/loop.js';
import { makeFilesystem, needsRootChown, type MkfsType } from '../device/mkfs.js';
import { chownMountRoot, mountDevice, unmountDevice, type MountPoint } from '../device/mount.js';
import { FlushEngine, type FlushResult, type SealedCommit } from '../flush/engine.js';
import { ExternalChangeWatcher } from '../flush/external.js';
import { ChangeTracker } from '../flush/tracking.js';
import { createImage, destroyImage, isAllZero, type ShadowImage } from '../shadow/image.js';
import { listDamaged, type DamagedChunk } from '../store/chunk-store.js';
import type { AnyVolume, Owner } from '../volume/volume.js';
import { CleanupStack } from './cleanup.js';
import type { ServedStore } from './served-store.js';
import type { Log } from './log.js';
import { recoverLeftover } from './recover.js';
import type { DaemonStatus, RuntimePaths } from './runtime.js';
import { FlushScheduler } from './scheduler.js';

export interface SessionOptions {
  /** The mount point, opened and checked once when the daemon started. */
  mountPoint?: MountPoint | undefined;
  mkfs?: MkfsType | undefined;
  /** Give the owner the raw device node even while root has its filesystem mounted. */
  rawAccess: boolean;
  intervalMs: number;
  maxDirtyBytes: number;
  /** Sealed: serve even though slots fail authentication, with those chunks zeroed (and listed). */
  zeroDamaged: boolean;
}

export interface SessionContext {
  volume: AnyVolume;
  paths: RuntimePaths;
  /** A plain volume's flush journal; undefined for a sealed volume (copy-on-write commits). */
  journalFd: number | undefined;
  log: Log;
  status: () => DaemonStatus;
  setStatus: (change: Partial<DaemonStatus>) => void;
  /** Set while live: how flush requests (signal, control pipe, agent) reach this session. */
  requestFlush: ((reason: string) => void) | undefined;
}


/** Serves the volume until `ended` resolves; returns the teardown's error, if any (image kept). */
export async function serveSession(ctx: SessionContext, served: ServedStore, o: SessionOptions, ended: Promise<string>): Promise<Error | undefined> {
  const { store, epochs } = served;
  const { volume, paths, journalFd, log, setStatus } = ctx;
  const { manifest, owner } = volume;
  const status = ctx.status;
  const cleanup = new CleanupStack();
  try {
    setStatus({ state: 'recovering' });
    const afterCommit = epochs === undefined ? undefined : (c: SealedCommit): void => {
      epochs.committed(c.epoch, store.reservedEpoch ?? c.epoch);
      setStatus({ sealed: store.sealedState() });
    };
    const beforeCommit = epochs === undefined ? undefined : (): void => epochs.beforeCommit(store.reservedEpoch ?? 0);
    await recoverLeftover(paths, volume, store, journalFd, log, { beforeCommit, afterCommit });
    const held = retryQuarantine(owner.uid);
    setStatus({ quarantinedLoops: held });
    if (held.length >= MAX_QUARANTINED) {
      throw new VbdError(`${held.length} loop devices of earlier sessions are still held open (${held.map((n) => `/dev/loop${n}`).join(', ')}); close them first`);
    }

    const image = await createImage(paths.shadow, manifest.deviceSize, volume.identity);
    cleanup.push('free the RAM image', () => destroyImage(image));
    log(`RAM image: ${formatSize(image.size)} in ${image.path}, mapped and locked`);

    setStatus({ state: 'populating', image: image.path });
    const started = performance.now();
    const progress = startProgress('populate', manifest.deviceSize);
    const damaged = await store.fill(image, { damaged: 'zero' }, (n) => progress.advance(n));
    progress.done();
    const populateMs = Math.round(performance.now() - started);
    if (damaged.length > 0) {
      // Nothing is exposed until the owner decides: a refusal, or --zero-damaged.
      if (!o.zeroDamaged) throw new IoError(damagedRefusal(manifest.name, damaged));
      log(`--zero-damaged: ${damaged.length} chunks fail authentication and are served as zeros: ${listDamaged(damaged, MAX_LISTED_DAMAGED)}`, 'warning');
      setStatus({ damagedChunks: damaged.slice(0, MAX_LISTED_DAMAGED) });
    }
    log(`populated ${formatSize(manifest.deviceSize)} from the files in ${populateMs} ms${store.kind === 'sealed' ? ` (sealed, epoch ${store.epoch})` : ''}`);
    setStatus({ populateMs, sealed: store.sealedState() });
    const engine = new FlushEngine(volume, image, store, journalFd, log);
    engine.beforeCommit = beforeCommit;
    engine.afterCommit = afterCommit;
    const tracker = new ChangeTracker(volume.identity, manifest.chunkSize, manifest.deviceSize / manifest.chunkSize, log, trackerOptions());
    engine.tracker = tracker;
    engine.hashImage();
    // Damaged slots must not stay referenced: the next flush seals the chunks (zeros) anew.
    engine.markDirty(damaged.map((d) => d.chunk));
    const report = (r: FlushResult): void => {
      const { idle, ...flush } = r;
      // One status write per flush check (each is a file write and a rename).
      setStatus({
        lastCheck: { at: r.at, idle, ok: r.ok, durationMs: r.durationMs },
        flushChecks: status().flushChecks + 1,
        ...(idle ? {} : { lastFlush: flush, flushFailures: status().flushFailures + (r.ok ? 0 : 1) }),
        ...(r.ok ? { lastGoodFlush: r.at } : {}),
        tracking: engine.trackingMode(),
      });
    };
    // The trace instance goes with the final flush (which still reads the set it kept), also
    // when that fails and the rest of the teardown is held back.
    cleanup.push('final writeback to the files', async () => {
      try {
        await finalFlush(engine, report, log);
      } finally {
        tracker.stop();
      }
    }, { guard: true });

    const loop = await attachLoop(image.fd, image.path, image.backing);
    const device = loop.path;
    cleanup.push(`detach ${device}`, async () => {
      if ((await detachLoop(loop, image.backing, log, () => tracker.seal())) === 'quarantined') setStatus({ quarantinedLoops: quarantine(owner.uid, loop.index) });
      engine.device = undefined;
    });
    disableDiscard(loop);
    // Before anyone else can open the device: every write to it is traced.
    tracker.start(loop);
    setStatus({ tracking: engine.trackingMode() });
    engine.device = loop;
    engine.resetBaseline();
    const link = publishName(owner, manifest.name, loop);
    cleanup.push(`remove ${link}`, () => unpublishName(owner, manifest.name, loop));
    // With root's mount on it, the raw node stays root's unless asked: writing a mounted
    // filesystem's bytes underneath the kernel is a known attack surface.
    const ownerHasNode = o.mountPoint === undefined || o.rawAccess;
    if (ownerHasNode) giveDevice(loop, owner);
    log(`attached ${device} as ${link}${ownerHasNode ? `, node owned by uid ${owner.uid}` : ', node kept root-only while mounted'}`, 'notice');
    setStatus({ device, link });

    const formatted = o.mkfs !== undefined && (await formatIfNew(loop, o.mkfs, image, owner, ownerHasNode, log));
    const point = o.mountPoint;
    if (point !== undefined) {
      const mounted = mountDevice(loop, point, owner, formatted ? o.mkfs : undefined);
      engine.mounted = mounted;
      cleanup.push(`unmount ${point.path}`, async () => {
        // Busy: say who holds it (unmountDevice logs; status tells `stop`), keep the files current, retry.
        const since = new Date().toISOString();
        const busy = (at: string, holders: string[]): void => setStatus({ waitingFor: { what: 'unmount', path: at, holders, since } });
        while (!unmountDevice(mounted, log, busy)) {
          report(await engine.flush('waiting for unmount'));
          await sleep(2000);
        }
        if (status().waitingFor !== undefined) setStatus({ waitingFor: undefined });
        engine.mounted = undefined;
        log(`unmounted ${point.path}`, 'notice');
      });
      // ext* got its root owner from mkfs; other new filesystems get it here.
      if (formatted && o.mkfs !== undefined && needsRootChown(o.mkfs)) chownMountRoot(mounted, owner);
      log(`mounted ${device} on ${point.path} (nosuid,nodev)`, 'notice');
      setStatus({ mountpoint: point.path });
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
      log(`EXTERNAL CHANGE: backing file '${change.name}' was ${change.what} by someone else; kept aside as ${change.keptAs ?? '(nothing to keep)'}; the chunks that differ from RAM will be rewritten`, 'warning');
      setStatus({ externalChanges: status().externalChanges + 1, lastExternalChange: { at: new Date().toISOString(), ...change } });
      engine.hashFiles(change.file);
      void scheduler.request('external change');
    }, log);
    engine.afterWrite = () => watcher.recordOwnWrites();
    await watcher.start();
    cleanup.push('stop watching the backing files', () => watcher.stop());
    setStatus({ state: 'live' });
    log(`live; flushing every ${o.intervalMs / 1000} s or after ${formatSize(o.maxDirtyBytes)} written`, 'notice');
    const reason = await ended;
    log(`tearing down: ${reason}`, 'notice');
    setStatus({ state: 'stopping' });
  } catch (err) {
    log(`start failed: ${err instanceof Error ? err.message : String(err)}`, 'err');
    const undoError = await cleanup.unwind(log);
    if (undoError !== undefined) keepImageNotice(paths.shadow, volume.dir, log);
    throw err;
  }
  const error = await cleanup.unwind(log);
  if (error !== undefined) keepImageNotice(paths.shadow, volume.dir, log);
  else log('session over: everything written back, device detached, RAM freed', 'notice');
  return error;
}

const MAX_LISTED_DAMAGED = 20;

/**
 * VBD_SHADOW_TRACKING=off turns change tracking off (every flush scans: the benchmark's
 * "before"); VBD_SHADOW_TRACE_BUFFER_KB sets the ring buffer per CPU (tests force an overrun).
 */
function trackerOptions(): { bufferKb?: number; off?: string } {
  const kb = Number(process.env['VBD_SHADOW_TRACE_BUFFER_KB']);
  return {
    ...(Number.isInteger(kb) && kb > 0 ? { bufferKb: kb } : {}),
    ...(process.env['VBD_SHADOW_TRACKING'] === 'off' ? { off: 'switched off by VBD_SHADOW_TRACKING=off' } : {}),
  };
}

function damagedRefusal(name: string, damaged: readonly DamagedChunk[]): string {
  return `volume '${name}': ${damaged.length} slots fail authentication (corrupted, tampered with, or an old or misplaced slot): ${listDamaged(damaged)}; nothing was exposed or written. ` +
    `To serve the volume with those chunks zeroed, start it with --zero-damaged (the next flush seals them anew)`;
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
    log(`final flush failed (attempt ${attempt} of 3): ${r.error}`, 'err');
    if (attempt === 3) throw new VbdError(r.error ?? 'final flush failed');
    await sleep(1000 * attempt);
  }
}

function keepImageNotice(shadow: string, dir: string, log: Log): void {
  if (existsSync(`${shadow}/image`)) {
    log(`the RAM image is KEPT at ${shadow}/image (root-only) so nothing is lost; fix the cause, then run 'vbd-shadow recover ${dir}' or start the volume again`, 'err');
  }
}

/** Formats only a device that has never held data (all zero): never mkfs over a user's bytes. */
async function formatIfNew(loop: LoopDevice, type: MkfsType, image: ShadowImage, owner: Owner, asOwner: boolean, log: Log): Promise<boolean> {
  if (!isAllZero(image)) {
    log(`--mkfs ${type}: the device holds data already; not formatting`);
    return false;
  }
  await makeFilesystem(loop, type, owner, asOwner);
  log(`formatted ${loop.path} as ${type} (no discard${asOwner ? ', as the owner' : ''})`);
  return true;
}
