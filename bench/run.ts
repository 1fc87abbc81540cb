// `npm run bench`: runs the benchmarks and writes docs/BENCHMARKS.md.
// Options: --sizes 1,8 (GiB, populate) --rounds 3

import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { benchFlush } from './flush.js';
import { benchPopulate } from './populate.js';
import { machine } from './lib.js';

function option(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? (process.argv[i + 1] ?? fallback) : fallback;
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('the benchmarks need root (tmpfs mounts, mlock, loop devices)');
  const sizes = option('sizes', '1,2,4,8').split(',').map(Number);
  const flushSizes = option('flush-sizes', '1,8').split(',').map(Number);
  const only = option('only', 'populate,flush').split(',');
  const rounds = Number(option('rounds', '3'));
  const work = '/var/tmp/vbd-shadow-bench';
  mkdirSync(work, { recursive: true });
  try {
    const populate = only.includes('populate') ? await benchPopulate(work, sizes, rounds) : '(not run)';
    const flush = only.includes('flush') ? await benchFlush(work, flushSizes, rounds) : '(not run)';
    const doc = [
      '# Benchmarks',
      '',
      `Produced by \`npm run bench\` on ${machine()}.`,
      'All figures warm: the backing files are in the page cache and each contender ran once before timing;',
      `each figure is the median of ${rounds} interleaved rounds.`,
      '',
      '## Populate: filling the RAM image from the files',
      '',
      'Against `cat` of the same 100 files into a new /dev/shm file (what a shell script would do).',
      'Ratios above 1 mean vbd-shadow is faster. Targets: ≥ 3× for linear, ≥ 2× for keyed 4 KiB chunks.',
      '',
      populate,
      '',
      '## Flush: writing back what changed',
      '',
      'Timed inside the daemon (`status --json` → lastFlush.timings / lastCheck). Linear volumes of 100 files, 64 KiB chunks;',
      'a 1%-dirty flush has 1% of the chunks rewritten with random data at random places, then `vbd-shadow flush`.',
      'Targets: idle < 1 ms; 1%-dirty flush of 1 GiB ≤ 50 ms with scan ≥ 15 GB/s and ≤ 1.05× the changed bytes written to the files (plus the journal).',
      '',
      flush,
      '',
    ].join('\n');
    const out = fileURLToPath(new URL('../../docs/BENCHMARKS.md', import.meta.url));
    writeFileSync(out, doc);
    process.stdout.write(`${doc}\nwritten to ${out}\n`);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exitCode = 1;
});
