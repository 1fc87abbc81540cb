// `vbd-shadow status`: which entries it shows, and how — for people, and as JSON for scripts.
// The JSON is always an array of entries of one shape: every key present (null or [] when it
// does not apply), counts as integers, durations in milliseconds rounded to the microsecond.

import { formatSize } from '../common/size.js';
import { unitOfDirectory } from '../common/unit-name.js';
import type { DaemonState, DaemonStatus, FlushCheck, FlushReport, Presence, WaitingFor } from '../daemon/runtime.js';
import { describeResumed } from '../store/budget-resumed.js';
import type { DamagedChunk, SealedState } from '../store/chunk-store.js';
import type { NbdState } from '../device/nbd.js';
import { UNNAMED_HOLDER, type DaemonEvent } from '../daemon/events.js';

/** A duration in ms, to the microsecond (no `27.81837900000005`). */
function ms(value: number): number {
  return Math.round(value * 1000) / 1000;
}

export interface FlushJson {
  at: string;
  ok: boolean;
  reason: string;
  durationMs: number;
  chunksChanged: number;
  chunksHashed: number | null;
  bytesWritten: number;
  journalBytes: number | null;
  tracking: string | null;
  timings: Record<string, number>;
  sealed: { epoch: number; inFreeSlots: number; throughJournal: number; mapBytes: number; threads: number } | null;
  error: string | null;
}

export interface StatusJson {
  name: string;
  /** The daemon's state as it last wrote it. */
  state: DaemonState;
  /** running: the daemon runs; left-behind: it has gone, leaving its RAM image or a loop device; ended: nothing left. */
  presence: Presence;
  pid: number;
  owner: { uid: number; gid: number };
  volumeDir: string;
  /** The system unit that serves it (`vbd-shadow@` + the directory as systemd-escape --path writes it). */
  unit: string;
  identity: string;
  layout: string;
  sealedVolume: boolean;
  deviceSize: number;
  chunkSize: number;
  canary: string;
  sessions: number;
  intervalMs: number;
  startedAt: string;
  /** The device and mount point while the daemon runs (else null: what it had is gone). */
  device: string | null;
  link: string | null;
  mountpoint: string | null;
  /** Loop devices still bound to an image of this volume's runtime directory. */
  boundLoops: string[];
  /** Whether the RAM image's tmpfs is still mounted (a daemon that has gone kept it: `recover`). */
  imageKept: boolean;
  populateMs: number | null;
  /** Pool threads that opened a sealed volume's slots at populate (0: the daemon's own thread). */
  populateThreads: number | null;
  tracking: string | null;
  /** The large-scan thread pool: threads, threads started, why it is off. */
  scan: { threads: number; started: number; off: string | null } | null;
  /** The NBD export while the daemon runs, and why it ended if it ended by itself. */
  nbd: NbdState | null;
  nbdError: string | null;
  lastFlush: FlushJson | null;
  lastCheck: { at: string; idle: boolean; ok: boolean; durationMs: number } | null;
  lastGoodFlush: string | null;
  flushChecks: number;
  flushFailures: number;
  externalChanges: number;
  lastExternalChange: { at: string; name: string; what: string; keptAs: string | null } | null;
  quarantinedLoops: number[];
  sealed: SealedState | null;
  damagedChunks: DamagedChunk[];
  notices: string[];
  refused: { at: string; reason: string } | null;
  /** What the daemon's teardown waits for now (a busy mount and who holds it), while it runs. */
  waitingFor: WaitingFor | null;
  error: string | null;
  /** The newest events the daemon reported (src/daemon/events.ts), oldest first. */
  events: DaemonEvent[];
}

function flushJson(f: FlushReport): FlushJson {
  return {
    at: f.at, ok: f.ok, reason: f.reason, durationMs: ms(f.durationMs), chunksChanged: f.chunksChanged, chunksHashed: f.chunksHashed ?? null,
    bytesWritten: f.bytesWritten, journalBytes: f.journalBytes ?? null, tracking: f.tracking ?? null,
    timings: Object.fromEntries(Object.entries(f.timings ?? {}).map(([k, v]) => [k, ms(v)])), sealed: f.sealed ?? null, error: f.error ?? null,
  };
}

function checkJson(c: FlushCheck): StatusJson['lastCheck'] {
  return { at: c.at, idle: c.idle, ok: c.ok, durationMs: ms(c.durationMs) };
}

/** What one entry is now: its last status, with what is still there. */
export interface StatusView {
  status: DaemonStatus;
  presence: Presence;
  boundLoops: string[];
  imageKept: boolean;
}

export function statusJson(v: StatusView): StatusJson {
  const s = v.status;
  const running = v.presence === 'running';
  return {
    name: s.name, state: s.state, presence: v.presence, pid: s.pid, owner: { uid: s.owner.uid, gid: s.owner.gid }, volumeDir: s.volumeDir, unit: unitOfDirectory(s.volumeDir), identity: s.identity,
    layout: s.layout, sealedVolume: s.sealedVolume === true, deviceSize: s.deviceSize, chunkSize: s.chunkSize, canary: s.canary, sessions: s.sessions,
    intervalMs: Math.round(s.intervalMs), startedAt: s.startedAt,
    device: running ? s.device ?? null : null, link: running ? s.link ?? null : null, mountpoint: running ? s.mountpoint ?? null : null,
    boundLoops: v.boundLoops, imageKept: v.imageKept,
    populateMs: s.populateMs !== undefined ? Math.round(s.populateMs) : null, populateThreads: s.populateThreads ?? null, tracking: s.tracking ?? null,
    scan: s.scan !== undefined ? { threads: s.scan.threads, started: s.scan.started, off: s.scan.off ?? null } : null,
    nbd: running ? s.nbd ?? null : null, nbdError: s.nbdError ?? null,
    lastFlush: s.lastFlush !== undefined ? flushJson(s.lastFlush) : null, lastCheck: s.lastCheck !== undefined ? checkJson(s.lastCheck) : null,
    lastGoodFlush: s.lastGoodFlush ?? null, flushChecks: s.flushChecks, flushFailures: s.flushFailures, externalChanges: s.externalChanges,
    lastExternalChange: s.lastExternalChange !== undefined ? { ...s.lastExternalChange, keptAs: s.lastExternalChange.keptAs ?? null } : null,
    quarantinedLoops: s.quarantinedLoops ?? [], sealed: s.sealed ?? null, damagedChunks: s.damagedChunks ?? [], notices: s.notices ?? [],
    refused: s.refused ?? null, waitingFor: running ? s.waitingFor ?? null : null, error: s.error ?? null, events: s.events ?? [],
  };
}

