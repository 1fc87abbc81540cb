// The package as a user installs it: `npm pack` of this tree (dist/ built by prepack) carries
// exactly what runs; `npm install -g ./vbd-shadow-*.tgz --prefix P` gives a working
// `vbd-shadow`, its man page, units pointing into P, and (as root) a full
// start / write / flush / stop / export from there; `npm uninstall -g` takes it all away.

import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { chmodSync, cpSync, existsSync, mkdirSync, mkdtempSync, openSync, closeSync, readFileSync, readdirSync, realpathSync, rmSync, symlinkSync, writeSync, fsyncSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sha256 } from '../helpers/cli.js';
import { IS_ROOT, TEST_PREFIX, leftovers, sweep } from '../helpers/system.js';

const SOURCE = realpathSync(new URL('../../', import.meta.url));
let work = '';
let prefix = '';
let tarball = '';
let installError: string | undefined;

function run(cmd: string, args: string[], cwd?: string, env?: NodeJS.ProcessEnv): SpawnSyncReturns<string> {
  return spawnSync(cmd, args, { cwd, env: env ?? process.env, encoding: 'utf8', timeout: 300_000, maxBuffer: 64 * 2 ** 20 });
}

/** The installed command. */
const vbd = (args: string[], env?: NodeJS.ProcessEnv): SpawnSyncReturns<string> => run(join(prefix, 'bin', 'vbd-shadow'), args, undefined, env);

beforeAll(() => {
  work = mkdtempSync(join(tmpdir(), 'vbd-pkg-'));
  chmodSync(work, 0o755); // the agent unit runs as users: the installation must be readable by all
  // This tree as a clone would hold it (tracked and new files, nothing ignored: no dist/; node_modules
  // is linked, not installed again — in a worktree it is itself a link, which .gitignore's node_modules/ misses).
  const clone = join(work, 'clone');
  const files = run('git', ['ls-files', '-co', '--exclude-standard', '-z'], SOURCE).stdout.split('\0').filter((f) => f !== '' && f !== 'node_modules' && existsSync(join(SOURCE, f)));
  for (const f of files) cpSync(join(SOURCE, f), join(clone, f));
  symlinkSync(realpathSync(join(SOURCE, 'node_modules')), join(clone, 'node_modules'));
  mkdirSync(join(work, 'out'));
  const packed = run('npm', ['pack', '--pack-destination', join(work, 'out')], clone);
  if (packed.status !== 0) throw new Error(`npm pack failed:\n${packed.stderr}`);
  tarball = join(work, 'out', readdirSync(join(work, 'out')).find((f) => f.endsWith('.tgz')) ?? '');
  prefix = join(work, 'prefix');
  const installed = run('npm', ['install', '-g', '--prefix', prefix, '--prefer-offline', '--no-audit', '--no-fund', tarball], work);
  if (installed.status !== 0) installError = installed.stderr;
}, 600_000);

afterAll(() => {
  if (work !== '') rmSync(work, { recursive: true, force: true });
});

