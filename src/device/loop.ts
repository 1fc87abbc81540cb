// The loop device over the RAM image, its stable name, and its write counter.

import { chownSync, chmodSync, closeSync, fsyncSync, mkdirSync, openSync, readFileSync, readlinkSync, renameSync, rmSync, symlinkSync, writeFileSync, constants as fsc } from 'node:fs';
import { basename, join } from 'node:path';
import { VbdError, errnoCode, failure } from '../common/errors.js';
import { run, runOk } from '../common/exec.js';
import { sleep } from '../common/fd.js';
import type { Owner } from '../volume/volume.js';

export const NAME_DIR = '/dev/vbd-shadow';

/** Attaches `imagePath` to a free loop device (512-byte sectors) and returns /dev/loopN. */
export async function attachLoop(imagePath: string): Promise<string> {
  const out = await runOk('losetup', ['--find', '--show', '--sector-size', '512', '--direct-io=off', imagePath]);
  const device = out.trim();
  if (!/^\/dev\/loop\d+$/.test(device)) throw new VbdError(`losetup gave an unexpected device name '${device}'`);
  return device;
}

function sysDir(device: string): string {
  return `/sys/block/${basename(device)}`;
}

/**
 * Turns discard off. On a tmpfs image a discard punches holes: the freed pages leave the
 * mlocked mapping and later writes land in fresh, unlocked pages. With max 0 bytes the
 * kernel reports discard as unsupported (mkfs skips it, fstrim refuses).
 */
export function disableDiscard(device: string): void {
  const path = `${sysDir(device)}/queue/discard_max_bytes`;
  try {
    writeFileSync(path, '0');
  } catch (err) {
    throw failure(`cannot turn off discard on ${device} (${path})`, err);
  }
  if (readFileSync(path, 'utf8').trim() !== '0') throw new VbdError(`discard is still on for ${device}; refusing to risk unlocked RAM`);
}

/** The image file a loop device is attached to, or undefined if it is free. */
export function loopBackingFile(device: string): string | undefined {
  try {
    return readFileSync(`${sysDir(device)}/loop/backing_file`, 'utf8').trim();
  } catch {
    return undefined;
  }
}

/** Loop devices attached to `imagePath` (e.g. left behind by a killed daemon). */
export async function loopsOf(imagePath: string): Promise<string[]> {
  const r = await run('losetup', ['--noheadings', '--output', 'NAME', '--associated', imagePath]);
  return r.stdout.split('\n').map((l) => l.trim()).filter((l) => l.startsWith('/dev/loop'));
}

/** Sectors written to the device so far (field 7 of /sys/block/loopN/stat; only deltas count). */
export function sectorsWritten(device: string): number {
  const fields = readFileSync(`${sysDir(device)}/stat`, 'utf8').trim().split(/\s+/);
  return Number(fields[6] ?? 0);
}

/** Pushes buffered writes to the raw device into the image (cheap when clean). */
export function syncDevice(device: string): void {
  const fd = openSync(device, fsc.O_RDONLY);
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** Detaches and waits until the kernel has let go of the image (a holder keeps it attached). */
export async function detachLoop(device: string, imagePath: string, log: (line: string) => void): Promise<void> {
  syncDevice(device);
  const r = await run('losetup', ['--detach', device]);
  if (r.code !== 0 && loopBackingFile(device) === imagePath) {
    throw new VbdError(`losetup --detach ${device} failed: ${r.stderr.trim()}`);
  }
  for (let waited = 0; loopBackingFile(device) === imagePath; waited++) {
    if (waited % 50 === 0) log(`waiting: ${device} is still open by a process; it detaches when that closes it`);
    await sleep(100);
  }
}

/** Publishes /dev/vbd-shadow/NAME → /dev/loopN (replaced atomically). */
export function publishName(name: string, device: string): string {
  mkdirSync(NAME_DIR, { recursive: true, mode: 0o755 });
  const link = join(NAME_DIR, name);
  const temp = `${link}.new`;
  rmSync(temp, { force: true });
  symlinkSync(device, temp);
  renameSync(temp, link);
  return link;
}

/** Removes the name if it still points at `device`. */
export function unpublishName(name: string, device: string): void {
  const link = join(NAME_DIR, name);
  try {
    if (readlinkSync(link) === device) rmSync(link);
  } catch (err) {
    if (errnoCode(err) !== 'ENOENT') throw failure(`cannot remove ${link}`, err);
  }
}

function diskGroup(): number {
  const line = readFileSync('/etc/group', 'utf8').split('\n').find((l) => l.startsWith('disk:'));
  return Number(line?.split(':')[2] ?? 0);
}

/** Hands the device node to the owner (0600). */
export function giveDevice(device: string, owner: Owner): void {
  chownSync(device, owner.uid, owner.gid);
  chmodSync(device, 0o600);
}

/** Gives the device node back to root:disk 0660, as udev makes it. */
export function restoreDevice(device: string): void {
  chownSync(device, 0, diskGroup());
  chmodSync(device, 0o660);
}
