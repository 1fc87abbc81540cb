// fio on the block device, side by side: the ceiling (loop over a /dev/shm file), loop over a
// disk file, nbdkit split + nbdfuse + loop, a Python FUSE concatenation + loop (naive and with
// big_writes), and vbd-shadow (linear, keyed). Loop-based peers run with direct I/O off and on.
// After each run: do the backing files hold what was written through the device?

import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, existsSync, mkdirSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { backingFileNames } from '../src/volume/init.js';
import { cli, startBenchDaemon } from './daemon.js';
import { median, table } from './lib.js';

const MiB = 2 ** 20;
const FUSE_SCRIPT = fileURLToPath(new URL('../../bench/fuse_concat.py', import.meta.url));

export const WORKLOADS = [
  { name: 'seq read 1M qd8', rw: 'read', bs: '1M', depth: 8 },
  { name: 'seq write 1M qd8', rw: 'write', bs: '1M', depth: 8 },
  { name: 'rand read 4K qd1', rw: 'randread', bs: '4k', depth: 1 },
  { name: 'rand read 4K qd32', rw: 'randread', bs: '4k', depth: 32 },
  { name: 'rand write 4K qd32', rw: 'randwrite', bs: '4k', depth: 32 },
] as const;

interface Served {
  device: string;
  finish: () => Promise<void>;
  /** sha256 of what the backing files hold, in device order. */
  backing: () => string;
  cleanup: () => void;
}

interface Peer {
  name: string;
  /** Sets up the device: its path; `finish` stops serving (the files stay), `backing` reads
   *  what the files hold, `cleanup` removes everything. */
  setup: () => Promise<Served>;
  note?: string;
}

function sh(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8' });
}

/** fio's bandwidth (MB/s) of one workload on `device`, direct I/O through libaio, time-based. */
export function fio(device: string, w: (typeof WORKLOADS)[number], seconds: number, size: number): number {
  const out = sh('fio', ['--name=bench', `--filename=${device}`, '--direct=1', '--ioengine=libaio', `--rw=${w.rw}`, `--bs=${w.bs}`,
    `--iodepth=${w.depth}`, `--runtime=${seconds}`, '--time_based', `--size=${size}`, '--output-format=json', '--randrepeat=0']);
  const job = (JSON.parse(out) as { jobs: { read: { bw_bytes: number }; write: { bw_bytes: number } }[] }).jobs[0];
  if (job === undefined) throw new Error(`fio on ${device}: no job in its output`);
  return (w.rw.includes('write') ? job.write.bw_bytes : job.read.bw_bytes) / 1e6;
}

/** sha256 of files read one after the other, streamed (a 1 GiB Buffer per check piles up:
 *  V8 hardly counts such external memory towards collecting it). */
function hashFiles(paths: string[]): string {
  const hash = createHash('sha256');
  const buf = Buffer.allocUnsafe(4 * MiB);
  for (const path of paths) {
    const fd = openSync(path, 'r');
    for (let n = readSync(fd, buf); n > 0; n = readSync(fd, buf)) hash.update(buf.subarray(0, n));
    closeSync(fd);
  }
  return hash.digest('hex');
}

function hashDevice(device: string): string {
  spawnSync('blockdev', ['--flushbufs', device]);
  return hashFiles([device]);
}

function losetup(file: string, directIo: boolean): string {
  return sh('losetup', ['--find', '--show', `--direct-io=${directIo ? 'on' : 'off'}`, file]).trim();
}

