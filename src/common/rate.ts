// Rate bounds for input a user controls and for the log. Pure: the caller passes the time.

/**
 * Counts usage in fixed windows of `windowMs`: the first `limit` units of a window fit, the
 * rest are over. Rolling into a new window reports how much the closed one refused.
 */
export class WindowBudget {
  private start = Number.NEGATIVE_INFINITY;
  private used = 0;
  private refused = 0;

  constructor(readonly limit: number, readonly windowMs: number) {}

  /**
   * Starts a new window if the current one is over; returns the units refused in the window
   * that closed (0 if none, or if it had not ended).
   */
  roll(now: number): number {
    if (now - this.start < this.windowMs) return 0;
    const refused = this.refused;
    this.start = now;
    this.used = 0;
    this.refused = 0;
    return refused;
  }

  /** Ends the current window now (whether it is over or not) and starts the next; returns what it refused. */
  restart(now: number): number {
    this.start = Number.NEGATIVE_INFINITY;
    return this.roll(now);
  }

  /** Uses `amount` units if they fit in the current window; else counts them as refused. */
  take(now: number, amount = 1): boolean {
    this.roll(now);
    if (this.used + amount > this.limit) {
      this.refused += amount;
      return false;
    }
    this.used += amount;
    return true;
  }

  /** Uses `amount` units whether they fit or not (input already read); true while some are left. */
  spend(now: number, amount: number): boolean {
    this.roll(now);
    this.used += amount;
    return this.used < this.limit;
  }

  /** Units refused so far in the current window. */
  get refusedNow(): number {
    return this.refused;
  }

  /** Milliseconds until the current window ends. */
  msLeft(now: number): number {
    return Math.max(0, this.start + this.windowMs - now);
  }
}

/** A token bucket: bursts of up to `capacity`, refilled at `perSecond`. */
export class TokenBucket {
  private tokens: number;
  private last: number | undefined;

  constructor(readonly capacity: number, readonly perSecond: number) {
    this.tokens = capacity;
  }

  private refill(now: number): void {
    if (this.last !== undefined) this.tokens = Math.min(this.capacity, this.tokens + ((now - this.last) / 1000) * this.perSecond);
    this.last = now;
  }

  take(now: number): boolean {
    this.refill(now);
    if (this.tokens < 1) return false;
    this.tokens -= 1;
    return true;
  }

  /** Milliseconds until a token is available. */
  msUntilToken(now: number): number {
    this.refill(now);
    return this.tokens >= 1 ? 0 : Math.ceil(((1 - this.tokens) / this.perSecond) * 1000);
  }
}
