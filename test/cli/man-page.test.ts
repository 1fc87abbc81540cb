// The manual page vbd-shadow(8) is well-formed roff and keeps up with the CLI: every command,
// every visible option and every exit status of the program is in it (and the statuses in the
// README's table), under the package's version.

import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { EXIT } from '../../src/common/exit-codes.js';
import { buildProgram } from '../../src/cli/main.js';

const MAN = new URL('../../man/vbd-shadow.8', import.meta.url);
const HAS_GROFF = spawnSync('groff', ['--version']).status === 0;
const source = (): string => readFileSync(MAN, 'utf8');

/** The page as a reader sees it (ASCII, no formatting). */
function rendered(): string {
  const r = spawnSync('groff', ['-man', '-Tascii', '-P', '-cbou', MAN.pathname], { encoding: 'utf8' });
  expect(r.status).toBe(0);
  return r.stdout;
}

describe('man page vbd-shadow(8)', () => {
  it.skipIf(!HAS_GROFF)('renders without a single groff warning', () => {
    const r = spawnSync('groff', ['-man', '-ww', '-z', MAN.pathname], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
  });

  it.skipIf(!HAS_GROFF)('names every command and every visible option of the program', () => {
    const text = rendered();
    const program = buildProgram();
    const missing: string[] = [];
    for (const cmd of program.commands) {
      if (!new RegExp(`^ {7}${cmd.name()}\\b`, 'm').test(text)) missing.push(cmd.name());
      for (const o of cmd.options) if (!o.hidden && !text.includes(o.long ?? '')) missing.push(`${cmd.name()} ${o.long}`);
    }
    expect(missing).toEqual([]);
    for (const section of ['NAME', 'SYNOPSIS', 'DESCRIPTION', 'COMMANDS', 'EXIT STATUS', 'FILES', 'SECURITY', 'SEE ALSO']) {
      expect(text).toMatch(new RegExp(`^${section}$`, 'm'));
    }
  });

  it('lists every exit status, as the README table does', () => {
    const statuses = Object.values(EXIT).map(String);
    const man = source().split('.SH "EXIT STATUS"')[1]?.split('.SH ')[0] ?? '';
    expect([...man.matchAll(/^\.B (\d+)$/gm)].map((m) => m[1])).toEqual(statuses);
    const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');
    const table = readme.split('## Exit status')[1]?.split('\n## ')[0] ?? '';
    expect([...table.matchAll(/^\| (\d+) \|/gm)].map((m) => m[1])).toEqual(statuses);
  });

  it('carries the package version', () => {
    const { version } = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };
    expect(source()).toMatch(new RegExp(`^\\.TH VBD-SHADOW 8 \\S+ "vbd-shadow ${version.replaceAll('.', '\\.')}"`, 'm'));
  });
});
