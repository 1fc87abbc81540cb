// Small helpers over file descriptors and time that several modules need.

import { readSync, writeSync } from 'node:fs';
import { VbdError, errnoCode, failure } from './errors.js';

/** Reads exactly `length` bytes at `position`; undefined if the file ends first. */
export function readFully(fd: number, length: number, position: number): Buffer | undefined {
  const buf = Buffer.alloc(length);
  let done = 0;
  while (done < length) {
    const n = readSync(fd, buf, done, length - done, position + done);
    if (n === 0) return undefined;
    done += n;
  }
  return buf;
}

/** Reads exactly `length` bytes at `position` into `buf`; a short file or a failed read is one line naming `what`. */
export function readExactly(fd: number, buf: Buffer, length: number, position: number, what: string): void {
  let done = 0;
  while (done < length) {
    let n: number;
    try {
      n = readSync(fd, buf, done, length - done, position + done);
    } catch (err) {
      throw failure(`read of ${what} at offset ${position + done}`, err);
    }
    if (n === 0) throw new VbdError(`${what} ends before offset ${position + length} (truncated?)`);
    done += n;
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

const pause = new Int32Array(new SharedArrayBuffer(4));

/** Blocks the thread for `ms` (a non-blocking stdin or stdout that is not ready yet). */
function waitSync(ms: number): void {
  Atomics.wait(pause, 0, 0, ms);
}

/**
 * One read of up to `length` bytes from `fd` at its current position (a pipe, a terminal, a
 * redirected file): 0 at the end. Waits when the fd is non-blocking and has nothing yet.
 */
export function readStream(fd: number, buf: Uint8Array, offset: number, length: number): number {
  for (;;) {
    try {
      return readSync(fd, buf, offset, length, null);
    } catch (err) {
      if (errnoCode(err) === 'EAGAIN') waitSync(5);
      else if (errnoCode(err) === 'EOF') return 0;
      else throw err;
    }
  }
}

/** Writes all of `buf[0, length)` to `fd` at its current position (stdout, a pipe), waiting while it is full. */
export function writeStream(fd: number, buf: Uint8Array, length: number): void {
  let done = 0;
  while (done < length) {
    try {
      done += writeSync(fd, buf, done, length - done);
    } catch (err) {
      if (errnoCode(err) === 'EAGAIN') waitSync(5);
      else throw err;
    }
  }
}

/** All of standard input up to `limit` bytes; undefined if there is more. */
export function readStdinUpTo(limit: number): Buffer | undefined {
  const buf = Buffer.alloc(limit + 1);
  let done = 0;
  for (;;) {
    const n = readStream(0, buf, done, buf.length - done);
    if (n === 0) break;
    done += n;
    if (done > limit) {
      buf.fill(0);
      return undefined;
    }
  }
  const data = Buffer.from(buf.subarray(0, done));
  buf.fill(0);
  return data;
}
