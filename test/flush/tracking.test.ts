// Change tracking by the block layer, on real loop devices: a flush hashes only the chunks the
// trace names, and each scenario ends with the files equal to the device (the offline export
// compared with the device read while live). Under `npm test` every tracked flush also runs the
// full scan and fails if the set missed a changed chunk (VBD_SHADOW_VERIFY_TRACKING=1).
//  - fallocate -z and a punched hole in a file of a mounted ext4;
//  - an O_DIRECT writer racing flushes of the raw device;
//  - a write landing right at the thaw (the write counter's baseline, taken after the thaw,
//    used to absorb it: the next checks said idle and the files lacked it);
//  - a ring buffer too small for the writes (tiny buffer_size_kb): the flush falls back to a
//    full scan, says why, and tracking resumes afterwards;
//  - a burst of buffered writes to the raw device that overran the default buffer while the
//    daemon traced the bios of its own fsync: now flushed from the trace.

import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, mkdirSync, openSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readStatus, type FlushReport } from '../../src/daemon/runtime.js';
import { cliOk } from '../helpers/cli.js';
import { eventsOf, flushReport, startDaemon, stopDaemon, waitLive, type TestDaemon } from '../helpers/daemon.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, leftovers } from '../helpers/system.js';
import { tempDir } from '../helpers/tmp.js';
import { differingChunks, expectExportedExt4File } from '../helpers/volumes.js';

const SIZE = 64 * 2 ** 20;
const CHUNK = 65536;
const CHUNKS = SIZE / CHUNK;

/**
 * What the device holds: its RAM image, read as a file (a read of /dev/loopN would return the
 * mounted filesystem's dirty metadata buffers from the device's page cache, not yet written).
 */
function readDevice(image: string, size = SIZE): Buffer {
  const out = readFileSync(image);
  expect(out.length).toBe(size);
  return out;
}

