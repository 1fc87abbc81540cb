// The daemon's end of a FIFO: created root-side in /run/vbd-shadow/NAME (root-owned 0755, so
// fs.protected_fifos does not apply), owned by the volume owner with mode 0600 so only the
// owner (and root) can open it. Read non-blocking through a net.Socket: 'end' arrives within
// milliseconds of the last writer closing — or being killed.

import { chownSync, closeSync, openSync, rmSync, constants as fsc } from 'node:fs';
import { Socket } from 'node:net';
import { failure } from '../common/errors.js';
import { makeFifo } from '../sys/libc.js';
import type { Owner } from '../volume/volume.js';
import { MAX_LINE, parseMessage, type PipeMessage } from './protocol.js';

export interface PipeEvents {
  message: (message: PipeMessage) => void;
  garbage: (what: string) => void;
  /** Every writer has closed its end (or died). */
  closed: () => void;
}

/** Creates the FIFO anew at `path` for `owner` (mode 0600). */
export function createFifo(path: string, owner: Owner): void {
  rmSync(path, { force: true });
  makeFifo(path, 0o600);
  chownSync(path, owner.uid, owner.gid);
}

/** Reads messages from the FIFO until all writers have gone; returns a function to stop early. */
export function readPipe(path: string, events: PipeEvents): () => void {
  let fd: number;
  try {
    fd = openSync(path, fsc.O_RDONLY | fsc.O_NONBLOCK | fsc.O_NOFOLLOW);
  } catch (err) {
    throw failure(`cannot open pipe ${path}`, err);
  }
  const socket = new Socket({ fd, readable: true, writable: false });
  let pending = '';
  let finished = false;
  const finish = (): void => {
    if (finished) return;
    finished = true;
    if (pending.length > 0) events.garbage(`an unterminated message (${pending.length} bytes) at close`);
    socket.destroy();
    events.closed();
  };
  socket.setEncoding('utf8');
  socket.on('data', (chunk: string) => {
    pending += chunk;
    let newline: number;
    while ((newline = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, newline);
      pending = pending.slice(newline + 1);
      const parsed = parseMessage(line);
      if ('error' in parsed) events.garbage(`${parsed.error}: ${JSON.stringify(line.slice(0, 80))}`);
      else events.message(parsed);
    }
    if (pending.length > MAX_LINE) {
      events.garbage(`a line longer than ${MAX_LINE} bytes (dropped)`);
      pending = '';
    }
  });
  socket.on('end', finish);
  socket.on('error', (err) => {
    events.garbage(`pipe error: ${err.message}`);
    finish();
  });
  return () => {
    finished = true;
    socket.destroy();
  };
}

/** Keeps reading a FIFO across writers (for the control pipe): reopens after each close. */
export function servePipe(path: string, onMessage: (m: PipeMessage) => void, onGarbage: (what: string) => void): () => void {
  let stop = readPipe(path, { message: onMessage, garbage: onGarbage, closed: () => (stop = servePipe(path, onMessage, onGarbage)) });
  return () => stop();
}

/** The writer's side: opens without blocking (ENXIO: nobody reads it yet). */
export function openPipeForWriting(path: string): number {
  return openSync(path, fsc.O_WRONLY | fsc.O_NONBLOCK | fsc.O_NOFOLLOW);
}

export function closePipe(fd: number): void {
  closeSync(fd);
}
