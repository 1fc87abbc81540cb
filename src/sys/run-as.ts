// Running code we do not trust (a user's layout module) in a confined child process:
//   - as the account (when we are root): its passwd uid and gid and its own supplementary
//     groups (setpriv --init-groups), no new privileges, killed if we die (pdeathsig);
//     when we are not root, as ourselves with everything else the same;
//   - rlimits reset (prlimit): memlock 8 MiB, no core, 1024 fds, a bounded address space and
//     CPU time — also when we run with LimitMEMLOCK=infinity;
//   - a clean environment (PATH, HOME, USER, LANG only), cwd /, no fd beyond stdio (every fd
//     of ours is made close-on-exec first), its own session and process group;
//   - a wall-clock time limit, after which the whole group gets SIGKILL; and whatever is left
//     of the group is killed when the child exits;
//   - capped output: stdout must be exactly the size the caller expects (more kills the group),
//     only the tail of stderr is kept.

import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import koffi from 'koffi';
import { escapeText } from '../common/escape.js';
import { VbdError, describeErrno } from '../common/errors.js';
import { processLimits } from './memory.js';

/** Who the child runs as (when we are root). Structurally an Owner. */
export interface Account {
  readonly uid: number;
  readonly gid: number;
  readonly name: string;
  readonly home: string;
}

export interface ConfinedRun {
  /** Whom to become. When we are not root this must be ourselves. */
  account: Account;
  command: string;
  args: readonly string[];
  /** Written to the child's stdin, which is then closed. */
  input: string | Buffer;
  timeoutMs: number;
  /** The exact number of bytes the child must write on stdout; more kills it. */
  stdoutBytes: number;
  /** How much of the end of stderr is kept. */
  stderrKeep?: number;
  /** Names the child in messages, e.g. "layout module /home/ann/layout.mjs". */
  what: string;
}

export interface ConfinedResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** Exactly `stdoutBytes` long (zero-filled past what the child wrote); byteOffset 0. */
  stdout: Buffer;
  /** How many bytes the child really wrote on stdout. */
  stdoutLength: number;
  /** The last bytes of stderr (at most stderrKeep). */
  stderrTail: Buffer;
}

/** Limits the child gets; each one is lowered to our own hard limit if that is lower. */
export const CHILD_LIMITS = {
  memlock: 8 * 2 ** 20,
  core: 0,
  nofile: 1024,
  /** Bytes of address space: Node needs ~0.75 GB just to start (V8 reserves its code range). */
  as: 3_000_000 * 1024,
} as const;
export const CHILD_PATH = '/usr/bin:/bin';
const DEFAULT_STDERR_KEEP = 4096;

const libc = koffi.load('libc.so.6');
const closeRange = libc.func('int close_range(unsigned int first, unsigned int last, int flags)');
const CLOSE_RANGE_CLOEXEC = 1 << 2;

/**
 * Marks every fd above stdio close-on-exec, so no child inherits one. Node opens its own fds
 * with O_CLOEXEC already; this catches fds this process inherited without it.
 */
export function closeOnExecAll(): void {
  if ((closeRange(3, 0xffffffff, CLOSE_RANGE_CLOEXEC) as number) !== 0) {
    throw new VbdError(`close_range(3, ~0, CLOSE_RANGE_CLOEXEC): ${describeErrno(`errno ${koffi.errno()}`)}`);
  }
}

/** The absolute path of a system tool (never looked up through $PATH); `need` says what for. */
export function tool(name: string, need = `${name} (util-linux) is needed to confine user code`): string {
  for (const dir of ['/usr/bin', '/bin', '/usr/sbin', '/sbin']) {
    if (existsSync(`${dir}/${name}`)) return `${dir}/${name}`;
  }
  throw new VbdError(`cannot find ${name} in /usr/bin, /bin, /usr/sbin or /sbin: ${need}`);
}

function limitArgs(timeoutMs: number): string[] {
  const ours = processLimits();
  const cap = (name: string, want: number): string => {
    const hard = ours.get(name)?.hard ?? Infinity;
    const v = Math.min(want, hard);
    return `${v}:${v}`;
  };
  // CPU time is a backstop for when we are gone before our timer fires (Node's threads count).
  const cpuSeconds = 2 * Math.ceil(timeoutMs / 1000) + 10;
  return [
    `--memlock=${cap('Max locked memory', CHILD_LIMITS.memlock)}`,
    `--core=${cap('Max core file size', CHILD_LIMITS.core)}`,
    `--nofile=${cap('Max open files', CHILD_LIMITS.nofile)}`,
    `--as=${cap('Max address space', CHILD_LIMITS.as)}`,
    `--cpu=${cap('Max cpu time', cpuSeconds)}`,
  ];
}

