// Where a live volume's state lives: /run/vbd-shadow/UID/DEV.INO/ — keyed by the owner's uid
// and the volume directory's identity, never by the name a user chose, so no user can reach,
// squat or receive another's state. Every directory on the way is root's and 0755 (the owner
// reads the status and opens her FIFOs there); it holds the root-only tmpfs `shadow/`, the
// lock, status.json and the owner-only FIFOs.

import { chmodSync, closeSync, fchmodSync, lstatSync, mkdirSync, openSync, readFileSync, readdirSync, renameSync, writeSync, constants as fsc } from 'node:fs';
import { join } from 'node:path';
import { VbdError, errnoCode, failure, type ErrorKind } from '../common/errors.js';
import { isValidName } from '../volume/names.js';
import { identityKey, type VolumeIdentity } from '../volume/identity.js';
import type { DamagedChunk, SealedState } from '../store/chunk-store.js';
import type { NbdState } from '../device/nbd.js';
import type { DaemonEvent } from './events.js';
import { isTmpfsMounted } from '../shadow/tmpfs.js';

export const RUN_ROOT = '/run/vbd-shadow';

export interface RuntimePaths {
  dir: string;
  shadow: string;
  lockFile: string;
  statusFile: string;
  agentFifo: string;
  controlFifo: string;
}

/** Refuses a command that only root may run (one clear line, status 'refused'). */
export function requireRoot(command: string): void {
  if (process.geteuid?.() !== 0) {
    throw new VbdError(`${command} needs root (it mounts a tmpfs, locks RAM and attaches a loop device); run it with sudo`, { kind: 'refused' });
  }
}

export function runtimeDir(id: VolumeIdentity): string {
  return join(RUN_ROOT, identityKey(id));
}

function pathsIn(dir: string): RuntimePaths {
  return {
    dir, shadow: join(dir, 'shadow'), lockFile: join(dir, 'daemon.lock'), statusFile: join(dir, 'status.json'),
    agentFifo: join(dir, 'agent.fifo'), controlFifo: join(dir, 'control.fifo'),
  };
}

export function runtimePaths(id: VolumeIdentity): RuntimePaths {
  return pathsIn(runtimeDir(id));
}

/**
 * Checks that `dir` and every directory above it up to / are directories owned by root and
 * writable by nobody else: then only root can have made what is inside (the agent checks this
 * before it sends a key).
 */
export function checkRootOwnedPath(dir: string): void {
  const parts = dir.split('/').filter((p) => p.length > 0);
  for (let i = parts.length; i >= 0; i--) {
    const path = `/${parts.slice(0, i).join('/')}`;
    const st = lstatSync(path);
    if (!st.isDirectory() || st.uid !== 0 || (st.mode & 0o022) !== 0) {
      throw new VbdError(`${path} is not a root-owned directory writable only by root; refusing to trust what is in it`);
    }
  }
}

/** Creates (root only) the runtime directory and its parents, each root's 0755; refuses impostors. */
export function makeRuntimeDir(paths: RuntimePaths): void {
  const rel = paths.dir.slice(RUN_ROOT.length + 1).split('/');
  let path = RUN_ROOT;
  for (const part of ['', ...rel]) {
    path = part === '' ? path : join(path, part);
    try {
      mkdirSync(path, { mode: 0o755 });
      chmodSync(path, 0o755); // whatever the umask (the unit's is 0077): the owner must reach her FIFOs
    } catch (err) {
      if (errnoCode(err) !== 'EEXIST') throw failure(`cannot create ${path}`, err);
    }
  }
  checkRootOwnedPath(paths.dir);
}
export interface FlushReport {
  at: string;
  ok: boolean;
  durationMs: number;
  /** Bytes written to the backing files (the journal's bytes are counted apart). */
  bytesWritten: number;
  journalBytes?: number;
  chunksChanged: number;
  /** Chunks the flush hashed: those the change tracker named, or all of them (a full scan). */
  chunksHashed?: number;
  /** How the flush found what changed: 'block-layer' or 'full-scan (reason)'. */
  tracking?: string;
  reason: string;
  error?: string;
  /** Where the time went: sync, freeze, frozen (writer stall), scan, journal, apply (ms). */
  timings?: Record<string, number> | undefined;
  /**
   * Sealed: the epoch committed, and which path the chunks took: straight into free slots
   * (copy-on-write), or — more changed chunks than free slots — through the overflow journal;
   * and the bytes the commit wrote to the map file (its log record or checkpoint, and the
   * reservation), apart from `bytesWritten` (the slots).
   */
  /** A sealed commit: where its chunks went, the map bytes, and the pool threads that sealed them (0: the daemon's own thread). */
  sealed?: { epoch: number; inFreeSlots: number; throughJournal: number; mapBytes: number; threads: number };
}

