// The volume owner as the system knows her: uid, and from /etc/passwd her primary gid, name and
// home (never the group of a directory she controls: a `user:root` directory must not give gid 0).

import { readFileSync } from 'node:fs';
import { VbdError } from '../common/errors.js';

export interface Owner {
  uid: number;
  gid: number;
  name: string;
  home: string;
}

/** The passwd entry of `uid`; refuses a uid without one. */
export function ownerOf(uid: number): Owner {
  for (const line of readFileSync('/etc/passwd', 'utf8').split('\n')) {
    const f = line.split(':');
    if (f.length >= 7 && Number(f[2]) === uid && f[2] === String(uid)) {
      return { uid, gid: Number(f[3]), name: f[0] ?? String(uid), home: f[5] ?? '/' };
    }
  }
  throw new VbdError(`uid ${uid} has no entry in /etc/passwd; a volume must belong to a real user`);
}
