// Discard would punch holes in the tmpfs image, silently unlocking its RAM. The daemon turns
// discard off on the loop device: after a default mkfs (which discards) and fstrim, the image
// is still wholly resident and locked, and the data is intact.

import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, openSync, readFileSync, readSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { cliOk, sha256 } from '../helpers/cli.js';
import { startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, procStatus } from '../helpers/system.js';
import { tempDir } from '../helpers/tmp.js';

const SIZE = 64 * 2 ** 20;

describe.skipIf(!IS_ROOT)(`discard (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  it('mkfs with its default discard, then fstrim: the image stays resident, locked and correct', async () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    const mnt = join(scratch, 'mnt');
    const name = `${TEST_PREFIX}discard`;
    cliOk(['init', dir, '--size', '64M', '--files', '4', '--name', name]);
    const daemon = startDaemon(name, [dir]);
    const live = await waitLive(daemon);
    const device = live.device ?? '';
    const pid = daemon.child.pid ?? 0;
    expect(readFileSync(`/sys/block/${device.slice(5)}/queue/discard_max_bytes`, 'utf8').trim()).toBe('0');

    // A user's own mkfs, discarding by default: the kernel must say discard is unsupported.
    const mkfs = spawnSync('mkfs.ext4', ['-F', device], { encoding: 'utf8' });
    expect(mkfs.status, mkfs.stderr).toBe(0);
    spawnSync('mkdir', ['-p', mnt]);
    expect(spawnSync('mount', [device, mnt]).status).toBe(0);
    try {
      const payload = randomBytes(16 * 2 ** 20);
      writeFileSync(join(mnt, 'payload'), payload);
      spawnSync('sync');
      spawnSync('rm', [join(mnt, 'payload')]);
      const trim = spawnSync('fstrim', ['-v', mnt], { encoding: 'utf8' });
      expect(trim.status).not.toBe(0);
      expect(trim.stderr).toMatch(/discard operation is not supported/);
      writeFileSync(join(mnt, 'kept'), payload);
      spawnSync('sync');
      writeFileSync('/proc/sys/vm/drop_caches', '3');
      expect(sha256(readFileSync(join(mnt, 'kept')))).toBe(sha256(payload));
    } finally {
      spawnSync('umount', [mnt]);
    }

    const image = statSync(live.image ?? '');
    expect(image.blocks * 512).toBeGreaterThanOrEqual(SIZE);
    expect(procStatus(pid, 'RssShmem')).toBeGreaterThanOrEqual(SIZE);
    expect(procStatus(pid, 'VmLck')).toBeGreaterThanOrEqual(SIZE);
    // The raw device still reads back through the whole image without error.
    const fd = openSync(device, 'r');
    const buf = Buffer.alloc(2 ** 20);
    let total = 0;
    for (let n = readSync(fd, buf); n > 0; n = readSync(fd, buf)) total += n;
    closeSync(fd);
    expect(total).toBe(SIZE);
    expect(await stopDaemon(daemon)).toBe(0);
  });
});
