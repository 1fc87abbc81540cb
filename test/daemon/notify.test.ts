// Type=notify for real: the sd_notify client sends datagrams to a socket the test listens on (a
// path and the abstract namespace); the daemon in wait mode says READY while it waits for its
// agent, STATUS follows it to live and through a flush, and SIGTERM brings STOPPING and
// EXTEND_TIMEOUT_USEC; the agent says READY only once the volume is live; a teardown held up by
// a busy mount keeps extending the stop timeout.

import { spawn } from 'node:child_process';
import { closeSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readStatus } from '../../src/daemon/runtime.js';
import { EXTEND_BY_USEC, EXTEND_EVERY_MS } from '../../src/daemon/readiness.js';
import { createNotifier, sendDatagram } from '../../src/sys/notify.js';
import { startAgent } from '../helpers/agent.js';
import { trackedChildren } from '../helpers/children.js';
import { cliOk } from '../helpers/cli.js';
import { startDaemon, stopDaemon, waitEvent, waitLive, waitState } from '../helpers/daemon.js';
import { listenForNotifications } from '../helpers/notify-listener.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, isMounted } from '../helpers/system.js';
import { tempDir } from '../helpers/tmp.js';

const children = trackedChildren();

describe('the sd_notify client', () => {
  it('sends one datagram of NAME=VALUE lines to a socket path and to an abstract name', async () => {
    const byPath = await listenForNotifications(join(tempDir(), 'notify.sock'));
    sendDatagram(byPath.socket, 'READY=1\nSTATUS=on a path');
    expect((await byPath.waitFor('the message', (m) => m['READY'] === '1')).message).toEqual({ READY: '1', STATUS: 'on a path' });
    const abstract = await listenForNotifications(`@vbdt-notify-${process.pid}`);
    const env: NodeJS.ProcessEnv = { NOTIFY_SOCKET: abstract.socket };
    const notifier = createNotifier((m) => expect.fail(m), env);
    // Taken out of the environment: no child can speak for the service.
    expect(env['NOTIFY_SOCKET']).toBeUndefined();
    notifier.send({ STATUS: 'abstract\nsecond line cut', EXTEND_TIMEOUT_USEC: 5 });
    expect((await abstract.waitFor('the message', (m) => m['STATUS'] !== undefined)).message).toEqual({ STATUS: 'abstract', EXTEND_TIMEOUT_USEC: '5' });
  });

  it('is a no-op without NOTIFY_SOCKET, and reports a dead socket once instead of throwing', () => {
    expect(createNotifier(() => expect.fail('no socket, no error'), {}).active).toBe(false);
    const errors: string[] = [];
    const notifier = createNotifier((m) => errors.push(m), { NOTIFY_SOCKET: join(tempDir(), 'nobody-listens.sock') });
    notifier.send({ READY: 1 });
    notifier.send({ STATUS: 'again' });
    expect(errors).toHaveLength(1);
    expect(errors[0]).toMatch(/^cannot notify the service manager: sendto NOTIFY_SOCKET \/.*nobody-listens\.sock: .*ENOENT/);
    expect(() => sendDatagram('relative.sock', 'READY=1')).toThrow(/neither an absolute path nor '@'/);
  });
});

