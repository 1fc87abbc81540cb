// Making untrusted text safe to print on one line of a log or a terminal: control characters,
// newlines, ESC, DEL, C1 controls, Unicode line separators and bidi overrides become visible
// escapes (\x1b, \x0a, \u{202e}); bytes that are not valid UTF-8 become \xNN. Long input is cut
// with a note of how much was left out. Pure: no I/O.

/** Code points that must never reach a terminal or a log line raw. */
function needsEscape(cp: number): boolean {
  return cp < 0x20 || (cp >= 0x7f && cp <= 0x9f)
    || cp === 0x2028 || cp === 0x2029 // line / paragraph separator
    || cp === 0x200e || cp === 0x200f || (cp >= 0x202a && cp <= 0x202e) || (cp >= 0x2066 && cp <= 0x2069) // bidi
    || (cp >= 0xd800 && cp <= 0xdfff) // a lone surrogate
    || cp === 0xfeff;
}

function hex2(n: number): string {
  return `\\x${n.toString(16).padStart(2, '0')}`;
}

function escapeCodePoint(cp: number): string {
  return cp <= 0xff ? hex2(cp) : `\\u{${cp.toString(16)}}`;
}

/** `text` with every unsafe code point escaped; at most `maxChars` code points of it are kept. */
export function escapeText(text: string, maxChars = Number.POSITIVE_INFINITY): string {
  let out = '';
  let kept = 0;
  let i = 0;
  while (i < text.length) {
    if (kept >= maxChars) return `${out}…(${text.length - i} more chars)`;
    const cp = text.codePointAt(i) as number;
    const width = cp > 0xffff ? 2 : 1;
    out += needsEscape(cp) ? escapeCodePoint(cp) : text.slice(i, i + width);
    i += width;
    kept++;
  }
  return out;
}

/** The valid UTF-8 sequence at `i` (its length 1–4 and code point), or undefined if none starts there. */
function utf8Sequence(bytes: Uint8Array, i: number): { length: number; cp: number } | undefined {
  const b0 = bytes[i] as number;
  if (b0 < 0x80) return { length: 1, cp: b0 };
  let length: number;
  let cp: number;
  let min: number;
  if (b0 >= 0xc2 && b0 <= 0xdf) [length, cp, min] = [2, b0 & 0x1f, 0x80];
  else if (b0 >= 0xe0 && b0 <= 0xef) [length, cp, min] = [3, b0 & 0x0f, 0x800];
  else if (b0 >= 0xf0 && b0 <= 0xf4) [length, cp, min] = [4, b0 & 0x07, 0x10000];
  else return undefined;
  if (i + length > bytes.length) return undefined;
  for (let k = 1; k < length; k++) {
    const b = bytes[i + k] as number;
    if ((b & 0xc0) !== 0x80) return undefined;
    cp = (cp << 6) | (b & 0x3f);
  }
  if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return undefined;
  return { length, cp };
}

/**
 * Raw bytes (e.g. a line from a pipe) as printable text: valid UTF-8 is kept where safe,
 * everything else escaped; at most `maxBytes` of the input are shown.
 */
export function escapeBytes(bytes: Uint8Array, maxBytes = Number.POSITIVE_INFINITY): string {
  const end = Math.min(bytes.length, maxBytes);
  let out = '';
  let i = 0;
  while (i < end) {
    const seq = utf8Sequence(bytes, i);
    if (seq === undefined || i + seq.length > end) {
      out += hex2(bytes[i] as number);
      i++;
      continue;
    }
    out += needsEscape(seq.cp) ? escapeCodePoint(seq.cp) : String.fromCodePoint(seq.cp);
    i += seq.length;
  }
  return end < bytes.length ? `${out}…(${bytes.length - end} more bytes)` : out;
}
