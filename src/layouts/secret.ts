// The secret behind a `keyed` layout: passphrase or key file → scrypt with the manifest's salt
// → a layout key and a key-check value. Only the salt and the check value are ever stored;
// a wrong secret is refused by the check before any backing file is read or written.

import { createHmac, randomBytes, scryptSync, timingSafeEqual } from 'node:crypto';
import { closeSync, fstatSync, openSync, constants as fsc } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { InterruptedError, RefusedError, UsageError, VbdError, WrongKeyError, errnoCode, failure } from '../common/errors.js';
import { readFully, readStdinUpTo } from '../common/fd.js';
import { scryptCostProblem, type ScryptParams } from '../volume/manifest.js';

export const DEFAULT_KDF: ScryptParams = { N: 2 ** 15, r: 8, p: 1 };
const CHECK_LABEL = 'vbd-shadow key-check v1';
const MAX_SECRET = 64 * 1024;

export interface DerivedKeys {
  layoutKey: Buffer;
  keyCheck: string;
}

export function newSalt(): string {
  return randomBytes(16).toString('hex');
}

/**
 * scrypt(secret, salt) → `length` bytes, under the capped parameters every volume uses
 * (128·N·r ≤ 256 MiB, p ≤ 4): refused before any work when the parameters exceed the caps.
 */
export function scryptDerive(secret: Buffer, salt: Buffer, kdf: ScryptParams, length: number): Buffer {
  const costly = scryptCostProblem(kdf);
  if (costly !== undefined) throw new VbdError(`scrypt parameters refused: ${costly}`);
  return scryptSync(secret, salt, length, {
    N: kdf.N,
    r: kdf.r,
    p: kdf.p,
    maxmem: 256 * kdf.N * kdf.r + 16 * 2 ** 20,
  });
}

/** scrypt(secret, salt) → 32 bytes for the permutation, 32 bytes for the check value. */
export function deriveKeys(secret: Buffer, salt: string, kdf: ScryptParams): DerivedKeys {
  const derived = scryptDerive(secret, Buffer.from(salt, 'hex'), kdf, 64);
  const layoutKey = Buffer.from(derived.subarray(0, 32));
  const keyCheck = createHmac('sha256', derived.subarray(32)).update(CHECK_LABEL).digest('hex');
  derived.fill(0);
  return { layoutKey, keyCheck };
}

/** The layout key if `secret` matches the manifest's check value; refuses otherwise. */
export function unlockLayoutKey(secret: Buffer, salt: string, kdf: ScryptParams, expectedCheck: string): Buffer {
  const { layoutKey, keyCheck } = deriveKeys(secret, salt, kdf);
  if (!timingSafeEqual(Buffer.from(keyCheck, 'hex'), Buffer.from(expectedCheck, 'hex'))) {
    layoutKey.fill(0);
    throw new WrongKeyError('wrong key: it does not match the volume\'s key-check value (nothing was read or written)');
  }
  return layoutKey;
}

/** Drops one trailing newline (so `echo pass > f` equals typing "pass"); wipes `secret`. */
function trimSecret(secret: Buffer, what: string): Buffer {
  const got = secret.length;
  const end = secret[got - 1] === 0x0a ? got - 1 : got;
  const trimmed = Buffer.from(secret.subarray(0, end));
  secret.fill(0);
  if (trimmed.length === 0) throw new UsageError(`${what} holds only a newline`);
  return trimmed;
}

/** `--key-file -`: the secret is all of standard input (a pipe or a file, not a terminal). */
function readKeyFromStdin(): Buffer {
  if (process.stdin.isTTY) throw new UsageError('--key-file -: standard input is a terminal; leave out --key-file to be asked without echo');
  let secret: Buffer | undefined;
  try {
    secret = readStdinUpTo(MAX_SECRET);
  } catch (err) {
    throw failure('cannot read the key from standard input', err);
  }
  if (secret === undefined) throw new UsageError(`the key on standard input must hold 1 to ${MAX_SECRET} bytes, holds more`);
  if (secret.length === 0) throw new UsageError('the key on standard input is empty');
  return trimSecret(secret, 'the key on standard input');
}

