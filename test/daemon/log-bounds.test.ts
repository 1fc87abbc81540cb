// The daemon's log holds text the owner controls and writes to an output that can fail: every
// line is escaped and stays one line, the log is rate-bounded, and a full filesystem or a
// closed pipe on its output drops lines (counted, reported once writing works again) instead
// of killing the process. Real files, a real 64 KiB tmpfs, a real pipe; no loop device.

import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, mkdirSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { createLog, MAX_LINE_CHARS } from '../../src/daemon/log.js';
import { Stage, eachTestCleanup } from '../helpers/cleanup.js';
import { IS_ROOT, ROOT_SKIP_REASON } from '../helpers/system.js';
import { tempDir } from '../helpers/tmp.js';

const CHILD = fileURLToPath(new URL('../fixtures/log-child.mjs', import.meta.url));

const children: ChildProcess[] = [];
const mounts: string[] = [];
const fds: number[] = [];
eachTestCleanup(Stage.Processes, () => {
  for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  for (const fd of fds.splice(0)) closeSync(fd);
});
eachTestCleanup(Stage.Kernel, () => {
  for (const m of mounts.splice(0)) spawnSync('umount', [m]);
});

interface LogChild {
  child: ChildProcess;
  /** Sends one command and waits for its "ok". */
  say: (count: number, text: string) => Promise<void>;
  exited: Promise<number | null>;
}

function logChild(stdout: number | 'pipe', options: Record<string, number> = {}): LogChild {
  const child = spawn(process.execPath, [CHILD, JSON.stringify(options)], { stdio: ['pipe', stdout, 'pipe'] });
  children.push(child);
  let acks = 0;
  let errors = '';
  const waiting: (() => void)[] = [];
  child.stderr?.on('data', (d: Buffer) => {
    const text = d.toString();
    for (const line of text.split('\n')) {
      if (line === 'ok') {
        acks++;
        waiting.shift()?.();
      } else if (line !== '') errors += `${line}\n`;
    }
  });
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const say = (count: number, text: string): Promise<void> => new Promise((resolve, reject) => {
    const before = acks;
    waiting.push(resolve);
    child.stdin?.write(`${JSON.stringify({ count, text })}\n`);
    void exited.then((code) => {
      if (acks === before) reject(new Error(`the logging process died (exit ${code}): ${errors}`));
    });
  });
  return { child, say, exited };
}

function logFile(dir: string): { fd: number; read: () => string } {
  const path = join(dir, 'daemon.log');
  const fd = openSync(path, 'a');
  fds.push(fd);
  return { fd, read: () => readFileSync(path, 'utf8') };
}

describe('daemon log', () => {
  it('escapes control characters so one event stays one line, in the name too, and cuts long lines', () => {
    const { fd, read } = logFile(tempDir());
    const log = createLog('vol\x1b[31m', { fd, stamped: false });
    log('a\nb\x1b[2Jc\r\u2028d\u0007');
    log(`module said: ${'z'.repeat(3 * MAX_LINE_CHARS)}`);
    const lines = read().split('\n');
    expect(lines[0]).toBe('[vol\\x1b[31m] a\\x0ab\\x1b[2Jc\\x0d\\u{2028}d\\x07');
    expect(lines[1]).toBe(`[vol\\x1b[31m] module said: ${'z'.repeat(MAX_LINE_CHARS - 'module said: '.length)}…(${2 * MAX_LINE_CHARS + 'module said: '.length} more chars)`);
    expect(lines).toHaveLength(3);
    expect(read()).not.toMatch(/[\x00-\x09\x0b-\x1f\x7f]/);
  });

  it('is rate-bounded: a burst, then a few lines a second; what is over is counted in one line', async () => {
    const { fd, read } = logFile(tempDir());
    const log = createLog('vbdt-log', { fd, stamped: false });
    const total = 100_000;
    for (let i = 0; i < total; i++) log(`event ${i}`);
    const written = read().split('\n').filter((l) => l !== '').length;
    expect(written).toBeGreaterThanOrEqual(300);
    expect(written).toBeLessThan(310);
    expect(read().length).toBeLessThan(310 * 40);
    // The count arrives by itself once the rate allows a line again.
    await new Promise((r) => setTimeout(r, 1_600));
    const last = read().trimEnd().split('\n').pop() ?? '';
    const match = /^\[vbdt-log\] log: (\d+) lines dropped \(more than 5 lines a second after a burst of 300\)$/.exec(last);
    expect(match, last).not.toBeNull();
    expect(written + Number(match?.[1])).toBe(total);
  });

  it.skipIf(!IS_ROOT)(`survives a full filesystem: lines are dropped and counted, the process lives, the count is logged when space is back (${IS_ROOT ? 'a real 64 KiB tmpfs' : ROOT_SKIP_REASON})`, async () => {
    const mnt = join(tempDir(), 'tmpfs');
    mkdirSync(mnt);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=64k,mode=0700', 'tmpfs', mnt]);
    mounts.push(mnt);
    const { fd, read } = logFile(mnt);
    const proc = logChild(fd, { burst: 10_000 });
    await proc.say(1, 'before');

    // Fill the filesystem to the last page.
    const filler = join(mnt, 'filler');
    const ffd = openSync(filler, 'w');
    const page = Buffer.alloc(4096, 0x66);
    let full = false;
    try {
      for (let i = 0; i < 64 && !full; i++) {
        try {
          writeSync(ffd, page);
        } catch (err) {
          if ((err as { code?: string }).code !== 'ENOSPC') throw err;
          full = true;
        }
      }
    } finally {
      closeSync(ffd);
    }
    expect(full).toBe(true);

    const lines = 400;
    await proc.say(lines, 'while full'); // the rest of the log's last page, then ENOSPC
    await proc.say(lines, 'still full');
    expect(proc.child.exitCode).toBeNull();

    rmSync(filler);
    await proc.say(1, 'after');
    const text = read();
    const got = text.split('\n');
    expect(got[0]).toBe('[vbdt-log] before');
    expect(got.at(-1)).toBe('');
    expect(got.at(-2)).toBe('[vbdt-log] after');
    const notice = /^\[vbdt-log\] log: (\d+) lines could not be written \(no space left on device \(ENOSPC\)\); dropped$/.exec(got.at(-3) ?? '');
    expect(notice, got.at(-3)).not.toBeNull();
    // Complete lines written while full + lines dropped = all of them; at most one was cut short.
    const whole = got.filter((l) => /^\[vbdt-log\] (while|still) full \d+$/.test(l)).length;
    const cut = got.length - 4 - whole;
    expect(cut).toBeLessThanOrEqual(1);
    expect(whole + Number(notice?.[1])).toBe(2 * lines);
    expect(Number(notice?.[1])).toBeGreaterThan(lines);

    proc.child.stdin?.end();
    expect(await proc.exited).toBe(0);
  });

  it('survives its output pipe closing (EPIPE): the process lives and goes on', async () => {
    const proc = logChild('pipe');
    let seen = '';
    proc.child.stdout?.on('data', (d: Buffer) => (seen += d.toString()));
    await proc.say(1, 'hello');
    await new Promise((r) => setTimeout(r, 100));
    expect(seen).toBe('[vbdt-log] hello\n');
    proc.child.stdout?.destroy();
    await proc.say(50, 'into a closed pipe');
    expect(proc.child.exitCode).toBeNull();
    proc.child.stdin?.end();
    expect(await proc.exited).toBe(0);
  });
});
