// Change tracking by the block layer: which chunks of the device were written since the last
// flush, as the kernel saw the requests complete — so a flush hashes and copies those chunks,
// not the whole image.
//
// While a volume is live the daemon keeps a tracefs instance of its own (a ring buffer per CPU,
// its name keyed by the volume's identity and the daemon's pid, no user text), with
//  - block:block_rq_complete filtered on the session's loop device and every request that is
//    not a read: writes, write-zeroes ('N'), discards ('D'), flushes carrying data. At
//    completion: a request queued but not done is not in the set yet, so its chunk stays dirty
//    for the flush after the one that cuts while it is in flight;
//  - block:block_bio_queue filtered on the device and the daemon's own thread, for a session
//    that mounts the device: the only device I/O that thread submits then is FITHAW's (ext4
//    rewrites its superblock as it thaws, before any writer is let go); syncfs and FIFREEZE run
//    on other threads. Completions during the thaw covered sector for sector by those bios are
//    the thaw's own and ride along with the next flush that happens anyway; anything else
//    completing then (a writer released by the thaw) is dirty for the next flush. Not for a raw
//    device (nothing thaws): there the daemon's thread fsyncs the device, whose page-cache
//    writeback queues one bio per 4 KiB page — 16 events per 64 KiB chunk written, which filled
//    a 4 MiB buffer at ~4400 chunks (10 % of a 4 GiB volume fell back to full scans).
// It is read through trace_pipe (text, consuming, non-blocking) with the `fields` option (every
// field as name=value, whatever the kernel's print format): a consuming read never returns an
// event twice nor skips one between two reads, the kernel merges the CPUs' buffers in time
// order, and the text needs no knowledge of the ring buffer's page layout (trace_pipe_raw would,
// per kernel version). The buffer is drained every DRAIN_MS and at each cut.
//
// The set may be incomplete, and a flush then scans everything (reasons logged once each, shown
// in status): a ring buffer lost events (overrun, commit overrun, dropped); the traced write
// (discard) sectors fall short of the device's own counters since the last cut; the instance's
// filters, enables, buffer size, CPU mask, overwrite mode or tracing_on changed; the loop
// device's binding changed; the block layer stopped counting its I/O (queue/iostats); the first
// flush of a session; and whatever the engine adds (an external change of the files, a failed
// flush, a recovery). Those checks run when the device's counters moved since the last cut; an
// idle check reads the counters alone (ChangeTracker.quiet says why that is enough).

import { statSync } from 'node:fs';
import { VbdError } from '../common/errors.js';
import { countsIo, deviceCounters, loopSignature, traceDeviceNumber, type DeviceCounters, type LoopDevice } from '../device/loop.js';
import { TracePipe, cpuLoss, createInstance, ensureTracefs, instanceCpus, listInstances, readControl, removeInstance, writeControl, type CpuLoss } from '../sys/tracefs.js';
import type { VolumeIdentity } from '../volume/volume.js';
import type { DaemonEvent, Report } from '../daemon/events.js';

const DRAIN_MS = 100;
const PREFIX = 'vbd-shadow-';

const MIN_BUFFER_KB = 4096;
const MAX_BUFFER_TOTAL_KB = 64 * 1024;

/**
 * The ring buffer per CPU. A completion event takes 57 bytes (block_rq_complete, measured), 64
 * with the pages' headers, and buffered writes, filesystems and 4 KiB O_DIRECT complete at
 * least a page per request: the buffer holds the completions of max-dirty bytes (`start
 * --max-dirty`, 256 MiB by default: 4 MiB) on any one CPU — all may land on one — between two
 * drains. Not less than 4 MiB (rewrites of a small device between two drains count too), and
 * not more than 64 MiB over all CPUs (the kernel's RAM, not the daemon's). Only 512-byte O_DIRECT
 * writes to the raw device produce events faster; an overrun is detected in any case, and that
 * flush scans.
 */
export function traceBufferKb(maxDirtyBytes: number, cpus: number): number {
  const wanted = Math.ceil((maxDirtyBytes / 4096) * 64 / 1024);
  return Math.max(MIN_BUFFER_KB, Math.min(wanted, Math.floor(MAX_BUFFER_TOTAL_KB / Math.max(1, cpus))));
}
/** When the daemon gives no max-dirty (tests of the tracker alone): the CLI's default. */
const DEFAULT_MAX_DIRTY = 256 * 2 ** 20;

