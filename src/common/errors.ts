// One error family for the whole tool. Library code throws VbdError with a message that
// already names what failed (file, chunk, syscall); only the CLI decides the exit code.

/** An error meant for the user: `message` is the one line they will see. */
export class VbdError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'VbdError';
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

/** Wraps any error with context: `what` says which operation on which object failed. */
export function failure(what: string, err: unknown): VbdError {
  if (err instanceof VbdError) return new VbdError(`${what}: ${err.message}`, { cause: err });
  const code = errnoCode(err);
  const reason = code !== undefined ? describeErrno(code) : err instanceof Error ? err.message : String(err);
  return new VbdError(`${what}: ${reason}`, { cause: err });
}

/** Runs `fn`, turning any error into a VbdError that starts with `what`. */
export function withContext<T>(what: string, fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    throw failure(what, err);
  }
}
