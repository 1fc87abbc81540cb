// Small helpers over file descriptors and time that several modules need.

import { readSync } from 'node:fs';
import { VbdError, failure } from './errors.js';

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
