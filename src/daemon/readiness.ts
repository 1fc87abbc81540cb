// What the daemon tells systemd (Type=notify, src/sys/notify.ts): READY=1 once it serves — or,
// with --canary wait, once it waits for its agent, so that a start job never hangs until someone
// logs in; a STATUS= line that follows the daemon's status ("waiting for agent", "live on
// /dev/loopN, last flush …", "stopping: writing back"); STOPPING=1 when the daemon itself ends;
// and during a teardown (final flush, an unmount that waits for a busy mount) EXTEND_TIMEOUT_USEC=
// every EXTEND_EVERY_MS, so that TimeoutStopSec= does not kill a writeback that is still going.

import type { Notifier } from '../sys/notify.js';
import type { CanaryMode } from './daemon.js';
import type { DaemonStatus } from './runtime.js';

/** How often a teardown extends the stop timeout, and by how much each time (µs). */
export const EXTEND_EVERY_MS = 10_000;
export const EXTEND_BY_USEC = 60_000_000;

/** The STATUS= line for a daemon status (`stopping`: the daemon itself is ending). */
export function statusLine(s: DaemonStatus, stopping: boolean): string {
  switch (s.state) {
    case 'starting': return 'starting';
    case 'waiting': return stopping ? 'stopping' : s.canary === 'wait' ? 'waiting for agent' : 'waiting for the agent it started';
    case 'recovering': return 'attaching: recovering what an earlier run left';
    case 'populating': return 'attaching: populating the RAM image from the files';
    case 'live': {
      const f = s.lastFlush;
      const flush = f === undefined ? 'no flush yet' : f.ok ? `last flush ${f.at}` : `last flush FAILED at ${f.at} (${s.flushFailures} failures): ${f.error ?? 'see the log'}`;
      return `live on ${s.device ?? '?'}${s.mountpoint !== undefined ? `, mounted on ${s.mountpoint}` : ''}${s.nbd !== undefined ? `, exported on ${s.nbd.uri}` : ''}, ${flush}`;
    }
    case 'stopping': return stopping ? 'stopping: writing back' : 'agent gone: writing back';
    case 'stopped': return 'stopped: everything written back';
    case 'failed': return `failed: ${s.error ?? 'see the log'}`;
  }
}

export class ServiceReadiness {
  private ready = false;
  private lastStatus: string | undefined;
  private stopping = false;
  private extender: NodeJS.Timeout | undefined;
  private current: DaemonStatus | undefined;

  constructor(private readonly notifier: Notifier, private readonly canary: CanaryMode) {}

  /** After every status change. */
  update(s: DaemonStatus): void {
    if (!this.notifier.active) return;
    this.current = s;
    const fields: Record<string, string | number> = {};
    if (!this.ready && (s.state === 'live' || (s.state === 'waiting' && this.canary === 'wait'))) {
      fields['READY'] = 1;
      this.ready = true;
    }
    const line = statusLine(s, this.stopping);
    if (line !== this.lastStatus) {
      fields['STATUS'] = line;
      this.lastStatus = line;
    }
    if (s.state === 'stopping' || this.stopping) {
      if (this.extender === undefined) {
        fields['EXTEND_TIMEOUT_USEC'] = EXTEND_BY_USEC;
        this.startExtending();
      }
    } else this.stopExtending();
    if (Object.keys(fields).length > 0) this.notifier.send(fields);
  }

  /** The daemon itself is ending (SIGTERM, a stop command, its last session over). */
  stop(): void {
    if (!this.notifier.active || this.stopping) return;
    this.stopping = true;
    this.notifier.send({ STOPPING: 1 });
    if (this.current !== undefined) this.update(this.current);
  }

  /** The daemon is done: no more extensions. */
  close(): void {
    this.stopExtending();
  }

  private startExtending(): void {
    this.extender = setInterval(() => this.notifier.send({ EXTEND_TIMEOUT_USEC: EXTEND_BY_USEC }), EXTEND_EVERY_MS);
    this.extender.unref();
  }

  private stopExtending(): void {
    if (this.extender !== undefined) clearInterval(this.extender);
    this.extender = undefined;
  }
}
