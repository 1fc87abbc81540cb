// Progress of long work on a terminal: one line on stderr, redrawn at most 10 times a second.
// Silent when stderr is not a terminal (logs, pipes, tests).

import { formatSize } from './size.js';

export interface Progress {
  advance(bytes: number): void;
  done(): void;
}

export function startProgress(label: string, totalBytes: number, stream: NodeJS.WriteStream = process.stderr): Progress {
  if (!stream.isTTY || totalBytes < 64 * 2 ** 20) return { advance() {}, done() {} };
  const started = process.hrtime.bigint();
  let doneBytes = 0;
  let lastDraw = 0;
  const draw = (): void => {
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    const percent = Math.floor((doneBytes / totalBytes) * 100);
    const rate = seconds > 0 ? `${formatSize(Math.round(doneBytes / seconds))}/s` : '';
    stream.write(`\r${label}: ${percent}% of ${formatSize(totalBytes)} ${rate}   `);
  };
  return {
    advance(bytes: number) {
      doneBytes += bytes;
      const now = Date.now();
      if (now - lastDraw >= 100) {
        lastDraw = now;
        draw();
      }
    },
    done() {
      draw();
      stream.write('\n');
    },
  };
}
