// The commands that drive the root daemon: start, stop, status, recover, flush, agent.
// A volume is named by its directory (opened once, no symlinks) or by its name among the
// volumes the caller may see; either way, what root then touches is keyed by the owner's uid
// and the volume's identity, never by the name.

import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { Argument, Option, type Command } from 'commander';
import { closePipe, openPipeForWriting, writeMessage } from '../agent/pipe-writer.js';
import type { PipeMessage } from '../agent/protocol.js';
import { sleep } from '../common/fd.js';
import { NotFoundError, RefusedError, VbdError, failure } from '../common/errors.js';
import { escapeText } from '../common/escape.js';
import { EXIT } from '../common/exit-codes.js';
import { formatSize } from '../common/size.js';
import { MKFS_TYPES } from '../device/mkfs.js';
import { priorityPrefix } from '../daemon/log.js';
import {
  checkRootOwnedPath, daemonRunning, endedLongAgo, findVolumeByName, isAlive, knownVolumes, loopsOf, presenceOf, readStatusAt, runtimePaths,
  type DaemonStatus, type KnownVolume, type RuntimePaths,
} from '../daemon/runtime.js';
import { isTmpfsMounted } from '../shadow/tmpfs.js';
import { MANIFEST_NAME } from '../volume/names.js';
import type { RecoverOptions } from './recover-command.js';
import type { StartOptions } from './start-command.js';
import { shown as shownViews, statusJson, statusLines, type StatusView } from './status-view.js';
import { directoryOfUnit } from '../common/unit-name.js';
import { UNNAMED_HOLDER } from '../daemon/events.js';

// What a command needs beyond this file is imported when it runs (`await import(…)`): `status`,
// `flush` and `stop` by name load neither koffi, chokidar nor the daemon and flush engine
// (test/cli/startup-modules.test.ts; docs/BENCHMARKS.md, "CLI start-up").

/** A volume named on the command line, as the caller may see it. */
interface Target {
  name: string;
  paths: RuntimePaths;
  /** Its status, if a daemon ever ran for it here. */
  status: DaemonStatus | undefined;
  /** Its agent brings a secret: a keyed layout's key or a sealed volume's passphrase. */
  needsSecret: boolean;
}

/**
 * A directory if it says so (a slash, `.`, `..`) or holds a manifest; else a volume name (a
 * directory called like the volume, e.g. its parent, must not shadow the name).
 */
function isDirectoryTarget(target: string): boolean {
  if (target.includes('/') || target === '.' || target === '..') return true;
  return existsSync(join(target, MANIFEST_NAME));
}

/**
 * A volume on the command line: a directory, a unit name (`vbd-shadow@INSTANCE.service`, or the
 * agent's: the directory systemd-escaped, src/common/unit-name.ts), or a name among the caller's.
 */
async function resolveTarget(target: string): Promise<Target> {
  const dir = directoryOfUnit(target) ?? (isDirectoryTarget(target) ? target : undefined);
  if (dir !== undefined) {
    const { closeVolume, isSealedVolume, openVolume } = await import('../volume/volume.js');
    const volume = openVolume(dir);
    try {
      const paths = runtimePaths(volume.identity);
      return { name: volume.manifest.name, paths, status: readStatusAt(paths), needsSecret: isSealedVolume(volume) || volume.manifest.layout.kind === 'keyed' };
    } finally {
      closeVolume(volume);
    }
  }
  const found = findVolumeByName(target);
  return { name: found.status.name, paths: found.paths, status: found.status, needsSecret: found.status.sealedVolume === true || found.status.layout === 'keyed' };
}

/** The daemon serving a volume named on the command line (`live`: with its device attached). */
async function runningDaemon(target: string, need: 'running' | 'live'): Promise<{ name: string; pid: number; paths: RuntimePaths }> {
  const { name, paths, status } = await resolveTarget(target);
  if (status === undefined || !daemonRunning(status) || (need === 'live' && status.state !== 'live')) throw new NotFoundError(`volume '${name}' is not live`);
  return { name, pid: status.pid, paths };
}

/** How often, at most, a command that waits says again what it waits for. */
const WAIT_REPORT_MS = 5000;

/**
 * Says on stderr what the daemon's teardown waits for (status.waitingFor: a busy mount and who
 * holds it) when first seen, then at most every WAIT_REPORT_MS while it lasts; nothing while
 * the daemon waits for nothing.
 */
class WaitReporter {
  private saidAt = -Infinity;

  constructor(private readonly name: string) {}

