// Formatting a new volume on first use. Only an all-zero device is formatted: then no byte the
// owner wrote is parsed by a root tool (there is no blkid probe at all), and nothing of hers
// can be lost to a format. mkfs runs as the owner when she holds the device node anyway.

import { existsSync } from 'node:fs';
import { UsageError, VbdError } from '../common/errors.js';
import { runOk } from '../common/exec.js';
import type { Owner } from '../volume/volume.js';
import type { LoopDevice } from './loop.js';

export const MKFS_TYPES = ['ext4', 'ext3', 'ext2', 'xfs', 'btrfs'] as const;
export type MkfsType = (typeof MKFS_TYPES)[number];

export function parseMkfsType(type: string): MkfsType {
  const found = MKFS_TYPES.find((t) => t === type);
  if (found === undefined) throw new UsageError(`--mkfs must be one of ${MKFS_TYPES.join(', ')}, got '${type}'`);
  return found;
}

/** mkfs arguments: never discard (it would punch holes in the locked image); ext* roots go to the owner. */
function mkfsArgs(type: MkfsType, device: string, owner: Owner): string[] {
  switch (type) {
    case 'ext4':
    case 'ext3':
    case 'ext2':
      return ['-q', '-E', `nodiscard,root_owner=${owner.uid}:${owner.gid}`, device];
    case 'xfs':
      return ['-q', '-K', device];
    case 'btrfs':
      return ['-q', '-K', device];
  }
}

/**
 * Formats the device. `asOwner`: run mkfs as the owner (clean environment, her groups), for
 * when she holds the node; otherwise root runs it on the all-zero device.
 */
export async function makeFilesystem(loop: LoopDevice, type: MkfsType, owner: Owner, asOwner: boolean): Promise<void> {
  const args = mkfsArgs(type, loop.path, owner);
  const tool = mkfsPath(type);
  if (!asOwner) {
    await runOk(tool, args);
    return;
  }
  await runOk('setpriv', [`--reuid=${owner.uid}`, `--regid=${owner.gid}`, '--init-groups', '--reset-env', '--', tool, ...args]);
}

export function needsRootChown(type: MkfsType): boolean {
  return !type.startsWith('ext');
}

/** The system's mkfs.TYPE by absolute path (a dropped environment has no sbin on PATH). */
function mkfsPath(type: MkfsType): string {
  for (const dir of ['/usr/sbin', '/sbin', '/usr/bin', '/bin']) {
    if (existsSync(`${dir}/mkfs.${type}`)) return `${dir}/mkfs.${type}`;
  }
  throw new VbdError(`--mkfs ${type}: mkfs.${type} is not installed`);
}
