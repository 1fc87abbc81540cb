// `-` is standard input or output wherever a file is taken: export's OUT, import's IN,
// --key-file. The bytes that cross are the volume's bytes; a stream that ends short or runs
// long changes nothing; a terminal is never written binary to nor read an image from.

import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { EXIT } from '../../src/common/exit-codes.js';
import { cli, cliBytes, cliOk, sha256, treeHash } from '../helpers/cli.js';
import { onTerminal } from '../helpers/pipes.js';
import { keyFile, tempDir } from '../helpers/tmp.js';

const SIZE = 512 * 1024;
const SHAPE = ['--size', '512K', '--files', '5', '--chunk', '4K'];
function exportBytes(args: string[]): Buffer {
  const r = cliBytes(args);
  expect(r.status, r.stderr).toBe(0);
  return r.stdout;
}

describe('- for standard input and output', () => {
  for (const layout of ['linear', 'keyed'] as const) {
    it(`${layout}: import - then export - round-trips the bytes, the key from --key-file - as well`, () => {
      const scratch = tempDir();
      const dir = join(scratch, 'vol');
      const secret = 'a key from a pipe';
      const key = keyFile(scratch, secret);
      const keyArgs = layout === 'keyed' ? ['--key-file', key] : [];
      cliOk(['init', dir, ...SHAPE, '--layout', layout, ...keyArgs]);
      const image = randomBytes(SIZE);
      const imported = cli(['import', dir, '-', ...keyArgs], { input: image });
      expect(imported.status, imported.stderr).toBe(0);
      expect(imported.stdout).toBe('');

      const out = exportBytes(['export', dir, '-', ...keyArgs]);
      expect(out.length).toBe(SIZE);
      expect(sha256(out)).toBe(sha256(image));
      cliOk(['export', dir, join(scratch, 'file.img'), ...keyArgs]);
      expect(sha256(readFileSync(join(scratch, 'file.img')))).toBe(sha256(image));
      if (layout === 'keyed') {
        // The key on stdin, with and without its trailing newline, opens the volume; the image goes to a file.
        for (const input of [`${secret}\n`, secret]) {
          const r = cli(['export', dir, join(scratch, 'again.img'), '--key-file', '-'], { input });
          expect(r.status, r.stderr).toBe(0);
          expect(sha256(readFileSync(join(scratch, 'again.img')))).toBe(sha256(image));
        }
        const wrong = cli(['export', dir, join(scratch, 'wrong.img'), '--key-file', '-'], { input: 'not it\n' });
        expect(wrong.status).toBe(EXIT.wrongKey);
        const empty = cli(['export', dir, join(scratch, 'wrong.img'), '--key-file', '-'], { input: '' });
        expect(empty.stderr).toBe('vbd-shadow: the key on standard input is empty\n');
        expect(empty.status).toBe(EXIT.usage);
      }
    });
  }

  it('import - of a stream that ends short or runs long changes nothing (plain: spooled first)', () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    cliOk(['init', dir, ...SHAPE]);
    writeFileSync(join(scratch, 'img'), randomBytes(SIZE));
    cliOk(['import', dir, join(scratch, 'img')]);
    const before = treeHash(scratch);
    for (const [input, error] of [
      [randomBytes(SIZE - 4096), `vbd-shadow: the image on standard input is ${SIZE - 4096} bytes, the device is ${SIZE}; nothing was imported\n`],
      [randomBytes(SIZE + 1), `vbd-shadow: the image on standard input is ${SIZE + 1} bytes, the device is ${SIZE}; nothing was imported\n`],
      [Buffer.alloc(0), `vbd-shadow: the image on standard input is 0 bytes, the device is ${SIZE}; nothing was imported\n`],
    ] as const) {
      const r = cli(['import', dir, '-'], { input });
      expect(r.stderr).toBe(error);
      expect(r.status).not.toBe(0);
      expect(treeHash(scratch)).toBe(before);
    }
  });

  it('sealed: import - of a short stream commits nothing, export - writes the sealed content, messages go to stderr', () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    const pass = keyFile(scratch, 'sealed passphrase');
    cliOk(['init', dir, ...SHAPE, '--sealed', '--key-file', pass]);
    const image = randomBytes(SIZE);
    const ok = cli(['import', dir, '-', '--key-file', pass], { input: image });
    expect(ok.status, ok.stderr).toBe(0);
    const short = cli(['import', dir, '-', '--key-file', pass], { input: randomBytes(SIZE - 1) });
    expect(short.stderr).toBe(`vbd-shadow: the image on standard input ends after ${SIZE - 1} bytes, the device is ${SIZE}; nothing was imported\n`);
    expect(short.status).not.toBe(0);
    const r = cliBytes(['export', dir, '-', '--key-file', pass]);
    expect(r.status, r.stderr).toBe(0);
    expect(sha256(r.stdout)).toBe(sha256(image));
    expect(r.stderr).toMatch(/^exported .* to standard output: 524288 bytes, 128 chunks written, 0 all-zero skipped \(left as holes\), in \d+\.\d\d s; epoch \d+, 128 chunks verified\n$/);
  });

  it('sealed: export - of a volume with damaged slots fails with the I/O status before writing them, unless --zero-damaged', () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    const pass = keyFile(scratch, 'sealed passphrase');
    cliOk(['init', dir, ...SHAPE, '--sealed', '--key-file', pass]);
    const image = randomBytes(SIZE);
    expect(cli(['import', dir, '-', '--key-file', pass], { input: image }).status).toBe(0);
    // One flipped byte in every slot of the first file: some of them hold chunks.
    const file = join(dir, 'file001');
    const bytes = readFileSync(file);
    const slot = 4096 + 28;
    for (let at = 100; at < bytes.length; at += slot) bytes[at] = (bytes[at] ?? 0) ^ 0xff;
    writeFileSync(file, bytes);
    const refused = cliBytes(['export', dir, '-', '--key-file', pass]);
    expect(refused.stderr).toMatch(/^vbd-shadow: export refused: \d+ chunks? fails? authentication .*standard output got the image only up to chunk 0 \(byte 0\): incomplete/);
    expect(refused.status).toBe(EXIT.io);
    expect(refused.stdout.length).toBe(0);
    const zeroed = cliBytes(['export', dir, '-', '--key-file', pass, '--zero-damaged']);
    expect(zeroed.status, zeroed.stderr).toBe(0);
    expect(zeroed.stdout.length).toBe(SIZE);
    const damaged = [...zeroed.stderr.matchAll(/^zeroed damaged chunk (\d+) /gm)].map((m) => Number(m[1]));
    expect(damaged.length).toBeGreaterThan(0);
    for (const chunk of damaged) expect(zeroed.stdout.subarray(chunk * 4096, (chunk + 1) * 4096).equals(Buffer.alloc(4096))).toBe(true);
    const first = damaged[0] ?? 0;
    expect(sha256(zeroed.stdout.subarray(0, first * 4096))).toBe(sha256(image.subarray(0, first * 4096)));
  });

  it('export - to a terminal and import - from a terminal are refused', () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    cliOk(['init', dir, ...SHAPE]);
    const before = treeHash(scratch);
    const out = onTerminal(['export', dir, '-']);
    expect(out.output).toMatch(/standard output is a terminal/);
    expect(out.status).toBe(EXIT.refused);
    const input = onTerminal(['import', dir, '-']);
    expect(input.output).toMatch(/standard input is a terminal/);
    expect(input.status).toBe(EXIT.usage);
    const key = onTerminal(['init', join(scratch, 'k'), ...SHAPE, '--layout', 'keyed', '--key-file', '-']);
    expect(key.output).toMatch(/--key-file -: standard input is a terminal/);
    expect(key.status).toBe(EXIT.usage);
    expect(treeHash(scratch)).toBe(before);
  });
});
