// A user's layout module is user code: the root daemon runs it as the volume owner.

import { readFileSync, writeFileSync, chownSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs } from '../helpers/system.js';

const MODULE = `
import { writeFileSync } from 'node:fs';
export function createLayout(g, params) {
  writeFileSync(params.record, String(process.getuid()));
  const n = g.fileSizes.length;
  return { place: (c) => ({ file: (n - 1) - (c % n), offset: Math.floor(c / n) * g.chunkSize }) };
}`;

describe.skipIf(!IS_ROOT)(`module: layout under the root daemon (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  it('runs as the volume owner, never as root', async () => {
    const { user, home } = ownedScratch();
    const mod = join(home, 'layout.mjs');
    const record = join(home, 'ran-as');
    writeFileSync(mod, MODULE);
    chownSync(mod, user.uid, user.gid);
    const dir = join(home, 'vol');
    const name = `${TEST_PREFIX}module`;
    const init = cliAs(user, ['init', dir, '--size', '4M', '--files', '4', '--layout', `module:${mod}`, '--layout-params', JSON.stringify({ record }), '--name', name]);
    expect(init.status, init.stderr).toBe(0);
    writeFileSync(record, 'not run yet');
    chownSync(record, user.uid, user.gid);

    const daemon = startDaemon(name, [dir]);
    await waitLive(daemon);
    expect(readFileSync(record, 'utf8')).toBe(String(user.uid));
    expect(await stopDaemon(daemon)).toBe(0);
  });
});
