// `vbd-shadow start`: checks its options, opens the volume once, and runs the daemon here
// (foreground) or detached (waiting until it is live). Loaded only by `start`: the daemon's
// modules (koffi, chokidar, the flush engine) are no cost to the other commands.

import { spawn } from 'node:child_process';
import { closeSync, mkdirSync, openSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { BusyError, UsageError, VbdError } from '../common/errors.js';
import { parseDuration } from '../common/duration.js';
import { sleep } from '../common/fd.js';
import { formatSize, parseSize } from '../common/size.js';
import { parseMkfsType } from '../device/mkfs.js';
import { parseNbdAddress, type NbdListen } from '../device/nbd.js';
import { runDaemon, type CanaryMode } from '../daemon/daemon.js';
import { exitNow } from '../sys/libc.js';
import { createLog } from '../daemon/log.js';
import { daemonRunning, readStatusAt, requireRoot, runtimePaths, type DaemonStatus, type RuntimePaths } from '../daemon/runtime.js';
import { closeVolume, identityKey, isSealedVolume, openVolume, type AnyVolume } from '../volume/volume.js';
import { secretFor } from './key-input.js';

const LOG_DIR = '/var/log/vbd-shadow';

export interface StartOptions {
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

/** Opens a volume the daemon is to serve (read-write), plain or sealed. */
function openServedVolume(dir: string): AnyVolume {
  return openVolume(dir, { writable: true });
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

/** The start command: the daemon's exit status (a background start: 0 once the daemon is live). */
export async function startCommand(dir: string, o: StartOptions): Promise<number> {
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
  if (o.foreground !== true && canary === 'none') return await startBackground(volume, o);
  // The daemon tore everything down and wrote its last status and log line (synchronous
  // writes): Node's own teardown after that (joining the 64 libuv threads the flush's
  // parallel syncs use, disposing the heaps) would add 20–70 ms to every stop, for nothing.
  exitNow(await startForeground(volume, canary, o));
}