/** The latest flush check, idle or not (an idle check does no scan and no I/O). */
export interface FlushCheck {
  at: string;
  idle: boolean;
  ok: boolean;
  durationMs: number;
}

export type DaemonState = 'starting' | 'waiting' | 'recovering' | 'populating' | 'live' | 'stopping' | 'stopped' | 'failed';

/** What a teardown is held up by (DaemonStatus.waitingFor). */
export interface WaitingFor {
  what: 'unmount';
  /** The mount point. */
  path: string;
  /** Processes with their cwd, root or an open file under it, as "pid N (comm)". */
  holders: string[];
  since: string;
}

export interface DaemonStatus {
  name: string;
  volumeDir: string;
  /** identityKey() of the volume: UID/DEV.INO. */
  identity: string;
  state: DaemonState;
  pid: number;
  owner: { uid: number; gid: number };
  /** What decides attach and teardown: none, spawn (our own agent) or wait (the owner's agent). */
  canary: string;
  /** Sessions served so far (attach … teardown). */
  sessions: number;
  intervalMs: number;
  deviceSize: number;
  chunkSize: number;
  layout: string;
  /** A sealed volume (its agent brings the passphrase). */
  sealedVolume?: boolean;
  device?: string;
  link?: string;
  mountpoint?: string;
  /** --nbd: the running export (nbdkit): its URI, socket or address, TLS, pid. */
  nbd?: NbdState | undefined;
  /** --nbd: why the export ended by itself during the session, if it did. */
  nbdError?: string | undefined;
  image?: string;
  startedAt: string;
  populateMs?: number;
  /** Sealed: pool threads that opened the slots (0: the daemon's own thread). */
  populateThreads?: number;
  /** How the next flush finds what changed: 'block-layer', or 'full-scan (reason)'. */
  tracking?: string;
  /** The threads large scans use, the pool's threads started so far, and why the pool is off (if it is). */
  scan?: { threads: number; started: number; off?: string };
  /** The latest flush that wrote (or tried to write) something. */
  lastFlush?: FlushReport;
  lastCheck?: FlushCheck;
  /** Flush checks done, idle ones included: `vbd-shadow flush` waits for this to grow. */
  flushChecks: number;
  flushFailures: number;
  /** The start time of the latest flush that completed: the files hold at least that state. */
  lastGoodFlush?: string;
  externalChanges: number;
  /** The latest agent session refused (e.g. a wrong key), for the agent to report — and to exit with the status of its kind. */
  refused?: { at: string; reason: string; kind?: ErrorKind };
  lastExternalChange?: { at: string; name: string; what: string; keptAs: string | undefined };
  /** The owner's loop devices of earlier sessions still held open (never reused; removed later). */
  quarantinedLoops?: number[];
  /** Sealed volumes: epochs, the nonce budget and free slots, as of the last commit. */
  sealed?: SealedState | undefined;
  /** Sealed, served with --expose-damaged: the chunks whose slots failed authentication (the first 20). */
  damagedChunks?: DamagedChunk[];
  /**
   * What a teardown waits for right now, and since when: the unmount of a busy mount (and who
   * holds it: "pid 123 (bash)"). Absent when it does not wait; `stop` and `flush` say it.
   */
  waitingFor?: WaitingFor;
  /** What opening the volume found that its owner must hear (an older map copy used, a commit completed …). */
  notices?: string[];
  /** The newest events the daemon reported (src/daemon/events.ts), oldest first, at most MAX_RECORDED. */
  events?: DaemonEvent[];
  error?: string;
}

export function writeStatus(paths: RuntimePaths, status: DaemonStatus): void {
  const temp = `${paths.statusFile}.new`;
  const fd = openSync(temp, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_TRUNC | fsc.O_NOFOLLOW, 0o644);
  try {
    fchmodSync(fd, 0o644); // readable by the owner whatever the umask
    writeSync(fd, `${JSON.stringify(status, null, 2)}\n`);
  } finally {
    closeSync(fd);
  }
  renameSync(temp, paths.statusFile);
}

/** The status in a runtime directory, or undefined if there is none. */
export function readStatusAt(paths: RuntimePaths): DaemonStatus | undefined {
  try {
    return JSON.parse(readFileSync(paths.statusFile, 'utf8')) as DaemonStatus;
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return undefined;
    throw failure(`cannot read ${paths.statusFile}`, err);
  }
}

export interface KnownVolume {
  paths: RuntimePaths;
  status: DaemonStatus;
}

