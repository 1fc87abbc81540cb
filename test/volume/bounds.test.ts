// Owner input is bounded before root (or anyone) spends time or memory on it: chunk counts are
// capped and checked against available memory before any allocation proportional to them, and
// scrypt parameters in a manifest are capped. Tried for real: under a memory ulimit, as an
// ordinary user, measuring time and peak memory.

import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { MANIFEST_NAME } from '../../src/volume/manifest.js';
import { BIN, cliOk, treeHash } from '../helpers/cli.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, runAs } from '../helpers/system.js';
import { keyFile, tempDir } from '../helpers/tmp.js';
import { spawnSync } from 'node:child_process';

interface Measured {
  status: number | null;
  stderr: string;
  ms: number;
  maxRss: number;
}

/** Splits GNU time's "maxrss=KiB" line off the command's own stderr. */
function measured(status: number | null, stderr: string, ms: number): Measured {
  const m = /maxrss=(\d+)\n$/.exec(stderr);
  return { status, ms, maxRss: m === null ? Infinity : Number(m[1]) * 1024, stderr: stderr.replace(/(Command exited with non-zero status \d+\n)?maxrss=\d+\n$/, '') };
}

/** `vbd-shadow ARGS` in a shell with `ulimit -v KIB`, under GNU time, as `user` (or root). */
function cliUnderUlimit(kib: number, args: string[], user?: Parameters<typeof runAs>[0]): Measured {
  const script = `ulimit -v ${kib} && exec /usr/bin/time -f maxrss=%M "$@"`;
  // sh, not bash: a BASH_ENV in the environment would be read (and fail) as the user.
  const argv = ['/bin/sh', '-c', script, 'sh', process.execPath, BIN, ...args];
  const t = Date.now();
  if (user !== undefined) {
    const r = runAs(user, argv[0] ?? '', argv.slice(1));
    return measured(r.status, r.stderr, Date.now() - t);
  }
  const r = spawnSync(argv[0] ?? '', argv.slice(1), { encoding: 'utf8', timeout: 120_000 });
  return measured(r.status, String(r.stderr), Date.now() - t);
}

describe.skipIf(!IS_ROOT)(`chunk counts against memory (${IS_ROOT ? 'as root, commands as a real user' : ROOT_SKIP_REASON})`, () => {
  it('init --size 1T --chunk 512 as an ordinary user under ulimit -v: one line, fast, small memory, nothing created', () => {
    const { user, home } = ownedScratch();
    const before = treeHash(home);
    const r = cliUnderUlimit(3_000_000, ['init', join(home, 'big'), '--size', '1T', '--chunk', '512', '--files', '4'], user);
    expect(r.status).toBe(2); // usage (src/common/exit-codes.ts)
    expect(r.stderr).toMatch(/^vbd-shadow: [^\n]+\n$/);
    expect(r.stderr).toMatch(/--size 1T in 512B chunks makes 2147483648 chunks, more than the 16777216 allowed; use a larger --chunk/);
    expect(r.ms).toBeLessThan(5_000);
    expect(r.maxRss).toBeLessThan(150 * 2 ** 20);
    expect(treeHash(home)).toBe(before);
  });

  it('at the chunk cap, a placement that does not fit in the memory left is refused before it is allocated', () => {
    const { user, home } = ownedScratch();
    const before = treeHash(home);
    // 2^24 chunks need 256 MiB for the table and the bijection check; ~1.1 GiB of address
    // space leaves Node (which reserves ~0.9 GiB at start) far less than that.
    const r = cliUnderUlimit(1_200_000, ['init', join(home, 'big'), '--size', '8G', '--chunk', '512', '--files', '4'], user);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^vbd-shadow: volume 'big': placing 16777216 chunks needs 256M of memory, only [\d.]+M is available \(address-space limit\); use larger chunks\n$/);
    expect(r.ms).toBeLessThan(5_000);
    expect(r.maxRss).toBeLessThan(150 * 2 ** 20);
    expect(treeHash(home)).toBe(before);
  });
});

describe('scrypt parameters from a manifest are capped', () => {
  it('N=2^20, r=32, p=16 (4 GiB, minutes) is refused at once, before any key is derived', () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    const key = keyFile(scratch, 'the key');
    cliOk(['init', dir, '--size', '64K', '--files', '2', '--chunk', '4K', '--layout', 'keyed', '--key-file', key]);
    const path = join(dir, MANIFEST_NAME);
    const m = JSON.parse(readFileSync(path, 'utf8')) as { layout: { kdf: unknown } };
    m.layout.kdf = { N: 2 ** 20, r: 32, p: 16 };
    writeFileSync(path, JSON.stringify(m));
    const before = treeHash(scratch);
    for (const args of [['export', dir, join(scratch, 'out'), '--key-file', key], ['import', dir, key, '--key-file', key]]) {
      const r = cliUnderUlimit(3_000_000, args);
      expect(r.status, args[0]).toBe(1);
      expect(r.stderr).toMatch(/^vbd-shadow: invalid manifest: layout.kdf needs 4096 MiB \(128·N·r with N=1048576, r=32\), more than the 256 MiB allowed\n$/);
      expect(r.ms).toBeLessThan(3_000);
      expect(r.maxRss).toBeLessThan(150 * 2 ** 20);
    }
    expect(treeHash(scratch)).toBe(before);
  });
});
