// The scan pool in a real daemon: with tracking off every flush scans the whole image, on the
// pool's threads (the image is above POOL_MIN_BYTES). The threads are started once for the
// daemon, not per flush; the files end equal to the device, raw and mounted (where both
// passes, the frozen one included, run on the pool); VBD_SHADOW_SCAN_THREADS=1 keeps every
// scan on the daemon's thread, and a malformed value is refused before anything is touched.

import { randomBytes } from 'node:crypto';
import { closeSync, mkdirSync, openSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readStatus } from '../../src/daemon/runtime.js';
import { cli, cliOk } from '../helpers/cli.js';
import { flushReport, startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, leftovers } from '../helpers/system.js';
import { tempDir } from '../helpers/tmp.js';
import { differingChunks, expectExportedExt4File } from '../helpers/volumes.js';

const SIZE = 128 * 2 ** 20;
const CHUNK = 65536;
const CHUNKS = SIZE / CHUNK;
const THREADS = availableParallelism();

function volume(tag: string): { scratch: string; dir: string; name: string; mnt: string } {
  const scratch = tempDir();
  const dir = join(scratch, 'vol');
  const mnt = join(scratch, 'mnt');
  mkdirSync(mnt);
  const name = `${TEST_PREFIX}${tag}`;
  cliOk(['init', dir, '--size', '128M', '--files', '4', '--chunk', '64K', '--name', name]);
  return { scratch, dir, name, mnt };
}

describe.skipIf(!IS_ROOT || THREADS < 2)(`full scans on the scan pool (${IS_ROOT ? `${THREADS} cores` : ROOT_SKIP_REASON})`, () => {
  it('raw device: every flush scans on the pool, its threads started once, the files equal to the device', async () => {
    const v = volume('scan-raw');
    const daemon = startDaemon(v.name, [v.dir, '--interval', '1h'], undefined, { VBD_SHADOW_TRACKING: 'off' });
    const live = await waitLive(daemon);
    expect(live.scan).toEqual({ threads: THREADS, started: THREADS });
    for (let round = 0; round < 3; round++) {
      const fd = openSync(live.device ?? '', 'r+');
      for (let i = 0; i < 50; i++) writeSync(fd, randomBytes(CHUNK), 0, CHUNK, Math.floor(Math.random() * CHUNKS) * CHUNK);
      closeSync(fd);
      const f = flushReport(v.name);
      expect(f.chunksHashed).toBe(CHUNKS);
      expect(f.chunksChanged).toBeGreaterThan(0);
      expect(await differingChunks(v.dir, readFileSync(live.image ?? ''), v.scratch, CHUNK)).toEqual([]);
    }
    // One pool for the daemon: no thread started for any of the flushes.
    expect(readStatus(v.name)?.scan).toEqual({ threads: THREADS, started: THREADS });
    expect(await stopDaemon(daemon)).toBe(0);
    expect(leftovers()).toEqual([]);
  });

  it('mounted ext4: both passes (the frozen one too) on the pool; the files hold the capture, fsck-clean after teardown', async () => {
    const v = volume('scan-mnt');
    const daemon = startDaemon(v.name, [v.dir, '--interval', '1h', '--mkfs', 'ext4', '--mount', v.mnt], undefined, { VBD_SHADOW_TRACKING: 'off' });
    const live = await waitLive(daemon);
    const data = randomBytes(16 * 2 ** 20);
    writeFileSync(join(v.mnt, 'data'), data);
    const f = flushReport(v.name);
    expect(f.chunksHashed).toBe(CHUNKS);
    expect(f.chunksChanged).toBeGreaterThan(256);
    expect(f.timings?.['frozenMs']).toBeGreaterThan(0);
    // Only the superblock the thaw rewrote (chunk 0) may differ.
    expect((await differingChunks(v.dir, readFileSync(live.image ?? ''), v.scratch, CHUNK)).filter((c) => c !== 0)).toEqual([]);
    expect(readStatus(v.name)?.scan).toEqual({ threads: THREADS, started: THREADS });
    expect(await stopDaemon(daemon)).toBe(0);
    expectExportedExt4File(v.dir, v.scratch, '/data', data);
    expect(leftovers()).toEqual([]);
  });

  it('VBD_SHADOW_SCAN_THREADS=1 scans on the daemon\'s thread; a malformed value is a usage error', async () => {
    const v = volume('scan-one');
    const bad = cli(['start', v.dir, '--foreground', '--interval', '1h'], { env: { ...process.env, VBD_SHADOW_SCAN_THREADS: 'two' } });
    expect(bad.status).toBe(2);
    expect(bad.stderr.trim().split('\n')).toEqual(["vbd-shadow: VBD_SHADOW_SCAN_THREADS must be a whole number from 1 to 64, got 'two'"]);
    expect(leftovers()).toEqual([]);
    const daemon = startDaemon(v.name, [v.dir, '--interval', '1h'], undefined, { VBD_SHADOW_TRACKING: 'off', VBD_SHADOW_SCAN_THREADS: '1' });
    const live = await waitLive(daemon);
    const fd = openSync(live.device ?? '', 'r+');
    writeSync(fd, randomBytes(CHUNK), 0, CHUNK, 7 * CHUNK);
    closeSync(fd);
    const f = flushReport(v.name);
    expect(f.chunksHashed).toBe(CHUNKS);
    expect(f.chunksChanged).toBe(1);
    expect(readStatus(v.name)?.scan).toEqual({ threads: 1, started: 0, off: 'one thread only: scans run on the daemon\'s thread' });
    expect(await stopDaemon(daemon)).toBe(0);
  });
});
