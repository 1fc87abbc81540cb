// `module:PATH`: the user's own layout, a JS module exporting
//   createLayout(geometry, params) → { place(chunk) → { file, offset } }
// It is user code, so it never runs in this process: it always runs in the child runner
// (module-runner.ts), confined by src/sys/run-as.ts — as the volume owner when we are root,
// as ourselves otherwise — and whatever it returns is validated like any other layout.
// Before that, the module file and every directory above it must be changeable only by the
// owner or root: nobody else may put code there that would run as the owner.

import { closeSync, fstatSync, lstatSync, openSync, realpathSync, constants as fsc, type Stats } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { VbdError, failure } from '../common/errors.js';
import { lastLine, runConfined } from '../sys/run-as.js';
import { currentUser, type Owner } from '../volume/owner.js';
import type { Geometry, PlacementTable } from './layout.js';

const RUNNER = fileURLToPath(new URL('./module-runner.js', import.meta.url));
/** open(2) O_PATH: a handle to stat, never to read or write (Node does not export the flag). */
const O_PATH = 0o10000000;
/** Bytes the runner writes per chunk: an f64 offset and a u32 file index. */
export const RUNNER_BYTES_PER_CHUNK = 12;

/** Wall-clock limit for a module: 10 s to start, plus 4 µs per chunk (a 2^24-chunk volume gets ~77 s). */
export function moduleTimeoutMs(chunkCount: number): number {
  return 10_000 + Math.ceil((chunkCount * 4) / 1000);
}

const mode = (st: Stats): string => (st.mode & 0o7777).toString(8);

function checkChangeableOnlyBy(st: Stats, owner: Owner, what: string): void {
  if (st.uid !== owner.uid && st.uid !== 0) {
    throw new VbdError(`${what} is owned by uid ${st.uid}, neither the volume owner (uid ${owner.uid}) nor root`);
  }
}

/**
 * Checks the module file (regular, not a symlink, owned by the owner or root, not writable by
 * group or others) and each directory above it (owned by the owner or root, not writable by
 * group or others unless sticky). Returns the path with its directories' symlinks resolved:
 * the one the runner imports.
 */
export function checkModuleFile(path: string, owner: Owner): string {
  let realDir: string;
  try {
    realDir = realpathSync(dirname(path));
  } catch (err) {
    throw failure(`layout module ${path}: cannot resolve its directory`, err);
  }
  const real = join(realDir, basename(path));
  for (let dir = realDir; ; dir = dirname(dir)) {
    const st = lstatSync(dir);
    const what = `layout module ${path}: directory ${dir}`;
    checkChangeableOnlyBy(st, owner, what);
    if ((st.mode & 0o022) !== 0 && (st.mode & 0o1000) === 0) {
      throw new VbdError(`${what} is writable by group or others (mode ${mode(st)}); chmod go-w it or move the module`);
    }
    if (dir === '/') break;
  }
  let fd: number;
  try {
    fd = openSync(real, O_PATH | fsc.O_NOFOLLOW);
  } catch (err) {
    throw failure(`cannot open layout module ${path}`, err);
  }
  try {
    const st = fstatSync(fd);
    if (st.isSymbolicLink()) throw new VbdError(`layout module ${path} is a symbolic link (refused)`);
    if (!st.isFile()) throw new VbdError(`layout module ${path} is not a regular file`);
    checkChangeableOnlyBy(st, owner, `layout module ${path}`);
    if ((st.mode & 0o022) !== 0) throw new VbdError(`layout module ${path} is writable by group or others (mode ${mode(st)}); chmod go-w it`);
  } finally {
    closeSync(fd);
  }
  return real;
}

/**
 * Computes a module layout's table in the confined child runner and reads it back. The caller
 * has checked that 12 bytes per chunk fit in memory: that buffer becomes the table itself.
 */
export async function userModuleTable(owner: Owner, path: string, geometry: Geometry, params: Record<string, unknown>): Promise<PlacementTable> {
  const real = checkModuleFile(path, owner);
  const account = process.geteuid?.() === 0 ? owner : currentUser();
  const n = geometry.chunkCount;
  const what = `layout module ${path}`;
  const r = await runConfined({
    account,
    command: process.execPath,
    args: [RUNNER],
    input: JSON.stringify({ path: real, geometry, params }),
    timeoutMs: moduleTimeoutMs(n),
    stdoutBytes: n * RUNNER_BYTES_PER_CHUNK,
    what,
  });
  if (r.code !== 0) {
    const line = lastLine(r.stderrTail);
    const how = r.signal !== null ? `killed by ${r.signal}` : `exit ${r.code}`;
    throw new VbdError(line.startsWith(`layout module ${real}`) || line.startsWith(`cannot load layout module ${real}`)
      ? line
      : `${what} failed as uid ${account.uid} (${how})${line === '' ? '' : `: ${line}`}`);
  }
  if (r.stdoutLength !== n * RUNNER_BYTES_PER_CHUNK) {
    throw new VbdError(`${what}: the runner wrote ${r.stdoutLength} bytes, expected ${n * RUNNER_BYTES_PER_CHUNK} (${n} chunks)`);
  }
  return {
    offset: new Float64Array(r.stdout.buffer, r.stdout.byteOffset, n),
    file: new Uint32Array(r.stdout.buffer, r.stdout.byteOffset + n * 8, n),
  };
}
