// The C library as koffi sees it, and the one way a failed call becomes an error: naming the
// call, what it was applied to, and the errno (with `.code` set, like Node's own errors).

import koffi from 'koffi';
import { VbdError, describeErrno, kindOfErrno } from '../common/errors.js';

export const libc = koffi.load('libc.so.6');

const ERRNO_NAMES: Record<number, string> = {
  1: 'EPERM', 2: 'ENOENT', 3: 'ESRCH', 5: 'EIO', 6: 'ENXIO', 9: 'EBADF', 11: 'EAGAIN', 12: 'ENOMEM', 13: 'EACCES',
  16: 'EBUSY', 17: 'EEXIST', 18: 'EXDEV', 19: 'ENODEV', 20: 'ENOTDIR', 21: 'EISDIR', 22: 'EINVAL', 25: 'ENOTTY',
  28: 'ENOSPC', 30: 'EROFS', 40: 'ELOOP', 75: 'EOVERFLOW', 95: 'EOPNOTSUPP', 98: 'EADDRINUSE', 99: 'EADDRNOTAVAIL',
};

export type SyscallError = VbdError & { code: string };

/** An error for the call that just failed (reads errno right away). */
export function syscallError(call: string, what: string): SyscallError {
  const errno = koffi.errno();
  const code = ERRNO_NAMES[errno] ?? `errno ${errno}`;
  const err = new VbdError(`${call} ${what}: ${describeErrno(code)}`, { kind: kindOfErrno(code) }) as SyscallError;
  err.code = code;
  return err;
}
