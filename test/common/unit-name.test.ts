// A volume's unit name is its directory as `systemd-escape --path` writes it: compared with the
// real tool on awkward paths, and back.

import { execFileSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { directoryOfUnit, escapePath, unescapePath, unitOfDirectory } from '../../src/common/unit-name.js';

const PATHS = ['/home/alice/my vbd', '/a-b/c.d', '/.hidden/x', '//x//y/', '/ünï/cødé', '/a\\b', '/x:y_z', '/home/bob/vol.1/data-2', '/tmp/a b\tc', '/'];

describe('unit names of volume directories', () => {
  it('escapes every path exactly as systemd-escape --path does', () => {
    for (const path of PATHS) {
      expect(escapePath(path), path).toBe(execFileSync('systemd-escape', ['--path', path], { encoding: 'utf8' }).trim());
    }
  });

  it('a unit name gives back the directory (normalised as systemd does), also as systemd-escape --unescape does', () => {
    for (const path of PATHS) {
      const instance = escapePath(path);
      const back = execFileSync('systemd-escape', ['--unescape', '--path', instance], { encoding: 'utf8' }).trim();
      expect(unescapePath(instance), path).toBe(back);
      expect(directoryOfUnit(unitOfDirectory(path))).toBe(back);
      expect(directoryOfUnit(`vbd-shadow-agent@${instance}.service`)).toBe(back);
    }
  });

  it('what is not a vbd-shadow unit name is not taken for one', () => {
    for (const text of ['myvol', 'vbd-shadow@.service', 'other@home-x.service', 'vbd-shadow@home\\xZZ.service', 'vbd-shadow@home x.service']) {
      expect(directoryOfUnit(text), text).toBeUndefined();
    }
  });
});
