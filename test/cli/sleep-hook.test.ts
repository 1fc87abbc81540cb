// The sleep units' command run for real: `sleep-hook suspend` flushes every live volume and waits
// for each (their bytes reach the files), `sleep-hook hibernate` refuses while a sealed volume is
// live, and a flush that fails (a real ENOSPC) makes the hook exit non-zero, naming the volume,
// while the other volumes are still flushed.

import { randomBytes } from 'node:crypto';
import { closeSync, openSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { EXIT } from '../../src/common/exit-codes.js';
import { cli, cliOk, sha256 } from '../helpers/cli.js';
import { startDaemon, waitLive } from '../helpers/daemon.js';
import { readStatus } from '../../src/daemon/runtime.js';
import { liveVolumeOnFullFs } from '../helpers/full-fs.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX } from '../helpers/system.js';
import { keyFile, tempDir } from '../helpers/tmp.js';

function writeDevice(device: string, data: Buffer, offset: number): void {
  const fd = openSync(device, 'r+');
  writeSync(fd, data, 0, data.length, offset);
  closeSync(fd);
}

/** What the backing files hold at `offset` of a linear 4 MiB volume of four 1 MiB files (file001…file004). */
function filesHold(dir: string, offset: number, length: number): Buffer {
  const file = join(dir, `file00${Math.floor(offset / 2 ** 20) + 1}`);
  return readFileSync(file).subarray(offset % 2 ** 20, (offset % 2 ** 20) + length);
}

describe.skipIf(!IS_ROOT)(`sleep-hook (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  it('suspend: every live volume flushed and awaited; hibernate: refused while a sealed volume is live', async () => {
    const scratch = tempDir();
    const volumes = ['a', 'b'].map((tag) => ({ name: `${TEST_PREFIX}sleep-${tag}`, dir: join(scratch, tag), data: randomBytes(256 * 1024) }));
    for (const v of volumes) cliOk(['init', v.dir, '--size', '4M', '--files', '4', '--name', v.name]);
    const daemons = volumes.map((v) => startDaemon(v.name, [v.dir, '--interval', '1h']));
    for (const [i, d] of daemons.entries()) writeDevice((await waitLive(d)).device ?? '', volumes[i]?.data ?? Buffer.alloc(0), 1 << 20);

    const r = cli(['sleep-hook', 'suspend']);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    for (const v of volumes) {
      expect(r.stdout).toMatch(new RegExp(`^volume '${v.name}' flushed: 4 chunks, 256K in `, 'm'));
      expect(sha256(filesHold(v.dir, 1 << 20, v.data.length))).toBe(sha256(v.data));
    }

    // No sealed volume: hibernation may go on (nothing new to write).
    const h = cli(['sleep-hook', 'hibernate']);
    expect(h.status, h.stderr).toBe(0);
    expect(h.stdout).toMatch(new RegExp(`^volume '${volumes[0]?.name}': nothing written since the last flush`, 'm'));

    const sealedDir = join(scratch, 'sealed');
    const sealedName = `${TEST_PREFIX}sleep-sealed`;
    const pass = keyFile(tempDir(), 'a sealed passphrase');
    cliOk(['init', sealedDir, '--sealed', '--size', '1M', '--files', '2', '--name', sealedName, '--key-file', pass]);
    const sealed = startDaemon(sealedName, [sealedDir, '--key-file', pass, '--interval', '1h']);
    await waitLive(sealed);
    // The session's first flush scans (it reports 0 chunks flushed, not idle): done here, so the
    // suspend below finds nothing written however soon after going live it runs.
    cliOk(['flush', sealedName]);
    const refused = cli(['sleep-hook', 'hibernate']);
    expect(refused.status).toBe(EXIT.refused);
    expect(refused.stderr).toMatch(new RegExp(`^vbd-shadow: hibernate refused: sealed volume '${sealedName}' \\(uid 0, ${sealedDir}\\) is live, and hibernation would write the plaintext RAM image and its keys to the swap device`));
    for (const kind of ['hybrid-sleep', 'suspend-then-hibernate']) expect(cli(['sleep-hook', kind]).status).toBe(EXIT.refused);
    // Suspend keeps RAM: the sealed volume is flushed like the others (its first flush of the
    // session checks every chunk: nothing changed, nothing written).
    const checksBefore = readStatus(sealedName)?.lastCheck?.at;
    const s = cli(['sleep-hook', 'suspend']);
    expect(s.status, s.stderr).toBe(0);
    const after = readStatus(sealedName);
    expect(after?.lastCheck?.at).not.toBe(checksBefore);
    expect(after?.lastCheck?.ok).toBe(true);
    expect(after?.lastFlush === undefined || after.lastFlush.bytesWritten === 0).toBe(true);
    expect(cli(['sleep-hook', 'hibernat']).status).toBe(EXIT.usage);
  });

  it('a flush that fails makes the hook exit non-zero, naming the volume; the others are flushed all the same', async () => {
    const scratch = tempDir();
    const ok = { name: `${TEST_PREFIX}sleep-ok`, dir: join(scratch, 'ok'), data: randomBytes(64 * 1024) };
    cliOk(['init', ok.dir, '--size', '4M', '--files', '4', '--name', ok.name]);
    const daemon = startDaemon(ok.name, [ok.dir, '--interval', '1h']);
    writeDevice((await waitLive(daemon)).device ?? '', ok.data, 0);
    const fullName = `${TEST_PREFIX}sleep-full`;
    await liveVolumeOnFullFs(fullName, 2 ** 20);

    const r = cli(['sleep-hook', 'suspend']);
    expect(r.status).toBe(EXIT.failed);
    expect(r.stderr).toMatch(new RegExp(`^vbd-shadow: suspend: volume '${fullName}' \\(uid 0, .*\\): flush of '${fullName}' failed: .*no space left on device \\(ENOSPC\\)$`, 'm'));
    expect(r.stderr).toMatch(/^vbd-shadow: suspend: 1 of 2 flushes failed; the data stays in RAM$/m);
    expect(r.stdout).toMatch(new RegExp(`^volume '${ok.name}' flushed: 1 chunks, 64K in `, 'm'));
    expect(sha256(filesHold(ok.dir, 0, ok.data.length))).toBe(sha256(ok.data));
  });
});
