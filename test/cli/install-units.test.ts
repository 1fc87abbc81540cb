// `vbd-shadow install-units`: the systemd units written with this installation's node and
// script (wherever npm put them), the directories a fresh system lacks created, only its own
// files removed, and a root unit never pointed at files another user can change.

import { spawnSync } from 'node:child_process';
import { chownSync, cpSync, existsSync, mkdirSync, readFileSync, realpathSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { EXIT } from '../../src/common/exit-codes.js';
import { BIN, cli, cliOk } from '../helpers/cli.js';
import { IS_ROOT, ROOT_SKIP_REASON, ensureUser, TEST_USER } from '../helpers/system.js';
import { tempDir } from '../helpers/tmp.js';
import { ownedScratch } from '../helpers/owner.js';

const HAS_SYSTEMD = spawnSync('systemd-analyze', ['--version']).status === 0;
const PACKAGE = realpathSync(new URL('../../', import.meta.url));

function execStart(unit: string): string[] {
  const line = unit.split('\n').find((l) => l.startsWith('ExecStart=')) ?? '';
  return line.slice('ExecStart='.length).split(' ');
}

describe.skipIf(!IS_ROOT)(`install-units (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  it('--root DIR: both units run this node and this script, /etc/vbd-shadow is made, and the units verify', () => {
    const stage = tempDir();
    const r = cliOk(['install-units', '--root', stage]);
    const system = join(stage, 'etc/systemd/system/vbd-shadow@.service');
    const agent = join(stage, 'etc/systemd/user/vbd-shadow-agent@.service');
    expect(r.stdout).toContain(`wrote ${system}\n`);
    for (const path of [system, agent]) {
      expect(statSync(path).mode & 0o777).toBe(0o644);
      const words = execStart(readFileSync(path, 'utf8'));
      expect(words.slice(0, 2)).toEqual([realpathSync(process.execPath), realpathSync(BIN)]);
      expect(readFileSync(path, 'utf8')).toContain(`Documentation=file://${PACKAGE}/README.md`);
    }
    expect(execStart(readFileSync(system, 'utf8')).slice(2)).toEqual(['start', '%f', '--canary', 'wait', '--foreground', '--options-file', '-/etc/vbd-shadow/%i.options', '$VBD_SHADOW_OPTS']);
    expect(execStart(readFileSync(agent, 'utf8')).slice(2)).toEqual(['agent', '%f']);
    expect(statSync(join(stage, 'etc/vbd-shadow')).isDirectory()).toBe(true);
    // The sleep and hibernation units, with the same command and their hook.
    const sleepUnits = ['vbd-shadow-sleep.service', 'vbd-shadow-hibernate.service'].map((u) => join(stage, 'etc/systemd/system', u));
    for (const [i, path] of sleepUnits.entries()) {
      expect(r.stdout).toContain(`wrote ${path}\n`);
      const text = readFileSync(path, 'utf8');
      expect(text).toContain('# Written by vbd-shadow install-units');
      expect(execStart(text)).toEqual([realpathSync(process.execPath), realpathSync(BIN), 'sleep-hook', i === 0 ? 'suspend' : 'hibernate']);
    }
    if (HAS_SYSTEMD) {
      const instance = join(stage, 'vbd-shadow@home-alice-myvbd.service');
      writeFileSync(instance, readFileSync(system));
      for (const unit of [instance, ...sleepUnits]) {
        const v = spawnSync('systemd-analyze', ['verify', unit], { encoding: 'utf8' });
        expect(v.stderr).toBe('');
        expect(v.status).toBe(0);
      }
    }
  });

  it('--remove takes away only what install-units wrote, and /etc/vbd-shadow only when empty', () => {
    const stage = tempDir();
    cliOk(['install-units', '--root', stage]);
    writeFileSync(join(stage, 'etc/vbd-shadow/home-alice-myvbd.conf'), 'VBD_SHADOW_OPTS=\n');
    const r = cliOk(['install-units', '--root', stage, '--remove']);
    expect(existsSync(join(stage, 'etc/systemd/system/vbd-shadow@.service'))).toBe(false);
    expect(existsSync(join(stage, 'etc/systemd/user/vbd-shadow-agent@.service'))).toBe(false);
    expect(r.stdout).toContain('kept');
    expect(existsSync(join(stage, 'etc/vbd-shadow/home-alice-myvbd.conf'))).toBe(true);

    // A unit the admin wrote by hand is not ours to remove.
    writeFileSync(join(stage, 'etc/systemd/system/vbd-shadow@.service'), '[Service]\nExecStart=/bin/true\n');
    const foreign = cli(['install-units', '--root', stage, '--remove']);
    expect(foreign.stderr).toMatch(/was not written by install-units; left alone/);
    expect(foreign.status).toBe(EXIT.refused);
    expect(existsSync(join(stage, 'etc/systemd/system/vbd-shadow@.service'))).toBe(true);
  });

  it('--user, as a user with no ~/.config yet: the agent unit lands in ~/.config/systemd/user, hers', () => {
    const { user, home } = ownedScratch();
    const env = { ...process.env, HOME: home, XDG_CONFIG_HOME: '' };
    delete env['XDG_CONFIG_HOME'];
    const asUser = (args: string[]): ReturnType<typeof spawnSync> =>
      spawnSync('setpriv', [`--reuid=${user.uid}`, `--regid=${user.gid}`, '--clear-groups', process.execPath, BIN, ...args], { encoding: 'utf8', env });
    const r = asUser(['install-units', '--user']);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(EXIT.ok);
    const unit = join(home, '.config/systemd/user/vbd-shadow-agent@.service');
    expect(statSync(unit).uid).toBe(user.uid);
    expect(execStart(readFileSync(unit, 'utf8')).slice(2)).toEqual(['agent', '%f']);

    // Without --user, a user cannot write the system unit: refused, nothing written.
    const system = asUser(['install-units']);
    expect(String(system.stderr)).toMatch(/needs root \(sudo vbd-shadow install-units\)/);
    expect(system.status).toBe(EXIT.refused);
    expect(asUser(['install-units', '--user', '--root', home]).status).toBe(EXIT.usage);
  });

  it('refuses to point a root unit at a package a user owns (sudo npm install -g . of her clone)', () => {
    const user = ensureUser(TEST_USER);
    const stage = tempDir();
    const clone = join(tempDir(), 'clone');
    mkdirSync(clone);
    for (const part of ['bin', 'dist/src', 'systemd', 'package.json']) cpSync(join(PACKAGE, part), join(clone, part), { recursive: true });
    symlinkSync(realpathSync(join(PACKAGE, 'node_modules')), join(clone, 'node_modules'));
    chownSync(clone, user.uid, user.gid);
    const r = spawnSync(process.execPath, [join(clone, 'bin/vbd-shadow'), 'install-units', '--root', stage], { encoding: 'utf8' });
    expect(r.stderr).toBe(`vbd-shadow: install-units: ${clone} is owned by uid ${user.uid}, and the system unit would run it as root; install from the packed tarball as root (npm pack; sudo npm install -g ./vbd-shadow-*.tgz)\n`);
    expect(r.status).toBe(EXIT.refused);
    expect(existsSync(join(stage, 'etc'))).toBe(false);
  });
});