/**
 * Reads a key file: its bytes are the secret, less one trailing newline (so `echo pass > f`
 * equals typing "pass"). Refused if it is a symlink, not a regular file, or readable by others.
 * `-` is standard input.
 */
export function readKeyFile(path: string): Buffer {
  if (path === '-') return readKeyFromStdin();
  let fd: number;
  try {
    fd = openSync(path, fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK);
  } catch (err) {
    throw failure(`cannot read key file ${path}`, err);
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new RefusedError(`key file ${path} is not a regular file (for standard input give --key-file -)`);
    if ((st.mode & 0o077) !== 0) {
      throw new RefusedError(`key file ${path} is accessible by group or others (mode ${(st.mode & 0o777).toString(8)}); chmod 600 it`);
    }
    if (st.size === 0 || st.size > MAX_SECRET) throw new VbdError(`key file ${path} must hold 1 to ${MAX_SECRET} bytes, holds ${st.size}`);
    return trimSecret(readFully(fd, st.size, 0) ?? Buffer.alloc(0), `key file ${path}`);
  } finally {
    closeSync(fd);
  }
}

/** The default key file of volume `name`: ~/.config/vbd-shadow/NAME.key ($XDG_CONFIG_HOME if set), mode 0600. */
export function defaultKeyFile(name: string): string {
  return join(process.env['XDG_CONFIG_HOME'] ?? join(homedir(), '.config'), 'vbd-shadow', `${name}.key`);
}

/**
 * The secret in the default key file of volume `name`, or undefined if there is none. The agent
 * and every command that needs a key read it when no --key-file is given; a file that is there
 * but unfit (a symlink, readable by others, empty) is refused, never skipped.
 */
export function readDefaultKeyFile(name: string): Buffer | undefined {
  try {
    return readKeyFile(defaultKeyFile(name));
  } catch (err) {
    if (err instanceof VbdError && errnoCode(err.cause) === 'ENOENT') return undefined;
    throw err;
  }
}

/** Drops the last UTF-8 character of `bytes` (a lead byte and its continuation bytes), as Backspace does on a terminal. */
export function eraseLastCharacter(bytes: number[]): void {
  while (bytes.length > 0) {
    const byte = bytes.pop() ?? 0;
    if ((byte & 0xc0) !== 0x80) return; // not a continuation byte: the character's first byte
  }
}

export interface PromptOptions {
  /** An empty answer (just Enter) returns an empty buffer instead of being refused. */
  allowEmpty?: boolean;
}

/**
 * Reads a passphrase from the terminal without echo. Backspace (DEL or ^H) erases one UTF-8
 * character, ^U the whole line, ^C cancels (exit 130).
 */
export async function promptSecret(question: string, options: PromptOptions = {}): Promise<Buffer> {
  const input = process.stdin;
  if (!input.isTTY) throw new VbdError('this volume needs its key: give --key-file FILE (no terminal to ask on)');
  // Raw mode (no echo, no line editing by the kernel) before the question shows: what is typed
  // as soon as it appears is neither echoed nor edited byte by byte by the line discipline.
  input.setRawMode(true);
  process.stderr.write(question);
  input.resume();
  const bytes: number[] = [];
  try {
    await new Promise<void>((resolve, reject) => {
      const onData = (data: Buffer): void => {
        try {
          for (const byte of data) {
            if (byte === 0x03) return reject(new InterruptedError('cancelled'));
            if (byte === 0x0d || byte === 0x0a) return resolve();
            if (byte === 0x7f || byte === 0x08) eraseLastCharacter(bytes);
            else if (byte === 0x15) bytes.fill(0).length = 0;
            else bytes.push(byte);
          }
        } finally {
          data.fill(0);
        }
      };
      input.on('data', onData);
    });
  } finally {
    input.setRawMode(false);
    input.removeAllListeners('data');
    input.pause();
    process.stderr.write('\n');
  }
  const secret = Buffer.from(bytes);
  bytes.fill(0);
  if (secret.length === 0 && options.allowEmpty !== true) throw new VbdError('empty passphrase');
  return secret;
}