/** The instance names of a volume's daemons: vbd-shadow-UID-DEV.INO-PID. */
export function traceInstancePrefix(id: VolumeIdentity): string {
  return `${PREFIX}${id.uid}-${id.dev}.${id.ino}-`;
}

/** The pid in an instance name of ours, or undefined if the name is not one. */
export function instancePid(name: string): number | undefined {
  const m = /^vbd-shadow-\d+-\d+\.\d+-(\d+)$/.exec(name);
  return m === null ? undefined : Number(m[1]);
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as { code?: string }).code === 'EPERM';
  }
}

/** What a cut hands the flush. */
export interface Cut {
  /** Chunks written since the previous cut (no order). */
  chunks: number[];
  /** Set when the chunks may not be all: the flush scans everything. */
  scanReason: string | undefined;
}

interface Settings {
  [file: string]: string;
}

export class ChangeTracker {
  private dir: string | undefined;
  private name: string | undefined;
  private pipe: TracePipe | undefined;
  private loop: LoopDevice | undefined;
  private timer: NodeJS.Timeout | undefined;
  /** One byte per chunk: 1 while the chunk is in `pendingList`. */
  private readonly pending: Uint8Array;
  private pendingList: number[] = [];
  /** The thaw's own writes: flushed with the next flush that runs anyway. */
  private deferred = new Set<number>();
  private scanReason: string | undefined = 'first flush of the session';
  /** Set when tracking cannot work at all (no tracefs, …): every flush scans. */
  private unavailable: string | undefined;
  private readonly logged = new Set<string>();
  private settings: Settings = {};
  private signature = '';
  private instanceIno = 0;
  private loss = new Map<number, CpuLoss>();
  private base: DeviceCounters = { written: 0, discarded: 0 };
  private traced = { written: 0, discarded: 0 };
  /** While FITHAW runs: the sectors our own thread queued, and the completions seen. */
  private thaw: { own: Map<number, number>; done: [number, number][] } | undefined;
  private sealed = false;
  /** The ring buffer per CPU: given, or from max-dirty and the CPUs (traceBufferKb) at start. */
  private bufferKb: number | undefined;
  private readonly maxDirtyBytes: number;

  constructor(
    private readonly identity: VolumeIdentity,
    private readonly chunkSize: number,
    chunkCount: number,
    private readonly report: Report,
    options: { bufferKb?: number; maxDirtyBytes?: number; off?: string } = {},
  ) {
    this.pending = new Uint8Array(chunkCount);
    this.bufferKb = options.bufferKb;
    this.maxDirtyBytes = options.maxDirtyBytes ?? DEFAULT_MAX_DIRTY;
    if (options.off !== undefined) this.unavailable = options.off;
  }

  /** 'block-layer', or why flushes scan everything. */
  mode(): string {
    const why = this.unavailable ?? this.scanReason;
    return why === undefined ? 'block-layer' : `full-scan (${why})`;
  }

  /** Whether the set is kept at all (false: every flush scans). */
  get active(): boolean {
    return this.unavailable === undefined && this.dir !== undefined;
  }

  /**
   * Creates the instance for `loop` (before anyone else can write to it). Never throws: tracking
   * off instead. `thaws`: the session freezes and thaws a filesystem it mounted (FITHAW's own
   * writes are sorted out by the bios our thread queues); only then is block_bio_queue traced.
   */
  start(loop: LoopDevice, how: { thaws: boolean }): void {
    if (this.unavailable !== undefined) {
      this.once('off', { kind: 'tracking-fallback', reason: this.unavailable, scans: 'every flush' });
      return;
    }
    try {
      ensureTracefs();
      const prefix = traceInstancePrefix(this.identity);
      // Instances of daemons that were killed (no teardown removed them), whichever volume.
      for (const stale of listInstances()) {
        const pid = instancePid(stale);
        if (pid !== undefined && pid !== process.pid && !alive(pid)) void removeInstance(stale).catch(() => undefined);
      }
      this.name = `${prefix}${process.pid}`;
      this.dir = createInstance(this.name);
      this.loop = loop;
      const dev = traceDeviceNumber(loop);
      const notRead = '!(rwbs ~ "R*")';
      const dir = this.dir;
      writeControl(dir, 'tracing_on', '0');
      this.bufferKb ??= traceBufferKb(this.maxDirtyBytes, instanceCpus(dir).length);
      writeControl(dir, 'buffer_size_kb', String(this.bufferKb));
      writeControl(dir, 'options/context-info', '0');
      writeControl(dir, 'options/fields', '1');
      writeControl(dir, 'events/block/block_rq_complete/filter', `dev == ${dev} && ${notRead}`);
      writeControl(dir, 'events/block/block_rq_complete/enable', '1');
      if (how.thaws) {
        writeControl(dir, 'events/block/block_bio_queue/filter', `dev == ${dev} && common_pid == ${process.pid} && ${notRead}`);
        writeControl(dir, 'events/block/block_bio_queue/enable', '1');
      }
      this.pipe = new TracePipe(dir);
      writeControl(dir, 'tracing_on', '1');
      this.instanceIno = statSync(dir).ino;
      this.settings = this.readSettings();
      this.arm();
      this.timer = setInterval(() => this.collectQuietly(), DRAIN_MS);
      this.timer.unref();
    } catch (err) {
      this.unavailable = `tracefs unavailable: ${err instanceof Error ? err.message : String(err)}`;
      this.once('off', { kind: 'tracking-fallback', reason: this.unavailable, scans: 'every flush' });
      // Half made: removed now if it can be, else by a later start (a dead daemon's instance).
      this.stop().catch(() => undefined);
    }
  }

