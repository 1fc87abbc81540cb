// The root daemon for one volume: checks, lock, journal recovery, the control pipe, and the
// canary that decides when the volume is attached and torn down:
//   none  — one session for the daemon's lifetime (scripts);
//   spawn — start the owner's agent ourselves (dropping to the owner) and serve while it lives:
//           `sudo vbd-shadow start DIR` on a terminal, Ctrl-C ends it cleanly;
//   wait  — wait for the owner's agent, serve while it lives, tear down when it goes, wait
//           again (the systemd unit's mode: login → attach, logout → write back and free).

import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, readFileSync } from 'node:fs';
import { UsageError, VbdError, kindOf } from '../common/errors.js';
import { createFifo, readPipe, servePipe } from '../agent/pipe.js';
import { dispatch, type Handlers, type PipeMessage } from '../agent/protocol.js';
import { settleJournal } from '../flush/apply.js';
import { ScanPool } from '../flush/scan-pool.js';
import { openJournal } from '../flush/journal.js';
import { closeMountPoint, openMountPoint, type MountPoint } from '../device/mount.js';
import { checkLockable } from '../shadow/image.js';
import { closeVolume, identityKey, isPlainVolume, isSealedVolume, type AnyVolume } from '../volume/volume.js';
import { checkNotStripped, openServedStore, type ServedStore } from './served-store.js';
import { createNotifier } from '../sys/notify.js';
import type { Log } from './log.js';
import { MAX_RECORDED, createReporter, messageOf, type DaemonEvent, type Report } from './events.js';
import { ServiceReadiness } from './readiness.js';
import { acquireLock, releaseLock, type DaemonLock } from './lock.js';
import { requireRoot, runtimePaths, writeStatus, type DaemonStatus } from './runtime.js';
import { serveSession, type SessionContext, type SessionOptions } from './session.js';

export type CanaryMode = 'none' | 'spawn' | 'wait';

export interface DaemonOptions extends Omit<SessionOptions, 'mountPoint'> {
  /** The volume, opened once by the caller (read-write); the daemon closes it when it ends. */
  volume: AnyVolume;
  /** --mount: opened and checked once, before anything is touched. */
  mount?: string | undefined;
  canary: CanaryMode;
  /** canary none: the keyed layout's secret or the sealed volume's passphrase (wiped once used). Agents bring their own. */
  secret?: Buffer | undefined;
  /** Sealed: serve files older than root's record of the volume's epoch (moved between machines, restored on purpose). */
  acceptRollback: boolean;
  /** canary spawn: extra arguments for the agent (e.g. --key-file). */
  agentArgs?: string[];
  log: Log;
}

/** VBD_SHADOW_SCAN_THREADS: the threads a large scan uses (1: the daemon's thread alone); default every core. */
export const SCAN_THREADS_ENV = 'VBD_SHADOW_SCAN_THREADS';

function scanThreads(): number | undefined {
  const text = process.env[SCAN_THREADS_ENV];
  if (text === undefined || text === '') return undefined;
  const n = Number(text);
  if (!Number.isInteger(n) || n < 1 || n > 64) throw new UsageError(`${SCAN_THREADS_ENV} must be a whole number from 1 to 64, got '${text}'`);
  return n;
}

/** Resolves on the first SIGTERM or SIGINT, or a stop command (with the reason). */
function stopRequests(report: Report): { stopped: Promise<string>; stop: (reason: string) => void } {
  let stop: (reason: string) => void = () => undefined;
  const stopped = new Promise<string>((resolveStop) => {
    let done = false;
    stop = (reason) => {
      if (done) return report({ kind: 'signal-during-teardown', signal: reason });
      done = true;
      resolveStop(reason);
    };
  });
  process.on('SIGTERM', () => stop('received SIGTERM'));
  process.on('SIGINT', () => stop('received SIGINT'));
  return { stopped, stop };
}

/** The uid running `pid`, from /proc (to name who connected). */
function uidOf(pid: number): number | undefined {
  const match = /^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return match === null ? undefined : Number(match[1]);
}

interface AgentConnection {
  /** Resolves when the agent's pipe closes (exit, crash, kill -9) or it asks for teardown. */
  gone: Promise<string>;
  secret: Buffer | undefined;
  stop: () => void;
}

/**
 * Waits for an agent on the pipe: its hello, and for a keyed volume its key. Resolves
 * undefined if `stopped` comes first.
 */
