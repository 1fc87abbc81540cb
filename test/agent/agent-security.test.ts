// Who may talk to the daemon: only the owner (and root) can open its pipes; garbage on a
// pipe is logged and ignored; the owner (not only root) can flush, see status and stop.

import { closeSync, openSync, writeSync, constants as fsc } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readStatus } from '../../src/daemon/runtime.js';
import { startAgent } from '../helpers/agent.js';
import { eventsOf, startDaemon, waitEvent, waitLive, waitState } from '../helpers/daemon.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, OTHER_USER, cliAs, ensureUser, runAs, runtimeDirOf } from '../helpers/system.js';

describe.skipIf(!IS_ROOT)(`agent pipe security (${IS_ROOT ? 'as root, two real users' : ROOT_SKIP_REASON})`, () => {
  it('another user cannot connect, garbage is ignored, the owner can flush and stop', async () => {
    const { user, home } = ownedScratch();
    const other = ensureUser(OTHER_USER);
    const dir = join(home, 'vol');
    const name = `${TEST_PREFIX}pipes`;
    expect(cliAs(user, ['init', dir, '--size', '8M', '--files', '4', '--name', name]).status).toBe(0);
    const daemon = startDaemon(name, [dir, '--canary', 'wait']);
    await waitState(daemon, 'waiting');
    const pipe = `${runtimeDirOf(name)}/agent.fifo`;

    // Another user: the pipes are the owner's (0600).
    const opened = runAs(other, process.execPath, ['-e', `require('fs').openSync(${JSON.stringify(pipe)}, 'w')`]);
    expect(opened.status).not.toBe(0);
    expect(opened.stderr).toMatch(/EACCES/);
    // By name she does not even see it: names are looked up among her own volumes only.
    const intruder = cliAs(other, ['agent', name]);
    expect(intruder.status).toBe(3); // not found (src/common/exit-codes.ts)
    expect(intruder.stderr).toBe(`vbd-shadow: no volume named '${name}' has been started here by you\n`);
    expect(readStatus(name)?.state).toBe('waiting');

    // The owner's agent; then garbage from root on both pipes, a half-open message included.
    const agent = startAgent(user, [dir]);
    await waitLive(daemon);
    expect(cliAs(other, ['flush', name]).status).toBe(3);
    expect(cliAs(other, ['stop', name]).status).toBe(3);
    for (const path of [pipe, `${runtimeDirOf(name)}/control.fifo`]) {
      const fd = openSync(path, fsc.O_WRONLY | fsc.O_NONBLOCK);
      writeSync(fd, 'this is not json\n{"kind":"launch-missiles"}\n[1,2]\n{"kind":"hello","version":9}\n{"kind":"flu');
      closeSync(fd);
    }
    await waitEvent(name, 'pipe-ignored', (e) => e.pipe === 'control' && e.what.startsWith('an unterminated message'));
    const ignored = eventsOf(name).filter((e) => e.kind === 'pipe-ignored');
    expect(ignored).toContainEqual({ kind: 'pipe-ignored', pipe: 'agent', what: expect.stringMatching(/^not JSON/), suspicious: true });
    expect(ignored).toContainEqual({ kind: 'pipe-ignored', pipe: 'control', what: 'unknown kind "launch-missiles"', suspicious: true });
    expect(ignored).toContainEqual({ kind: 'pipe-ignored', pipe: 'control', what: expect.stringMatching(/^an unterminated message \(\d+ bytes\) at close$/), suspicious: true });
    expect(readStatus(name)?.state).toBe('live');
    expect(daemon.child.exitCode).toBeNull();

    // The owner flushes, reads status, and stops.
    const flushed = cliAs(user, ['flush', name]);
    expect(flushed.status, flushed.stderr).toBe(0);
    expect(cliAs(user, ['status', name, '--json']).stdout).toMatch(/"state": "live"/);
    const stopped = cliAs(user, ['stop', name]);
    expect(stopped.status, stopped.stderr).toBe(0);
    expect(await daemon.exited).toBe(0);
    await agent.exited;
  });
});
