// Mount paths with spaces under the system unit: its ExecStart= line, expanded as systemd does —
// split into words first (the line has no quotes or escapes, so at whitespace), then %f (the
// unescaped path, `systemd-escape --unescape --path`) and %i (the instance as it is) replaced
// inside each word, and `$VBD_SHADOW_OPTS` unset (zero words) — run for real, with the options
// in /etc/vbd-shadow/<instance>.options, one argument per line. The volume directory and the
// mount point both have spaces in their names. And the options file's rules, through the same
// expansion the CLI does.

import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readFileSync, rmSync, rmdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { expandOptionsFiles } from '../../src/cli/options-file.js';
import { startAgent } from '../helpers/agent.js';
import { BIN, cli } from '../helpers/cli.js';
import { Stage, eachTestCleanup } from '../helpers/cleanup.js';
import { startDaemonArgv, stopDaemon, waitLive, waitState } from '../helpers/daemon.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, isMounted, leftovers, runAs } from '../helpers/system.js';
import { tempDir } from '../helpers/tmp.js';

const UNIT = new URL('../../systemd/vbd-shadow@.service', import.meta.url);
const CONF_DIR = '/etc/vbd-shadow';
const HAS_SYSTEMD = spawnSync('systemd-escape', ['--version']).status === 0;

/** Files this test put into /etc/vbd-shadow (and the directory, if it made it). */
const placed: string[] = [];
eachTestCleanup(Stage.Files, () => {
  for (const path of placed.splice(0).reverse()) {
    if (path === CONF_DIR) {
      try {
        rmdirSync(path);
      } catch {
        /* not empty: someone else's files */
      }
    } else rmSync(path, { force: true });
  }
});

function escapePath(path: string): string {
  const r = spawnSync('systemd-escape', ['--path', path], { encoding: 'utf8' });
  expect(r.status, r.stderr).toBe(0);
  return r.stdout.trim();
}

