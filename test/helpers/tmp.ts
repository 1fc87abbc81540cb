// Temporary directories that are removed after each test, also when it fails.

import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync, chmodSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Stage, eachTestCleanup } from './cleanup.js';

const made: string[] = [];

function mountsUnder(dir: string): string[] {
  return readFileSync('/proc/self/mounts', 'utf8').split('\n').map((l) => l.split(' ')[1] ?? '').filter((m) => m.startsWith(`${dir}/`));
}

/** Root's epoch records of sealed volumes that lived under `dir` (src/daemon/epoch-record.ts). */
function removeEpochRecords(dir: string): void {
  const state = '/var/lib/vbd-shadow';
  for (const uid of existsSync(state) ? readdirSync(state) : []) {
    for (const name of readdirSync(join(state, uid)).filter((n) => n.endsWith('.json'))) {
      try {
        const record = JSON.parse(readFileSync(join(state, uid, name), 'utf8')) as { dir?: unknown };
        if (typeof record.dir === 'string' && record.dir.startsWith(`${dir}/`)) rmSync(join(state, uid, name), { force: true });
      } catch {
        /* not a record of ours */
      }
    }
  }
}

eachTestCleanup(Stage.Files, () => {
  while (made.length > 0) {
    const dir = made.pop() ?? '';
    removeEpochRecords(dir);
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
