// A user's own layout module: used when it is a bijection, refused when it is not.

import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { cli, cliOk, sha256, treeHash } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { readFileSync } from 'node:fs';

// Reversed concatenation: chunk c goes to the mirrored slot. A valid bijection.
const REVERSED = `
export function createLayout(g) {
  const perFile = g.fileSizes.map((s) => s / g.chunkSize);
  return { place(chunk) {
    let slot = g.chunkCount - 1 - chunk;
    let file = 0;
    while (slot >= perFile[file]) { slot -= perFile[file]; file++; }
    return { file, offset: slot * g.chunkSize };
  } };
}`;
const COLLIDING = `export function createLayout(g) { return { place: (c) => ({ file: 0, offset: c === 5 ? 2 * g.chunkSize : c * g.chunkSize }) }; }`;
const PAST_END = `export function createLayout(g) { return { place: (c) => ({ file: 0, offset: (c + 1) * g.chunkSize }) }; }`;

describe('module: layouts', () => {
  it('a valid module round-trips and its placement is used', () => {
    const scratch = tempDir();
    const mod = join(scratch, 'reversed.mjs');
    writeFileSync(mod, REVERSED);
    const dir = join(scratch, 'vol');
    cliOk(['init', dir, '--size', '64K', '--files', '1', '--chunk', '4K', '--layout', `module:${mod}`]);
    const image = randomBytes(65536);
    writeFileSync(join(scratch, 'in'), image);
    cliOk(['import', dir, join(scratch, 'in')]);
    cliOk(['export', dir, join(scratch, 'out')]);
    expect(sha256(readFileSync(join(scratch, 'out')))).toBe(sha256(image));
    const file = readFileSync(join(dir, 'file001'));
    expect(file.subarray(0, 4096).equals(image.subarray(65536 - 4096))).toBe(true);
  });

  for (const [what, source, message] of [
    ['maps two chunks onto the same bytes', COLLIDING, /layout places chunks 2 and 5 on the same bytes: file 'file001' offset 8192/],
    ['maps a chunk past its file end', PAST_END, /layout places chunk 15 outside file 'file001': offset 65536 \+ chunk 4096 > size 65536/],
  ] as const) {
    it(`is refused when it ${what}`, () => {
      const scratch = tempDir();
      const mod = join(scratch, 'bad.mjs');
      writeFileSync(mod, source);
      const before = treeHash(scratch);
      const r = cli(['init', join(scratch, 'vol'), '--size', '64K', '--files', '1', '--chunk', '4K', '--layout', `module:${mod}`]);
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(message);
      expect(r.stderr.split('\n').filter(Boolean)).toHaveLength(1);
      expect(treeHash(scratch)).toBe(before);
    });
  }

  it('a module that changes its mind after init is refused', () => {
    const scratch = tempDir();
    const mod = join(scratch, 'layout.mjs');
    writeFileSync(mod, REVERSED);
    const dir = join(scratch, 'vol');
    cliOk(['init', dir, '--size', '64K', '--files', '1', '--chunk', '4K', '--layout', `module:${mod}`]);
    writeFileSync(mod, `export function createLayout(g) { return { place: (c) => ({ file: 0, offset: c * g.chunkSize }) }; }`);
    const r = cli(['export', dir, join(scratch, 'out')]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/now places chunks differently/);
  });
});
