// Who a volume belongs to: the uid that owns the volume directory, and that uid's passwd entry
// (primary gid, name, home). The gid always comes from /etc/passwd, never from the directory's
// group: a `user:root` directory must not make anything run or be chowned with gid 0.

import { readFileSync } from 'node:fs';
import { VbdError, failure } from '../common/errors.js';

export interface Owner {
  readonly uid: number;
  readonly gid: number;
  /** Login name, from /etc/passwd. */
  readonly name: string;
  /** Home directory, from /etc/passwd ("/" when the entry has none usable). */
  readonly home: string;
}

const PASSWD = '/etc/passwd';
const MAX_PASSWD_BYTES = 16 * 2 ** 20;
/** A name that is safe to put in an environment and a message. */
const NAME_RE = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\$?$/;

/** Parses passwd text and returns the first entry of `uid` (as getpwuid does), if any. */
export function ownerFromPasswd(text: string, uid: number): Owner | undefined {
  for (const line of text.split('\n')) {
    const f = line.split(':');
    if (f.length < 7 || f[2] !== String(uid)) continue;
    const name = f[0] ?? '';
    const gidText = f[3] ?? '';
    const gid = /^\d+$/.test(gidText) ? Number(gidText) : Number.NaN;
    if (!NAME_RE.test(name) || !Number.isSafeInteger(gid) || gid > 0xfffffffe) {
      throw new VbdError(`${PASSWD}: the entry of uid ${uid} is malformed (name ${JSON.stringify(name.slice(0, 64))}, gid ${JSON.stringify(gidText.slice(0, 16))})`);
    }
    const home = f[5] ?? '';
    return { uid, gid, name, home: home.startsWith('/') && !/[\0-\x1f\x7f]/.test(home) ? home : '/' };
  }
  return undefined;
}

/** The owner `uid`, from /etc/passwd; a uid without an entry is refused. */
export function ownerOfUid(uid: number, whose = `uid ${uid}`): Owner {
  if (!Number.isSafeInteger(uid) || uid < 0 || uid > 0xfffffffe) throw new VbdError(`${whose}: ${uid} is not a valid uid`);
  let text: string;
  try {
    text = readFileSync(PASSWD, 'utf8');
  } catch (err) {
    throw failure(`cannot read ${PASSWD} to find the owner (uid ${uid})`, err);
  }
  if (text.length > MAX_PASSWD_BYTES) throw new VbdError(`${PASSWD} is larger than ${MAX_PASSWD_BYTES} bytes; refusing to parse it`);
  const owner = ownerFromPasswd(text, uid);
  if (owner === undefined) throw new VbdError(`${whose} has no entry in ${PASSWD}; a volume owner must be a real user`);
  return owner;
}

/** The user this process runs as (its effective uid). */
export function currentUser(): Owner {
  const uid = process.geteuid?.() ?? 0;
  return ownerOfUid(uid, `the current user (uid ${uid})`);
}
