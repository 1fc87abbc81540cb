// Teardown never frees RAM that holds unflushed data: when the final flush fails (a real
// ENOSPC), the daemon exits non-zero, the image stays in its root-only tmpfs with a message
// saying how to recover, and `recover` writes it back once there is space again.

import { existsSync, readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { cliOk, sha256 } from '../helpers/cli.js';
import { eventsOf, stopDaemon } from '../helpers/daemon.js';
import { liveVolumeOnFullFs } from '../helpers/full-fs.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, leftovers, runtimeDirOf } from '../helpers/system.js';
import { tempDir } from '../helpers/tmp.js';

describe.skipIf(!IS_ROOT)(`teardown with a failing final flush (${IS_ROOT ? 'as root, real ENOSPC' : ROOT_SKIP_REASON})`, () => {
  it('keeps the RAM image, says how to recover, and recover writes it back', async () => {
    const name = `${TEST_PREFIX}keep`;
    const { dir, daemon, live, filler } = await liveVolumeOnFullFs(name, 4 * 2 ** 20);
    const device = readFileSync(live.device ?? '');

    const code = await stopDaemon(daemon);
    expect(code, daemon.output()).toBe(1);
    const image = `${runtimeDirOf(name)}/shadow/image`;
    expect(existsSync(image)).toBe(true);
    expect(statSync(image).size).toBe(16 * 2 ** 20);
    expect(statSync(`${runtimeDirOf(name)}/shadow`).mode & 0o077).toBe(0);
    const events = eventsOf(name);
    const failures = events.filter((e) => e.kind === 'final-flush-failed');
    expect(failures.map((e) => e.kind === 'final-flush-failed' && e.attempt)).toEqual([1, 2, 3]);
    expect(failures.every((e) => e.kind === 'final-flush-failed' && /no space left on device/.test(e.error))).toBe(true);
    expect(events).toContainEqual({ kind: 'image-kept', path: image, dir });
    expect(leftovers()).toEqual([`mount ${runtimeDirOf(name)}/shadow`]);

    rmSync(filler);
    expect(cliOk(['recover', dir]).stdout).toMatch(new RegExp(`volume '${name}' recovered into the files`));
    expect(existsSync(image)).toBe(false);
    expect(leftovers()).toEqual([]);
    const out = join(tempDir(), 'out.img');
    cliOk(['export', dir, out]);
    expect(sha256(readFileSync(out))).toBe(sha256(device));
  });
});
