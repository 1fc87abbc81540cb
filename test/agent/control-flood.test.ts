// The owner floods a LIVE daemon's control FIFO: 24 MiB of newlines and terminal garbage
// offered as fast as the pipe takes them, for 5 s, from a process of hers. Root's log must stay
// small (the old daemon logged one line per bad line: 73 MB in 11 s), the daemon stays live, and
// her `flush` and `stop` right after the flood still work.

import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, openSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { readStatus } from '../../src/daemon/runtime.js';
import { sha256 } from '../helpers/cli.js';
import { Stage, eachTestCleanup } from '../helpers/cleanup.js';
import { startDaemon, waitLive } from '../helpers/daemon.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, runtimeDirOf, type User } from '../helpers/system.js';
import { trackedChildren } from '../helpers/children.js';

const WRITER = fileURLToPath(new URL('../fixtures/pipe-writer.mjs', import.meta.url));
const MiB = 2 ** 20;
const FLOOD_BYTES = 24 * MiB;
const FLOOD_SECONDS = 5;

const children = trackedChildren();

/** The pipe writer fixture in flood mode, as `user`; resolves with its report. */
function floodAs(user: User, path: string): Promise<{ written: number; lines: number; eagain: number; ms: number }> {
  const child = spawn('setpriv', [`--reuid=${user.uid}`, `--regid=${user.gid}`, '--clear-groups', process.execPath, WRITER, 'flood', path, String(FLOOD_SECONDS), String(FLOOD_BYTES)], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.push(child);
  let out = '';
  let err = '';
  child.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (err += d.toString()));
  return new Promise((resolve, reject) => child.on('exit', (code) => {
    if (code !== 0) reject(new Error(`flood writer exited ${code}: ${err}`));
    else resolve(JSON.parse(out) as { written: number; lines: number; eagain: number; ms: number });
  }));
}

describe.skipIf(!IS_ROOT)(`a flood on a live daemon's control pipe (${IS_ROOT ? 'as root, the owner floods' : ROOT_SKIP_REASON})`, () => {
  it('the log stays under 64 KiB; the daemon stays live; flush and stop right after work', async () => {
    const { user, home } = ownedScratch();
    const dir = join(home, 'vol');
    const name = `${TEST_PREFIX}control-flood`;
    const init = cliAs(user, ['init', dir, '--size', '4M', '--files', '4', '--chunk', '4K', '--name', name]);
    expect(init.status, init.stderr).toBe(0);
    const daemon = startDaemon(name, [dir, '--interval', '1h']);
    const live = await waitLive(daemon);
    const logBefore = Buffer.byteLength(daemon.output());
    const fifo = `${runtimeDirOf(name)}/control.fifo`;

    const report = await floodAs(user, fifo);
    // The flood was real: the pipe stayed full (she was writing faster than root reads).
    expect(report.eagain).toBeGreaterThan(0);
    expect(report.written).toBeGreaterThan(64 * 1024);
    expect(report.lines).toBeGreaterThan(1000);

    const logged = Buffer.byteLength(daemon.output()) - logBefore;
    expect(logged, `the flood made the daemon log ${logged} bytes`).toBeLessThan(64 * 1024);
    expect(daemon.output()).not.toContain('\x1b'); // her escape sequences never reach root's terminal
    expect(daemon.output()).not.toContain('\x07');
    expect(daemon.child.exitCode).toBeNull();
    expect(readStatus(name)?.state).toBe('live');

    // Right after: the device's bytes change; she flushes (they reach the files) and stops.
    const data = randomBytes(4 * MiB);
    const fd = openSync(live.device ?? '', 'r+');
    writeSync(fd, data, 0, data.length, 0);
    closeSync(fd);
    const flushed = cliAs(user, ['flush', name]);
    expect(flushed.status, flushed.stderr).toBe(0);
    const files = ['file001', 'file002', 'file003', 'file004'].map((f) => readFileSync(join(dir, f)));
    expect(sha256(Buffer.concat(files))).toBe(sha256(data));
    const stopped = cliAs(user, ['stop', name]);
    expect(stopped.status, stopped.stderr).toBe(0);
    expect(await daemon.exited).toBe(0);
    const total = Buffer.byteLength(daemon.output()) - logBefore;
    expect(total).toBeLessThan(64 * 1024);
  });
});
