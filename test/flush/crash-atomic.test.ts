// Crash atomicity, tried for real: kill -9 the daemon at varied moments while it flushes a
// mounted ext4 under write load, then restart. Two kinds of crash alternate:
//  - the daemon dies, its RAM image survives: the restart recovers the image; every file the
//    writer had synced before the kill must be there;
//  - the machine dies (the image is lost too): the files must hold one whole flush — e2fsck
//    clean — with every file synced before the last completed flush began.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readStatus } from '../../src/daemon/runtime.js';
import { cli, cliOk } from '../helpers/cli.js';
import { startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, leftovers, sweep } from '../helpers/system.js';
import { tempDir } from '../helpers/tmp.js';

const TRIALS = 20;

/** Content of writer file `name` (deterministic, so any torn or stale byte shows). */
function expectedContent(name: string): Buffer {
  const n = Number(name.split('-').pop());
  return Buffer.alloc(((n % 13) + 1) * 1000, `${name};`);
}

/** Writes files `t<trial>-<n>` (up to 5000, ~1 ms apart) into `dir`, fsyncs each, prints "<name> <time>" once synced. */
const WRITER = `
const fs = require('node:fs');
const [dir, prefix] = process.argv.slice(1);
const pause = new Int32Array(new SharedArrayBuffer(4));
for (let n = 0; n < 5000; n++) {
  const name = prefix + '-' + n;
  const data = Buffer.alloc(((n % 13) + 1) * 1000, name + ';');
  const fd = fs.openSync(dir + '/' + name, 'w');
  fs.writeSync(fd, data);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  process.stdout.write(name + ' ' + new Date().toISOString() + '\\n');
  Atomics.wait(pause, 0, 0, 1); // ~1 ms apart: load for the whole trial, not a burst
}`;

function startWriter(dir: string, prefix: string): { child: ChildProcess; gone: Promise<unknown>; synced: () => [string, string][] } {
  const child = spawn(process.execPath, ['-e', WRITER, dir, prefix], { stdio: ['ignore', 'pipe', 'inherit'] });
  const gone = new Promise((r) => child.once('close', r));
  let out = '';
  child.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  return { child, gone, synced: () => out.split('\n').filter((l) => l.includes(' ')).map((l) => l.split(' ') as [string, string]) };
}

function fsck(image: string): void {
  const r = spawnSync('e2fsck', ['-fn', image], { encoding: 'utf8' });
  expect(r.status, `e2fsck -fn: ${r.stdout}${r.stderr}`).toBe(0);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe.skipIf(!IS_ROOT)(`crash atomicity (${IS_ROOT ? `${TRIALS} real kill -9 trials` : ROOT_SKIP_REASON})`, () => {
  it('after every crash the files hold one whole flush and lose nothing a completed flush wrote', async () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    const mnt = join(scratch, 'mnt');
    const name = `${TEST_PREFIX}crash`;
    cliOk(['init', dir, '--size', '48M', '--files', '12', '--chunk', '16K', '--layout', 'striped', '--name', name]);
    const first = startDaemon(name, [dir, '--mkfs', 'ext4', '--mount', mnt]);
    await waitLive(first);
    expect(await stopDaemon(first)).toBe(0);

    const outcomes: string[] = [];
    for (let trial = 0; trial < TRIALS; trial++) {
      const t0 = performance.now();
      const machineCrash = trial % 2 === 1;
      const daemon = startDaemon(name, [dir, '--mount', mnt, '--interval', '100ms']);
      await waitLive(daemon);
      // Earlier trials' files go (checked already), so the filesystem never fills up.
      for (const old of readdirSync(mnt).filter((n) => /^t\d+-/.test(n))) rmSync(join(mnt, old));
      const writer = startWriter(mnt, `t${trial}`);
      await sleep(300 + ((trial * 211) % 1300));
      daemon.child.kill('SIGKILL');
      await daemon.exited;
      // The writer may hang in D state on a filesystem the daemon died with frozen; it can only
      // exit once that is thawed — by the restart's recovery, or by the simulated reboot.
      writer.child.kill('SIGKILL');
      const writerGone = writer.gone;
      const lastGood = readStatus(name)?.lastGoodFlush ?? '';
      let recovered = '';
      if (machineCrash) {
        sweep(); // the RAM image, the loop device and the mount vanish with the machine
        await writerGone;
        const r = cli(['recover', dir]);
        expect(r.status, r.stderr).toBe(0);
        recovered = r.stdout;
      }
      const out = join(scratch, 'check.img');
      // The restart recovers a surviving image before anything else; then a clean stop.
      const again = startDaemon(name, [dir, '--mount', mnt]);
      await waitLive(again);
      await writerGone;
      const synced = writer.synced();
      const mustHave = (machineCrash ? synced.filter(([, at]) => at < lastGood) : synced).map(([n]) => n);
      for (const file of mustHave) {
        const path = join(mnt, file);
        expect(existsSync(path), `trial ${trial}: ${file} (synced before the last good flush) is missing`).toBe(true);
        expect(readFileSync(path).equals(expectedContent(file)), `trial ${trial}: ${file} content`).toBe(true);
      }
      expect(await stopDaemon(again)).toBe(0);
      cliOk(['export', dir, out]);
      fsck(out);
      expect(leftovers()).toEqual([]);
      process.stderr.write(`crash trial ${trial}\n`);
      const log = again.output() + recovered;
      const notes = [
        log.includes('recovery: found') ? 'image recovered' : '',
        log.includes('recovery: thawed') ? 'killed while frozen' : '',
        log.includes('completed an interrupted flush') ? 'killed after journal commit: batch completed' : '',
        log.includes('discarding an interrupted') ? 'killed mid-journal: batch discarded' : '',
      ].filter(Boolean);
      outcomes.push(`${((performance.now() - t0) / 1000).toFixed(1)} s, ${machineCrash ? 'machine' : 'daemon'} crash: ${mustHave.length}/${synced.length} synced files checked${notes.length > 0 ? `; ${notes.join(', ')}` : ''}`);
    }
    process.stdout.write(`crash trials:\n  ${outcomes.join('\n  ')}\n`);
    expect(outcomes).toHaveLength(TRIALS);
  }, 600_000);
});
