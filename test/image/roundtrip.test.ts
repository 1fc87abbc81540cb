// import of a random image, then export, gives the same bytes back: every built-in layout,
// chunk sizes 512 B to 1 MiB, 1 to 100 files — writing through every file, across boundaries.

import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { backingFileNames } from '../../src/volume/init.js';
import { cliOk, sha256 } from '../helpers/cli.js';
import { keyFile, tempDir } from '../helpers/tmp.js';
import { importThenExport, makeVolume, randomImage } from '../helpers/volumes.js';

const SECRET = Buffer.from('correct horse battery staple');
const LAYOUTS = ['linear', 'striped', 'keyed'] as const;
const SHAPES = [
  { chunk: 512, files: 1, size: 256 * 1024 },
  { chunk: 512, files: 7, size: 512 * 1024 },
  { chunk: 4096, files: 100, size: 4 * 2 ** 20 },
  { chunk: 65536, files: 13, size: 8 * 2 ** 20 },
  { chunk: 2 ** 20, files: 3, size: 10 * 2 ** 20 },
  { chunk: 2 ** 20, files: 100, size: 100 * 2 ** 20 },
];

describe('import then export returns the image', () => {
  for (const kind of LAYOUTS) {
    for (const { chunk, files, size } of SHAPES) {
      it(`${kind}: ${files} files, ${chunk} B chunks, ${size} B`, async () => {
        const scratch = tempDir();
        const dir = join(scratch, 'vol');
        await makeVolume(dir, size, files, chunk, kind === 'keyed' ? { kind, secret: SECRET } : { kind });
        const image = randomImage(size);
        const back = await importThenExport(dir, image, scratch, kind === 'keyed' ? SECRET : undefined);
        expect(sha256(back)).toBe(sha256(image));
        // Every file received data: no file left all zeros by a wrong offset.
        for (const name of backingFileNames(files)) {
          expect(readFileSync(join(dir, name)).some((b) => b !== 0)).toBe(true);
        }
      });
    }
  }

  it('through the CLI, for each layout', () => {
    for (const kind of LAYOUTS) {
      const scratch = tempDir();
      const dir = join(scratch, 'vol');
      const key = keyFile(scratch, 'cli secret');
      const keyArgs = kind === 'keyed' ? ['--key-file', key] : [];
      cliOk(['init', dir, '--size', '3M', '--files', '10', '--chunk', '16K', '--layout', kind, ...keyArgs]);
      const image = randomImage(3 * 2 ** 20);
      const inPath = join(scratch, 'in.img');
      const outPath = join(scratch, 'out.img');
      writeFileSync(inPath, image);
      cliOk(['import', dir, inPath, ...keyArgs]);
      cliOk(['export', dir, outPath, ...keyArgs]);
      expect(sha256(readFileSync(outPath))).toBe(sha256(image));
    }
  });
});
