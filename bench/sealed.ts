// Sealed (encrypted) volumes, side by side in one run: the AES-256-GCM ceiling of this machine
// (`openssl speed`), populate of a sealed 1 GiB volume against it (the plain populate beside it),
// fio on a sealed volume's device against the same volume unsealed, fio in a file on ext4 on a
// sealed volume against the same file inside gocryptfs and inside CryFS, and a 1%-dirty flush,
// sealed against plain, with the bytes that reach the backing filesystem counted outside the daemon
// (the backing directory on an ext4 of its own over a loop device). Prints and records; asserts nothing.

import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, existsSync, fsyncSync, mkdirSync, openSync, readFileSync, readdirSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { basename, join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { formatSize } from '../src/common/size.js';
import { STATE_DIR } from '../src/daemon/epoch-record.js';
import type { FlushReport } from '../src/daemon/runtime.js';
import { MAP_HEADER_BYTES, mapPayloadBytes } from '../src/store/map.js';
import { VolumeKeys } from '../src/store/keys.js';
import { openChunk, sealChunk, slotSize } from '../src/store/slot.js';
import { cli, startBenchDaemon, type BenchDaemon } from './daemon.js';
import { median, table } from './lib.js';
import { WORKLOADS } from './peers.js';

const GiB = 2 ** 30;
const MiB = 2 ** 20;
const CHUNK = 65536;
/** The largest block of `openssl speed`'s default table; measured alone with `-bytes`. */
const OPENSSL_BLOCK = 16384;
const PASSPHRASE = 'sealed benchmark passphrase';

export const SEALED_PARTS = ['populate', 'devices', 'files', 'flush'] as const;
export type SealedPart = (typeof SEALED_PARTS)[number];

const KEPT_NOTE = /^\*Not re-run in this run \(`--sealed-parts`\): from the run measured (.*?)\.\*\s*/;

/** Subsection `heading` (a `### ` line) of an earlier run's text, up to the next one, with its date. */
function earlier(previous: string | undefined, heading: string): string {
  const measured = /^Measured (.*)\.$/m.exec(previous ?? '')?.[1] ?? 'an earlier run';
  const start = previous?.indexOf(`${heading}\n`) ?? -1;
  if (previous === undefined || start < 0) return `${heading}\n\nNot run yet (\`--sealed-parts\`).`;
  const end = previous.indexOf('\n### ', start + heading.length);
  let body = previous.slice(start + heading.length, end < 0 ? undefined : end).trim();
  // A part kept over several runs keeps the date it was measured, said once.
  let when = measured;
  for (let kept = KEPT_NOTE.exec(body); kept !== null; kept = KEPT_NOTE.exec(body)) {
    when = kept[1] ?? when;
    body = body.slice(kept[0].length);
  }
  return `${heading}\n\n*Not re-run in this run (\`--sealed-parts\`): from the run measured ${when}.*\n\n${body}`;
}

export interface SealedOptions {
  /** Interleaved rounds for populate, file fio and flush (after one warm-up round for populate). */
  rounds: number;
  /** Interleaved runs of fio on the devices (sealed against unsealed): at least 5. */
  deviceRuns: number;
  /** Seconds per fio run. */
  seconds: number;
  /** Size of the fio file in the encrypted filesystems (MiB). */
  fileMiB: number;
  /** The parts to run (populate, devices, files, flush); the others are kept from `previous`. */
  parts: readonly SealedPart[];
  /** The section as the last run wrote it (docs/bench/sealed.md), for the parts not run now. */
  previous: string | undefined;
}

interface Job {
  name: string;
  rw: string;
  bs: string;
  depth: number;
}

/** What a user would run in an encrypted directory: 4 KiB random at QD1 and QD32, 1 MiB sequential. */
const FILE_JOBS: Job[] = [
  { name: 'rand read 4K qd1', rw: 'randread', bs: '4k', depth: 1 },
  { name: 'rand read 4K qd32', rw: 'randread', bs: '4k', depth: 32 },
  { name: 'rand write 4K qd1', rw: 'randwrite', bs: '4k', depth: 1 },
  { name: 'rand write 4K qd32', rw: 'randwrite', bs: '4k', depth: 32 },
  { name: 'seq read 1M qd8', rw: 'read', bs: '1M', depth: 8 },
  { name: 'seq write 1M qd8', rw: 'write', bs: '1M', depth: 8 },
];

/** The fio options every contender gets, so the comparison is of the paths only. */
const FIO_COMMON = ['--direct=1', '--ioengine=libaio', '--randrepeat=0', '--output-format=json'];

/** Undo steps, run last-in first-out whatever failed; each runs once. */
class Cleanup {
  private readonly steps: { what: string; run: () => unknown }[] = [];

  add(what: string, run: () => unknown): void {
    this.steps.push({ what, run });
  }

  async runAll(): Promise<void> {
    for (let step = this.steps.pop(); step !== undefined; step = this.steps.pop()) {
      try {
        await step.run();
      } catch (err) {
        process.stderr.write(`sealed: cleanup ${step.what}: ${err instanceof Error ? err.message : String(err)}\n`);
      }
    }
  }
}

function say(line: string): void {
  process.stderr.write(`sealed: ${line}\n`);
}

function run(cmd: string, args: string[], env?: NodeJS.ProcessEnv): string {
  return execFileSync(cmd, args, { encoding: 'utf8', env: env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'] });
}

/** Unmounts for real (a FUSE daemon then exits); tries again for a moment while busy. */
function unmount(mnt: string): void {
  for (let i = 0; i < 50; i++) {
    const r = spawnSync('umount', [mnt], { encoding: 'utf8' });
    if (r.status === 0) return;
    if (/not mounted|no mount point/i.test(r.stderr)) return;
    spawnSync('sleep', ['0.1']);
  }
  throw new Error(`umount ${mnt} failed`);
}

// ---------------------------------------------------------------------------------------------
// The crypto ceiling

/** `openssl speed` AES-256-GCM at 16 KiB blocks, in MB/s: one core, or `multi` processes. */
function opensslMBps(multi: number | undefined): number {
  const args = ['speed', '-elapsed', '-seconds', '2', '-bytes', String(OPENSSL_BLOCK), ...(multi !== undefined ? ['-multi', String(multi)] : []), '-evp', 'aes-256-gcm'];
  const out = run('openssl', args);
  const line = out.split('\n').reverse().find((l) => /^aes-256-gcm\s/i.test(l.trim()));
  const k = line === undefined ? undefined : /([\d.]+)k\s*$/.exec(line.trim());
  if (k?.[1] === undefined) throw new Error(`openssl ${args.join(' ')}: no AES-256-GCM figure in its output`);
  return Number(k[1]) / 1000; // "1000s of bytes per second" → MB/s
}

/** Node's own AES-256-GCM through the slot format, one thread: 64 KiB slots opened (decrypted and
 *  verified) from 64 MiB of sealed slots in RAM, 4 passes; MB/s. What one populate thread can reach at best. */
function nodeOpenMBps(): number {
  const keys = new VolumeKeys(randomBytes(32), randomBytes(16));
  try {
    const key = keys.slotKey(0);
    const count = 1024;
    const size = slotSize(CHUNK);
    const ring = Buffer.alloc(count * size);
    const chunk = randomBytes(CHUNK);
    for (let i = 0; i < count; i++) sealChunk(key, { chunk: i, epoch: 1 }, chunk, ring.subarray(i * size, (i + 1) * size));
    const t = performance.now();
    for (let pass = 0; pass < 4; pass++) {
      for (let i = 0; i < count; i++) openChunk(key, { chunk: i, epoch: 1 }, ring.subarray(i * size, (i + 1) * size), chunk);
    }
    return (4 * count * CHUNK) / 1e6 / ((performance.now() - t) / 1000);
  } finally {
    keys.wipe();
  }
}

/** Node's own AES-256-GCM, the most its crypto gives here: each of `threads` worker threads decrypts
 *  and verifies 64 KiB messages (one decipher each, as a slot is opened, no copy) for about a second,
 *  all at once; the sum in MB/s. The ceiling of a populate done with Node's crypto on this machine. */
async function nodeGcmMBps(threads: number): Promise<number> {
  const code = `
    const { createCipheriv, createDecipheriv, createSecretKey, randomBytes } = require('node:crypto');
    const { parentPort } = require('node:worker_threads');
    const key = createSecretKey(randomBytes(32)), ad = randomBytes(36), plain = randomBytes(${CHUNK});
    const msgs = Array.from({ length: 64 }, () => {
      const iv = randomBytes(12), c = createCipheriv('aes-256-gcm', key, iv);
      c.setAAD(ad);
      const body = Buffer.concat([c.update(plain), c.final()]);
      return { iv, body, tag: c.getAuthTag() };
    });
    let n = 0;
    const t = performance.now();
    while (performance.now() - t < 1000) {
      for (const m of msgs) {
        const d = createDecipheriv('aes-256-gcm', key, m.iv);
        d.setAAD(ad); d.setAuthTag(m.tag); d.update(m.body); d.final();
      }
      n += msgs.length;
    }
    parentPort.postMessage((n * ${CHUNK}) / 1e6 / ((performance.now() - t) / 1000));`;
  const rates = await Promise.all(Array.from({ length: threads }, () => new Promise<number>((resolve, reject) => {
    const w = new Worker(code, { eval: true });
    w.once('message', (rate: number) => resolve(rate));
    w.once('error', reject);
  })));
  return rates.reduce((a, b) => a + b, 0);
}

// ---------------------------------------------------------------------------------------------
// Volumes and daemons

/** A 1 GiB image of random (non-zero) data to import: 4 MiB blocks, each different. */
function randomImage(path: string, size: number): void {
  const fd = openSync(path, 'w');
  try {
    for (let at = 0; at < size; at += 4 * MiB) writeSync(fd, randomBytes(4 * MiB), 0, 4 * MiB, at);
  } finally {
    closeSync(fd);
  }
}

function sealedInit(dir: string, key: string, image?: string): void {
  cli(['init', dir, '--size', '1G', '--files', '100', '--chunk', '64K', '--sealed', '--key-file', key]);
  if (image !== undefined) cli(['import', dir, image, '--key-file', key]);
}

function plainInit(dir: string, image?: string): void {
  cli(['init', dir, '--size', '1G', '--files', '100', '--chunk', '64K']);
  if (image !== undefined) cli(['import', dir, image]);
}

/** Starts a daemon, stopped by `cleanup` (its final flush) unless stopped before. */
async function started(cleanup: Cleanup, name: string, args: string[]): Promise<BenchDaemon> {
  const d = await startBenchDaemon(name, args);
  let stopped = false;
  const stop: BenchDaemon['stop'] = async () => {
    if (stopped) return { exitMs: 0, last: undefined };
    stopped = true;
    return d.stop();
  };
  cleanup.add(`daemon ${name}`, stop);
  return { ...d, stop };
}

/** The sealed daemon, or why it cannot run here (a daemon that does not serve sealed volumes yet). */
async function startSealed(cleanup: Cleanup, name: string, args: string[]): Promise<BenchDaemon | string> {
  try {
    return await started(cleanup, name, args);
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    // Only a refusal of sealed volumes as such is a reason to skip; any other failure is loud.
    if (/sealed volumes are not served|not served by the daemon|does not serve sealed/i.test(message)) return message;
    throw err;
  }
}

function populateMsOf(d: BenchDaemon): number {
  const ms = d.status().populateMs;
  if (ms === undefined) throw new Error(`${d.name}: no populateMs in its status`);
  return ms;
}

// ---------------------------------------------------------------------------------------------
// fio

function fio(filename: string, job: Job, seconds: number, size: number): number {
  const out = run('fio', ['--name=bench', `--filename=${filename}`, ...FIO_COMMON, `--rw=${job.rw}`, `--bs=${job.bs}`,
    `--iodepth=${job.depth}`, `--runtime=${seconds}`, '--time_based', `--size=${size}`]);
  const result = (JSON.parse(out) as { jobs: { read: { bw_bytes: number }; write: { bw_bytes: number } }[] }).jobs[0];
  const bytes = job.rw.includes('write') ? result?.write.bw_bytes : result?.read.bw_bytes;
  return (bytes ?? 0) / 1e6;
}

/** Writes the whole fio file once (fio's layout), synced: every contender starts from a full file. */
function layOut(filename: string, size: number): void {
  run('fio', ['--name=layout', `--filename=${filename}`, ...FIO_COMMON, '--rw=write', '--bs=1M', '--iodepth=8', `--size=${size}`, '--end_fsync=1']);
}

const ratio = (a: number | undefined, b: number | undefined): string => (a === undefined || b === undefined || b === 0 ? '–' : `${(a / b).toFixed(2)}×`);
const fixed = (v: number | undefined, digits = 0): string => (v === undefined || Number.isNaN(v) ? '–' : v.toFixed(digits));

// ---------------------------------------------------------------------------------------------
// 1 and 2: ceiling and populate

interface PopulateFigures {
  plainMs: number;
  sealedMs: number | undefined;
  ossl1: number;
  ossl2: number;
  node1: number;
  /** Node's AES-256-GCM on two threads at once (nodeGcmMBps). */
  nodeGcm2: number;
  /** Threads the sealed populate opened slots on (status populateThreads). */
  threads: number | undefined;
}

async function benchPopulateSealed(work: string, key: string, image: string, rounds: number, cleanup: Cleanup): Promise<{ figures: PopulateFigures; skipped?: string }> {
  const plainDir = join(work, 'bench-sealed-pop-plain');
  const sealedDir = join(work, 'bench-sealed-pop-sealed');
  say('populate: 1 GiB plain and sealed volumes, 64K chunks, 100 files, random data');
  plainInit(plainDir, image);
  sealedInit(sealedDir, key, image);
  const plain: number[] = [];
  const sealed: number[] = [];
  const ossl1: number[] = [];
  const ossl2: number[] = [];
  const node1: number[] = [];
  const nodeGcm2: number[] = [];
  let threads: number | undefined;
  let skipped: string | undefined;
  const last = { plain: NaN, sealed: NaN, ossl1: NaN, ossl2: NaN, node1: NaN, nodeGcm2: NaN };
  // Round 0 warms the page cache and the VM's memory; not counted. Alternating order.
  for (let round = 0; round <= rounds; round++) {
    const steps: (() => Promise<void>)[] = [
      async () => {
        const d = await started(cleanup, basename(plainDir), [plainDir]);
        last.plain = populateMsOf(d);
        await d.stop();
        if (round > 0) plain.push(last.plain);
      },
      async () => {
        if (skipped !== undefined) return;
        const d = await startSealed(cleanup, basename(sealedDir), [sealedDir, '--key-file', key]);
        if (typeof d === 'string') {
          skipped = d;
          say(`sealed populate skipped: ${d}`);
          return;
        }
        last.sealed = populateMsOf(d);
        threads = d.status().populateThreads;
        await d.stop();
        if (round > 0) sealed.push(last.sealed);
      },
      async () => {
        last.ossl1 = opensslMBps(undefined);
        last.ossl2 = opensslMBps(2);
        last.node1 = nodeOpenMBps();
        last.nodeGcm2 = await nodeGcmMBps(2);
        if (round > 0) {
          nodeGcm2.push(last.nodeGcm2);
          ossl1.push(last.ossl1);
          ossl2.push(last.ossl2);
          node1.push(last.node1);
        }
      },
    ];
    if (round % 2 === 1) steps.reverse();
    for (const step of steps) await step();
    say(`populate round ${round}${round === 0 ? ' (warm-up)' : ''}: plain ${fixed(last.plain)} ms, sealed ${fixed(last.sealed)} ms, openssl ${fixed(last.ossl1)} / ${fixed(last.ossl2)} MB/s, node open ${fixed(last.node1)} MB/s, node GCM 2 threads ${fixed(last.nodeGcm2)} MB/s`);
  }
  rmSync(plainDir, { recursive: true, force: true });
  rmSync(sealedDir, { recursive: true, force: true });
  forgetEpochRecords(work);
  return {
    figures: { plainMs: median(plain), sealedMs: sealed.length > 0 ? median(sealed) : undefined, ossl1: median(ossl1), ossl2: median(ossl2), node1: median(node1), nodeGcm2: median(nodeGcm2), threads },
    ...(skipped !== undefined ? { skipped } : {}),
  };
}

function populateTable(f: PopulateFigures, skipped: string | undefined): string {
  const mbps = (ms: number | undefined): number | undefined => (ms === undefined ? undefined : GiB / 1e6 / (ms / 1000));
  const plainRate = mbps(f.plainMs);
  const sealedRate = mbps(f.sealedMs);
  const cryptoOnlyMs = (GiB / 1e6 / f.ossl2) * 1000;
  const nodeGcmMs = (GiB / 1e6 / f.nodeGcm2) * 1000;
  const lines = [
    table(['1 GiB, 64 KiB chunks, 100 files', 'time (ms)', 'MB/s', '× openssl 2 processes', '× openssl 1 core', '× Node GCM 2 threads'], [
      ['`openssl speed -evp aes-256-gcm -multi 2` (16 KiB blocks)', fixed(cryptoOnlyMs), fixed(f.ossl2), '1.00×', ratio(f.ossl2, f.ossl1), ratio(f.ossl2, f.nodeGcm2)],
      ['`openssl speed -evp aes-256-gcm` (1 core, 16 KiB blocks)', fixed((GiB / 1e6 / f.ossl1) * 1000), fixed(f.ossl1), ratio(f.ossl1, f.ossl2), '1.00×', ratio(f.ossl1, f.nodeGcm2)],
      ['Node\'s AES-256-GCM, 2 threads at once (64 KiB messages, a decipher each, no copy)', fixed(nodeGcmMs), fixed(f.nodeGcm2), ratio(f.nodeGcm2, f.ossl2), ratio(f.nodeGcm2, f.ossl1), '1.00×'],
      ['Node `openChunk` (the slot format), one thread, 64 KiB slots in RAM', fixed((GiB / 1e6 / f.node1) * 1000), fixed(f.node1), ratio(f.node1, f.ossl2), ratio(f.node1, f.ossl1), ratio(f.node1, f.nodeGcm2)],
      [`populate, sealed (read + decrypt + verify, ${f.threads === 0 ? 'on the daemon\'s thread' : `on ${f.threads ?? '?'} pool thread${f.threads === 1 ? '' : 's'}`})`, fixed(f.sealedMs), fixed(sealedRate), ratio(sealedRate, f.ossl2), ratio(sealedRate, f.ossl1), ratio(sealedRate, f.nodeGcm2)],
      ['populate, plain (read)', fixed(f.plainMs), fixed(plainRate), ratio(plainRate, f.ossl2), ratio(plainRate, f.ossl1), ratio(plainRate, f.nodeGcm2)],
    ]),
    '',
  ];
  if (f.sealedMs === undefined) {
    lines.push(`Sealed populate **skipped**: ${skipped ?? 'not run'}.`);
  } else {
    lines.push(
      `Sealed populate runs at ${ratio(sealedRate, f.ossl2)} the two-process openssl AES-256-GCM ceiling (target ≥ 0.5×), ${ratio(sealedRate, f.node1)} Node's own one-thread open of slots in RAM, and ${ratio(f.plainMs, f.sealedMs)} the speed of the plain populate. ` +
        `What bounds it: the slots are opened with Node's crypto (the project's rule), Node ${process.version} with its bundled OpenSSL ${process.versions.openssl}. ` +
        `One thread of it opens 64 KiB slots at ${fixed(f.node1)} MB/s (${ratio(f.node1, f.ossl1)} the openssl command's one core: a cipher context per slot and a new output buffer per update); ` +
        `two threads decrypting 64 KiB messages at once make ${fixed(f.nodeGcm2)} MB/s together (${ratio(f.nodeGcm2, f.ossl2)} the two-process ceiling), the most Node's crypto gives here before a byte is read or copied. ` +
        `Populate opens the slots on ${f.threads === 0 ? 'the daemon\'s thread' : `${f.threads ?? '?'} pool thread${f.threads === 1 ? '' : 's'} (the daemon's own thread stays free for its pipes)`}, straight into the image, and also reads them (the plain populate's reads alone: ${f.plainMs.toFixed(0)} ms) and copies each plaintext out of Node's buffer.`,
    );
  }
  return lines.join('\n');
}

// ---------------------------------------------------------------------------------------------
// 3: fio on the devices, sealed against unsealed

async function benchDevices(work: string, key: string, image: string, runs: number, seconds: number, cleanup: Cleanup, skipped: string | undefined): Promise<string> {
  if (skipped !== undefined) return `fio on the sealed device against the same volume unsealed: **skipped**: ${skipped}.`;
  const plainDir = join(work, 'bench-sealed-dev-plain');
  const sealedDir = join(work, 'bench-sealed-dev-sealed');
  say(`devices: fio on 1 GiB plain and sealed devices, ${runs} interleaved runs`);
  plainInit(plainDir, image);
  sealedInit(sealedDir, key, image);
  const plain = await started(cleanup, basename(plainDir), [plainDir]);
  const sealed = await startSealed(cleanup, basename(sealedDir), [sealedDir, '--key-file', key]);
  if (typeof sealed === 'string') return `fio on the sealed device against the same volume unsealed: **skipped**: ${sealed}.`;
  const devices = [plain.status().device ?? '', sealed.status().device ?? ''] as const;
  for (const device of devices) {
    fio(device, WORKLOADS[1], 1, GiB); // warm-up, not counted
    fio(device, WORKLOADS[0], 1, GiB);
  }
  const mbps = WORKLOADS.map(() => [[] as number[], [] as number[]] as const);
  for (let r = 0; r < runs; r++) {
    WORKLOADS.forEach((w, i) => {
      const order = r % 2 === 0 ? [0, 1] : [1, 0];
      for (const which of order) mbps[i]?.[which]?.push(fio(devices[which] ?? '', w, seconds, GiB));
    });
    say(`devices: run ${r + 1}/${runs} done`);
  }
  // Both teardowns flush the whole device (fio wrote all over it): the sealed one through its overflow journal.
  await sealed.stop();
  await plain.stop();
  rmSync(plainDir, { recursive: true, force: true });
  rmSync(sealedDir, { recursive: true, force: true });
  forgetEpochRecords(work);
  const rows = WORKLOADS.map((w, i) => {
    const [p, s] = mbps[i] ?? [[], []];
    const pairs = p.map((v, k) => (s[k] ?? 0) / v);
    return [w.name, median(p).toFixed(0), median(s).toFixed(0), ratio(median(s), median(p)), `${Math.min(...pairs).toFixed(2)}–${Math.max(...pairs).toFixed(2)}`];
  });
  return [
    `fio on the device (direct=1, libaio, ${seconds} s per run, whole 1 GiB device), the same 1 GiB volume (64 KiB chunks, 100 files, the same random data) sealed and unsealed, both live at once, median of ${runs} interleaved runs (order alternating). Target: sealed ≥ 0.95× unsealed.`,
    '',
    table(['workload', 'unsealed MB/s', 'sealed MB/s', 'sealed ÷ unsealed', 'range of the per-run ratios'], rows),
  ].join('\n');
}

// ---------------------------------------------------------------------------------------------
// 4: fio in a file: gocryptfs, CryFS, ext4 on vbd-shadow (sealed, and plain for reference)

interface FileContender {
  name: string;
  /** The directory the fio file goes in. */
  dir: string;
}

function logFd(work: string, name: string): number {
  return openSync(join(work, `${name}.log`), 'w');
}

function failWithLog(work: string, name: string, err: unknown): never {
  let log = '';
  try {
    log = readFileSync(join(work, `${name}.log`), 'utf8').trim().split('\n').slice(-3).join(' / ');
  } catch {
    // no log
  }
  throw new Error(`${name}: ${err instanceof Error ? err.message.split('\n')[0] : String(err)}${log !== '' ? `: ${log}` : ''}`);
}

function gocryptfsMount(work: string, pass: string, cleanup: Cleanup): FileContender {
  const base = join(work, 'gocryptfs');
  const cipher = join(base, 'cipher');
  const mnt = join(base, 'mnt');
  mkdirSync(cipher, { recursive: true });
  mkdirSync(mnt, { recursive: true });
  cleanup.add('gocryptfs directory', () => rmSync(base, { recursive: true, force: true }));
  const fd = logFd(work, 'gocryptfs');
  try {
    // It forks its server into the background once mounted, so stderr goes to a file, not a pipe.
    execFileSync('gocryptfs', ['-init', '-q', '-passfile', pass, cipher], { stdio: ['ignore', 'ignore', fd] });
    cleanup.add('gocryptfs mount', () => unmount(mnt));
    execFileSync('gocryptfs', ['-q', '-passfile', pass, cipher, mnt], { stdio: ['ignore', 'ignore', fd] });
  } catch (err) {
    failWithLog(work, 'gocryptfs', err);
  } finally {
    closeSync(fd);
  }
  return { name: 'gocryptfs', dir: mnt };
}

function cryfsMount(work: string, cleanup: Cleanup): FileContender {
  const base = join(work, 'cryfs');
  const basedir = join(base, 'basedir');
  const mnt = join(base, 'mnt');
  const home = join(base, 'home'); // CryFS keeps per-filesystem state under $HOME/.local/share
  for (const d of [basedir, mnt, home]) mkdirSync(d, { recursive: true });
  cleanup.add('cryfs directory', () => rmSync(base, { recursive: true, force: true }));
  const fd = logFd(work, 'cryfs');
  try {
    cleanup.add('cryfs mount', () => unmount(mnt));
    execFileSync('cryfs', ['--cipher', 'aes-256-gcm', basedir, mnt], {
      input: `${PASSPHRASE}\n`,
      stdio: ['pipe', 'ignore', fd],
      env: { ...process.env, CRYFS_FRONTEND: 'noninteractive', CRYFS_NO_UPDATE_CHECK: 'true', HOME: home, XDG_DATA_HOME: join(home, '.local', 'share') },
    });
  } catch (err) {
    failWithLog(work, 'cryfs', err);
  } finally {
    closeSync(fd);
  }
  return { name: 'CryFS', dir: mnt };
}

async function vbdMount(work: string, key: string, sealed: boolean, cleanup: Cleanup): Promise<FileContender | string> {
  const dir = join(work, `bench-sealed-ext4-${sealed ? 'sealed' : 'plain'}`);
  const mnt = join(work, `ext4-${sealed ? 'sealed' : 'plain'}-mnt`);
  cleanup.add(`volume ${basename(dir)}`, () => rmSync(dir, { recursive: true, force: true }));
  cleanup.add(`mount point ${mnt}`, () => rmSync(mnt, { recursive: true, force: true }));
  if (sealed) sealedInit(dir, key);
  else plainInit(dir);
  const args = [dir, '--mkfs', 'ext4', '--mount', mnt, ...(sealed ? ['--key-file', key] : [])];
  const d = sealed ? await startSealed(cleanup, basename(dir), args) : await started(cleanup, basename(dir), args);
  if (typeof d === 'string') return d;
  return { name: `ext4 on vbd-shadow ${sealed ? 'sealed' : 'plain'}`, dir: d.status().mountpoint ?? mnt };
}

async function benchFiles(work: string, key: string, pass: string, opts: SealedOptions, cleanup: Cleanup): Promise<string> {
  const size = opts.fileMiB * MiB;
  say('files: mounting gocryptfs, CryFS, ext4 on vbd-shadow sealed and plain');
  const contenders: FileContender[] = [gocryptfsMount(work, pass, cleanup), cryfsMount(work, cleanup)];
  const sealed = await vbdMount(work, key, true, cleanup);
  const skipped = typeof sealed === 'string' ? sealed : undefined;
  if (typeof sealed !== 'string') contenders.push(sealed);
  const plain = await vbdMount(work, key, false, cleanup);
  if (typeof plain === 'string') throw new Error(plain);
  contenders.push(plain);
  for (const c of contenders) {
    say(`files: laying out ${opts.fileMiB} MiB in ${c.name}`);
    layOut(join(c.dir, 'fio.dat'), size);
    fio(join(c.dir, 'fio.dat'), { name: 'warm-up', rw: 'randread', bs: '4k', depth: 1 }, 1, size); // not counted
  }
  const mbps = new Map<string, number[][]>(contenders.map((c) => [c.name, FILE_JOBS.map(() => [])]));
  for (let r = 0; r < opts.rounds; r++) {
    // Rotating order: each contender goes first once in a while.
    const order = contenders.map((_, i) => contenders[(i + r) % contenders.length] as FileContender);
    FILE_JOBS.forEach((job, j) => {
      for (const c of order) mbps.get(c.name)?.[j]?.push(fio(join(c.dir, 'fio.dat'), job, opts.seconds, size));
    });
    say(`files: round ${r + 1}/${opts.rounds} done`);
  }
  const med = (name: string, j: number): number | undefined => {
    const v = mbps.get(name)?.[j];
    return v === undefined || v.length === 0 ? undefined : median(v);
  };
  const ours = skipped === undefined ? 'ext4 on vbd-shadow sealed' : 'ext4 on vbd-shadow plain';
  const oursShort = skipped === undefined ? 'sealed' : 'plain';
  const rows = FILE_JOBS.map((job, j) => [
    job.name,
    fixed(med('gocryptfs', j)),
    fixed(med('CryFS', j)),
    skipped === undefined ? fixed(med('ext4 on vbd-shadow sealed', j)) : 'skipped',
    fixed(med('ext4 on vbd-shadow plain', j)),
    ratio(med(ours, j), med('gocryptfs', j)),
    ratio(med(ours, j), med('CryFS', j)),
    skipped === undefined ? ratio(med('ext4 on vbd-shadow sealed', j), med('ext4 on vbd-shadow plain', j)) : '–',
  ]);
  const lines = [
    `fio in one ${opts.fileMiB} MiB file (laid out and synced first), ${FIO_COMMON.slice(0, 2).join(', ')} for every contender (all of them accept O_DIRECT), ${opts.seconds} s per run, median of ${opts.rounds} interleaved rounds (order rotating). ` +
      'gocryptfs and CryFS keep their ciphertext in a directory on the machine\'s disk (/var/tmp), as in a home directory; vbd-shadow volumes are 1 GiB, 64 KiB chunks, 100 files, formatted and mounted by the daemon (`--mkfs ext4 --mount`). ' +
      'All use AES-256-GCM: gocryptfs by default, CryFS with `--cipher aes-256-gcm` (its default is xchacha20-poly1305), default block sizes otherwise (gocryptfs 4 KiB, CryFS 16 KiB).',
    '',
    table(['workload (MB/s)', 'gocryptfs', 'CryFS', 'ext4 on vbd-shadow sealed', 'ext4 on vbd-shadow plain', `vbd-shadow ${oursShort} ÷ gocryptfs`, `vbd-shadow ${oursShort} ÷ CryFS`, 'sealed ÷ plain'], rows),
  ];
  if (skipped !== undefined) lines.push('', `ext4 on a sealed volume **skipped**: ${skipped}. The ratios use the plain volume instead (same path, no crypto: the RAM image is plaintext either way).`);
  return lines.join('\n');
}

// ---------------------------------------------------------------------------------------------
// 5: 1%-dirty flush, bytes counted outside the daemon

interface SealedDetails {
  epoch?: number;
  inFreeSlots?: number;
  throughJournal?: number;
  mapBytes?: number;
}

type SealedFlushReport = FlushReport & { sealed?: SealedDetails };

interface FlushSample {
  ms: number;
  changed: number;
  /** Sectors written to the backing filesystem's loop device during the flush (syncfs before and after), bytes. */
  deviceBytes: number;
  /** /proc/PID/io wchar of the daemon during the flush: what its write syscalls carried. */
  processBytes: number;
  /** /proc/PID/io write_bytes of the daemon during the flush (see the note: not only the backing files). */
  processWriteBytes: number;
  reportedBytes: number;
  journalBytes: number;
  sealed?: SealedDetails | undefined;
}

interface BackedVolume {
  kind: 'plain' | 'sealed';
  daemon: BenchDaemon;
  device: string;
  backingDevice: string;
  backingMnt: string;
}

function sectorsWrittenBytes(device: string): number {
  const fields = readFileSync(`/sys/block/${basename(device)}/stat`, 'utf8').trim().split(/\s+/);
  return Number(fields[6]) * 512;
}

/** /proc/PID/io: wchar (bytes handed to write syscalls) and write_bytes (pages the process dirtied). */
function processIo(pid: number): { wchar: number; writeBytes: number } {
  const text = readFileSync(`/proc/${pid}/io`, 'utf8');
  const field = (name: string): number => Number(new RegExp(`^${name}:\\s*(\\d+)$`, 'm').exec(text)?.[1] ?? 0);
  return { wchar: field('wchar'), writeBytes: field('write_bytes') };
}

/** An ext4 of its own over a loop device (a sparse file on the work disk), mounted, with the volume in it. */
async function backedVolume(work: string, kind: 'plain' | 'sealed', key: string, image: string, cleanup: Cleanup): Promise<BackedVolume | string> {
  const img = join(work, `flushfs-${kind}.img`);
  const mnt = join(work, `flushfs-${kind}`);
  writeFileSync(img, '');
  execFileSync('truncate', ['-s', '3G', img]);
  cleanup.add(`backing image ${img}`, () => rmSync(img, { force: true }));
  const backingDevice = run('losetup', ['--find', '--show', img]).trim();
  cleanup.add(`loop ${backingDevice}`, () => run('losetup', ['--detach', backingDevice]));
  // No lazy init: nothing but the flush may write to this filesystem while it is measured.
  run('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', backingDevice]);
  mkdirSync(mnt, { recursive: true });
  cleanup.add(`mount point ${mnt}`, () => rmSync(mnt, { recursive: true, force: true }));
  run('mount', [backingDevice, mnt]);
  cleanup.add(`mount ${mnt}`, () => unmount(mnt));
  const dir = join(mnt, `bench-sealed-flush-${kind}`);
  if (kind === 'sealed') sealedInit(dir, key, image);
  else plainInit(dir, image);
  const d = kind === 'sealed' ? await startSealed(cleanup, basename(dir), [dir, '--key-file', key]) : await started(cleanup, basename(dir), [dir]);
  if (typeof d === 'string') return d;
  d.flush(); // a first flush settles whatever the start left
  return { kind, daemon: d, device: d.status().device ?? '', backingDevice, backingMnt: mnt };
}

function writeChunks(device: string, chunks: number[]): void {
  const fd = openSync(device, 'r+');
  try {
    for (const c of chunks) writeSync(fd, randomBytes(CHUNK), 0, CHUNK, c * CHUNK);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

function someChunks(count: number, fraction: number): number[] {
  const picked = new Set<number>();
  while (picked.size < Math.round(count * fraction)) picked.add(Math.floor(Math.random() * count));
  return [...picked].sort((a, b) => a - b);
}

function measureFlush(v: BackedVolume): FlushSample {
  const pid = v.daemon.child.pid ?? 0;
  run('sync', ['-f', v.backingMnt]);
  const dev0 = sectorsWrittenBytes(v.backingDevice);
  const proc0 = processIo(pid);
  const f = v.daemon.flush().lastFlush as SealedFlushReport | undefined;
  run('sync', ['-f', v.backingMnt]); // what the flush left for the filesystem's own journal commit counts too
  const dev1 = sectorsWrittenBytes(v.backingDevice);
  const proc1 = processIo(pid);
  if (f?.ok !== true) throw new Error(`${v.kind} flush failed: ${f?.error ?? 'no report'}`);
  return {
    ms: f.durationMs, changed: f.chunksChanged, deviceBytes: dev1 - dev0, processBytes: proc1.wchar - proc0.wchar, processWriteBytes: proc1.writeBytes - proc0.writeBytes,
    reportedBytes: f.bytesWritten, journalBytes: f.journalBytes ?? 0, sealed: f.sealed,
  };
}

async function benchFlushSealed(work: string, key: string, image: string, rounds: number, cleanup: Cleanup): Promise<string> {
  say('flush: 1 GiB plain and sealed volumes, each on an ext4 of its own over a loop device');
  const plain = await backedVolume(work, 'plain', key, image, cleanup);
  if (typeof plain === 'string') throw new Error(plain);
  const sealed = await backedVolume(work, 'sealed', key, image, cleanup);
  const skipped = typeof sealed === 'string' ? sealed : undefined;
  const volumes = typeof sealed === 'string' ? [plain] : [plain, sealed];
  const samples = new Map<string, FlushSample[]>(volumes.map((v) => [v.kind, []]));
  for (let r = 0; r < rounds; r++) {
    const chunks = someChunks(GiB / CHUNK, 0.01); // the same chunks on both
    for (const v of r % 2 === 0 ? volumes : [...volumes].reverse()) {
      writeChunks(v.device, chunks);
      samples.get(v.kind)?.push(measureFlush(v));
    }
    say(`flush: round ${r + 1}/${rounds} done`);
  }
  const rows: string[][] = [];
  const notes: string[] = [];
  for (const v of volumes) {
    const s = samples.get(v.kind) ?? [];
    const pick = (k: (x: FlushSample) => number): number => median(s.map(k));
    const changed = pick((x) => x.changed);
    // The flush report carries no map byte count (yet): then the map copy a commit writes, from the
    // format (src/store/map.ts: header + budget + 16 bytes per chunk + pending bits; the whole map each commit).
    const reportedMap = s.every((x) => x.sealed?.mapBytes !== undefined) ? pick((x) => x.sealed?.mapBytes ?? 0) : undefined;
    const mapBytes = reportedMap ?? MAP_HEADER_BYTES + mapPayloadBytes(GiB / CHUNK);
    // What the flush has to write at least: plain, the chunks twice (journal, then files); sealed, one slot per chunk plus the map.
    const expected = v.kind === 'sealed' ? changed * slotSize(CHUNK) + mapBytes : 2 * changed * CHUNK;
    rows.push([
      v.kind,
      pick((x) => x.ms).toFixed(1),
      String(changed),
      formatSize(changed * CHUNK),
      formatSize(pick((x) => x.reportedBytes)) + (v.kind === 'plain' ? ` + journal ${formatSize(pick((x) => x.journalBytes))}` : ''),
      v.kind === 'sealed' ? `${formatSize(mapBytes)}${reportedMap === undefined ? ' (format: whole map)' : ''}` : '–',
      formatSize(expected),
      formatSize(pick((x) => x.deviceBytes)),
      ratio(pick((x) => x.deviceBytes), expected),
      formatSize(pick((x) => x.processBytes)),
      ratio(pick((x) => x.processBytes), expected),
      ratio(pick((x) => x.deviceBytes), changed * CHUNK),
    ]);
    if (v.kind === 'sealed') {
      const last = s.at(-1)?.sealed;
      notes.push(`The sealed flush report (status lastFlush.sealed, last round): \`${JSON.stringify(last ?? null)}\`${reportedMap === undefined ? `; it carries no map byte count, so "map bytes" is one whole sealed map copy as the format lays it out (${formatSize(mapBytes)} for ${GiB / CHUNK} chunks: each commit rewrites the whole map, so this grows with the volume, not with the change)` : ''}.`);
    }
  }
  const dirtied = volumes.map((v) => `${v.kind} ${formatSize(median((samples.get(v.kind) ?? []).map((x) => x.processWriteBytes)))}`).join(', ');
  notes.push(`Not used as a measure: the daemon's /proc/PID/io write_bytes grows far more than what reaches the backing device (median per flush: ${dirtied}); it counts pages the process dirtied, not only the backing files' (its write syscalls carry only what the table shows).`);
  const time = (k: 'plain' | 'sealed'): number | undefined => {
    const s = samples.get(k);
    return s === undefined || s.length === 0 ? undefined : median(s.map((x) => x.ms));
  };
  const lines = [
    `1%-dirty flush of 1 GiB (64 KiB chunks, 100 files; 1% of the chunks rewritten with random data at random places, the same places on both volumes each round), median of ${rounds} interleaved rounds. ` +
      'Each volume directory lives on an ext4 of its own over a loop device (a sparse file on the machine\'s disk), so the bytes reaching the backing filesystem are counted outside the daemon: ' +
      'the loop device\'s sectors written (/sys/block/loopN/stat) between a syncfs before and a syncfs after the flush (this includes ext4\'s own journal and metadata), and what the daemon\'s write syscalls carried (/proc/PID/io wchar; its status file is a few hundred bytes of that). ' +
      `"Expected" is the least the flush must write: sealed, the changed chunks' slots (${slotSize(CHUNK)} bytes each: chunk + nonce + tag) plus the map bytes; plain, the changed chunks twice (journal, then files). ` +
      'Targets: sealed flush time ≤ the plain one; sealed bytes ≤ 1.1× expected.',
    '',
    table(['volume', 'flush (ms, daemon)', 'chunks changed', 'changed bytes', 'written (daemon says)', 'map bytes', 'expected', 'backing device wrote', '÷ expected', 'daemon write() bytes', '÷ expected', 'device ÷ changed bytes'], rows),
    '',
  ];
  if (skipped !== undefined) lines.push(`Sealed flush **skipped**: ${skipped}. The plain row is measured the same way, for when it runs.`, '', ...notes);
  else lines.push(`Sealed flush time ÷ plain: ${ratio(time('sealed'), time('plain'))}.`, '', ...notes);
  return lines.join('\n');
}

// ---------------------------------------------------------------------------------------------

export function sealedVersions(): string {
  const first = (cmd: string, args: string[]): string => {
    try {
      return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).split('\n')[0]?.trim() ?? '?';
    } catch {
      return '?';
    }
  };
  return [first('openssl', ['version']), first('gocryptfs', ['-version']), first('cryfs', ['--version']), first('fio', ['--version'])].join('; ');
}

/** Root's epoch records (one per sealed volume served) of this run's volumes under `base` that are gone.
 *  Promptly: a record names its directory by device and inode, and a new directory of the next part
 *  that gets the same inode would be taken for a sealed volume whose manifest was replaced. */
function forgetEpochRecords(base: string): void {
  const dir = join(STATE_DIR, String(process.getuid?.() ?? 0));
  let names: string[] = [];
  try {
    names = readdirSync(dir).filter((n) => n.endsWith('.json'));
  } catch {
    return;
  }
  for (const n of names) {
    try {
      const record = JSON.parse(readFileSync(join(dir, n), 'utf8')) as { dir?: unknown };
      if (typeof record.dir === 'string' && record.dir.startsWith(`${base}/`) && !existsSync(record.dir)) rmSync(join(dir, n));
    } catch {
      // not ours, or gone
    }
  }
}

export async function benchSealed(work: string, opts: SealedOptions): Promise<string> {
  const base = join(work, 'sealed');
  mkdirSync(base, { recursive: true });
  const cleanup = new Cleanup();
  // Undone last to first: the records go once their directories are gone.
  cleanup.add('epoch records of the sealed volumes', () => forgetEpochRecords(base));
  cleanup.add(`work directory ${base}`, () => rmSync(base, { recursive: true, force: true }));
  try {
    const key = join(base, 'passphrase');
    writeFileSync(key, PASSPHRASE, { mode: 0o600 });
    const pass = join(base, 'gocryptfs.pass');
    writeFileSync(pass, `${PASSPHRASE}\n`, { mode: 0o600 });
    const image = join(base, 'random.img');
    randomImage(image, GiB);
    const run = (part: SealedPart): boolean => opts.parts.includes(part);
    const populate = run('populate') ? await benchPopulateSealed(base, key, image, opts.rounds, cleanup) : undefined;
    const devices = run('devices') ? await benchDevices(base, key, image, opts.deviceRuns, opts.seconds, cleanup, populate?.skipped) : undefined;
    const files = run('files') ? await benchFiles(base, key, pass, opts, cleanup) : undefined;
    const flush = run('flush') ? await benchFlushSealed(base, key, image, Math.max(opts.rounds, 5), cleanup) : undefined;
    const skipped = populate?.skipped !== undefined ? [`**Sealed parts skipped in this run**: ${populate.skipped}. They are written and run as soon as the daemon serves sealed volumes.`, ''] : [];
    const part = (heading: string, text: string | undefined): string => (text === undefined ? earlier(opts.previous, heading) : `${heading}\n\n${text}`);
    const populateText = populate === undefined ? undefined : [
      `\`openssl speed -elapsed -seconds 2 -bytes ${OPENSSL_BLOCK} -evp aes-256-gcm\`, single process and with \`-multi 2\`, run in the same rounds as the populates (the 16 KiB column: the largest of openssl's default table). ` +
        `Populate time is the daemon's own (status \`populateMs\`), warm, median of ${opts.rounds} interleaved rounds after one warm-up; the sealed and plain volumes hold the same random data.`,
      '',
      populateTable(populate.figures, populate.skipped),
    ].join('\n');
    return [
      ...skipped,
      part('### The crypto ceiling and populate', populateText),
      '',
      part('### fio on the device: sealed against the same volume unsealed', devices),
      '',
      part('### fio in a file: gocryptfs and CryFS against ext4 on a sealed volume', files),
      '',
      part('### 1%-dirty flush of 1 GiB: sealed against plain, bytes counted outside the daemon', flush),
    ].join('\n');
  } finally {
    await cleanup.runAll();
  }
}
