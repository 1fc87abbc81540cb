// A flush that hits ENOSPC on the backing filesystem: the daemon keeps running, status shows
// the failure, the data stays readable on the device; once space is freed the retry succeeds
// and the files match the device.

import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readStatus } from '../../src/daemon/runtime.js';
import { cli, cliOk, sha256 } from '../helpers/cli.js';
import { stopDaemon } from '../helpers/daemon.js';
import { liveVolumeOnFullFs } from '../helpers/full-fs.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX } from '../helpers/system.js';
import { tempDir } from '../helpers/tmp.js';

describe.skipIf(!IS_ROOT)(`ENOSPC (${IS_ROOT ? 'as root, on a real 48 MiB ext4' : ROOT_SKIP_REASON})`, () => {
  it('fails loudly, keeps the data in RAM, and succeeds once space is freed', async () => {
    const name = `${TEST_PREFIX}enospc`;
    const { dir, daemon, live, filler, data } = await liveVolumeOnFullFs(name, 2 ** 20);

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
    // The back-off retry may have written it already; either way a flush now ends with all in the files.
    expect(cliOk(['flush', name]).status).toBe(0);
    expect(readStatus(name)?.lastFlush?.ok).toBe(true);
    expect(readStatus(name)?.lastFlush?.chunksChanged).toBeGreaterThan(0);
    expect(await stopDaemon(daemon)).toBe(0);
    const exported = join(tempDir(), 'out.img');
    cliOk(['export', dir, exported]);
    expect(sha256(readFileSync(exported))).toBe(sha256(device));
  });
});
