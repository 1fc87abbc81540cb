// What the short commands load (issue 13: the CLI loads only what a command needs): `status`
// and `flush` of a live volume, run for real, with every module Node loads recorded (ESM loader
// hook and CommonJS require cache: test/fixtures/record-loads.mjs). They load neither koffi,
// chokidar nor xxhash — not through bin/vbd-shadow (the bundle dist/cli/main.cjs when it is
// fresh, else tsc's output), and not through tsc's output, where file names also show that the
// daemon, the flush engine, the volume opener and the offline image code stay unloaded. How fast
// that makes them: docs/BENCHMARKS.md.

import { spawnSync } from 'node:child_process';
import { chmodSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { BIN } from '../helpers/cli.js';
import { startDaemon, waitLive } from '../helpers/daemon.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, type User } from '../helpers/system.js';

const HOOK = fileURLToPath(new URL('../fixtures/record-loads.mjs', import.meta.url));
const COMPILED_MAIN = new URL('../../dist/src/cli/main.js', import.meta.url).href;

/** Packages the short commands must not load. */
const HEAVY_PACKAGES = /\/node_modules\/(koffi|chokidar|@node-rs\/xxhash)\//;
/** tsc's output files that only start, recover, the agent and the offline commands need. */
const HEAVY_FILES = [
  'flush/engine.js', 'flush/tracking.js', 'flush/external.js', 'flush/journal.js', 'daemon/daemon.js', 'daemon/session.js',
  'daemon/lock.js', 'shadow/image.js', 'sys/libc.js', 'sys/ffi.js', 'sys/open.js', 'volume/volume.js', 'image/offline.js', 'store/chunk-store.js', 'agent/agent.js',
];

interface Run {
  status: number | null;
  stdout: string;
  stderr: string;
  loaded: string[];
}

/** Runs `argv` under the hook (as `user` if given) and returns what it printed and loaded. */
function recorded(scratch: string, label: string, argv: string[], user?: User): Run {
  const file = join(scratch, `loads-${label}`);
  writeFileSync(file, '');
  chmodSync(file, 0o666);
  const node = [process.execPath, '--import', HOOK, ...argv];
  const r = user === undefined
    ? spawnSync(node[0] ?? '', node.slice(1), { encoding: 'utf8', env: { ...process.env, VBD_TEST_LOADS_FILE: file }, timeout: 60_000 })
    : spawnSync('setpriv', [`--reuid=${user.uid}`, `--regid=${user.gid}`, '--clear-groups', 'env', `VBD_TEST_LOADS_FILE=${file}`, ...node], { encoding: 'utf8', timeout: 60_000 });
  return { status: r.status, stdout: String(r.stdout), stderr: String(r.stderr), loaded: readFileSync(file, 'utf8').split('\n').filter((l) => l !== '') };
}

/** The CLI through bin/vbd-shadow, as a user runs it. */
const viaBin = (args: string[]): string[] => [BIN, ...args];
/** The CLI through tsc's output (dist/src/), whose file names say which modules were loaded. */
const viaCompiled = (args: string[]): string[] => [
  '--input-type=module', '-e', `const { main } = await import(${JSON.stringify(COMPILED_MAIN)}); process.exitCode = await main(${JSON.stringify(['node', 'vbd-shadow', ...args])});`,
];

function expectLight(run: Run, what: string, compiled: boolean): void {
  expect(run.status, `${what}: ${run.stderr}`).toBe(0);
  // The hook saw the program itself (else the list proves nothing)…
  expect(run.loaded.some((u) => u.endsWith(compiled ? '/dist/src/daemon/runtime.js' : '/bin/vbd-shadow')), `${what}: ${run.loaded.join(' ')}`).toBe(true);
  // …and none of what the command does not need.
  expect(run.loaded.filter((u) => HEAVY_PACKAGES.test(u)), what).toEqual([]);
  if (compiled) expect(run.loaded.filter((u) => HEAVY_FILES.some((f) => u.endsWith(`/dist/src/${f}`))), what).toEqual([]);
}

describe.skipIf(!IS_ROOT)(`status and flush load only what they need (${IS_ROOT ? 'a live volume, real daemon' : ROOT_SKIP_REASON})`, () => {
  it('status (list, by name, --json) and an idle flush load no koffi, chokidar, xxhash, daemon or flush engine', async () => {
    const { user, scratch, home } = ownedScratch();
    const dir = join(home, 'vol');
    const name = `${TEST_PREFIX}startup-modules`;
    const init = cliAs(user, ['init', dir, '--size', '4M', '--files', '2', '--name', name]);
    expect(init.status, init.stderr).toBe(0);
    const daemon = startDaemon(name, [dir, '--interval', '1h']);
    await waitLive(daemon);
    // The session's first flush scans the image; those after it, with nothing written, are idle.
    expect(cliAs(user, ['flush', name]).status).toBe(0);

    for (const [label, via, compiled] of [['bin', viaBin, false], ['compiled', viaCompiled, true]] as const) {
      const byName = recorded(scratch, `${label}-status-name`, via(['status', name, '--json']));
      expectLight(byName, `${label}: status ${name} --json`, compiled);
      expect((JSON.parse(byName.stdout) as { name: string; state: string }[]).map((s) => [s.name, s.state])).toEqual([[name, 'live']]);

      const list = recorded(scratch, `${label}-status-owner`, via(['status']), user);
      expectLight(list, `${label}: status (as the owner)`, compiled);
      expect(list.stdout).toContain(`${name}: live`);

      const flush = recorded(scratch, `${label}-flush`, via(['flush', name]));
      expectLight(flush, `${label}: flush ${name}`, compiled);
      expect(flush.stdout).toBe(`volume '${name}': nothing written since the last flush\n`);
    }
    expect(cliAs(user, ['stop', name]).status).toBe(0);
    expect(await daemon.exited).toBe(0);
  }, 180_000);
});
