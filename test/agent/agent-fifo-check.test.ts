// The agent hands its key only to a FIFO that root made for it: every directory above it is
// root's and writable by root alone, and the FIFO was made for the agent's uid, mode 0600. An
// impostor FIFO (another user's) or a directory others can write is refused before a byte of
// the key is written.

import { chmodSync, chownSync, closeSync, mkdirSync, openSync, readSync, rmSync, writeFileSync, constants as fsc } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { runtimePaths } from '../../src/daemon/runtime.js';
import { makeFifo } from '../../src/sys/libc.js';
import { closeVolume, openVolume } from '../../src/volume/volume.js';
import { Stage, eachTestCleanup } from '../helpers/cleanup.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, OTHER_USER, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, ensureUser } from '../helpers/system.js';


describe.skipIf(!IS_ROOT)(`agent: whom it gives the key (${IS_ROOT ? 'as root, two real users' : ROOT_SKIP_REASON})`, () => {
  it('refuses a FIFO made for someone else and a runtime directory others can write', () => {
    const { user, home } = ownedScratch();
    const other = ensureUser(OTHER_USER);
    const dir = join(home, 'vol');
    const key = join(home, 'key');
    writeFileSync(key, 'the secret of the owner\n', { mode: 0o600 });
    chownSync(key, user.uid, user.gid);
    expect(cliAs(user, ['init', dir, '--size', '4M', '--files', '4', '--layout', 'keyed', '--key-file', key, '--name', `${TEST_PREFIX}fifo`]).status).toBe(0);
    const volume = openVolume(dir);
    const paths = runtimePaths(volume.identity);
    closeVolume(volume);
    mkdirSync(paths.dir, { recursive: true, mode: 0o755 });
    eachTestCleanup(Stage.Files, () => rmSync(paths.dir, { recursive: true, force: true }));
    makeFifo(paths.agentFifo, 0o600);
    // Someone else's FIFO at the agent's path, open to all (the old agent wrote its key into it).
    chownSync(paths.agentFifo, other.uid, other.gid);
    chmodSync(paths.agentFifo, 0o666);
    const reader = openSync(paths.agentFifo, fsc.O_RDONLY | fsc.O_NONBLOCK);
    eachTestCleanup(Stage.Files, () => closeSync(reader));
    const received = (): number => {
      try {
        return readSync(reader, Buffer.alloc(65536));
      } catch {
        return 0; // EAGAIN: nothing there
      }
    };

    const impostor = cliAs(user, ['agent', dir, '--key-file', key]);
    expect(impostor.status).toBe(1);
    expect(impostor.stderr).toMatch(/is not a FIFO made for uid \d+ with mode 0600; refusing to talk to it/);
    expect(received()).toBe(0);

    chownSync(paths.agentFifo, user.uid, user.gid);
    chmodSync(paths.agentFifo, 0o600);
    chmodSync(paths.dir, 0o777); // a directory anyone could have put the FIFO in
    const open = cliAs(user, ['agent', dir, '--key-file', key]);
    expect(open.status).toBe(1);
    expect(open.stderr).toMatch(/is not a root-owned directory writable only by root; refusing to trust what is in it/);
    expect(received()).toBe(0);
  });
});
