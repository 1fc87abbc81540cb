// Without --key-file, export, import and inspect read ~/.config/vbd-shadow/NAME.key
// ($XDG_CONFIG_HOME/vbd-shadow/NAME.key when set), as the agent does (one function,
// readDefaultKeyFile): a keyed layout's secret or a sealed volume's passphrase. A default file
// that is there but unfit is refused, not skipped; a wrong one is not asked again; --key-file wins.

import { randomBytes } from 'node:crypto';
import { chmodSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { EXIT } from '../../src/common/exit-codes.js';
import { cli, cliOk, sha256, treeHash } from '../helpers/cli.js';
import { keyFile, tempDir } from '../helpers/tmp.js';

const SIZE = 512 * 1024;
const SHAPE = ['--size', '512K', '--files', '3', '--chunk', '4K'];

/** An environment whose config directory is `config` (through HOME, or XDG_CONFIG_HOME). */
function envWith(scratch: string, how: 'home' | 'xdg'): { env: NodeJS.ProcessEnv; keyDir: string } {
  const env: NodeJS.ProcessEnv = { ...process.env };
  delete env['XDG_CONFIG_HOME'];
  let keyDir: string;
  if (how === 'home') {
    env['HOME'] = join(scratch, 'home');
    keyDir = join(scratch, 'home', '.config', 'vbd-shadow');
  } else {
    env['HOME'] = join(scratch, 'nowhere');
    env['XDG_CONFIG_HOME'] = join(scratch, 'xdg');
    keyDir = join(scratch, 'xdg', 'vbd-shadow');
  }
  mkdirSync(keyDir, { recursive: true });
  return { env, keyDir };
}

describe('the default key file for export and import', () => {
  for (const [kind, how] of [['keyed', 'home'], ['sealed', 'xdg']] as const) {
    it(`${kind} (${how === 'home' ? '~/.config' : '$XDG_CONFIG_HOME'}): import and export without --key-file and without a terminal`, () => {
      const scratch = tempDir();
      const dir = join(scratch, 'vol');
      const { env, keyDir } = envWith(scratch, how);
      const secret = `default ${kind} secret`;
      const explicit = keyFile(scratch, secret);
      cliOk(['init', dir, ...SHAPE, ...(kind === 'sealed' ? ['--sealed'] : ['--layout', 'keyed']), '--key-file', explicit]);
      const image = randomBytes(SIZE);
      writeFileSync(join(scratch, 'in.img'), image);

      // No default file yet, no terminal: refused, naming --key-file.
      const none = cli(['export', dir, join(scratch, 'none.img')], { env, input: '' });
      expect(none.status).not.toBe(0);
      expect(none.stderr).toContain('give --key-file FILE (no terminal to ask on)');

      keyFile(keyDir, secret, 'vol.key');
      const imported = cli(['import', dir, join(scratch, 'in.img')], { env, input: '' });
      expect(imported.status, imported.stderr).toBe(0);
      const out = join(scratch, 'out.img');
      const exported = cli(['export', dir, out], { env, input: '' });
      expect(exported.status, exported.stderr).toBe(0);
      expect(sha256(readFileSync(out))).toBe(sha256(image));
    });
  }

  it('a wrong default key is refused once (wrong key, no retry); --key-file wins over it; an unfit default file is refused', () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    const { env, keyDir } = envWith(scratch, 'home');
    const right = keyFile(scratch, 'the right one');
    cliOk(['init', dir, ...SHAPE, '--sealed', '--key-file', right]);
    const before = treeHash(dir);
    const wrongDefault = keyFile(keyDir, 'not this one', 'vol.key');
    const wrong = cli(['import', dir, '-'], { env, input: randomBytes(SIZE) });
    expect(wrong.status).toBe(EXIT.wrongKey);
    expect(wrong.stderr).not.toContain('try again');
    expect(treeHash(dir)).toBe(before);

    const out = join(scratch, 'out.img');
    const explicit = cli(['export', dir, out, '--key-file', right], { env });
    expect(explicit.status, explicit.stderr).toBe(0);
    expect(readFileSync(out).equals(Buffer.alloc(SIZE))).toBe(true);

    chmodSync(wrongDefault, 0o644);
    const unfit = cli(['export', dir, join(scratch, 'x.img')], { env, input: '' });
    expect(unfit.status).toBe(EXIT.refused);
    expect(unfit.stderr).toBe(`vbd-shadow: key file ${wrongDefault} is accessible by group or others (mode 644); chmod 600 it\n`);
  });
});