describe('the packed tarball', () => {
  it('carries exactly what runs: bin, dist/src (.js), the bundle bin/vbd-shadow runs (dist/cli), units, man page, README and the docs it links', () => {
    const list = run('tar', ['tzf', tarball]).stdout.split('\n').filter((l) => l !== '' && !l.endsWith('/')).map((l) => l.replace(/^package\//, ''));
    const outside = list.filter((f) => !/^dist\/src\/.*\.js$/.test(f)).sort();
    expect(outside).toEqual([
      'README.md', 'bin/package.json', 'bin/vbd-shadow', 'dist/cli/main.cjs', 'dist/cli/main.cjs.v8cache', 'dist/cli/module-runner.js', 'dist/cli/scan-worker.js', 'docs/FORMAT.md', 'docs/SECURITY.md', 'man/vbd-shadow.8', 'package.json',
      'systemd/vbd-shadow-agent@.service', 'systemd/vbd-shadow-hibernate.service', 'systemd/vbd-shadow-sleep.service', 'systemd/vbd-shadow@.service',
    ]);
    // Every compiled source file, and nothing compiled from tests or benchmarks.
    const sources = run('git', ['ls-files', '-co', '--exclude-standard', 'src'], SOURCE).stdout.split('\n').filter((f) => f.endsWith('.ts') && existsSync(join(SOURCE, f)));
    expect(list.filter((f) => f.startsWith('dist/src/')).sort()).toEqual(sources.map((f) => `dist/${f.replace(/\.ts$/, '.js')}`).sort());
  });

  it('installs with npm install -g --prefix, and the installed vbd-shadow runs, with its man page', (ctx) => {
    if (installError !== undefined && /ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ETIMEDOUT|ENETUNREACH/.test(installError)) ctx.skip();
    expect(installError).toBeUndefined();
    const help = vbd(['--help']);
    expect(help.status).toBe(0);
    expect(help.stdout).toMatch(/^Usage: vbd-shadow \[options\] \[command\]/);
    expect(vbd(['--version']).stdout).toBe(`${(JSON.parse(readFileSync(join(SOURCE, 'package.json'), 'utf8')) as { version: string }).version}\n`);
    const env = { ...process.env, MANPATH: join(prefix, 'share', 'man') };
    const where = run('man', ['-w', 'vbd-shadow'], undefined, env);
    // npm links the page into PREFIX/share/man/man8; man names the file the link leads to.
    const link = join(prefix, 'share', 'man', 'man8', 'vbd-shadow.8');
    expect(realpathSync(where.stdout.trim())).toBe(realpathSync(link));
    expect(realpathSync(link)).toBe(join(realpathSync(prefix), 'lib', 'node_modules', 'vbd-shadow', 'man', 'vbd-shadow.8'));
    const page = run('man', ['-P', 'cat', '8', 'vbd-shadow'], undefined, { ...env, MANWIDTH: '100' });
    expect(page.status).toBe(0);
    expect(page.stdout).toMatch(/EXIT STATUS/);
  });

  it.skipIf(!IS_ROOT)('install-units from the installation points the units into the prefix', () => {
    expect(installError).toBeUndefined();
    const stage = join(work, 'stage');
    const r = vbd(['install-units', '--root', stage]);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    const unit = readFileSync(join(stage, 'etc/systemd/system/vbd-shadow@.service'), 'utf8');
    const bin = join(realpathSync(prefix), 'lib', 'node_modules', 'vbd-shadow', 'bin', 'vbd-shadow');
    expect(unit).toContain(`\nExecStart=${realpathSync(process.execPath)} ${bin} start %f --canary wait --foreground --options-file -/etc/vbd-shadow/%i.options $VBD_SHADOW_OPTS\n`);
  });

  it.skipIf(!IS_ROOT)('as root: init, start, write, flush, stop and export work from the installation', () => {
    expect(installError).toBeUndefined();
    const dir = join(work, 'vol');
    const name = `${TEST_PREFIX}pkg`;
    try {
      expect(vbd(['init', dir, '--size', '8M', '--files', '3', '--chunk', '4K', '--name', name]).status).toBe(0);
      const started = vbd(['start', dir, '--canary', 'none']);
      expect(started.stderr).toBe('');
      expect(started.status).toBe(0);
      const data = randomBytes(64 * 1024);
      const fd = openSync(`/dev/vbd-shadow/root/${name}`, 'r+');
      try {
        writeSync(fd, data, 0, data.length, 1024 * 1024);
        fsyncSync(fd);
      } finally {
        closeSync(fd);
      }
      const flushed = vbd(['flush', name]);
      expect(flushed.status, flushed.stderr).toBe(0);
      expect(flushed.stdout).toMatch(new RegExp(`^volume '${name}' flushed: 16 chunks, 64K`));
      const stopped = vbd(['stop', name]);
      expect(stopped.status, stopped.stderr).toBe(0);
      expect(leftovers()).toEqual([]);
      const image = vbd(['export', dir, join(work, 'out.img')]);
      expect(image.status, image.stderr).toBe(0);
      expect(sha256(readFileSync(join(work, 'out.img')).subarray(1024 * 1024, 1024 * 1024 + data.length))).toBe(sha256(data));
    } finally {
      vbd(['stop', name]);
      sweep();
    }
  });

  it('npm uninstall -g takes the command and the man page away', () => {
    expect(installError).toBeUndefined();
    const r = run('npm', ['uninstall', '-g', '--prefix', prefix, 'vbd-shadow'], work);
    expect(r.status, r.stderr).toBe(0);
    expect(existsSync(join(prefix, 'bin', 'vbd-shadow'))).toBe(false);
    expect(existsSync(join(prefix, 'share', 'man', 'man8', 'vbd-shadow.8'))).toBe(false);
    expect(existsSync(join(prefix, 'lib', 'node_modules', 'vbd-shadow'))).toBe(false);
  });
});
