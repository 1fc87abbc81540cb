// The passphrase prompt on a real terminal (a pty, test/fixtures/pty-run.py): Backspace erases
// one UTF-8 character (not one byte), ^U the line; a wrong passphrase is asked again, three
// tries in all, then refused with the wrong-key status; inspect's prompt can be skipped.

import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { EXIT } from '../../src/common/exit-codes.js';
import { cliOk, treeHash } from '../helpers/cli.js';
import { onTerminal } from '../helpers/pipes.js';
import { keyFile, tempDir } from '../helpers/tmp.js';

const SIZE = 256 * 1024;
const PASS = 'pässwörd';
/** A name no default key file (~/.config/vbd-shadow/NAME.key) of the test runner holds. */
const NAME = `prompt-${process.pid}`;
const QUESTION = `Passphrase of sealed volume '${NAME}': `;

function sealedVolume(): { scratch: string; dir: string } {
  const scratch = tempDir();
  const dir = join(scratch, 'vol');
  cliOk(['init', dir, '--size', '256K', '--files', '2', '--chunk', '4K', '--sealed', '--name', NAME, '--key-file', keyFile(scratch, PASS)]);
  return { scratch, dir };
}

const count = (text: string, part: string): number => text.split(part).length - 1;

describe('passphrase prompt', () => {
  it('Backspace erases a whole UTF-8 character, ^U the whole line', () => {
    const { scratch, dir } = sealedVolume();
    const out = join(scratch, 'out.img');
    // "pässwördé", Backspace (é is two bytes), Enter: "pässwörd".
    const r = onTerminal(['export', dir, out], [['expect', QUESTION], ['send', 'pässwördé\x7f\r']]);
    expect(r.status, r.output).toBe(0);
    expect(readFileSync(out).equals(Buffer.alloc(SIZE))).toBe(true);
    expect(count(r.output, QUESTION)).toBe(1);
    // ö erased by Backspace and typed again; a wrong start cleared with ^U.
    const again = onTerminal(['export', dir, join(scratch, 'again.img')], [['expect', QUESTION], ['send', 'wrong start\x15pässwö\x7för\x7f\x7förd\r']]);
    expect(again.status, again.output).toBe(0);
  });

  it('a wrong passphrase is asked again: three tries, then the wrong-key status and nothing written', () => {
    const { scratch, dir } = sealedVolume();
    const third = onTerminal(['export', dir, join(scratch, 'third.img')], [
      ['expect', QUESTION], ['send', 'nope\r'],
      ['expect', 'wrong passphrase; try again (2 tries left)'], ['expect', QUESTION], ['send', 'passwörd\r'],
      ['expect', 'wrong passphrase; try again (1 try left)'], ['expect', QUESTION], ['send', `${PASS}\r`],
    ]);
    expect(third.status, third.output).toBe(0);
    expect(readFileSync(join(scratch, 'third.img')).length).toBe(SIZE);

    const before = treeHash(scratch);
    const never = onTerminal(['export', dir, join(scratch, 'never.img')], [
      ['expect', QUESTION], ['send', 'a\r'], ['expect', QUESTION], ['send', 'b\r'], ['expect', QUESTION], ['send', 'c\r'],
    ]);
    expect(never.status).toBe(EXIT.wrongKey);
    expect(count(never.output, QUESTION)).toBe(3);
    expect(treeHash(scratch)).toBe(before);
  });

  it('inspect asks on a terminal: Enter skips the key details, the passphrase gives them', () => {
    const { dir } = sealedVolume();
    const skipped = onTerminal(['inspect', dir], [['expect', `Passphrase of sealed volume '${NAME}' (Enter to skip): `], ['send', '\r']]);
    expect(skipped.status, skipped.output).toBe(0);
    expect(skipped.output).toContain('unlocked   no: no passphrase given');
    const unlocked = onTerminal(['inspect', dir], [['expect', '(Enter to skip): '], ['send', `${PASS}\r`]]);
    expect(unlocked.status, unlocked.output).toBe(0);
    expect(unlocked.output).toMatch(/ {2}committed {2}epoch 2 \(epochs reserved up to 2\); map copy B\r?\n/);
  });
});