/** The lines a person reads for one entry. */
export function statusLines(v: StatusView): string[] {
  const s = v.status;
  const running = v.presence === 'running';
  const out: string[] = [];
  const how = running ? ` (pid ${s.pid}, canary ${s.canary}, ${s.sessions} sessions)` : v.presence === 'left-behind' ? ' (daemon gone)' : '';
  out.push(`${s.name}: ${s.state}${how}`);
  out.push(`  volume   ${s.volumeDir} (${formatSize(s.deviceSize)}, ${s.sealedVolume === true ? 'sealed, ' : ''}${s.layout}, ${formatSize(s.chunkSize)} chunks)`);
  out.push(`  unit     ${unitOfDirectory(s.volumeDir)}`);
  if (running && s.device !== undefined) out.push(`  device   ${s.link} -> ${s.device}`);
  if (running && s.mountpoint !== undefined) out.push(`  mounted  ${s.mountpoint}`);
  if (running && s.nbd !== undefined) out.push(`  nbd      ${s.nbd.uri} (nbdkit pid ${s.nbd.pid} as uid ${s.nbd.uid}${s.nbd.tls === 'psk' ? ', TLS with PSK required' : ', owner-only socket'})`);
  if (s.nbdError !== undefined) out.push(`  nbd      ENDED: ${s.nbdError}`);
  const w = running ? s.waitingFor : undefined;
  if (w !== undefined) out.push(`  waiting  since ${w.since} to unmount ${w.path}: busy, held by ${w.holders.join(', ') || UNNAMED_HOLDER}`);
  if (!running && v.boundLoops.length > 0) out.push(`  held     ${v.boundLoops.join(', ')} still bound to its RAM image`);
  if (!running && v.imageKept) out.push(`  image    its RAM image is kept (root-only): 'vbd-shadow recover ${s.volumeDir}' writes it back into the files`);
  if (running && s.populateMs !== undefined) out.push(`  populate ${Math.round(s.populateMs)} ms${s.sealedVolume === true && s.populateThreads !== undefined ? (s.populateThreads === 0 ? ' on the daemon\'s thread' : ` on ${s.populateThreads} pool thread${s.populateThreads === 1 ? '' : 's'}`) : ''}`);
  if (running && s.tracking !== undefined) out.push(`  tracking ${s.tracking}`);
  if (running && s.scan !== undefined) out.push(`  scan     ${s.scan.threads} thread${s.scan.threads === 1 ? '' : 's'} for large scans${s.scan.off !== undefined ? ` (pool off: ${s.scan.off})` : ''}`);
  const f = s.lastFlush;
  if (f !== undefined) {
    out.push(`  flush    ${f.ok ? 'ok' : 'FAILED'} at ${f.at} (${f.reason}): ${f.chunksChanged} chunks, ${formatSize(f.bytesWritten)} in ${f.durationMs.toFixed(1)} ms${f.error !== undefined ? `: ${f.error}` : ''}`);
  }
  const sealed = s.sealed;
  if (sealed !== undefined) {
    out.push(`  sealed   epoch ${sealed.epoch}; ${sealed.seals} slots sealed under key generation ${sealed.keyGeneration} (re-key due at ${sealed.rekeyAt}); ${sealed.freeSlots} free slots`);
    if (sealed.resumed !== undefined) out.push(`  budget   at start: ${describeResumed(sealed.resumed)}`);
    const path = f?.sealed;
    if (path !== undefined) out.push(`  commit   epoch ${path.epoch}: ${path.inFreeSlots} chunks into free slots${path.throughJournal > 0 ? `, ${path.throughJournal} through the overflow journal (more changed chunks than free slots)` : ''}; ${formatSize(path.mapBytes)} of map${path.threads > 0 ? `; sealed on ${path.threads} pool thread${path.threads === 1 ? '' : 's'}` : ''}`);
  }
  for (const notice of s.notices ?? []) out.push(`  notice   ${notice}`);
  if ((s.damagedChunks ?? []).length > 0) out.push(`  damaged  served as zeros: ${(s.damagedChunks ?? []).map((d) => `chunk ${d.chunk} ('${d.name}' at ${d.offset})`).join(', ')}`);
  if (s.flushFailures > 0) out.push(`  failures ${s.flushFailures} flushes failed since start`);
  if (running && (s.quarantinedLoops ?? []).length > 0) out.push(`  held     loop devices of earlier sessions still open: ${(s.quarantinedLoops ?? []).map((n) => `/dev/loop${n}`).join(', ')}`);
  if (s.error !== undefined) out.push(`  error    ${s.error}`);
  return out;
}

/** Entries the list shows: those whose daemon runs, or (`all`) every entry still kept. */
export function shown(views: StatusView[], all: boolean): StatusView[] {
  return all ? views : views.filter((v) => v.presence === 'running');
}
