// Flush costs, timed inside the daemon and read from its status: the idle check, a 1%-dirty
// flush (scan + journal + apply), and the writer stall a freeze causes on a mounted ext4;
// beside them, what a profile-sync-daemon-style rsync of the same files writes for the same change.

import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, cpSync, existsSync, ftruncateSync, mkdirSync, openSync, readFileSync, readdirSync, rmSync, rmdirSync, unlinkSync, writeFileSync, writeSync, constants as fsc } from 'node:fs';
import { cpus, loadavg } from 'node:os';
import { basename, join } from 'node:path';
import { formatSize } from '../src/common/size.js';
import type { EventOf } from '../src/daemon/events.js';
import { lockMemory, mapShared, unlockMemory, unmap, type Pointer } from '../src/sys/libc.js';
import { addLoopDevice, clearLoop, configureLoop, removeLoopDevice } from '../src/sys/loop.js';
import { unmountPath } from '../src/sys/mount.js';
import { INSTANCES } from '../src/sys/tracefs.js';
import { startBenchDaemon, type BenchDaemon } from './daemon.js';
import { initVolume } from '../src/volume/init.js';
import { filledVolume, median, table, withLock } from './lib.js';

const GiB = 2 ** 30;
const CHUNK = 65536;

/** Random distinct chunk numbers: `fraction` of the device. */
function someChunks(deviceSize: number, fraction: number): number[] {
  const count = deviceSize / CHUNK;
  const picked = new Set<number>();
  while (picked.size < Math.round(count * fraction)) picked.add(Math.floor(Math.random() * count));
  return [...picked].sort((a, b) => a - b);
}

/** New random data (distinct per piece, so no delta tool can match it) at each chunk's place. */
function writeChunks(path: string, chunks: number[], offsetOf: (chunk: number) => [string, number] | number): void {
  if (typeof offsetOf(0) === 'number') {
    const fd = openSync(path, 'r+');
    for (const c of chunks) writeSync(fd, randomBytes(CHUNK), 0, CHUNK, offsetOf(c) as number);
    closeSync(fd);
    return;
  }
  for (const c of chunks) {
    const [file, at] = offsetOf(c) as [string, number];
    const fd = openSync(join(path, file), 'r+');
    writeSync(fd, randomBytes(CHUNK), 0, CHUNK, at);
    closeSync(fd);
  }
}

interface FlushFigures {
  idleUs: number;
  dirtyMs: number;
  scanMs: number;
  journalMs: number;
  applyMs: number;
  changed: number;
  bytesWritten: number;
  journalBytes: number;
}

