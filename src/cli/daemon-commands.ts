// The commands that drive the root daemon: start, stop, status, recover.

import { spawn } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, writeSync } from 'node:fs';
import { runAgent } from '../agent/agent.js';
import { closePipe, openPipeForWriting } from '../agent/pipe.js';
import { encodeMessage, type PipeMessage } from '../agent/protocol.js';
import { settleJournal } from '../flush/apply.js';
import { openJournal } from '../flush/journal.js';
import { isTmpfsMounted } from '../shadow/image.js';
import { Option, type Command } from 'commander';
import { sleep } from '../common/fd.js';
import { VbdError, failure } from '../common/errors.js';
import { parseDuration } from '../common/duration.js';
import { formatSize, parseSize } from '../common/size.js';
import { controlPipePath, requireRoot, runDaemon, type CanaryMode } from '../daemon/daemon.js';
import { createLog } from '../daemon/log.js';
import { recoverLeftover } from '../daemon/recover.js';
import { acquireLock, isAlive, knownVolumes, lockHolder, readStatus, releaseLock, runtimePaths, type DaemonStatus } from '../daemon/runtime.js';
import { resolvePlacement } from '../layouts/index.js';
import { MANIFEST_NAME } from '../volume/manifest.js';
import { closeVolume, loadVolume } from '../volume/volume.js';
import { secretFor } from './key-input.js';

const LOG_DIR = '/var/log/vbd-shadow';

interface StartOptions {
  canary?: string;
  mount?: string;
  mkfs?: string;
  interval: string;
  maxDirty: string;
  foreground?: boolean;
  keyFile?: string;
  keyStdin?: boolean;
}

/** A volume named on the command line: its directory (holding a manifest) or its name. */
export function volumeName(target: string): string {
  if (existsSync(`${target}/${MANIFEST_NAME}`)) {
    const volume = loadVolume(target);
    closeVolume(volume);
    return volume.manifest.name;
  }
  if (target.includes('/')) throw new VbdError(`${target} holds no volume (no ${MANIFEST_NAME})`);
  return target;
}

async function readStdin(): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const part of process.stdin) parts.push(part as Buffer);
  return Buffer.concat(parts);
}

/** --canary, defaulting to the owner's agent on a terminal under sudo, else none. */
function canaryMode(o: StartOptions): CanaryMode {
  const mode = o.canary ?? (process.stdin.isTTY && process.env['SUDO_UID'] !== undefined ? 'spawn' : 'none');
  if (mode !== 'none' && mode !== 'spawn' && mode !== 'wait') throw new VbdError(`--canary must be none, spawn or wait, got '${mode}'`);
  return mode;
}

async function startForeground(dir: string, o: StartOptions): Promise<number> {
  const volume = loadVolume(dir);
  closeVolume(volume);
  const canary = canaryMode(o);
  // With an agent, the key comes from the agent (the owner), never through root's command line.
  const secret = canary !== 'none' ? undefined : o.keyStdin === true ? await readStdin() : await secretFor(volume.manifest, o.keyFile);
  try {
    return await runDaemon({
      dir, canary, agentArgs: o.keyFile !== undefined ? ['--key-file', o.keyFile] : [],
      mount: o.mount, mkfs: o.mkfs, intervalMs: parseDuration(o.interval, '--interval'), maxDirtyBytes: parseSize(o.maxDirty, '--max-dirty'),
      secret: secret !== undefined && secret.length > 0 ? secret : undefined, log: createLog(volume.manifest.name),
    });
  } finally {
    secret?.fill(0);
  }
}

function describeLive(s: DaemonStatus): string {
  const mounted = s.mountpoint !== undefined ? `, mounted on ${s.mountpoint}` : '';
  return `volume '${s.name}' is live: ${s.link} -> ${s.device} (${formatSize(s.deviceSize)})${mounted}`;
}