/** Every volume with a status here: all owners' for root, else the caller's own. */
export function knownVolumes(): KnownVolume[] {
  const myUid = process.getuid?.() ?? -1;
  const uids = myUid === 0 ? safeList(RUN_ROOT).filter((u) => /^\d+$/.test(u)) : [String(myUid)];
  const found: KnownVolume[] = [];
  for (const uid of uids) {
    for (const key of safeList(join(RUN_ROOT, uid)).filter((k) => /^\d+\.\d+$/.test(k))) {
      const paths = pathsIn(join(RUN_ROOT, uid, key));
      const status = readStatusAt(paths);
      if (status !== undefined) found.push({ paths, status });
    }
  }
  // By code point, not localeCompare: names are ASCII, and ICU's collator costs ~25 ms to set up.
  return found.sort((a, b) => compareText(a.status.name, b.status.name) || a.status.owner.uid - b.status.owner.uid);
}

function compareText(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

function safeList(dir: string): string[] {
  try {
    return readdirSync(dir);
  } catch {
    return [];
  }
}

/**
 * The volume called `name` among those the caller may see. Names are not unique across owners
 * (nor identities): more than one match asks for the directory instead.
 */
export function findVolumeByName(name: string): KnownVolume {
  if (!isValidName(name)) throw new VbdError(`'${name}' is neither a volume directory nor a volume name`);
  const matches = knownVolumes().filter((v) => v.status.name === name);
  const running = matches.filter((v) => daemonRunning(v.status));
  const pick = running.length > 0 ? running : matches;
  if (pick.length === 0) throw new VbdError(`no volume named '${name}' has been started here${process.getuid?.() === 0 ? '' : ' by you'}`, { kind: 'not-found' });
  if (pick.length > 1) throw new VbdError(`${pick.length} volumes are named '${name}' (${pick.map((v) => v.status.volumeDir).join(', ')}); give the directory`);
  return pick[0] as KnownVolume;
}

/** The status of the volume called `name` (the running one, if any), or undefined. */
export function readStatus(name: string): DaemonStatus | undefined {
  const matches = knownVolumes().filter((v) => v.status.name === name);
  return (matches.find((v) => daemonRunning(v.status)) ?? matches[0])?.status;
}

/** Whether `pid` runs (a zombie, dead but not yet reaped by its parent, does not). */
export function isAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

/** Whether the daemon a status names still runs. */
export function daemonRunning(status: DaemonStatus): boolean {
  return status.state !== 'stopped' && status.state !== 'failed' && isAlive(status.pid);
}

/**
 * What a runtime entry stands for: a daemon that runs (in any state: waiting, live, stopping…);
 * one that has gone but left something behind (its RAM image kept in the tmpfs, or a loop device
 * still bound to an image of this directory); or one that has ended and left nothing.
 */
export type Presence = 'running' | 'left-behind' | 'ended';

export function presenceOf(v: KnownVolume): Presence {
  if (daemonRunning(v.status)) return 'running';
  return isTmpfsMounted(v.paths.shadow) || loopsOf(v).length > 0 ? 'left-behind' : 'ended';
}

/** The loop devices the status names (this session's and held earlier ones) still bound to an image in this entry's tmpfs. */
export function loopsOf(v: KnownVolume): string[] {
  const indexes = [...(v.status.quarantinedLoops ?? [])];
  const m = /^\/dev\/loop(\d+)$/.exec(v.status.device ?? '');
  if (m !== null) indexes.unshift(Number(m[1]));
  return indexes.filter((n) => {
    try {
      return readFileSync(`/sys/block/loop${n}/loop/backing_file`, 'utf8').startsWith(`${v.paths.shadow}/`);
    } catch {
      return false; // not bound (no loop/ attributes) or no such device
    }
  }).map((n) => `/dev/loop${n}`);
}

/**
 * How long an ended entry is kept: long enough for `stop` (and whoever started the daemon) to
 * read how it ended, after which root's `status` removes it (lock.ts, pruneEnded).
 */
export const ENDED_KEPT_MS = 60_000;

/** Whether an ended entry is older than ENDED_KEPT_MS (by its status file's last write). */
export function endedLongAgo(v: KnownVolume, now = Date.now()): boolean {
  try {
    return now - lstatSync(v.paths.statusFile).mtimeMs > ENDED_KEPT_MS;
  } catch {
    return false;
  }
}

/**
 * The status of a daemon that runs for the volume of this identity (any state but stopped or
 * failed, its process alive), else undefined. Readable by the owner without root: offline
 * commands refuse to write a live volume's files by it.
 */
export function liveDaemon(id: VolumeIdentity): DaemonStatus | undefined {
  const status = readStatusAt(runtimePaths(id));
  return status !== undefined && daemonRunning(status) ? status : undefined;
}