  check(s: DaemonStatus | undefined): void {
    const w = s?.waitingFor;
    const now = Date.now();
    if (w === undefined || now - this.saidAt < WAIT_REPORT_MS) return;
    this.saidAt = now;
    const seconds = Math.max(0, Math.round((now - Date.parse(w.since)) / 1000));
    const who = w.holders.length > 0 ? w.holders.join(', ') : UNNAMED_HOLDER;
    process.stderr.write(`vbd-shadow: waiting ${seconds} s for ${escapeText(w.path)} to be unmounted (volume '${escapeText(this.name)}'): it is busy, held by ${escapeText(who)}; the files are kept current meanwhile\n`);
  }
}

/** Sends one message on the daemon's control pipe (the owner and root may open it). */
function sendControl(name: string, paths: RuntimePaths, message: PipeMessage): void {
  const path = paths.controlFifo;
  let fd: number;
  try {
    checkRootOwnedPath(paths.dir);
    fd = openPipeForWriting(path);
  } catch (err) {
    throw failure(`cannot reach the daemon of '${name}' through ${path}`, err);
  }
  try {
    writeMessage(fd, message, 10_000);
  } finally {
    closePipe(fd);
  }
}

/** An entry as `status` shows it: its last status and what of it is still there. */
function viewOf(v: KnownVolume): StatusView {
  return { status: v.status, presence: presenceOf(v), boundLoops: loopsOf(v), imageKept: isTmpfsMounted(v.paths.shadow) };
}

/**
 * Every entry the caller may see, less those that ended (daemon gone, nothing left behind) more
 * than ENDED_KEPT_MS ago: root removes them (under their lock, lock.ts), others just skip them.
 */
async function currentViews(): Promise<StatusView[]> {
  const views: StatusView[] = [];
  for (const v of knownVolumes()) {
    const view = viewOf(v);
    if (view.presence === 'ended' && endedLongAgo(v)) {
      if (process.geteuid?.() === 0) await pruneQuietly(v);
      continue;
    }
    views.push(view);
  }
  return views;
}

/** Prunes one ended entry; a failure to remove it is no reason for `status` to fail. */
async function pruneQuietly(v: KnownVolume): Promise<void> {
  try {
    const { pruneEnded } = await import('../daemon/lock.js');
    pruneEnded(v);
  } catch (err) {
    process.stderr.write(`vbd-shadow: warning: cannot remove the runtime directory ${v.paths.dir} of ended volume '${v.status.name}': ${err instanceof Error ? err.message : String(err)}\n`);
  }
}

