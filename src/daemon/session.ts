// One session of a volume: RAM image → populate → loop device → (mkfs) → (mount) → live,
// until `ended` resolves (a stop signal, the agent's pipe closing, a stop command); then
// teardown. Every acquired resource pushes its undo step, so a failure halfway and a normal
// end unwind the same way, and the final flush guards the image: if it fails, the RAM image
// is kept for `recover`.

import { existsSync } from 'node:fs';
import { sleep } from '../common/fd.js';
import { IoError, VbdError } from '../common/errors.js';
import { startProgress } from '../common/progress.js';
import { MAX_QUARANTINED, attachLoop, disableDiscard, giveDevice, publishName, quarantine, removeLoop, retryQuarantine, unbindLoop, unpublishName, type LoopDevice } from '../device/loop.js';
import { makeFilesystem, needsRootChown, type MkfsType } from '../device/mkfs.js';
import { chownMountRoot, mountDevice, unmountDevice, type MountPoint } from '../device/mount.js';
import { startNbdExport, type NbdListen } from '../device/nbd.js';
import { FlushEngine, type FlushResult, type SealedCommit } from '../flush/engine.js';
import { ExternalChangeWatcher } from '../flush/external.js';
import type { ScanPool } from '../flush/scan-pool.js';
import { ChangeTracker } from '../flush/tracking.js';
import { createImage, destroyImage, isAllZero, type ShadowImage } from '../shadow/image.js';
import { listDamaged, type DamagedChunk } from '../store/chunk-store.js';
import type { AnyVolume, Owner } from '../volume/volume.js';
import { CleanupStack } from './cleanup.js';
import type { ServedStore } from './served-store.js';
import { messageOf, roundMs, type Report } from './events.js';
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
  /** --nbd: export the device with nbdkit (never together with a mount: one writer). */
  nbd?: NbdListen | undefined;
}

export interface SessionContext {
  volume: AnyVolume;
  paths: RuntimePaths;
  /** A plain volume's flush journal; undefined for a sealed volume (copy-on-write commits). */
  journalFd: number | undefined;
  report: Report;
  status: () => DaemonStatus;
  setStatus: (change: Partial<DaemonStatus>) => void;
  /** Set while live: how flush requests (signal, control pipe, agent) reach this session. */
  requestFlush: ((reason: string) => void) | undefined;
  /** The daemon's threads for large scans (one pool for every session). */
  scanPool: ScanPool | undefined;
  /** Whether the daemon ends after this session (then the scan threads end with its teardown). */
  lastSession: () => boolean;
}


