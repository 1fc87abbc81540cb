// `stop` and `flush` say on the terminal what they wait for (issue 11): while a process sits in
// the mount (its cwd there), the teardown cannot unmount; `stop` says so on stderr, naming the
// process, when first seen and then at most every 5 s, and completes once the process leaves.
// Neither command says anything when it does not wait.

import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { cli, cliArgv } from '../helpers/cli.js';
import { trackedChildren } from '../helpers/children.js';
import { startDaemon, waitLive } from '../helpers/daemon.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, isMounted } from '../helpers/system.js';
import { UNNAMED_HOLDER } from '../../src/daemon/events.js';

const children = trackedChildren();
const WAITING = /^vbd-shadow: waiting (\d+) s for (.+) to be unmounted \(volume '(.+)'\): it is busy, held by (.+); the files are kept current meanwhile$/;

async function until(what: string, done: () => boolean, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!done()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe.skipIf(!IS_ROOT)(`stop says what it waits for (${IS_ROOT ? 'real daemon, ext4 mount, a process sitting in it' : ROOT_SKIP_REASON})`, () => {
  it('a process with its cwd in the mount: stop names it on stderr while it waits, at most every 5 s, and completes once it leaves', async () => {
    const { user, scratch, home } = ownedScratch();
    const dir = join(home, 'vol');
    const mnt = join(scratch, 'mnt');
    const name = `${TEST_PREFIX}stop-busy`;
    expect(cliAs(user, ['init', dir, '--size', '32M', '--files', '4', '--name', name]).status).toBe(0);
    const daemon = startDaemon(name, [dir, '--mkfs', 'ext4', '--mount', mnt, '--interval', '1h']);
    await waitLive(daemon);

    // No waiting, nothing said: a flush (the session's first scans), with and without someone in the mount.
    const quiet = cliAs(user, ['flush', name]);
    expect([quiet.status, quiet.stderr]).toEqual([0, '']);
    const holder = spawn('setpriv', [`--reuid=${user.uid}`, `--regid=${user.gid}`, '--clear-groups', 'sleep', '600'], { cwd: mnt, stdio: 'ignore' });
    children.push(holder);
    const busyFlush = cliAs(user, ['flush', name]);
    expect([busyFlush.status, busyFlush.stderr]).toEqual([0, '']);

    // stop, as the owner would run it: it waits, and says for what.
    const [cmd, argv] = cliArgv(['stop', name]);
    const stop = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
    children.push(stop);
    let out = '';
    let err = '';
    stop.stdout.on('data', (b: Buffer) => (out += b.toString()));
    stop.stderr.on('data', (b: Buffer) => (err += b.toString()));
    const stopped = new Promise<number | null>((r) => stop.once('close', r));
    const lines = (): string[] => err.split('\n').filter((l) => l !== '');

    await until('the first waiting line', () => lines().length > 0);
    const first = WAITING.exec(lines()[0] ?? '');
    expect(first, err).not.toBeNull();
    expect(first?.[2]).toBe(mnt);
    expect(first?.[3]).toBe(name);
    // Under the unit's capabilities (npm test) root cannot read another user's /proc links
    // (that needs CAP_SYS_PTRACE): the holder is then said to be unnamed, and why.
    const named = `pid ${holder.pid} (sleep)`;
    const confined = process.env['VBD_TEST_CONFINED'] === '1';
    if (confined) expect(first?.[4]).toBe(UNNAMED_HOLDER);
    else expect(first?.[4]).toContain(named);
    const firstAt = Date.now();
    // The daemon's status says the same (the fact the message comes from).
    const status = JSON.parse(cli(['status', name, '--json']).stdout) as { state: string; waitingFor: { path: string; holders: string[] } | null }[];
    expect(status[0]?.state).toBe('stopping');
    expect(status[0]?.waitingFor?.path).toBe(mnt);
    if (confined) expect(status[0]?.waitingFor?.holders).toEqual([]);
    else expect(status[0]?.waitingFor?.holders).toContain(named);

    // Said again while it lasts, but not more often than every 5 s.
    await until('a second waiting line', () => lines().length > 1, 15_000);
    const elapsed = Date.now() - firstAt;
    expect(elapsed).toBeGreaterThanOrEqual(4_500);
    expect(lines().length).toBeLessThanOrEqual(1 + Math.ceil(elapsed / 5000));
    expect(lines().every((l) => WAITING.test(l)), err).toBe(true);
    expect(stop.exitCode).toBeNull();
    expect(isMounted(mnt)).toBe(true);

    // The process leaves: the unmount goes through and stop completes.
    holder.kill('SIGTERM');
    expect(await stopped, err).toBe(0);
    expect(out).toBe(`volume '${name}' stopped: written back, detached, RAM freed\n`);
    expect(isMounted(mnt)).toBe(false);
    expect(await daemon.exited).toBe(0);
    expect(lines().every((l) => WAITING.test(l)), err).toBe(true);
  }, 120_000);
});
