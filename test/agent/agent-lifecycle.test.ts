// Living with the volume through the agent: a real unprivileged user's agent connects, the
// volume attaches; the agent dies (kill -9) or logs out (SIGTERM) and within a second the
// daemon tears down, having written back what the user synced; then it waits for the next.

import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { startAgent } from '../helpers/agent.js';
import { eventsOf, startDaemon, stopDaemon, waitLive, waitState } from '../helpers/daemon.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, leftovers, runAs, runtimeDirOf, isMounted } from '../helpers/system.js';

/** The ISO time at the start of the daemon's log line containing `text`. */
function loggedAt(output: string, text: string): number {
  const line = output.split('\n').find((l) => l.includes(text));
  if (line === undefined) throw new Error(`no log line with '${text}' in:\n${output}`);
  return Date.parse(line.split(' ')[0] ?? '');
}

function fileInVolume(user: Parameters<typeof cliAs>[0], dir: string, home: string, path: string): string {
  const image = join(home, `check-${Date.now()}.img`);
  expect(cliAs(user, ['export', dir, image]).status).toBe(0);
  expect(spawnSync('e2fsck', ['-fn', image]).status).toBe(0);
  const r = spawnSync('debugfs', ['-R', `cat ${path}`, image], { encoding: 'utf8' });
  spawnSync('rm', ['-f', image]);
  return r.stdout;
}

describe.skipIf(!IS_ROOT)(`agent lifecycle (${IS_ROOT ? 'as root, agent as a real user' : ROOT_SKIP_REASON})`, () => {
  it('kill -9 of the agent: teardown within 1 s, synced data in the files, nothing left; SIGTERM likewise; twice in a row', async () => {
    const { user, scratch, home } = ownedScratch();
    const dir = join(home, 'vol');
    const mnt = join(scratch, 'mnt');
    const name = `${TEST_PREFIX}agent`;
    expect(cliAs(user, ['init', dir, '--size', '32M', '--files', '8', '--name', name]).status).toBe(0);
    const daemon = startDaemon(name, [dir, '--canary', 'wait', '--mkfs', 'ext4', '--mount', mnt]);
    await waitState(daemon, 'waiting');

    // Session 1: the agent is killed.
    const first = startAgent(user, [dir]);
    await waitLive(daemon);
    expect(runAs(user, 'sh', ['-c', `echo first session > ${mnt}/one.txt && sync`]).status).toBe(0);
    const killedAt = Date.now();
    first.child.kill('SIGKILL');
    await waitState(daemon, 'waiting');
    const noticed = loggedAt(daemon.output(), 'tearing down: the agent is gone');
    expect(noticed - killedAt).toBeLessThan(1000);
    expect(isMounted(mnt)).toBe(false);
    expect(existsSync(`${runtimeDirOf(name)}/shadow/image`)).toBe(false);
    expect(leftovers()).toEqual([]);
    expect(fileInVolume(user, dir, home, '/one.txt')).toBe('first session\n');

    // Session 2: the agent logs out (SIGTERM); the first session's data is still there.
    const second = startAgent(user, [dir]);
    await waitLive(daemon);
    expect(runAs(user, 'cat', [`${mnt}/one.txt`]).stdout).toBe('first session\n');
    expect(runAs(user, 'sh', ['-c', `echo second session > ${mnt}/two.txt && sync`]).status).toBe(0);
    second.child.kill('SIGTERM');
    expect(await second.exited).toBe(0);
    expect(second.output()).toMatch(/SIGTERM: asked the daemon to write everything back and detach/);
    await waitState(daemon, 'waiting');
    expect(eventsOf(daemon.name)).toContainEqual({ kind: 'tearing-down', reason: 'the agent asked for teardown (logout)' });
    expect(leftovers()).toEqual([]);
    expect(fileInVolume(user, dir, home, '/two.txt')).toBe('second session\n');
    expect(fileInVolume(user, dir, home, '/one.txt')).toBe('first session\n');

    expect(await stopDaemon(daemon)).toBe(0);
  });
});
