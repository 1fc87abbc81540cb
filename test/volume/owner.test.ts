// The volume owner is the uid that owns the directory, with gid, name and home from /etc/passwd:
// never the directory's group. A uid with no passwd entry owns no volume.

import { chownSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { closeVolume, openVolume } from '../../src/volume/volume.js';
import { cli, cliOk, treeHash } from '../helpers/cli.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, cliAs } from '../helpers/system.js';
import { tempDir } from '../helpers/tmp.js';
import { execFileSync } from 'node:child_process';

describe.skipIf(!IS_ROOT)(`volume owner (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  it('a user:root directory gives the owner the passwd gid, name and home, not gid 0', () => {
    const { user, home } = ownedScratch();
    const dir = join(home, 'vol');
    const made = cliAs(user, ['init', dir, '--size', '64K', '--files', '2', '--chunk', '4K']);
    expect(made.status, made.stderr).toBe(0);
    chownSync(dir, user.uid, 0);
    const passwd = execFileSync('getent', ['passwd', user.name], { encoding: 'utf8' }).trim().split(':');
    const volume = openVolume(dir);
    try {
      expect(volume.owner).toEqual({ uid: user.uid, gid: user.gid, name: user.name, home: passwd[5] });
    } finally {
      closeVolume(volume);
    }
  });

  it('a directory owned by a uid without a passwd entry is refused with one line', () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    cliOk(['init', dir, '--size', '64K', '--files', '2', '--chunk', '4K']);
    const nobody = 54321;
    expect(() => execFileSync('getent', ['passwd', String(nobody)])).toThrow();
    execFileSync('chown', ['-R', `${nobody}:${nobody}`, dir]);
    const before = treeHash(scratch);
    const r = cli(['export', dir, join(scratch, 'out')]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^vbd-shadow: volume directory .*\/vol is owned by uid 54321, which has no entry in \/etc\/passwd; a volume owner must be a real user\n$/);
    expect(treeHash(scratch)).toBe(before);
  });
});
