// The daemon's log: one event per line on stdout. Under journald — stdout is the stream named
// by $JOURNAL_STREAM (its device and inode, as sd_journal_stream_fd(3) says to check, so a child
// whose output was redirected elsewhere does not inherit the decision) — each line starts with
// its syslog priority as sd-daemon(3) reads it (`<3>` err, `<4>` warning, `<5>` notice, `<6>`
// info) and the journal adds the time; otherwise (a terminal, a file, a pipe) each line starts
// with an ISO timestamp and carries no prefix, readable as it is.
//
// Lines carry text the owner controls (names, a module's stderr, pipe input), so every line is
// escaped (no control characters, no newline: one event is one line) and cut at MAX_LINE_CHARS.
// The log is rate-bounded (bursts, then a few lines a second; what is over is counted and
// reported in one line). It never throws: writes go straight to the fd with writeSync, and a
// line that cannot be written (ENOSPC, EIO, EPIPE, a stuck reader) is dropped and counted;
// the next line that can be written is preceded by one that says how many were lost.

import { fstatSync, writeSync } from 'node:fs';
import { describeErrno, errnoCode } from '../common/errors.js';
import { escapeText } from '../common/escape.js';
import { TokenBucket } from '../common/rate.js';

/** The syslog priorities the daemon uses, with their sd-daemon(3) prefixes. */
export const PRIORITY = { err: 3, warning: 4, notice: 5, info: 6 } as const;
export type Priority = keyof typeof PRIORITY;

/**
 * One log line, `info` unless said: `err` for failures and refusals, `warning` for what someone
 * should look at (an external change, a notice, a busy unmount), `notice` for the milestones
 * of a session (starting, live, tearing down, stopped).
 */
export type Log = (line: string, priority?: Priority) => void;

/** Whether `fd` is the journal's stream ($JOURNAL_STREAM is its DEV:INO). */
export function isJournalStream(fd: number, env: NodeJS.ProcessEnv = process.env): boolean {
  const match = /^(\d+):(\d+)$/.exec(env['JOURNAL_STREAM'] ?? '');
  if (match === null) return false;
  try {
    const st = fstatSync(fd, { bigint: true });
    return st.dev === BigInt(match[1] ?? '') && st.ino === BigInt(match[2] ?? '');
  } catch {
    return false;
  }
}

/** The sd-daemon prefix of a line of `priority` when `fd` is the journal's stream, else ''. */
export function priorityPrefix(fd: number, priority: Priority): string {
  return isJournalStream(fd) ? `<${PRIORITY[priority]}>` : '';
}

export const MAX_LINE_CHARS = 2000;

export interface LogOptions {
  /** Where to write (default 1, stdout). */
  fd?: number;
  /** Start lines with a timestamp (default: unless under journald). */
  stamped?: boolean;
  /** Start lines with their sd-daemon priority prefix (default: when `fd` is the journal's stream). */
  prefixed?: boolean;
  /** Lines written in a burst, and after it per second (defaults 300 and 5). */
  burst?: number;
  perSecond?: number;
}

const waiter = new Int32Array(new SharedArrayBuffer(4));

/** How long one line may wait for a reader that is slow (fd in non-blocking mode). */
const AGAIN_BUDGET_MS = 50;

/** Writes all of `bytes` to `fd`; returns how many were written and the error that stopped it. */
function writeAll(fd: number, bytes: Buffer, waitForReader: boolean): { written: number; code?: string } {
  let written = 0;
  let waited = 0;
  while (written < bytes.length) {
    try {
      written += writeSync(fd, bytes, written, bytes.length - written);
    } catch (err) {
      const code = errnoCode(err) ?? 'EIO';
      if (code === 'EINTR') continue;
      if (code !== 'EAGAIN' || !waitForReader || waited >= AGAIN_BUDGET_MS) return { written, code };
      Atomics.wait(waiter, 0, 0, 2);
      waited += 2;
    }
  }
  return { written };
}

export function createLog(name: string, options: LogOptions = {}): Log {
  const fd = options.fd ?? 1;
  const journal = isJournalStream(fd);
  const stamped = options.stamped ?? !journal;
  const prefixed = options.prefixed ?? journal;
  const rate = new TokenBucket(options.burst ?? 300, options.perSecond ?? 5);
  const tag = `[${escapeText(name, 100)}]`;
  /** Lines lost to write errors since the last one written, and the last error. */
  let lost = 0;
  let lostCode = '';
  /** A line was cut short by an error: the next write starts a new line first. */
  let torn = false;
  /** Lines over the rate since the last report. */
  let overRate = 0;
  let rateTimer: NodeJS.Timeout | undefined;

  const format = (text: string, priority: Priority): string =>
    `${prefixed ? `<${PRIORITY[priority]}>` : ''}${stamped ? `${new Date().toISOString()} ` : ''}${tag} ${text}\n`;

  /** Writes one formatted line whole; false if it could not (a line cut short is remembered). */
  const emit = (text: string, priority: Priority): boolean => {
    const bytes = Buffer.from(`${torn ? '\n' : ''}${format(text, priority)}`, 'utf8');
    const r = writeAll(fd, bytes, lost === 0);
    if (r.code === undefined) {
      torn = false;
      return true;
    }
    if (r.written > 0) torn = true;
    lostCode = r.code;
    return false;
  };

  /** Before a line: says what was lost since the last one written; false if that cannot be written. */
  const reportLosses = (): boolean => {
    if (lost > 0) {
      if (!emit(`log: ${lost} line${lost === 1 ? '' : 's'} could not be written (${describeErrno(lostCode)}); dropped`, 'warning')) return false;
      lost = 0;
    }
    if (overRate > 0) {
      if (!emit(`log: ${overRate} line${overRate === 1 ? '' : 's'} dropped (more than ${rate.perSecond} lines a second after a burst of ${rate.capacity})`, 'warning')) return false;
      overRate = 0;
    }
    return true;
  };

  const scheduleRateReport = (now: number): void => {
    rateTimer ??= setTimeout(() => {
      rateTimer = undefined;
      if (overRate > 0 && rate.take(Date.now())) reportLosses();
    }, rate.msUntilToken(now) + 1000).unref();
  };

  return (line, priority = 'info') => {
    try {
      const now = Date.now();
      if (!rate.take(now)) {
        overRate++;
        scheduleRateReport(now);
        return;
      }
      if (!reportLosses() || !emit(escapeText(line, MAX_LINE_CHARS), priority)) lost++;
    } catch {
      // Never: the log must not take the daemon down. Count it as lost.
      lost++;
      lostCode ||= 'EIO';
    }
  };
}
