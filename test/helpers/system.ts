// Root-only integration helpers: a real unprivileged user, running as that user, and a sweep
// that removes every loop device, mount and tmpfs image a test volume may have left behind.

import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync, readdirSync, rmSync, rmdirSync } from 'node:fs';
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

/** A field of /proc/self/mounts as the path it names (the kernel writes space, tab, newline and \\ as octal escapes). */
function unescapeMountField(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_m, octal: string) => String.fromCharCode(parseInt(octal, 8)));
}

function mountsUnder(predicate: (source: string, target: string) => boolean): string[] {
  return readFileSync('/proc/self/mounts', 'utf8').split('\n')
    .map((l) => l.split(' ').map(unescapeMountField))
    .filter((f) => f[1] !== undefined && predicate(f[0] ?? '', f[1]))
    .map((f) => f[1] ?? '');
}

function list(dir: string): string[] {
  try {
    return readdirSync(dir);
  } catch {
    return [];
  }
}

/** Runtime directories (/run/vbd-shadow/UID/DEV.INO) of test volumes: those named TEST_PREFIX…. */
export function testRuntimeDirs(): string[] {
  const dirs: string[] = [];
  for (const uid of list('/run/vbd-shadow')) {
    for (const key of list(`/run/vbd-shadow/${uid}`)) {
      const dir = `/run/vbd-shadow/${uid}/${key}`;
      try {
        if ((JSON.parse(readFileSync(`${dir}/status.json`, 'utf8')) as { name: string }).name.startsWith(TEST_PREFIX)) dirs.push(dir);
      } catch {
        /* not a volume's directory, or no status yet */
      }
    }
  }
  return dirs;
}

/** The runtime directory of the test volume called `name`. */
export function runtimeDirOf(name: string): string {
  const dir = testRuntimeDirs().find((d) => (JSON.parse(readFileSync(`${d}/status.json`, 'utf8')) as { name: string }).name === name);
  if (dir === undefined) throw new Error(`no runtime directory for ${name}`);
  return dir;
}

/** Every loop device whose image is a test volume's, as [device, backing file]. */
export function testLoops(): [string, string][] {
  const dirs = testRuntimeDirs();
  const out = spawnSync('losetup', ['--list', '--noheadings', '--output', 'NAME,BACK-FILE'], { encoding: 'utf8' }).stdout;
  return out.split('\n').map((l) => l.trim().split(/\s+/) as [string, string])
    .filter(([, back]) => back !== undefined && dirs.some((d) => back.startsWith(`${d}/`)));
}

/** Loop devices beyond the machine's own eight that nothing holds any more (per-session ones). */
function removeSpareLoops(): void {
  for (const entry of list('/sys/block').filter((n) => /^loop\d+$/.test(n) && Number(n.slice(4)) >= 8)) {
    if (list(`/sys/block/${entry}/loop`).length === 0) spawnSync('python3', ['-c', `import fcntl,os;fd=os.open('/dev/loop-control',os.O_RDWR)\ntry: fcntl.ioctl(fd,0x4C81,${entry.slice(4)})\nexcept OSError: pass`]);
  }
}

/** vbd-shadow's tracefs instances whose daemon is gone (vbd-shadow-UID-DEV.INO-PID). */
export function staleTraceInstances(): string[] {
  return list('/sys/kernel/tracing/instances').filter((n) => {
    const pid = /^vbd-shadow-\d+-\d+\.\d+-(\d+)$/.exec(n)?.[1];
    if (pid === undefined) return false;
    try {
      process.kill(Number(pid), 0);
      return false;
    } catch (err) {
      return (err as { code?: string }).code === 'ESRCH';
    }
  });
}

/** Removes whatever test volumes left in the kernel: mounts, loop devices, tmpfs, names, trace instances. */
export function sweep(): void {
  for (const name of staleTraceInstances()) {
    try {
      rmdirSync(`/sys/kernel/tracing/instances/${name}`);
    } catch {
      /* listed by leftovers() */
    }
  }
  for (const [device] of testLoops()) {
    for (const target of mountsUnder((source) => source === device)) {
      spawnSync('fsfreeze', ['--unfreeze', target]); // a killed daemon may have left it frozen
      spawnSync('umount', [target]);
      spawnSync('umount', ['-l', target]);
    }
    spawnSync('losetup', ['--detach', device]);
  }
  for (const dir of testRuntimeDirs()) {
    for (const target of mountsUnder((_s, t) => t.startsWith(`${dir}/`))) spawnSync('umount', ['-l', target]);
    rmSync(dir, { recursive: true, force: true });
  }
  for (const owner of list('/dev/vbd-shadow')) {
    for (const name of list(`/dev/vbd-shadow/${owner}`).filter((n) => n.startsWith(TEST_PREFIX))) rmSync(`/dev/vbd-shadow/${owner}/${name}`, { force: true });
  }
  removeSpareLoops();
}

/** What the kernel holds for test volumes right now (empty when all is clean). */
export function leftovers(): string[] {
  const dirs = testRuntimeDirs();
  return [
    ...testLoops().map(([d, b]) => `loop ${d} -> ${b}`),
    ...mountsUnder((_s, t) => dirs.some((d) => t.startsWith(`${d}/`))).map((t) => `mount ${t}`),
    ...staleTraceInstances().map((n) => `trace instance ${n}`),
  ];
}

export function procStatus(pid: number, field: string): number {
  const match = new RegExp(`^${field}:\\s+(\\d+) kB$`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return match === null ? 0 : Number(match[1]) * 1024;
}

/** Whether something is mounted at `path` (from /proc/self/mounts). */
export function isMounted(path: string): boolean {
  return mountsUnder((_s, t) => t === path).length > 0;
}