describe.skipIf(!IS_ROOT)(`Type=notify (${IS_ROOT ? 'as root, agent as a real user' : ROOT_SKIP_REASON})`, () => {
  it('wait mode: READY while waiting, the agent READY only once live, STATUS live and its flushes, STOPPING and EXTEND_TIMEOUT on SIGTERM', async () => {
    const { user, home } = ownedScratch();
    const dir = join(home, 'vol');
    const name = `${TEST_PREFIX}notify`;
    expect(cliAs(user, ['init', dir, '--size', '8M', '--files', '4', '--name', name]).status).toBe(0);
    const manager = await listenForNotifications(join(tempDir(), 'notify.sock'));
    const daemon = startDaemon(name, [dir, '--canary', 'wait', '--interval', '1h'], undefined, { NOTIFY_SOCKET: manager.socket });

    const ready = await manager.waitFor('READY', (m) => m['READY'] === '1');
    expect(ready.message['STATUS']).toBe('waiting for agent');
    expect(readStatus(name)?.state).toBe('waiting');
    expect(manager.messages().slice(0, ready.index).some((m) => 'READY' in m)).toBe(false);

    // The agent's own manager (the user's): an abstract socket, which needs no file permissions.
    const userManager = await listenForNotifications(`@vbdt-agent-notify-${process.pid}`);
    const agent = startAgent(user, [dir], { NOTIFY_SOCKET: userManager.socket });
    const agentReady = await userManager.waitFor('the agent\'s READY', (m) => m['READY'] === '1');
    const atReady = readStatus(name);
    expect(atReady?.state).toBe('live');
    expect(agentReady.message['STATUS']).toBe(`volume '${name}' live: ${atReady?.link} -> ${atReady?.device}`);
    const before = userManager.messages().slice(0, agentReady.index);
    expect(before.map((m) => m['STATUS'])).toEqual(expect.arrayContaining(['connected; waiting for the volume to be attached']));
    expect(before.some((m) => 'READY' in m)).toBe(false);

    const live = await waitLive(daemon);
    await manager.waitFor('STATUS live', (m) => m['STATUS'] === `live on ${live.device}, no flush yet`);
    const fd = openSync(live.device ?? '', 'r+');
    writeSync(fd, Buffer.alloc(65536, 7), 0, 65536, 0);
    closeSync(fd);
    cliOk(['flush', name]);
    const flushed = readStatus(name)?.lastFlush;
    expect(flushed?.ok).toBe(true);
    await manager.waitFor('STATUS with the last flush', (m) => m['STATUS'] === `live on ${live.device}, last flush ${flushed?.at}`);

    const stopAt = manager.messages().length;
    expect(await stopDaemon(daemon)).toBe(0);
    const after = manager.messages().slice(stopAt);
    expect(after[0]).toEqual({ STOPPING: '1' });
    expect(after.map((m) => m['EXTEND_TIMEOUT_USEC']).filter((v) => v !== undefined)).toContain(String(EXTEND_BY_USEC));
    const statuses = after.map((m) => m['STATUS']).filter((v) => v !== undefined);
    expect(statuses).toContain('stopping: writing back');
    expect(statuses.at(-1)).toBe('stopped: everything written back');
    expect(await agent.exited).toBe(0);
  });

  it('a teardown that waits for a busy mount keeps extending the stop timeout', async () => {
    const { user, scratch, home } = ownedScratch();
    const dir = join(home, 'vol');
    const mnt = join(scratch, 'mnt');
    const name = `${TEST_PREFIX}notify-busy`;
    expect(cliAs(user, ['init', dir, '--size', '32M', '--files', '4', '--name', name]).status).toBe(0);
    const manager = await listenForNotifications(join(tempDir(), 'notify.sock'));
    const daemon = startDaemon(name, [dir, '--mkfs', 'ext4', '--mount', mnt, '--interval', '1h'], undefined, { NOTIFY_SOCKET: manager.socket });
    await waitLive(daemon);
    expect((await manager.waitFor('READY', (m) => m['READY'] === '1')).message['STATUS']).toMatch(/^live on \/dev\/loop\d+, mounted on .*\/mnt, no flush yet$/);
    // Someone keeps a shell in the mount: the unmount has to wait.
    const holder = spawn('sleep', ['600'], { cwd: mnt, stdio: 'ignore' });
    children.push(holder);

    daemon.child.kill('SIGTERM');
    const first = await manager.waitFor('EXTEND_TIMEOUT_USEC', (m) => m['EXTEND_TIMEOUT_USEC'] !== undefined);
    await waitState(daemon, 'stopping');
    const second = await manager.waitFor('a second EXTEND_TIMEOUT_USEC', (m) => m['EXTEND_TIMEOUT_USEC'] !== undefined && manager.messages().indexOf(m) > first.index, EXTEND_EVERY_MS + 5000);
    expect(second.message['EXTEND_TIMEOUT_USEC']).toBe(String(EXTEND_BY_USEC));
    const busy = await waitEvent(daemon.name, 'unmount-busy');
    expect(busy.path).toMatch(/mnt$/);
    expect(busy.holders.some((h) => h.includes('sleep'))).toBe(true);
    expect(isMounted(mnt)).toBe(true);
    expect(manager.messages().map((m) => m['STATUS'])).toContain('stopping: writing back');

    holder.kill('SIGKILL');
    expect(await daemon.exited).toBe(0);
    expect(isMounted(mnt)).toBe(false);
  });
});
