// A live 16 MiB volume whose backing files sit on a real 48 MiB ext4 left with ~1 MiB free,
// and 8 MiB of new data written to the device: the next flush meets a real ENOSPC.

import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import type { DaemonStatus } from '../../src/daemon/runtime.js';
import { cliOk } from './cli.js';
import { startDaemon, waitLive, type TestDaemon } from './daemon.js';
import { freeBytes, smallExt4 } from './small-fs.js';

export interface FullFs {
  dir: string;
  daemon: TestDaemon;
  live: DaemonStatus;
  /** The file that takes the space; remove it to free the filesystem. */
  filler: string;
  data: Buffer;
}

export async function liveVolumeOnFullFs(name: string, writeAt: number): Promise<FullFs> {
  const fs = smallExt4(48);
  const dir = join(fs, 'vol');
  cliOk(['init', dir, '--size', '16M', '--files', '4', '--chunk', '64K', '--name', name]);
  const daemon = startDaemon(name, [dir, '--interval', '1h']);
  const live = await waitLive(daemon);
  // Leave ~1 MiB free: the sparse backing files and the journal need far more.
  const filler = join(fs, 'filler');
  execFileSync('fallocate', ['-l', String(freeBytes(fs) - 2 ** 20), filler]);
  const data = randomBytes(8 * 2 ** 20);
  const fd = openSync(live.device ?? '', 'r+');
  writeSync(fd, data, 0, data.length, writeAt);
  closeSync(fd);
  return { dir, daemon, live, filler, data };
}
