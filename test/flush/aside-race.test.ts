// The owner races the daemon's aside directory: while she keeps writing to a backing file (each
// write is an external change, and the daemon keeps a copy in vbd-shadow-aside/), a process of
// hers swaps vbd-shadow-aside between her real directory and a symlink to a root-owned
// directory, as fast as renameat2(RENAME_EXCHANGE) goes. Root must never create anything in
// the root-owned directory (the old code lstat'ed the path, then created the copy by path: the
// copy, hers and with her bytes, landed in root's directory); every copy kept is hers, in her
// directory; the daemon stays live and the files still match the device at stop.

import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, lstatSync, mkdirSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readStatus } from '../../src/daemon/runtime.js';
import { sha256 } from '../helpers/cli.js';
import { Stage, eachTestCleanup } from '../helpers/cleanup.js';
import { startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { trackedChildren } from '../helpers/children.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, runAs, type User } from '../helpers/system.js';
import { tempDir } from '../helpers/tmp.js';

const MiB = 2 ** 20;

/**
 * The attacker, one process of hers: writes 64 random bytes into the backing file (an external
 * change: the daemon checks it within a few ms and keeps a copy aside), then for the next few
 * ms swaps the aside directory and the symlink with renameat2(RENAME_EXCHANGE) as fast as it
 * can (the window in which the daemon opens the aside directory and creates the copy), then
 * rests. Swapping without rest floods the directory's inotify queue (millions of renames) and
 * hides her writes from the watcher: no check would run at all. Prints the writes and swaps.
 */
const RACER = `
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
path, a, b = sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode()
end, burst, rest = time.monotonic() + float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
size = os.stat(path).st_size
writes = swaps = 0
while time.monotonic() < end:
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, os.urandom(64), (writes * 4096 * 7 + 100) % (size - 64))
    os.close(fd)
    writes += 1
    stop = time.monotonic() + burst
    while time.monotonic() < stop:
        for _ in range(20):
            if libc.renameat2(-100, a, -100, b, 2) == 0:
                swaps += 1
    time.sleep(rest)
print(writes, swaps)
`;

interface Background {
  child: ChildProcess;
  /** Its stdout, once it exited 0 (else throws with its stderr). */
  done: () => Promise<string>;
}

const children = trackedChildren();

/** A python program run as `user`, in the background (the system's python: root's PATH may hold shims she cannot run). */
function pythonAs(user: User, program: string, args: string[]): Background {
  const child = spawn('setpriv', [`--reuid=${user.uid}`, `--regid=${user.gid}`, '--clear-groups', '/usr/bin/python3', '-c', program, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  let out = '';
  let err = '';
  child.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', resolve));
  const done = async (): Promise<string> => {
    const code = await exited;
    if (code !== 0) throw new Error(`python as ${user.name} exited ${code}: ${err}`);
    return out;
  };
  return { child, done };
}

async function until(what: string, ok: () => boolean, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe.skipIf(!IS_ROOT)(`the aside directory under a symlink race (${IS_ROOT ? 'as root, a real user racing' : ROOT_SKIP_REASON})`, () => {
  it('swapping vbd-shadow-aside for a symlink to root\'s directory creates nothing there; every copy kept is hers', async () => {
    const { user, scratch, home } = ownedScratch();
    const dir = join(home, 'vol');
    const name = `${TEST_PREFIX}aside-race`;
    const init = cliAs(user, ['init', dir, '--size', '4M', '--files', '4', '--chunk', '4K', '--name', name]);
    expect(init.status, init.stderr).toBe(0);
    const image = randomBytes(4 * MiB);
    const imagePath = join(scratch, 'in.img');
    writeFileSync(imagePath, image, { mode: 0o644 });
    chmodSync(imagePath, 0o644);
    const imported = cliAs(user, ['import', dir, imagePath]);
    expect(imported.status, imported.stderr).toBe(0);

    // Root's directory (a fresh one, root 0755, in a directory everyone can traverse).
    const rootSide = tempDir();
    chmodSync(rootSide, 0o755);
    const rootDir = join(rootSide, 'root-owned');
    mkdirSync(rootDir, { mode: 0o755 });
    chmodSync(rootDir, 0o755);

    // Her real aside directory, and her symlink to root's, under a dot name the volume ignores.
    const aside = join(dir, 'vbd-shadow-aside');
    const swap = join(dir, '.aside-swap');
    expect(runAs(user, 'mkdir', ['-m', '700', aside]).status).toBe(0);
    expect(runAs(user, 'ln', ['-s', rootDir, swap]).status).toBe(0);

    const daemon = startDaemon(name, [dir, '--interval', '1h']);
    const live = await waitLive(daemon);

    // The race: cycles of one write, 5 ms of swapping, 10 ms of rest, for 9 s: ~580 writes,
    // ~150 checks (the daemon checks once per flush it triggers), ~280000 swaps. Against the
    // old code (lstat, then create by path) the same loop lost 4 times in ~137 checks, the
    // first after ~33 checks (2 s): copies of hers, with her bytes, in root's directory.
    const RACE_SECONDS = 9;
    const racer = pythonAs(user, RACER, [join(dir, 'file002'), aside, swap, String(RACE_SECONDS), '0.005', '0.010']);
    const [writes, swaps] = (await racer.done()).trim().split(' ').map(Number) as [number, number];
    expect(writes).toBeGreaterThan(100);
    expect(swaps).toBeGreaterThan(100 * writes);

    // Settle, then one lone write of hers once nothing is flushing: its check rewrites every
    // chunk of file002 that differs from RAM. (A write that lands while a flush syncs is taken
    // for the daemon's own and never repaired: external-change-during-flush.test.ts. The race's
    // last write can be one; this lone write makes the check below about the aside race only.)
    const settled = async (): Promise<number> => {
      for (let last = -1; ;) {
        await new Promise((r) => setTimeout(r, 1000));
        const now = readStatus(name)?.externalChanges ?? 0;
        if (now === last) return now;
        last = now;
      }
    };
    const beforeLone = await settled();
    expect(runAs(user, '/usr/bin/python3', ['-c', `import os\nfd = os.open(${JSON.stringify(join(dir, 'file002'))}, os.O_WRONLY)\nos.pwrite(fd, b'lone write', 12345)`]).status).toBe(0);
    await until('the lone write to be checked', () => (readStatus(name)?.externalChanges ?? 0) > beforeLone);
    const truth = readFileSync(live.device ?? '');
    expect(sha256(truth)).toBe(sha256(image)); // the device never took her bytes
    await until('file002 to be repaired from RAM', () => readFileSync(join(dir, 'file002')).equals(truth.subarray(MiB, 2 * MiB)));

    // Nothing was ever created in root's directory, which is still root's.
    expect(readdirSync(rootDir)).toEqual([]);
    const rootStat = statSync(rootDir);
    expect([rootStat.uid, rootStat.gid, rootStat.mode & 0o7777]).toEqual([0, 0, 0o755]);

    // Her directory is wherever the last swap left it; every copy in it is hers, a plain file.
    const realAside = lstatSync(aside).isDirectory() ? aside : swap;
    expect(lstatSync(realAside).isDirectory()).toBe(true);
    expect(lstatSync(realAside).uid).toBe(user.uid);
    const kept = readdirSync(realAside);
    for (const entry of kept) {
      const st = lstatSync(join(realAside, entry));
      expect([entry, st.isFile(), st.uid, st.gid, st.nlink]).toEqual([entry, true, user.uid, user.gid, 1]);
    }
    // The race was really run on both sides: some checks found her directory (copies kept),
    // some found the symlink (no copy: refused), and each check was counted.
    const changes = readStatus(name)?.externalChanges ?? 0;
    expect(changes).toBeGreaterThanOrEqual(60); // about twice the checks the old code needed to lose once
    expect(kept.length).toBeGreaterThan(0);
    expect(changes - kept.length).toBeGreaterThan(0);
    // Nothing else appeared in the volume directory.
    expect(readdirSync(dir).sort()).toEqual(['.aside-swap', 'file001', 'file002', 'file003', 'file004', 'vbd-shadow-aside', 'vbd-shadow.journal', 'vbd-shadow.json'].sort());

    // The daemon stayed live and serves on; at stop the files hold exactly the device's bytes.
    expect(daemon.child.exitCode).toBeNull();
    expect(readStatus(name)?.state).toBe('live');
    const flushed = cliAs(user, ['flush', name]);
    expect(flushed.status, flushed.stderr).toBe(0);
    expect(await stopDaemon(daemon)).toBe(0);
    const out = join(home, 'out.img');
    const exported = cliAs(user, ['export', dir, out]);
    expect(exported.status, exported.stderr).toBe(0);
    expect(sha256(readFileSync(out))).toBe(sha256(truth));
  });
});
