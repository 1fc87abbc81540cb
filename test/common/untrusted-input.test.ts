// Untrusted text made printable: no control byte, no newline, no ESC, no invalid UTF-8 survives.

import { describe, expect, it } from 'vitest';
import { escapeBytes, escapeText } from '../../src/common/escape.js';
import { LineSplitter, type LineEvent } from '../../src/common/lines.js';
import { TokenBucket, WindowBudget } from '../../src/common/rate.js';

const UNSAFE = /[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]/;

describe('escapeText / escapeBytes', () => {
  it('escapes control characters, newlines, ESC, C1, separators and bidi overrides', () => {
    const text = 'a\nb\r\x1b[2J\x1b]0;title\x07\u0085\u2028\u202eok\u{1f600}';
    const out = escapeText(text);
    expect(out).toBe('a\\x0ab\\x0d\\x1b[2J\\x1b]0;title\\x07\\x85\\u{2028}\\u{202e}ok\u{1f600}');
    expect(out).not.toMatch(UNSAFE);
  });

  it('escapes lone surrogates and truncates by code points', () => {
    expect(escapeText('x\ud800y')).toBe('x\\u{d800}y');
    expect(escapeText('abcdef', 3)).toBe('abc…(3 more chars)');
  });

  it('keeps valid UTF-8, escapes invalid bytes and truncated sequences, cuts long input', () => {
    const bytes = Buffer.concat([Buffer.from('héllo '), Buffer.from([0xff, 0xc0, 0xaf, 0x1b, 0xe2, 0x82]), Buffer.from('\u2028')]);
    const out = escapeBytes(bytes);
    expect(out).toBe('héllo \\xff\\xc0\\xaf\\x1b\\xe2\\x82\\u{2028}');
    expect(out).not.toMatch(UNSAFE);
    expect(escapeBytes(Buffer.alloc(100, 0x41), 10)).toBe(`${'A'.repeat(10)}…(90 more bytes)`);
    // A multi-byte character cut by the limit is shown as bytes, never half-decoded.
    expect(escapeBytes(Buffer.from('aé'), 2)).toBe('a\\xc3…(1 more bytes)');
  });
});

describe('LineSplitter', () => {
  const collect = (max: number, chunks: Buffer[]): { events: (string | number)[]; unfinished: number } => {
    const s = new LineSplitter(max);
    const events: (string | number)[] = [];
    const on = (e: LineEvent): void => {
      events.push(e.kind === 'line' ? e.line.toString() : e.length);
    };
    for (const c of chunks) s.push(c, on);
    return { events, unfinished: s.unfinished };
  };

  it('splits lines across chunks, empty lines included', () => {
    const r = collect(10, [Buffer.from('ab'), Buffer.from('c\n\nde'), Buffer.from('f\ngh')]);
    expect(r.events).toEqual(['abc', '', 'def']);
    expect(r.unfinished).toBe(2);
  });

  it('skips a line over the limit without holding it, and goes on after its newline', () => {
    const r = collect(4, [Buffer.from('12345'), Buffer.from('6789'), Buffer.from('0\nok\n1234\n')]);
    expect(r.events).toEqual([10, 'ok', '1234']);
    expect(r.unfinished).toBe(0);
  });

  it('wipes its copy of a line once used; the caller may wipe its chunks', () => {
    const s = new LineSplitter(64);
    const seen: string[] = [];
    const chunk = Buffer.from('{"secret":"abc');
    s.push(chunk, () => undefined);
    chunk.fill(0);
    s.push(Buffer.from('def"}\n'), (e) => {
      if (e.kind === 'line') seen.push(e.line.toString());
    });
    expect(seen).toEqual(['{"secret":"abcdef"}']);
    expect((s as unknown as { pending: Buffer }).pending.every((b) => b === 0)).toBe(true);
  });
});

describe('WindowBudget / TokenBucket', () => {
  it('counts what a window refuses and reports it when the window rolls', () => {
    const w = new WindowBudget(3, 1000);
    expect([0, 1, 2, 3, 4].map((t) => w.take(t))).toEqual([true, true, true, false, false]);
    expect(w.refusedNow).toBe(2);
    expect(w.msLeft(500)).toBe(500);
    expect(w.roll(999)).toBe(0);
    expect(w.roll(1000)).toBe(2);
    expect(w.take(1001)).toBe(true);
    expect(w.spend(1002, 10)).toBe(false);
    w.take(1003);
    expect(w.restart(1004)).toBe(1);
    expect(w.msLeft(1004)).toBe(1000);
    expect(w.take(1005, 3)).toBe(true);
  });

  it('a token bucket allows a burst, then its rate', () => {
    const b = new TokenBucket(2, 10);
    expect([b.take(0), b.take(0), b.take(0)]).toEqual([true, true, false]);
    expect(b.msUntilToken(0)).toBe(100);
    expect(b.take(100)).toBe(true);
    expect(b.take(150)).toBe(false);
  });
});