/** The argv that confines `command`: prlimit, then setpriv, then the command (each execs the next). */
export function confinedArgv(run: Pick<ConfinedRun, 'account' | 'command' | 'args' | 'timeoutMs'>): string[] {
  const root = process.geteuid?.() === 0;
  const me = process.geteuid?.() ?? -1;
  if (!root && run.account.uid !== me) {
    throw new VbdError(`cannot run ${run.command} as uid ${run.account.uid}: only root can switch users (we are uid ${me})`);
  }
  const ids = root ? [`--reuid=${run.account.uid}`, `--regid=${run.account.gid}`, '--init-groups'] : [];
  return [
    tool('prlimit'), ...limitArgs(run.timeoutMs), '--',
    tool('setpriv'), ...ids, '--no-new-privs', '--pdeathsig', 'KILL', '--',
    run.command, ...run.args,
  ];
}

function killGroup(pgid: number): void {
  try {
    process.kill(-pgid, 'SIGKILL');
  } catch {
    /* ESRCH: nothing left in the group */
  }
}

/**
 * Runs the command confined; resolves once it has exited (whatever the exit code), rejects with
 * one line if it ran out of time or wrote too much, after killing its whole process group.
 */
export function runConfined(run: ConfinedRun): Promise<ConfinedResult> {
  const argv = confinedArgv(run);
  const keep = run.stderrKeep ?? DEFAULT_STDERR_KEEP;
  const stdout = Buffer.alloc(run.stdoutBytes); // never pooled: byteOffset 0, aligned for typed views
  closeOnExecAll();
  return new Promise((resolve, reject) => {
    const child = spawn(argv[0] ?? '', argv.slice(1), {
      cwd: '/',
      env: { PATH: CHILD_PATH, HOME: run.account.home, USER: run.account.name, LANG: 'C.UTF-8' },
      stdio: ['pipe', 'pipe', 'pipe'],
      detached: true, // setsid: its own session and process group, so one kill reaches all of it
    });
    const pgid = child.pid;
    let received = 0;
    let stderrTail = Buffer.alloc(0);
    let failed: VbdError | undefined;
    let exit: { code: number | null; signal: NodeJS.Signals | null } | undefined;
    let settled = false;

    const finish = (): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      clearTimeout(drain);
      child.stdout?.destroy();
      child.stderr?.destroy();
      if (failed !== undefined) return reject(failed);
      if (exit === undefined) return reject(new VbdError(`${run.what}: the child vanished without an exit status`));
      resolve({ ...exit, stdout, stdoutLength: received, stderrTail });
    };
    const fail = (err: VbdError): void => {
      failed ??= err;
      if (pgid !== undefined) killGroup(pgid);
      if (exit !== undefined || pgid === undefined) finish();
      // else: 'exit' follows the SIGKILL and finishes
    };

    const timer = setTimeout(() => fail(new VbdError(`${run.what} did not finish within ${Math.round(run.timeoutMs / 1000)} s; it was killed`)), run.timeoutMs);
    // Once it has exited, a stray process holding its pipes open may not keep us waiting.
    let drain: NodeJS.Timeout | undefined;

    child.stdout.on('data', (d: Buffer) => {
      if (failed !== undefined) return;
      if (received + d.length > run.stdoutBytes) {
        fail(new VbdError(`${run.what} wrote more than the ${run.stdoutBytes} bytes expected on stdout; it was killed`));
        return;
      }
      d.copy(stdout, received);
      received += d.length;
    });
    child.stderr.on('data', (d: Buffer) => {
      stderrTail = Buffer.concat([stderrTail, d]);
      if (stderrTail.length > keep) stderrTail = Buffer.from(stderrTail.subarray(stderrTail.length - keep));
    });
    child.stdin.on('error', () => undefined); // EPIPE when it exits without reading: its exit says why
    child.on('error', (err) => fail(new VbdError(`cannot run ${run.what}: ${err.message}`)));
    child.on('exit', (code, signal) => {
      exit = { code, signal };
      if (pgid !== undefined) killGroup(pgid); // whatever it left behind in its group
      if (failed !== undefined) return finish();
      drain = setTimeout(finish, 2000);
    });
    child.on('close', () => {
      if (exit !== undefined) finish();
    });
    child.stdin.end(run.input);
  });
}

/** The last non-empty line of a child's stderr tail, escaped and at most `max` characters. */
export function lastLine(stderrTail: Buffer, max = 300): string {
  const lines = stderrTail.toString('utf8').split('\n').map((l) => l.replace(/\r$/, '')).filter((l) => l.trim() !== '');
  return escapeText(lines.pop() ?? '', max);
}
