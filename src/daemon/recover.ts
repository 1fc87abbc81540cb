// Recovery comes before exposure: an image left in the volume's private tmpfs by a killed
// daemon (or by a teardown whose writeback failed) is written into the files before a new
// image is made. Its loop device and mount, if still there, are taken down first (for real).

import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { VbdError } from '../common/errors.js';
import { runOk } from '../common/exec.js';
import { formatSize } from '../common/size.js';
import { detachLoop, loopsOf, restoreDevice, unpublishName } from '../device/loop.js';
import { holdersOf, mountsOf, unmountFilesystem } from '../device/mount.js';
import { writeBackAll } from '../flush/writeback.js';
import type { PlacementTable } from '../layouts/layout.js';
import { destroyImage, isTmpfsMounted, openLeftoverImage } from '../shadow/image.js';
import type { Volume } from '../volume/volume.js';
import type { Log } from './log.js';
import type { RuntimePaths } from './runtime.js';

/** Returns true if a leftover image was found and written back. */
export async function recoverLeftover(paths: RuntimePaths, volume: Volume, table: PlacementTable, log: Log): Promise<boolean> {
  if (!isTmpfsMounted(paths.shadow)) return false;
  const imagePath = join(paths.shadow, 'image');
  if (!existsSync(imagePath)) {
    log(`recovery: empty private tmpfs at ${paths.shadow} from an earlier run; removing it`);
    await runOk('umount', [paths.shadow]);
    return false;
  }
  log(`recovery: found the RAM image of an earlier daemon at ${imagePath}; writing it back before anything else`);
  for (const device of await loopsOf(imagePath)) {
    for (const mountpoint of mountsOf(device)) {
      if (!(await unmountFilesystem(mountpoint, log))) {
        throw new VbdError(`the earlier daemon's filesystem at ${mountpoint} is busy (held by ${holdersOf(mountpoint).join(', ') || 'an unknown user'}); close it and start again`);
      }
      log(`recovery: unmounted ${mountpoint}`);
    }
    await detachLoop(device, imagePath, log);
    restoreDevice(device);
    unpublishName(volume.manifest.name, device);
    log(`recovery: detached ${device}`);
  }
  const image = openLeftoverImage(paths.shadow);
  if (image.size !== volume.manifest.deviceSize) {
    throw new VbdError(`the leftover RAM image ${imagePath} is ${image.size} bytes but the volume is ${volume.manifest.deviceSize}; refusing to touch either (inspect it by hand)`);
  }
  const started = performance.now();
  writeBackAll(image, table, volume);
  log(`recovery: wrote ${formatSize(image.size)} back to the files in ${Math.round(performance.now() - started)} ms`);
  await destroyImage(image);
  return true;
}
