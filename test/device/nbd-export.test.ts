// start --nbd: the device exported with nbdkit, reached with libnbd's own clients (nbdcopy,
// nbdinfo; userspace, no kernel nbd module). Writes over NBD reach the files at the next flush
// and at teardown (nbdkit is ended before the final writeback); the owner-only Unix socket
// refuses a second real user; TCP needs TLS (refused without it, at the command line and by
// the server), and a client with the right PSK reads the device.

import { randomBytes } from 'node:crypto';
import { chownSync, existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { DaemonStatus } from '../../src/daemon/runtime.js';
import { cli, sha256 } from '../helpers/cli.js';
import { startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { otherHome, ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, leftovers, runAs, type User } from '../helpers/system.js';

const HAVE_TOOLS = ['/usr/bin/nbdkit', '/usr/bin/nbdcopy', '/usr/bin/nbdinfo'].every((t) => existsSync(t));
const SIZE = 16 * 2 ** 20;

/** A volume of 16 MiB in 4 linear files, owned by the test user. */
function linearVolume(suffix: string): { user: User; home: string; scratch: string; dir: string; name: string } {
  const { user, scratch, home } = ownedScratch();
  const dir = join(home, 'vol');
  const name = `${TEST_PREFIX}nbd-${suffix}`;
  const init = cliAs(user, ['init', dir, '--size', '16M', '--files', '4', '--chunk', '64K', '--layout', 'linear', '--name', name]);
  expect(init.status, init.stderr).toBe(0);
  return { user, home, scratch, dir, name };
}

/** What the backing files hold now, in device order (linear: the files one after the other). */
function filesContent(dir: string): Buffer {
  return Buffer.concat(['file001', 'file002', 'file003', 'file004'].map((f) => readFileSync(join(dir, f))));
}

/** A file of `data` the user can read. */
function userFile(user: User, home: string, name: string, data: Buffer): string {
  const path = join(home, name);
  writeFileSync(path, data, { mode: 0o600 });
  chownSync(path, user.uid, user.gid);
  return path;
}

/** Reads the whole export through `uri` as `user` (nbdcopy to a file of hers); its bytes. */
function readExport(user: User, home: string, uri: string): { status: number | null; stderr: string; data: Buffer | undefined } {
  const out = userFile(user, home, `read-${Date.now()}.img`, Buffer.alloc(0));
  const r = runAs(user, 'nbdcopy', [uri, out]);
  return { status: r.status, stderr: r.stderr, data: r.status === 0 ? readFileSync(out) : undefined };
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  await new Promise((resolve) => server.close(resolve));
  if (address === null || typeof address === 'string') throw new Error('no port');
  return address.port;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe.skipIf(!IS_ROOT)(`start --nbd: usage refusals (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  it('refuses --nbd with --mount, TCP without TLS, and a PSK without TCP, with status 2 and nothing started', () => {
    const { scratch, dir, name } = linearVolume('usage');
    const cases = [
      [dir, '--nbd', '--mount', join(scratch, 'mnt')],
      [dir, '--nbd-tcp', '127.0.0.1:10809'],
      [dir, '--nbd', '--nbd-tcp', '127.0.0.1:10809'],
      [dir, '--nbd', '--nbd-tls-psk', join(scratch, 'psk')],
      [dir, '--nbd-tcp', 'localhost:10809', '--nbd-tls-psk', join(scratch, 'psk')],
    ];
    for (const args of cases) {
      const r = cli(['start', ...args, '--foreground']);
      expect(r.status, `${args.join(' ')}: ${r.stderr}`).toBe(2);
    }
    expect(cli(['status', name]).status).not.toBe(0); // never started
  });
});

describe.skipIf(!IS_ROOT || !HAVE_TOOLS)(`start --nbd over the owner-only Unix socket (${IS_ROOT ? 'as root, owner and a second user are real' : ROOT_SKIP_REASON})`, () => {
  it('serves the device as the owner; writes over NBD reach the files at a flush and at teardown; another user is refused', async () => {
    const { user, home, scratch, dir, name } = linearVolume('unix');
    const daemon = startDaemon(name, [dir, '--nbd']);
    const live: DaemonStatus = await waitLive(daemon);
    const nbd = live.nbd;
    expect(nbd).toBeDefined();
    if (nbd === undefined) return;
    const socket = nbd.socket ?? '';
    expect(socket.startsWith('/run/vbd-shadow/')).toBe(true);
    expect(nbd.uri).toBe(`nbd+unix:///?socket=${socket}`);
    const st = statSync(socket);
    expect(st.isSocket()).toBe(true);
    expect(st.mode & 0o777).toBe(0o600);
    expect(st.uid).toBe(user.uid);
    // nbdkit runs as the owner, not as root.
    expect(/^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${nbd.pid}/status`, 'utf8'))?.[1]).toBe(String(user.uid));

    const first = randomBytes(SIZE);
    const src = userFile(user, home, 'first.img', first);
    const write = runAs(user, 'nbdcopy', [src, nbd.uri]);
    expect(write.status, write.stderr).toBe(0);
    const flush = cli(['flush', name]);
    expect(flush.status, flush.stderr).toBe(0);
    expect(sha256(filesContent(dir))).toBe(sha256(first));
    const back = readExport(user, home, nbd.uri);
    expect(back.status, back.stderr).toBe(0);
    expect(sha256(back.data ?? Buffer.alloc(0))).toBe(sha256(first));

    // A second real user: the socket is 0600 and hers, so connect(2) is refused.
    const other = otherHome(scratch);
    const refused = runAs(other.user, 'nbdinfo', ['--size', nbd.uri]);
    expect(refused.status).not.toBe(0);
    expect(refused.stderr).toContain('Permission denied');

    // Written over NBD, never flushed by hand: the teardown ends nbdkit, then writes back.
    const second = randomBytes(SIZE);
    const src2 = userFile(user, home, 'second.img', second);
    const write2 = runAs(user, 'nbdcopy', [src2, nbd.uri]);
    expect(write2.status, write2.stderr).toBe(0);
    expect(await stopDaemon(daemon)).toBe(0);
    expect(alive(nbd.pid)).toBe(false);
    expect(existsSync(socket)).toBe(false);
    expect(leftovers()).toEqual([]);
    const exported = join(home, 'exported.img');
    expect(cliAs(user, ['export', dir, exported]).status).toBe(0);
    expect(sha256(readFileSync(exported))).toBe(sha256(second));
  });
});

describe.skipIf(!IS_ROOT || !HAVE_TOOLS)(`start --nbd-tcp with TLS (PSK) (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  it('a client with the right key reads the device; without TLS or with a wrong key it is refused', async () => {
    const { user, home, dir, name } = linearVolume('tcp');
    const data = randomBytes(SIZE);
    const image = userFile(user, home, 'data.img', data);
    expect(cliAs(user, ['import', dir, image]).status).toBe(0);
    const psk = userFile(user, home, 'server.psk', Buffer.from(`alice:${randomBytes(32).toString('hex')}\n`));
    const clientPsk = userFile(user, home, 'client.psk', readFileSync(psk));
    const wrongPsk = userFile(user, home, 'wrong.psk', Buffer.from(`alice:${randomBytes(32).toString('hex')}\n`));
    const port = await freePort();

    const daemon = startDaemon(name, [dir, '--nbd-tcp', `127.0.0.1:${port}`, '--nbd-tls-psk', psk]);
    const live = await waitLive(daemon);
    expect(live.nbd?.tls).toBe('psk');
    expect(live.nbd?.listen).toBe(`127.0.0.1:${port}`);
    expect(live.nbd?.socket).toBeUndefined();

    const good = readExport(user, home, `nbds://alice@127.0.0.1:${port}/?tls-psk-file=${clientPsk}`);
    expect(good.status, good.stderr).toBe(0);
    expect(sha256(good.data ?? Buffer.alloc(0))).toBe(sha256(data));
    // Plain NBD: nbdkit --tls=require refuses to serve it.
    const plain = readExport(user, home, `nbd://127.0.0.1:${port}/`);
    expect(plain.status).not.toBe(0);
    expect(plain.data).toBeUndefined();
    const wrong = readExport(user, home, `nbds://alice@127.0.0.1:${port}/?tls-psk-file=${wrongPsk}`);
    expect(wrong.status).not.toBe(0);

    expect(await stopDaemon(daemon)).toBe(0);
    expect(leftovers()).toEqual([]);
  });

  it('a PSK file nbdkit cannot read fails the start with status 1 and leaves nothing behind', async () => {
    const { dir, name, scratch } = linearVolume('badpsk');
    const port = await freePort();
    const daemon = startDaemon(name, [dir, '--nbd-tcp', `127.0.0.1:${port}`, '--nbd-tls-psk', join(scratch, 'no-such.psk')]);
    expect(await daemon.exited).toBe(1);
    expect(daemon.output()).toContain('cannot export');
    expect(leftovers()).toEqual([]);
  });
});