async function waitFor(path: string, what: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (existsSync(path)) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${what}: ${path} did not appear`);
}

function stopProcess(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  const gone = new Promise<void>((r) => child.once('exit', () => r()));
  child.kill('SIGTERM');
  return gone;
}

/** A loop device over MNT/disk, a FUSE file backed by DIR/files/NAMES, served by `processes`. */
function servedOverFuse(dir: string, names: string[], mnt: string, directIo: boolean, processes: ChildProcess[]): Served {
  const device = losetup(join(mnt, 'disk'), directIo);
  return {
    device,
    backing: () => hashFiles(names.map((n) => join(dir, 'files', n))),
    finish: async () => {
      spawnSync('losetup', ['--detach', device]);
      spawnSync('fusermount3', ['-u', mnt]);
      for (const p of processes) await stopProcess(p);
    },
    cleanup: () => rmSync(dir, { recursive: true, force: true }),
  };
}

/** Writes the files one after the other into `out` (streamed). */
function concatInto(out: string, paths: string[]): void {
  execFileSync('sh', ['-c', 'cat "$@" > "$0"', out, ...paths]);
}

/** The volume's bytes as 100 files, the same for every peer (fresh copies each run). */
function makeFiles(dir: string, files: number, fileSize: number, seed: Buffer): string[] {
  mkdirSync(dir, { recursive: true });
  const names = backingFileNames(files);
  names.forEach((n, i) => {
    const fd = openSync(join(dir, n), 'w');
    for (let at = 0; at < fileSize; at += seed.length) writeSync(fd, seed, 0, Math.min(seed.length, fileSize - at), at);
    writeSync(fd, Buffer.from(`file ${i}`), 0, 6, 0);
    closeSync(fd);
  });
  return names;
}

export async function benchPeers(work: string, files: number, fileSizeMiB: number, seconds: number): Promise<string> {
  const fileSize = fileSizeMiB * MiB;
  const size = files * fileSize;
  const seed = randomBytes(4 * MiB);
  const key = join(work, 'bench.key');
  const peers: Peer[] = [];
  const loopPeer = (name: string, directIo: boolean, where: string, note?: string): Peer => ({
    name: `${name}, direct-io ${directIo ? 'on' : 'off'}`,
    note,
    setup: async () => {
      const dir = join(where, 'vbd-bench-peer');
      const names = makeFiles(join(work, 'src'), files, fileSize, seed);
      mkdirSync(dir, { recursive: true });
      const image = join(dir, 'image');
      concatInto(image, names.map((n) => join(work, 'src', n)));
      const device = losetup(image, directIo);
      return {
        device,
        backing: () => hashFiles([image]),
        finish: async () => void spawnSync('losetup', ['--detach', device]),
        cleanup: () => rmSync(dir, { recursive: true, force: true }),
      };
    },
  });
  const nbdPeer = (directIo: boolean): Peer => ({
    name: `nbdkit split + nbdfuse + loop, direct-io ${directIo ? 'on' : 'off'}`,
    note: 'writes corrupt the files (nbdkit 1.32 split bug): run on scratch copies, write figures are path cost only',
    setup: async () => {
      const dir = join(work, 'nbd');
      const names = makeFiles(join(dir, 'files'), files, fileSize, seed);
      const sock = join(dir, 'sock');
      const mnt = join(dir, 'mnt');
      mkdirSync(mnt, { recursive: true });
      const server = spawn('nbdkit', ['-f', '-U', sock, '-P', join(dir, 'pid'), 'split', ...names.map((n) => join(dir, 'files', n))], { stdio: 'ignore' });
      // nbdkit writes its pid file once it accepts connections (the socket may exist before).
      await waitFor(join(dir, 'pid'), 'nbdkit');
      const fuse = spawn('nbdfuse', [join(mnt, 'disk'), '--unix', sock], { stdio: ['ignore', 'ignore', 'pipe'] });
      let fuseErr = '';
      fuse.stderr?.on('data', (d: Buffer) => (fuseErr += d.toString()));
      await waitFor(join(mnt, 'disk'), 'nbdfuse').catch(async (err: unknown) => {
        await stopProcess(fuse);
        await stopProcess(server);
        throw new Error(`${String(err)}: ${fuseErr.trim()}`);
      });
      return servedOverFuse(dir, names, mnt, directIo, [fuse, server]);
    },
  });
  const fusePeer = (bigWrites: boolean, directIo: boolean): Peer => ({
    name: `Python FUSE concat${bigWrites ? ' (big_writes)' : ''} + loop, direct-io ${directIo ? 'on' : 'off'}`,
    setup: async () => {
      const dir = join(work, 'pyfuse');
      const names = makeFiles(join(dir, 'files'), files, fileSize, seed);
      const mnt = join(dir, 'mnt');
      mkdirSync(mnt, { recursive: true });
      const fuse = spawn('/usr/bin/python3', [FUSE_SCRIPT, mnt, ...(bigWrites ? ['--big-writes'] : []), ...names.map((n) => join(dir, 'files', n))], { stdio: 'ignore' });
      await waitFor(join(mnt, 'disk'), 'python FUSE');
      return servedOverFuse(dir, names, mnt, directIo, [fuse]);
    },
  });
  const vbdPeer = (layout: 'linear' | 'keyed'): Peer => ({
    name: `vbd-shadow ${layout}${layout === 'keyed' ? ' (4K chunks)' : ' (64K chunks)'}`,
    setup: async () => {
      const name = `bench-fio-${layout}`;
      const dir = join(work, name);
      const chunk = layout === 'keyed' ? '4K' : '64K';
      writeFileSync600(key, 'benchmark key');
      cli(['init', dir, '--size', String(size), '--files', String(files), '--chunk', chunk, '--layout', layout, '--force', '--yes', ...(layout === 'keyed' ? ['--key-file', key] : [])]);
      const srcNames = makeFiles(join(work, 'src'), files, fileSize, seed);
      const image = join(work, 'src.img');
      concatInto(image, srcNames.map((n) => join(work, 'src', n)));
      cli(['import', dir, image, ...(layout === 'keyed' ? ['--key-file', key] : [])]);
      rmSync(image);
      const d = await startBenchDaemon(name, [dir, ...(layout === 'keyed' ? ['--key-file', key] : [])]);
      const device = d.status().device ?? '';
      return {
        device,
        backing: () => {
          const out = join(work, 'export.img');
          cli(['export', dir, out, ...(layout === 'keyed' ? ['--key-file', key] : [])]);
          const hash = hashFiles([out]);
          rmSync(out);
          return hash;
        },
        finish: async () => {
          if (d.child.exitCode === null) await d.stop(); // the final flush
        },
        cleanup: () => {
          rmSync(dir, { recursive: true, force: true });
          rmSync(`/run/vbd-shadow/${name}`, { recursive: true, force: true });
        },
      };
    },
  });

  peers.push(loopPeer('ceiling: loop over one /dev/shm file', false, '/dev/shm'));
  peers.push(vbdPeer('linear'), vbdPeer('keyed'));
  peers.push(loopPeer('loop over one disk file', false, work), loopPeer('loop over one disk file', true, work));
  peers.push(nbdPeer(false), nbdPeer(true));
  peers.push(fusePeer(false, false), fusePeer(false, true), fusePeer(true, false), fusePeer(true, true));
  // The ceiling again at the end: how far the machine drifted during the run.
  peers.push({ ...loopPeer('ceiling again (drift check)', false, '/dev/shm') });

  const rows: { name: string; mbps: number[]; correct: string; note?: string | undefined }[] = [];
  for (const peer of peers) {
    process.stderr.write(`fio: ${peer.name}\n`);
    const served = await peer.setup();
    let correct = '';
    const mbps: number[] = [];
    try {
      // Warm-up (not counted): this VM hands idle memory back to its host; touch it all first.
      fio(served.device, WORKLOADS[1], 1, size);
      fio(served.device, WORKLOADS[0], 1, size);
      for (const w of WORKLOADS) mbps.push(fio(served.device, w, seconds, size));
      const deviceHash = hashDevice(served.device);
      await served.finish();
      correct = served.backing() === deviceHash ? 'files = device' : 'FILES DIFFER from the device';
    } finally {
      await served.finish().catch(() => undefined);
      served.cleanup();
    }
    rows.push({ name: peer.name, mbps, correct, note: peer.note });
  }
  const ceiling = rows[0]?.mbps ?? [];
  const header = ['contender', ...WORKLOADS.map((w) => `${w.name} MB/s (× ceiling)`), 'after the run'];
  const body = rows.map((r) => [
    r.name,
    ...r.mbps.map((v, i) => `${v.toFixed(0)} (${(v / (ceiling[i] ?? 1)).toFixed(2)})`),
    `${r.correct}${r.note !== undefined ? `; ${r.note}` : ''}`,
  ]);
  const fuseOn = rows.filter((r) => /(FUSE|nbdfuse).*direct-io on/.test(r.name));
  const vbd = rows.filter((r) => r.name.startsWith('vbd-shadow'));
  const speedups = vbd.map((v) => `${v.name}: ${[2, 3, 4].map((i) => `${WORKLOADS[i]?.name} ${(median(fuseOn.map((f) => (v.mbps[i] ?? 0) / (f.mbps[i] ?? 1)))).toFixed(0)}×`).join(', ')}`);
  return [
    table(header, body),
    '',
    `vbd-shadow against the FUSE-based peers with direct I/O on (median ratio over them): ${speedups.join('; ')}.`,
  ].join('\n');
}

function writeFileSync600(path: string, data: string | Buffer): void {
  const fd = openSync(path, 'w', 0o600);
  writeSync(fd, typeof data === 'string' ? Buffer.from(data) : data);
  closeSync(fd);
}

