// The writer's end of a daemon's FIFO (the agent, `flush`, `stop`): apart from pipe.ts, whose
// reading side needs the C library (mkfifo), so the CLI's short commands load none of it.

import { closeSync, openSync, writeSync, constants as fsc } from 'node:fs';
import { errnoCode, failure, VbdError } from '../common/errors.js';
import { encodeMessage, type PipeMessage } from './protocol.js';

/** The writer's side: opens without blocking (ENXIO: nobody reads it yet). */
export function openPipeForWriting(path: string): number {
  return openSync(path, fsc.O_WRONLY | fsc.O_NONBLOCK | fsc.O_NOFOLLOW);
}

const waiter = new Int32Array(new SharedArrayBuffer(4));

/** Blocks the thread for `ms` (the writer has nothing else to do while the pipe is full). */
function pauseThread(ms: number): void {
  Atomics.wait(waiter, 0, 0, ms);
}

/**
 * Writes one message whole on a pipe opened by openPipeForWriting (O_NONBLOCK): a short write
 * goes on from where it stopped, a full pipe (EAGAIN) is waited out, for at most `timeoutMs`
 * in all. Throws if the message cannot be written in time; the error names no content. The
 * encoded bytes are wiped afterwards (a key message carries the secret).
 */
export function writeMessage(fd: number, message: PipeMessage, timeoutMs = 20_000): void {
  const bytes = Buffer.from(encodeMessage(message), 'utf8');
  const deadline = Date.now() + timeoutMs;
  let done = 0;
  try {
    while (done < bytes.length) {
      try {
        done += writeSync(fd, bytes, done, bytes.length - done);
        continue;
      } catch (err) {
        if (errnoCode(err) !== 'EAGAIN') throw failure(`cannot send a ${message.kind} message to the daemon (${done} of ${bytes.length} bytes written)`, err);
      }
      if (Date.now() >= deadline) {
        throw new VbdError(`cannot send a ${message.kind} message to the daemon: its pipe stayed full for ${timeoutMs / 1000} s (${done} of ${bytes.length} bytes written)`);
      }
      pauseThread(5);
    }
  } finally {
    bytes.fill(0);
  }
}

export function closePipe(fd: number): void {
  closeSync(fd);
}
