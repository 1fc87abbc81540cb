// Temporary directories that are removed after each test, also when it fails.

import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync, chmodSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Stage, eachTestCleanup } from './cleanup.js';

const made: string[] = [];

function mountsUnder(dir: string): string[] {
  return readFileSync('/proc/self/mounts', 'utf8').split('\n').map((l) => l.split(' ')[1] ?? '').filter((m) => m.startsWith(`${dir}/`));
}

eachTestCleanup(Stage.Files, () => {
  while (made.length > 0) {
    const dir = made.pop() ?? '';
    // Whatever is still mounted inside is detached first, so rm never reaches into it.
    for (const m of mountsUnder(dir).reverse()) spawnSync('umount', ['-l', m]);
    rmSync(dir, { recursive: true, force: true });
  }
});

export function tempDir(prefix = 'vbd-test-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  made.push(dir);
  return dir;
}

/** A key file with mode 0600 holding `secret`. */
export function keyFile(dir: string, secret: string, name = 'key'): string {
  const path = join(dir, name);
  writeFileSync(path, `${secret}\n`, { mode: 0o600 });
  chmodSync(path, 0o600);
  return path;
}
