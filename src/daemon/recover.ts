// Recovery comes before exposure: an image left in the volume's private tmpfs by a killed
// daemon (or by a teardown whose writeback failed) is written into the files before a new
// image is made — only if it carries this volume's identity. Its loop device and mount, if
// still there, are found through the kernel (the device bound to that image file; the mounts
// of that device), checked through fds, and taken down for real first.

import { closeSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { VbdError } from '../common/errors.js';
import { sleep } from '../common/fd.js';
import { runOk } from '../common/exec.js';
import { loopsBoundTo, quarantine, removeLoop, unbindLoop, unpublishName } from '../device/loop.js';
import { thawIfFrozen } from '../device/freeze.js';
import { holdersOf, mountsOfLoop, unmountDevice } from '../device/mount.js';
import { FlushEngine } from '../flush/engine.js';
import type { ChunkStore } from '../store/chunk-store.js';
import { destroyImage, isTmpfsMounted, openLeftoverImage } from '../shadow/image.js';
import type { AnyVolume } from '../volume/volume.js';
import { roundMs, type Report } from './events.js';
import type { RuntimePaths } from './runtime.js';

const UNMOUNT_ATTEMPTS = 20;

/** Returns true if a leftover image was found and written back. */
/** `journalFd`: a plain volume's flush journal (undefined for a sealed one). */
/** `hooks`: a sealed volume's epoch record, kept before and after the commit (see FlushEngine); the daemon's scan pool. */
export async function recoverLeftover(paths: RuntimePaths, volume: AnyVolume, store: ChunkStore, journalFd: number | undefined, report: Report, hooks: Partial<Pick<FlushEngine, 'afterCommit' | 'scanPool'>> = {}): Promise<boolean> {
  if (!isTmpfsMounted(paths.shadow)) return false;
  const imagePath = join(paths.shadow, 'image');
  if (!existsSync(imagePath)) {
    report({ kind: 'recovery-empty-tmpfs', path: paths.shadow });
    await runOk('umount', [paths.shadow]);
    return false;
  }
  report({ kind: 'recovery-found-image', path: imagePath });
  const image = openLeftoverImage(paths.shadow, volume.identity);
  try {
    for (const loop of await loopsBoundTo(image.backing)) {
      for (const mounted of mountsOfLoop(loop.index)) {
        if (thawIfFrozen(mounted)) report({ kind: 'recovery-thawed', path: mounted.path });
        // Processes of the crashed session may still be exiting: retry for a while.
        for (let attempt = 1; !unmountDevice(mounted, report); attempt++) {
          if (attempt === UNMOUNT_ATTEMPTS) {
            throw new VbdError(`the earlier daemon's filesystem at ${mounted.path} is busy (held by ${holdersOf(mounted.path).join(', ') || 'an unknown user'}); close it and start again`);
          }
          await sleep(500);
        }
        report({ kind: 'recovery-unmounted', path: mounted.path });
      }
      await unbindLoop(loop, image.backing, report);
      if ((await removeLoop(loop, report)) === 'quarantined') quarantine(volume.owner.uid, loop.index);
      unpublishName(volume.owner, volume.manifest.name, loop);
      report({ kind: 'recovery-detached', device: loop.path });
    }
  } catch (err) {
    closeSync(image.fd);
    throw err;
  }
  if (image.size !== volume.manifest.deviceSize) {
    throw new VbdError(`the leftover RAM image ${imagePath} is ${image.size} bytes but the volume is ${volume.manifest.deviceSize}; refusing to touch either (inspect it by hand)`);
  }
  // The image's flush state died with its daemon: compare against what the files hold and
  // write the difference as one commit, like any flush.
  const engine = new FlushEngine(volume, image, store, journalFd, report);
  engine.afterCommit = hooks.afterCommit;
  engine.scanPool = hooks.scanPool;
  engine.hashFiles();
  const result = await engine.flush('recovery', true);
  if (!result.ok) throw new VbdError(`recovery of the leftover image failed, it is kept at ${imagePath}: ${result.error}`);
  report({ kind: 'recovered', chunks: result.chunksChanged, bytes: result.bytesWritten, ms: roundMs(result.durationMs) });
  await destroyImage(image);
  return true;
}