export function registerDaemonCommands(program: Command): void {
  program
    .command('start')
    .description('(root) serve a volume: RAM image, a loop device of its own (/dev/vbd-shadow/USER/NAME), optional mkfs and mount on a directory the owner owns')
    .argument('<dir>', 'volume directory')
    .option('--mount <dir>', 'mount the device here (nosuid,nodev), for the volume owner')
    .addOption(new Option('--mkfs <type>', 'format on first use (only a never-written, all-zero device)').choices(MKFS_TYPES))
    .option('--raw-access', 'with --mount: give the owner the raw device node too (she could then rewrite the mounted filesystem under the kernel; see SECURITY.md)')
    .option('--interval <duration>', 'periodic writeback interval', '30s')
    .option('--max-dirty <size>', 'flush early once this much was written since the last flush (bounds what a crash can lose); default 256M, for a sealed volume at most half its free slots')
    .addOption(new Option('--canary <mode>', 'what ends a session: spawn = start the owner\'s agent here and serve while it lives (default on a terminal under sudo); wait = wait for the owner\'s agent, serve while it lives, then wait again (the systemd unit); none = the daemon\'s own lifetime (default otherwise)').choices(['spawn', 'wait', 'none']))
    .option('--foreground', 'stay in the foreground and log to stdout (Ctrl-C / SIGTERM tears down); implied by --canary spawn|wait')
    .option('--key-file <file>', 'keyed layout: the secret; sealed volume: the passphrase (- = standard input; else asked on the terminal)')
    .option('--accept-rollback', 'sealed: serve files that decode to an older epoch than this machine committed (a volume moved between machines, or restored from a backup on purpose); also a plain manifest where a sealed volume was')
    .option('--zero-damaged', 'sealed: serve the volume even though some slots fail authentication, with those chunks zeroed (listed in the log and status; the next flush seals them anew)')
    .option('--nbd', 'export the device over NBD with nbdkit, as the owner, on an owner-only Unix socket in the runtime directory (its URI is in status); not with --mount')
    .option('--nbd-tcp <host:port>', 'export over TCP on this IP address and port instead (implies --nbd; only with --nbd-tls-psk)')
    .option('--nbd-tls-psk <file>', 'with --nbd-tcp: require TLS with the pre-shared keys in FILE (nbdkit --tls-psk format, read by nbdkit as the owner)')
    .option('--options-file <file>', 'more arguments, one per line exactly as a word of the command line (no quoting: a path with spaces is one line; # comments); -FILE: none if FILE does not exist (the unit passes -/etc/vbd-shadow/INSTANCE.options); root\'s, writable by nobody else')
    .addOption(new Option('--key-stdin', 'read the secret from stdin (used by the background start)').hideHelp())
    .addOption(new Option('--expect-identity <key>', 'refuse unless the directory is still this volume (used by the background start)').hideHelp())
    .action(async (dir: string, o: StartOptions) => {
      process.exitCode = await (await import('./start-command.js')).startCommand(dir, o);
    });

  program
    .command('stop')
    .description('tear a volume down: final writeback, unmount, detach, free the RAM, and end its daemon; waits until done (root or the owner)')
    .argument('<volume>', 'volume name, directory, or its unit vbd-shadow@INSTANCE.service')
    .action(async (target: string) => {
      const { name, pid, paths } = await runningDaemon(target, 'running');
      sendControl(name, paths, { kind: 'stop' });
      const waiting = new WaitReporter(name);
      while (isAlive(pid)) {
        waiting.check(readStatusAt(paths));
        await sleep(100);
      }
      const s = readStatusAt(paths);
      if (s?.state !== 'stopped') throw new VbdError(`volume '${name}' did not stop cleanly: ${s?.error ?? 'see its log'}`);
      console.log(`volume '${name}' stopped: written back, detached, RAM freed`);
    });

  program
    .command('agent')
    .description('(the volume owner) the canary of a login session: the volume lives while this runs; logout or Ctrl-C writes everything back and frees the RAM')
    .argument('<volume>', 'volume directory, name, or its unit vbd-shadow-agent@INSTANCE.service')
    .option('--key-file <file>', `keyed layout: the secret; sealed volume: the passphrase (- = standard input; default ~/.config/vbd-shadow/NAME.key if present, else asked)`)
    .action(async (target: string, o: { keyFile?: string }) => {
      const { name, paths, needsSecret } = await resolveTarget(target);
      const uid = process.getuid?.() ?? -1;
      if (!paths.dir.startsWith(`/run/vbd-shadow/${uid}/`)) throw new VbdError(`volume '${name}' is not yours: the agent runs as the volume owner`);
      const { runAgent } = await import('../agent/agent.js');
      process.exitCode = await runAgent({ name, paths, needsSecret, keyFile: o.keyFile, say: (line) => console.log(line) });
    });

  program
    .command('status')
    .description('show the volumes whose daemon runs (or the one named), for people or with --json for scripts')
    .argument('[volume]', 'volume name, directory, or its unit vbd-shadow@INSTANCE.service')
    .option('--all', 'also volumes whose daemon has gone: those that left their RAM image or a loop device behind, and those that ended less than a minute ago')
    .option('--json', 'print a JSON array, one object of one shape per volume')
    .action(async (target: string | undefined, o: { all?: boolean; json?: boolean }) => {
      let views: StatusView[];
      let hidden = 0;
      if (target !== undefined) {
        const one = await resolveTarget(target);
        if (one.status === undefined) throw new VbdError(`volume '${one.name}' has never been started here`);
        views = [viewOf({ paths: one.paths, status: one.status })];
      } else {
        const all = await currentViews();
        views = shownViews(all, o.all === true);
        hidden = all.length - views.length;
      }
      if (o.json === true) console.log(JSON.stringify(views.map(statusJson), null, 2));
      else if (views.length === 0) console.log(`no live volumes${hidden > 0 ? ` (${hidden} whose daemon has gone: --all shows ${hidden === 1 ? 'it' : 'them'})` : ''}`);
      else for (const view of views) console.log(statusLines(view).join('\n'));
    });

  program
    .command('recover')
    .description('after a crash: settle an interrupted flush (plain: its journal; sealed: complete an interrupted commit, check every map copy), and (root) write a leftover RAM image back into the files')
    .argument('<dir>', 'volume directory')
    .option('--key-file <file>', 'keyed layout: the secret (only needed for a leftover RAM image); sealed volume: the passphrase (- = standard input)')
    .option('--accept-rollback', 'sealed: accept files that decode to an older epoch than this machine committed (and a plain manifest where a sealed volume was)')
    .action(async (dir: string, o: RecoverOptions) => {
      await (await import('./recover-command.js')).recoverCommand(dir, o);
    });

  program
    .command('flush')
    .description('write back what changed now, and wait for the result (root or the owner)')
    .argument('<volume>', 'volume name, directory, or its unit vbd-shadow@INSTANCE.service')
    .action(async (target: string) => {
      const { name, pid, paths } = await runningDaemon(target, 'live');
      console.log(await flushAndWait(name, pid, paths));
    });

  program
    .command('sleep-hook')
    .description('(root, the sleep units) before suspend: flush every live volume and wait for each; before hibernation: refuse while a sealed volume is live, else the same')
    .addArgument(new Argument('<kind>', 'what the system is about to do').choices(SLEEP_KINDS))
    .action(async (kind: string) => {
      process.exitCode = await sleepHook(kind);
    });
}

