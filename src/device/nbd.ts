// Network export of the session's loop device with nbdkit's file plugin (an existing NBD server,
// not one of ours). Root makes the listening socket — by default a Unix socket in the volume's
// runtime directory, mode 0600 and owned by the volume owner, so only she (and root) can
// connect; over TCP only with TLS (a PSK file) — and hands it to nbdkit as systemd's socket
// activation does (fd 3, LISTEN_FDS=1, LISTEN_PID). nbdkit runs as the owner (passwd uid, gid and
// groups, no new privileges, a clean environment) and serves the device through the daemon's fd
// (fd 4, file=/proc/self/fd/4): it never resolves a device path and never binds anything.
// The export is ended (and waited for) before the final writeback: nothing writes after the
// last flush. A flush cannot freeze a remote client's filesystem: it is crash-consistent only.

import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, chownSync, closeSync, mkdirSync, renameSync, rmSync, rmdirSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { VbdError, UsageError } from '../common/errors.js';
import { listenTcp, listenUnix } from '../sys/socket.js';
import { tool } from '../sys/run-as.js';
import type { Owner } from '../volume/owner.js';
import type { Report } from '../daemon/events.js';
import type { LoopDevice } from './loop.js';

/** Where the export listens: the owner-only Unix socket, or TCP with TLS (a PSK file). */
export type NbdListen =
  | { kind: 'unix' }
  | { kind: 'tcp'; host: string; port: number; tlsPsk: string };

/** What status shows of a running export. */
export interface NbdState {
  /** The libnbd URI a client connects to (nbd+unix://… or nbds://…). */
  uri: string;
  /** The Unix socket (unix) or host:port (tcp). */
  socket?: string;
  listen?: string;
  tls: 'psk' | 'off';
  pid: number;
  uid: number;
}

export interface NbdExport {
  state: NbdState;
  /** Ends nbdkit (SIGTERM, then SIGKILL after `graceMs`) and waits until it is gone. */
  stop(graceMs?: number): Promise<void>;
}

export const NBD_SOCKET_NAME = 'nbd.sock';
/** How long nbdkit gets to answer its first connection (our probe) before the start fails. */
const PROBE_TIMEOUT_MS = 10_000;
const NBD_MAGIC = Buffer.from('NBDMAGIC');

/** Parses --nbd-tcp HOST:PORT (an IP literal; IPv6 in brackets). */
export function parseNbdAddress(text: string): { host: string; port: number } {
  const match = /^(?:\[([0-9a-fA-F:.]+)\]|([0-9.]+)):(\d{1,5})$/.exec(text);
  const port = Number(match?.[3]);
  const host = match?.[1] ?? match?.[2];
  if (match === null || host === undefined || !(port >= 1 && port <= 65535)) {
    throw new UsageError(`--nbd-tcp must be HOST:PORT with an IP address (e.g. 192.0.2.7:10809 or [::1]:10809), got '${text}'`);
  }
  return { host, port };
}

/** The listening socket, made by root: a Unix socket bound in a root-only directory, then given to the owner and moved into place. */
function makeListener(listen: NbdListen, runtimeDir: string, owner: Owner): { fd: number; socket?: string } {
  if (listen.kind === 'tcp') return { fd: listenTcp(listen.host, listen.port) };
  const socket = join(runtimeDir, NBD_SOCKET_NAME);
  const staging = join(runtimeDir, `.nbd.${process.pid}`);
  rmSync(socket, { force: true });
  rmSync(staging, { force: true, recursive: true });
  mkdirSync(staging, { mode: 0o700 });
  try {
    const staged = join(staging, NBD_SOCKET_NAME);
    const fd = listenUnix(staged);
    try {
      // Paths in root's own directories: nobody else can change them between these calls.
      chmodSync(staged, 0o600);
      chownSync(staged, owner.uid, owner.gid);
      renameSync(staged, socket);
    } catch (err) {
      closeSync(fd);
      throw err;
    }
    return { fd, socket };
  } finally {
    rmdirSync(staging);
  }
}

/** HOST:PORT of a TCP export (IPv6 in brackets). */
function tcpAddress(listen: Extract<NbdListen, { kind: 'tcp' }>): string {
  return `${listen.host.includes(':') ? `[${listen.host}]` : listen.host}:${listen.port}`;
}

function uriOf(listen: NbdListen, socket: string | undefined): string {
  return listen.kind === 'unix' ? `nbd+unix:///?socket=${socket ?? ''}` : `nbds://${tcpAddress(listen)}/`;
}

