// A keyed volume's secret comes from the owner through the agent: the right key attaches and
// mounts; a wrong one is refused with a clear message before anything is read or written, and
// the agent exits with the wrong-key status (5; a sealed volume's wrong passphrase likewise, in
// test/daemon/sealed-serve.test.ts).

import { chownSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { EXIT } from '../../src/common/exit-codes.js';
import { startAgent } from '../helpers/agent.js';
import { treeHash } from '../helpers/cli.js';
import { startDaemon, stopDaemon, waitLive, waitState } from '../helpers/daemon.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs } from '../helpers/system.js';

describe.skipIf(!IS_ROOT)(`keyed volume through the agent (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  it('right key mounts, wrong key is refused and touches nothing', async () => {
    const { user, scratch, home } = ownedScratch();
    const dir = join(home, 'vol');
    const mnt = join(scratch, 'mnt');
    const name = `${TEST_PREFIX}keyed`;
    const config = join(home, '.config', 'vbd-shadow');
    mkdirSync(config, { recursive: true });
    for (const d of [join(home, '.config'), config]) chownSync(d, user.uid, user.gid);
    const keyPath = join(config, `${name}.key`);
    const wrongPath = join(home, 'wrong.key');
    writeFileSync(keyPath, 'the right secret\n', { mode: 0o600 });
    writeFileSync(wrongPath, 'not the secret\n', { mode: 0o600 });
    for (const f of [keyPath, wrongPath]) chownSync(f, user.uid, user.gid);
    const init = cliAs(user, ['init', dir, '--size', '16M', '--files', '4', '--chunk', '4K', '--layout', 'keyed', '--name', name, '--key-file', keyPath]);
    expect(init.status, init.stderr).toBe(0);

    const daemon = startDaemon(name, [dir, '--canary', 'wait', '--mkfs', 'ext4', '--mount', mnt]);
    await waitState(daemon, 'waiting');
    const before = treeHash(dir);
    const wrong = startAgent(user, [dir, '--key-file', wrongPath]);
    expect(await wrong.exited).toBe(EXIT.wrongKey); // 5: the unit's RestartPreventExitStatus= stops restarts
    expect(wrong.output()).toMatch(/vbd-shadow: the daemon refused this session: wrong key: .*nothing was read or written/);
    expect(treeHash(dir)).toBe(before);
    expect(daemon.output()).toMatch(/session refused: wrong key/);
    await waitState(daemon, 'waiting');

    // The right key, from the default place: ~/.config/vbd-shadow/NAME.key.
    const right = startAgent(user, [dir], { XDG_CONFIG_HOME: join(home, '.config') });
    const live = await waitLive(daemon);
    expect(live.mountpoint).toBe(mnt);
    right.child.kill('SIGTERM');
    await waitState(daemon, 'waiting');
    expect(await stopDaemon(daemon)).toBe(0);
  });
});
