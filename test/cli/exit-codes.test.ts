// Each exit status of src/common/exit-codes.ts, from the real CLI, for a cause a script would
// meet; a refused command changes nothing. The live-volume status needs a daemon (root).

import { closeSync, chmodSync, existsSync, openSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { EXIT } from '../../src/common/exit-codes.js';
import { BIN, cli, cliOk, treeHash } from '../helpers/cli.js';
import { startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { onTerminal, pipeInto } from '../helpers/pipes.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX } from '../helpers/system.js';
import { keyFile, tempDir } from '../helpers/tmp.js';

const SHAPE = ['--size', '256K', '--files', '4', '--chunk', '4K'];

function volume(layout = 'linear'): { scratch: string; dir: string; key: string; keyArgs: string[] } {
  const scratch = tempDir();
  const dir = join(scratch, 'vol');
  const key = keyFile(scratch, 'the right key');
  const keyArgs = layout === 'keyed' ? ['--key-file', key] : [];
  cliOk(['init', dir, ...SHAPE, '--layout', layout, ...keyArgs]);
  return { scratch, dir, key, keyArgs };
}

/** Runs the CLI, expects `status` and one line on stderr, and that the scratch tree is unchanged. */
function expectRefusal(scratch: string, args: string[], status: number, error: RegExp): void {
  const before = treeHash(scratch);
  const r = cli(args, { stdio: ['ignore', 'pipe', 'pipe'] });
  expect(r.stderr).toMatch(/^vbd-shadow: [^\n]+\n$/);
  expect(r.stderr).toMatch(error);
  expect(r.status, r.stderr).toBe(status);
  expect(treeHash(scratch)).toBe(before);
}

describe('exit statuses', () => {
  it(`${EXIT.usage}: usage — unknown option, malformed value, a bad choice, contradictory options`, () => {
    const { scratch, dir, key } = volume();
    const fresh = join(scratch, 'new');
    expectRefusal(scratch, ['init', fresh, '--size', '1M'], EXIT.usage, /required option '--files <n>'/);
    expectRefusal(scratch, ['init', fresh, '--size', '1X', '--files', '1'], EXIT.usage, /--size: expected a size/);
    expectRefusal(scratch, ['init', fresh, '--size', '1M', '--files', 'two'], EXIT.usage, /argument 'two' is invalid/);
    expectRefusal(scratch, ['export', dir], EXIT.usage, /missing required argument 'out'/);
    expectRefusal(scratch, ['frobnicate'], EXIT.usage, /unknown command 'frobnicate'/);
    expectRefusal(scratch, ['start', dir, '--canary', 'sometimes'], EXIT.usage, /argument 'sometimes' is invalid. Allowed choices are spawn, wait, none/);
    expectRefusal(scratch, ['start', dir, '--mkfs', 'fat'], EXIT.usage, /Allowed choices are ext4, ext3, ext2, xfs, btrfs/);
    expectRefusal(scratch, ['init', fresh, '--size', '1M', '--files', '1', '--key-file', key], EXIT.usage, /--key-file: a linear volume has no key/);
    expectRefusal(scratch, ['init', fresh, '--size', '1M', '--files', '1', '--layout', 'striped', '--layout-params', '{}'], EXIT.usage, /only a module:PATH layout takes parameters/);
    expectRefusal(scratch, ['init', fresh, '--size', '1M', '--files', '1', '--spare', '10%'], EXIT.usage, /--spare only applies to a sealed volume/);
    expectRefusal(scratch, ['export', dir, join(scratch, 'out'), '--key-file', key], EXIT.usage, /--key-file: volume 'vol' has no key \(linear layout, not sealed\)/);
    expectRefusal(scratch, ['import', dir, '-', '--key-file', '-'], EXIT.usage, /the image and --key-file cannot both come from standard input/);
    expectRefusal(scratch, ['passwd', dir, '--key-file', '-', '--new-key-file', '-'], EXIT.usage, /cannot both come from standard input/);
    expect(existsSync(fresh)).toBe(false);
  });

  it(`${EXIT.usage} is also what --help is not: --help and --version exit ${EXIT.ok}`, () => {
    for (const args of [['--help'], ['init', '--help'], ['--version']]) expect(cli(args).status).toBe(EXIT.ok);
  });

  it(`${EXIT.notFound}: not found — no such directory, no such live volume`, () => {
    const scratch = tempDir();
    expectRefusal(scratch, ['export', join(scratch, 'nothing'), join(scratch, 'out')], EXIT.notFound, /no such file or directory \(ENOENT\)/);
    expectRefusal(scratch, ['stop', join(scratch, 'nothing')], EXIT.notFound, /no such file or directory/);
    expectRefusal(scratch, ['flush', `${TEST_PREFIX}never-started`], EXIT.notFound, /no volume named 'vbdt-never-started' has been started here/);
    const { dir } = volume();
    expectRefusal(scratch, ['flush', dir], EXIT.notFound, /volume 'vol' is not live/);
  });

  it(`${EXIT.refused}: refused by a check — a key file others can read, a directory others can write`, () => {
    const { scratch, dir, key, keyArgs } = volume('keyed');
    chmodSync(key, 0o644);
    expectRefusal(scratch, ['export', dir, join(scratch, 'out'), ...keyArgs], EXIT.refused, /key file .* is accessible by group or others \(mode 644\)/);
    chmodSync(key, 0o600);
    chmodSync(dir, 0o777);
    expectRefusal(scratch, ['export', dir, join(scratch, 'out'), ...keyArgs], EXIT.refused, /writable by group or others \(mode 777\)/);
    chmodSync(dir, 0o700);
    // passwd of a plain keyed volume: refused, saying what a change of its key costs.
    expectRefusal(scratch, ['passwd', dir, ...keyArgs], EXIT.refused, /is not sealed: its keyed layout's key decides where every chunk is, so changing it moves every chunk/);
    const plain = volume();
    expectRefusal(plain.scratch, ['passwd', plain.dir], EXIT.refused, /volume 'vol' has no passphrase \(linear layout, not sealed\)/);
  });

  it(`${EXIT.wrongKey}: wrong key — export and import refuse before reading or writing`, () => {
    const { scratch, dir } = volume('keyed');
    const wrong = keyFile(scratch, 'not the key', 'wrong');
    writeFileSync(join(scratch, 'img'), Buffer.alloc(256 * 1024));
    expectRefusal(scratch, ['export', dir, join(scratch, 'out'), '--key-file', wrong], EXIT.wrongKey, /wrong key/);
    expectRefusal(scratch, ['import', dir, join(scratch, 'img'), '--key-file', wrong], EXIT.wrongKey, /wrong key/);
  });

  it(`${EXIT.io}: I/O failure — export to a full device (/dev/full)`, () => {
    const { dir } = volume();
    const full = openSync('/dev/full', 'w');
    try {
      const r = spawnSync(process.execPath, [BIN, 'export', dir, '-'], { stdio: ['ignore', full, 'pipe'], encoding: 'utf8' });
      expect(r.stderr).toBe('vbd-shadow: write to standard output: no space left on device (ENOSPC)\n');
      expect(r.status).toBe(EXIT.io);
    } finally {
      closeSync(full);
    }
  });

  it(`${EXIT.interrupted}: Ctrl-C at the passphrase prompt, and nothing is created`, () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    const r = onTerminal(['init', dir, ...SHAPE, '--layout', 'keyed'], [['expect', 'New key: '], ['send', '\x03']]);
    expect(r.output).toMatch(/New key: /);
    expect(r.status).toBe(EXIT.interrupted);
    expect(existsSync(dir)).toBe(false);
  });

  it(`${EXIT.stdoutClosed}: stdout closed early — quiet, never a stack trace (20 runs of --help | head -1)`, () => {
    const statuses = new Set<number>();
    for (let i = 0; i < 20; i++) {
      const r = pipeInto(['--help'], 'head -1');
      expect(r.stderr).toBe('');
      statuses.add(r.status);
    }
    // Whether head closed the pipe before the one write is a race; both ends are quiet.
    expect([...statuses].every((s) => s === EXIT.ok || s === EXIT.stdoutClosed)).toBe(true);
    // The help of the long-lived commands (whose own stdout is left alone) too.
    for (const command of ['start', 'agent']) {
      const r = pipeInto([command, '--help'], 'head -1');
      expect(r.stderr).toBe('');
      expect([EXIT.ok, EXIT.stdoutClosed]).toContain(r.status);
    }
  });

  it(`${EXIT.stdoutClosed}: an export larger than the pipe, read by head -c 1, ends quietly with ${EXIT.stdoutClosed}`, () => {
    const { scratch, dir } = volume();
    writeFileSync(join(scratch, 'img'), randomBytes(256 * 1024));
    cliOk(['import', dir, join(scratch, 'img')]);
    for (let i = 0; i < 5; i++) {
      const r = pipeInto(['export', dir, '-'], 'head -c 1');
      expect(r.stderr).toBe('');
      expect(r.status).toBe(EXIT.stdoutClosed);
    }
  });
});

describe.skipIf(!IS_ROOT)(`exit status ${EXIT.busy} (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  it(`${EXIT.busy}: busy — import, recover and a second start of a live volume are refused`, async () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    const name = `${TEST_PREFIX}busy`;
    cliOk(['init', dir, ...SHAPE, '--name', name]);
    writeFileSync(join(scratch, 'img'), Buffer.alloc(256 * 1024, 7));
    const daemon = startDaemon(name, [dir, '--canary', 'none']);
    await waitLive(daemon);
    for (const [args, error] of [
      [['import', dir, join(scratch, 'img')], /is live \(daemon pid \d+\)/],
      [['recover', dir], /is live \(pid \d+\); stop it first/],
      [['start', dir, '--canary', 'none'], /is already served by pid \d+/],
    ] as const) {
      const r = cli([...args], { stdio: ['ignore', 'pipe', 'pipe'] });
      expect(r.stderr).toMatch(error);
      expect(r.status, r.stderr).toBe(EXIT.busy);
    }
    expect(await stopDaemon(daemon)).toBe(0);
    expect(cli(['stop', dir]).status).toBe(EXIT.notFound);
  });
});
