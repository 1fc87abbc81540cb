// The same volume started twice at the same moment: the lock (an flock in the volume's runtime
// directory) lets exactly one daemon serve it; the other exits non-zero naming the live one,
// having made no loop device and no mount. Each round is a fresh race; in the second test the
// holder is slowed down, with strace, between taking the lock and writing its pid into it (the
// window in which the old pid-file lock took an empty file for a dead daemon's and let a
// second daemon serve the same volume).

import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { isAlive, readStatus } from '../../src/daemon/runtime.js';
import { BIN } from '../helpers/cli.js';
import { Stage, eachTestCleanup } from '../helpers/cleanup.js';
import { startDaemon, stopDaemon, type TestDaemon } from '../helpers/daemon.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, leftovers, runtimeDirOf, testLoops } from '../helpers/system.js';

const ROUNDS = 8;
const SLOWED_ROUNDS = 3;
/** How long the slowed holder waits before each write to its lock file (µs). */
const WRITE_DELAY_US = 400_000;

/** Mount table entries as [source, target]. */
function mounts(): [string, string][] {
  return readFileSync('/proc/self/mounts', 'utf8').split('\n').filter((l) => l !== '').map((l) => l.split(' ').slice(0, 2) as [string, string]);
}

async function until(what: string, ok: () => boolean, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A start of the volume whose every write to its lock file is delayed (strace fault injection). */
interface Slowed {
  child: ChildProcess;
  output: () => string;
  exited: Promise<number | null>;
}

const slowed: Slowed[] = [];
eachTestCleanup(Stage.Processes, async () => {
  for (const s of slowed.splice(0)) {
    if (s.child.exitCode !== null || s.child.signalCode !== null) continue;
    // The daemon is strace's child: end it, and strace ends with it.
    const kids = readFileSync(`/proc/${s.child.pid}/task/${s.child.pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
    for (const pid of kids) process.kill(pid, 'SIGTERM');
    const timer = setTimeout(() => {
      for (const pid of kids) if (isAlive(pid)) process.kill(pid, 'SIGKILL');
    }, 30_000);
    await s.exited;
    clearTimeout(timer);
  }
});

function startSlowed(lockFile: string, args: string[]): Slowed {
  const child = spawn('strace', [
    '-f', '--seccomp-bpf', '-qq', '-o', '/dev/null', '-P', lockFile,
    '-e', 'trace=write,pwrite64', '-e', `inject=write,pwrite64:delay_enter=${WRITE_DELAY_US}`,
    process.execPath, BIN, 'start', ...args, '--foreground',
  ], { stdio: ['ignore', 'pipe', 'pipe'] });
  let text = '';
  child.stdout?.on('data', (d: Buffer) => (text += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (text += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const s = { child, output: () => text, exited };
  slowed.push(s);
  return s;
}

/** The lock file of the volume in `dir` (runtime state is keyed by owner uid and dev.ino). */
function lockFileOf(dir: string): string {
  const st = statSync(dir, { bigint: true });
  return `/run/vbd-shadow/${st.uid}/${st.dev}.${st.ino}/daemon.lock`;
}

/** Only the winner's loop device, its one tmpfs, its one mount (on the owner's mount point). */
function expectOneOfEach(name: string, mnt: string): void {
  const device = readStatus(name)?.device ?? '';
  const runtime = runtimeDirOf(name);
  expect(testLoops().map(([d]) => d)).toEqual([device]);
  expect(mounts().filter(([source]) => source === device).map(([, target]) => target)).toEqual([mnt]);
  expect(mounts().filter(([, target]) => target === mnt)).toHaveLength(1);
  expect(mounts().filter(([, target]) => target.startsWith(`${runtime}/`))).toHaveLength(1);
}

function ownersVolume(label: string): { dir: string; mnt: string; name: string } {
  const { user, scratch, home } = ownedScratch();
  const dir = join(home, 'vol');
  const name = `${TEST_PREFIX}${label}`;
  const init = cliAs(user, ['init', dir, '--size', '32M', '--files', '4', '--chunk', '64K', '--name', name]);
  expect(init.status, init.stderr).toBe(0);
  return { dir, mnt: join(scratch, 'mnt'), name };
}

describe.skipIf(!IS_ROOT)(`two starts of one volume at once (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  it(`exactly one serves, the other names its pid and leaves nothing (${ROUNDS} rounds)`, async () => {
    const { dir, mnt, name } = ownersVolume('lock-race');
    const args = [dir, '--mkfs', 'ext4', '--mount', mnt, '--interval', '1h'];
    const winners = new Set<number>();
    for (let round = 0; round < ROUNDS; round++) {
      // Spawned back to back: both reach the lock within a few milliseconds of each other.
      // (The old pid-file lock survived 30 such rounds: its window is microseconds wide. The
      // slowed test below opens it.)
      const all: TestDaemon[] = [startDaemon(name, args), startDaemon(name, args)];
      await until('one daemon live and the other gone', () => {
        const s = readStatus(name);
        return all.filter((d) => d.child.exitCode === null).length === 1 && s?.state === 'live' && all.some((d) => d.child.pid === s.pid);
      });
      const winner = all.find((d) => d.child.exitCode === null) as TestDaemon;
      const loser = all.find((d) => d !== winner) as TestDaemon;
      const pid = winner.child.pid ?? -1;
      winners.add(pid);
      expect(loser.child.exitCode, loser.output()).toBe(1);
      expect(loser.output()).toBe(`vbd-shadow: volume '${name}' is already served by pid ${pid}\n`);
      expectOneOfEach(name, mnt);
      expect(readFileSync(join(runtimeDirOf(name), 'daemon.lock'), 'utf8')).toBe(`${pid}\n`);
      expect(await stopDaemon(winner)).toBe(0);
      expect(leftovers()).toEqual([]);
      expect(mounts().filter(([, target]) => target === mnt)).toEqual([]);
    }
    expect(winners.size).toBe(ROUNDS);
  });

  it(`a holder slowed between taking the lock and writing its pid still keeps the other out (${SLOWED_ROUNDS} rounds)`, async () => {
    // Every write to the lock file waits 400 ms, in both starts: the loser always arrives while
    // the holder's lock file is still empty. The old pid-file lock lost the first such round:
    // the second start took the empty file for a dead daemon's lock, "recovered" the live
    // daemon's RAM image into the files and tried to unmount its tmpfs. Three rounds are run.
    const { dir, mnt, name } = ownersVolume('lock-slowed');
    const args = [dir, '--mkfs', 'ext4', '--mount', mnt, '--interval', '1h'];
    const lockFile = lockFileOf(dir);
    for (let round = 0; round < SLOWED_ROUNDS; round++) {
      const all = [startSlowed(lockFile, args), startSlowed(lockFile, args)];
      await until('one start gone', () => all.some((s) => s.child.exitCode !== null));
      const loser = all.find((s) => s.child.exitCode !== null) as Slowed;
      const winner = all.find((s) => s !== loser) as Slowed;
      await until('the other live', () => readStatus(name)?.state === 'live' || winner.child.exitCode !== null);
      expect(winner.child.exitCode, winner.output()).toBeNull();
      expect(loser.child.exitCode, loser.output()).toBe(1);
      // The holder had not written its pid yet: the loser cannot name it, but it refuses.
      expect(loser.output()).toMatch(new RegExp(`^vbd-shadow: volume '${name}' is already served by (pid ${readStatus(name)?.pid}|another daemon)\\n$`));
      const pid = readStatus(name)?.pid ?? -1;
      expect(isAlive(pid)).toBe(true);
      expectOneOfEach(name, mnt);
      process.kill(pid, 'SIGTERM');
      expect(await winner.exited).toBe(0);
      expect(leftovers()).toEqual([]);
      expect(mounts().filter(([, target]) => target === mnt)).toEqual([]);
    }
  });
});