/** Serves the volume until `ended` resolves; returns the teardown's error, if any (image kept). */
export async function serveSession(ctx: SessionContext, served: ServedStore, o: SessionOptions, ended: Promise<string>): Promise<Error | undefined> {
  const { store, epochs } = served;
  const { volume, paths, journalFd, report, setStatus } = ctx;
  const { manifest, owner } = volume;
  const status = ctx.status;
  const cleanup = new CleanupStack();
  try {
    setStatus({ state: 'recovering' });
    const afterCommit = epochs === undefined ? undefined : (c: SealedCommit): void => {
      epochs.committed();
      if (c.rekeyedFrom !== undefined) report({ kind: 'rekeyed', from: c.rekeyedFrom, to: c.keyGeneration, epoch: c.epoch });
      setStatus({ sealed: store.sealedState() });
    };
    // Root's record covers each reservation before the store writes it (openServedStore's beforeReserve).
    await recoverLeftover(paths, volume, store, journalFd, report, { afterCommit, scanPool: ctx.scanPool });
    const held = await retryQuarantine(owner.uid);
    setStatus({ quarantinedLoops: held });
    if (held.length >= MAX_QUARANTINED) {
      throw new VbdError(`${held.length} loop devices of earlier sessions are still held open (${held.map((n) => `/dev/loop${n}`).join(', ')}); close them first`);
    }

    const image = await createImage(paths.shadow, manifest.deviceSize, volume.identity);
    cleanup.push('free the RAM image', () => destroyImage(image));
    report({ kind: 'ram-image', size: image.size, path: image.path });

    setStatus({ state: 'populating', image: image.path });
    const started = performance.now();
    const progress = startProgress('populate', manifest.deviceSize);
    const { damaged, threads } = await store.fill(image, { damaged: 'zero', pool: ctx.scanPool }, (n) => progress.advance(n));
    progress.done();
    const populateMs = Math.round(performance.now() - started);
    if (damaged.length > 0) {
      // Nothing is exposed until the owner decides: a refusal, or --zero-damaged.
      if (!o.zeroDamaged) throw new IoError(damagedRefusal(manifest.name, damaged));
      report({ kind: 'damaged-served-as-zeros', damaged: { count: damaged.length, listed: listDamaged(damaged, MAX_LISTED_DAMAGED) } });
      setStatus({ damagedChunks: damaged.slice(0, MAX_LISTED_DAMAGED) });
    }
    report({ kind: 'populated', size: manifest.deviceSize, ms: roundMs(populateMs), threads, sealedEpoch: store.epoch });
    setStatus({ populateMs, populateThreads: threads, sealed: store.sealedState() });
    const engine = new FlushEngine(volume, image, store, journalFd, report);
    engine.afterCommit = afterCommit;
    const tracker = new ChangeTracker(volume.identity, manifest.chunkSize, manifest.deviceSize / manifest.chunkSize, report, trackerOptions(o.maxDirtyBytes));
    engine.tracker = tracker;
    engine.scanPool = ctx.scanPool;
    await engine.hashImage();
    // Damaged slots must not stay referenced: the next flush seals the chunks (zeros) anew.
    engine.markDirty(damaged.map((d) => d.chunk));
    const recordFlush = (r: FlushResult): void => {
      const { idle, ...flush } = r;
      // One status write per flush check (each is a file write and a rename).
      setStatus({
        lastCheck: { at: r.at, idle, ok: r.ok, durationMs: r.durationMs },
        flushChecks: status().flushChecks + 1,
        ...(idle ? {} : { lastFlush: flush, flushFailures: status().flushFailures + (r.ok ? 0 : 1) }),
        ...(r.ok ? { lastGoodFlush: r.at } : {}),
        tracking: engine.trackingMode(),
        scan: engine.scanState(),
      });
    };
    // The trace instance goes with the final flush (which still reads the set it kept), also
    // when that fails and the rest of the teardown is held back. The kernel frees it, and the
    // scan threads end, while the RAM image is freed.
    cleanup.push('final writeback to the files', async () => {
      try {
        await finalFlush(engine, recordFlush, report);
      } finally {
        cleanup.later('remove the trace instance', tracker.stop(), report);
      }
      if (ctx.scanPool !== undefined && ctx.lastSession()) cleanup.later('end the scan threads', ctx.scanPool.close(), report);
    }, { guard: true });

    const loop = await attachLoop(image.fd, image.path, image.backing);
    const device = loop.path;
    // Unbound, the device can no longer change the image: the tracker reads its last events,
    // and the final flush runs while the kernel removes the device.
    cleanup.push(`detach ${device}`, async () => {
      await unbindLoop(loop, image.backing, report);
      tracker.seal();
      engine.device = undefined;
      cleanup.later(`remove ${device}`, removeLoop(loop, report).then((removal) => {
        if (removal === 'quarantined') setStatus({ quarantinedLoops: quarantine(owner.uid, loop.index) });
      }), report);
    });
    disableDiscard(loop);
    // Before anyone else can open the device: every write to it is traced.
    tracker.start(loop, { thaws: o.mountPoint !== undefined });
    setStatus({ tracking: engine.trackingMode(), scan: engine.scanState() });
    engine.device = loop;
    engine.resetBaseline();
    const link = publishName(owner, manifest.name, loop);
    cleanup.push(`remove ${link}`, () => unpublishName(owner, manifest.name, loop));
    // With root's mount on it, the raw node stays root's unless asked: writing a mounted
    // filesystem's bytes underneath the kernel is a known attack surface.
    const ownerHasNode = o.mountPoint === undefined || o.rawAccess;
    if (ownerHasNode) giveDevice(loop, owner);
    report({ kind: 'attached', device, link, ownerNode: ownerHasNode, uid: owner.uid });
    setStatus({ device, link });

    const formatted = o.mkfs !== undefined && (await formatIfNew(loop, o.mkfs, image, owner, ownerHasNode, report));
    if (o.nbd !== undefined) {
      if (o.mountPoint !== undefined) throw new VbdError('an NBD export and a mount of the same device are two writers; refusing');
      const nbd = await startNbdExport(loop, owner, paths.dir, o.nbd, report, (why) => {
        report({ kind: 'nbd-ended-by-itself', why });
        setStatus({ nbd: undefined, nbdError: `nbdkit ${why}` });
      });
      // Unwound before the final writeback: nothing writes through NBD after the last flush.
      cleanup.push(`end the NBD export (nbdkit pid ${nbd.state.pid})`, async () => {
        await nbd.stop();
        setStatus({ nbd: undefined });
        report({ kind: 'nbd-ended' });
      });
      report({ kind: 'nbd-exporting', device, pid: nbd.state.pid, uid: owner.uid, tlsPsk: nbd.state.tls === 'psk', uri: nbd.state.uri });
      setStatus({ nbd: nbd.state });
    }
    const point = o.mountPoint;
    if (point !== undefined) {
      const mounted = mountDevice(loop, point, owner, formatted ? o.mkfs : undefined);
      engine.mounted = mounted;
      cleanup.push(`unmount ${point.path}`, async () => {
        // Busy: say who holds it (unmountDevice reports; status tells `stop`), keep the files current, retry.
        const since = new Date().toISOString();
        const busy = (at: string, holders: string[]): void => setStatus({ waitingFor: { what: 'unmount', path: at, holders, since } });
        while (!unmountDevice(mounted, report, busy)) {
          recordFlush(await engine.flush('waiting for unmount'));
          await sleep(2000);
        }
        if (status().waitingFor !== undefined) setStatus({ waitingFor: undefined });
        engine.mounted = undefined;
        report({ kind: 'unmounted', path: point.path });
      });
      // ext* got its root owner from mkfs; other new filesystems get it here.
      if (formatted && o.mkfs !== undefined && needsRootChown(o.mkfs)) chownMountRoot(mounted, owner);
      report({ kind: 'mounted', device, path: point.path });
      setStatus({ mountpoint: point.path });
    }

    // The scheduler's timers also keep Node's event loop alive (signal handlers alone do not).
    const scheduler = new FlushScheduler(engine, { intervalMs: o.intervalMs, maxDirtyBytes: o.maxDirtyBytes, onResult: recordFlush, report });
    cleanup.push('stop periodic flushes', async () => {
      scheduler.stop();
      ctx.requestFlush = undefined;
      // A flush still running (frozen, perhaps, while the pool hashes) ends before the unmount.
      await engine.settled();
    });
    ctx.requestFlush = (why) => void scheduler.request(why);
    scheduler.start();
    const watcher = new ExternalChangeWatcher(volume, () => engine.settled(), (change) => {
      report({ kind: 'external-change', file: change.name, what: change.what, keptAs: change.keptAs });
      setStatus({ externalChanges: status().externalChanges + 1, lastExternalChange: { at: new Date().toISOString(), ...change } });
      engine.hashFiles(change.file);
      void scheduler.request('external change');
    }, report);
    engine.afterWrite = () => watcher.recordOwnWrites();
    await watcher.start();
    cleanup.push('stop watching the backing files', () => watcher.stop());
    setStatus({ state: 'live' });
    report({ kind: 'live', intervalMs: o.intervalMs, maxDirtyBytes: o.maxDirtyBytes });
    const reason = await ended;
    report({ kind: 'tearing-down', reason });
    setStatus({ state: 'stopping' });
  } catch (err) {
    report({ kind: 'start-failed', error: messageOf(err) });
    const undoError = await cleanup.unwind(report);
    if (undoError !== undefined) keepImageNotice(paths.shadow, volume.dir, report);
    throw err;
  }
  const error = await cleanup.unwind(report);
  if (error !== undefined) keepImageNotice(paths.shadow, volume.dir, report);
  else report({ kind: 'session-over' });
  return error;
}

