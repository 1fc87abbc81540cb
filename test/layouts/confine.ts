// Shared by the confinement tests: a real user with a supplementary group of its own, a
// scratch "home" only that user can write, and a layout module that records how it was run
// and, on demand (a mode file), misbehaves: hangs, floods stdout or stderr.

import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, chownSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ensureUser, type User } from '../helpers/system.js';
import { tempDir } from '../helpers/tmp.js';

export const RUNNER_USER = 'vbd-runner-user';
export const RUNNER_GROUP = 'vbd-runner-grp';

export interface RunnerUser {
  user: User;
  /** The user's supplementary group (not its passwd group). */
  extraGid: number;
  /** Home directory in /etc/passwd (need not exist). */
  passwdHome: string;
}

/** A real account with one supplementary group (both created once and kept, like ensureUser's). */
export function runnerUser(): RunnerUser {
  const user = ensureUser(RUNNER_USER);
  if (spawnSync('getent', ['group', RUNNER_GROUP]).status !== 0) execFileSync('groupadd', ['--system', RUNNER_GROUP]);
  execFileSync('usermod', ['-a', '-G', RUNNER_GROUP, RUNNER_USER]);
  const extraGid = Number(execFileSync('getent', ['group', RUNNER_GROUP], { encoding: 'utf8' }).split(':')[2]);
  const passwdHome = execFileSync('getent', ['passwd', RUNNER_USER], { encoding: 'utf8' }).trim().split(':')[5] ?? '';
  return { user, extraGid, passwdHome };
}

export const MODULE = `
import { existsSync, readFileSync, readdirSync, readlinkSync, writeFileSync, writeSync } from 'node:fs';
import { spawn } from 'node:child_process';

function writeAll(fd, buf) {
  for (;;) {
    try { writeSync(fd, buf); return; } catch (e) { if (e.code !== 'EAGAIN') throw e; }
  }
}

export function createLayout(g, params) {
  const mode = existsSync(params.mode) ? readFileSync(params.mode, 'utf8').trim() : 'ok';
  const stat = readFileSync('/proc/self/stat', 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const fds = readdirSync('/proc/self/fd').map((fd) => { try { return readlinkSync('/proc/self/fd/' + fd); } catch { return '?'; } });
  writeFileSync(params.record, JSON.stringify({
    uid: process.getuid(), euid: process.geteuid(), gid: process.getgid(), egid: process.getegid(),
    groups: process.getgroups(), limits: readFileSync('/proc/self/limits', 'utf8'), env: { ...process.env },
    cwd: process.cwd(), fds, pid: process.pid, pgid: Number(fields[2]), mode,
  }));
  if (mode === 'hang') {
    process.on('SIGTERM', () => {});
    const child = spawn('sleep', ['600'], { stdio: 'ignore' });
    writeFileSync(params.record + '.hang', JSON.stringify({ pid: process.pid, child: child.pid }));
    for (;;) {}
  }
  if (mode === 'stdout-flood') {
    const b = Buffer.alloc(1 << 20, 0x41);
    for (let i = 0; i < 512; i++) writeAll(1, b);
  }
  if (mode === 'stderr-flood') {
    const b = Buffer.from('\\x1b[31mEVIL\\x07\\r\\n'.repeat(65536));
    for (let i = 0; i < 100; i++) writeAll(2, b);
    throw new Error('boom \\x1b]0;owned\\x07 \\u202e end');
  }
  const n = g.fileSizes.length;
  return { place: (c) => ({ file: (n - 1) - (c % n), offset: Math.floor(c / n) * g.chunkSize }) };
}`;

export interface ModuleVolume extends RunnerUser {
  scratch: string;
  /** A directory only the user can write, holding the module and the volume. */
  home: string;
  dir: string;
  mod: string;
  /** Where the module writes what it saw (JSON). */
  record: string;
  /** What the module should do next: 'ok', 'hang', 'stdout-flood', 'stderr-flood'. */
  setMode: (mode: string) => void;
}

/** A 256K volume of 64 chunks with the recording module, made by the user (init runs it too). */
export function moduleVolume(cliAs: (user: User, args: string[]) => { status: number | null; stderr: string }): ModuleVolume {
  const ru = runnerUser();
  const scratch = tempDir();
  chmodSync(scratch, 0o755);
  const home = join(scratch, 'home');
  mkdirSync(home, { mode: 0o755 });
  chownSync(home, ru.user.uid, ru.user.gid);
  const mod = join(home, 'layout.mjs');
  writeFileSync(mod, MODULE, { mode: 0o644 });
  chownSync(mod, ru.user.uid, ru.user.gid);
  const record = join(home, 'record.json');
  const modeFile = join(scratch, 'mode');
  writeFileSync(modeFile, 'ok', { mode: 0o644 });
  const dir = join(home, 'vol');
  const init = cliAs(ru.user, ['init', dir, '--size', '256K', '--files', '4', '--chunk', '4K', '--layout', `module:${mod}`,
    '--layout-params', JSON.stringify({ record, mode: modeFile })]);
  if (init.status !== 0) throw new Error(`init as ${ru.user.name} failed: ${init.stderr}`);
  return { ...ru, scratch, home, dir, mod, record, setMode: (mode) => writeFileSync(modeFile, mode) };
}

export interface RunRecord {
  uid: number;
  euid: number;
  gid: number;
  egid: number;
  groups: number[];
  limits: string;
  env: Record<string, string>;
  cwd: string;
  fds: string[];
  pid: number;
  pgid: number;
  mode: string;
}

export function readRecord(path: string): RunRecord {
  return JSON.parse(readFileSync(path, 'utf8')) as RunRecord;
}

/** soft and hard value of one line of /proc/PID/limits ("Max locked memory" …). */
export function limitOf(limits: string, name: string): [string, string] {
  const line = limits.split('\n').find((l) => l.startsWith(name)) ?? '';
  const [soft, hard] = line.slice(name.length).trim().split(/\s+/);
  return [soft ?? '', hard ?? ''];
}

/** True if pid is gone (or a zombie: dead, only not yet reaped). */
export function isGone(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z');
  } catch {
    return true;
  }
}

/** Pids of live (non-zombie) processes in process group `pgid`. */
export function liveInGroup(pgid: number): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (Number(f[2]) === pgid && f[0] !== 'Z') pids.push(Number(entry));
    } catch {
      /* gone meanwhile */
    }
  }
  return pids;
}
