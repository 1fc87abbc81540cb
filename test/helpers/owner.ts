// A volume owned by a real unprivileged user, in a "home" only that user can write.

import { chmodSync, chownSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from './tmp.js';
import { ensureUser, OTHER_USER, TEST_USER, type User } from './system.js';

export interface OwnedScratch {
  user: User;
  scratch: string;
  home: string;
}

export function ownedScratch(): OwnedScratch {
  const user = ensureUser(TEST_USER);
  const scratch = tempDir();
  chmodSync(scratch, 0o755);
  const home = join(scratch, 'home');
  mkdirSync(home, { mode: 0o755 });
  chownSync(home, user.uid, user.gid);
  return { user, scratch, home };
}

/** A second real user with a home of her own beside the first one's (`beside`: its scratch). */
export function otherHome(beside: string): { user: User; home: string } {
  const user = ensureUser(OTHER_USER);
  const home = join(beside, 'other-home');
  mkdirSync(home, { mode: 0o755 });
  chownSync(home, user.uid, user.gid);
  return { user, home };
}
