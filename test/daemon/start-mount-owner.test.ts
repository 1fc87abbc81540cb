// The owner's life with a mounted volume: mkfs on first use, files written by the owner,
// SIGTERM, then everything gone from the kernel and the files holding a clean filesystem
// that, started and mounted again, still holds the owner's files.

import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { isTmpfsMounted } from '../../src/shadow/image.js';
import { startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, leftovers, runAs, runtimeDirOf, isMounted } from '../helpers/system.js';

describe.skipIf(!IS_ROOT)(`start --mkfs ext4 --mount (${IS_ROOT ? 'as root, owner is a real user' : ROOT_SKIP_REASON})`, () => {
  it('the owner writes files; SIGTERM writes them back and leaves nothing behind', async () => {
    const { user, scratch, home } = ownedScratch();
    const dir = join(home, 'vol');
    const mnt = join(scratch, 'mnt');
    const name = `${TEST_PREFIX}owner`;
    expect(cliAs(user, ['init', dir, '--size', '64M', '--files', '16', '--chunk', '64K', '--layout', 'striped', '--name', name]).status).toBe(0);

    const first = startDaemon(name, [dir, '--mkfs', 'ext4', '--mount', mnt]);
    const live = await waitLive(first);
    // Root's mount on it: the raw node stays root's (no rewriting the filesystem under the kernel).
    expect(statSync(live.device ?? '').uid).toBe(0);
    expect(runAs(user, 'dd', [`if=${live.device}`, 'of=/dev/null', 'count=1']).status).not.toBe(0);
    expect(statSync(mnt).uid).toBe(user.uid);
    const write = runAs(user, 'sh', ['-c', `echo "owner's notes" > ${mnt}/notes.txt && head -c 3000000 /dev/urandom > ${mnt}/blob && sha256sum < ${mnt}/blob && sync`]);
    expect(write.status, write.stderr).toBe(0);
    const blobHash = write.stdout.split(' ')[0];

    expect(await stopDaemon(first)).toBe(0);
    expect(isMounted(mnt)).toBe(false);
    expect(existsSync(live.device ?? '')).toBe(false); // the session's own loop device is gone
    expect(existsSync(`${runtimeDirOf(name)}/shadow/image`)).toBe(false);
    expect(isTmpfsMounted(`${runtimeDirOf(name)}/shadow`)).toBe(false);
    expect(leftovers()).toEqual([]);

    const image = join(home, 'exported.img');
    expect(cliAs(user, ['export', dir, image]).status).toBe(0);
    const fsck = spawnSync('e2fsck', ['-fn', image], { encoding: 'utf8' });
    expect(fsck.status, fsck.stdout).toBe(0);

    const second = startDaemon(name, [dir, '--mkfs', 'ext4', '--mount', mnt]);
    await waitLive(second);
    // --mkfs again: the device holds data, so it is not formatted (the files below are still there).
    expect(readFileSync(join(mnt, 'notes.txt'), 'utf8')).toBe("owner's notes\n");
    expect(statSync(join(mnt, 'notes.txt')).uid).toBe(user.uid);
    const reread = runAs(user, 'sh', ['-c', `sha256sum < ${mnt}/blob`]);
    expect(reread.stdout.split(' ')[0]).toBe(blobHash);
    expect(await stopDaemon(second)).toBe(0);
    expect(leftovers()).toEqual([]);
  });
});
