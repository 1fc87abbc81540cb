// The unit pair passes systemd-analyze verify, with ExecStart pointing at the built binary
// (verify checks that the command exists and is executable).

import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BIN } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';

const HAS_SYSTEMD = spawnSync('systemd-analyze', ['--version']).status === 0;
const UNITS = new URL('../../systemd/', import.meta.url);

function instance(template: string, dir: string): string {
  const text = readFileSync(new URL(template, UNITS), 'utf8').replaceAll('/usr/local/bin/vbd-shadow', BIN);
  const path = join(dir, template.replace('@.service', '@home-alice-myvbd.service'));
  writeFileSync(path, text);
  return path;
}

describe.skipIf(!HAS_SYSTEMD)('systemd units', () => {
  it('the system unit verifies', () => {
    const dir = tempDir();
    const r = spawnSync('systemd-analyze', ['verify', instance('vbd-shadow@.service', dir)], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(readFileSync(new URL('vbd-shadow@.service', UNITS), 'utf8')).toMatch(/--canary wait/);
  });

  it('the user unit verifies', () => {
    const dir = tempDir();
    const runtime = join(dir, 'xdg');
    mkdirSync(runtime, { mode: 0o700 });
    const r = spawnSync('systemd-analyze', ['--user', 'verify', instance('vbd-shadow-agent@.service', dir)], { encoding: 'utf8', env: { ...process.env, XDG_RUNTIME_DIR: runtime } });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
  });

  it('verify would catch a unit whose binary is missing', () => {
    const dir = tempDir();
    const path = join(dir, 'broken@home-alice-myvbd.service');
    writeFileSync(path, readFileSync(new URL('vbd-shadow@.service', UNITS), 'utf8').replaceAll('/usr/local/bin/vbd-shadow', '/nonexistent/vbd-shadow'));
    const r = spawnSync('systemd-analyze', ['verify', path], { encoding: 'utf8' });
    expect(r.status).not.toBe(0);
  });
});
