// A stack of undo steps, pushed as resources are acquired and run in reverse at teardown
// (or when start fails halfway). A step marked `guard` protects user data: if it fails,
// unwinding stops there so that nothing below it (the RAM image) is freed.

import type { Report } from './events.js';

interface Step {
  what: string;
  undo: () => Promise<void> | void;
  guard: boolean;
}

export class CleanupStack {
  private readonly steps: Step[] = [];

  push(what: string, undo: () => Promise<void> | void, options: { guard?: boolean } = {}): void {
    this.steps.push({ what, undo, guard: options.guard === true });
  }

  get size(): number {
    return this.steps.length;
  }

  /** Undoes everything; returns the error of a failed guard step (then the rest is kept). */
  async unwind(report: Report): Promise<Error | undefined> {
    let firstError: Error | undefined;
    while (this.steps.length > 0) {
      const step = this.steps.pop() as Step;
      try {
        await step.undo();
      } catch (err) {
        const error = err instanceof Error ? err : new Error(String(err));
        report({ kind: 'teardown-step-failed', step: step.what, error: error.message });
        firstError ??= error;
        if (step.guard) return error;
      }
    }
    return firstError;
  }
}
