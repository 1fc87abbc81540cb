// What the daemon reports, as one typed union: every line of its log is one of these events,
// formatted here with its journald priority. A new kind without a formatter does not compile
// (FORMAT is a mapped type over the kinds), and tests assert on the events a daemon recorded in
// its status (the last MAX_RECORDED), not on the text of its log.
//
// Priorities: `err` failures and refusals; `warning` what someone should look at (an external
// change, a notice of the store, a busy unmount); `notice` the milestones of a session; `info`
// the rest.

import { formatSize } from '../common/size.js';
import { describeResumed, type BudgetResumed } from '../store/budget-resumed.js';
import type { Log, Priority } from './log.js';

/** A chunk a sealed start found damaged, as the log names it. */
export interface NamedChunks {
  count: number;
  /** The first few named (`chunk 77 (file003 at offset 123456, epoch 3)`), the rest counted. */
  listed: string;
}

export type DaemonEvent =
  // Start and session
  | { kind: 'starting'; dir: string; deviceSize: number; files: number; sealed: boolean; layout: string; chunkSize: number; canary: string }
  | { kind: 'waiting-for-agent' }
  | { kind: 'agent-connected'; who: string }
  | { kind: 'agent-spawn-failed'; uid: number; error: string }
  | { kind: 'session-refused'; message: string }
  | { kind: 'ram-image'; size: number; path: string }
  | { kind: 'populated'; size: number; ms: number; threads: number; sealedEpoch: number | undefined }
  | { kind: 'damaged-served-as-zeros'; damaged: NamedChunks }
  | { kind: 'attached'; device: string; link: string; ownerNode: boolean; uid: number }
  | { kind: 'formatted'; device: string; fsType: string; asOwner: boolean }
  | { kind: 'mkfs-skipped'; fsType: string }
  | { kind: 'mounted'; device: string; path: string }
  | { kind: 'unmounted'; path: string }
  | { kind: 'live'; intervalMs: number; maxDirtyBytes: number }
  | { kind: 'tearing-down'; reason: string }
  | { kind: 'signal-during-teardown'; signal: string }
  | { kind: 'start-failed'; error: string }
  | { kind: 'session-over' }
  | { kind: 'stopped' }
  | { kind: 'teardown-step-failed'; step: string; error: string }
  | { kind: 'teardown-timings'; ms: number; steps: StepTiming[] }
  // Flushes
  | { kind: 'flushed'; reason: string; chunks: number; bytes: number; journalBytes: number; ms: number }
  | { kind: 'flush-failed'; reason: string; attempt: number; error: string; retryMs: number }
  | { kind: 'final-flush'; chunks: number; bytes: number; ms: number }
  | { kind: 'final-flush-failed'; attempt: number; of: number; error: string }
  | { kind: 'image-kept'; path: string; dir: string }
  | { kind: 'rekeyed'; from: number; to: number; epoch: number }
  | { kind: 'tracking-fallback'; reason: string; scans: 'every flush' | 'the next flush' | 'this flush' }
  | { kind: 'tracking-verification-failed'; chunks: number[] }
  | { kind: 'scan-pool-failed'; error: string }
  | { kind: 'journal-discarded'; reason: string }
  | { kind: 'journal-completed'; batch: number; chunks: number; bytes: number }
  // The files
  | { kind: 'external-change'; file: string; what: string; keptAs: string | undefined }
  | { kind: 'external-check-failed'; error: string }
  | { kind: 'watch-failed'; error: string }
  | { kind: 'keep-aside-failed'; file: string; error: string }
  | { kind: 'store-notice'; notice: string }
  /** `budget`: where seals continue, when root's record of the nonce budget was ahead of the files (undefined: it was not). */
  | { kind: 'rollback-accepted'; filesEpoch: number; committedEpoch: number; reservedEpoch: number; budget: BudgetResumed | undefined }
  | { kind: 'budget-resumed'; budget: BudgetResumed }
  | { kind: 'sealed-record-dropped'; uuid: string; forgotten: boolean }
  // Recovery of an earlier daemon's leftovers
  | { kind: 'recovery-empty-tmpfs'; path: string }
  | { kind: 'recovery-found-image'; path: string }
  | { kind: 'recovery-thawed'; path: string }
  | { kind: 'recovery-unmounted'; path: string }
  | { kind: 'recovery-detached'; device: string }
  | { kind: 'recovered'; chunks: number; bytes: number; ms: number }
  // Devices and mounts
  | { kind: 'loop-unbound-by-other'; device: string }
  | { kind: 'loop-rebound'; device: string }
  | { kind: 'loop-busy-waiting'; device: string; holders: string[] }
  | { kind: 'loop-quarantined'; device: string; holders: string[] }
  | { kind: 'unmount-retry'; path: string; error: string }
  | { kind: 'unmount-busy'; path: string; holders: string[] }
  // Pipes
  | { kind: 'pipe-ignored'; pipe: 'agent' | 'control'; what: string; suspicious: boolean }
  | { kind: 'agent-pipe-closed-early' }
  | { kind: 'notify-failed'; message: string }
  // Network export (nbdkit)
  | { kind: 'nbd-exporting'; device: string; pid: number; uid: number; tlsPsk: boolean; uri: string }
  | { kind: 'nbd-ended' }
  | { kind: 'nbd-ended-by-itself'; why: string }
  | { kind: 'nbdkit-said'; line: string };

