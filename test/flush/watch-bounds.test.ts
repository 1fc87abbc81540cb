// What the daemon spends watching the volume directory does not grow with what the owner puts
// in it: 5000 entries (files, directories, files inside those) created by her while the volume
// is live cost root no inotify watch (the old watcher spent one of root's watches per entry,
// and ran out of them). Counted from the kernel: the `inotify wd:` lines of the daemon's
// inotify fds. The daemon stays live, flushes, and stops cleanly.

import { randomBytes } from 'node:crypto';
import { closeSync, openSync, readFileSync, readdirSync, readlinkSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readStatus } from '../../src/daemon/runtime.js';
import { sha256 } from '../helpers/cli.js';
import { startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, runAs } from '../helpers/system.js';

const MiB = 2 ** 20;
const FILES = 4;

/** inotify watches held by `pid`: the `inotify wd:` lines of each of its inotify fds. */
function inotifyWatches(pid: number): number {
  let watches = 0;
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    let target: string;
    try {
      target = readlinkSync(`/proc/${pid}/fd/${fd}`);
    } catch {
      continue; // closed meanwhile
    }
    if (target !== 'anon_inode:inotify') continue;
    watches += readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8').split('\n').filter((l) => l.startsWith('inotify wd:')).length;
  }
  return watches;
}

/** Creates (as the owner) `count` entries in `dir`: half files, half directories, a file in every tenth directory. */
const CREATE = `
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n // 2):
    with open(os.path.join(d, 'junk%05d' % i), 'w') as f:
        f.write('x')
    os.mkdir(os.path.join(d, 'dir%05d' % i))
    if i % 10 == 0:
        with open(os.path.join(d, 'dir%05d' % i, 'inner'), 'w') as f:
            f.write('y')
print(len(os.listdir(d)))
`;

/** Touches every file the owner created (more events on entries the daemon must not watch). */
const TOUCH = `
import os, sys
d = sys.argv[1]
for name in os.listdir(d):
    p = os.path.join(d, name)
    if name.startswith('junk'):
        with open(p, 'a') as f: f.write('z')
    elif name.startswith('dir') and os.path.exists(os.path.join(p, 'inner')):
        with open(os.path.join(p, 'inner'), 'a') as f: f.write('z')
`;

async function settle(ms: number): Promise<void> {
  await new Promise((r) => setTimeout(r, ms));
}

describe.skipIf(!IS_ROOT)(`the daemon's watches (${IS_ROOT ? 'as root, entries made by a real user' : ROOT_SKIP_REASON})`, () => {
  it('5000 entries of the owner in the volume directory cost root no inotify watch', async () => {
    const { user, home } = ownedScratch();
    const dir = join(home, 'vol');
    const name = `${TEST_PREFIX}watch-bounds`;
    const init = cliAs(user, ['init', dir, '--size', '4M', '--files', String(FILES), '--chunk', '4K', '--name', name]);
    expect(init.status, init.stderr).toBe(0);
    const daemon = startDaemon(name, [dir, '--interval', '1h']);
    const live = await waitLive(daemon);
    const pid = daemon.child.pid ?? -1;
    const before = inotifyWatches(pid);
    expect(before).toBeGreaterThan(0); // it does watch (the directory, or the backing files)
    expect(before).toBeLessThanOrEqual(FILES + 4);

    const created = runAs(user, '/usr/bin/python3', ['-c', CREATE, dir, '5000']);
    expect(created.status, created.stderr).toBe(0);
    expect(Number(created.stdout)).toBe(5000 + FILES + 2); // + the manifest and the journal
    await settle(2000); // the watcher has seen the adds
    const afterCreate = inotifyWatches(pid);
    const touched = runAs(user, '/usr/bin/python3', ['-c', TOUCH, dir]);
    expect(touched.status, touched.stderr).toBe(0);
    await settle(2000);
    const afterTouch = inotifyWatches(pid);
    expect({ before, afterCreate, afterTouch }).toEqual({ before, afterCreate: before, afterTouch: before });
    expect(readStatus(name)?.externalChanges).toBe(0); // her own entries are not backing files

    // Still live, and it flushes: new device bytes reach the backing files.
    expect(daemon.child.exitCode).toBeNull();
    const data = randomBytes(4 * MiB);
    const fd = openSync(live.device ?? '', 'r+');
    writeSync(fd, data, 0, data.length, 0);
    closeSync(fd);
    const flushed = cliAs(user, ['flush', name]);
    expect(flushed.status, flushed.stderr).toBe(0);
    const files = ['file001', 'file002', 'file003', 'file004'].map((f) => readFileSync(join(dir, f)));
    expect(sha256(Buffer.concat(files))).toBe(sha256(data)); // linear: the files in order are the device
    expect(inotifyWatches(pid)).toBe(before);
    expect(await stopDaemon(daemon)).toBe(0);
  });
});
