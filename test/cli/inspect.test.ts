// `inspect DIR`: offline, no root, no key — geometry, layout, files (missing, wrong size),
// a plain volume's journal and last flush; a sealed volume's identity, and with the passphrase
// (--key-file or ~/.config/vbd-shadow/NAME.key; never asked without a terminal) its epochs,
// seals, free slots and map copy. It changes nothing; `--json` is one object with fixed keys.

import { randomBytes } from 'node:crypto';
import { mkdirSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { InspectReport } from '../../src/cli/inspect-command.js';
import { EXIT } from '../../src/common/exit-codes.js';
import { openJournal, retireJournal, writeBatch } from '../../src/flush/journal.js';
import { closeVolume, openVolume, requirePlainVolume } from '../../src/volume/volume.js';
import { closeSync } from 'node:fs';
import { cli, cliOk, treeHash } from '../helpers/cli.js';
import { ownedScratch } from '../helpers/owner.js';
import { cliAs } from '../helpers/system.js';
import { keyFile, tempDir } from '../helpers/tmp.js';

const SHAPE = ['--size', '1M', '--files', '3', '--chunk', '4K'];

function inspectJson(args: string[], env?: NodeJS.ProcessEnv): InspectReport {
  const r = cli(['inspect', ...args, '--json'], env === undefined ? {} : { env });
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as InspectReport;
}

/** Every key of the report, nested, sorted: the shape scripts rely on. */
function shape(value: unknown, prefix = ''): string[] {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return [prefix];
  return Object.entries(value).flatMap(([k, v]) => shape(v, `${prefix}.${k}`)).sort();
}

describe('inspect', () => {
  it('runs as an unprivileged owner without a key, reports geometry and layout, and changes nothing', () => {
    const { user, home } = ownedScratch();
    const dir = join(home, 'vol');
    const init = cliAs(user, ['init', dir, ...SHAPE, '--layout', 'striped']);
    expect(init.status, init.stderr).toBe(0);
    const before = treeHash(home);
    const r = cliAs(user, ['inspect', dir, '--json']);
    expect(r.status, r.stderr).toBe(0);
    const report = JSON.parse(r.stdout) as InspectReport;
    expect(report).toMatchObject({
      name: 'vol', owner: { uid: user.uid, name: user.name }, layout: { kind: 'striped', module: null }, sealed: false,
      deviceSize: 1024 * 1024, chunkSize: 4096, chunkCount: 256, files: { count: 3, totalBytes: 1024 * 1024, problems: [] },
      live: null, journal: { state: 'none', batch: null, chunks: null, reason: null }, lastFlush: null, seal: null,
    });
    const human = cliAs(user, ['inspect', dir]);
    expect(human.status).toBe(0);
    expect(human.stdout).toContain('  geometry   1M: 256 chunks of 4K\n');
    expect(treeHash(home)).toBe(before);
  });

  it('names missing and wrong-sized files (and still exits 0: it is a report)', () => {
    const dir = join(tempDir(), 'vol');
    cliOk(['init', dir, ...SHAPE]);
    rmSync(join(dir, 'file002'));
    truncateSync(join(dir, 'file003'), 100);
    const report = inspectJson([dir]);
    expect(report.files.problems).toEqual([
      { path: 'file002', state: 'missing', expectedBytes: 348160, actualBytes: null, reason: null },
      { path: 'file003', state: 'wrong-size', expectedBytes: 348160, actualBytes: 100, reason: null },
    ]);
    // export cannot open such a volume; inspect says why without failing.
    expect(cli(['export', dir, join(dir, '..', 'out.img')]).status).not.toBe(0);
  });

  it('plain: the journal — a pending batch, then retired: the last flush with its batch number', () => {
    const dir = join(tempDir(), 'vol');
    cliOk(['init', dir, ...SHAPE]);
    const volume = requirePlainVolume(openVolume(dir, { writable: true }));
    const fd = openJournal(volume);
    try {
      writeBatch(fd, { seq: 7, chunkSize: 4096, entries: [0, 1, 2].map((i) => ({ file: 0, offset: i * 4096, data: randomBytes(4096) })) });
      const pending = inspectJson([dir]);
      expect(pending.journal).toEqual({ state: 'pending', batch: 7, chunks: 3, reason: null });
      expect(pending.lastFlush).toBeNull();
      // A volume with a pending batch is refused by export until recovered: inspect is how one sees why.
      expect(cli(['export', dir, join(dir, '..', 'x.img')]).status).toBe(EXIT.refused);
      retireJournal(fd);
    } finally {
      closeSync(fd);
      closeVolume(volume);
    }
    const done = inspectJson([dir]);
    expect(done.journal).toEqual({ state: 'empty', batch: null, chunks: null, reason: null });
    expect(done.lastFlush?.batch).toBe(7);
    expect(Math.abs(Date.parse(done.lastFlush?.at ?? '') - Date.now())).toBeLessThan(60_000);
  });

  it('sealed: identity without a key (never asked without a terminal); epochs, seals, free slots and map copy with it', () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    const pass = keyFile(scratch, 'inspect me');
    cliOk(['init', dir, ...SHAPE, '--sealed', '--spare', '10', '--key-file', pass]);
    const home = join(scratch, 'home');
    const env = { ...process.env, HOME: home, XDG_CONFIG_HOME: '' };
    delete env['XDG_CONFIG_HOME'];

    const bare = inspectJson([dir], env);
    expect(bare.sealed).toBe(true);
    expect(bare.seal).toMatchObject({ keyGeneration: 0, spareSlots: 10, slotBytes: 4096 + 28, overflowJournal: false, unlocked: null });
    expect(bare.seal?.uuid).toMatch(/^[0-9a-f]{32}$/);
    expect(bare.seal?.unlockedSkipped).toContain('no passphrase given');
    expect(bare.journal).toBeNull();

    const keyed = inspectJson([dir, '--key-file', pass], env);
    expect(keyed.seal?.unlocked).toMatchObject({ committedEpoch: 2, keyGeneration: 0, sealsUnderGeneration: 256, freeSlots: 10, mapLogBytes: 0, notices: [] });
    expect(keyed.seal?.unlocked?.mapCopy).toBe('B');

    // An import commits a new epoch: more seals, the map log grows.
    writeFileSync(join(scratch, 'img'), randomBytes(1024 * 1024));
    cliOk(['import', dir, join(scratch, 'img'), '--key-file', pass]);
    // The default key file, as the agent reads it.
    mkdirSync(join(home, '.config', 'vbd-shadow'), { recursive: true });
    keyFile(join(home, '.config', 'vbd-shadow'), 'inspect me', 'vol.key');
    const after = inspectJson([dir], env);
    const u = after.seal?.unlocked;
    expect(u?.committedEpoch).toBeGreaterThan(2);
    expect(u?.sealsUnderGeneration).toBe(256 + 256);
    expect(u?.freeSlots).toBe(10);
    expect((u?.mapLogBytes ?? 0) > 0 || u?.mapCopy === 'A').toBe(true);
    // Only integers and strings: no float noise.
    const numbers = JSON.stringify(after).match(/-?\d+\.\d+/g);
    expect(numbers).toBeNull();
    expect(shape(after)).toEqual(shape(keyed));

    const wrong = cli(['inspect', dir, '--key-file', keyFile(scratch, 'not it', 'wrong')], { env });
    expect(wrong.status).toBe(EXIT.wrongKey);
    expect(wrong.stdout).toBe('');
  });

  it('plain and sealed reports have the same keys; --key-file on a plain volume is refused', () => {
    const scratch = tempDir();
    cliOk(['init', join(scratch, 'p'), ...SHAPE]);
    const pass = keyFile(scratch, 'x');
    cliOk(['init', join(scratch, 's'), ...SHAPE, '--sealed', '--key-file', pass]);
    const top = (r: InspectReport): string[] => Object.keys(r).sort();
    expect(top(inspectJson([join(scratch, 'p')]))).toEqual(top(inspectJson([join(scratch, 's')])));
    const r = cli(['inspect', join(scratch, 'p'), '--key-file', pass]);
    expect(r.status).toBe(EXIT.usage);
    // A stray file is named; the key part (which opens the volume for use) is left out, saying why.
    writeFileSync(join(scratch, 's', 'stray'), 'x');
    const stray = inspectJson([join(scratch, 's'), '--key-file', pass]);
    expect(stray.unexpectedEntries).toEqual(['stray']);
    expect(stray.seal?.unlocked).toBeNull();
    expect(stray.seal?.unlockedSkipped).toBe("the directory holds 'stray', which the manifest does not list (move it out)");
    expect(cli(['inspect', join(scratch, 'nothing')]).status).toBe(EXIT.notFound);
  });
});
