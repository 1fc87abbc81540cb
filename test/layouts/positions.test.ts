// Where the bytes really land, computed independently of the layout code.

import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createKeyedLayout } from '../../src/layouts/keyed.js';
import { placementTable } from '../../src/layouts/layout.js';
import { deriveKeys } from '../../src/layouts/secret.js';
import { backingFileNames } from '../../src/volume/init.js';
import { cli, cliOk, sha256, treeHash } from '../helpers/cli.js';
import { keyFile, tempDir } from '../helpers/tmp.js';
import { importThenExport, makeVolume, placement } from '../helpers/volumes.js';

describe('linear', () => {
  it('export equals the plain concatenation of the files', async () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    await makeVolume(dir, 5 * 2 ** 20, 7, 4096, { kind: 'linear' });
    const image = randomBytes(5 * 2 ** 20);
    const back = await importThenExport(dir, image, scratch);
    const concatenated = Buffer.concat(backingFileNames(7).map((n) => readFileSync(join(dir, n))));
    expect(sha256(concatenated)).toBe(sha256(image));
    expect(sha256(back)).toBe(sha256(image));
  });
});

describe('striped', () => {
  it('chunk c is at file c mod N, offset floor(c / N) * chunk', async () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    const chunk = 8192;
    const files = 6;
    const size = 101 * chunk; // uneven: the first file holds one chunk more
    await makeVolume(dir, size, files, chunk, { kind: 'striped' });
    const image = randomBytes(size);
    await importThenExport(dir, image, scratch);
    const contents = backingFileNames(files).map((n) => readFileSync(join(dir, n)));
    for (let c = 0; c < size / chunk; c++) {
      const file = contents[c % files];
      const at = Math.floor(c / files) * chunk;
      expect(file?.subarray(at, at + chunk).equals(image.subarray(c * chunk, (c + 1) * chunk)), `chunk ${c}`).toBe(true);
    }
  });
});

describe('keyed', () => {
  const geometry = { deviceSize: 4096 * 512, chunkSize: 4096, chunkCount: 512, fileSizes: Array(8).fill(4096 * 64) as number[] };

  it('the same secret gives the same placement, another secret another one', () => {
    const salt = '00112233445566778899aabbccddeeff';
    const kdf = { N: 1024, r: 8, p: 1 };
    const table = (secret: string): string => {
      const { layoutKey } = deriveKeys(Buffer.from(secret), salt, kdf);
      const t = placementTable(createKeyedLayout(geometry, layoutKey), geometry);
      return sha256(Buffer.concat([Buffer.from(t.file.buffer), Buffer.from(t.offset.buffer)]));
    };
    expect(table('alpha')).toBe(table('alpha'));
    expect(table('alpha')).not.toBe(table('beta'));
  });

  it('scatters: it is neither the linear nor the striped placement', async () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    await makeVolume(dir, 2 ** 20, 4, 4096, { kind: 'keyed', secret: Buffer.from('s1') });
    const t = await placement(dir, Buffer.from('s1'));
    let sequential = 0;
    for (let c = 1; c < t.file.length; c++) if (t.file[c] === t.file[c - 1] && t.offset[c] === (t.offset[c - 1] ?? 0) + 4096) sequential++;
    expect(sequential).toBeLessThan(t.file.length / 10);
  });

  it('a wrong secret is refused with one line and nothing is touched', () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    const good = keyFile(scratch, 'right one', 'good');
    const wrong = keyFile(scratch, 'wrong one', 'wrong');
    cliOk(['init', dir, '--size', '1M', '--files', '4', '--chunk', '4K', '--layout', 'keyed', '--key-file', good]);
    const image = join(scratch, 'img');
    cliOk(['export', dir, image, '--key-file', good]);
    const before = treeHash(scratch);
    for (const args of [['export', dir, join(scratch, 'out'), '--key-file', wrong], ['import', dir, image, '--key-file', wrong]]) {
      const r = cli(args);
      expect(r.status).toBe(5); // wrong key (src/common/exit-codes.ts)
      expect(r.stderr).toMatch(/^vbd-shadow: wrong key: .*nothing was read or written\)\n$/);
    }
    expect(treeHash(scratch)).toBe(before);
  });
});
