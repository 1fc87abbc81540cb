// A write to a backing file by someone else that lands while a flush is syncing (after the
// flush wrote its chunks, before it recorded the files' identities as its own) must still be
// found and repaired from RAM. Found by aside-race.test.ts (its race's last write stayed in the
// file in about one run in three; export then differed from the device after a clean stop).
// Made deterministic here: strace, attached to the live daemon, delays its syncfs by 1 s, and
// a process of the owner writes file002 the moment the flush's bytes appear in it.
//
// KNOWN BUG (it.fails): src/flush/engine.ts calls afterWrite() only after `await applyBatch`
// (whose syncfs runs on the thread pool), and ExternalChangeWatcher.recordOwnWrites()
// (src/flush/external.ts) records whatever fstat says then; the watcher's check for her write
// waits for the flush (quiet()), finds the recorded identity, and returns. Her bytes stay in
// the file, the device never had them, and the final flush writes nothing (its hashes say the
// file holds RAM's bytes).

import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, openSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readStatus } from '../../src/daemon/runtime.js';
import { sha256 } from '../helpers/cli.js';
import { Stage, eachTestCleanup } from '../helpers/cleanup.js';
import { startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { trackedChildren } from '../helpers/children.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, runAs, type User } from '../helpers/system.js';

const MiB = 2 ** 20;
const FLUSHED_AT = 40_960; // in file002: the chunk the flush writes
const HERS_AT = 500_000; // in file002: where she writes meanwhile (another chunk)

const children = trackedChildren();

function background(command: string, args: string[]): { child: ChildProcess; output: () => string; exited: Promise<number | null> } {
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  let text = '';
  child.stdout?.on('data', (d: Buffer) => (text += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (text += d.toString()));
  return { child, output: () => text, exited: new Promise((resolve) => child.on('exit', (code) => resolve(code))) };
}

/** As `user`: waits until `path` holds `want` at `at`, then writes `hers` at `hersAt`. */
function writeWhenFlushed(user: User, path: string, at: number, want: Buffer, hersAt: number, hers: string): ReturnType<typeof background> {
  const program = `
import os, sys, time
path, at, want, hers_at, hers = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), int(sys.argv[4]), sys.argv[5].encode()
fd = os.open(path, os.O_RDWR)
end = time.monotonic() + 30
while os.pread(fd, len(want), at) != want:
    if time.monotonic() > end:
        sys.exit('the flush never wrote')
os.pwrite(fd, hers, hers_at)
print('written')
`;
  return background('setpriv', [`--reuid=${user.uid}`, `--regid=${user.gid}`, '--clear-groups', '/usr/bin/python3', '-c', program, path, String(at), want.toString('hex'), String(hersAt), hers]);
}

async function until(what: string, ok: () => boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe.skipIf(!IS_ROOT)(`an external write during a flush's sync (${IS_ROOT ? 'as root, strace slows the sync' : ROOT_SKIP_REASON})`, () => {
  // KNOWN BUG, see the header: remove `.fails` once the watcher no longer takes her write for ours.
  it.fails('is found and repaired from RAM; the export is the device', async () => {
    const { user, home } = ownedScratch();
    const dir = join(home, 'vol');
    const name = `${TEST_PREFIX}during-flush`;
    const init = cliAs(user, ['init', dir, '--size', '4M', '--files', '4', '--chunk', '4K', '--name', name]);
    expect(init.status, init.stderr).toBe(0);
    const daemon = startDaemon(name, [dir, '--interval', '1h']);
    const live = await waitLive(daemon);
    const pid = daemon.child.pid ?? -1;

    // Every syncfs of the daemon (all its threads) now waits 1 s before it runs.
    const tracer = background('strace', ['-f', '-qq', '-o', '/dev/null', '-p', String(pid), '-e', 'trace=syncfs', '-e', 'inject=syncfs:delay_enter=1000000']);
    await new Promise((r) => setTimeout(r, 1000));
    expect(tracer.child.exitCode, tracer.output()).toBeNull();

    // Control, under the same tracing: her write while no flush runs is found and repaired.
    const before = readFileSync(live.device ?? '');
    const control = runAs(user, '/usr/bin/python3', ['-c', `import os\nfd = os.open(${JSON.stringify(join(dir, 'file003'))}, os.O_WRONLY)\nos.pwrite(fd, b'control write', 1000)`]);
    expect(control.status, control.stderr).toBe(0);
    await until('the control write to be repaired', () => (readStatus(name)?.externalChanges ?? 0) === 1 && readFileSync(join(dir, 'file003')).equals(before.subarray(2 * MiB, 3 * MiB)), 20_000);
    await new Promise((r) => setTimeout(r, 500)); // its flush is over

    // New bytes on the device for the flush to write; she waits for them to reach file002.
    const fresh = randomBytes(4096);
    const fd = openSync(live.device ?? '', 'r+');
    writeSync(fd, fresh, 0, fresh.length, MiB + FLUSHED_AT);
    closeSync(fd);
    const writer = writeWhenFlushed(user, join(dir, 'file002'), FLUSHED_AT, fresh, HERS_AT, 'HER WRITE DURING THE SYNC');
    const flushed = cliAs(user, ['flush', name]);
    expect(flushed.status, flushed.stderr).toBe(0);
    expect(await writer.exited, writer.output()).toBe(0);
    tracer.child.kill('SIGTERM'); // detach: the daemon runs on untraced
    await tracer.exited;

    // She wrote while the flush synced: file002 holds her bytes now, the device does not.
    const truth = readFileSync(live.device ?? '');
    expect(readFileSync(join(dir, 'file002')).subarray(HERS_AT, HERS_AT + 25).toString()).toBe('HER WRITE DURING THE SYNC');
    expect(truth.subarray(MiB + HERS_AT, MiB + HERS_AT + 25).toString()).not.toBe('HER WRITE DURING THE SYNC');

    // What must happen: the change is noticed and file002 repaired from RAM.
    await until('her write to be found and repaired', () => (readStatus(name)?.externalChanges ?? 0) >= 2 && readFileSync(join(dir, 'file002')).equals(truth.subarray(MiB, 2 * MiB)), 10_000);
    expect(await stopDaemon(daemon)).toBe(0);
    const out = join(home, 'out.img');
    const exported = cliAs(user, ['export', dir, out]);
    expect(exported.status, exported.stderr).toBe(0);
    expect(sha256(readFileSync(out))).toBe(sha256(truth));
  });
});
