// What `status`, `flush` and `stop` accept as a volume: a path that leaves the runtime
// directory (`..`, `../..`, `/etc`), a name with a slash or with control characters each get
// one clean error line and no one's status; and a second real user sees none of the first
// user's volumes by name or in the list, and cannot flush or stop them (by name or directory).

import { spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { readStatus } from '../../src/daemon/runtime.js';
import { BIN, cli } from '../helpers/cli.js';
import { startDaemon, waitLive } from '../helpers/daemon.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, OTHER_USER, cliAs, ensureUser, type User } from '../helpers/system.js';

/** The CLI as `user`, from the directory `cwd`. */
function cliAsIn(user: User, cwd: string, args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync('setpriv', [`--reuid=${user.uid}`, `--regid=${user.gid}`, '--clear-groups', process.execPath, BIN, ...args], { cwd, encoding: 'utf8', timeout: 120_000 });
  return { status: r.status, stdout: String(r.stdout), stderr: String(r.stderr) };
}

const BAD_TARGETS = ['..', '../..', '/etc', '/', '/run/vbd-shadow', 'a/b', `${TEST_PREFIX}x/..`, 'x\x1b[2Jy', 'x\x07\x08y', 'x\ny', 'x\ry', '\x1b]0;owned\x07', '-', '.hidden', 'x'.repeat(200)];

/** One error line, nothing of the live volume in it, nothing on stdout. */
function expectRefused(r: { status: number | null; stdout: string; stderr: string }, target: string, victim: string): void {
  const shown = JSON.stringify(target);
  expect(r.status, `${shown}: ${r.stderr}`).not.toBe(0);
  expect(r.stdout, shown).toBe('');
  expect(r.stderr, shown).toMatch(/^vbd-shadow: [^\n]+\n$/);
  expect(r.stderr, shown).not.toContain(victim);
  // What she typed comes back escaped: no control character reaches the terminal.
  expect(r.stderr.slice(0, -1), shown).not.toMatch(/[\x00-\x1f\x7f]/);
}

describe.skipIf(!IS_ROOT)(`status, flush and stop by name (${IS_ROOT ? 'as root, two real users' : ROOT_SKIP_REASON})`, () => {
  it('paths and bad names get one error line; another user sees, flushes and stops nothing of hers', async () => {
    const { user, home } = ownedScratch();
    const other = ensureUser(OTHER_USER);
    const dir = join(home, 'vol');
    const name = `${TEST_PREFIX}status-names`;
    const init = cliAs(user, ['init', dir, '--size', '4M', '--files', '2', '--name', name]);
    expect(init.status, init.stderr).toBe(0);
    const daemon = startDaemon(name, [dir, '--interval', '1h']);
    const live = await waitLive(daemon);
    const stillLive = (): void => {
      expect(daemon.child.exitCode).toBeNull();
      expect(readStatus(name)?.state).toBe('live');
      expect(readStatus(name)?.pid).toBe(live.pid);
    };

    // Bad targets, from her home (where `..` is not a volume), as her, as the other user, as root.
    for (const target of BAD_TARGETS) {
      expectRefused(cliAsIn(user, home, ['status', target]), target, name);
      expectRefused(cliAsIn(other, home, ['status', target]), target, name);
      expectRefused(cli(['status', target], { cwd: home }), target, name);
      expectRefused(cliAsIn(user, home, ['flush', target]), target, name);
      expectRefused(cliAsIn(user, home, ['stop', target]), target, name);
    }
    stillLive();

    // The other user: not by name, not in the list, not as JSON.
    const byName = cliAs(other, ['status', name]);
    expect(byName.status).toBe(3); // not found (src/common/exit-codes.ts)
    expect(byName.stdout).toBe('');
    expect(byName.stderr).toBe(`vbd-shadow: no volume named '${name}' has been started here by you\n`);
    const list = cliAs(other, ['status']);
    expect(list.status, list.stderr).toBe(0);
    expect(list.stdout).not.toContain(name);
    expect(list.stdout).not.toContain(dir);
    const json = cliAs(other, ['status', '--json']);
    expect(json.status, json.stderr).toBe(0);
    const seen = JSON.parse(json.stdout) as { name: string; owner: { uid: number } }[];
    expect(seen.filter((s) => s.name === name || s.owner.uid === user.uid)).toEqual([]);

    // …nor flush or stop it, by name or by its directory (which she can read).
    for (const target of [name, dir]) {
      for (const command of ['flush', 'stop']) {
        const r = cliAs(other, [command, target]);
        expect(r.status, `${command} ${target}: ${r.stderr}`).not.toBe(0);
        expect(r.stdout).toBe('');
        expect(r.stderr).toMatch(/^vbd-shadow: [^\n]+\n$/);
        stillLive();
      }
    }

    // The owner herself: her volume by name, in her list; she flushes and stops it.
    const mine = cliAs(user, ['status', '--json']);
    expect((JSON.parse(mine.stdout) as { name: string }[]).map((s) => s.name)).toEqual([name]);
    expect(cliAs(user, ['flush', name]).status).toBe(0);
    const stopped = cliAs(user, ['stop', name]);
    expect(stopped.status, stopped.stderr).toBe(0);
    expect(await daemon.exited).toBe(0);
  }, 300_000);
});