  private readSettings(): Settings {
    const dir = this.dir;
    if (dir === undefined) return {};
    const files = ['tracing_on', 'buffer_size_kb', 'tracing_cpumask', 'options/overwrite', 'options/fields', 'options/context-info',
      'events/block/block_rq_complete/filter', 'events/block/block_rq_complete/enable',
      'events/block/block_bio_queue/filter', 'events/block/block_bio_queue/enable'];
    const s: Settings = {};
    for (const f of files) s[f] = readControl(dir, f);
    return s;
  }

  /** Takes the current state as the reference for the next checks. */
  private arm(): void {
    const dir = this.dir;
    const loop = this.loop;
    if (dir === undefined || loop === undefined) return;
    this.loss = new Map(instanceCpus(dir).map((cpu) => [cpu, cpuLoss(dir, cpu)]));
    this.signature = loopSignature(loop);
    this.base = deviceCounters(loop);
    this.traced = { written: 0, discarded: 0 };
  }

  private once(kind: string, event: DaemonEvent): void {
    if (this.logged.has(kind)) return;
    this.logged.add(kind);
    this.report(event);
  }

  /** Asks the next flush to scan everything (the reason is shown and logged once per kind). */
  requireScan(reason: string, kind = reason): void {
    this.scanReason ??= reason;
    this.once(`scan:${kind}`, { kind: 'tracking-fallback', reason, scans: 'the next flush' });
  }

  /** Adds chunks to the set (chunks the engine knows differ from the files). */
  mark(chunks: Iterable<number>): void {
    for (const c of chunks) this.add(c);
  }

  private add(chunk: number): void {
    if (chunk < 0 || chunk >= this.pending.length || this.pending[chunk] === 1) return;
    this.pending[chunk] = 1;
    this.pendingList.push(chunk);
  }

  private addRange(sector: number, sectors: number): void {
    if (sectors <= 0 || sector < 0) return;
    const first = Math.floor((sector * 512) / this.chunkSize);
    const last = Math.floor(((sector + sectors) * 512 - 1) / this.chunkSize);
    for (let c = first; c <= last; c++) this.add(c);
  }

  /** Whether a write to `chunk` was traced since the last cut (after a drain). */
  tracedSinceCut(chunk: number): boolean {
    return this.pending[chunk] === 1 || this.deferred.has(chunk);
  }

  private collectQuietly(): void {
    try {
      this.collect();
    } catch (err) {
      this.requireScan(`reading the trace failed: ${err instanceof Error ? err.message : String(err)}`, 'read');
    }
  }

  /** Reads every event the ring buffers hold into the set. */
  collect(): void {
    if (this.pipe === undefined || this.sealed) return;
    for (const line of this.pipe.drain()) this.event(line);
  }

  private event(line: string): void {
    const complete = line.startsWith('block_rq_complete:');
    if (!complete && !line.startsWith('block_bio_queue:')) return;
    const sector = Number(/ sector=\S+ \((-?\d+)\)/.exec(line)?.[1] ?? NaN);
    const sectors = Number(/ nr_sector=\S+ \((\d+)\)/.exec(line)?.[1] ?? NaN);
    const rwbs = / rwbs=(\S*)/.exec(line)?.[1];
    if (!Number.isFinite(sector) || !Number.isFinite(sectors) || rwbs === undefined) {
      throw new VbdError(`a trace line of ${this.dir ?? 'the instance'} is not understood: ${line.slice(0, 200)}`);
    }
    const op = rwbs.replace(/^F/, '').charAt(0);
    if (op === 'R' || sectors === 0) return;
    if (!complete) {
      if (this.thaw !== undefined) for (let s = sector; s < sector + sectors; s++) this.thaw.own.set(s, (this.thaw.own.get(s) ?? 0) + 1);
      return;
    }
    if (op === 'D') this.traced.discarded += sectors;
    else this.traced.written += sectors;
    if (this.thaw !== undefined) this.thaw.done.push([sector, sectors]);
    else this.addRange(sector, sectors);
  }

