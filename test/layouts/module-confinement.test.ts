// A user's layout module is user code. On every path (offline export/import too, also as root)
// it runs in a confined child: as the owner with the passwd gid and the owner's own groups,
// reset limits (even when we run with memlock unlimited), a clean environment, cwd /, no fd of
// ours, its own process group, a time limit and capped output. Each attack is tried for real.

import { spawnSync } from 'node:child_process';
import { chmodSync, chownSync, closeSync, copyFileSync, existsSync, openSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BIN } from '../helpers/cli.js';
import { IS_ROOT, OTHER_USER, ROOT_SKIP_REASON, cliAs, ensureUser } from '../helpers/system.js';
import { isGone, limitOf, liveInGroup, moduleVolume, readRecord } from './confine.js';

const MEMLOCK = String(8 * 2 ** 20);

interface Run {
  status: number | null;
  stderr: string;
  ms: number;
  /** Peak RSS of the command and its children, in bytes (GNU time %M), when measured. */
  maxRss?: number;
}

/** The CLI as root, optionally under /usr/bin/time to measure its peak memory. */
function rootCli(args: string[], measure = false): Run {
  const t = Date.now();
  const argv = measure ? ['/usr/bin/time', '-f', 'maxrss=%M', process.execPath, BIN, ...args] : [process.execPath, BIN, ...args];
  const r = spawnSync(argv[0] ?? '', argv.slice(1), { encoding: 'utf8', timeout: 120_000 });
  const ms = Date.now() - t;
  let stderr = String(r.stderr);
  let maxRss: number | undefined;
  if (measure) {
    const m = /maxrss=(\d+)\n$/.exec(stderr);
    maxRss = m === null ? undefined : Number(m[1]) * 1024;
    stderr = stderr.replace(/(Command exited with non-zero status \d+\n)?maxrss=\d+\n$/, '');
  }
  return { status: r.status, stderr, ms, maxRss };
}

/** One line on stderr, the CLI's own prefix, no control character in it. */
function expectOneCleanLine(stderr: string): void {
  expect(stderr).toMatch(/^vbd-shadow: [^\n]+\n$/);
  expect([...stderr.slice(0, -1)].filter((ch) => ch.charCodeAt(0) < 0x20 || ch.charCodeAt(0) === 0x7f)).toEqual([]);
}