async function measureVolume(work: string, gib: number, rounds: number): Promise<FlushFigures> {
  const name = `bench-flush-${gib}g`;
  const dir = join(work, name); // the directory's name is the volume's name
  await filledVolume(dir, gib * GiB, 100, CHUNK, { kind: 'linear' });
  const d = await startBenchDaemon(name, [dir]);
  try {
    const device = d.status().device ?? '';
    const idle: number[] = [];
    d.flush();
    for (let i = 0; i < 20; i++) {
      const s = d.flush();
      if (s.lastCheck?.idle === true) idle.push(s.lastCheck.durationMs * 1000);
    }
    const dirty: FlushFigures[] = [];
    for (let round = 0; round < rounds; round++) {
      const chunks = someChunks(gib * GiB, 0.01);
      writeChunks(device, chunks, (c) => c * CHUNK);
      const f = d.flush().lastFlush;
      if (f?.ok !== true) throw new Error(`flush failed: ${f?.error}`);
      dirty.push({
        idleUs: 0, dirtyMs: f.durationMs, scanMs: f.timings?.['scanMs'] ?? 0, journalMs: f.timings?.['journalMs'] ?? 0,
        applyMs: f.timings?.['applyMs'] ?? 0, changed: f.chunksChanged, bytesWritten: f.bytesWritten, journalBytes: f.journalBytes ?? 0,
      });
    }
    const pick = (k: keyof FlushFigures): number => median(dirty.map((x) => x[k]));
    return { idleUs: median(idle), dirtyMs: pick('dirtyMs'), scanMs: pick('scanMs'), journalMs: pick('journalMs'), applyMs: pick('applyMs'), changed: pick('changed'), bytesWritten: pick('bytesWritten'), journalBytes: pick('journalBytes') };
  } finally {
    await d.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Writer stall on a mounted ext4 during flushes: the daemon's frozen time and what a writer sees. */
async function measureFreeze(work: string, rounds: number): Promise<{ frozenMs: number; writerMaxMs: number; idleWriterMs: number; mountedIdleUs: number }> {
  const name = 'bench-freeze-1g';
  const dir = join(work, name); // the directory's name is the volume's name
  const mnt = join(work, 'freeze-mnt');
  // A never-used (all-zero) volume, so --mkfs formats it.
  await initVolume({ dir, deviceSize: GiB, fileCount: 100, chunkSize: CHUNK, layout: { kind: 'linear' }, force: true });
  const d = await startBenchDaemon(name, [dir, '--mkfs', 'ext4', '--mount', mnt]);
  try {
    // A writer doing 4 KiB random writes into a 256 MiB file, ~1000 a second (about 4 MB/s of
    // scattered writes, each dirtying a whole 64 KiB chunk), reporting its longest wait.
    const script = `
      const fs = require('node:fs'); const fd = fs.openSync(process.argv[1], 'w'); const buf = Buffer.alloc(4096, 7);
      const pause = new Int32Array(new SharedArrayBuffer(4)); let max = 0; let stop = false;
      process.on('SIGTERM', () => { stop = true; });
      const loop = () => { for (let i = 0; i < 50 && !stop; i++) { const t = performance.now();
        fs.writeSync(fd, buf, 0, 4096, Math.floor(Math.random() * 65536) * 4096); max = Math.max(max, performance.now() - t);
        Atomics.wait(pause, 0, 0, 1); }
        if (stop) { console.log(max.toFixed(1)); process.exit(0); } setImmediate(loop); };
      loop();`;
    const runWriter = async (during: () => Promise<void>): Promise<number> => {
      const w = spawn(process.execPath, ['-e', script, join(mnt, 'load')], { stdio: ['ignore', 'pipe', 'inherit'] });
      let out = '';
      w.stdout?.on('data', (b: Buffer) => (out += b.toString()));
      const gone = new Promise((r) => w.once('exit', r));
      await new Promise((r) => setTimeout(r, 300));
      await during();
      w.kill('SIGTERM');
      await gone;
      return Number(out.trim());
    };
    const idleWriterMs = await runWriter(() => new Promise((r) => setTimeout(r, 2000)));
    const frozen: number[] = [];
    const writerMaxMs = await runWriter(async () => {
      for (let i = 0; i < rounds; i++) {
        await new Promise((r) => setTimeout(r, 200));
        frozen.push(d.flush().lastFlush?.timings?.['frozenMs'] ?? 0);
      }
    });
    const idle: number[] = [];
    for (let i = 0; i < 10; i++) {
      const s = d.flush();
      if (s.lastCheck?.idle === true) idle.push(s.lastCheck.durationMs * 1000);
    }
    return { frozenMs: Math.max(...frozen), writerMaxMs, idleWriterMs, mountedIdleUs: median(idle) };
  } finally {
    await d.stop();
    rmSync(dir, { recursive: true, force: true });
    rmSync(mnt, { recursive: true, force: true });
  }
}

/** psd-style: the live files sit in tmpfs and rsync copies them to disk; same 1% change. */
function measureRsync(work: string): { mode: string; ms: number; written: number }[] {
  const shm = '/dev/shm/vbd-bench-psd';
  const disk = join(work, 'psd-disk');
  const size = GiB;
  rmSync(shm, { recursive: true, force: true });
  mkdirSync(shm);
  const per = size / 100;
  const block = randomBytes(per);
  for (let i = 0; i < 100; i++) writeSync(openSync(join(shm, `file${String(i + 1).padStart(3, '0')}`), 'w'), block);
  const results: { mode: string; ms: number; written: number }[] = [];
  try {
    for (const [mode, flags] of [['rsync -a --inplace (whole files, psd default for local copies)', ['-a', '--inplace']], ['rsync -a --inplace --no-whole-file (delta)', ['-a', '--inplace', '--no-whole-file']]] as const) {
      rmSync(disk, { recursive: true, force: true });
      cpSync(shm, disk, { recursive: true });
      execFileSync('sync');
      // An older copy, as after an earlier sync: rsync's size+mtime check must see the change.
      execFileSync('touch', ['-d', '1 hour ago', ...readdirSync(disk).map((n) => join(disk, n))]);
      const chunks = someChunks(size, 0.01);
      writeChunks(shm, chunks, (c) => [`file${String(Math.floor((c * CHUNK) / per) + 1).padStart(3, '0')}`, (c * CHUNK) % per]);
      const t = performance.now();
      const out = execFileSync('rsync', [...flags, '--stats', `${shm}/`, `${disk}/`], { encoding: 'utf8' });
      execFileSync('sync');
      const ms = performance.now() - t;
      const literal = /Literal data: ([\d,]+) bytes/.exec(out);
      const matched = /Matched data: ([\d,]+) bytes/.exec(out);
      const written = Number((literal?.[1] ?? '0').replace(/,/g, '')) + ((flags as readonly string[]).includes('--no-whole-file') ? 0 : Number((matched?.[1] ?? '0').replace(/,/g, '')));
      results.push({ mode, ms, written });
    }
  } finally {
    rmSync(shm, { recursive: true, force: true });
    rmSync(disk, { recursive: true, force: true });
  }
  return results;
}

/** Before issue 13 (every flush scans, one thread), a full scan on the pool, and block-layer tracking. */
export const CHANGE_MODES = ['old', 'scan', 'tracked'] as const;
export type ChangeMode = (typeof CHANGE_MODES)[number];
const MODE_ENV: Record<ChangeMode, Record<string, string>> = {
  old: { VBD_SHADOW_TRACKING: 'off', VBD_SHADOW_SCAN_THREADS: '1' },
  scan: { VBD_SHADOW_TRACKING: 'off' },
  tracked: {},
};
const MODE_TITLE: Record<ChangeMode, string> = { old: 'full scan, 1 thread (before)', scan: 'full scan, pool', tracked: 'tracked' };
type Kind = 'raw' | 'mounted';

/** The changes flushed: the same 10 MiB whatever the size, then a share of the device. */
const CHANGES = [
  { label: '10 MiB', chunks: (_size: number): number => (10 * 2 ** 20) / CHUNK },
  { label: '0.1 %', chunks: (size: number): number => Math.round((size / CHUNK) * 0.001) },
  { label: '1 %', chunks: (size: number): number => Math.round((size / CHUNK) * 0.01) },
  { label: '10 %', chunks: (size: number): number => Math.round((size / CHUNK) * 0.1) },
] as const;

interface ChangeFigures {
  flushMs: number;
  scanMs: number;
  hashed: number;
  changed: number;
  tracking: string;
}

interface TeardownFigures {
  finalFlushMs: number;
  teardownMs: number;
  /** The daemon's own account of its teardown (the 'teardown-timings' event), where it has one. */
  unwind: EventOf<'teardown-timings'> | undefined;
}

interface DaemonFigures extends TeardownFigures {
  change: Record<string, ChangeFigures>;
  idleUs: number;
  /** The teardown of a daemon that only populated, flushed once and checked once (no history). */
  fresh: TeardownFigures;
}

/** `count` distinct random 64 KiB pieces of [0, span), new random data at each. */
function writeRandomPieces(path: string, span: number, count: number): void {
  const picked = new Set<number>();
  while (picked.size < count) picked.add(Math.floor(Math.random() * (span / CHUNK)));
  writeChunks(path, [...picked].sort((a, b) => a - b), (c) => c * CHUNK);
}

/**
 * One daemon on the volume in `dir`: the session's first flush (a full scan in every mode),
 * then each change `rounds` times (written through the raw device, or into a file of the
 * mounted ext4), idle checks, and the teardown of the unchanged volume.
 */
async function measureDaemon(dir: string, mnt: string, size: number, kind: Kind, mode: ChangeMode, rounds: number): Promise<DaemonFigures> {
  const name = basename(dir);
  const args = kind === 'mounted' ? [dir, '--mkfs', 'ext4', '--mount', mnt] : [dir];
  const d = await startBenchDaemon(name, args, MODE_ENV[mode]);
  let stopped = false;
  try {
    const device = d.status().device ?? '';
    // Half the filesystem, allocated once (the first daemon on the volume), holds the mounted changes.
    const data = join(mnt, 'data');
    const span = kind === 'raw' ? size : size / 2;
    if (kind === 'mounted' && !existsSync(data)) execFileSync('fallocate', ['-l', String(span), data]);
    d.flush(); // the session's first flush scans in every mode
    const change: Record<string, ChangeFigures> = {};
    for (const c of CHANGES) {
      const figures: ChangeFigures[] = [];
      for (let round = 0; round < rounds; round++) {
        writeRandomPieces(kind === 'raw' ? device : data, span, c.chunks(size));
        const f = d.flush().lastFlush;
        if (f?.ok !== true) throw new Error(`flush failed: ${f?.error}`);
        figures.push({ flushMs: f.durationMs, scanMs: f.timings?.['scanMs'] ?? 0, hashed: f.chunksHashed ?? 0, changed: f.chunksChanged, tracking: f.tracking ?? '' });
      }
      const pick = (k: 'flushMs' | 'scanMs' | 'hashed' | 'changed'): number => median(figures.map((x) => x[k]));
      change[c.label] = { flushMs: pick('flushMs'), scanMs: pick('scanMs'), hashed: pick('hashed'), changed: pick('changed'), tracking: figures[figures.length - 1]?.tracking ?? '' };
    }
    const idle: number[] = [];
    for (let i = 0; i < 20; i++) {
      const s = d.flush();
      if (s.lastCheck?.idle === true) idle.push(s.lastCheck.durationMs * 1000);
    }
    stopped = true;
    const teardown = await stopTimed(d);
    // The same volume served afresh: what its teardown costs without the history above (the
    // device's page cache of the writes, the daemon's memory of the large flushes).
    const fresh = await startBenchDaemon(name, args, MODE_ENV[mode]);
    let freshStopped = false;
    try {
      fresh.flush();
      fresh.flush();
      freshStopped = true;
      return { change, idleUs: median(idle), ...teardown, fresh: await stopTimed(fresh) };
    } finally {
      if (!freshStopped) await fresh.stop();
    }
  } finally {
    if (!stopped) await d.stop();
  }
}

/** SIGTERM, the exit awaited: how long it took, its final flush, and the daemon's account of it. */
async function stopTimed(d: BenchDaemon): Promise<TeardownFigures> {
  const { exitMs, last } = await d.stop();
  const final = last?.lastFlush;
  if (final?.reason !== 'teardown' || final.ok !== true) throw new Error(`no successful teardown flush in the last status (${JSON.stringify(final)})`);
  const unwind = last?.events?.find((e): e is EventOf<'teardown-timings'> => e.kind === 'teardown-timings');
  return { finalFlushMs: final.durationMs, teardownMs: exitMs, unwind };
}

/**
 * The scaling table (issue 13): per volume size and kind (raw device, mounted ext4), one volume
 * served by a daemon per mode in turn — before (full scan on one thread), full scan on the
 * pool, block-layer tracking — each flushing the same changes. Each size holds the loop lock
 * once (`lock`), and its volumes are removed right after.
 */
export async function benchChange(work: string, sizesGiB: number[], kinds: Kind[], modes: ChangeMode[], rounds: number, lock: string | undefined): Promise<string> {
  const results = new Map<string, DaemonFigures>();
  /** The 1-minute load average before and after each daemon: what else ran on the machine. */
  const load: number[] = [];
  const key = (gib: number, kind: Kind, mode: ChangeMode): string => `${gib}/${kind}/${mode}`;
  for (const gib of sizesGiB) {
    await withLock(lock, `${gib} GiB`, async () => {
      for (const kind of kinds) {
        const dir = join(work, `bench-change-${gib}g-${kind}`); // the directory's name is the volume's name
        const mnt = join(work, `change-mnt-${gib}g`);
        try {
          if (kind === 'raw') await filledVolume(dir, gib * GiB, 100, CHUNK, { kind: 'linear' });
          else await initVolume({ dir, deviceSize: gib * GiB, fileCount: 100, chunkSize: CHUNK, layout: { kind: 'linear' }, force: true });
          mkdirSync(mnt, { recursive: true });
          for (const mode of modes) {
            process.stderr.write(`change: ${gib} GiB ${kind}, ${MODE_TITLE[mode]}\n`);
            load.push(loadavg()[0] ?? 0);
            results.set(key(gib, kind, mode), await measureDaemon(dir, mnt, gib * GiB, kind, mode, rounds));
            load.push(loadavg()[0] ?? 0);
          }
        } finally {
          rmSync(dir, { recursive: true, force: true });
          rmSync(mnt, { recursive: true, force: true });
        }
      }
    });
  }
  const get = (gib: number, kind: Kind, mode: ChangeMode): DaemonFigures | undefined => results.get(key(gib, kind, mode));
  const ms = (x: number | undefined): string => (x === undefined ? '–' : x.toFixed(1));
  const ratio = (a: number | undefined, b: number | undefined): string => (a === undefined || b === undefined || b === 0 ? '–' : `${(a / b).toFixed(2)}×`);
  const smallest = Math.min(...sizesGiB);

  const same: (string | number)[][] = [];
  const fractions: (string | number)[][] = [];
  const idle: (string | number)[][] = [];
  const phases: (string | number)[][] = [];
  const fresh: (string | number)[][] = [];
  const summary: string[] = [];
  for (const kind of kinds) {
    for (const gib of sizesGiB) {
      const c = (mode: ChangeMode, label: string): ChangeFigures | undefined => get(gib, kind, mode)?.change[label];
      const tracked = c('tracked', '10 MiB');
      same.push([`${gib} GiB`, kind, ms(c('old', '10 MiB')?.flushMs), ms(c('scan', '10 MiB')?.flushMs), ms(tracked?.flushMs), ms(tracked?.scanMs), tracked?.hashed ?? '–', tracked?.changed ?? '–',
        tracked?.tracking ?? '–', ratio(tracked?.flushMs, get(smallest, kind, 'tracked')?.change['10 MiB']?.flushMs), ratio(c('old', '10 MiB')?.flushMs, tracked?.flushMs)]);
      for (const label of ['0.1 %', '1 %', '10 %']) {
        const t = c('tracked', label);
        fractions.push([`${gib} GiB`, kind, label, t?.changed ?? '–', ms(c('old', label)?.flushMs), ms(c('scan', label)?.flushMs), ms(t?.flushMs), t?.hashed ?? '–', ratio(c('old', label)?.flushMs, t?.flushMs)]);
      }
      const f = (mode: ChangeMode): DaemonFigures | undefined => get(gib, kind, mode);
      const us = (x: number | undefined): string => (x === undefined ? '–' : x.toFixed(0));
      idle.push([`${gib} GiB`, kind, us(f('old')?.idleUs), us(f('scan')?.idleUs), us(f('tracked')?.idleUs), ms(f('old')?.finalFlushMs), ms(f('scan')?.finalFlushMs), ms(f('tracked')?.finalFlushMs),
        ms(f('old')?.teardownMs), ms(f('scan')?.teardownMs), ms(f('tracked')?.teardownMs), ratio(f('tracked')?.finalFlushMs, f('old')?.finalFlushMs), ratio(f('tracked')?.teardownMs, f('old')?.teardownMs)]);
      fresh.push([`${gib} GiB`, kind, ms(f('old')?.fresh.finalFlushMs), ms(f('tracked')?.fresh.finalFlushMs), ms(f('old')?.fresh.teardownMs), ms(f('scan')?.fresh.teardownMs), ms(f('tracked')?.fresh.teardownMs),
        ms(f('tracked')?.fresh.unwind?.ms), ratio(f('tracked')?.fresh.teardownMs, f('old')?.fresh.teardownMs)]);
      const history = f('tracked');
      for (const [which, t] of [['after the changes', history], ['fresh', history?.fresh]] as const) {
        const step = (name: (step: string) => boolean): string => ms(t?.unwind?.steps.find((x) => name(x.step))?.ms);
        phases.push([`${gib} GiB`, kind, which, ms(t?.teardownMs), ms(t?.unwind?.ms), step((x) => x === 'stop watching the backing files'), step((x) => x.startsWith('unmount ')),
          step((x) => x.startsWith('detach ')), step((x) => x === 'final writeback to the files'), step((x) => x === 'free the RAM image'),
          step((x) => /^remove \/dev\/loop\d+$/.test(x)), step((x) => x === 'remove the trace instance'), step((x) => x === 'end the scan threads'),
          ms(t?.unwind === undefined ? undefined : t.teardownMs - t.unwind.ms)]);
      }
    }
    const base = get(smallest, kind, 'tracked')?.change['10 MiB']?.flushMs;
    summary.push(`${kind}: ${sizesGiB.filter((g) => g !== smallest).map((g) => `${g} GiB ÷ ${smallest} GiB ${ratio(get(g, kind, 'tracked')?.change['10 MiB']?.flushMs, base)}`).join(', ')}`);
  }
  return [
    `Load average (1 min) on the ${cpus().length} cores, sampled before and after each daemon: ${Math.min(...load).toFixed(2)}–${Math.max(...load).toFixed(2)}` +
      ' (above 0.1, other work shared the machine).',
    '',
    '### The same 10 MiB change (160 random 64 KiB chunks)',
    '',
    table(['volume', 'kind', 'before: flush (ms)', 'full scan on the pool: flush (ms)', 'tracked: flush (ms)', 'tracked: scan (ms)', 'tracked: chunks hashed', 'chunks changed', 'tracked: how', `tracked ÷ ${smallest} GiB`, 'before ÷ tracked'], same),
    '',
    `Tracked, same change, larger ÷ smallest volume (target ≤ 1.2×): ${summary.join('; ')}.`,
    '',
    '### 0.1 %, 1 %, 10 % of the device rewritten',
    '',
    table(['volume', 'kind', 'dirty', 'chunks changed', 'before: flush (ms)', 'full scan on the pool: flush (ms)', 'tracked: flush (ms)', 'tracked: chunks hashed', 'before ÷ tracked'], fractions),
    '',
    '### Idle check and teardown of the unchanged volume',
    '',
    'Idle: median of 20 `vbd-shadow flush` checks with nothing written (lastCheck). Teardown: SIGTERM to the daemon\'s exit (final',
    'flush, unmount, detach, freeing the RAM image), and its final flush alone (lastFlush of reason teardown).',
    '',
    table(['volume', 'kind', 'idle µs: before', 'idle µs: pool', 'idle µs: tracked', 'final flush ms: before', 'final flush ms: pool', 'final flush ms: tracked', 'teardown ms: before', 'teardown ms: pool', 'teardown ms: tracked', 'final flush: tracked ÷ before', 'teardown: tracked ÷ before'], idle),
    '',
    'The same teardown of a fresh daemon on the same volume (populate, the first flush, one idle check, SIGTERM): without',
    'the history above — the raw device\'s page cache of the writes (the kernel drops it when the device is closed) and the',
    'memory the large flushes left the daemon (freed by the kernel as the process exits).',
    '',
    table(['volume', 'kind', 'final flush ms: before', 'final flush ms: tracked', 'teardown ms: before', 'teardown ms: pool', 'teardown ms: tracked', 'tracked: its unwind (ms)', 'teardown: tracked ÷ before'], fresh),
    '',
    '### Where the teardown goes (tracked daemon)',
    '',
    'The daemon\'s own account (its \'teardown-timings\' event, ms): the steps in order, then what the kernel finished',
    'alongside them (started by a step, awaited at the end); "outside" is SIGTERM to exit minus the unwind (the signal, status',
    'writes, the process\'s exit as the benchmark sees it).',
    '',
    table(['volume', 'kind', 'daemon', 'teardown', 'unwind', 'stop watching', 'unmount', 'detach (unbind)', 'final writeback', 'free the RAM image', 'alongside: remove the loop device', 'alongside: remove the trace instance', 'alongside: end the scan threads', 'outside the unwind'], phases),
    '',
    '### What the kernel takes for each step alone',
    '',
    'Nothing else running: an image of the size in a huge-page tmpfs, mapped and mlocked, bound to a loop device, with a trace',
    `instance filtered on it; each step timed on its own, median of ${KERNEL_ROUNDS}.`,
    '',
    table(['volume', 'LOOP_CLR_FD + close', 'LOOP_CTL_REMOVE', 'rmdir of the trace instance', 'munlock', 'munmap', 'unlink of the image', 'umount2 of the tmpfs'],
      await kernelRows(work, sizesGiB, lock)),
  ].join('\n');
}

const KERNEL_ROUNDS = 3;

/** The teardown's kernel steps alone, per size: an image like the daemon's, a loop device, a trace instance. */
async function kernelRows(work: string, sizesGiB: number[], lock: string | undefined): Promise<(string | number)[][]> {
  const rows: (string | number)[][] = [];
  for (const gib of sizesGiB) {
    const runs: number[][] = [];
    for (let round = 0; round < KERNEL_ROUNDS; round++) runs.push(await withLock(lock, `${gib} GiB kernel steps`, () => kernelSteps(work, gib * GiB)));
    rows.push([`${gib} GiB`, ...(runs[0] ?? []).map((_, i) => median(runs.map((r) => r[i] ?? 0)).toFixed(1))]);
  }
  return rows;
}

async function kernelSteps(work: string, size: number): Promise<number[]> {
  const mnt = join(work, 'kernel-steps');
  mkdirSync(mnt, { recursive: true });
  execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size + 4 * 2 ** 20},huge=within_size,noswap,mode=0700`, 'vbd-bench', mnt]);
  const times: number[] = [];
  const timed = async (step: () => unknown): Promise<void> => {
    const t = performance.now();
    await step();
    times.push(performance.now() - t);
  };
  const instance = `${INSTANCES}/vbd-bench-kernel-steps`;
  const windows: { ptr: Pointer; length: number }[] = [];
  let fd = -1;
  let loop: { index: number; fd: number } | undefined;
  try {
    fd = openSync(join(mnt, 'image'), fsc.O_RDWR | fsc.O_CREAT, 0o600);
    ftruncateSync(fd, size);
    for (let at = 0; at < size; at += GiB) {
      const length = Math.min(GiB, size - at);
      const ptr = mapShared(fd, at, length, 'bench image');
      windows.push({ ptr, length });
      lockMemory(ptr, length, 'bench image');
    }
    const index = addLoopDevice();
    loop = { index, fd: openSync(`/dev/loop${index}`, fsc.O_RDWR) };
    configureLoop(loop.fd, fd, join(mnt, 'image'), `LOOP_CONFIGURE of loop${index}`);
    mkdirSync(instance);
    writeFileSync(`${instance}/events/block/block_rq_complete/filter`, `dev == ${7 * 2 ** 20 + index}`);
    writeFileSync(`${instance}/events/block/block_rq_complete/enable`, '1');
    const bound = loop;
    await timed(() => {
      clearLoop(bound.fd, `LOOP_CLR_FD of loop${index}`);
      closeSync(bound.fd);
      bound.fd = -1;
    });
    await timed(() => removeLoopDevice(index));
    loop = undefined;
    await timed(() => rmdirSync(instance));
    await timed(() => windows.forEach((w) => unlockMemory(w.ptr, w.length, 'bench image')));
    await timed(() => windows.splice(0).forEach((w) => unmap(w.ptr, w.length, 'bench image')));
    closeSync(fd);
    fd = -1;
    await timed(() => unlinkSync(join(mnt, 'image')));
    await timed(() => unmountPath(mnt, 'the bench tmpfs'));
  } finally {
    // After a failure halfway: everything it made goes.
    if (loop !== undefined) {
      if (loop.fd >= 0) {
        try {
          clearLoop(loop.fd, 'LOOP_CLR_FD');
        } catch {
          /* was not bound */
        }
        closeSync(loop.fd);
      }
      await removeLoopDevice(loop.index);
    }
    if (existsSync(instance)) rmdirSync(instance);
    for (const w of windows) unmap(w.ptr, w.length, 'bench image');
    if (fd >= 0) closeSync(fd);
    if (readFileSync('/proc/self/mounts', 'utf8').split('\n').some((l) => l.split(' ')[1] === mnt)) execFileSync('umount', [mnt]);
    rmSync(mnt, { recursive: true, force: true });
  }
  return times;
}

export async function benchFlush(work: string, sizesGiB: number[], rounds: number): Promise<string> {
  const rows: (string | number)[][] = [];
  let oneGiB: FlushFigures | undefined;
  for (const gib of sizesGiB) {
    process.stderr.write(`flush: ${gib} GiB linear volume, 64K chunks\n`);
    const f = await measureVolume(work, gib, rounds);
    if (gib === 1) oneGiB = f;
    const scanRate = (gib * GiB) / (f.scanMs / 1000) / 1e9;
    rows.push([`${gib} GiB`, f.idleUs.toFixed(0), f.dirtyMs.toFixed(1), f.scanMs.toFixed(1), scanRate.toFixed(1), f.journalMs.toFixed(1), f.applyMs.toFixed(1), f.changed, formatSize(f.bytesWritten), (f.bytesWritten / (f.changed * CHUNK)).toFixed(3), formatSize(f.journalBytes)]);
  }
  process.stderr.write('flush: freeze stall on a mounted 1 GiB ext4\n');
  const freeze = await measureFreeze(work, rounds);
  process.stderr.write('flush: rsync beside it\n');
  const rsync = measureRsync(work);
  const changed = oneGiB !== undefined ? oneGiB.changed * CHUNK : 0.01 * GiB;
  return [
    table(['volume', 'idle check (µs)', '1%-dirty flush (ms)', 'scan (ms)', 'scan GB/s', 'journal (ms)', 'apply (ms)', 'chunks changed', 'written to files', 'written / changed', 'journal'], rows),
    '',
    `Freeze on a mounted 1 GiB ext4, flushes every 200 ms under a writer of ~1000 random 4 KiB writes a second: longest frozen time ${freeze.frozenMs.toFixed(1)} ms (target ≤ 150 ms per GiB); the writer's longest write ${freeze.writerMaxMs.toFixed(1)} ms during flushes against ${freeze.idleWriterMs.toFixed(1)} ms with no flush. Idle check of the mounted volume (syncfs of the filesystem + write counter): ${freeze.mountedIdleUs.toFixed(0)} µs.`,
    '',
    'The same 1% change (64 KiB pieces at random places of 100 × 10 MiB files) under profile-sync-daemon-style rsync from tmpfs to disk:',
    '',
    table(['method', 'time incl. sync (ms)', 'bytes written', 'vs vbd-shadow'], [
      ...rsync.map((r) => [r.mode, r.ms.toFixed(0), formatSize(r.written), `${(r.written / changed).toFixed(1)}× the bytes`]),
      ['vbd-shadow 1%-dirty flush (files + journal)', oneGiB?.dirtyMs.toFixed(0) ?? '', formatSize((oneGiB?.bytesWritten ?? 0) + (oneGiB?.journalBytes ?? 0)), `${(((oneGiB?.bytesWritten ?? 0) + (oneGiB?.journalBytes ?? 0)) / changed).toFixed(1)}× the bytes`],
    ]),
  ].join('\n');
}
