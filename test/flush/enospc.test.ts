// A flush that hits ENOSPC on the backing filesystem: the daemon keeps running, status shows
// the failure, the data stays readable on the device; once space is freed the retry succeeds
// and the files match the device.

import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readStatus } from '../../src/daemon/runtime.js';
import { cli, cliOk, sha256 } from '../helpers/cli.js';
import { startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { freeBytes, smallExt4 } from '../helpers/small-fs.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX } from '../helpers/system.js';
import { tempDir } from '../helpers/tmp.js';

describe.skipIf(!IS_ROOT)(`ENOSPC (${IS_ROOT ? 'as root, on a real 48 MiB ext4' : ROOT_SKIP_REASON})`, () => {
  it('fails loudly, keeps the data in RAM, and succeeds once space is freed', async () => {
    const fs = smallExt4(48);
    const dir = join(fs, 'vol');
    const name = `${TEST_PREFIX}enospc`;
    cliOk(['init', dir, '--size', '16M', '--files', '4', '--chunk', '64K', '--name', name]);
    const daemon = startDaemon(name, [dir, '--interval', '1h']);
    const live = await waitLive(daemon);

    // Leave ~1 MiB free: the sparse backing files and the journal need far more.
    const filler = join(fs, 'filler');
    execFileSync('fallocate', ['-l', String(freeBytes(fs) - 2 ** 20), filler]);
    const data = randomBytes(8 * 2 ** 20);
    const fd = openSync(live.device ?? '', 'r+');
    writeSync(fd, data, 0, data.length, 2 ** 20);
    closeSync(fd);

    const failed = cli(['flush', name]);
    expect(failed.status).toBe(1);
    expect(failed.stderr).toMatch(/^vbd-shadow: flush of 'vbdt-enospc' failed: .*no space left on device \(ENOSPC\)\n$/);
    const status = readStatus(name);
    expect(status?.state).toBe('live');
    expect(status?.flushFailures).toBeGreaterThanOrEqual(1);
    expect(status?.lastFlush?.ok).toBe(false);
    expect(daemon.child.exitCode).toBeNull();
    const device = readFileSync(live.device ?? '');
    expect(sha256(device.subarray(2 ** 20, 2 ** 20 + data.length))).toBe(sha256(data));
    expect(cli(['status', name]).stdout).toMatch(/flush +FAILED/);

    rmSync(filler);
    expect(cliOk(['flush', name]).stdout).toMatch(/flushed: \d+ chunks/);
    expect(readStatus(name)?.lastFlush?.ok).toBe(true);
    expect(await stopDaemon(daemon)).toBe(0);
    const exported = join(tempDir(), 'out.img');
    cliOk(['export', dir, exported]);
    expect(sha256(readFileSync(exported))).toBe(sha256(device));
  });
});
