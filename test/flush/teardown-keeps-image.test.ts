// Teardown never frees RAM that holds unflushed data: when the final flush fails (a real
// ENOSPC), the daemon exits non-zero, the image stays in its root-only tmpfs with a message
// saying how to recover, and `recover` writes it back once there is space again.

import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, existsSync, openSync, readFileSync, rmSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { cliOk, sha256 } from '../helpers/cli.js';
import { startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { freeBytes, smallExt4 } from '../helpers/small-fs.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, leftovers } from '../helpers/system.js';
import { tempDir } from '../helpers/tmp.js';

describe.skipIf(!IS_ROOT)(`teardown with a failing final flush (${IS_ROOT ? 'as root, real ENOSPC' : ROOT_SKIP_REASON})`, () => {
  it('keeps the RAM image, says how to recover, and recover writes it back', async () => {
    const fs = smallExt4(48);
    const dir = join(fs, 'vol');
    const name = `${TEST_PREFIX}keep`;
    cliOk(['init', dir, '--size', '16M', '--files', '4', '--chunk', '64K', '--name', name]);
    const daemon = startDaemon(name, [dir, '--interval', '1h']);
    const live = await waitLive(daemon);
    const filler = join(fs, 'filler');
    execFileSync('fallocate', ['-l', String(freeBytes(fs) - 2 ** 20), filler]);
    const data = randomBytes(8 * 2 ** 20);
    const fd = openSync(live.device ?? '', 'r+');
    writeSync(fd, data, 0, data.length, 4 * 2 ** 20);
    closeSync(fd);
    const device = readFileSync(live.device ?? '');

    const code = await stopDaemon(daemon);
    expect(code, daemon.output()).toBe(1);
    const image = `/run/vbd-shadow/${name}/shadow/image`;
    expect(existsSync(image)).toBe(true);
    expect(statSync(image).size).toBe(16 * 2 ** 20);
    expect(statSync(`/run/vbd-shadow/${name}/shadow`).mode & 0o077).toBe(0);
    expect(daemon.output()).toMatch(/final flush failed \(attempt 3 of 3\): .*no space left on device/);
    expect(daemon.output()).toMatch(new RegExp(`the RAM image is KEPT at .*image \\(root-only\\) so nothing is lost; fix the cause, then run 'vbd-shadow recover ${dir}'`));
    expect(leftovers()).toEqual([`mount /run/vbd-shadow/${name}/shadow`]);

    rmSync(filler);
    expect(cliOk(['recover', dir]).stdout).toMatch(new RegExp(`volume '${name}' recovered into the files`));
    expect(existsSync(image)).toBe(false);
    expect(leftovers()).toEqual([]);
    const out = join(tempDir(), 'out.img');
    cliOk(['export', dir, out]);
    expect(sha256(readFileSync(out))).toBe(sha256(device));
  });
});
