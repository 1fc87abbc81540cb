// Writes of known patterns to the device, then a flush: exactly the touched chunks' file
// ranges change (every backing file compared byte for byte), and an idle flush writes nothing.

import { closeSync, openSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readStatus } from '../../src/daemon/runtime.js';
import { backingFileNames } from '../../src/volume/init.js';
import { cliOk } from '../helpers/cli.js';
import { startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX } from '../helpers/system.js';
import { keyFile, tempDir } from '../helpers/tmp.js';
import { placement } from '../helpers/volumes.js';

const CHUNK = 4096;
const TOUCHED = [0, 7, 8, 9, 500, 2047];

describe.skipIf(!IS_ROOT)(`flush writes only what changed (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  it('keyed volume: touched chunks land at their placements, nothing else changes', async () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    const name = `${TEST_PREFIX}chunks`;
    const key = keyFile(scratch, 'pattern key');
    cliOk(['init', dir, '--size', '8M', '--files', '5', '--chunk', '4K', '--layout', 'keyed', '--name', name, '--key-file', key]);
    const names = backingFileNames(5);
    const before = names.map((n) => readFileSync(join(dir, n)));
    const table = await placement(dir, Buffer.from('pattern key'));

    const daemon = startDaemon(name, [dir, '--key-file', key, '--interval', '1h']);
    const live = await waitLive(daemon);
    // Buffered writes, no fsync: the flush itself must push them into the image.
    const fd = openSync(live.device ?? '', 'r+');
    const patterns = TOUCHED.map((chunk) => Buffer.alloc(CHUNK, `chunk ${chunk} `));
    TOUCHED.forEach((chunk, i) => writeSync(fd, patterns[i] ?? Buffer.alloc(0), 0, CHUNK, chunk * CHUNK));
    closeSync(fd);
    expect(cliOk(['flush', name]).stdout).toMatch(new RegExp(`flushed: ${TOUCHED.length} chunks, 24K`));

    const expected = before.map((b) => Buffer.from(b));
    TOUCHED.forEach((chunk, i) => patterns[i]?.copy(expected[table.file[chunk] ?? 0] ?? Buffer.alloc(0), table.offset[chunk] ?? 0));
    names.forEach((n, f) => expect(readFileSync(join(dir, n)).equals(expected[f] ?? Buffer.alloc(0)), n).toBe(true));
    const status = readStatus(name);
    expect(status?.lastFlush?.bytesWritten).toBe(TOUCHED.length * CHUNK);

    // Idle: nothing written since, so no scan and no I/O.
    expect(cliOk(['flush', name]).stdout).toMatch(/nothing written since the last flush/);
    expect(readStatus(name)?.lastCheck?.idle).toBe(true);
    names.forEach((n, f) => expect(readFileSync(join(dir, n)).equals(expected[f] ?? Buffer.alloc(0)), n).toBe(true));
    expect(await stopDaemon(daemon)).toBe(0);
    names.forEach((n, f) => expect(readFileSync(join(dir, n)).equals(expected[f] ?? Buffer.alloc(0)), n).toBe(true));
  });
});