const SLEEP_KINDS = ['suspend', 'hibernate', 'hybrid-sleep', 'suspend-then-hibernate'];

/** States in which a daemon holds a session's RAM image (and a sealed volume's keys). */
const HOLDS_IMAGE: readonly DaemonStatus['state'][] = ['recovering', 'populating', 'live', 'stopping'];

/**
 * Before sleep: every live volume flushed, in parallel, each awaited; 0 if all succeeded, else
 * 1 (each failure printed to stderr). Before hibernation (`kind` other than suspend) first
 * refuses while a sealed volume holds its image: hibernation writes all RAM — the plaintext
 * image and the keys — to the swap device.
 */
async function sleepHook(kind: string): Promise<number> {
  const running = knownVolumes().filter((v) => daemonRunning(v.status));
  const label = (s: DaemonStatus): string => `'${s.name}' (uid ${s.owner.uid}, ${s.volumeDir})`;
  if (kind !== 'suspend') {
    const sealed = running.filter((v) => v.status.sealedVolume === true && HOLDS_IMAGE.includes(v.status.state));
    if (sealed.length > 0) {
      throw new RefusedError(`${kind} refused: sealed volume${sealed.length === 1 ? '' : 's'} ${sealed.map((v) => label(v.status)).join(', ')} ${sealed.length === 1 ? 'is' : 'are'} live, and hibernation would write the plaintext RAM image and its keys to the swap device; stop ${sealed.length === 1 ? 'it' : 'them'} first (log out, or vbd-shadow stop)`);
    }
  }
  const live = running.filter((v) => v.status.state === 'live');
  if (live.length === 0) {
    console.log(`${kind}: no live volumes`);
    return EXIT.ok;
  }
  const results = await Promise.allSettled(live.map((v) => flushAndWait(v.status.name, v.status.pid, v.paths)));
  let failed = 0;
  results.forEach((r, i) => {
    const s = live[i]?.status;
    if (r.status === 'fulfilled') console.log(r.value);
    else {
      failed++;
      process.stderr.write(`${priorityPrefix(2, 'err')}vbd-shadow: ${kind}: volume ${s === undefined ? '?' : label(s)}: ${r.reason instanceof Error ? r.reason.message : String(r.reason)}\n`);
    }
  });
  if (failed > 0) {
    process.stderr.write(`${priorityPrefix(2, 'err')}vbd-shadow: ${kind}: ${failed} of ${live.length} flushes failed; the data stays in RAM\n`);
    return EXIT.failed;
  }
  return EXIT.ok;
}

/** Asks the daemon for a flush and waits for its result; returns the line to print, throws if it failed. */
async function flushAndWait(name: string, pid: number, paths: RuntimePaths): Promise<string> {
  const requested = new Date().toISOString();
  sendControl(name, paths, { kind: 'flush' });
  const waiting = new WaitReporter(name);
  for (;;) {
    // An idle check answers within a millisecond or two: a short poll keeps `flush` near Node's own start-up.
    await sleep(5);
    const s = readStatusAt(paths);
    if (s === undefined || !isAlive(pid)) throw new VbdError(`volume '${name}' went away during the flush`);
    waiting.check(s);
    if (s.lastCheck !== undefined && s.lastCheck.at >= requested) {
      if (!s.lastCheck.ok) throw new VbdError(`flush of '${name}' failed: ${s.lastFlush?.error ?? 'see the log'}`);
      const f = s.lastFlush;
      return s.lastCheck.idle || f === undefined || f.at !== s.lastCheck.at
        ? `volume '${name}': nothing written since the last flush`
        : `volume '${name}' flushed: ${f.chunksChanged} chunks, ${formatSize(f.bytesWritten)} in ${f.durationMs.toFixed(1)} ms`;
    }
  }
}
