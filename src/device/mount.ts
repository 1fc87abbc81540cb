// The filesystem on the device: format on first use, mount for the owner, real unmount.

import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { resolve } from 'node:path';
import { VbdError } from '../common/errors.js';
import { run, runOk } from '../common/exec.js';
import type { Owner } from '../volume/volume.js';

/** The filesystem type blkid finds on the device, or undefined for none. */
export async function filesystemType(device: string): Promise<string | undefined> {
  const r = await run('blkid', ['-p', '-o', 'value', '-s', 'TYPE', device]);
  if (r.code === 2) return undefined; // nothing found
  if (r.code !== 0) throw new VbdError(`blkid ${device} failed (exit ${r.code}): ${r.stderr.trim()}`);
  return r.stdout.trim() || undefined;
}

/** Formats the device, giving the new filesystem's root to the owner; never discards. */
export async function makeFilesystem(device: string, type: string, owner: Owner): Promise<void> {
  if (!/^[a-z0-9]+$/.test(type)) throw new VbdError(`--mkfs: '${type}' is not a filesystem type name`);
  const args: Record<string, string[]> = {
    ext4: ['-q', '-E', `nodiscard,root_owner=${owner.uid}:${owner.gid}`, device],
    ext3: ['-q', '-E', `nodiscard,root_owner=${owner.uid}:${owner.gid}`, device],
    ext2: ['-q', '-E', `nodiscard,root_owner=${owner.uid}:${owner.gid}`, device],
    xfs: ['-q', '-K', device],
  };
  await runOk(`mkfs.${type}`, args[type] ?? [device]);
}

/** Mounts with nosuid,nodev: the filesystem's contents are the user's, so no setuid or devices. */
export async function mountFilesystem(device: string, mountpoint: string): Promise<void> {
  await runOk('mount', ['-o', 'nosuid,nodev', device, mountpoint]);
}

export function isMounted(mountpoint: string): boolean {
  const target = resolve(mountpoint);
  return readFileSync('/proc/self/mounts', 'utf8').split('\n').some((l) => l.split(' ')[1] === target);
}

/** Mountpoints where `device` is mounted. */
export function mountsOf(device: string): string[] {
  return readFileSync('/proc/self/mounts', 'utf8').split('\n')
    .map((l) => l.split(' '))
    .filter((f) => f[0] === device && f[1] !== undefined)
    .map((f) => (f[1] ?? '').replace(/\\040/g, ' '));
}

/** "pid 123 (bash)" for every process whose cwd, root or open files are under `mountpoint`. */
export function holdersOf(mountpoint: string): string[] {
  const root = resolve(mountpoint);
  const under = (p: string): boolean => p === root || p.startsWith(`${root}/`);
  const holders: string[] = [];
  for (const pid of readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
    try {
      const links = ['cwd', 'root'].map((l) => `/proc/${pid}/${l}`);
      for (const fd of readdirSync(`/proc/${pid}/fd`)) links.push(`/proc/${pid}/fd/${fd}`);
      if (links.some((l) => { try { return under(readlinkSync(l)); } catch { return false; } })) {
        holders.push(`pid ${pid} (${readFileSync(`/proc/${pid}/comm`, 'utf8').trim()})`);
      }
    } catch {
      /* the process went away */
    }
  }
  return holders;
}

/** A real (never lazy) unmount; resolves false if busy, after logging who holds it. */
export async function unmountFilesystem(mountpoint: string, log: (line: string) => void): Promise<boolean> {
  const r = await run('umount', [mountpoint]);
  if (r.code === 0) return true;
  if (!isMounted(mountpoint)) return true;
  const holders = holdersOf(mountpoint);
  log(`unmount of ${mountpoint} failed (${r.stderr.trim() || `exit ${r.code}`}); held by ${holders.length > 0 ? holders.join(', ') : 'an unknown user'}; retrying`);
  return false;
}
