// The exit statuses of every vbd-shadow command, in one table: the README, the man page and
// `vbd-shadow --help` list these, and only src/cli/main.ts decides which one a run ends with.
// A volume left unchanged by a refused command is the rule for every status but 0.

export const EXIT = {
  /** Done. */
  ok: 0,
  /** Any failure not listed below (including an internal error). */
  failed: 1,
  /** Wrong command line: unknown command or option, a malformed value, options that contradict. */
  usage: 2,
  /** No such volume directory, manifest, file, or no live volume of that name. */
  notFound: 3,
  /** Refused by a check: ownership, modes, symlinks, not root, an interrupted flush to settle first. */
  refused: 4,
  /** The key or passphrase does not open the volume. */
  wrongKey: 5,
  /** The volume is live (a daemon holds it) or its device or mount is busy. */
  busy: 6,
  /** Reading or writing failed (EIO, ENOSPC, a read-only file system) or data failed its check. */
  io: 7,
  /** Cancelled with Ctrl-C (128 + SIGINT, as a shell reports a process SIGINT ended). */
  interrupted: 130,
  /** Standard output was closed early (`| head`): a quiet end, as for a process SIGPIPE ended. */
  stdoutClosed: 141,
} as const;

export type ExitStatus = (typeof EXIT)[keyof typeof EXIT];

/** One line per status, for `--help` (the README and the man page say the same). */
export const EXIT_SUMMARY: readonly (readonly [ExitStatus, string])[] = [
  [EXIT.ok, 'done'],
  [EXIT.failed, 'any other failure'],
  [EXIT.usage, 'usage: unknown command or option, malformed value, contradictory options'],
  [EXIT.notFound, 'not found: volume directory, manifest, file, or no live volume of that name'],
  [EXIT.refused, 'refused by a check (ownership, modes, symlinks, root needed); nothing changed'],
  [EXIT.wrongKey, 'wrong key or passphrase'],
  [EXIT.busy, 'busy: the volume is live, or its device or mount is in use'],
  [EXIT.io, 'I/O failure (EIO, ENOSPC, read-only) or data that fails its check'],
  [EXIT.interrupted, 'cancelled with Ctrl-C'],
  [EXIT.stdoutClosed, 'standard output closed early (e.g. | head); quiet'],
];
