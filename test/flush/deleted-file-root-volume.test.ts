// A backing file deleted while the volume is live is recreated, also where the old code could
// not: a volume owned by root (the aside copy is root's own) and a user's volume whose
// vbd-shadow-aside/ was made by root (no copy can be kept there for her). The old code failed
// its external-change check in both cases, kept flushing into the unlinked inode, and lost at
// stop everything written after the deletion. Here: delete, write new data to the device
// afterwards, stop; the file is back at its path and the export is the device's bytes.

import { randomBytes } from 'node:crypto';
import { chmodSync, closeSync, lstatSync, mkdirSync, openSync, readFileSync, readdirSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readStatus } from '../../src/daemon/runtime.js';
import { cliOk, sha256 } from '../helpers/cli.js';
import { startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs } from '../helpers/system.js';
import { tempDir } from '../helpers/tmp.js';

const MiB = 2 ** 20;

async function until(what: string, ok: () => boolean, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * The volume in `dir` (4 files of 1 MiB, linear) is live under a daemon: deletes file003,
 * waits for the daemon to notice, writes new bytes over the whole device, stops, and checks
 * that file003 is back, the owner's, and that the export is the device as written after the
 * deletion.
 */
async function deleteThenWrite(dir: string, name: string, owner: { uid: number; gid: number }, exportTo: (out: string) => void, out: string): Promise<void> {
  const daemon = startDaemon(name, [dir, '--interval', '1h']);
  const live = await waitLive(daemon);
  const deletedIno = lstatSync(join(dir, 'file003')).ino;

  rmSync(join(dir, 'file003'));
  await until('the deletion to be noticed', () => (readStatus(name)?.externalChanges ?? 0) >= 1);
  expect(readStatus(name)?.lastExternalChange?.what).toBe('deleted');

  // New data after the deletion, on the whole device, then written back at stop.
  const after = randomBytes(4 * MiB);
  const fd = openSync(live.device ?? '', 'r+');
  writeSync(fd, after, 0, after.length, 0);
  closeSync(fd);
  expect(sha256(readFileSync(live.device ?? ''))).toBe(sha256(after));
  expect(daemon.child.exitCode).toBeNull();
  expect(await stopDaemon(daemon)).toBe(0);

  // The file is back at its path: a new inode, a regular file of the owner, of its size.
  const back = lstatSync(join(dir, 'file003'));
  expect([back.isFile(), back.ino !== deletedIno, back.uid, back.gid, back.nlink, back.size]).toEqual([true, true, owner.uid, owner.gid, 1, MiB]);
  expect(sha256(readFileSync(join(dir, 'file003')))).toBe(sha256(after.subarray(2 * MiB, 3 * MiB)));
  exportTo(out);
  expect(sha256(readFileSync(out))).toBe(sha256(after));
}

describe.skipIf(!IS_ROOT)(`a backing file deleted while live (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  it('is recreated in a root-owned volume, and what was written after the deletion is not lost', async () => {
    const scratch = tempDir();
    chmodSync(scratch, 0o755);
    const dir = join(scratch, 'vol');
    const name = `${TEST_PREFIX}deleted-root`;
    cliOk(['init', dir, '--size', '4M', '--files', '4', '--chunk', '4K', '--name', name]);
    chmodSync(dir, 0o755);
    const st = lstatSync(dir);
    expect([st.uid, st.mode & 0o777]).toEqual([0, 0o755]);
    const before = randomBytes(4 * MiB);
    const image = join(scratch, 'in.img');
    writeFileSync(image, before);
    cliOk(['import', dir, image]);

    await deleteThenWrite(dir, name, { uid: 0, gid: 0 }, (out) => cliOk(['export', dir, out]), join(scratch, 'out.img'));
    // What the deleted file held was kept aside (root's volume, root's copy).
    const kept = readdirSync(join(dir, 'vbd-shadow-aside'));
    expect(kept).toHaveLength(1);
    expect(kept[0]).toMatch(/^file003\./);
    expect(sha256(readFileSync(join(dir, 'vbd-shadow-aside', kept[0] ?? '')))).toBe(sha256(before.subarray(2 * MiB, 3 * MiB)));
  });

  it('is recreated in a user\'s volume whose aside directory root made, and nothing is lost', async () => {
    const { user, scratch, home } = ownedScratch();
    const dir = join(home, 'vol');
    const name = `${TEST_PREFIX}deleted-aside`;
    const init = cliAs(user, ['init', dir, '--size', '4M', '--files', '4', '--chunk', '4K', '--name', name]);
    expect(init.status, init.stderr).toBe(0);
    const image = join(scratch, 'in.img');
    writeFileSync(image, randomBytes(4 * MiB), { mode: 0o644 });
    chmodSync(image, 0o644);
    const imported = cliAs(user, ['import', dir, image]);
    expect(imported.status, imported.stderr).toBe(0);
    // Root made vbd-shadow-aside before the start (e.g. an earlier `sudo` run): root's, 0755.
    const aside = join(dir, 'vbd-shadow-aside');
    mkdirSync(aside, { mode: 0o755 });
    const asideBefore = lstatSync(aside);
    expect(asideBefore.uid).toBe(0);

    const out = join(home, 'out.img');
    await deleteThenWrite(dir, name, user, () => {
      const r = cliAs(user, ['export', dir, out]);
      expect(r.status, r.stderr).toBe(0);
    }, out);
    // Root's aside directory was left as it was: still root's, still empty (nothing of hers in it).
    const asideAfter = lstatSync(aside);
    expect([asideAfter.uid, asideAfter.ino, asideAfter.mode]).toEqual([0, asideBefore.ino, asideBefore.mode]);
    expect(readdirSync(aside)).toEqual([]);
  });
});
