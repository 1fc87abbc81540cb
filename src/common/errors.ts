// One error family for the whole tool. Library code throws VbdError with a message that
// already names what failed (file, chunk, syscall); only the CLI decides the exit code.

/**
 * What kind of failure an error is; the CLI turns each kind into its exit code
 * (src/common/exit-codes.ts, mapped in src/cli/main.ts). `failed` is everything not more precise.
 */
export type ErrorKind = 'failed' | 'usage' | 'not-found' | 'refused' | 'wrong-key' | 'busy' | 'io' | 'interrupted' | 'stdout-closed';

export interface VbdErrorOptions {
  cause?: unknown;
  kind?: ErrorKind;
}

/** An error meant for the user: `message` is the one line they will see. */
export class VbdError extends Error {
  readonly kind: ErrorKind;
  constructor(message: string, options?: VbdErrorOptions) {
    super(message, options);
    this.name = 'VbdError';
    this.kind = options?.kind ?? 'failed';
  }
}

/** The command line itself is wrong: an unknown or malformed value, options that contradict. */
export class UsageError extends VbdError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, { ...options, kind: 'usage' });
    this.name = 'UsageError';
  }
}

/** What the command names does not exist: a directory, a file, a live volume of that name. */
export class NotFoundError extends VbdError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, { ...options, kind: 'not-found' });
    this.name = 'NotFoundError';
  }
}

/** A check refused to go on (ownership, modes, symlinks, privileges); nothing was changed. */
export class RefusedError extends VbdError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, { ...options, kind: 'refused' });
    this.name = 'RefusedError';
  }
}

/** The key or passphrase does not open the volume. */
export class WrongKeyError extends VbdError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, { ...options, kind: 'wrong-key' });
    this.name = 'WrongKeyError';
  }
}

/** The volume is live (a daemon holds it) or something else holds what the command needs. */
export class BusyError extends VbdError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, { ...options, kind: 'busy' });
    this.name = 'BusyError';
  }
}

/** Reading or writing failed (EIO, ENOSPC, a read-only file system …) or data failed its check. */
export class IoError extends VbdError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, { ...options, kind: 'io' });
    this.name = 'IoError';
  }
}

/** Standard output was closed by its reader (`| head`): the CLI ends quietly. */
export class StdoutClosedError extends VbdError {
  constructor(options?: { cause?: unknown }) {
    super('standard output closed', { ...options, kind: 'stdout-closed' });
    this.name = 'StdoutClosedError';
  }
}

/** The user cancelled (Ctrl-C at a prompt). */
export class InterruptedError extends VbdError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, { ...options, kind: 'interrupted' });
    this.name = 'InterruptedError';
  }
}

const errnoText: Record<string, string> = {
  ENOENT: 'no such file or directory',
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
  ELOOP: 'is a symbolic link (refused)',
  ENOSPC: 'no space left on device',
  EIO: 'input/output error',
  EROFS: 'read-only file system',
  EEXIST: 'already exists',
  ENOTDIR: 'not a directory',
  EISDIR: 'is a directory',
  EBUSY: 'device or resource busy',
  ENOMEM: 'cannot allocate memory',
  EAGAIN: 'resource temporarily unavailable',
  EINVAL: 'invalid argument',
  EXDEV: 'cross-device link',
  ENXIO: 'no such device or address',
  EOPNOTSUPP: 'operation not supported',
  EDQUOT: 'disk quota exceeded',
  EFBIG: 'file too large',
  EPIPE: 'broken pipe',
  EADDRINUSE: 'address already in use',
  EADDRNOTAVAIL: 'address not available on this machine',
};

/** The errno code of a Node system error, if it is one. */
export function errnoCode(err: unknown): string | undefined {
  if (typeof err === 'object' && err !== null && 'code' in err) {
    const code = (err as { code: unknown }).code;
    if (typeof code === 'string') return code;
  }
  return undefined;
}

/** Readable text for an errno code ("ENOSPC" → "no space left on device (ENOSPC)"). */
export function describeErrno(code: string): string {
  const text = errnoText[code];
  return text === undefined ? code : `${text} (${code})`;
}

/** The kind of failure an errno stands for (the rest: `failed`). */
const errnoKind: Record<string, ErrorKind> = {
  ENOENT: 'not-found',
  ENOTDIR: 'not-found',
  EACCES: 'refused',
  EPERM: 'refused',
  ELOOP: 'refused',
  EBUSY: 'busy',
  EIO: 'io',
  ENOSPC: 'io',
  EDQUOT: 'io',
  EROFS: 'io',
  EFBIG: 'io',
  EPIPE: 'io',
  EADDRINUSE: 'busy',
};

/** The kind of failure an errno code stands for. */
export function kindOfErrno(code: string): ErrorKind {
  return errnoKind[code] ?? 'failed';
}

/** The kind of any error: a VbdError's own, else by its errno. */
export function kindOf(err: unknown): ErrorKind {
  if (err instanceof VbdError) return err.kind;
  const code = errnoCode(err);
  return code !== undefined ? kindOfErrno(code) : 'failed';
}

/** Wraps any error with context: `what` says which operation on which object failed. Keeps its kind. */
export function failure(what: string, err: unknown): VbdError {
  if (err instanceof VbdError) return new VbdError(`${what}: ${err.message}`, { cause: err, kind: err.kind });
  const code = errnoCode(err);
  const reason = code !== undefined ? describeErrno(code) : err instanceof Error ? err.message : String(err);
  return new VbdError(`${what}: ${reason}`, { cause: err, kind: kindOf(err) });
}

/** Runs `fn`, turning any error into a VbdError that starts with `what`. */
export function withContext<T>(what: string, fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    throw failure(what, err);
  }
}
