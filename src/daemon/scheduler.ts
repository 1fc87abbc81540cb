// When flushes happen while a volume is live: every interval; early when the bytes written
// since the last flush pass a threshold (bounded loss window); on request (SIGUSR1, the CLI,
// the agent); and after a failure, retried with back-off (1 s, 2 s, 4 s … at most 60 s).

import type { FlushEngine, FlushResult } from '../flush/engine.js';
import { roundMs, type Report } from './events.js';

export interface SchedulerOptions {
  intervalMs: number;
  /** Flush early once this many bytes were written since the last flush. */
  maxDirtyBytes: number;
  onResult: (result: FlushResult) => void;
  report: Report;
}

const MAX_BACKOFF_MS = 60_000;

export class FlushScheduler {
  private timers: NodeJS.Timeout[] = [];
  private retry: NodeJS.Timeout | undefined;
  private failures = 0;
  private running: Promise<FlushResult> | undefined;
  private queued: Promise<FlushResult> | undefined;

  constructor(private readonly engine: FlushEngine, private readonly o: SchedulerOptions) {}

  start(): void {
    this.timers.push(setInterval(() => void this.request('interval'), this.o.intervalMs));
    this.timers.push(setInterval(() => {
      if (this.engine.pendingSectors() * 512 >= this.o.maxDirtyBytes) void this.request('dirty-threshold');
    }, 1000));
  }

  stop(): void {
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
    if (this.retry !== undefined) clearTimeout(this.retry);
    this.retry = undefined;
  }

  /**
   * A flush that starts after this call: runs now, or right after the one running (requests
   * made meanwhile share that one queued flush).
   */
  request(reason: string): Promise<FlushResult> {
    if (this.queued !== undefined) return this.queued;
    const start = (): Promise<FlushResult> => {
      const run = this.engine.flush(reason).then((result) => {
        this.running = undefined;
        this.record(result);
        return result;
      });
      this.running = run;
      return run;
    };
    if (this.running === undefined) return start();
    const next = this.running.then(() => {
      this.queued = undefined;
      return start();
    });
    this.queued = next;
    return next;
  }

  private record(result: FlushResult): void {
    this.o.onResult(result);
    if (result.ok) {
      if (!result.idle) this.o.report({ kind: 'flushed', reason: result.reason, chunks: result.chunksChanged, bytes: result.bytesWritten, journalBytes: result.journalBytes, ms: roundMs(result.durationMs) });
      this.failures = 0;
      return;
    }
    this.failures++;
    const delay = Math.min(MAX_BACKOFF_MS, 1000 * 2 ** (this.failures - 1));
    this.o.report({ kind: 'flush-failed', reason: result.reason, attempt: this.failures, error: result.error ?? 'unknown error', retryMs: delay });
    if (this.timers.length > 0) {
      if (this.retry !== undefined) clearTimeout(this.retry);
      this.retry = setTimeout(() => void this.request('retry'), delay);
    }
  }
}
