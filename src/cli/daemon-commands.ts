// The commands that drive the root daemon: start, stop, status, recover, flush, agent.
// A volume is named by its directory (opened once, no symlinks) or by its name among the
// volumes the caller may see; either way, what root then touches is keyed by the owner's uid
// and the volume's identity, never by the name.

import { spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { runAgent } from '../agent/agent.js';
import { closePipe, openPipeForWriting, writeMessage } from '../agent/pipe.js';
import type { PipeMessage } from '../agent/protocol.js';
import { settleJournal } from '../flush/apply.js';
import { openJournal } from '../flush/journal.js';
import { isTmpfsMounted } from '../shadow/image.js';
import { Argument, Option, type Command } from 'commander';
import { sleep } from '../common/fd.js';
import { BusyError, NotFoundError, RefusedError, UsageError, VbdError, failure } from '../common/errors.js';
import { EXIT } from '../common/exit-codes.js';
import { parseDuration } from '../common/duration.js';
import { formatSize, parseSize } from '../common/size.js';
import { MKFS_TYPES, parseMkfsType } from '../device/mkfs.js';
import { parseNbdAddress, type NbdListen } from '../device/nbd.js';
import { requireRoot, runDaemon, type CanaryMode } from '../daemon/daemon.js';
import { createLog, priorityPrefix } from '../daemon/log.js';
import { createReporter } from '../daemon/events.js';
import { recoverLeftover } from '../daemon/recover.js';
import {
  acquireLock, checkRootOwnedPath, daemonRunning, findVolumeByName, isAlive, knownVolumes, readStatusAt, releaseLock, runtimePaths,
  type DaemonStatus, type RuntimePaths,
} from '../daemon/runtime.js';
import { MANIFEST_NAME } from '../volume/manifest.js';
import { closeVolume, identityKey, isPlainVolume, isSealedVolume, openVolume, type AnyVolume } from '../volume/volume.js';
import { checkNotStripped, openServedStore } from '../daemon/served-store.js';
import { secretFor } from './key-input.js';

const LOG_DIR = '/var/log/vbd-shadow';

interface StartOptions {
  canary?: string;
  mount?: string;
  mkfs?: string;
  rawAccess?: boolean;
  interval: string;
  maxDirty?: string;
  foreground?: boolean;
  keyFile?: string;
  keyStdin?: boolean;
  expectIdentity?: string;
  acceptRollback?: boolean;
  zeroDamaged?: boolean;
  nbd?: boolean;
  nbdTcp?: string;
  nbdTlsPsk?: string;
}

/** A volume named on the command line, as the caller may see it. */
interface Target {
  name: string;
  paths: RuntimePaths;
  /** Its status, if a daemon ever ran for it here. */
  status: DaemonStatus | undefined;
  /** Its agent brings a secret: a keyed layout's key or a sealed volume's passphrase. */
  needsSecret: boolean;
}

/** Opens a volume the daemon is to serve (read-write), plain or sealed. */
function openServedVolume(dir: string): AnyVolume {
  return openVolume(dir, { writable: true });
}

/**
 * A directory if it says so (a slash, `.`, `..`) or holds a manifest; else a volume name (a
 * directory called like the volume, e.g. its parent, must not shadow the name).
 */
function isDirectoryTarget(target: string): boolean {
  if (target.includes('/') || target === '.' || target === '..') return true;
  return existsSync(join(target, MANIFEST_NAME));
}

function resolveTarget(target: string): Target {
  if (isDirectoryTarget(target)) {
    const volume = openVolume(target);
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

async function readStdin(): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const part of process.stdin) parts.push(part as Buffer);
  return Buffer.concat(parts);
}

/**
 * --canary. `spawn` puts the owner's agent on this terminal, so only when the owner herself
 * ran sudo (her terminal); it is the default then, else `none`.
 */
function canaryMode(o: StartOptions, volume: AnyVolume): CanaryMode {
  const ownersTerminal = process.env['SUDO_UID'] === String(volume.owner.uid);
  const mode = o.canary ?? (process.stdin.isTTY && ownersTerminal ? 'spawn' : 'none');
  if (mode !== 'none' && mode !== 'spawn' && mode !== 'wait') throw new VbdError(`--canary must be none, spawn or wait, got '${mode}'`);
  if (mode === 'spawn' && !ownersTerminal) {
    throw new VbdError(`--canary spawn runs the owner's agent on this terminal, so only the owner (uid ${volume.owner.uid}) may use it through sudo; use --canary wait and let her start 'vbd-shadow agent'`);
  }
  return mode;
}

const DEFAULT_MAX_DIRTY = 256 * 2 ** 20;

/**
 * --max-dirty, by default 256 MiB; for a sealed volume at most half its free slots, so a flush
 * it triggers commits copy-on-write (more changed chunks than free slots go through the journal).
 */
function maxDirtyBytes(o: StartOptions, volume: AnyVolume): number {
  if (o.maxDirty !== undefined) return parseSize(o.maxDirty, '--max-dirty');
  if (!isSealedVolume(volume)) return DEFAULT_MAX_DIRTY;
  const half = Math.floor(volume.manifest.sealed.spareSlots / 2) * volume.manifest.chunkSize;
  return Math.max(volume.manifest.chunkSize, Math.min(DEFAULT_MAX_DIRTY, half));
}

function checkStartOptions(o: StartOptions): void {
  parseDuration(o.interval, '--interval');
  if (o.maxDirty !== undefined) parseSize(o.maxDirty, '--max-dirty');
  if (o.mkfs !== undefined) parseMkfsType(o.mkfs);
  if (o.canary === 'wait' && o.keyFile !== undefined) throw new UsageError('--key-file with --canary wait: the key comes from the owner\'s agent (its --key-file or ~/.config/vbd-shadow/NAME.key)');
  if (o.rawAccess === true && o.mount === undefined) throw new UsageError('--raw-access only matters with --mount (without it the owner always gets the device node)');
  nbdListen(o);
}

/**
 * --nbd (the owner-only Unix socket), --nbd-tcp HOST:PORT (only with --nbd-tls-psk FILE): where
 * the export listens, or undefined without one. Never with --mount: two writers on one device.
 */
function nbdListen(o: StartOptions): NbdListen | undefined {
  const wanted = o.nbd === true || o.nbdTcp !== undefined;
  if (!wanted) {
    if (o.nbdTlsPsk !== undefined) throw new UsageError('--nbd-tls-psk only goes with --nbd-tcp (the Unix socket of --nbd is owner-only)');
    return undefined;
  }
  if (o.mount !== undefined) throw new UsageError('--nbd and --mount together would make two writers of one device (a remote client\'s filesystem and the local mount); choose one');
  if (o.nbdTcp === undefined) {
    if (o.nbdTlsPsk !== undefined) throw new UsageError('--nbd-tls-psk only goes with --nbd-tcp (the Unix socket of --nbd is owner-only)');
    return { kind: 'unix' };
  }
  const { host, port } = parseNbdAddress(o.nbdTcp);
  if (o.nbdTlsPsk === undefined) throw new UsageError('--nbd-tcp without TLS would put the device on the network unauthenticated and in clear text; give --nbd-tls-psk FILE (a PSK file, see nbdkit-tls(1))');
  return { kind: 'tcp', host, port, tlsPsk: resolve(o.nbdTlsPsk) };
}

async function startForeground(volume: AnyVolume, canary: CanaryMode, o: StartOptions): Promise<number> {
  let secret: Buffer | undefined;
  try {
    if (o.expectIdentity !== undefined && identityKey(volume.identity) !== o.expectIdentity) {
      throw new VbdError(`${volume.dir} is not the volume the start command checked (it was replaced meanwhile)`);
    }
    // With an agent, the key comes from the agent (the owner), never through root's command line.
    secret = canary !== 'none' ? undefined : o.keyStdin === true ? await readStdin() : await secretFor(volume.manifest, o.keyFile);
  } catch (err) {
    closeVolume(volume);
    throw err;
  }
  try {
    return await runDaemon({
      volume, canary, agentArgs: o.keyFile !== undefined ? ['--key-file', o.keyFile] : [],
      mount: o.mount, mkfs: o.mkfs !== undefined ? parseMkfsType(o.mkfs) : undefined, rawAccess: o.rawAccess === true,
      intervalMs: parseDuration(o.interval, '--interval'), maxDirtyBytes: maxDirtyBytes(o, volume),
      acceptRollback: o.acceptRollback === true, zeroDamaged: o.zeroDamaged === true, nbd: nbdListen(o),
      secret: secret !== undefined && secret.length > 0 ? secret : undefined, log: createLog(volume.manifest.name),
    });
  } finally {
    secret?.fill(0);
  }
}

function describeLive(s: DaemonStatus): string {
  const mounted = s.mountpoint !== undefined ? `, mounted on ${s.mountpoint}` : '';
  const exported = s.nbd !== undefined ? `, exported over NBD on ${s.nbd.uri}` : '';
  return `volume '${s.name}' is live: ${s.link} -> ${s.device} (${formatSize(s.deviceSize)})${mounted}${exported}`;
}

/** /var/log/vbd-shadow/UID/NAME-DEV.INO.log: root's, keyed like the runtime state. */
function logPathOf(volume: AnyVolume): string {
  const dir = `${LOG_DIR}/${volume.identity.uid}`;
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  return `${dir}/${volume.manifest.name}-${volume.identity.dev}.${volume.identity.ino}.log`;
}

/** Starts the daemon detached (logging to /var/log/vbd-shadow/…) and waits until it is live. */
async function startBackground(volume: AnyVolume, o: StartOptions): Promise<number> {
  let secret: Buffer | undefined;
  let logPath: string;
  let paths: RuntimePaths;
  try {
    paths = runtimePaths(volume.identity);
    const current = readStatusAt(paths);
    if (current !== undefined && daemonRunning(current)) throw new BusyError(`volume '${current.name}' is already served by pid ${current.pid}`);
    secret = await secretFor(volume.manifest, o.keyFile);
    logPath = logPathOf(volume);
  } finally {
    closeVolume(volume);
  }
  const logFd = openSync(logPath, 'a', 0o600);
  const args = [process.argv[1] ?? '', 'start', volume.dir, '--foreground', '--canary', 'none', '--interval', o.interval, '--key-stdin', '--expect-identity', identityKey(volume.identity)];
  if (o.maxDirty !== undefined) args.push('--max-dirty', o.maxDirty);
  if (o.acceptRollback === true) args.push('--accept-rollback');
  if (o.zeroDamaged === true) args.push('--zero-damaged');
  if (o.mount !== undefined) args.push('--mount', o.mount);
  if (o.mkfs !== undefined) args.push('--mkfs', o.mkfs);
  if (o.rawAccess === true) args.push('--raw-access');
  if (o.nbd === true) args.push('--nbd');
  if (o.nbdTcp !== undefined) args.push('--nbd-tcp', o.nbdTcp);
  if (o.nbdTlsPsk !== undefined) args.push('--nbd-tls-psk', resolve(o.nbdTlsPsk));
  const child = spawn(process.execPath, args, { detached: true, stdio: ['pipe', logFd, logFd] });
  closeSync(logFd);
  child.stdin?.end(secret ?? Buffer.alloc(0));
  secret?.fill(0);
  let exited: number | null | undefined;
  child.on('exit', (code) => (exited = code));
  for (;;) {
    const s = readStatusAt(paths);
    if (s !== undefined && s.pid === child.pid && s.state === 'live') {
      child.unref();
      console.log(`${describeLive(s)}; daemon pid ${child.pid}, log ${logPath}`);
      return 0;
    }
    if (exited !== undefined) {
      const lines = readFileSync(logPath, 'utf8').trim().split('\n');
      const last = lines.reverse().find((l) => l.includes('vbd-shadow: ')) ?? lines[0] ?? '';
      throw new VbdError(`${last.replace(/^.*vbd-shadow: /, '')} (log: ${logPath})`);
    }
    await sleep(100);
  }
}

/** The daemon serving a volume named on the command line (`live`: with its device attached). */
function runningDaemon(target: string, need: 'running' | 'live'): { name: string; pid: number; paths: RuntimePaths } {
  const { name, paths, status } = resolveTarget(target);
  if (status === undefined || !daemonRunning(status) || (need === 'live' && status.state !== 'live')) throw new NotFoundError(`volume '${name}' is not live`);
  return { name, pid: status.pid, paths };
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

function printStatus(s: DaemonStatus): void {
  const alive = isAlive(s.pid) && s.state !== 'stopped' && s.state !== 'failed';
  console.log(`${s.name}: ${s.state}${alive ? ` (pid ${s.pid}, canary ${s.canary}, ${s.sessions} sessions)` : ''}`);
  console.log(`  volume   ${s.volumeDir} (${formatSize(s.deviceSize)}, ${s.sealedVolume === true ? 'sealed, ' : ''}${s.layout}, ${formatSize(s.chunkSize)} chunks)`);
  if (s.device !== undefined) console.log(`  device   ${s.link} -> ${s.device}`);
  if (s.mountpoint !== undefined) console.log(`  mounted  ${s.mountpoint}`);
  if (s.nbd !== undefined) console.log(`  nbd      ${s.nbd.uri} (nbdkit pid ${s.nbd.pid} as uid ${s.nbd.uid}${s.nbd.tls === 'psk' ? ', TLS with PSK required' : ', owner-only socket'})`);
  if (s.nbdError !== undefined) console.log(`  nbd      ENDED: ${s.nbdError}`);
  if (s.populateMs !== undefined) console.log(`  populate ${s.populateMs} ms`);
  if (s.tracking !== undefined) console.log(`  tracking ${s.tracking}`);
  if (s.scan !== undefined) console.log(`  scan     ${s.scan.threads} thread${s.scan.threads === 1 ? '' : 's'} for large scans${s.scan.off !== undefined ? ` (pool off: ${s.scan.off})` : ''}`);
  const f = s.lastFlush;
  if (f !== undefined) {
    console.log(`  flush    ${f.ok ? 'ok' : 'FAILED'} at ${f.at} (${f.reason}): ${f.chunksChanged} chunks, ${formatSize(f.bytesWritten)} in ${f.durationMs.toFixed(1)} ms${f.error !== undefined ? `: ${f.error}` : ''}`);
  }
  const sealed = s.sealed;
  if (sealed !== undefined) {
    console.log(`  sealed   epoch ${sealed.epoch}; ${sealed.seals} slots sealed under key generation ${sealed.keyGeneration} (re-key due at ${sealed.rekeyAt}); ${sealed.freeSlots} free slots`);
    const path = f?.sealed;
    if (path !== undefined) console.log(`  commit   epoch ${path.epoch}: ${path.inFreeSlots} chunks into free slots${path.throughJournal > 0 ? `, ${path.throughJournal} through the overflow journal (more changed chunks than free slots)` : ''}; ${formatSize(path.mapBytes)} of map`);
  }
  for (const notice of s.notices ?? []) console.log(`  notice   ${notice}`);
  if ((s.damagedChunks ?? []).length > 0) console.log(`  damaged  served as zeros: ${(s.damagedChunks ?? []).map((d) => `chunk ${d.chunk} ('${d.name}' at ${d.offset})`).join(', ')}`);
  if (s.flushFailures > 0) console.log(`  failures ${s.flushFailures} flushes failed since start`);
  if ((s.quarantinedLoops ?? []).length > 0) console.log(`  held     loop devices of earlier sessions still open: ${(s.quarantinedLoops ?? []).map((n) => `/dev/loop${n}`).join(', ')}`);
  if (s.error !== undefined) console.log(`  error    ${s.error}`);
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
      requireRoot('vbd-shadow start');
      checkStartOptions(o);
      const volume = openServedVolume(dir);
      let canary: CanaryMode;
      try {
        canary = canaryMode(o, volume);
      } catch (err) {
        closeVolume(volume);
        throw err;
      }
      process.exitCode = o.foreground === true || canary !== 'none' ? await startForeground(volume, canary, o) : await startBackground(volume, o);
    });

  program
    .command('stop')
    .description('tear a volume down: final writeback, unmount, detach, free the RAM, and end its daemon; waits until done (root or the owner)')
    .argument('<volume>', 'volume name or directory')
    .action(async (target: string) => {
      const { name, pid, paths } = runningDaemon(target, 'running');
      sendControl(name, paths, { kind: 'stop' });
      while (isAlive(pid)) await sleep(100);
      const s = readStatusAt(paths);
      if (s?.state !== 'stopped') throw new VbdError(`volume '${name}' did not stop cleanly: ${s?.error ?? 'see its log'}`);
      console.log(`volume '${name}' stopped: written back, detached, RAM freed`);
    });

  program
    .command('agent')
    .description('(the volume owner) the canary of a login session: the volume lives while this runs; logout or Ctrl-C writes everything back and frees the RAM')
    .argument('<volume>', 'volume directory or name')
    .option('--key-file <file>', `keyed layout: the secret; sealed volume: the passphrase (- = standard input; default ~/.config/vbd-shadow/NAME.key if present, else asked)`)
    .action(async (target: string, o: { keyFile?: string }) => {
      const { name, paths, needsSecret } = resolveTarget(target);
      const uid = process.getuid?.() ?? -1;
      if (!paths.dir.startsWith(`/run/vbd-shadow/${uid}/`)) throw new VbdError(`volume '${name}' is not yours: the agent runs as the volume owner`);
      process.exitCode = await runAgent({ name, paths, needsSecret, keyFile: o.keyFile, say: (line) => console.log(line) });
    });

  program
    .command('status')
    .description('show live volumes (or one), for people or with --json for scripts')
    .argument('[volume]', 'volume name or directory')
    .option('--json', 'print JSON')
    .action((target: string | undefined, o: { json?: boolean }) => {
      const one = target !== undefined ? resolveTarget(target) : undefined;
      if (one !== undefined && one.status === undefined) throw new VbdError(`volume '${one.name}' has never been started here`);
      const all = one?.status !== undefined ? [one.status] : knownVolumes().map((v) => v.status);
      if (o.json === true) console.log(JSON.stringify(target !== undefined ? all[0] : all, null, 2));
      else if (all.length === 0) console.log('no volumes');
      else all.forEach(printStatus);
    });

  program
    .command('recover')
    .description('after a crash: settle an interrupted flush (plain: its journal; sealed: complete an interrupted commit, check every map copy), and (root) write a leftover RAM image back into the files')
    .argument('<dir>', 'volume directory')
    .option('--key-file <file>', 'keyed layout: the secret (only needed for a leftover RAM image); sealed volume: the passphrase (- = standard input)')
    .option('--accept-rollback', 'sealed: accept files that decode to an older epoch than this machine committed (and a plain manifest where a sealed volume was)')
    .action(async (dir: string, o: { keyFile?: string; acceptRollback?: boolean }) => {
      const volume = openServedVolume(dir);
      const { name } = volume.manifest;
      const paths = runtimePaths(volume.identity);
      // recover runs in the foreground: the events go to the terminal, one line each.
      const say = createReporter((line) => console.log(line));
      let secret: Buffer | undefined;
      let journalFd: number | undefined;
      try {
        const current = readStatusAt(paths);
        if (current !== undefined && daemonRunning(current)) throw new BusyError(`volume '${name}' is live (pid ${current.pid}); stop it first`);
        let settled = 'empty';
        checkNotStripped({ volume, report: say, setStatus: () => undefined }, o.acceptRollback === true, process.geteuid?.() === 0);
        if (isPlainVolume(volume)) {
          journalFd = openJournal(volume);
          settled = await settleJournal(volume, journalFd, say);
        }
        const leftover = isTmpfsMounted(paths.shadow);
        if (!leftover && !isSealedVolume(volume)) {
          console.log(`volume '${name}': ${settled === 'empty' ? 'nothing to recover' : 'journal settled'}; no RAM image left behind`);
          return;
        }
        if (leftover) requireRoot('vbd-shadow recover (of a leftover RAM image)');
        secret = await secretFor(volume.manifest, o.keyFile);
        const lock = leftover ? acquireLock(paths, name) : undefined;
        try {
          // Root keeps the record of a sealed volume's epochs; the owner's recover checks against it.
          const served = await openServedStore({ volume, report: say, setStatus: () => undefined }, secret, o.acceptRollback === true, leftover);
          try {
            if (!leftover) {
              console.log(`volume '${name}': sealed, epoch ${served.store.epoch}${served.store.notices.length === 0 ? ', every map copy authentic' : ''}; no RAM image left behind`);
              return;
            }
            const { epochs, store } = served;
            await recoverLeftover(paths, volume, store, journalFd, say, {
              beforeCommit: () => epochs?.beforeCommit(),
              afterCommit: () => epochs?.committed(),
            });
            console.log(`volume '${name}' recovered into the files`);
          } finally {
            served.store.close();
          }
        } finally {
          if (lock !== undefined) releaseLock(lock);
        }
      } finally {
        if (journalFd !== undefined) closeSync(journalFd);
        secret?.fill(0);
        closeVolume(volume);
      }
    });

  program
    .command('flush')
    .description('write back what changed now, and wait for the result (root or the owner)')
    .argument('<volume>', 'volume name or directory')
    .action(async (target: string) => {
      const { name, pid, paths } = runningDaemon(target, 'live');
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
  for (;;) {
    await sleep(20);
    const s = readStatusAt(paths);
    if (s === undefined || !isAlive(pid)) throw new VbdError(`volume '${name}' went away during the flush`);
    if (s.lastCheck !== undefined && s.lastCheck.at >= requested) {
      if (!s.lastCheck.ok) throw new VbdError(`flush of '${name}' failed: ${s.lastFlush?.error ?? 'see the log'}`);
      const f = s.lastFlush;
      return s.lastCheck.idle || f === undefined || f.at !== s.lastCheck.at
        ? `volume '${name}': nothing written since the last flush`
        : `volume '${name}' flushed: ${f.chunksChanged} chunks, ${formatSize(f.bytesWritten)} in ${f.durationMs.toFixed(1)} ms`;
    }
  }
}