  /** Call right before FITHAW. */
  beginThaw(): void {
    if (!this.active) return;
    this.collectQuietly();
    this.thaw = { own: new Map(), done: [] };
  }

  /** Call right after FITHAW: sorts the completions seen meanwhile into the thaw's own and others. */
  endThaw(): void {
    if (this.thaw === undefined) return;
    this.collectQuietly();
    const { own, done } = this.thaw;
    this.thaw = undefined;
    for (const [sector, sectors] of done) {
      let ours = true;
      for (let s = sector; s < sector + sectors && ours; s++) ours = (own.get(s) ?? 0) > 0;
      if (ours) {
        for (let s = sector; s < sector + sectors; s++) own.set(s, (own.get(s) ?? 1) - 1);
        const first = Math.floor((sector * 512) / this.chunkSize);
        const last = Math.floor(((sector + sectors) * 512 - 1) / this.chunkSize);
        for (let c = first; c <= last; c++) if (c < this.pending.length) this.deferred.add(c);
      } else {
        this.addRange(sector, sectors);
      }
    }
  }

  /** The chunks the thaw wrote, handed to a flush that runs anyway (its frozen pass captures them). */
  takeDeferred(): number[] {
    const list = [...this.deferred];
    this.deferred.clear();
    return list;
  }

  /** Why the set since the last cut may be incomplete, or undefined. */
  private check(before: DeviceCounters, final = false): string | undefined {
    const dir = this.dir;
    const loop = this.loop;
    if (dir === undefined || loop === undefined) return 'tracking was not started';
    if (statSync(dir).ino !== this.instanceIno) return `the trace instance ${dir} was replaced`;
    const now = this.readSettings();
    for (const [file, value] of Object.entries(this.settings)) {
      if (now[file] !== value) return `the trace instance's ${file} changed ('${value}' → '${now[file] ?? ''}')`;
    }
    for (const [cpu, was] of this.loss) {
      const is = cpuLoss(dir, cpu);
      if (is.overrun !== was.overrun || is.commitOverrun !== was.commitOverrun || is.dropped !== was.dropped) {
        return `trace events lost on cpu${cpu} (overrun ${is.overrun - was.overrun}, commit overrun ${is.commitOverrun - was.commitOverrun}, dropped ${is.dropped - was.dropped})`;
      }
    }
    // Once unbound (the final check) the binding is gone on purpose and our fd closed.
    if (!final && loopSignature(loop) !== this.signature) return `the loop device's status changed (${loopSignature(loop)})`;
    if (!final && !countsIo(loop)) return `the block layer no longer counts ${loop.path}'s I/O (queue/iostats is off): its write counter cannot vouch for the trace`;
    const written = before.written - this.base.written;
    if (this.traced.written < written) return `traced writes fall short of the device's counter (${this.traced.written} < ${written} sectors)`;
    const discarded = before.discarded - this.base.discarded;
    if (this.traced.discarded < discarded) return `traced discards fall short of the device's counter (${this.traced.discarded} < ${discarded} sectors)`;
    return undefined;
  }

