// Root-only integration helpers: a real unprivileged user, running as that user, and a sweep
// that removes every loop device, mount and tmpfs image a test volume may have left behind.

import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { BIN } from './cli.js';

export const IS_ROOT = process.getuid?.() === 0;
export const ROOT_SKIP_REASON = 'needs root: real loop devices, tmpfs mounts and mlock';

/** Test volumes are named with this prefix so the sweep knows what is ours. */
export const TEST_PREFIX = 'vbdt-';
export const TEST_USER = 'vbd-test-user';
export const OTHER_USER = 'vbd-other-user';

export interface User {
  name: string;
  uid: number;
  gid: number;
}

/** A real unprivileged account (created once, kept: it owns nothing outside test dirs). */
export function ensureUser(name: string): User {
  if (spawnSync('id', ['-u', name]).status !== 0) {
    execFileSync('useradd', ['--system', '--no-create-home', '--shell', '/usr/sbin/nologin', name]);
  }
  const uid = Number(execFileSync('id', ['-u', name], { encoding: 'utf8' }).trim());
  const gid = Number(execFileSync('id', ['-g', name], { encoding: 'utf8' }).trim());
  return { name, uid, gid };
}

/** Runs a command as `user` (setpriv: no PAM, no terminal needed). */
export function runAs(user: User, cmd: string, args: string[], input?: string): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync('setpriv', [`--reuid=${user.uid}`, `--regid=${user.gid}`, '--clear-groups', cmd, ...args], { encoding: 'utf8', input, timeout: 120_000 });
  return { status: r.status, stdout: String(r.stdout), stderr: String(r.stderr) };
}

/** The CLI, run as `user`. */
export function cliAs(user: User, args: string[]): { status: number | null; stdout: string; stderr: string } {
  return runAs(user, process.execPath, [BIN, ...args]);
}

function mountsUnder(predicate: (source: string, target: string) => boolean): string[] {
  return readFileSync('/proc/self/mounts', 'utf8').split('\n')
    .map((l) => l.split(' '))
    .filter((f) => f[1] !== undefined && predicate(f[0] ?? '', f[1]))
    .map((f) => f[1] ?? '');
}

/** Every loop device whose image is a test volume's, as [device, backing file]. */
export function testLoops(): [string, string][] {
  const out = spawnSync('losetup', ['--list', '--noheadings', '--output', 'NAME,BACK-FILE'], { encoding: 'utf8' }).stdout;
  return out.split('\n').map((l) => l.trim().split(/\s+/) as [string, string])
    .filter(([, back]) => back?.startsWith(`/run/vbd-shadow/${TEST_PREFIX}`) === true);
}

/** Removes whatever test volumes left in the kernel: mounts, loop devices, tmpfs, names. */
export function sweep(): void {
  for (const [device] of testLoops()) {
    for (const target of mountsUnder((source) => source === device)) {
      spawnSync('fsfreeze', ['--unfreeze', target]); // a killed daemon may have left it frozen
      spawnSync('umount', [target]);
      spawnSync('umount', ['-l', target]);
    }
    spawnSync('losetup', ['--detach', device]);
  }
  for (const target of mountsUnder((_s, t) => t.startsWith(`/run/vbd-shadow/${TEST_PREFIX}`))) spawnSync('umount', ['-l', target]);
  if (existsSync('/run/vbd-shadow')) {
    for (const name of readdirSync('/run/vbd-shadow').filter((n) => n.startsWith(TEST_PREFIX))) {
      rmSync(`/run/vbd-shadow/${name}`, { recursive: true, force: true });
    }
  }
  if (existsSync('/dev/vbd-shadow')) {
    for (const name of readdirSync('/dev/vbd-shadow').filter((n) => n.startsWith(TEST_PREFIX))) rmSync(`/dev/vbd-shadow/${name}`, { force: true });
  }
}

/** What the kernel holds for test volumes right now (empty when all is clean). */
export function leftovers(): string[] {
  return [
    ...testLoops().map(([d, b]) => `loop ${d} -> ${b}`),
    ...mountsUnder((_s, t) => t.startsWith(`/run/vbd-shadow/${TEST_PREFIX}`)).map((t) => `mount ${t}`),
  ];
}

export function procStatus(pid: number, field: string): number {
  const match = new RegExp(`^${field}:\\s+(\\d+) kB$`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return match === null ? 0 : Number(match[1]) * 1024;
}
