// CLI start-up: wall time of short commands against Node's own start (`node -e 0`) and
// `losetup -a`, interleaved runs, medians. Target (issue 13): `status` and an idle `flush`
// ≤ 1.5× `node -e 0`.

import { spawnSync } from 'node:child_process';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { initVolume } from '../src/volume/init.js';
import { cli, startBenchDaemon } from './daemon.js';
import { ensureDir, median, table } from './lib.js';

const BIN = fileURLToPath(new URL('../../bin/vbd-shadow', import.meta.url));

interface Contender {
  label: string;
  argv: string[];
}

/** Which entry bin/vbd-shadow runs now: the bundle if at least as new as tsc's output. */
function entryInUse(): string {
  const stamp = (rel: string): number => {
    try {
      return statSync(fileURLToPath(new URL(`../../${rel}`, import.meta.url))).mtimeMs;
    } catch {
      return -1;
    }
  };
  return stamp('dist/cli/main.cjs') >= stamp('dist/src/cli/main.js') ? 'the bundle (dist/cli/main.cjs)' : 'tsc\'s output (dist/src/; no fresh bundle)';
}

/** Wall time (ms) of each contender, `runs` interleaved rounds after one warm-up round. */
function timeAll(contenders: Contender[], runs: number): number[][] {
  const times = contenders.map(() => [] as number[]);
  for (let round = -1; round < runs; round++) {
    for (const [i, c] of contenders.entries()) {
      const t = process.hrtime.bigint();
      const r = spawnSync(c.argv[0] ?? '', c.argv.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
      const ms = Number(process.hrtime.bigint() - t) / 1e6;
      if (r.status !== 0) throw new Error(`${c.label}: exit ${r.status}: ${String(r.stderr).trim()}`);
      if (round >= 0) times[i]?.push(ms);
    }
  }
  return times;
}

export async function benchStartup(work: string, runs: number): Promise<string> {
  const node = [process.execPath];
  const shown = (): number => (JSON.parse(cli(['status', '--json'])) as unknown[]).length;
  const alone: Contender[] = [
    { label: '`node -e 0`', argv: [...node, '-e', '0'] },
    { label: '`vbd-shadow --help`', argv: [...node, BIN, '--help'] },
    { label: '`vbd-shadow status`, no live volume', argv: [...node, BIN, 'status'] },
    { label: '`losetup -a`', argv: ['losetup', '-a'] },
  ];
  const before = shown();
  const first = timeAll(alone, runs);

  const dir = join(ensureDir(work), 'startup');
  const name = 'bench-startup';
  await initVolume({ dir, name, deviceSize: 64 * 2 ** 20, fileCount: 4, chunkSize: 65536, layout: { kind: 'linear' }, force: true });
  const daemon = await startBenchDaemon(name, [dir]);
  let second: number[][];
  let during: number;
  try {
    daemon.flush(); // the session's first flush scans; the timed ones find nothing written
    during = shown();
    second = timeAll([
      alone[0] as Contender,
      { label: '`vbd-shadow status`, one live volume', argv: [...node, BIN, 'status'] },
      { label: '`vbd-shadow flush NAME`, idle, live volume', argv: [...node, BIN, 'flush', name] },
    ], runs);
  } finally {
    await daemon.stop();
  }
  const base1 = median(first[0] ?? []);
  const base2 = median(second[0] ?? []);
  const row = (c: Contender, t: number[], base: number): (string | number)[] => [c.label, median(t).toFixed(1), (median(t) / base).toFixed(2), `${Math.min(...t).toFixed(1)} – ${Math.max(...t).toFixed(1)}`];
  const rows = [
    ...alone.map((c, i) => row(c, first[i] ?? [], base1)),
    row({ label: '`node -e 0` (second series)', argv: [] }, second[0] ?? [], base2),
    row({ label: '`vbd-shadow status`, one live volume', argv: [] }, second[1] ?? [], base2),
    row({ label: '`vbd-shadow flush NAME`, idle, live volume', argv: [] }, second[2] ?? [], base2),
  ];
  return [
    table(['command', 'median wall (ms)', '× `node -e 0`', 'min – max (ms)'], rows),
    '',
    `bin/vbd-shadow ran ${entryInUse()}. \`status\` showed ${before} volume${before === 1 ? '' : 's'} in the first series and ${during} in the second`,
    `(root sees every owner's). Each series: ${runs} interleaved rounds after a warm-up round; ratios are to the \`node -e 0\` of the same series.`,
  ].join('\n');
}
