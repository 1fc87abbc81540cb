// Child processes a test starts by hand: killed (and reaped) after each test, also when it fails.

import type { ChildProcess } from 'node:child_process';
import { Stage, eachTestCleanup } from './cleanup.js';

/** An array to push children into; everything in it is SIGKILLed and awaited after each test. */
export function trackedChildren(): ChildProcess[] {
  const children: ChildProcess[] = [];
  eachTestCleanup(Stage.Processes, async () => {
    for (const c of children.splice(0)) {
      if (c.exitCode === null && c.signalCode === null) {
        c.kill('SIGKILL');
        await new Promise((r) => c.once('exit', r));
      }
    }
  });
  return children;
}
