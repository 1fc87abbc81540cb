// tracefs (the kernel's tracing filesystem): mounting it where it belongs if nobody has, and
// the files of a tracing *instance* (a ring buffer and event set of its own, a directory under
// instances/). Every path here is built by root from fixed parts; no user names anything.

import { closeSync, mkdirSync, openSync, readFileSync, readSync, readdirSync, writeFileSync, constants as fsc } from 'node:fs';
import { rmdir } from 'node:fs/promises';
import { VbdError, errnoCode, failure } from '../common/errors.js';
import { libc, syscallError } from './ffi.js';

export const TRACEFS = '/sys/kernel/tracing';
export const INSTANCES = `${TRACEFS}/instances`;

const MS_NOSUID = 0x2;
const MS_NODEV = 0x4;
const MS_NOEXEC = 0x8;

const c = {
  mount: libc.func('int mount(const char *source, const char *target, const char *type, unsigned long flags, const void *data)'),
};

function isMounted(): boolean {
  return readFileSync('/proc/self/mounts', 'utf8').split('\n').some((l) => {
    const f = l.split(' ');
    return f[1] === TRACEFS && f[2] === 'tracefs';
  });
}

/** Mounts tracefs on /sys/kernel/tracing unless it is there already. */
export function ensureTracefs(): void {
  if (isMounted()) return;
  if (c.mount('tracefs', TRACEFS, 'tracefs', MS_NOSUID | MS_NODEV | MS_NOEXEC, null) !== 0) {
    const err = syscallError('mount', `tracefs on ${TRACEFS}`);
    if (err.code !== 'EBUSY' || !isMounted()) throw err; // EBUSY: another daemon mounted it meanwhile
  }
}

/** Creates instance `name` (EEXIST is an error: a name is never shared). */
export function createInstance(name: string): string {
  const dir = `${INSTANCES}/${name}`;
  try {
    mkdirSync(dir);
  } catch (err) {
    throw failure(`cannot create the tracefs instance ${dir}`, err);
  }
  return dir;
}

/**
 * Removes an instance; 'gone' if it was not there. EBUSY while a file of it is open. On a libuv
 * thread: freeing the ring buffers and unregistering the events takes the kernel tens of ms.
 */
export async function removeInstance(name: string): Promise<'removed' | 'gone'> {
  const dir = `${INSTANCES}/${name}`;
  try {
    await rmdir(dir);
    return 'removed';
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return 'gone';
    throw failure(`cannot remove the tracefs instance ${dir}`, err);
  }
}

/** Names of the instances present (none if tracefs is not mounted). */
export function listInstances(): string[] {
  try {
    return readdirSync(INSTANCES);
  } catch {
    return [];
  }
}

/** Writes a control file of the instance (`file` relative to it). */
export function writeControl(dir: string, file: string, value: string): void {
  try {
    writeFileSync(`${dir}/${file}`, value);
  } catch (err) {
    throw failure(`cannot write '${value}' to ${dir}/${file}`, err);
  }
}

/** Reads a control file of the instance, trimmed. */
export function readControl(dir: string, file: string): string {
  try {
    return readFileSync(`${dir}/${file}`, 'utf8').trim();
  } catch (err) {
    throw failure(`cannot read ${dir}/${file}`, err);
  }
}

/** The CPUs the instance has a ring buffer for (per_cpu/cpuN). */
export function instanceCpus(dir: string): number[] {
  return readdirSync(`${dir}/per_cpu`).filter((n) => /^cpu\d+$/.test(n)).map((n) => Number(n.slice(3))).sort((a, b) => a - b);
}

/** The loss counters of one CPU's ring buffer (per_cpu/cpuN/stats). */
export interface CpuLoss {
  overrun: number;
  commitOverrun: number;
  dropped: number;
}

export function cpuLoss(dir: string, cpu: number): CpuLoss {
  const text = readControl(dir, `per_cpu/cpu${cpu}/stats`);
  const field = (name: string): number => {
    const m = new RegExp(`^${name}:\\s*(\\d+)$`, 'm').exec(text);
    if (m === null) throw new VbdError(`${dir}/per_cpu/cpu${cpu}/stats has no '${name}' line`);
    return Number(m[1]);
  };
  return { overrun: field('overrun'), commitOverrun: field('commit overrun'), dropped: field('dropped events') };
}

/**
 * The instance's trace_pipe, opened non-blocking: reads consume events (each is returned once,
 * none is skipped between two reads) and an empty buffer answers EAGAIN instead of waiting.
 */
export class TracePipe {
  private readonly fd: number;
  private readonly buf = Buffer.allocUnsafe(256 * 1024);
  private rest = '';

  constructor(private readonly dir: string) {
    try {
      this.fd = openSync(`${dir}/trace_pipe`, fsc.O_RDONLY | fsc.O_NONBLOCK);
    } catch (err) {
      throw failure(`cannot open ${dir}/trace_pipe`, err);
    }
  }

  /** Every whole line the buffer holds now; a line cut by a read stays for the next call. */
  drain(): string[] {
    let text = this.rest;
    for (;;) {
      let n: number;
      try {
        n = readSync(this.fd, this.buf, 0, this.buf.length, null);
      } catch (err) {
        if (errnoCode(err) === 'EAGAIN') break;
        throw failure(`cannot read ${this.dir}/trace_pipe`, err);
      }
      if (n === 0) break;
      text += this.buf.toString('latin1', 0, n);
    }
    const cut = text.lastIndexOf('\n');
    this.rest = text.slice(cut + 1);
    return cut < 0 ? [] : text.slice(0, cut).split('\n');
  }

  close(): void {
    closeSync(this.fd);
  }
}
