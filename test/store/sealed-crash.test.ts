// Crash trials: `vbd-shadow import` of a sealed volume killed with SIGKILL at random moments, then
// `vbd-shadow export`: the image is always exactly the one before the import or the one it was
// importing, never a mix; and the next import goes on from there. Real processes, real files,
// real fdatasync; the kill lands where the work is (timed from the moment the import's journal
// appears, or from its start).

import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { SEALED_JOURNAL_NAME } from '../../src/volume/volume.js';
import { BIN, cliOk, sha256 } from '../helpers/cli.js';
import { keyFile, tempDir } from '../helpers/tmp.js';

const MiB = 2 ** 20;

function sleepMs(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

interface Run {
  /** ms from spawn to the journal's appearance (undefined: it never appeared). */
  journalAt: number | undefined;
  /** ms from spawn to exit. */
  endAt: number;
  killed: boolean;
  code: number | null;
}

/**
 * Runs an import; with `kill`, SIGKILLs it `kill.delay` ms after `kill.from` ('journal': the
 * overflow journal appeared; 'start': the spawn), or lets it finish.
 */
async function runImport(dir: string, image: string, key: string, kill?: { from: 'journal' | 'start'; delay: number }): Promise<Run> {
  const t0 = performance.now();
  const child = spawn(process.execPath, [BIN, 'import', dir, image, '--key-file', key], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  let exited = false;
  let code: number | null = null;
  const done = new Promise<void>((resolve) => child.on('exit', (c) => {
    exited = true;
    code = c;
    resolve();
  }));
  let journalAt: number | undefined;
  let killed = false;
  if (kill?.from === 'start') {
    sleepMs(kill.delay);
    killed = child.kill('SIGKILL');
  }
  while (!exited && !killed) {
    if (journalAt === undefined && existsSync(join(dir, SEALED_JOURNAL_NAME))) {
      journalAt = performance.now() - t0;
      if (kill?.from === 'journal') {
        sleepMs(kill.delay);
        killed = child.kill('SIGKILL');
        break;
      }
    }
    await new Promise((r) => setImmediate(r));
  }
  await done;
  if (!killed && code !== 0) throw new Error(`import exited ${code}: ${stderr}`);
  return { journalAt, endAt: performance.now() - t0, killed: killed && code === null, code };
}

function exportHash(dir: string, key: string, out: string): { hash: string; warnings: string } {
  const r = spawnSync(process.execPath, [BIN, 'export', dir, out, '--key-file', key], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`export after a crash failed: ${r.stderr}`);
  return { hash: sha256(readFileSync(out)), warnings: r.stderr };
}

async function trials(o: { spare: string; count: number; size: number; chunk: string; mode: (i: number) => 'journal' | 'start' }): Promise<{ old: number; new: number; notes: string[] }> {
  const scratch = tempDir();
  const dir = join(scratch, 'vol');
  const key = keyFile(scratch, 'crash trials passphrase');
  cliOk(['init', dir, '--sealed', '--size', String(o.size), '--files', '8', '--chunk', o.chunk, '--layout', 'keyed', '--spare', o.spare, '--key-file', key]);
  const images = [0, 1, 2].map((i) => {
    const data = randomBytes(o.size);
    const path = join(scratch, `img${i}`);
    writeFileSync(path, data);
    return { path, hash: sha256(data) };
  });
  const out = join(scratch, 'out.img');
  // Calibrate: one whole import, timed.
  const whole = await runImport(dir, images[0]?.path ?? '', key);
  let current = images[0]?.hash ?? '';
  expect(exportHash(dir, key, out).hash).toBe(current);
  const writing = whole.endAt - (whole.journalAt ?? 0);
  const counts = { old: 0, new: 0, notes: [] as string[] };
  for (let i = 0; i < o.count; i++) {
    const next = images[(i % 2) + 1] ?? images[0];
    if (next === undefined) throw new Error('no image');
    const target = next.hash === current ? images[0] ?? next : next;
    const mode = o.mode(i);
    const delay = mode === 'journal' ? Math.random() * writing * 1.2 : Math.random() * whole.endAt * 1.1;
    const run = await runImport(dir, target.path, key, { from: mode, delay });
    const { hash, warnings } = exportHash(dir, key, out);
    const outcome = hash === current ? 'old' : hash === target.hash ? 'new' : 'MIX';
    counts.notes.push(`trial ${i}: kill ${mode}+${delay.toFixed(0)} ms (${run.killed ? 'killed' : `exited ${run.code}`}) → ${outcome}${warnings === '' ? '' : ` [${warnings.trim().replace(/\n/g, ' | ')}]`}`);
    expect(outcome, counts.notes.join('\n')).not.toBe('MIX');
    if (outcome === 'new') counts.new++;
    else counts.old++;
    current = hash;
  }
  // And the volume goes on: a last import completes whatever was left, and reads back.
  const last = images.find((img) => img.hash !== current) ?? images[0];
  await runImport(dir, last?.path ?? '', key);
  expect(exportHash(dir, key, out).hash).toBe(last?.hash);
  expect(existsSync(join(dir, SEALED_JOURNAL_NAME))).toBe(false);
  return counts;
}

describe('crash trials: kill -9 during a sealed import, then export', () => {
  it('more chunks than free slots (the overflow journal path): 20 trials, each the old image or the new one, exactly', async () => {
    const r = await trials({ spare: '10%', count: 20, size: 16 * MiB, chunk: '4K', mode: (i) => (i % 5 === 4 ? 'start' : 'journal') });
    console.log(`journal path: ${r.old} old, ${r.new} new\n${r.notes.join('\n')}`);
    expect(r.old + r.new).toBe(20);
  });

  it('copy-on-write into free slots: 10 trials, each the old image or the new one, exactly', async () => {
    const r = await trials({ spare: '100%', count: 10, size: 16 * MiB, chunk: '4K', mode: () => 'start' });
    console.log(`copy-on-write path: ${r.old} old, ${r.new} new\n${r.notes.join('\n')}`);
    expect(r.old + r.new).toBe(10);
  });
});
