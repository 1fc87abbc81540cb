// What the owner writes into the daemon's FIFOs is bounded before root spends anything on it:
// a flood is read at the pipe's rate (the writer waits on the full pipe), problems are logged a
// few per window plus one summary, what is logged is escaped, nothing of the agent pipe's bad
// lines is logged at all, and a message after the flood still arrives. The pipes are real
// FIFOs made as the daemon makes them, read by the real reader in this process, written by
// real processes of a real unprivileged user. No loop device, no daemon.

import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, openSync, readFileSync, readdirSync, writeFileSync, constants as fsc } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { createFifo, readPipe, servePipe } from '../../src/agent/pipe.js';
import { AGENT_PIPE, CONTROL_PIPE, type PipeMessage } from '../../src/agent/protocol.js';
import { createLog, type Log } from '../../src/daemon/log.js';
import { Stage, eachTestCleanup } from '../helpers/cleanup.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, type User } from '../helpers/system.js';

const WRITER = fileURLToPath(new URL('../fixtures/pipe-writer.mjs', import.meta.url));
const MiB = 2 ** 20;

interface Writer {
  child: ChildProcess;
  /** Its stdout so far, parsed line by line. */
  reports: () => Record<string, number | boolean>[];
  exited: Promise<number | null>;
}

const children: ChildProcess[] = [];
const undo: (() => void)[] = [];
eachTestCleanup(Stage.Processes, () => {
  for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  for (const u of undo.splice(0)) u();
});

/** The pipe writer fixture, run as `user` (asynchronously: this process reads the pipe meanwhile). */
function writeAs(user: User, args: string[]): Writer {
  const child = spawn('setpriv', [`--reuid=${user.uid}`, `--regid=${user.gid}`, '--clear-groups', process.execPath, WRITER, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.push(child);
  let out = '';
  let err = '';
  child.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => {
    if (code !== 0) process.stderr.write(`pipe writer ${args[0]} exited ${code}: ${err}\n`);
    resolve(code);
  }));
  const reports = (): Record<string, number | boolean>[] => out.split('\n').filter((l) => l !== '').map((l) => JSON.parse(l) as Record<string, number | boolean>);
  return { child, reports, exited };
}

/** A log like the daemon's, into a file we can measure. */
function fileLog(dir: string): { log: Log; bytes: () => Buffer } {
  const path = join(dir, 'daemon.log');
  const fd = openSync(path, 'a');
  undo.push(() => closeSync(fd));
  return { log: createLog('vbdt-pipes', { fd, stamped: false }), bytes: () => readFileSync(path) };
}