/** The unit's ExecStart= for `instance`, as the argv systemd would exec (program replaced by BIN). */
function execStartArgv(instance: string): string[] {
  const line = readFileSync(UNIT, 'utf8').split('\n').find((l) => l.startsWith('ExecStart=')) ?? '';
  const words = line.slice('ExecStart='.length).split(/\s+/).filter((w) => w !== '');
  // What lets this stand in for systemd's parser: no quoting, no escapes, no ';', no ${…}.
  expect(line).not.toMatch(/["'\\;]|\$\{/);
  const unescaped = spawnSync('systemd-escape', ['--unescape', '--path', instance], { encoding: 'utf8' }).stdout.trim();
  const resolved = words.map((w) => w.replaceAll('%f', unescaped).replaceAll('%i', instance))
    .filter((w) => !/^\$[A-Za-z_][A-Za-z0-9_]*$/.test(w)); // $VBD_SHADOW_OPTS unset: no words
  expect(resolved[0]).toBe('/usr/local/bin/vbd-shadow');
  return resolved.slice(1);
}

describe.skipIf(!IS_ROOT || !HAS_SYSTEMD)(`the unit's ExecStart with paths that have spaces (${IS_ROOT ? 'as root, owner is a real user' : ROOT_SKIP_REASON})`, () => {
  it('attaches and mounts on a mount point with spaces named in /etc/vbd-shadow/<instance>.options', async () => {
    const { user, scratch, home } = ownedScratch();
    const dir = join(home, 'my vol');
    const mnt = join(scratch, 'mount point', 'my vbd');
    mkdirSync(join(scratch, 'mount point'), { mode: 0o755 });
    const name = `${TEST_PREFIX}spaces`;
    expect(cliAs(user, ['init', dir, '--size', '32M', '--files', '4', '--chunk', '64K', '--name', name]).status).toBe(0);

    const instance = escapePath(dir);
    expect(instance).toContain('\\x20'); // the instance is the escaped path
    if (!existsSync(CONF_DIR)) {
      mkdirSync(CONF_DIR, { mode: 0o755 });
      placed.push(CONF_DIR);
    }
    const options = join(CONF_DIR, `${instance}.options`);
    placed.push(options);
    writeFileSync(options, `# the mount point has spaces\n--mount\n${mnt}\n--mkfs\next4\n--interval=1m\n`, { mode: 0o644 });
    chmodSync(options, 0o644);

    const argv = execStartArgv(instance);
    expect(argv.slice(0, 2)).toEqual(['start', dir]);
    const daemon = startDaemonArgv(name, argv);
    await waitState(daemon, 'waiting');
    const agent = startAgent(user, [dir]);
    const live = await waitLive(daemon);
    expect(live.mountpoint).toBe(mnt);
    expect(live.intervalMs).toBe(60_000);
    expect(isMounted(mnt)).toBe(true);
    const write = runAs(user, 'sh', ['-c', `echo spaced > "${mnt}/note" && sync`]);
    expect(write.status, write.stderr).toBe(0);

    agent.child.kill('SIGTERM');
    expect(await agent.exited).toBe(0);
    await waitState(daemon, 'waiting');
    expect(isMounted(mnt)).toBe(false);
    expect(await stopDaemon(daemon)).toBe(0);
    expect(leftovers()).toEqual([]);
  });
});

describe('start --options-file', () => {
  const argv = (...args: string[]): string[] => ['node', BIN, ...args];

  it('puts each line in place of the option as one word, spaces and all; skips blanks and comments', () => {
    const dir = tempDir();
    const file = join(dir, 'opts');
    writeFileSync(file, '# comment\n--mount\n/home/alice/my vbd \n\n  # indented comment\n--mkfs=ext4\r\n', { mode: 0o644 });
    expect(expandOptionsFiles(argv('start', '/v', '--options-file', file, '--interval', '5s')))
      .toEqual(argv('start', '/v', '--mount', '/home/alice/my vbd ', '--mkfs=ext4', '--interval', '5s'));
    expect(expandOptionsFiles(argv('start', `--options-file=${file}`, '/v')))
      .toEqual(argv('start', '--mount', '/home/alice/my vbd ', '--mkfs=ext4', '/v'));
    // Other commands are left alone (commander refuses the option there).
    expect(expandOptionsFiles(argv('status', '--options-file', file))).toEqual(argv('status', '--options-file', file));
  });

  it('-FILE is no options when FILE does not exist; FILE must exist', () => {
    const dir = tempDir();
    expect(expandOptionsFiles(argv('start', '/v', '--options-file', `-${dir}/none`))).toEqual(argv('start', '/v'));
    expect(() => expandOptionsFiles(argv('start', '/v', '--options-file', `${dir}/none`))).toThrow(/cannot open the options file/);
  });

  it.skipIf(!IS_ROOT)('refuses a file others can write, a symlink, a relative path and nesting, as the CLI exit statuses say', () => {
    const dir = tempDir();
    const file = join(dir, 'opts');
    writeFileSync(file, '--interval\n5s\n');
    chmodSync(file, 0o666);
    const writable = cli(['start', '/nonexistent', '--options-file', file]);
    expect(writable.status).toBe(4);
    chmodSync(file, 0o644);
    spawnSync('ln', ['-s', file, join(dir, 'link')]);
    expect(cli(['start', '/nonexistent', '--options-file', join(dir, 'link')]).status).toBe(4); // ELOOP: refused
    expect(cli(['start', '/nonexistent', '--options-file', 'opts'], { cwd: dir }).status).toBe(2);
    writeFileSync(file, `--options-file\n${file}\n`);
    expect(cli(['start', '/nonexistent', '--options-file', file]).status).toBe(2);
    // A line that is not an option of start is the usual usage error.
    writeFileSync(file, '--no-such-option\n');
    expect(cli(['start', '/nonexistent', '--options-file', file]).status).toBe(2);
  });
});
