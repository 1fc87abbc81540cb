// Someone writes to (or deletes) a backing file while the volume is live: it is reported, what
// they left is kept aside, and the device's truth is written back into the file. A sealed volume
// the same way: the damaged slot fails authentication, so its chunk is sealed anew from RAM.

import { randomBytes } from 'node:crypto';
import { closeSync, openSync, readFileSync, readdirSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readStatus } from '../../src/daemon/runtime.js';
import { cliOk, sha256 } from '../helpers/cli.js';
import { eventsOf, startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX } from '../helpers/system.js';
import { keyFile, tempDir } from '../helpers/tmp.js';
import { withStore } from '../helpers/volumes.js';

async function until(what: string, ok: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe.skipIf(!IS_ROOT)(`external changes (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  it('a foreign write and a delete are reported, kept aside, and repaired from RAM', async () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    const name = `${TEST_PREFIX}external`;
    cliOk(['init', dir, '--size', '4M', '--files', '4', '--chunk', '4K', '--name', name]);
    writeSync(openSync(join(scratch, 'in.img'), 'w'), randomBytes(4 * 2 ** 20));
    cliOk(['import', dir, join(scratch, 'in.img')]);
    const daemon = startDaemon(name, [dir, '--interval', '1h']);
    const live = await waitLive(daemon);
    const truth = readFileSync(live.device ?? '');
    const file2 = truth.subarray(2 ** 20, 2 ** 21); // linear: file002 is the second MiB

    const fd = openSync(join(dir, 'file002'), 'r+');
    writeSync(fd, Buffer.from('SOMEONE ELSE WROTE THIS'), 0, 23, 5000);
    closeSync(fd);
    // Repaired in the file, and that flush's report in the status (written just after it).
    await until('the external write to be reported and repaired', () => (readStatus(name)?.externalChanges ?? 0) >= 1 && readFileSync(join(dir, 'file002')).equals(file2) && readStatus(name)?.lastFlush !== undefined);
    expect(eventsOf(name)).toContainEqual({ kind: 'external-change', file: 'file002', what: 'modified', keptAs: expect.stringMatching(/^vbd-shadow-aside\/file002/) });
    const aside = readdirSync(join(dir, 'vbd-shadow-aside'));
    expect(aside).toHaveLength(1);
    const kept = readFileSync(join(dir, 'vbd-shadow-aside', aside[0] ?? ''));
    expect(kept.subarray(5000, 5023).toString()).toBe('SOMEONE ELSE WROTE THIS');
    expect(readStatus(name)?.lastFlush?.chunksChanged).toBe(1); // only the chunk that differs

    rmSync(join(dir, 'file003'));
    await until('the delete to be reported and the file recreated', () => (readStatus(name)?.externalChanges ?? 0) >= 2 && readFileSync(join(dir, 'file003')).equals(truth.subarray(2 * 2 ** 20, 3 * 2 ** 20)));
    expect(eventsOf(name)).toContainEqual(expect.objectContaining({ kind: 'external-change', file: 'file003', what: 'deleted' }));
    const keptDeleted = readdirSync(join(dir, 'vbd-shadow-aside')).find((n) => n.startsWith('file003'));
    expect(sha256(readFileSync(join(dir, 'vbd-shadow-aside', keptDeleted ?? '')))).toBe(sha256(truth.subarray(2 * 2 ** 20, 3 * 2 ** 20)));

    expect(await stopDaemon(daemon)).toBe(0);
    const out = join(scratch, 'out.img');
    cliOk(['export', dir, out]);
    expect(sha256(readFileSync(out))).toBe(sha256(truth));
  });

  it('sealed: a flipped byte in a used slot and a deleted file are reported, kept aside, and their chunks sealed anew from RAM', async () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    const name = `${TEST_PREFIX}external-sealed`;
    const pass = 'an external-change passphrase';
    const key = keyFile(scratch, pass);
    cliOk(['init', dir, '--sealed', '--size', '4M', '--files', '4', '--chunk', '4K', '--name', name, '--key-file', key]);
    writeSync(openSync(join(scratch, 'in.img'), 'w'), randomBytes(4 * 2 ** 20));
    cliOk(['import', dir, join(scratch, 'in.img'), '--key-file', key]);
    const chunk = 300;
    const before = await withStore(dir, Buffer.from(pass), false, (store) => store.locate(chunk));
    const daemon = startDaemon(name, [dir, '--key-file', key, '--interval', '1h']);
    const live = await waitLive(daemon);
    const truth = readFileSync(live.device ?? '');

    const fd = openSync(join(dir, before.name), 'r+');
    writeSync(fd, Buffer.from([0x5a]), 0, 1, before.offset + 100);
    closeSync(fd);
    await until('the flipped byte to be reported and its chunk sealed anew', () => (readStatus(name)?.externalChanges ?? 0) >= 1 && readStatus(name)?.lastFlush !== undefined);
    const first = readStatus(name);
    expect(first?.lastFlush?.ok).toBe(true);
    expect(first?.lastFlush?.chunksChanged).toBe(1); // only the chunk whose slot failed
    expect(readdirSync(join(dir, 'vbd-shadow-aside'))).toHaveLength(1);

    const victim = before.name === 'file003' ? 'file002' : 'file003';
    rmSync(join(dir, victim));
    await until('the delete to be reported and its chunks sealed anew', () => (readStatus(name)?.externalChanges ?? 0) >= 2 && readStatus(name)?.lastFlush?.at !== first?.lastFlush?.at);
    expect(readStatus(name)?.lastFlush?.ok).toBe(true);
    expect(readStatus(name)?.lastFlush?.chunksChanged).toBeGreaterThan(0);

    expect(await stopDaemon(daemon)).toBe(0);
    const moved = await withStore(dir, Buffer.from(pass), false, (store) => store.locate(chunk));
    expect(moved).not.toEqual(before); // copy-on-write: the damaged slot is left behind, unreferenced
    const out = join(scratch, 'out.img');
    cliOk(['export', dir, out, '--key-file', key]);
    expect(sha256(readFileSync(out))).toBe(sha256(truth));
  });
});