/** How long one step of an unwind took; `alongside`: it ran while the steps after it went on. */
export interface StepTiming {
  step: string;
  ms: number;
  alongside?: boolean;
}

export type EventKind = DaemonEvent['kind'];
export type EventOf<K extends EventKind> = Extract<DaemonEvent, { kind: K }>;

interface Formatted {
  text: string;
  priority: Priority;
}

const held = (holders: string[], none: string): string => (holders.length > 0 ? holders.join(', ') : none);

/**
 * Who holds a busy mount when no process could be named: another user's process links
 * (/proc/PID/cwd, fd) are readable only with CAP_SYS_PTRACE, which the system unit does not grant.
 */
export const UNNAMED_HOLDER = 'a process the daemon cannot name (another user\'s, and naming it needs CAP_SYS_PTRACE, which the unit does not grant; \'fuser -vm\' as root names it)';

const FORMAT: { [K in EventKind]: (e: EventOf<K>) => Formatted } = {
  'starting': (e) => ({
    text: `starting: volume ${e.dir}, ${formatSize(e.deviceSize)}, ${e.files} files, ${e.sealed ? 'sealed, ' : ''}${e.layout} layout, ${formatSize(e.chunkSize)} chunks, canary ${e.canary}`,
    priority: 'notice',
  }),
  'waiting-for-agent': () => ({ text: 'waiting for the owner\'s agent', priority: 'notice' }),
  'agent-connected': (e) => ({ text: `agent connected: ${e.who}`, priority: 'notice' }),
  'agent-spawn-failed': (e) => ({ text: `cannot start the agent as uid ${e.uid}: ${e.error}`, priority: 'err' }),
  'session-refused': (e) => ({ text: `session refused: ${e.message}`, priority: 'err' }),
  'ram-image': (e) => ({ text: `RAM image: ${formatSize(e.size)} in ${e.path}, mapped and locked`, priority: 'info' }),
  'populated': (e) => ({
    text: `populated ${formatSize(e.size)} from the files in ${e.ms} ms${e.sealedEpoch === undefined ? '' : ` (sealed, epoch ${e.sealedEpoch}, ${e.threads === 0 ? 'opened on the daemon\'s thread' : `opened on ${e.threads} pool thread${e.threads === 1 ? '' : 's'}`})`}`,
    priority: 'info',
  }),
  'damaged-served-as-zeros': (e) => ({
    text: `--zero-damaged: ${e.damaged.count} chunks fail authentication and are served as zeros: ${e.damaged.listed}`,
    priority: 'warning',
  }),
  'attached': (e) => ({
    text: `attached ${e.device} as ${e.link}${e.ownerNode ? `, node owned by uid ${e.uid}` : ', node kept root-only while mounted'}`,
    priority: 'notice',
  }),
  'formatted': (e) => ({ text: `formatted ${e.device} as ${e.fsType} (no discard${e.asOwner ? ', as the owner' : ''})`, priority: 'info' }),
  'mkfs-skipped': (e) => ({ text: `--mkfs ${e.fsType}: the device holds data already; not formatting`, priority: 'info' }),
  'mounted': (e) => ({ text: `mounted ${e.device} on ${e.path} (nosuid,nodev)`, priority: 'notice' }),
  'unmounted': (e) => ({ text: `unmounted ${e.path}`, priority: 'notice' }),
  'live': (e) => ({ text: `live; flushing every ${e.intervalMs / 1000} s or after ${formatSize(e.maxDirtyBytes)} written`, priority: 'notice' }),
  'tearing-down': (e) => ({ text: `tearing down: ${e.reason}`, priority: 'notice' }),
  'signal-during-teardown': (e) => ({ text: `${e.signal} during teardown: still writing back, please wait`, priority: 'notice' }),
  'start-failed': (e) => ({ text: `start failed: ${e.error}`, priority: 'err' }),
  'session-over': () => ({ text: 'session over: everything written back, device detached, RAM freed', priority: 'notice' }),
  'stopped': () => ({ text: 'stopped: everything written back, device detached, RAM freed', priority: 'notice' }),
  'teardown-step-failed': (e) => ({ text: `teardown: ${e.step} failed: ${e.error}`, priority: 'err' }),
  'teardown-timings': (e) => ({
    text: `teardown took ${e.ms} ms: ${e.steps.map((s) => `${s.step} ${s.ms} ms${s.alongside === true ? ' (alongside)' : ''}`).join(', ')}`,
    priority: 'info',
  }),
  'flushed': (e) => ({
    text: `flush (${e.reason}): ${e.chunks} chunks, ${e.bytes} bytes to the files + ${e.journalBytes} journal, ${e.ms.toFixed(1)} ms`,
    priority: 'info',
  }),
  'flush-failed': (e) => ({
    text: `FLUSH FAILED (${e.reason}, attempt ${e.attempt}): ${e.error}; the data stays in RAM; retrying in ${e.retryMs / 1000} s`,
    priority: 'err',
  }),
  'final-flush': (e) => ({ text: `final flush: ${e.chunks} chunks, ${formatSize(e.bytes)} to the files in ${e.ms.toFixed(0)} ms`, priority: 'info' }),
  'final-flush-failed': (e) => ({ text: `final flush failed (attempt ${e.attempt} of ${e.of}): ${e.error}`, priority: 'err' }),
  'image-kept': (e) => ({
    text: `the RAM image is KEPT at ${e.path} (root-only) so nothing is lost; fix the cause, then run 'vbd-shadow recover ${e.dir}' or start the volume again`,
    priority: 'err',
  }),
  'rekeyed': (e) => ({
    text: `re-keyed: key generation ${e.from} reached its nonce budget; epoch ${e.epoch} and later seal under generation ${e.to} (manifest re-wrapped, passphrase unchanged; older slots keep their key until rewritten)`,
    priority: 'notice',
  }),
  'tracking-fallback': (e) => ({
    text: e.scans === 'every flush' ? `change tracking off: ${e.reason}; every flush scans the whole image`
      : e.scans === 'the next flush' ? `change tracking: the next flush scans the whole image (${e.reason})`
      : `change tracking: ${e.reason}; this flush scans the whole image`,
    priority: 'info',
  }),
  'tracking-verification-failed': (e) => ({
    text: `TRACKING VERIFICATION FAILED: ${e.chunks.length} chunks differ from the files with no write traced (chunks ${e.chunks.slice(0, 10).join(', ')}${e.chunks.length > 10 ? ', …' : ''})`,
    priority: 'err',
  }),
  'scan-pool-failed': (e) => ({ text: `${e.error}; hashing on the daemon's thread`, priority: 'warning' }),
  'journal-discarded': (e) => ({ text: `journal: discarding an interrupted, uncommitted flush (${e.reason}); the files hold the flush before it`, priority: 'warning' }),
  'journal-completed': (e) => ({ text: `journal: completed an interrupted flush (batch ${e.batch}, ${e.chunks} chunks, ${e.bytes} bytes)`, priority: 'warning' }),
  'external-change': (e) => ({
    text: `EXTERNAL CHANGE: backing file '${e.file}' was ${e.what} by someone else; kept aside as ${e.keptAs ?? '(nothing to keep)'}; the chunks that differ from RAM will be rewritten`,
    priority: 'warning',
  }),
  'external-check-failed': (e) => ({ text: `external change check failed: ${e.error}`, priority: 'err' }),
  'watch-failed': (e) => ({ text: `watching the backing files failed (${e.error}); external changes may go unnoticed until the next start`, priority: 'err' }),
  'keep-aside-failed': (e) => ({ text: `could not keep '${e.file}' aside: ${e.error}`, priority: 'err' }),
  'store-notice': (e) => ({ text: `NOTICE: ${e.notice}`, priority: 'warning' }),
  'rollback-accepted': (e) => ({
    text: `--accept-rollback: serving the files at epoch ${e.filesEpoch} although epoch ${e.committedEpoch} was committed here; root's record now follows them (new commits take epochs above ${e.reservedEpoch}); ${e.budget === undefined ? 'their nonce budget is not behind root\'s record' : describeResumed(e.budget)}`,
    priority: 'warning',
  }),
  'budget-resumed': (e) => ({ text: `nonce budget: ${describeResumed(e.budget)}`, priority: e.budget.how === 'fresh-generation' ? 'notice' : 'info' }),
  'sealed-record-dropped': (e) => ({
    text: `--accept-rollback: this directory held sealed volume ${e.uuid}; serving it as the plain volume it is now${e.forgotten ? ", root's record of the sealed one removed" : ''}`,
    priority: 'warning',
  }),
  'recovery-empty-tmpfs': (e) => ({ text: `recovery: empty private tmpfs at ${e.path} from an earlier run; removing it`, priority: 'info' }),
  'recovery-found-image': (e) => ({ text: `recovery: found the RAM image of an earlier daemon at ${e.path}; writing it back before anything else`, priority: 'warning' }),
  'recovery-thawed': (e) => ({ text: `recovery: thawed ${e.path}, left frozen by the daemon that died mid-flush`, priority: 'info' }),
  'recovery-unmounted': (e) => ({ text: `recovery: unmounted ${e.path}`, priority: 'info' }),
  'recovery-detached': (e) => ({ text: `recovery: detached ${e.device}`, priority: 'info' }),
  'recovered': (e) => ({ text: `recovery: wrote ${e.chunks} changed chunks (${formatSize(e.bytes)}) back to the files in ${Math.round(e.ms)} ms`, priority: 'info' }),
  'loop-unbound-by-other': (e) => ({ text: `${e.device} had been unbound by someone holding it (LOOP_CLR_FD); nothing to detach`, priority: 'warning' }),
  'loop-rebound': (e) => ({ text: `${e.device} is bound to another file now; leaving it alone`, priority: 'warning' }),
  'loop-busy-waiting': (e) => ({
    text: `waiting: ${e.device} is still open by ${held(e.holders, 'a process')}; it detaches when that closes it`,
    priority: 'warning',
  }),
  'loop-quarantined': (e) => ({
    text: `${e.device} is still open (${held(e.holders, 'by someone')}); quarantined: it is never reused by vbd-shadow and is removed at a later start`,
    priority: 'warning',
  }),
  'unmount-retry': (e) => ({ text: `unmount of ${e.path}: ${e.error}; retrying`, priority: 'warning' }),
  'unmount-busy': (e) => ({ text: `unmount of ${e.path} failed: busy; held by ${held(e.holders, UNNAMED_HOLDER)}; retrying`, priority: 'warning' }),
  'pipe-ignored': (e) => ({ text: `${e.pipe} pipe: ignored ${e.what}`, priority: e.suspicious ? 'warning' : 'info' }),
  'agent-pipe-closed-early': () => ({ text: 'agent pipe closed before the agent was ready', priority: 'warning' }),
  'notify-failed': (e) => ({ text: e.message, priority: 'warning' }),
  'nbd-exporting': (e) => ({
    text: `exporting ${e.device} over NBD with nbdkit (pid ${e.pid}, uid ${e.uid}${e.tlsPsk ? ', TLS with PSK required' : ''}): ${e.uri}`,
    priority: 'notice',
  }),
  'nbd-ended': () => ({ text: 'NBD export ended (nbdkit gone) before the final writeback', priority: 'notice' }),
  'nbd-ended-by-itself': (e) => ({ text: `NBD export ended by itself: nbdkit ${e.why}; the volume stays live`, priority: 'err' }),
  'nbdkit-said': (e) => ({ text: `nbdkit: ${e.line}`, priority: 'warning' }),
};

export function formatEvent(event: DaemonEvent): Formatted {
  // The mapped type guarantees the formatter matches the kind; TypeScript cannot narrow the index.
  const format = FORMAT[event.kind] as (e: DaemonEvent) => Formatted;
  return format(event);
}

/** How the daemon's parts report: one event, logged with its priority and recorded. */
export type Report = (event: DaemonEvent) => void;

/** Events kept for the status (tests and `status --json` read them): the newest ones. */
export const MAX_RECORDED = 64;

/**
 * A reporter that writes each event to `log` and hands it to `record` (the status keeps the
 * newest MAX_RECORDED). The log bounds its own rate; `record` must bound what it keeps.
 */
export function createReporter(log: Log, record?: (event: DaemonEvent) => void): Report {
  return (event) => {
    const { text, priority } = formatEvent(event);
    log(text, priority);
    record?.(event);
  };
}

/** A duration as events carry it: milliseconds to the microsecond (no float noise in the status). */
export function roundMs(ms: number): number {
  return Math.round(ms * 1000) / 1000;
}

/** For errors: the message of what was thrown. */
export function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
