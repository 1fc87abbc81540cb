// The canary agent, run as the volume owner in the login session: connects to the daemon's
// pipe, says hello (and gives the key of a keyed volume or the passphrase of a sealed one), asks for a flush every interval,
// and on logout (SIGTERM/SIGHUP) or Ctrl-C asks for teardown and exits. If it dies instead,
// the pipe closes and the daemon tears down all the same: that is the point of a canary.
// Under systemd (its unit is Type=notify) it says READY=1 only once the daemon's status shows
// the volume live, so units ordered after the agent's find the volume attached (and mounted).


import { fstatSync, lstatSync } from 'node:fs';
import { sleep } from '../common/fd.js';
import { VbdError, errnoCode, failure, type ErrorKind } from '../common/errors.js';
import { checkRootOwnedPath, readStatusAt, type DaemonStatus, type RuntimePaths } from '../daemon/runtime.js';
import { promptSecret, readDefaultKeyFile, readKeyFile } from '../layouts/secret.js';
import { createNotifier } from '../sys/notify.js';
import { closePipe, openPipeForWriting, writeMessage } from './pipe.js';
import type { PipeMessage } from './protocol.js';

export interface AgentOptions {
  name: string;
  /** The runtime directory of this user's volume, derived from her uid and its identity. */
  paths: RuntimePaths;
  /** A keyed layout's key or a sealed volume's passphrase goes to the daemon. */
  needsSecret: boolean;
  keyFile?: string | undefined;
  say: (line: string) => void;
}


/** Kinds of a daemon's refusal the agent exits with (anything else, or none: 1). */
const REPORTED_KINDS: readonly ErrorKind[] = ['usage', 'not-found', 'refused', 'wrong-key', 'busy', 'io'];

async function agentSecret(o: AgentOptions): Promise<Buffer> {
  if (o.keyFile !== undefined) return readKeyFile(o.keyFile);
  return readDefaultKeyFile(o.name) ?? promptSecret(`Key for volume '${o.name}': `);
}

/**
 * The FIFO is the daemon's for us only if root made it: every directory above it is root's
 * and writable only by root, and the FIFO itself was made for our uid, 0600. Checked on the
 * path and again on the opened fd (same inode) before anything — the key — is written.
 */
function checkDaemonFifo(path: string, fd: number | undefined): void {
  const uid = process.getuid?.() ?? -1;
  checkRootOwnedPath(path.slice(0, path.lastIndexOf('/')));
  const st = lstatSync(path);
  if (!st.isFIFO() || st.uid !== uid || (st.mode & 0o077) !== 0) {
    throw new VbdError(`${path} is not a FIFO made for uid ${uid} with mode 0600; refusing to talk to it`);
  }
  if (fd !== undefined && fstatSync(fd).ino !== st.ino) throw new VbdError(`${path} changed while it was opened; refusing to talk to it`);
}

/** Opens the daemon's pipe, waiting for a daemon that is not there yet. */
async function connect(path: string, say: (line: string) => void): Promise<number> {
  for (let waited = 0; ; waited++) {
    try {
      checkDaemonFifo(path, undefined);
      const fd = openPipeForWriting(path);
      try {
        checkDaemonFifo(path, fd);
      } catch (err) {
        closePipe(fd);
        throw err;
      }
      return fd;
    } catch (err) {
      const code = errnoCode(err);
      if (code === 'EACCES' || code === 'EPERM') throw failure(`cannot open the daemon's pipe ${path} (only the volume owner may)`, err);
      if (code !== 'ENXIO' && code !== 'ENOENT') throw failure(`cannot open the daemon's pipe ${path}`, err);
    }
    if (waited === 0) say('waiting for the daemon…');
    await sleep(500);
  }
}

/** Runs the agent until logout or until the daemon's session ends; returns the exit code. */
export async function runAgent(o: AgentOptions): Promise<number> {
  const { paths } = o;
  const notifier = createNotifier(o.say);
  notifier.send({ STATUS: 'waiting for the daemon' });
  const pipe = paths.agentFifo;
  const secret = o.needsSecret ? await agentSecret(o) : undefined;
  const fd = await connect(pipe, o.say);
  // Whole messages only: the pipe is non-blocking and a key message is larger than its buffer.
  const send = (m: PipeMessage): void => writeMessage(fd, m);
  const connectedAt = new Date().toISOString();
  send({ kind: 'hello', version: 1, pid: process.pid });
  notifier.send({ STATUS: 'connected; waiting for the volume to be attached' });
  if (secret !== undefined) {
    send({ kind: 'key', secret: secret.toString('base64') });
    secret.fill(0);
  }

  let leaving: string | undefined;
  const leave = (why: string): void => {
    leaving ??= why;
  };
  for (const signal of ['SIGTERM', 'SIGHUP', 'SIGINT'] as const) process.on(signal, () => leave(signal));

  let live: DaemonStatus | undefined;
  let lastFlush = Date.now();
  for (;;) {
    if (leaving !== undefined) {
      try {
        send({ kind: 'teardown' });
      } catch {
        /* the daemon is gone already */
      }
      closePipe(fd);
      notifier.send({ STOPPING: 1, STATUS: 'asked the daemon to write everything back and detach' });
      o.say(`${leaving}: asked the daemon to write everything back and detach`);
      return 0;
    }
    const s = readStatusAt(paths);
    if (s === undefined) throw new VbdError(`volume '${o.name}': the daemon's status is gone`);
    if (s.refused !== undefined && s.refused.at >= connectedAt && s.state !== 'live') {
      closePipe(fd);
      // Its kind decides the exit status: a wrong key is 5, as when the CLI itself finds it wrong.
      const kind = REPORTED_KINDS.find((k) => k === s.refused?.kind) ?? 'failed';
      throw new VbdError(`the daemon refused this session: ${s.refused.reason}`, { kind });
    }
    if (s.state === 'live' && live === undefined) {
      live = s;
      const where = `${s.link} -> ${s.device}${s.mountpoint !== undefined ? `, mounted on ${s.mountpoint}` : ''}`;
      o.say(`volume '${o.name}' is live: ${where}`);
      notifier.send({ READY: 1, STATUS: `volume '${o.name}' live: ${where}` });
    }
    if (live !== undefined && s.state !== 'live') {
      closePipe(fd);
      o.say(`volume '${o.name}': the daemon ended the session (${s.state})`);
      return s.state === 'failed' ? 1 : 0;
    }
    if (live !== undefined && Date.now() - lastFlush >= s.intervalMs) {
      send({ kind: 'flush' });
      lastFlush = Date.now();
    }
    await sleep(200);
  }
}