  /**
   * The capture point: every write completed so far is in the returned set, and the set starts
   * anew (writes completing from now on belong to the next cut). The device's counter is read
   * before the drain: a completion it counts was traced before it was counted.
   *
   * An idle cut reads nothing but the counters (quiet()); the full check — the instance's files,
   * the loss counters of every CPU, the loop's status, the trace itself — runs when they moved.
   * `counters`: the device's counters as the caller just read them (else read here).
   */
  cut(counters?: DeviceCounters): Cut {
    let reason: string | undefined;
    if (this.unavailable !== undefined) reason = this.unavailable;
    else if (!this.sealed) {
      try {
        if (this.loop === undefined) throw new VbdError('tracking was not started');
        const before = counters ?? deviceCounters(this.loop);
        if (this.quiet(before)) return { chunks: [], scanReason: undefined };
        this.collect();
        const problem = this.check(before);
        if (problem !== undefined) {
          this.once(`problem:${problem.replace(/[\d()]+/g, '')}`, { kind: 'tracking-fallback', reason: problem, scans: 'this flush' });
          reason = problem;
          this.rearm();
        } else {
          this.base = deviceCounters(this.loop);
          this.traced = { written: 0, discarded: 0 };
        }
      } catch (err) {
        reason = `tracking check failed: ${err instanceof Error ? err.message : String(err)}`;
        this.once('check', { kind: 'tracking-fallback', reason, scans: 'this flush' });
      }
    }
    const scanReason = this.scanReason ?? reason;
    this.scanReason = undefined;
    const chunks = this.pendingList;
    this.pendingList = [];
    for (const c of chunks) this.pending[c] = 0;
    // What completed between the drain above and the new base: counted in the base, so traced
    // now, into the next cut's set (see quiet()).
    if (!this.sealed) this.collectQuietly();
    return { chunks, scanReason };
  }

  /**
   * Whether nothing was written since the last cut, known from the device's counters alone
   * (`now`, read through the fd kept open) — then the trace is not read nor checked. Sound
   * because:
   *  - the block layer traces a request's completion (block_rq_complete) before it adds its
   *    sectors to the counters (blk_update_request), and counts every request that is not a
   *    read: writes, write-zeroes and flushes with data in `written`, discards in `discarded`,
   *    as long as the queue counts I/O at all (queue/iostats; the full check requires it);
   *  - the last full cut drained the trace again after it read `base` (cut()): every completion
   *    counted in `base` is in the set already. Counters equal to `base` and an empty set: no
   *    completion since, so nothing can be missing, lost or mis-attributed — an overrun, a
   *    changed filter or buffer, a rebound loop device can only hide writes, and there were
   *    none (a change of them stays visible in the files and counters the next full check
   *    compares with what was armed: nothing is re-armed here);
   *  - a completion traced but not yet counted is a write still in flight at the cut, which
   *    belongs to the next flush in any case.
   * The drain timer keeps collecting meanwhile: a write it found makes the next cut a full one,
   * whatever the counters say.
   */
  private quiet(now: DeviceCounters): boolean {
    return now.written === this.base.written && now.discarded === this.base.discarded && this.pendingList.length === 0 && this.scanReason === undefined && this.thaw === undefined;
  }

  /** After a problem: the instance set up as it should be again, and the counters taken anew. */
  private rearm(): void {
    const dir = this.dir;
    if (dir === undefined) return;
    try {
      for (const [file, value] of Object.entries(this.settings)) {
        if (readControl(dir, file) === value) continue;
        // buffer_size_kb reads back as "N" or "N (expanded: M)"; filters as written.
        writeControl(dir, file, file === 'buffer_size_kb' ? String(this.bufferKb ?? value) : value);
      }
      this.settings = this.readSettings();
      this.arm();
    } catch (err) {
      this.requireScan(`the trace instance could not be set up again: ${err instanceof Error ? err.message : String(err)}`, 'rearm');
    }
  }

  /** Puts chunks back into the set (a flush that failed keeps its set). */
  requeue(chunks: Iterable<number>): void {
    this.mark(chunks);
  }

  /**
   * The loop device is unbound (no write can reach the image through it any more): the last
   * events are read and checked; from now on the instance is not read (the number may be
   * reused by someone else's device).
   */
  seal(): void {
    if (!this.active || this.sealed) return;
    try {
      if (this.loop === undefined) return;
      const before = deviceCounters(this.loop);
      this.collect();
      const problem = this.check(before, true);
      if (problem !== undefined) this.requireScan(problem, `problem:${problem.replace(/[\d()]+/g, '')}`);
    } catch (err) {
      this.requireScan(`the final tracking check failed: ${err instanceof Error ? err.message : String(err)}`, 'seal');
    }
    this.sealed = true;
    this.stopReading();
  }

  private stopReading(): void {
    if (this.timer !== undefined) clearInterval(this.timer);
    this.timer = undefined;
  }

  /**
   * Stops reading and removes the instance (at teardown): resolves once the kernel has freed it
   * (removing an instance disables its events and frees its ring buffers; nothing to switch off
   * first).
   */
  async stop(): Promise<void> {
    this.stopReading();
    this.sealed = true;
    this.pipe?.close();
    this.pipe = undefined;
    const name = this.name;
    this.dir = undefined;
    this.name = undefined;
    if (name !== undefined) await removeInstance(name);
  }
}
