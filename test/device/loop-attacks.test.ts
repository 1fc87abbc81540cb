// The owner holds her device node read-write, so she can issue loop ioctls herself. Tried as she
// would: LOOP_CLR_FD through her own fd, then another tenant starts. Her fd must never show the
// next tenant's bytes, the next tenant must get a device of its own, and her teardown must not
// detach or take over anything but her own session's device.

import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, chownSync, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { describe, expect, it } from 'vitest';
import { readStatus } from '../../src/daemon/runtime.js';
import { sha256 } from '../helpers/cli.js';
import { Stage, eachTestCleanup } from '../helpers/cleanup.js';
import { startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, OTHER_USER, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, ensureUser, leftovers, type User } from '../helpers/system.js';

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
  const child = spawn('setpriv', [`--reuid=${user.uid}`, `--regid=${user.gid}`, '--clear-groups', 'python3', '-c', script], { stdio: ['pipe', 'pipe', 'inherit'] });
  const lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  const next = async (): Promise<string> => String((await lines.next()).value);
  const ready = next();
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
  it('LOOP_CLR_FD by the owner: the next tenant gets another device, her fd sees nothing of it, her teardown leaves it alone', async () => {
    const { user, home } = ownedScratch();
    const other = ensureUser(OTHER_USER);
    const aliceDir = join(home, 'vol');
    const aliceName = `${TEST_PREFIX}loop-alice`;
    expect(cliAs(user, ['init', aliceDir, '--size', '8M', '--files', '4', '--name', aliceName]).status).toBe(0);
    const bobHome = join(home, '..', 'bob');
    mkdirSync(bobHome);
    chownSync(bobHome, other.uid, other.gid);
    chmodSync(bobHome, 0o755);
    const bobDir = join(bobHome, 'vol');
    const bobName = `${TEST_PREFIX}loop-bob`;
    expect(cliAs(other, ['init', bobDir, '--size', '8M', '--files', '4', '--name', bobName]).status).toBe(0);

    const alice = startDaemon(aliceName, [aliceDir, '--interval', '1h']);
    const aliceLive = await waitLive(alice);
    const aliceDevice = aliceLive.device ?? '';
    expect(statSync(aliceDevice).uid).toBe(user.uid); // no mount: the raw node is hers
    const held = holder(user, aliceDevice);
    expect(await held.ask('clear')).toBe('cleared');

    const bob = startDaemon(bobName, [bobDir, '--interval', '1h']);
    const bobLive = await waitLive(bob);
    const bobDevice = bobLive.device ?? '';
    expect(bobDevice).not.toBe(aliceDevice);
    const secret = randomBytes(2 ** 20);
    writeFileSync(bobDevice, secret);
    // Her fd of her old number reads nothing at all, let alone his bytes.
    expect(await held.ask('read')).toBe('read 0 ');

    // Her teardown: her device is no longer bound to her image; it is not detached again, and
    // his device stays his, bound and intact.
    expect(await stopDaemon(alice)).toBe(0);
    expect(alice.output()).toMatch(/had been unbound by someone holding it/);
    expect(statSync(bobDevice).uid).toBe(other.uid);
    expect(readStatus(bobName)?.state).toBe('live');
    expect(sha256(readFileSync(bobDevice).subarray(0, secret.length))).toBe(sha256(secret));

    // Her number is quarantined while she holds it, and removed at her next start once she lets go.
    expect(existsSync(aliceDevice)).toBe(true);
    expect(readFileSync(`/run/vbd-shadow/${user.uid}/quarantined-loops`, 'utf8')).toContain(aliceDevice.slice('/dev/loop'.length));
    held.kill();
    const again = startDaemon(aliceName, [aliceDir, '--interval', '1h']);
    await waitLive(again);
    expect(readFileSync(`/run/vbd-shadow/${user.uid}/quarantined-loops`, 'utf8')).toBe('');
    expect(await stopDaemon(again)).toBe(0);
    expect(await stopDaemon(bob)).toBe(0);
    expect(leftovers()).toEqual([]);
  });
});
