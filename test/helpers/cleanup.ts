// One ordered cleanup after each test, also when it fails: stop daemons, release kernel state
// (mounts, loop devices, tmpfs images), and only then remove temporary directories — never
// recursing into something still mounted.

import { afterEach } from 'vitest';

export enum Stage {
  Processes = 0,
  Kernel = 1,
  Files = 2,
}

const steps: { stage: Stage; run: () => Promise<void> | void }[] = [];

/** Registers a cleanup that runs after every test, in stage order. */
export function eachTestCleanup(stage: Stage, run: () => Promise<void> | void): void {
  steps.push({ stage, run });
  steps.sort((a, b) => a.stage - b.stage);
}

afterEach(async () => {
  const errors: unknown[] = [];
  for (const step of steps) {
    try {
      await step.run();
    } catch (err) {
      errors.push(err);
    }
  }
  if (errors.length > 0) throw errors[0];
});
