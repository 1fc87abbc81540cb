// The daemon's end of a FIFO: created root-side in /run/vbd-shadow/UID/DEV.INO (root-owned 0755, so
// fs.protected_fifos does not apply), owned by the volume owner with mode 0600 so only the
// owner (and root) can open it. Read non-blocking through a net.Socket: 'end' arrives within
// milliseconds of the last writer closing — or being killed.
//
// What the owner writes is bounded before root spends anything on it (see PipeLimits): lines
// are cut at the pipe's limit, input beyond the pipe's rate is not read until the next second
// (the writer blocks on the full pipe: back-pressure, nothing is lost), and problems are
// reported a few per window, the rest counted in one summary line. Reports name the problem
// and the length; an excerpt of the line, escaped and truncated, only where the pipe never
// carries a key.

import { chownSync, openSync, rmSync, constants as fsc } from 'node:fs';
import { Socket } from 'node:net';
import { failure } from '../common/errors.js';
import { escapeBytes, escapeText } from '../common/escape.js';
import { LineSplitter } from '../common/lines.js';
import { WindowBudget } from '../common/rate.js';
import { makeFifo } from '../sys/libc.js';
import type { Owner } from '../volume/volume.js';
import { AGENT_PIPE, CONTROL_PIPE, isBad, parseMessage, type PipeLimits, type PipeMessage } from './protocol.js';

export { closePipe, openPipeForWriting, writeMessage } from './pipe-writer.js';

export interface PipeEvents {
  message: (message: PipeMessage) => void;
  /** A problem with the input, already bounded and safe to log ("not JSON (12 bytes)"). */
  garbage: (what: string) => void;
  /** Every writer has closed its end (or died). */
  closed: () => void;
}

const EXCERPT_BYTES = 80;

/**
 * The bounds of one pipe, kept across the writers that come and go on it: how much was read
 * this second, and how many problems were reported this window.
 */
class PipeGuard {
  private readonly input: WindowBudget;
  private readonly reports: WindowBudget;
  private summaryTimer: NodeJS.Timeout | undefined;

  constructor(readonly limits: PipeLimits, private readonly report: (what: string) => void) {
    this.input = new WindowBudget(limits.bytesPerSecond, 1000);
    this.reports = new WindowBudget(limits.reportsPerWindow, limits.reportWindowMs);
  }

  /** Reports a problem, or counts it if this window's reports are used up. */
  problem(what: string): void {
    const now = Date.now();
    const refused = this.reports.roll(now);
    if (refused > 0) this.endWindow(refused);
    if (this.reports.take(now)) this.report(what);
    else this.summaryTimer ??= setTimeout(() => this.flushSummary(), this.reports.msLeft(now)).unref();
  }

  /** Accounts `bytes` just read; returns how long to stop reading (0: go on). */
  consumed(bytes: number): number {
    const now = Date.now();
    return this.input.spend(now, bytes) ? 0 : Math.max(1, this.input.msLeft(now));
  }

  /** Ends the report window now: what it counted but did not report is said in one line. */
  flushSummary(): void {
    this.endWindow(this.reports.restart(Date.now()));
  }

  private endWindow(refused: number): void {
    if (this.summaryTimer !== undefined) clearTimeout(this.summaryTimer);
    this.summaryTimer = undefined;
    this.summarize(refused);
  }

  private summarize(count: number): void {
    if (count === 0) return;
    const seconds = Math.round(this.limits.reportWindowMs / 1000);
    this.report(`${count} more bad lines in the last ${seconds} s (not shown; input is read at most at ${Math.round(this.limits.bytesPerSecond / 1024)} KiB/s)`);
  }

  /** What to say about a line that is not a message. */
  describe(problem: string, detail: string | undefined, line: Buffer): string {
    const size = `${line.length} bytes`;
    if (!this.limits.showContent) return `${problem} (${size}, content not shown)`;
    if (detail !== undefined) return `${problem} "${escapeText(detail, EXCERPT_BYTES)}"`;
    return `${problem} (${size}): "${escapeBytes(line, EXCERPT_BYTES)}"`;
  }
}

/** Creates the FIFO anew at `path` for `owner` (mode 0600). */
export function createFifo(path: string, owner: Owner): void {
  rmSync(path, { force: true });
  makeFifo(path, 0o600);
  chownSync(path, owner.uid, owner.gid);
}

/**
 * Reads messages from the FIFO until all writers have gone; returns a function to stop early.
 * `limits`: the agent pipe's unless told otherwise.
 */
export function readPipe(path: string, events: PipeEvents, limits: PipeLimits = AGENT_PIPE): () => void {
  const guard = new PipeGuard(limits, events.garbage);
  const stop = readGuarded(path, guard, events.message, () => {
    guard.flushSummary(); // said before the session's end, not after it
    events.closed();
  });
  return () => {
    stop();
    guard.flushSummary();
  };
}

function readGuarded(path: string, guard: PipeGuard, onMessage: (m: PipeMessage) => void, onClosed: () => void): () => void {
  let fd: number;
  try {
    fd = openSync(path, fsc.O_RDONLY | fsc.O_NONBLOCK | fsc.O_NOFOLLOW);
  } catch (err) {
    throw failure(`cannot open pipe ${path}`, err);
  }
  const socket = new Socket({ fd, readable: true, writable: false });
  const { maxLine } = guard.limits;
  const lines = new LineSplitter(maxLine);
  let finished = false;
  let resume: NodeJS.Timeout | undefined;
  const quit = (): void => {
    finished = true;
    if (resume !== undefined) clearTimeout(resume);
    lines.reset();
    socket.destroy();
  };
  const finish = (): void => {
    if (finished) return;
    const left = lines.unfinished;
    if (left > 0) guard.problem(`an unterminated message (${left} bytes) at close`);
    quit();
    onClosed();
  };
  const onLine = (line: Buffer): void => {
    if (line.length === 0) return guard.problem('an empty line');
    const parsed = parseMessage(line.toString('utf8'));
    if (isBad(parsed)) guard.problem(guard.describe(parsed.problem, parsed.detail, line));
    else onMessage(parsed);
  };
  socket.on('data', (chunk: Buffer) => {
    if (finished) return;
    lines.push(chunk, (e) => {
      if (finished) return;
      if (e.kind === 'overlong') guard.problem(`a line of ${e.length} bytes, over the limit of ${maxLine} (dropped)`);
      else onLine(e.line);
    });
    chunk.fill(0); // it may hold key material
    const pause = guard.consumed(chunk.length);
    if (pause > 0 && !finished && resume === undefined) {
      socket.pause();
      resume = setTimeout(() => {
        resume = undefined;
        if (!finished) socket.resume();
      }, pause);
    }
  });
  socket.on('end', finish);
  socket.on('error', (err) => {
    guard.problem(`pipe error: ${escapeText(err.message, 200)}`);
    finish();
  });
  return quit;
}

/**
 * Keeps reading a FIFO across writers (for the control pipe): reopens after each close. The
 * bounds hold across writers (closing and reopening does not reset them). `limits`: the
 * control pipe's unless told otherwise.
 */
export function servePipe(path: string, onMessage: (m: PipeMessage) => void, onGarbage: (what: string) => void, limits: PipeLimits = CONTROL_PIPE): () => void {
  const guard = new PipeGuard(limits, onGarbage);
  let stopped = false;
  let stop = (): void => undefined;
  const open = (): void => {
    stop = readGuarded(path, guard, onMessage, () => {
      if (!stopped) open();
    });
  };
  open();
  return () => {
    stopped = true;
    stop();
    guard.flushSummary();
  };
}
