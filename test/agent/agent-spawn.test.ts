// `sudo vbd-shadow start DIR` on a terminal: the daemon starts the owner's agent itself
// (dropping to the owner), and Ctrl-C — SIGINT to the terminal's process group — ends both
// cleanly, with everything written back.

import { spawn, spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readStatus } from '../../src/daemon/runtime.js';
import { BIN } from '../helpers/cli.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, OTHER_USER, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, ensureUser, leftovers, runAs, sweep } from '../helpers/system.js';
import { Stage, eachTestCleanup } from '../helpers/cleanup.js';

describe.skipIf(!IS_ROOT)(`start --canary spawn (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  it('spawns the owner\'s agent; Ctrl-C tears everything down', async () => {
    const { user, scratch, home } = ownedScratch();
    const dir = join(home, 'vol');
    const mnt = join(scratch, 'mnt');
    const name = `${TEST_PREFIX}spawn`;
    expect(cliAs(user, ['init', dir, '--size', '16M', '--files', '4', '--name', name]).status).toBe(0);
    // Its own process group, as a terminal's foreground job.
    // As `sudo` run by the owner (SUDO_UID is hers): the terminal is hers.
    const daemon = spawn(process.execPath, [BIN, 'start', dir, '--canary', 'spawn', '--mkfs', 'ext4', '--mount', mnt], { detached: true, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, SUDO_UID: String(user.uid) } });
    let out = '';
    daemon.stdout?.on('data', (d: Buffer) => (out += d.toString()));
    daemon.stderr?.on('data', (d: Buffer) => (out += d.toString()));
    const exited = new Promise<number | null>((r) => daemon.on('exit', (code) => r(code)));
    eachTestCleanup(Stage.Processes, async () => {
      if (daemon.exitCode === null) {
        process.kill(-(daemon.pid ?? 0), 'SIGKILL');
        await exited;
      }
      sweep();
    });
    for (let i = 0; i < 600 && readStatus(name)?.state !== 'live'; i++) await new Promise((r) => setTimeout(r, 50));
    expect(readStatus(name)?.state, out).toBe('live');
    expect(out).toMatch(/agent connected: pid \d+ \(uid \d+\)/);
    expect(out).toContain(`(uid ${user.uid})`);
    expect(runAs(user, 'sh', ['-c', `echo typed at the terminal > ${mnt}/note && sync`]).status).toBe(0);

    process.kill(-(daemon.pid ?? 0), 'SIGINT');
    expect(await exited).toBe(0);
    expect(out).toMatch(/stopped: everything written back/);
    expect(leftovers()).toEqual([]);
  });

  it('refuses --canary spawn when someone else is at the terminal, and names --canary wait', () => {
    const { user, home } = ownedScratch();
    const dir = join(home, 'vol');
    const name = `${TEST_PREFIX}spawn-other`;
    expect(cliAs(user, ['init', dir, '--size', '8M', '--files', '4', '--name', name]).status).toBe(0);
    const other = ensureUser(OTHER_USER);
    for (const env of [{ SUDO_UID: String(other.uid) }, {}]) {
      const r = spawnSync(process.execPath, [BIN, 'start', dir, '--canary', 'spawn'], { encoding: 'utf8', env: { ...process.env, SUDO_UID: undefined, ...env } });
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/^vbd-shadow: --canary spawn .* only the owner .* use --canary wait/);
    }
    expect(readStatus(name)).toBeUndefined();
    expect(leftovers()).toEqual([]);
  });
});
