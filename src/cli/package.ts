// Where the installed package is: the nearest package.json named vbd-shadow above this file,
// whether it runs from tsc's output (dist/src/cli/) or from the bundle (dist/cli/).

import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface PackageInfo {
  root: string;
  version: string;
}

let found: PackageInfo | undefined;

export function packageInfo(): PackageInfo {
  if (found !== undefined) return found;
  for (let dir = dirname(fileURLToPath(import.meta.url)); dir !== dirname(dir); dir = dirname(dir)) {
    let text: string;
    try {
      text = readFileSync(join(dir, 'package.json'), 'utf8');
    } catch {
      continue;
    }
    const pkg = JSON.parse(text) as { name?: unknown; version?: unknown };
    if (pkg.name === 'vbd-shadow') return (found = { root: dir, version: typeof pkg.version === 'string' ? pkg.version : 'unknown' });
  }
  return (found = { root: join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..'), version: 'unknown' });
}