function waitForAgent(ctx: SessionContext, pipe: string, keyed: boolean, stopped: Promise<string>): Promise<AgentConnection | undefined> {
  // `keyed`: the agent brings a secret (a keyed layout's key or a sealed volume's passphrase).
  const { report } = ctx;
  return new Promise((resolveAgent) => {
    let hello: Extract<PipeMessage, { kind: 'hello' }> | undefined;
    let settled = false;
    let endSession: (reason: string) => void = () => undefined;
    const gone = new Promise<string>((r) => (endSession = r));
    const ready = (secret: Buffer | undefined): void => {
      if (settled) return;
      settled = true;
      resolveAgent({ gone, secret, stop: stopReading });
    };
    const handlers: Handlers = {
      hello: (m) => {
        hello = m;
        let who = `pid ${m.pid}`;
        try {
          who += ` (uid ${uidOf(m.pid)})`;
        } catch {
          who += ' (gone already)';
        }
        report({ kind: 'agent-connected', who });
        if (!keyed) ready(undefined);
      },
      key: (m) => {
        if (hello === undefined || !keyed || settled) return report({ kind: 'pipe-ignored', pipe: 'agent', what: 'a key message out of turn', suspicious: true });
        ready(Buffer.from(m.secret, 'base64'));
      },
      flush: () => ctx.requestFlush?.('agent request'),
      teardown: () => endSession('the agent asked for teardown (logout)'),
      stop: () => report({ kind: 'pipe-ignored', pipe: 'agent', what: 'a stop message (use the control pipe)', suspicious: false }),
    };
    const stopReading = readPipe(pipe, {
      message: (m) => dispatch(m, handlers),
      garbage: (what) => report({ kind: 'pipe-ignored', pipe: 'agent', what, suspicious: true }),
      closed: () => {
        endSession('the agent is gone (its pipe closed)');
        if (!settled) {
          settled = true;
          report({ kind: 'agent-pipe-closed-early' });
          resolveAgent({ gone, secret: undefined, stop: () => undefined });
        }
      },
    });
    void stopped.then(() => {
      stopReading();
      endSession('stopping');
      if (!settled) {
        settled = true;
        resolveAgent(undefined);
      }
    });
  });
}

/**
 * Starts the owner's agent as the owner (passwd gid and groups, clean environment), on our
 * terminal — which is hers: spawn is only allowed when the owner herself ran sudo.
 */
function spawnAgent(volume: AnyVolume, args: string[], report: Report): ChildProcess {
  const { uid, gid } = volume.owner;
  const child = spawn('setpriv', [`--reuid=${uid}`, `--regid=${gid}`, '--init-groups', '--reset-env', '--', process.execPath, process.argv[1] ?? '', 'agent', volume.dir, ...args], {
    stdio: 'inherit',
    env: { PATH: '/usr/bin:/bin' },
  });
  child.on('error', (err) => report({ kind: 'agent-spawn-failed', uid, error: err.message }));
  return child;
}

/** Runs the daemon until stopped; returns the process exit code. */
export async function runDaemon(o: DaemonOptions): Promise<number> {
  requireRoot('vbd-shadow start');
  // Threads start at the first large scan, serve every session, and end with the daemon.
  const scanPool = new ScanPool(scanThreads());
  try {
    return await runDaemonWith(o, scanPool);
  } finally {
    await scanPool.close();
  }
}