describe.skipIf(!IS_ROOT)(`layout module confinement (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  it('root export with memlock raised (unlimited where root may): owner uid, passwd gid, own groups only, limits reset, clean env, cwd /, no fd of ours', () => {
    const v = moduleVolume(cliAs);
    chownSync(v.dir, v.user.uid, 0); // the directory's group is root: it must not become the module's gid
    // The parent runs the way systemd's LimitMEMLOCK=infinity would leave it. Raising a hard
    // limit needs CAP_SYS_RESOURCE; where root lacks it, memlock stays at its hard limit and
    // only its soft limit is moved (down), so the child's value still has to be set, not inherited.
    const memlock = spawnSync('prlimit', ['--memlock=unlimited:unlimited', '--', 'true']).status === 0 ? 'unlimited:unlimited' : `65536:${MEMLOCK}`;
    const parentArgs = [`--memlock=${memlock}`, '--core=unlimited', '--as=unlimited', '--nofile=4096:4096'];
    const parentLimits = spawnSync('prlimit', [...parentArgs, '--', 'cat', '/proc/self/limits'], { encoding: 'utf8' }).stdout;
    expect(limitOf(parentLimits, 'Max locked memory')).toEqual(memlock.split(':'));
    expect(limitOf(parentLimits, 'Max core file size')).toEqual(['unlimited', 'unlimited']);
    // …with a root-only file open on fd 100 (inherited, not close-on-exec) and a secret in its environment.
    const marker = join(v.scratch, 'root-only-marker');
    writeFileSync(marker, 'root only', { mode: 0o600 });
    const fd = openSync(marker, 'r');
    const out = join(v.scratch, 'out.img');
    const r = spawnSync('prlimit', [...parentArgs, '--', process.execPath, BIN, 'export', v.dir, out], {
      encoding: 'utf8', timeout: 120_000, stdio: ['ignore', 'pipe', 'pipe', ...Array<'ignore'>(97).fill('ignore'), fd], env: { ...process.env, VBD_LEAK: 'root secret' },
    });
    closeSync(fd);
    expect(r.status, String(r.stderr)).toBe(0);

    const rec = readRecord(v.record);
    expect([rec.uid, rec.euid]).toEqual([v.user.uid, v.user.uid]);
    expect([rec.gid, rec.egid]).toEqual([v.user.gid, v.user.gid]);
    expect([...new Set(rec.groups)].sort((a, b) => a - b)).toEqual([v.user.gid, v.extraGid].sort((a, b) => a - b));
    expect(rec.groups).not.toContain(0);
    expect(limitOf(rec.limits, 'Max locked memory')).toEqual([MEMLOCK, MEMLOCK]);
    expect(limitOf(rec.limits, 'Max core file size')).toEqual(['0', '0']);
    expect(limitOf(rec.limits, 'Max open files')).toEqual(['1024', '1024']);
    expect(limitOf(rec.limits, 'Max address space')).toEqual([String(3_000_000 * 1024), String(3_000_000 * 1024)]);
    expect(rec.env).toEqual({ PATH: '/usr/bin:/bin', HOME: v.passwdHome, USER: v.user.name, LANG: 'C.UTF-8' });
    expect(rec.cwd).toBe('/');
    expect(rec.fds).not.toContain(marker);
    expect(rec.pgid).toBe(rec.pid); // a process group of its own
    expect(isGone(rec.pid)).toBe(true);
  });

  it('export and import as root, and export as the owner, all run the module as the owner', () => {
    const v = moduleVolume(cliAs);
    const img = join(v.scratch, 'img');
    for (const args of [['export', v.dir, img], ['import', v.dir, img]]) {
      rmSync(v.record, { force: true });
      const r = rootCli(args);
      expect(r.status, r.stderr).toBe(0);
      const rec = readRecord(v.record);
      expect([rec.uid, rec.euid, rec.gid, rec.egid], args[0]).toEqual([v.user.uid, v.user.uid, v.user.gid, v.user.gid]);
    }
    rmSync(v.record, { force: true });
    const own = cliAs(v.user, ['export', v.dir, join(v.home, 'own.img')]);
    expect(own.status, own.stderr).toBe(0);
    const rec = readRecord(v.record);
    expect(rec.uid).toBe(v.user.uid);
    expect(limitOf(rec.limits, 'Max locked memory')).toEqual([MEMLOCK, MEMLOCK]);
  });

  it('a module that never returns (ignoring SIGTERM, with a child) fails export within the limit, and nothing of it is left', async () => {
    const v = moduleVolume(cliAs);
    v.setMode('hang');
    const out = join(v.scratch, 'out.img');
    const r = rootCli(['export', v.dir, out]);
    expect(r.status).toBe(1);
    expectOneCleanLine(r.stderr);
    expect(r.stderr).toMatch(/layout module .*layout\.mjs did not finish within 10 s; it was killed/);
    expect(r.ms).toBeLessThan(20_000);
    expect(existsSync(out)).toBe(false);
    const hang = JSON.parse(readFileSync(`${v.record}.hang`, 'utf8')) as { pid: number; child: number };
    const rec = readRecord(v.record);
    expect(rec.uid).toBe(v.user.uid);
    // SIGKILL went to the whole group: the module and the process it started are gone.
    const deadline = Date.now() + 2000;
    while (Date.now() < deadline && liveInGroup(rec.pgid).length > 0) await new Promise((res) => setTimeout(res, 50));
    expect(liveInGroup(rec.pgid)).toEqual([]);
    expect(isGone(hang.pid)).toBe(true);
    expect(isGone(hang.child)).toBe(true);
  });

  it('a stdout flood is cut at the expected size: one line, fast, small memory', () => {
    const v = moduleVolume(cliAs);
    v.setMode('stdout-flood'); // 512 MiB where 64 chunks × 12 bytes are expected
    const r = rootCli(['export', v.dir, join(v.scratch, 'out.img')], true);
    expect(r.status).toBe(1);
    expectOneCleanLine(r.stderr);
    expect(r.stderr).toMatch(/layout module .*layout\.mjs wrote more than the 768 bytes expected on stdout; it was killed/);
    expect(r.ms).toBeLessThan(10_000);
    expect(r.maxRss).toBeDefined();
    expect(r.maxRss ?? Infinity).toBeLessThan(200 * 2 ** 20);
    expect(liveInGroup(readRecord(v.record).pgid)).toEqual([]);
  });

  it('a stderr flood with control characters: only an escaped, bounded last line reaches the message', () => {
    const v = moduleVolume(cliAs);
    v.setMode('stderr-flood'); // ~85 MiB of escape sequences, then an exception with more of them
    const r = rootCli(['export', v.dir, join(v.scratch, 'out.img')], true);
    expect(r.status).toBe(1);
    expectOneCleanLine(r.stderr);
    expect(r.stderr).not.toContain('\x1b');
    expect(r.stderr).not.toContain('\u202e');
    expect(r.stderr).toContain('boom \\x1b]0;owned\\x07 \\u{202e} end');
    expect(r.stderr).toMatch(/layout module .*layout\.mjs failed as uid \d+ \(exit 1\): /);
    expect(r.stderr.length).toBeLessThan(1000);
    expect(r.maxRss ?? Infinity).toBeLessThan(200 * 2 ** 20);
  });

  describe('the module file must be changeable only by the owner or root', () => {
    const cases: [string, (v: ReturnType<typeof moduleVolume>) => void, RegExp][] = [
      ['group-writable module', (v) => chmodSync(v.mod, 0o664), /layout module .*layout\.mjs is writable by group or others \(mode 664\); chmod go-w it/],
      ['module owned by another user', (v) => { const o = ensureUser(OTHER_USER); chownSync(v.mod, o.uid, o.gid); }, /layout module .*layout\.mjs is owned by uid \d+, neither the volume owner \(uid \d+\) nor root/],
      ['module is a symlink', (v) => { const real = join(v.scratch, 'real.mjs'); copyFileSync(v.mod, real); rmSync(v.mod); symlinkSync(real, v.mod); }, /layout module .*layout\.mjs is a symbolic link \(refused\)/],
      ['its directory is writable by others', (v) => chmodSync(v.home, 0o777), /layout module .*: directory .*\/home is writable by group or others \(mode 777\)/],
    ];
    for (const [name, mutate, error] of cases) {
      it(`${name}: refused before it runs`, () => {
        const v = moduleVolume(cliAs);
        mutate(v);
        rmSync(v.record, { force: true });
        const out = join(v.scratch, 'out.img');
        const r = rootCli(['export', v.dir, out]);
        expect(r.status).toBe(1);
        expectOneCleanLine(r.stderr);
        expect(r.stderr).toMatch(error);
        expect(existsSync(v.record)).toBe(false); // it never ran
        expect(existsSync(out)).toBe(false);
      });
    }
  });
});