async function until(what: string, ok: () => boolean, timeoutMs: number): Promise<number> {
  const started = Date.now();
  while (!ok()) {
    if (Date.now() - started > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return Date.now() - started;
}

function openFds(): number {
  return readdirSync('/proc/self/fd').length;
}

/** A FIFO as the daemon makes it (the owner's, 0600) in a directory the owner can reach. */
function ownersFifo(name: string): { user: User; dir: string; path: string } {
  const { user, scratch } = ownedScratch();
  const path = join(scratch, name);
  createFifo(path, user);
  return { user, dir: scratch, path };
}

describe.skipIf(!IS_ROOT)(`pipe input bounds (${IS_ROOT ? 'as root, a real unprivileged writer' : ROOT_SKIP_REASON})`, () => {
  it('a 50 MB newline and garbage flood on the control pipe: the writer is held back, the log stays a few lines, a stop after it arrives', async () => {
    const { user, dir, path } = ownersFifo('control.fifo');
    const { log, bytes } = fileLog(dir);
    const messages: PipeMessage[] = [];
    const stop = servePipe(path, (m) => messages.push(m), (what) => log(`control pipe: ignored ${what}`));
    undo.push(stop);

    const seconds = 4;
    const flood = writeAs(user, ['flood', path, String(seconds), String(50 * MiB)]);
    expect(await flood.exited).toBe(0);
    const { written, lines, eagain } = flood.reports()[0] as { written: number; lines: number; eagain: number };
    // Read at 64 KiB/s: in 4 s the writer got rid of a few hundred KiB, not 50 MB, and waited.
    expect(written).toBeLessThan(seconds * CONTROL_PIPE.bytesPerSecond + 512 * 1024);
    expect(eagain).toBeGreaterThan(100);
    expect(lines).toBeGreaterThan(10_000);

    // A legitimate message after the flood gets through the backlog in bounded time.
    const sent = Date.now();
    const sender = writeAs(user, ['send', path, '{"kind":"stop"}']);
    await until('the stop message', () => messages.length > 0, 10_000);
    const delay = Date.now() - sent;
    expect(await sender.exited).toBe(0);
    expect(messages).toEqual([{ kind: 'stop' }]);
    expect(delay).toBeLessThan(5_000);

    stop(); // reports what the window counted
    const out = bytes();
    const text = out.toString('utf8');
    const logLines = text.split('\n').filter((l) => l !== '');
    expect(out.length).toBeLessThan(4096);
    expect(logLines.length).toBeLessThanOrEqual(CONTROL_PIPE.reportsPerWindow + 2);
    expect(out.includes(0x1b)).toBe(false);
    expect(out.includes(0x07)).toBe(false);
    expect(out.includes(0x0d)).toBe(false);
    // The one garbage line shown is escaped, ESC, BEL, CR and invalid UTF-8 included.
    expect(text).toContain('control pipe: ignored not JSON (27 bytes): "\\x1b[2J\\x1b]0;owned\\x07 not json \\x0d\\xff\\xfe"');
    expect(text).toContain('control pipe: ignored an empty line');
    // Every bad line was counted: the ones shown plus the summary are all the lines written.
    const summaries = [...text.matchAll(/control pipe: ignored (\d+) more bad lines in the last 10 s/g)].map((m) => Number(m[1]));
    expect(summaries.length).toBe(1);
    const shown = logLines.length - summaries.length;
    const unterminated = /an unterminated message/.test(text) ? 1 : 0;
    expect(shown + (summaries[0] ?? 0)).toBe(lines + unterminated);
  });

  it('opening and closing the control pipe in a loop does not reset its bounds nor leak descriptors; each report window adds a few lines', async () => {
    const { user, dir, path } = ownersFifo('control.fifo');
    const { log, bytes } = fileLog(dir);
    const fdsBefore = openFds();
    const messages: PipeMessage[] = [];
    // Report windows of 1 s instead of 10, so that a few of them pass during the test.
    const limits = { ...CONTROL_PIPE, reportWindowMs: 1000 };
    const started = Date.now();
    const stop = servePipe(path, (m) => messages.push(m), (what) => log(`control pipe: ignored ${what}`), limits);
    const reopen = writeAs(user, ['reopen', path, '3.5']);
    expect(await reopen.exited).toBe(0);
    const { opens } = reopen.reports()[0] as { opens: number };
    expect(opens).toBeGreaterThan(50);
    const sender = writeAs(user, ['send', path, '{"kind":"flush"}']);
    expect(await sender.exited).toBe(0);
    await until('the flush message', () => messages.length > 0, 5_000);
    expect(messages).toEqual([{ kind: 'flush' }]);
    stop();
    const windows = Math.ceil((Date.now() - started) / 1000);
    expect(openFds()).toBe(fdsBefore);
    const text = bytes().toString('utf8');
    const logLines = text.split('\n').filter((l) => l !== '');
    const summaries = logLines.filter((l) => /control pipe: ignored \d+ more bad lines in the last 1 s/.test(l));
    expect(summaries.length).toBeGreaterThanOrEqual(3);
    expect(summaries.length).toBeLessThanOrEqual(windows);
    expect(logLines.length).toBeLessThanOrEqual(windows * (limits.reportsPerWindow + 1));
    expect(text).toContain('control pipe: ignored not JSON (11 bytes): "garbage\\x1b[5m"');
    expect(text.includes('\x1b')).toBe(false);
  });

  it('bad lines on the control pipe are shown escaped and cut; a good line among them is delivered', async () => {
    const { user, dir, path } = ownersFifo('control.fifo');
    const { log, bytes } = fileLog(dir);
    const messages: PipeMessage[] = [];
    undo.push(servePipe(path, (m) => messages.push(m), (what) => log(`control pipe: ignored ${what}`)));
    const input = join(dir, 'input');
    writeFileSync(input, Buffer.concat([
      Buffer.from('{"kind":"\\u001b[31mred\\u001b]0;t\\u0007\\u2028"}\n'),
      Buffer.from([0xff, 0xfe, 0x7b, 0x1b, 0x0a]),
      Buffer.from(`${'x'.repeat(200)}\n`),
      Buffer.from(`${'y'.repeat(CONTROL_PIPE.maxLine + 1)}\n`),
      Buffer.from('{"kind":"flush"}\n'),
    ]), { mode: 0o644 });
    expect(await writeAs(user, ['raw', path, input]).exited).toBe(0);
    await until('the flush message', () => messages.length > 0, 5_000);
    await until('four reports', () => bytes().toString().split('\n').length > 4, 5_000);
    expect(messages).toEqual([{ kind: 'flush' }]);
    const out = bytes();
    expect(out.includes(0x1b)).toBe(false);
    expect(out.includes(0x07)).toBe(false);
    expect(out.toString('utf8').includes('\u2028')).toBe(false);
    expect(out.toString('utf8').split('\n')).toEqual([
      '[vbdt-pipes] control pipe: ignored unknown kind "\\x1b[31mred\\x1b]0;t\\x07\\u{2028}"',
      '[vbdt-pipes] control pipe: ignored not JSON (4 bytes): "\\xff\\xfe{\\x1b"',
      `[vbdt-pipes] control pipe: ignored not JSON (200 bytes): "${'x'.repeat(80)}…(120 more bytes)"`,
      `[vbdt-pipes] control pipe: ignored a line of ${CONTROL_PIPE.maxLine + 1} bytes, over the limit of ${CONTROL_PIPE.maxLine} (dropped)`,
      '',
    ]);
  });

  it('nothing of a bad line on the agent pipe is logged, only the problem and its length', async () => {
    const { user, dir, path } = ownersFifo('agent.fifo');
    const { log, bytes } = fileLog(dir);
    const messages: PipeMessage[] = [];
    let closed = false;
    undo.push(readPipe(path, {
      message: (m) => messages.push(m),
      garbage: (what) => log(`agent pipe: ignored ${what}`),
      closed: () => (closed = true),
    }));
    const input = join(dir, 'input');
    writeFileSync(input, Buffer.concat([
      Buffer.from('{"kind":"hello","version":1,"pid":1}\n'),
      Buffer.from('{"kind":"key","secret":"TOPSECRET-1\n'), // a key cut short, completed by garbage
      Buffer.from('{"kind":"TOPSECRET-2"}\n'),
      Buffer.from(`{"kind":"key","secret":"${'TOPSECRET-3'.repeat(20_000)}"}\n`), // over the limit
      Buffer.from('{"kind":"key","secret":"TOPSECRET-4'), // unterminated at close
    ]), { mode: 0o644 });
    expect(await writeAs(user, ['raw', path, input]).exited).toBe(0);
    await until('the pipe closing', () => closed, 5_000);
    expect(messages).toEqual([{ kind: 'hello', version: 1, pid: 1 }]);
    const text = bytes().toString('utf8');
    expect(text).not.toMatch(/SECRET/);
    expect(text.split('\n')).toEqual([
      '[vbdt-pipes] agent pipe: ignored not JSON (35 bytes, content not shown)',
      '[vbdt-pipes] agent pipe: ignored unknown kind (22 bytes, content not shown)',
      `[vbdt-pipes] agent pipe: ignored a line of ${11 * 20_000 + 26} bytes, over the limit of ${AGENT_PIPE.maxLine} (dropped)`,
      '[vbdt-pipes] agent pipe: ignored an unterminated message (35 bytes) at close',
      '',
    ]);
  });

  it('a key message of a 64 KiB secret arrives whole through a non-blocking pipe that is full at first', async () => {
    const { user, dir, path } = ownersFifo('agent.fifo');
    const { log, bytes } = fileLog(dir);
    const secret = randomBytes(64 * 1024);
    const secretFile = join(dir, 'secret');
    writeFileSync(secretFile, secret, { mode: 0o644 });
    // A reader that reads nothing yet, so the writer can open and fill the pipe.
    const holder = openSync(path, fsc.O_RDONLY | fsc.O_NONBLOCK);
    undo.push(() => closeSync(holder));
    const writer = writeAs(user, ['fill-then-key', path, secretFile]);
    await until('a full pipe', () => writer.reports().length > 0, 10_000);
    const { full } = writer.reports()[0] as { full: number };
    expect(full).toBeGreaterThanOrEqual(4096);

    // Only now does the daemon's reader start; the writer has been waiting on a full pipe.
    await new Promise((r) => setTimeout(r, 300));
    const messages: PipeMessage[] = [];
    let closed = false;
    undo.push(readPipe(path, { message: (m) => messages.push(m), garbage: (what) => log(`agent pipe: ignored ${what}`), closed: () => (closed = true) }));
    expect(await writer.exited).toBe(0);
    await until('the pipe closing', () => closed, 10_000);
    const flushes = full / Buffer.byteLength('{"kind":"flush"}\n');
    expect(messages.length).toBe(flushes + 1);
    expect(messages.slice(0, flushes).every((m) => m.kind === 'flush')).toBe(true);
    const key = messages[flushes];
    expect(key?.kind).toBe('key');
    expect(Buffer.from(key?.kind === 'key' ? key.secret : '', 'base64').equals(secret)).toBe(true);
    expect(writer.reports()[1]).toEqual({ sent: true });
    expect(bytes().length).toBe(0); // nothing went wrong, nothing logged
  });
});
