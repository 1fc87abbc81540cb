// Volume names are free-form: a second user gives hers the same name as the first user's. Tried
// as she would: both served at once, her agent by name, a leftover RAM image of the first
// user's killed daemon while hers starts. Nothing of one may reach the other: not the key, not
// the image, not the device name, not the lock.

import { chownSync, existsSync, readFileSync, realpathSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { knownVolumes } from '../../src/daemon/runtime.js';
import { cliOk, sha256 } from '../helpers/cli.js';
import { startAgent } from '../helpers/agent.js';
import { startDaemon, stopDaemon, waitState } from '../helpers/daemon.js';
import { otherHome, ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, leftovers } from '../helpers/system.js';

const NAME = `${TEST_PREFIX}same`;

function liveOf(uid: number): { state: string; device?: string; link?: string; sessions: number } | undefined {
  return knownVolumes().find((v) => v.status.name === NAME && v.status.owner.uid === uid)?.status;
}

async function until(ok: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 400 && !ok(); i++) await new Promise((r) => setTimeout(r, 50));
  if (!ok()) throw new Error(`timed out waiting for ${what}`);
}

describe.skipIf(!IS_ROOT)(`two users, one volume name (${IS_ROOT ? 'as root, two real users' : ROOT_SKIP_REASON})`, () => {
  it('both are served at once; each agent reaches only its own daemon; the device names are per owner', async () => {
    const { user: alice, scratch, home } = ownedScratch();
    const { user: bob, home: bobHome } = otherHome(scratch);
    const aliceDir = join(home, 'vol');
    const bobDir = join(bobHome, 'vol');
    // Alice's volume is keyed: her key must reach her daemon only.
    writeFileSync(join(home, 'key'), 'alice secret\n', { mode: 0o600 });
    chownSync(join(home, 'key'), alice.uid, alice.gid);
    expect(cliAs(alice, ['init', aliceDir, '--size', '8M', '--files', '4', '--layout', 'keyed', '--key-file', join(home, 'key'), '--name', NAME]).status).toBe(0);
    expect(cliAs(bob, ['init', bobDir, '--size', '8M', '--files', '4', '--name', NAME]).status).toBe(0);

    const aliceDaemon = startDaemon(NAME, [aliceDir, '--canary', 'wait']);
    const bobDaemon = startDaemon(NAME, [bobDir, '--canary', 'wait']);
    await until(() => liveOf(alice.uid)?.state === 'waiting' && liveOf(bob.uid)?.state === 'waiting', 'both daemons waiting');

    // Bob's agent by name finds his own volume; Alice's finds hers.
    const bobAgent = startAgent(bob, [NAME]);
    await until(() => liveOf(bob.uid)?.state === 'live', 'bob live');
    expect(liveOf(alice.uid)?.state).toBe('waiting');
    const aliceAgent = startAgent(alice, [NAME, '--key-file', join(home, 'key')]);
    await until(() => liveOf(alice.uid)?.state === 'live', 'alice live');
    const a = liveOf(alice.uid);
    const b = liveOf(bob.uid);
    expect(a?.sessions).toBe(1);
    expect(b?.sessions).toBe(1);
    expect(a?.device).not.toBe(b?.device);
    expect(a?.link).toBe(`/dev/vbd-shadow/${alice.name}/${NAME}`);
    expect(b?.link).toBe(`/dev/vbd-shadow/${bob.name}/${NAME}`);
    expect(realpathSync(a?.link ?? '')).toBe(a?.device);
    expect(realpathSync(b?.link ?? '')).toBe(b?.device);
    // Bob's daemon never heard a key (his volume is not keyed; a key line would be logged as out of turn).
    expect(bobDaemon.output()).not.toMatch(/key/);

    aliceAgent.child.kill('SIGTERM');
    bobAgent.child.kill('SIGTERM');
    await until(() => liveOf(alice.uid)?.state === 'waiting' && liveOf(bob.uid)?.state === 'waiting', 'both back to waiting');
    expect(await stopDaemon(aliceDaemon)).toBe(0);
    expect(await stopDaemon(bobDaemon)).toBe(0);
    expect(leftovers()).toEqual([]);
  });

  it('a leftover RAM image of one is never recovered into the other', async () => {
    const { user: alice, scratch, home } = ownedScratch();
    const { user: bob, home: bobHome } = otherHome(scratch);
    const aliceDir = join(home, 'vol');
    const bobDir = join(bobHome, 'vol');
    expect(cliAs(alice, ['init', aliceDir, '--size', '8M', '--files', '4', '--name', NAME]).status).toBe(0);
    expect(cliAs(bob, ['init', bobDir, '--size', '8M', '--files', '4', '--name', NAME]).status).toBe(0);
    const bobBefore = join(scratch, 'bob-before.img');
    cliOk(['export', bobDir, bobBefore]);

    // Alice writes, her daemon is killed: her image stays in her runtime directory.
    const aliceDaemon = startDaemon(NAME, [aliceDir, '--interval', '1h']);
    await until(() => liveOf(alice.uid)?.state === 'live', 'alice live');
    const aliceData = randomBytes(2 ** 20);
    writeFileSync(liveOf(alice.uid)?.device ?? '', aliceData);
    aliceDaemon.child.kill('SIGKILL');
    await aliceDaemon.exited;

    // Bob's start finds nothing to recover; his files are untouched; her image is still there.
    const bobDaemon = startDaemon(NAME, [bobDir, '--interval', '1h']);
    await waitState(bobDaemon, 'live');
    expect(bobDaemon.output()).not.toMatch(/recovery/);
    expect(await stopDaemon(bobDaemon)).toBe(0);
    const bobAfter = join(scratch, 'bob-after.img');
    cliOk(['export', bobDir, bobAfter]);
    expect(sha256(readFileSync(bobAfter))).toBe(sha256(readFileSync(bobBefore)));
    const aliceRuntime = knownVolumes().find((v) => v.status.owner.uid === alice.uid && v.status.name === NAME)?.paths.dir ?? '';
    expect(existsSync(join(aliceRuntime, 'shadow', 'image'))).toBe(true);

    // Her own recover writes her data back.
    cliOk(['recover', aliceDir]);
    const aliceOut = join(scratch, 'alice.img');
    cliOk(['export', aliceDir, aliceOut]);
    expect(sha256(readFileSync(aliceOut).subarray(0, aliceData.length))).toBe(sha256(aliceData));
    expect(leftovers()).toEqual([]);
  });
});