const MAX_LISTED_DAMAGED = 20;

/**
 * VBD_SHADOW_TRACKING=off turns change tracking off (every flush scans: the benchmark's
 * "before"); the ring buffer per CPU is sized from max-dirty (traceBufferKb), or set by
 * VBD_SHADOW_TRACE_BUFFER_KB (tests force an overrun).
 */
function trackerOptions(maxDirtyBytes: number): { bufferKb?: number; maxDirtyBytes: number; off?: string } {
  const kb = Number(process.env['VBD_SHADOW_TRACE_BUFFER_KB']);
  return {
    maxDirtyBytes,
    ...(Number.isInteger(kb) && kb > 0 ? { bufferKb: kb } : {}),
    ...(process.env['VBD_SHADOW_TRACKING'] === 'off' ? { off: 'switched off by VBD_SHADOW_TRACKING=off' } : {}),
  };
}

function damagedRefusal(name: string, damaged: readonly DamagedChunk[]): string {
  return `volume '${name}': ${damaged.length} slots fail authentication (corrupted, tampered with, or an old or misplaced slot): ${listDamaged(damaged)}; nothing was exposed or written. ` +
    `To serve the volume with those chunks zeroed, start it with --zero-damaged (the next flush seals them anew)`;
}

/** The last flush, after detach: everything that differs from the files, retried twice. */
async function finalFlush(engine: FlushEngine, recordFlush: (r: FlushResult) => void, report: Report): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    const r = await engine.flush('teardown', true);
    recordFlush(r);
    if (r.ok) {
      report({ kind: 'final-flush', chunks: r.chunksChanged, bytes: r.bytesWritten, ms: roundMs(r.durationMs) });
      return;
    }
    report({ kind: 'final-flush-failed', attempt, of: 3, error: r.error ?? 'unknown error' });
    if (attempt === 3) throw new VbdError(r.error ?? 'final flush failed');
    await sleep(1000 * attempt);
  }
}

function keepImageNotice(shadow: string, dir: string, report: Report): void {
  if (existsSync(`${shadow}/image`)) {
    report({ kind: 'image-kept', path: `${shadow}/image`, dir });
  }
}

/** Formats only a device that has never held data (all zero): never mkfs over a user's bytes. */
async function formatIfNew(loop: LoopDevice, type: MkfsType, image: ShadowImage, owner: Owner, asOwner: boolean, report: Report): Promise<boolean> {
  if (!isAllZero(image)) {
    report({ kind: 'mkfs-skipped', fsType: type });
    return false;
  }
  await makeFilesystem(loop, type, owner, asOwner);
  report({ kind: 'formatted', device: loop.path, fsType: type, asOwner });
  return true;
}
