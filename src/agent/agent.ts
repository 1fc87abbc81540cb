// The canary agent, run as the volume owner in the login session: connects to the daemon's
// pipe, says hello (and gives the key of a keyed volume), asks for a flush every interval,
// and on logout (SIGTERM/SIGHUP) or Ctrl-C asks for teardown and exits. If it dies instead,
// the pipe closes and the daemon tears down all the same: that is the point of a canary.


import { homedir } from 'node:os';
import { join } from 'node:path';
import { sleep } from '../common/fd.js';
import { VbdError, errnoCode, failure } from '../common/errors.js';
import { agentPipePath } from '../daemon/daemon.js';
import { readStatus, runtimePaths, type DaemonStatus } from '../daemon/runtime.js';
import { promptSecret, readKeyFile } from '../layouts/secret.js';
import { closePipe, openPipeForWriting, writeMessage } from './pipe.js';
import type { PipeMessage } from './protocol.js';

export interface AgentOptions {
  name: string;
  keyed: boolean;
  keyFile?: string | undefined;
  say: (line: string) => void;
}


/** The default key file: ~/.config/vbd-shadow/NAME.key (mode 0600). */
export function defaultKeyFile(name: string): string {
  return join(process.env['XDG_CONFIG_HOME'] ?? join(homedir(), '.config'), 'vbd-shadow', `${name}.key`);
}

async function agentSecret(o: AgentOptions): Promise<Buffer> {
  if (o.keyFile !== undefined) return readKeyFile(o.keyFile);
  try {
    return readKeyFile(defaultKeyFile(o.name));
  } catch (err) {
    if (!(err instanceof VbdError) || !/no such file/.test(err.message)) throw err;
  }
  return promptSecret(`Key for volume '${o.name}': `);
}

/** Opens the daemon's pipe, waiting for a daemon that is not there yet. */
async function connect(path: string, say: (line: string) => void): Promise<number> {
  for (let waited = 0; ; waited++) {
    try {
      return openPipeForWriting(path);
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
  const paths = runtimePaths(o.name);
  const pipe = agentPipePath(paths);
  const secret = o.keyed ? await agentSecret(o) : undefined;
  const fd = await connect(pipe, o.say);
  // Whole messages only: the pipe is non-blocking and a key message is larger than its buffer.
  const send = (m: PipeMessage): void => writeMessage(fd, m);
  const connectedAt = new Date().toISOString();
  send({ kind: 'hello', version: 1, pid: process.pid });
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
      o.say(`${leaving}: asked the daemon to write everything back and detach`);
      return 0;
    }
    const s = readStatus(o.name);
    if (s === undefined) throw new VbdError(`volume '${o.name}': the daemon's status is gone`);
    if (s.refused !== undefined && s.refused.at >= connectedAt && s.state !== 'live') {
      closePipe(fd);
      throw new VbdError(`the daemon refused this session: ${s.refused.reason}`);
    }
    if (s.state === 'live' && live === undefined) {
      live = s;
      o.say(`volume '${o.name}' is live: ${s.link} -> ${s.device}${s.mountpoint !== undefined ? `, mounted on ${s.mountpoint}` : ''}`);
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


