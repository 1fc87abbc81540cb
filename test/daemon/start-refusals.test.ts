// Starts that must be refused: one clear line, non-zero exit, nothing attached, nothing changed.

import { chownSync, linkSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { BIN, cli, treeHash } from '../helpers/cli.js';
import { startDaemon, waitLive } from '../helpers/daemon.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, ensureUser, OTHER_USER, testLoops } from '../helpers/system.js';

function expectRefused(r: { status: number | null; stderr: string }, message: RegExp): void {
  expect(r.status, r.stderr).not.toBe(0);
  expect(r.stderr).toMatch(/^vbd-shadow: [^\n]+\n$/);
  expect(r.stderr).toMatch(message);
}

describe.skipIf(!IS_ROOT)(`start refusals (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  it('a second start on a live volume', async () => {
    const { user, home } = ownedScratch();
    const dir = join(home, 'vol');
    const name = `${TEST_PREFIX}twice`;
    expect(cliAs(user, ['init', dir, '--size', '8M', '--files', '4', '--name', name]).status).toBe(0);
    const first = startDaemon(name, [dir]);
    const live = await waitLive(first);
    const before = treeHash(home);
    expectRefused(cli(['start', dir, '--foreground']), new RegExp(`volume '${name}' is already served by pid ${first.child.pid}`));
    expectRefused(cli(['start', dir]), /already served by pid/);
    expect(testLoops().map(([d]) => d)).toEqual([live.device]);
    expect(treeHash(home)).toBe(before);
  });

  const refusals: { what: string; setup: (dir: string, home: string) => void; run?: (dir: string) => { status: number | null; stderr: string }; error: RegExp }[] = [
    { what: 'start by a non-root user', setup: () => undefined, run: (dir) => cliAs(ensureUser('vbd-test-user'), ['start', dir, '--foreground']), error: /start needs root .*run it with sudo/ },
    {
      what: 'an image larger than the RAM that can be locked',
      setup: () => undefined,
      run: () => {
        // Sparse 64G files, outside the hashed tree (hashing them would read 64G of zeros).
        const { user, home } = ownedScratch();
        const huge = join(home, 'huge');
        expect(cliAs(user, ['init', huge, '--size', '64G', '--files', '4', '--chunk', '1M', '--name', `${TEST_PREFIX}huge`]).status).toBe(0);
        return cli(['start', huge, '--foreground']);
      },
      error: /the RAM image needs 64G of locked memory, but only .* is available/,
    },
    {
      what: 'a memlock limit below the image without CAP_IPC_LOCK',
      setup: () => undefined,
      run: (dir) => {
        const r = spawnSync('prlimit', ['--memlock=1048576', 'setpriv', '--inh-caps=-ipc_lock', '--bounding-set=-ipc_lock', process.execPath, BIN, 'start', dir, '--foreground'], { encoding: 'utf8', timeout: 30_000 });
        return { status: r.status, stderr: r.stderr };
      },
      error: /the memlock limit is 1M and CAP_IPC_LOCK is missing/,
    },
    { what: 'a symlinked backing file', setup: (dir, home) => { writeFileSync(join(home, 'elsewhere'), Buffer.alloc(2 ** 21)); rmSync(join(dir, 'file002')); symlinkSync(join(home, 'elsewhere'), join(dir, 'file002')); }, error: /backing file 'file002': is a symbolic link/ },
    { what: 'a hard-linked backing file', setup: (dir, home) => linkSync(join(dir, 'file003'), join(home, 'second-name')), error: /backing file 'file003' has 2 hard links/ },
    { what: 'a backing file owned by someone else', setup: (dir) => { const other = ensureUser(OTHER_USER); chownSync(join(dir, 'file004'), other.uid, other.gid); }, error: /backing file 'file004' is owned by uid \d+, not the volume owner/ },
  ];

  for (const r of refusals) {
    it(r.what, () => {
      const { user, home } = ownedScratch();
      const dir = join(home, 'vol');
      expect(cliAs(user, ['init', dir, '--size', '8M', '--files', '4', '--name', `${TEST_PREFIX}refuse`]).status).toBe(0);
      r.setup(dir, home);
      const loopsBefore = testLoops();
      const before = treeHash(home);
      expectRefused(r.run?.(dir) ?? cli(['start', dir, '--foreground']), r.error);
      expect(testLoops()).toEqual(loopsBefore);
      expect(treeHash(home)).toBe(before);
    });
  }
});

