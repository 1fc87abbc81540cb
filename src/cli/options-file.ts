// `start --options-file FILE`: more arguments for `start`, one per line, each line exactly one
// word of the command line — no quoting, no splitting, so a mount path with spaces is simply a
// line. The systemd unit passes /etc/vbd-shadow/<instance>.options this way (a `-` before the
// path, as in EnvironmentFile=-…, means a file that does not exist is no options). The file
// gives arguments to a root daemon, so it must be root's (or the caller's) and writable by
// nobody else, and it is opened once, without following symlinks.

import { closeSync, fstatSync, readSync, constants as fsc } from 'node:fs';
import { RefusedError, UsageError, VbdError, errnoCode, failure } from '../common/errors.js';
import { openNoSymlinks } from '../sys/open.js';

export const OPTIONS_FILE_OPTION = '--options-file';
const MAX_OPTIONS_FILE_BYTES = 64 * 1024;

/** The arguments in an options file: every line that is not blank or a # comment, as it is. */
export function parseOptionsText(text: string): string[] {
  return text.split('\n')
    .map((line) => (line.endsWith('\r') ? line.slice(0, -1) : line))
    .filter((line) => line.trim() !== '' && !line.trimStart().startsWith('#'));
}

/** Reads `spec` (`-PATH`: PATH if it exists); the arguments it holds. */
export function readOptionsFile(spec: string): string[] {
  const optional = spec.startsWith('-');
  const path = optional ? spec.slice(1) : spec;
  if (!path.startsWith('/')) throw new UsageError(`${OPTIONS_FILE_OPTION} needs an absolute path, got '${spec}'`);
  let fd: number;
  try {
    fd = openNoSymlinks(path, fsc.O_RDONLY | fsc.O_NOCTTY, path);
  } catch (err) {
    if (optional && errnoCode(err) === 'ENOENT') return [];
    throw failure(`cannot open the options file ${path}`, err);
  }
  try {
    const st = fstatSync(fd);
    const me = process.geteuid?.() ?? -1;
    if (!st.isFile()) throw new RefusedError(`options file ${path} is not a regular file`);
    if ((st.uid !== 0 && st.uid !== me) || (st.mode & 0o022) !== 0) {
      throw new RefusedError(`options file ${path} must be owned by root${me !== 0 ? ' or you' : ''} and writable by nobody else (it is uid ${st.uid}, mode ${(st.mode & 0o777).toString(8)})`);
    }
    if (st.size > MAX_OPTIONS_FILE_BYTES) throw new VbdError(`options file ${path} is larger than ${MAX_OPTIONS_FILE_BYTES} bytes`, { kind: 'usage' });
    const buf = Buffer.alloc(MAX_OPTIONS_FILE_BYTES + 1);
    let length = 0;
    for (let n; (n = readSync(fd, buf, length, buf.length - length, null)) > 0;) length += n;
    if (length > MAX_OPTIONS_FILE_BYTES) throw new VbdError(`options file ${path} is larger than ${MAX_OPTIONS_FILE_BYTES} bytes`, { kind: 'usage' });
    return parseOptionsText(buf.subarray(0, length).toString('utf8'));
  } finally {
    closeSync(fd);
  }
}

/**
 * `argv` with every `--options-file FILE` (or `--options-file=FILE`) of the `start` command
 * replaced by the file's arguments, in place. Other commands are left alone (commander refuses
 * the option there).
 */
export function expandOptionsFiles(argv: readonly string[]): string[] {
  const args = argv.slice(2);
  if (args.find((a) => !a.startsWith('-')) !== 'start') return [...argv];
  const out = argv.slice(0, 2);
  for (let i = 0; i < args.length; i++) {
    const arg = args[i] ?? '';
    if (arg === '--') {
      out.push(...args.slice(i));
      break;
    }
    if (arg === OPTIONS_FILE_OPTION || arg.startsWith(`${OPTIONS_FILE_OPTION}=`)) {
      const spec = arg === OPTIONS_FILE_OPTION ? args[++i] : arg.slice(OPTIONS_FILE_OPTION.length + 1);
      if (spec === undefined || spec === '') throw new UsageError(`${OPTIONS_FILE_OPTION} needs a file`);
      const words = readOptionsFile(spec);
      if (words.includes(OPTIONS_FILE_OPTION) || words.some((w) => w.startsWith(`${OPTIONS_FILE_OPTION}=`))) {
        throw new UsageError(`options file ${spec}: ${OPTIONS_FILE_OPTION} cannot be nested`);
      }
      out.push(...words);
    } else out.push(arg);
  }
  return out;
}
