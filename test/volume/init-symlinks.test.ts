// `sudo vbd-shadow init --force` must not write through anything planted in the directory:
// a symlinked temporary manifest is replaced, never followed; a symlinked or hard-linked old
// backing file is refused before any file is cut; a directory owned by another user is refused.
// Each case hashes the outside target (and the volume) before and after.

import { randomBytes } from 'node:crypto';
import { chmodSync, linkSync, lstatSync, mkdirSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { MANIFEST_NAME } from '../../src/volume/manifest.js';
import { cli, cliOk, sha256, treeHash } from '../helpers/cli.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, cliAs } from '../helpers/system.js';
import { tempDir } from '../helpers/tmp.js';
import { readFileSync } from 'node:fs';

const SHAPE = ['--size', '64K', '--files', '4', '--chunk', '4K'];

/** A root-owned volume holding random data, and a root-only file outside it that must stay untouched. */
function rootVolume(): { scratch: string; dir: string; target: string; targetHash: () => string } {
  const scratch = tempDir();
  const dir = join(scratch, 'vol');
  cliOk(['init', dir, ...SHAPE]);
  const image = join(scratch, 'image');
  writeFileSync(image, randomBytes(65536));
  cliOk(['import', dir, image]);
  rmSync(image);
  const target = join(scratch, 'precious');
  writeFileSync(target, 'root:x:0:0:precious root-owned content\n', { mode: 0o644 });
  return { scratch, dir, target, targetHash: () => sha256(readFileSync(target)) };
}

function expectOneLine(stderr: string, error: RegExp): void {
  expect(stderr).toMatch(/^vbd-shadow: [^\n]+\n$/);
  expect(stderr).toMatch(error);
}

describe.skipIf(!IS_ROOT)(`init --force as root does not write through planted links (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  it('a symlink planted as the temporary manifest is replaced, never followed', () => {
    const v = rootVolume();
    const before = v.targetHash();
    symlinkSync(v.target, join(v.dir, `.${MANIFEST_NAME}.tmp`));
    const r = cli(['init', v.dir, ...SHAPE, '--force', '--yes']);
    expect(r.status, r.stderr).toBe(0);
    expect(v.targetHash()).toBe(before);
    expect(lstatSync(join(v.dir, MANIFEST_NAME)).isFile()).toBe(true);
    expect(readdirSync(v.dir).sort()).toEqual(['file001', 'file002', 'file003', 'file004', MANIFEST_NAME]);
    cliOk(['export', v.dir, join(v.scratch, 'out')]); // the new volume works
  });

  it('a symlinked old backing file is refused before any backing file is cut', () => {
    const v = rootVolume();
    rmSync(join(v.dir, 'file002'));
    symlinkSync(v.target, join(v.dir, 'file002'));
    const before = v.targetHash();
    const volume = treeHash(v.dir);
    const r = cli(['init', v.dir, ...SHAPE, '--force', '--yes']);
    expect(r.status).toBe(4); // refused (src/common/exit-codes.ts)
    expectOneLine(r.stderr, /cannot reuse backing file .*\/vol\/file002: is a symbolic link \(refused\)/);
    expect(v.targetHash()).toBe(before);
    expect(treeHash(v.dir)).toBe(volume); // file001's data is still there
  });

  it('a hard-linked old backing file is refused: the other name keeps its bytes', () => {
    const v = rootVolume();
    const outside = join(v.scratch, 'second-name');
    linkSync(join(v.dir, 'file003'), outside);
    const before = sha256(readFileSync(outside));
    const volume = treeHash(v.dir);
    const r = cli(['init', v.dir, ...SHAPE, '--force', '--yes']);
    expect(r.status).toBe(4); // refused (src/common/exit-codes.ts)
    expectOneLine(r.stderr, /cannot reuse backing file .*\/vol\/file003: it has 2 hard links/);
    expect(sha256(readFileSync(outside))).toBe(before);
    expect(treeHash(v.dir)).toBe(volume);
  });

  it('the volume directory itself as a symlink is refused', () => {
    const scratch = tempDir();
    const real = join(scratch, 'real');
    mkdirSync(real, { mode: 0o700 });
    symlinkSync(real, join(scratch, 'link'));
    const r = cli(['init', join(scratch, 'link'), ...SHAPE]);
    expect(r.status).toBe(4); // refused (src/common/exit-codes.ts)
    expectOneLine(r.stderr, /cannot use .*\/link: is a symbolic link \(refused\)/);
    expect(readdirSync(real)).toEqual([]);
  });

  it('root is refused on a directory owned by another user, with a line saying to run init as the owner', () => {
    const { user, home } = ownedScratch();
    const dir = join(home, 'vol');
    const made = cliAs(user, ['init', dir, ...SHAPE]);
    expect(made.status, made.stderr).toBe(0);
    const before = treeHash(home);
    const r = cli(['init', dir, ...SHAPE, '--force', '--yes']);
    expect(r.status).toBe(4); // refused (src/common/exit-codes.ts)
    expectOneLine(r.stderr, new RegExp(`vol is owned by uid ${user.uid}, not by uid 0 \\(root\\) who runs init; run init as the directory's owner`));
    expect(treeHash(home)).toBe(before);
  });

  it('an existing directory writable by its group is refused', () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    mkdirSync(dir);
    chmodSync(dir, 0o770);
    const r = cli(['init', dir, ...SHAPE]);
    expect(r.status).toBe(4); // refused (src/common/exit-codes.ts)
    expectOneLine(r.stderr, /vol is writable by group or others \(mode 770\); chmod go-w it/);
    expect(readdirSync(dir)).toEqual([]);
  });
});
