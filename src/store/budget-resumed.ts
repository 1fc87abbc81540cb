// What a sealed store did to its nonce budget when root's record was ahead of its files, and
// the one line status, inspect and the log say of it. Apart from the chunk store: `status`
// shows it and must load nothing heavy (koffi comes with the store's syscalls).

import type { NonceBudgetState } from './slot.js';

/** What opening against a SealFloor ahead of the files did to the nonce budget (or, read-only, would do at a write). */
export interface BudgetResumed {
  /** The budget as the files have it (the map's count, raised by the files' own reservation). */
  files: NonceBudgetState;
  /** What root's record says may have been used under its generation ('unknown': an older record). */
  record: NonceBudgetState | 'unknown';
  /** Where seals continue. */
  now: NonceBudgetState;
  /** `count-raised`: the files' generation, its count raised to the record's; `fresh-generation`: a generation no seal has used (count 0), the manifest re-wrapped for it. */
  how: 'count-raised' | 'fresh-generation';
  /** False for a read-only open: what a write would do; nothing was changed. */
  applied: boolean;
}

/** One line for the log, status and inspect: what a BudgetResumed did. */
export function describeResumed(b: BudgetResumed): string {
  const record = b.record === 'unknown'
    ? 'root\'s record is from before it kept seal counts (any generation it reserved epochs for may have sealed)'
    : `root's record says up to ${b.record.used} seals under key generation ${b.record.generation} may have been used`;
  const now = b.how === 'count-raised'
    ? `seals continue under key generation ${b.now.generation} from count ${b.now.used}`
    : `seals continue under fresh key generation ${b.now.generation} from count 0 (manifest re-wrapped)`;
  return `the files' nonce budget is ${b.files.used} seals under key generation ${b.files.generation}, ${record}: ${b.applied ? '' : 'at the next writable open, '}${now}`;
}