/** Starts the daemon detached (logging to /var/log/vbd-shadow/NAME.log) and waits until it is live. */
async function startBackground(dir: string, o: StartOptions): Promise<number> {
  requireRoot('vbd-shadow start');
  const volume = loadVolume(dir);
  closeVolume(volume);
  const name = volume.manifest.name;
  const holder = lockHolder(name);
  if (holder !== undefined) throw new VbdError(`volume '${name}' is already served by pid ${holder}`);
  parseDuration(o.interval, '--interval');
  parseSize(o.maxDirty, '--max-dirty');
  const secret = await secretFor(volume.manifest, o.keyFile);
  mkdirSync(LOG_DIR, { recursive: true, mode: 0o700 });
  const logPath = `${LOG_DIR}/${name}.log`;
  const logFd = openSync(logPath, 'a', 0o600);
  const args = [process.argv[1] ?? '', 'start', dir, '--foreground', '--canary', 'none', '--interval', o.interval, '--max-dirty', o.maxDirty, '--key-stdin'];
  if (o.mount !== undefined) args.push('--mount', o.mount);
  if (o.mkfs !== undefined) args.push('--mkfs', o.mkfs);
  const child = spawn(process.execPath, args, { detached: true, stdio: ['pipe', logFd, logFd] });
  closeSync(logFd);
  child.stdin?.end(secret ?? Buffer.alloc(0));
  secret?.fill(0);
  let exited: number | null | undefined;
  child.on('exit', (code) => (exited = code));
  for (;;) {
    const s = readStatus(name);
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
function runningDaemon(target: string, need: 'running' | 'live'): { name: string; pid: number } {
  const name = volumeName(target);
  const pid = lockHolder(name);
  if (pid === undefined || (need === 'live' && readStatus(name)?.state !== 'live')) throw new VbdError(`volume '${name}' is not live`);
  return { name, pid };
}

/** Sends one message on the daemon's control pipe (the owner and root may open it). */
function sendControl(name: string, message: PipeMessage): void {
  const path = controlPipePath(runtimePaths(name));
  let fd: number;
  try {
    fd = openPipeForWriting(path);
  } catch (err) {
    throw failure(`cannot reach the daemon of '${name}' through ${path}`, err);
  }
  try {
    writeSync(fd, encodeMessage(message));
  } finally {
    closePipe(fd);
  }
}

function printStatus(s: DaemonStatus): void {
  const alive = isAlive(s.pid) && s.state !== 'stopped' && s.state !== 'failed';
  console.log(`${s.name}: ${s.state}${alive ? ` (pid ${s.pid}, canary ${s.canary}, ${s.sessions} sessions)` : ''}`);
  console.log(`  volume   ${s.volumeDir} (${formatSize(s.deviceSize)}, ${s.layout}, ${formatSize(s.chunkSize)} chunks)`);
  if (s.device !== undefined) console.log(`  device   ${s.link} -> ${s.device}`);
  if (s.mountpoint !== undefined) console.log(`  mounted  ${s.mountpoint}`);
  if (s.populateMs !== undefined) console.log(`  populate ${s.populateMs} ms`);
  const f = s.lastFlush;
  if (f !== undefined) {
    console.log(`  flush    ${f.ok ? 'ok' : 'FAILED'} at ${f.at} (${f.reason}): ${f.chunksChanged} chunks, ${formatSize(f.bytesWritten)} in ${f.durationMs.toFixed(1)} ms${f.error !== undefined ? `: ${f.error}` : ''}`);
  }
  if (s.flushFailures > 0) console.log(`  failures ${s.flushFailures} flushes failed since start`);
  if (s.error !== undefined) console.log(`  error    ${s.error}`);
}

export function registerDaemonCommands(program: Command): void {
  program
    .command('start')
    .description('(root) serve a volume: RAM image, loop device /dev/vbd-shadow/NAME, optional mkfs and mount')
    .argument('<dir>', 'volume directory')
    .option('--mount <dir>', 'mount the device here (nosuid,nodev), for the volume owner')
    .option('--mkfs <type>', 'format on first use (only a never-written, all-zero device): ext4, xfs, ...')
    .option('--interval <duration>', 'periodic writeback interval', '30s')
    .option('--max-dirty <size>', 'flush early once this much was written since the last flush (bounds what a crash can lose)', '256M')
    .option('--canary <mode>', 'what ends a session: spawn = start the owner\'s agent here and serve while it lives (default on a terminal under sudo); wait = wait for the owner\'s agent, serve while it lives, then wait again (the systemd unit); none = the daemon\'s own lifetime (default otherwise)')
    .option('--foreground', 'stay in the foreground and log to stdout (Ctrl-C / SIGTERM tears down); implied by --canary spawn|wait')
    .option('--key-file <file>', 'keyed layout: the secret (else asked on the terminal)')
    .addOption(new Option('--key-stdin', 'read the secret from stdin (used by the background start)').hideHelp())
    .action(async (dir: string, o: StartOptions) => {
      const foreground = o.foreground === true || canaryMode(o) !== 'none';
      process.exitCode = foreground ? await startForeground(dir, o) : await startBackground(dir, o);
    });

  program
    .command('stop')
    .description('tear a volume down: final writeback, unmount, detach, free the RAM, and end its daemon; waits until done (root or the owner)')
    .argument('<volume>', 'volume name or directory')
    .action(async (target: string) => {
      const { name, pid } = runningDaemon(target, 'running');
      sendControl(name, { kind: 'stop' });
      while (isAlive(pid)) await sleep(100);
      const s = readStatus(name);
      if (s?.state !== 'stopped') throw new VbdError(`volume '${name}' did not stop cleanly: ${s?.error ?? 'see its log'}`);
      console.log(`volume '${name}' stopped: written back, detached, RAM freed`);
    });

  program
    .command('agent')
    .description('(the volume owner) the canary of a login session: the volume lives while this runs; logout or Ctrl-C writes everything back and frees the RAM')
    .argument('<volume>', 'volume directory or name')
    .option('--key-file <file>', `keyed layout: the secret (default ~/.config/vbd-shadow/NAME.key if present, else asked)`)
    .action(async (target: string, o: { keyFile?: string }) => {
      let name = target;
      let keyed: boolean;
      if (existsSync(`${target}/${MANIFEST_NAME}`)) {
        const volume = loadVolume(target);
        closeVolume(volume);
        name = volume.manifest.name;
        keyed = volume.manifest.layout.kind === 'keyed';
      } else {
        const s = readStatus(volumeName(target));
        if (s === undefined) throw new VbdError(`no volume '${target}' here (give its directory)`);
        keyed = s.layout === 'keyed';
      }
      process.exitCode = await runAgent({ name, keyed, keyFile: o.keyFile, say: (line) => console.log(line) });
    });

  program
    .command('status')
    .description('show live volumes (or one), for people or with --json for scripts')
    .argument('[volume]', 'volume name or directory')
    .option('--json', 'print JSON')
    .action((target: string | undefined, o: { json?: boolean }) => {
      const names = target !== undefined ? [volumeName(target)] : knownVolumes();
      const all = names.map((n) => readStatus(n)).filter((s): s is DaemonStatus => s !== undefined);
      if (target !== undefined && all.length === 0) throw new VbdError(`volume '${names[0]}' has never been started here`);
      if (o.json === true) console.log(JSON.stringify(target !== undefined ? all[0] : all, null, 2));
      else if (all.length === 0) console.log('no volumes');
      else all.forEach(printStatus);
    });

  program
    .command('recover')
    .description('after a crash: settle an interrupted flush, and (root) write a leftover RAM image back into the files')
    .argument('<dir>', 'volume directory')
    .option('--key-file <file>', 'keyed layout: the secret (only needed for a leftover RAM image)')
    .action(async (dir: string, o: { keyFile?: string }) => {
      const volume = loadVolume(dir, { writable: true });
      const { name } = volume.manifest;
      const paths = runtimePaths(name);
      const say = (line: string): void => console.log(line);
      let secret: Buffer | undefined;
      try {
        const holder = lockHolder(name);
        if (holder !== undefined) throw new VbdError(`volume '${name}' is live (pid ${holder}); stop it first`);
        const journalFd = openJournal(volume);
        try {
          const settled = await settleJournal(volume, journalFd, say);
          if (!isTmpfsMounted(paths.shadow)) {
            console.log(`volume '${name}': ${settled === 'empty' ? 'nothing to recover' : 'journal settled'}; no RAM image left behind`);
            return;
          }
          requireRoot('vbd-shadow recover (of a leftover RAM image)');
          secret = await secretFor(volume.manifest, o.keyFile);
          const table = await resolvePlacement(volume.manifest, { owner: volume.owner, secret });
          acquireLock(paths, name);
          try {
            await recoverLeftover(paths, volume, table, journalFd, say);
            console.log(`volume '${name}' recovered into the files`);
          } finally {
            releaseLock(paths);
          }
        } finally {
          closeSync(journalFd);
        }
      } finally {
        secret?.fill(0);
        closeVolume(volume);
      }
    });

  program
    .command('flush')
    .description('write back what changed now, and wait for the result (root or the owner)')
    .argument('<volume>', 'volume name or directory')
    .action(async (target: string) => {
      const { name, pid } = runningDaemon(target, 'live');
      const requested = new Date().toISOString();
      sendControl(name, { kind: 'flush' });
      for (;;) {
        await sleep(20);
        const s = readStatus(name);
        if (s === undefined || !isAlive(pid)) throw new VbdError(`volume '${name}' went away during the flush`);
        if (s.lastCheck !== undefined && s.lastCheck.at >= requested) {
          if (!s.lastCheck.ok) throw new VbdError(`flush of '${name}' failed: ${s.lastFlush?.error ?? 'see the log'}`);
          const f = s.lastFlush;
          console.log(s.lastCheck.idle || f === undefined || f.at !== s.lastCheck.at
            ? `volume '${name}': nothing written since the last flush`
            : `volume '${name}' flushed: ${f.chunksChanged} chunks, ${formatSize(f.bytesWritten)} in ${f.durationMs.toFixed(1)} ms`);
          return;
        }
      }
    });
}
