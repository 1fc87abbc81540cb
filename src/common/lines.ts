// Splitting a byte stream into newline-terminated lines of bounded length. A line longer than
// the limit is never accumulated: its bytes are counted and skipped up to its newline. The
// splitter keeps its own copy of an unfinished line (the caller may wipe its chunks) and wipes
// that copy once used (a line may carry key material). Pure: no I/O.

export type LineEvent =
  | { kind: 'line'; line: Buffer }
  /** A line longer than the limit, dropped; `length` counts its bytes without the newline. */
  | { kind: 'overlong'; length: number };

export class LineSplitter {
  private pending: Buffer;
  private pendingLength = 0;
  /** Bytes of an overlong line skipped so far (-1: not skipping). */
  private skipped = -1;

  constructor(readonly maxLine: number) {
    this.pending = Buffer.alloc(Math.min(maxLine, 4096));
  }

  /** Bytes of an unfinished line held or skipped (what is left if the stream ends now). */
  get unfinished(): number {
    return this.skipped >= 0 ? this.skipped : this.pendingLength;
  }

  /**
   * Feeds a chunk; calls `onLine` for each complete line (the Buffer is valid only during the
   * call) and for each overlong one.
   */
  push(chunk: Buffer, onLine: (event: LineEvent) => void): void {
    let start = 0;
    while (start < chunk.length) {
      const newline = chunk.indexOf(0x0a, start);
      const end = newline < 0 ? chunk.length : newline;
      const piece = chunk.subarray(start, end);
      if (this.skipped >= 0) {
        this.skipped += piece.length;
      } else if (this.pendingLength + piece.length > this.maxLine) {
        this.skipped = this.pendingLength + piece.length;
        this.clearPending();
      } else if (newline >= 0 && this.pendingLength === 0) {
        onLine({ kind: 'line', line: piece });
      } else {
        this.append(piece);
        if (newline >= 0) {
          const line = this.pending.subarray(0, this.pendingLength);
          onLine({ kind: 'line', line });
          this.clearPending();
        }
      }
      if (newline < 0) return;
      if (this.skipped >= 0) {
        onLine({ kind: 'overlong', length: this.skipped });
        this.skipped = -1;
      }
      start = newline + 1;
    }
  }

  /** Forgets (and wipes) whatever unfinished line is held. */
  reset(): void {
    this.clearPending();
    this.skipped = -1;
  }

  private append(piece: Buffer): void {
    const need = this.pendingLength + piece.length;
    if (need > this.pending.length) {
      const bigger = Buffer.alloc(Math.min(this.maxLine, Math.max(need, this.pending.length * 2)));
      this.pending.copy(bigger, 0, 0, this.pendingLength);
      this.pending.fill(0);
      this.pending = bigger;
    }
    piece.copy(this.pending, this.pendingLength);
    this.pendingLength = need;
  }

  private clearPending(): void {
    this.pending.fill(0, 0, this.pendingLength);
    this.pendingLength = 0;
  }
}
