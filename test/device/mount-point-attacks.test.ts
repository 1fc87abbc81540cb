// The owner controls her mount point and its parents. Tried as she would: a symlink in place of
// the mount point or a parent, a root-owned directory given as the mount point, a swap racing
// the start, and — while live — her renaming the parent and planting a decoy pointing at a
// foreign mount before a flush and the teardown. Root must never mount over, freeze, sync or
// unmount anything but her own directory and its own mount.

import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, chownSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readStatus } from '../../src/daemon/runtime.js';
import { cli, cliOk } from '../helpers/cli.js';
import { Stage, eachTestCleanup } from '../helpers/cleanup.js';
import { startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, isMounted, leftovers, runAs } from '../helpers/system.js';

/** A root-owned directory with a marker: what a hostile owner would like root to mount over. */
function victimDir(scratch: string): string {
  const victim = join(scratch, 'victim');
  mkdirSync(victim, { mode: 0o755 });
  writeFileSync(join(victim, 'marker'), 'root data\n');
  return victim;
}

describe.skipIf(!IS_ROOT)(`mount point attacks (${IS_ROOT ? 'as root, owner is a real user' : ROOT_SKIP_REASON})`, () => {
  it('a symlinked mount point, a symlinked parent and a root-owned directory are refused; nothing is mounted', () => {
    const { user, scratch, home } = ownedScratch();
    const victim = victimDir(scratch);
    const dir = join(home, 'vol');
    const name = `${TEST_PREFIX}mnt-refuse`;
    expect(cliAs(user, ['init', dir, '--size', '8M', '--files', '4', '--name', name]).status).toBe(0);
    expect(runAs(user, 'ln', ['-s', victim, join(home, 'mnt')]).status).toBe(0);
    expect(runAs(user, 'ln', ['-s', scratch, join(home, 'up')]).status).toBe(0);

    const cases: [string, RegExp][] = [
      [join(home, 'mnt'), /--mount .*\/mnt: is a symbolic link \(refused\)/],
      [join(home, 'up', 'victim'), /--mount .*: a component of the path is a symbolic link/],
      [victim, /--mount .*victim is owned by uid 0, not the volume owner/],
    ];
    for (const [mnt, error] of cases) {
      const r = cli(['start', dir, '--foreground', '--mkfs', 'ext4', '--mount', mnt]);
      expect(r.status, r.stderr).toBe(1);
      expect(r.stderr).toMatch(error);
      expect(isMounted(victim)).toBe(false);
    }
    expect(readFileSync(join(victim, 'marker'), 'utf8')).toBe('root data\n');
    expect(leftovers()).toEqual([]);
  });

  it('a swap of the mount point for a symlink racing the start never gets root to mount over the victim', async () => {
    const { user, scratch, home } = ownedScratch();
    const victim = victimDir(scratch);
    const dir = join(home, 'vol');
    const mnt = join(home, 'mnt');
    const name = `${TEST_PREFIX}mnt-race`;
    expect(cliAs(user, ['init', dir, '--size', '8M', '--files', '4', '--name', name]).status).toBe(0);
    expect(runAs(user, 'mkdir', [mnt]).status).toBe(0);
    // Her loop: the real directory and a symlink to the victim take turns at the path, tens of
    // thousands of times a second (against the old path-based start this won within a few tries).
    const swapper = spawn('setpriv', [`--reuid=${user.uid}`, `--regid=${user.gid}`, '--clear-groups', 'sh', '-c',
      `cd ${home} && ln -s ${victim} link && while :; do mv -T mnt real; mv -T link mnt; mv -T mnt link; mv -T real mnt; done`], { stdio: 'ignore' });
    eachTestCleanup(Stage.Processes, () => void swapper.kill('SIGKILL'));

    const outcomes: string[] = [];
    for (let trial = 0; trial < 12; trial++) {
      const r = cli(['start', dir, '--mkfs', 'ext4', '--mount', mnt, '--interval', '1h']);
      expect(isMounted(victim)).toBe(false);
      if (r.status === 0) {
        outcomes.push('live');
        const s = readStatus(name);
        expect(s?.state).toBe('live');
        const stopped = cli(['stop', name]);
        expect(stopped.status, stopped.stderr).toBe(0);
      } else {
        outcomes.push(/symbolic link|no such file|already exists/.test(r.stderr) ? 'refused' : `other: ${r.stderr}`);
      }
    }
    swapper.kill('SIGKILL');
    expect(outcomes.filter((o) => o.startsWith('other'))).toEqual([]);
    // The race was really run: some starts met the symlink (or the gap) and were refused.
    expect(outcomes).toContain('refused');
    expect(readFileSync(join(victim, 'marker'), 'utf8')).toBe('root data\n');
    expect(leftovers()).toEqual([]);
  });

  it('a renamed parent with a decoy at the old path: flush and teardown still act on our mount only', async () => {
    const { user, scratch, home } = ownedScratch();
    // The decoy points at a foreign mount (a tmpfs of root's): FIFREEZE there fails, an unmount
    // there would take it away — neither may happen.
    const foreign = join(scratch, 'foreign');
    mkdirSync(foreign);
    expect(spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'vbdt-foreign', foreign]).status).toBe(0);
    eachTestCleanup(Stage.Kernel, () => void spawnSync('umount', [foreign]));
    const dir = join(home, 'vol');
    const parent = join(home, 'p');
    const name = `${TEST_PREFIX}mnt-decoy`;
    expect(cliAs(user, ['init', dir, '--size', '16M', '--files', '4', '--name', name]).status).toBe(0);
    expect(runAs(user, 'mkdir', ['-p', join(parent, 'mnt')]).status).toBe(0);
    const daemon = startDaemon(name, [dir, '--mkfs', 'ext4', '--mount', join(parent, 'mnt'), '--interval', '1h']);
    await waitLive(daemon);

    expect(runAs(user, 'sh', ['-c', `echo before the swap > ${parent}/mnt/note && mv ${parent} ${home}/moved && mkdir ${parent} && ln -s ${foreign} ${parent}/mnt && sync`]).status).toBe(0);
    expect(runAs(user, 'sh', ['-c', `echo after the swap >> ${home}/moved/mnt/note && sync`]).status).toBe(0);
    const flushed = cliOk(['flush', name]);
    expect(flushed.stdout).toMatch(/flushed: [1-9]\d* chunks/);
    expect(readStatus(name)?.lastFlush?.ok).toBe(true);

    expect(await stopDaemon(daemon)).toBe(0);
    expect(isMounted(join(home, 'moved', 'mnt'))).toBe(false);
    expect(isMounted(foreign)).toBe(true);
    expect(leftovers()).toEqual([]);
    // What she wrote through the mount reached the files.
    const image = join(scratch, 'out.img');
    cliOk(['export', dir, image]);
    const dump = spawnSync('debugfs', ['-R', 'cat /note', image], { encoding: 'utf8' });
    expect(dump.stdout).toBe('before the swap\nafter the swap\n');
  });

  it('a mount point that does not exist is made for the owner, inside a directory root or she owns', async () => {
    const { user, scratch, home } = ownedScratch();
    const dir = join(home, 'vol');
    const name = `${TEST_PREFIX}mnt-new`;
    expect(cliAs(user, ['init', dir, '--size', '8M', '--files', '4', '--name', name]).status).toBe(0);
    const other = join(scratch, 'others');
    mkdirSync(other);
    chownSync(other, 65534, 65534);
    chmodSync(other, 0o755);
    const refused = cli(['start', dir, '--foreground', '--mount', join(other, 'mnt')]);
    expect(refused.stderr).toMatch(/its parent belongs to uid 65534, not the volume owner/);
    expect(existsSync(join(other, 'mnt'))).toBe(false);

    const daemon = startDaemon(name, [dir, '--mkfs', 'ext4', '--mount', join(home, 'new', 'mnt')]);
    await expect(waitLive(daemon)).rejects.toThrow(/--mount .*\/new\/mnt: its parent directory does not exist/);
  });
});
