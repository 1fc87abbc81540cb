// export writes a sparse image: all-zero (never-written) chunks are skipped with a seek, so the
// output file has holes there (plain and sealed); Ctrl-C or a failure leaves no partial file
// (Ctrl-C: status 130); export and import say what they did in one line on stderr, never stdout.

import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { EXIT } from '../../src/common/exit-codes.js';
import { BIN, cli, cliArgv, cliOk, sha256 } from '../helpers/cli.js';
import { keyFile, tempDir } from '../helpers/tmp.js';

const CHUNK = 64 * 1024;
const CHUNKS = 256;
const SIZE = CHUNK * CHUNKS;
/** Chunks that hold data; every other chunk is zero. The last chunk is zero, so the image ends in a hole. */
const DATA_CHUNKS = [0, 3, 100, 101, 102, 200];

function sparseImage(): Buffer {
  const image = Buffer.alloc(SIZE);
  for (const c of DATA_CHUNKS) randomBytes(CHUNK).copy(image, c * CHUNK);
  return image;
}

/** Bytes the file really takes on disk. */
function allocated(path: string): number {
  return statSync(path).blocks * 512;
}

describe('export: sparse output', () => {
  for (const kind of ['plain', 'sealed'] as const) {
    it(`${kind}: all-zero chunks become holes, the bytes are the image's, the summary is on stderr`, () => {
      const scratch = tempDir();
      const dir = join(scratch, 'vol');
      const pass = keyFile(scratch, 'sparse pass');
      // A keyed layout (plain) scatters the chunks: the holes are in the image, not copied from the files' order.
      const args = ['--key-file', pass];
      cliOk(['init', dir, '--size', String(SIZE), '--files', '5', '--chunk', String(CHUNK), ...(kind === 'sealed' ? ['--sealed', '--spare', '100%'] : ['--layout', 'keyed']), ...args]);
      const image = sparseImage();
      writeFileSync(join(scratch, 'in.img'), image);
      const imported = cli(['import', dir, join(scratch, 'in.img'), ...args]);
      expect(imported.status, imported.stderr).toBe(0);
      expect(imported.stdout).toBe('');
      expect(imported.stderr).toMatch(new RegExp(`^imported into 'vol' from \\S+: ${SIZE} bytes, ${CHUNKS} chunks (written in place|sealed and committed as epoch \\d+, all into free slots \\(copy-on-write\\)), in \\d+\\.\\d\\d s\\n$`));

      const out = join(scratch, 'out.img');
      const r = cli(['export', dir, out, ...args]);
      expect(r.status, r.stderr).toBe(0);
      expect(r.stdout).toBe('');
      const summary = `exported 'vol' to ${out}: ${SIZE} bytes, ${DATA_CHUNKS.length} chunks written, ${CHUNKS - DATA_CHUNKS.length} all-zero skipped (left as holes), in `;
      expect(r.stderr.startsWith(summary), r.stderr).toBe(true);
      expect(r.stderr.split('\n')).toHaveLength(2);
      expect(statSync(out).size).toBe(SIZE);
      expect(sha256(readFileSync(out))).toBe(sha256(image));
      // Only the data chunks take space (file systems allocate in blocks of at most 64 KiB here).
      expect(allocated(out)).toBeGreaterThanOrEqual(DATA_CHUNKS.length * CHUNK);
      expect(allocated(out)).toBeLessThanOrEqual(DATA_CHUNKS.length * CHUNK + CHUNK);
      expect(allocated(out)).toBeLessThan(SIZE / 4);
    });
  }

  it('a never-written volume exports as one hole of the device size', () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    cliOk(['init', dir, '--size', '32M', '--files', '3']);
    const out = join(scratch, 'out.img');
    cliOk(['export', dir, out]);
    expect(statSync(out).size).toBe(32 * 2 ** 20);
    expect(allocated(out)).toBe(0);
  });

  it('a failed export (file too large) leaves no partial file and exits with the I/O status', () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    cliOk(['init', dir, '--size', String(SIZE), '--files', '2', '--chunk', String(CHUNK)]);
    writeFileSync(join(scratch, 'in.img'), randomBytes(SIZE));
    cliOk(['import', dir, join(scratch, 'in.img')]);
    const outDir = join(scratch, 'out');
    mkdirSync(outDir);
    // RLIMIT_FSIZE: writes past 1 MB fail with EFBIG (Node ignores SIGXFSZ).
    const r = spawnSync('prlimit', ['--fsize=1000000', process.execPath, BIN, 'export', dir, join(outDir, 'out.img')], { encoding: 'utf8' });
    expect(r.stderr).toMatch(/^vbd-shadow: write to \S+\.partial-\d+: file too large \(EFBIG\)\n$/);
    expect(r.status).toBe(EXIT.io);
    expect(readdirSync(outDir)).toEqual([]);
  });
});

describe('export: Ctrl-C', () => {
  it('SIGINT to a running export removes the partial file and exits 130', async () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    // 2 GiB, never written: init is instant, the export reads for a few seconds.
    cliOk(['init', dir, '--size', '2G', '--files', '4']);
    const outDir = join(scratch, 'out');
    mkdirSync(outDir);
    const out = join(outDir, 'image.raw');
    const [cmd, argv] = cliArgv(['export', dir, out]);
    const child = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    const partial = `${out}.partial-${child.pid}`;
    const deadline = Date.now() + 30_000;
    while (!existsSync(partial) && child.exitCode === null && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    expect(existsSync(partial), `no partial file appeared; the export ended with ${child.exitCode}: ${stderr}`).toBe(true);
    // It is still writing: the interrupt lands mid-export.
    child.kill('SIGINT');
    expect(await exited).toBe(EXIT.interrupted);
    expect(stderr).toBe(`vbd-shadow: export interrupted; the partial image ${partial} was removed\n`);
    expect(stdout).toBe('');
    expect(readdirSync(outDir)).toEqual([]);
  });
});