/** A python3 child writing with O_DIRECT; resolves with its stdout. */
function pythonWriter(script: string, args: string[]): { done: Promise<string>; running: () => boolean } {
  const child = spawn('/usr/bin/python3', ['-c', script, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  let running = true;
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const done = new Promise<string>((resolve, reject) => child.on('exit', (code) => {
    running = false;
    if (code === 0) resolve(out);
    else reject(new Error(`writer exited ${code}: ${err}`));
  }));
  return { done, running: () => running };
}

const tick = (): Promise<void> => new Promise((r) => setTimeout(r, 10));

const RANDOM_WRITER = `
import os, sys, mmap, random, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_DIRECT)
size = os.lseek(fd, 0, 2)
buf = mmap.mmap(-1, 4096)
end = time.time() + float(sys.argv[2]); n = 0; limit = int(sys.argv[3])
while time.time() < end and (limit == 0 or n < limit):
    buf.seek(0); buf.write(os.urandom(4096))
    os.pwrite(fd, buf, random.randrange(size // 4096) * 4096); n += 1
print(n)
`;

async function liveVolume(tag: string, extra: string[] = [], env: Record<string, string> = {}, size = SIZE): Promise<{ dir: string; scratch: string; name: string; daemon: TestDaemon; device: string; image: string; mnt: string }> {
  const scratch = tempDir();
  const dir = join(scratch, 'vol');
  const mnt = join(scratch, 'mnt');
  mkdirSync(mnt);
  const name = `${TEST_PREFIX}${tag}`;
  cliOk(['init', dir, '--size', `${size / 2 ** 20}M`, '--files', '4', '--chunk', '64K', '--name', name]);
  const saved = Object.fromEntries(Object.keys(env).map((k) => [k, process.env[k]]));
  Object.assign(process.env, env);
  let daemon: TestDaemon;
  try {
    daemon = startDaemon(name, [dir, '--interval', '1h', ...extra.map((a) => a.replace('MNT', mnt))]);
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
  const live = await waitLive(daemon);
  expect(live.tracking).toBe('full-scan (first flush of the session)');
  // The first flush of a session scans everything; from then on the trace decides.
  const first = flushReport(name);
  expect(first.tracking).toBe('full-scan (first flush of the session)');
  expect(first.chunksHashed).toBe(size / CHUNK);
  expect(readStatus(name)?.tracking).toBe('block-layer');
  return { dir, scratch, name, daemon, device: live.device ?? '', image: live.image ?? '', mnt };
}

describe.skipIf(!IS_ROOT)(`change tracking by the block layer (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  it('fallocate -z and a punched hole on a mounted ext4 reach the files; only traced chunks are hashed', async () => {
    const v = await liveVolume('trk-falloc', ['--mkfs', 'ext4', '--mount', 'MNT']);
    const file = join(v.mnt, 'data');
    const data = randomBytes(8 * 2 ** 20);
    writeFileSync(file, data);
    flushReport(v.name);
    for (const args of [['-z', '-o', '1M', '-l', '2M'], ['-p', '-o', '5M', '-l', '1M']]) {
      const r = spawnSync('fallocate', [...args, file], { encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(0);
    }
    data.fill(0, 1 * 2 ** 20, 3 * 2 ** 20);
    data.fill(0, 5 * 2 ** 20, 6 * 2 ** 20);
    const f = flushReport(v.name);
    expect(f.tracking).toBe('block-layer');
    expect(f.chunksChanged).toBeGreaterThan(0);
    expect(f.chunksHashed).toBeLessThan(CHUNKS / 4);
    // The files hold the frozen capture: only the superblock the thaw rewrote (chunk 0) may differ.
    expect((await differingChunks(v.dir, readDevice(v.image), v.scratch, CHUNK)).filter((c) => c !== 0)).toEqual([]);
    expect(await stopDaemon(v.daemon)).toBe(0);
    // After teardown (unmount, final flush): a clean ext4 in the files, the file as expected.
    expectExportedExt4File(v.dir, v.scratch, '/data', data);
    expect(leftovers()).toEqual([]);
  });

  it('an O_DIRECT writer racing flushes of the raw device: every flush tracked, files equal to the device', async () => {
    const v = await liveVolume('trk-race');
    const writer = pythonWriter(RANDOM_WRITER, [v.device, '4', '0']);
    const flushes: FlushReport[] = [];
    while (writer.running()) {
      flushes.push(flushReport(v.name));
      await tick(); // the writer's exit is an event
    }
    const writes = Number((await writer.done).trim());
    expect(writes).toBeGreaterThan(100);
    expect(flushes.length).toBeGreaterThan(2);
    // The write counter moved during the race: every flush ran from the trace, none scanned.
    for (const f of flushes) expect(f.tracking).toBe('block-layer');
    const last = flushReport(v.name);
    expect(last.tracking).toBe('block-layer');
    expect((await differingChunks(v.dir, readDevice(v.image), v.scratch, CHUNK))).toEqual([]);
    // Idle now: nothing written since.
    cliOk(['flush', v.name]);
    expect(readStatus(v.name)?.lastCheck?.idle).toBe(true);
    expect(await stopDaemon(v.daemon)).toBe(0);
  });

  it('a write landing right at the thaw is flushed by the next flush, not absorbed', async () => {
    const v = await liveVolume('trk-thaw', ['--mkfs', 'ext4', '--mount', 'MNT']);
    const file = join(v.mnt, 'blocks');
    writeFileSync(file, randomBytes(2 ** 20));
    spawnSync('sync');
    flushReport(v.name);
    // The writer rewrites 4 KiB blocks of a preallocated file with O_DIRECT (straight to the
    // device, no metadata) and stops after the first write a freeze held up: that write is
    // released by FITHAW and lands right after it, and nothing is written after it.
    const writer = pythonWriter(`
import os, sys, mmap, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 4096); n = 0; end = time.time() + 20; lat = []
while time.time() < end:
    buf.seek(0); buf.write(os.urandom(4096))
    t = time.perf_counter(); os.pwrite(fd, buf, (n % 256) * 4096); dt = time.perf_counter() - t; n += 1
    lat.append(dt)
    if n > 50 and dt > 8 * sorted(lat)[len(lat) // 2] and dt > 0.0005:
        print('held', n, round(dt * 1000, 2)); sys.exit(0)
print('never held', n)
`, [file]);
    while (writer.running()) {
      flushReport(v.name);
      await tick();
    }
    const said = await writer.done;
    expect(said).toMatch(/^held /);
    // The write released by the thaw reached the files with the next flush.
    flushReport(v.name);
    expect((await differingChunks(v.dir, readDevice(v.image), v.scratch, CHUNK)).filter((c) => c !== 0)).toEqual([]);
    expect(await stopDaemon(v.daemon)).toBe(0);
  });

  it('a ring buffer overrun falls back to a full scan, logged once, and tracking resumes', async () => {
    const v = await liveVolume('trk-overrun', [], { VBD_SHADOW_TRACE_BUFFER_KB: '4' });
    for (let round = 0; round < 2; round++) {
      // Thousands of scattered writes in a burst: far more than a 4 KiB buffer per CPU holds
      // between two drains.
      await pythonWriter(RANDOM_WRITER, [v.device, '10', '6000']).done;
      const f = flushReport(v.name);
      expect(f.tracking).toMatch(/^full-scan \(trace events lost on cpu\d+ \(overrun \d+/);
      expect(f.chunksHashed).toBe(CHUNKS);
      expect((await differingChunks(v.dir, readDevice(v.image), v.scratch, CHUNK))).toEqual([]);
    }
    // Said once (the second overrun is not logged again).
    expect(eventsOf(v.name).filter((e) => e.kind === 'tracking-fallback' && e.reason.startsWith('trace events lost'))).toHaveLength(1);
    // A few writes fit: tracking is back.
    await pythonWriter(RANDOM_WRITER, [v.device, '10', '3']).done;
    const f = flushReport(v.name);
    expect(f.tracking).toBe('block-layer');
    expect(f.chunksHashed).toBeLessThanOrEqual(3);
    expect((await differingChunks(v.dir, readDevice(v.image), v.scratch, CHUNK))).toEqual([]);
    expect(await stopDaemon(v.daemon)).toBe(0);
    expect(leftovers()).toEqual([]);
  });

  it('buffered writes to the raw device, far more than the buffer held when the daemon traced its own fsync, are flushed from the trace', async () => {
    // 3000 chunks of 64 KiB written through the page cache, pushed to the device by the flush's
    // fsync on the daemon's thread: 16 bios of 4 KiB per chunk, 48000 block_bio_queue events
    // (~2.9 MB) when that thread's bios were traced — more than two CPUs' 1 MiB buffers hold
    // (the bench's 10 % of a 4 GiB volume overran the default 4 MiB the same way) — and 3000
    // completions (~180 KB) now.
    const size = 256 * 2 ** 20;
    const v = await liveVolume('trk-burst', [], { VBD_SHADOW_TRACE_BUFFER_KB: '1024' }, size);
    const picked = new Set<number>();
    while (picked.size < 3000) picked.add(Math.floor(Math.random() * (size / CHUNK)));
    const fd = openSync(v.device, 'r+');
    try {
      for (const c of picked) writeSync(fd, randomBytes(CHUNK), 0, CHUNK, c * CHUNK);
    } finally {
      closeSync(fd); // not the device's last close (the daemon holds it): nothing is synced here
    }
    const f = flushReport(v.name);
    expect(f.tracking).toBe('block-layer');
    expect(f.chunksHashed).toBe(picked.size);
    expect(f.chunksChanged).toBe(picked.size);
    expect(eventsOf(v.name).filter((e) => e.kind === 'tracking-fallback' && e.scans === 'this flush')).toEqual([]);
    expect(await differingChunks(v.dir, readDevice(v.image, size), v.scratch, CHUNK)).toEqual([]);
    expect(await stopDaemon(v.daemon)).toBe(0);
    expect(leftovers()).toEqual([]);
  });
});
