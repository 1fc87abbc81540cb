// The owner holds her device node read-write, so she can issue loop ioctls herself. Tried as she
// would: LOOP_CLR_FD through her own fd, then another tenant starts. Her fd must never show the
// next tenant's bytes, the next tenant must get a device of its own, and her teardown must not
// detach or take over anything but her own session's device (which it removes once she lets go).

import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { describe, expect, it } from 'vitest';
import { readStatus } from '../../src/daemon/runtime.js';
import { sha256 } from '../helpers/cli.js';
import { Stage, eachTestCleanup } from '../helpers/cleanup.js';
import { startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { otherHome, ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, leftovers, type User } from '../helpers/system.js';

/** A process of `user` holding `device` open; commands on stdin: clear (LOOP_CLR_FD), read. */
function holder(user: User, device: string): { ask: (command: string) => Promise<string>; kill: () => void } {
  const script = `
import fcntl, os, sys
fd = os.open(${JSON.stringify(device)}, os.O_RDWR)
print('open', flush=True)
for line in sys.stdin:
    cmd = line.strip()
    try:
        if cmd == 'clear':
            fcntl.ioctl(fd, 0x4C01, 0); print('cleared', flush=True)
        elif cmd == 'read':
            print('read', len(os.pread(fd, 1 << 20, 0)), os.pread(fd, 64, 0).hex(), flush=True)
    except OSError as e:
        print('error', e.errno, flush=True)
`;
  const child = spawn('setpriv', [`--reuid=${user.uid}`, `--regid=${user.gid}`, '--clear-groups', '/usr/bin/python3', '-c', script], { stdio: ['pipe', 'pipe', 'inherit'] });
  const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  const next = async (): Promise<string> => String((await lines.next()).value);
  const ready = next();
  child.stdin.on('error', () => undefined); // it may be gone when we write: the answer says so
  eachTestCleanup(Stage.Processes, () => void child.kill('SIGKILL'));
  return {
    ask: async (command) => {
      await ready;
      child.stdin.write(`${command}\n`);
      return next();
    },
    kill: () => child.kill('SIGKILL'),
  };
}

describe.skipIf(!IS_ROOT)(`loop device attacks (${IS_ROOT ? 'as root, two real users' : ROOT_SKIP_REASON})`, () => {
  it('LOOP_CLR_FD by the owner: the next tenant gets another device, her fd shows only her own bytes, her teardown leaves his alone', async () => {
    const { user, scratch, home } = ownedScratch();
    const { user: other, home: bobHome } = otherHome(scratch);
    const aliceDir = join(home, 'vol');
    const aliceName = `${TEST_PREFIX}loop-alice`;
    expect(cliAs(user, ['init', aliceDir, '--size', '8M', '--files', '4', '--name', aliceName]).status).toBe(0);
    const bobDir = join(bobHome, 'vol');
    const bobName = `${TEST_PREFIX}loop-bob`;
    expect(cliAs(other, ['init', bobDir, '--size', '8M', '--files', '4', '--name', bobName]).status).toBe(0);

    const alice = startDaemon(aliceName, [aliceDir, '--interval', '1h']);
    const aliceLive = await waitLive(alice);
    const aliceDevice = aliceLive.device ?? '';
    expect(statSync(aliceDevice).uid).toBe(user.uid); // no mount: the raw node is hers
    const aliceData = randomBytes(4096);
    writeFileSync(aliceDevice, aliceData);
    const held = holder(user, aliceDevice);
    // Her LOOP_CLR_FD only marks the device for release: the daemon's own fd keeps it bound.
    expect(await held.ask('clear')).toBe('cleared');

    const bob = startDaemon(bobName, [bobDir, '--interval', '1h']);
    const bobLive = await waitLive(bob);
    const bobDevice = bobLive.device ?? '';
    expect(bobDevice).not.toBe(aliceDevice);
    const secret = randomBytes(2 ** 20);
    writeFileSync(bobDevice, secret);
    // Her fd shows her own bytes, never his.
    expect(await held.ask('read')).toBe(`read ${2 ** 20} ${aliceData.subarray(0, 64).toString('hex')}`);

    // Her teardown waits while she holds the node (the kernel keeps it bound to her image) ...
    alice.child.kill('SIGTERM');
    for (let i = 0; i < 40 && !/still open by/.test(alice.output()); i++) await new Promise((r) => setTimeout(r, 50));
    expect(alice.child.exitCode).toBeNull();
    expect(existsSync(aliceDevice)).toBe(true);
    expect(readStatus(bobName)?.state).toBe('live');
    // ... and ends when she lets go: her device is removed, his stays his, bound and intact.
    held.kill();
    expect(await alice.exited).toBe(0);
    expect(existsSync(aliceDevice)).toBe(false);
    expect(statSync(bobDevice).uid).toBe(other.uid);
    expect(readStatus(bobName)?.state).toBe('live');
    expect(sha256(readFileSync(bobDevice).subarray(0, secret.length))).toBe(sha256(secret));
    expect(await stopDaemon(bob)).toBe(0);
    expect(leftovers()).toEqual([]);
  });
});
