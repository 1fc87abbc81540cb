// `init --force` over an old volume: confirmed on a terminal (its name or yes), `--yes` for
// scripts, refused without a terminal and without --yes (usage, naming --yes), refused while a
// daemon serves the volume (busy). A refusal changes nothing; a confirmed one zeroes the data.

import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { InspectReport } from '../../src/cli/inspect-command.js';
import { EXIT } from '../../src/common/exit-codes.js';
import { cli, cliOk, treeHash } from '../helpers/cli.js';
import { startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { onTerminal } from '../helpers/pipes.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX } from '../helpers/system.js';
import { tempDir } from '../helpers/tmp.js';

const SIZE = 256 * 1024;
const SHAPE = ['--size', '256K', '--files', '4', '--chunk', '4K'];

/** A volume holding random data; returns its directory. */
function filledVolume(name = 'old'): { scratch: string; dir: string } {
  const scratch = tempDir();
  const dir = join(scratch, name);
  cliOk(['init', dir, ...SHAPE]);
  writeFileSync(join(scratch, 'data.img'), randomBytes(SIZE));
  cliOk(['import', dir, join(scratch, 'data.img')]);
  return { scratch, dir };
}

function isAllZero(dir: string, scratch: string): boolean {
  const out = join(scratch, `check-${Date.now()}.img`);
  cliOk(['export', dir, out]);
  return readFileSync(out).equals(Buffer.alloc(SIZE));
}

describe('init --force', () => {
  it('without a terminal and without --yes: refused (usage) naming --yes, nothing changed', () => {
    const { scratch, dir } = filledVolume();
    const before = treeHash(dir);
    const r = cli(['init', dir, ...SHAPE, '--force'], { input: '' });
    expect(r.status).toBe(EXIT.usage);
    expect(r.stderr).toBe(`vbd-shadow: init --force: ${dir} holds volume 'old', whose data would be lost; confirm on a terminal, or give --yes\n`);
    expect(treeHash(dir)).toBe(before);
    expect(isAllZero(dir, scratch)).toBe(false);
  });

  it('--yes replaces it without asking (the data is gone); --yes without --force is a usage error', () => {
    const { scratch, dir } = filledVolume();
    const r = cli(['init', dir, ...SHAPE, '--force', '--yes'], { input: '' });
    expect(r.status, r.stderr).toBe(0);
    expect(isAllZero(dir, scratch)).toBe(true);
    expect(cli(['init', join(scratch, 'fresh'), ...SHAPE, '--yes']).status).toBe(EXIT.usage);
  });

  it('--force on a directory that does not exist or is empty asks nothing', () => {
    const scratch = tempDir();
    const r = cli(['init', join(scratch, 'new'), ...SHAPE, '--force'], { input: '' });
    expect(r.status, r.stderr).toBe(0);
  });

  it('on a terminal: a wrong answer or Ctrl-C changes nothing; the volume name (or yes) replaces it', () => {
    const { scratch, dir } = filledVolume();
    const before = treeHash(dir);
    const question = `${dir} holds volume 'old': --force replaces it and its data is lost. Type its name (old) or yes to go on: `;
    const wrong = onTerminal(['init', dir, ...SHAPE, '--force'], [['expect', question], ['send', 'no\r']]);
    expect(wrong.status).toBe(EXIT.refused);
    expect(wrong.output).toContain("init --force: not confirmed (typed 'no'); nothing changed");
    const cancelled = onTerminal(['init', dir, ...SHAPE, '--force'], [['expect', question], ['send', '\u0003']]);
    expect(cancelled.status).toBe(EXIT.interrupted);
    expect(treeHash(dir)).toBe(before);

    const byName = onTerminal(['init', dir, ...SHAPE, '--force'], [['expect', question], ['send', 'old\r']]);
    expect(byName.status, byName.output).toBe(0);
    expect(isAllZero(dir, scratch)).toBe(true);
    writeFileSync(join(scratch, 'data.img'), randomBytes(SIZE));
    cliOk(['import', dir, join(scratch, 'data.img')]);
    const byYes = onTerminal(['init', dir, ...SHAPE, '--force'], [['expect', question], ['send', 'yes\r']]);
    expect(byYes.status, byYes.output).toBe(0);
    expect(isAllZero(dir, scratch)).toBe(true);
  });
});

describe.skipIf(!IS_ROOT)(`init --force of a live volume (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  it('is refused as busy (status 6) even with --yes, and inspect shows it live', async () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    const name = `${TEST_PREFIX}force-live`;
    cliOk(['init', dir, ...SHAPE, '--name', name]);
    const daemon = startDaemon(name, [dir]);
    await waitLive(daemon);
    const before = treeHash(dir);
    const r = cli(['init', dir, ...SHAPE, '--name', name, '--force', '--yes']);
    expect(r.status).toBe(EXIT.busy);
    expect(r.stderr).toBe(`vbd-shadow: volume '${name}' is live (daemon pid ${daemon.child.pid}): its RAM image is the truth; stop it first\n`);
    expect(treeHash(dir)).toBe(before);
    const inspected = cli(['inspect', dir, '--json']);
    expect((JSON.parse(inspected.stdout) as InspectReport).live).toEqual({ pid: daemon.child.pid, state: 'live' });
    expect(await stopDaemon(daemon)).toBe(0);
    expect(cli(['init', dir, ...SHAPE, '--name', name, '--force', '--yes']).status).toBe(0);
  });
});
