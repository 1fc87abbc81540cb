// A stack of undo steps, pushed as resources are acquired and run in reverse at teardown
// (or when start fails halfway). A step marked `guard` protects user data: if it fails,
// unwinding stops there so that nothing below it (the RAM image) is freed. A step may leave
// work running that the steps after it need not wait for (`later`: the kernel removing a loop
// device or a trace instance): the unwind waits for all of it at its end. Each step is timed,
// and the unwind reports where its time went (one 'teardown-timings' event).

import { messageOf, roundMs, type Report, type StepTiming } from './events.js';

interface Step {
  what: string;
  undo: () => Promise<void> | void;
  guard: boolean;
}

export class CleanupStack {
  private readonly steps: Step[] = [];
  private readonly running: Promise<StepTiming>[] = [];

  push(what: string, undo: () => Promise<void> | void, options: { guard?: boolean } = {}): void {
    this.steps.push({ what, undo, guard: options.guard === true });
  }

  get size(): number {
    return this.steps.length;
  }

  /**
   * Work an undo step started that the next steps need not wait for (nothing they do depends
   * on it): awaited, timed and its failure reported at the end of the unwind.
   */
  later(what: string, work: Promise<unknown>, report: Report): void {
    const started = performance.now();
    this.running.push(work.then(
      () => ({ step: what, ms: roundMs(performance.now() - started), alongside: true }),
      (err: unknown) => {
        report({ kind: 'teardown-step-failed', step: what, error: messageOf(err) });
        return { step: what, ms: roundMs(performance.now() - started), alongside: true };
      },
    ));
  }

  /** Undoes everything; returns the error of a failed guard step (then the rest is kept). */
  async unwind(report: Report): Promise<Error | undefined> {
    const started = performance.now();
    const steps: StepTiming[] = [];
    let firstError: Error | undefined;
    while (this.steps.length > 0) {
      const step = this.steps.pop() as Step;
      const t0 = performance.now();
      try {
        await step.undo();
      } catch (err) {
        const error = err instanceof Error ? err : new Error(String(err));
        report({ kind: 'teardown-step-failed', step: step.what, error: error.message });
        firstError ??= error;
        if (step.guard) {
          firstError = error;
          break;
        }
      } finally {
        steps.push({ step: step.what, ms: roundMs(performance.now() - t0) });
      }
    }
    steps.push(...(await Promise.all(this.running.splice(0))));
    report({ kind: 'teardown-timings', ms: roundMs(performance.now() - started), steps });
    return firstError;
  }
}