/** Connects where the export listens and waits for nbdkit's greeting (NBDMAGIC). */
function probe(listen: NbdListen, socket: string | undefined, exited: Promise<string>): Promise<void> {
  return new Promise((resolve, reject) => {
    const wildcard = listen.kind === 'tcp' && (listen.host === '0.0.0.0' || listen.host === '::');
    const conn = listen.kind === 'unix'
      ? connect({ path: socket ?? '' })
      : connect({ host: wildcard ? (listen.host === '::' ? '::1' : '127.0.0.1') : listen.host, port: listen.port });
    let got = Buffer.alloc(0);
    const done = (err?: Error): void => {
      clearTimeout(timer);
      conn.destroy();
      if (err === undefined) resolve();
      else reject(err);
    };
    const timer = setTimeout(() => done(new VbdError(`nbdkit did not answer on ${listen.kind === 'tcp' ? tcpAddress(listen) : socket ?? ''} within ${PROBE_TIMEOUT_MS / 1000} s`)), PROBE_TIMEOUT_MS);
    conn.on('data', (d: Buffer) => {
      got = Buffer.concat([got, d]);
      if (got.length >= NBD_MAGIC.length) done(got.subarray(0, NBD_MAGIC.length).equals(NBD_MAGIC) ? undefined : new VbdError('nbdkit answered without the NBD greeting'));
    });
    conn.on('error', (err) => done(new VbdError(`cannot reach nbdkit's socket: ${err.message}`)));
    void exited.then((why) => done(new VbdError(`nbdkit ${why}`)));
  });
}

/**
 * Starts nbdkit serving `loop` as the owner on `listen`; resolves once it has answered a
 * connection (so a bad PSK file or a missing plugin fails the start, with nbdkit's own words).
 * `onExit` is told if nbdkit ends by itself later.
 */
export async function startNbdExport(loop: LoopDevice, owner: Owner, runtimeDir: string, listen: NbdListen, report: Report, onExit: (why: string) => void): Promise<NbdExport> {
  const nbdkit = tool('nbdkit', 'the NBD export (--nbd) is served by nbdkit (Debian package nbdkit)');
  const setpriv = tool('setpriv');
  const { fd, socket } = makeListener(listen, runtimeDir, owner);
  const tls = listen.kind === 'tcp' ? ['--tls=require', `--tls-psk=${listen.tlsPsk}`] : [];
  // fd 3: the listening socket (socket activation); fd 4: the device, reopened through /proc/self/fd.
  // LISTEN_PID must be nbdkit's own pid: sh exports its $$ and execs nbdkit in its place.
  const argv = [
    `--reuid=${owner.uid}`, `--regid=${owner.gid}`, '--init-groups', '--no-new-privs', '--pdeathsig', 'KILL', '--',
    '/bin/sh', '-c', 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', 'sh',
    nbdkit, '--foreground', '--exit-with-parent', '--log=stderr', ...tls, 'file', 'file=/proc/self/fd/4',
  ];
  let child: ChildProcess;
  try {
    child = spawn(setpriv, argv, {
      cwd: '/',
      env: { PATH: '/usr/bin:/bin', HOME: owner.home, USER: owner.name, LANG: 'C.UTF-8', LISTEN_FDS: '1' },
      stdio: ['ignore', 'pipe', 'pipe', fd, loop.fd],
    });
  } finally {
    closeSync(fd); // nbdkit has its own copy
  }
  const removeSocket = (): void => {
    if (socket !== undefined) rmSync(socket, { force: true });
  };
  let stderrTail = '';
  for (const stream of [child.stdout, child.stderr]) {
    if (stream === null) continue;
    createInterface({ input: stream }).on('line', (line) => {
      stderrTail = line;
      report({ kind: 'nbdkit-said', line });
    });
  }
  let stopping = false;
  const exited = new Promise<string>((resolve) => {
    child.on('error', (err) => resolve(`could not be started: ${err.message}`));
    child.on('exit', (code, signal) => resolve(`exited (${signal ?? `status ${code ?? '?'}`})${stderrTail === '' ? '' : `: ${stderrTail}`}`));
  });
  const stop = async (graceMs = 10_000): Promise<void> => {
    stopping = true;
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
      await exited;
      clearTimeout(timer);
    }
    removeSocket();
  };
  try {
    await probe(listen, socket, exited);
  } catch (err) {
    await stop(2000);
    throw new VbdError(`cannot export ${loop.path} over NBD: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
  }
  void exited.then((why) => {
    if (!stopping) onExit(why);
  });
  const state: NbdState = {
    uri: uriOf(listen, socket), tls: listen.kind === 'tcp' ? 'psk' : 'off', pid: child.pid ?? 0, uid: owner.uid,
    ...(listen.kind === 'tcp' ? { listen: tcpAddress(listen) } : { socket }),
  };
  return { state, stop };
}
