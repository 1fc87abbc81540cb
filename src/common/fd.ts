// Small helpers over file descriptors and time that several modules need.

import { readSync } from 'node:fs';

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

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