async function runDaemonWith(o: DaemonOptions, scanPool: ScanPool): Promise<number> {
  const { volume } = o;
  /** The newest events, for the status (written with the next status change, or shortly after). */
  const recorded: DaemonEvent[] = [];
  let recordTimer: NodeJS.Timeout | undefined;
  const report = createReporter(o.log, (event) => {
    recorded.push(event);
    if (recorded.length > MAX_RECORDED) recorded.shift();
    // Coalesced: a flood of events (pipe garbage) costs one status write per 100 ms at most.
    recordTimer ??= setTimeout(() => {
      recordTimer = undefined;
      ctx.setStatus({});
    }, 100).unref();
  });
  const { stopped, stop } = stopRequests(report);
  // Under systemd (Type=notify): READY, STATUS, STOPPING and EXTEND_TIMEOUT_USEC (readiness.ts).
  const readiness = new ServiceReadiness(createNotifier((message) => report({ kind: 'notify-failed', message })), o.canary);
  let stopping = false;
  void stopped.then(() => {
    stopping = true;
    readiness.stop();
  });
  const { manifest, owner } = volume;
  const paths = runtimePaths(volume.identity);
  const needsSecret = isSealedVolume(volume) || manifest.layout.kind === 'keyed';
  let lock: DaemonLock | undefined;
  let mountPoint: MountPoint | undefined;
  let journalFd: number | undefined;
  let stopControl: (() => void) | undefined;
  let status: DaemonStatus | undefined;
  const ctx: SessionContext = {
    volume, paths, journalFd: undefined, report,
    status: () => status as DaemonStatus,
    setStatus: (change) => {
      if (status === undefined) return;
      status = { ...status, ...change, events: [...recorded] };
      writeStatus(paths, status);
      readiness.update(status);
    },
    requestFlush: undefined,
    scanPool,
    lastSession: () => stopping || o.canary !== 'wait',
  };
  try {
    // Everything that can be checked is checked before anything is touched.
    checkLockable(manifest.deviceSize);
    lock = acquireLock(paths, manifest.name);
    if (o.mount !== undefined) mountPoint = openMountPoint(o.mount, owner);
    const sessionOptions: SessionOptions = { ...o, mountPoint };
    status = {
      name: manifest.name, volumeDir: volume.dir, identity: identityKey(volume.identity), state: 'starting', pid: process.pid, owner, canary: o.canary,
      deviceSize: manifest.deviceSize, chunkSize: manifest.chunkSize, layout: manifest.layout.kind, sealedVolume: isSealedVolume(volume), intervalMs: o.intervalMs,
      startedAt: new Date().toISOString(), flushFailures: 0, flushChecks: 0, externalChanges: 0, sessions: 0,
    };
    ctx.setStatus({});
    report({
      kind: 'starting', dir: volume.dir, deviceSize: manifest.deviceSize, files: manifest.files.length, sealed: isSealedVolume(volume),
      layout: manifest.layout.kind, chunkSize: manifest.chunkSize, canary: o.canary,
    });
    checkNotStripped(ctx, o.acceptRollback, true);
    // A plain volume's flushes go through its journal; a sealed one commits copy-on-write.
    if (isPlainVolume(volume)) {
      journalFd = openJournal(volume);
      ctx.journalFd = journalFd;
      await settleJournal(volume, journalFd, report);
    }

    const control = paths.controlFifo;
    createFifo(control, owner);
    stopControl = servePipe(control, (m) => dispatch(m, {
      hello: () => report({ kind: 'pipe-ignored', pipe: 'control', what: 'a hello', suspicious: false }),
      key: () => report({ kind: 'pipe-ignored', pipe: 'control', what: 'a key', suspicious: false }),
      flush: () => ctx.requestFlush?.('flush command'),
      teardown: () => report({ kind: 'pipe-ignored', pipe: 'control', what: 'a teardown (the agent sends those)', suspicious: false }),
      stop: () => stop('stop command'),
    }), (what) => report({ kind: 'pipe-ignored', pipe: 'control', what, suspicious: true }));
    process.on('SIGUSR1', () => ctx.requestFlush?.('signal'));

    /** One session: the store opened with `secret` (wiped), served until `ended`, closed. */
    const session = async (secret: Buffer | undefined, ended: Promise<string>): Promise<Error | undefined> => {
      let served: ServedStore;
      try {
        served = await openServedStore(ctx, secret, o.acceptRollback);
      } finally {
        secret?.fill(0);
      }
      try {
        ctx.setStatus({ sessions: (status?.sessions ?? 0) + 1 });
        return await serveSession(ctx, served, sessionOptions, ended);
      } finally {
        served.store.close();
      }
    };

    if (o.canary === 'none') return finish(await session(o.secret, stopped));

    const pipe = paths.agentFifo;
    createFifo(pipe, owner);
    let agent: ChildProcess | undefined;
    let lastError: Error | undefined;
    for (;;) {
      ctx.setStatus({ state: 'waiting', device: undefined, link: undefined, mountpoint: undefined, nbd: undefined, nbdError: undefined });
      const connecting = waitForAgent(ctx, pipe, needsSecret, stopped);
      if (o.canary === 'spawn' && agent === undefined) {
        agent = spawnAgent(volume, o.agentArgs ?? [], report);
        agent.on('exit', (code) => stop(`the agent exited (${code ?? 'killed'})`));
      }
      if (o.canary === 'wait') report({ kind: 'waiting-for-agent' });
      const connection = await connecting;
      if (connection === undefined) break;
      try {
        if (needsSecret && connection.secret === undefined) throw new VbdError('the agent left before giving the key');
        lastError = await session(connection.secret, Promise.race([connection.gone, stopped]));
      } catch (err) {
        const message = messageOf(err);
        report({ kind: 'session-refused', message });
        ctx.setStatus({ refused: { at: new Date().toISOString(), reason: message, kind: kindOf(err) } });
        connection.stop();
        if (o.canary === 'spawn') throw err;
      }
      connection.stop();
      if (lastError !== undefined || o.canary === 'spawn' || stopping) break;
    }
    if (agent !== undefined && agent.exitCode === null) agent.kill('SIGTERM');
    return finish(lastError);
  } catch (err) {
    readiness.stop();
    ctx.setStatus({ state: 'failed', error: messageOf(err) });
    cleanupProcess();
    throw err;
  }

  function finish(error: Error | undefined): number {
    readiness.stop();
    cleanupProcess();
    if (error !== undefined) {
      ctx.setStatus({ state: 'failed', error: error.message });
      return 1;
    }
    report({ kind: 'stopped' });
    ctx.setStatus({ state: 'stopped' });
    return 0;
  }

  function cleanupProcess(): void {
    readiness.close();
    stopControl?.();
    if (journalFd !== undefined) closeSync(journalFd);
    if (mountPoint !== undefined) closeMountPoint(mountPoint);
    if (lock !== undefined) releaseLock(lock, status === undefined);
    closeVolume(volume);
  }
}
