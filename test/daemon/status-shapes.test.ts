// `status` (issue 11): by default the volumes whose daemon runs; `--all` adds those whose
// daemon has gone; an entry that ended and left nothing is removed by root's `status` once a
// minute old, one that left its RAM image behind is kept; `--json` is always an array of
// objects of one shape, durations to the microsecond. All with real daemons.

import { existsSync, utimesSync } from 'node:fs';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { cli } from '../helpers/cli.js';
import { startDaemon, waitLive } from '../helpers/daemon.js';
import { ownedScratch } from '../helpers/owner.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX, cliAs, runtimeDirOf } from '../helpers/system.js';

/** Every key of an entry, always present (src/cli/status-view.ts, StatusJson). */
const KEYS = [
  'boundLoops', 'canary', 'chunkSize', 'damagedChunks', 'device', 'deviceSize', 'error', 'events', 'externalChanges', 'flushChecks', 'flushFailures',
  'identity', 'imageKept', 'intervalMs', 'lastCheck', 'lastExternalChange', 'lastFlush', 'lastGoodFlush', 'layout', 'link', 'mountpoint', 'name',
  'nbd', 'nbdError', 'notices', 'owner', 'pid', 'populateMs', 'populateThreads', 'presence', 'quarantinedLoops', 'refused', 'scan', 'sealed', 'sealedVolume', 'sessions',
  'startedAt', 'state', 'tracking', 'unit', 'volumeDir', 'waitingFor',
];

type Entry = Record<string, unknown> & { name: string; state: string; presence: string };

function statusJson(args: string[]): Entry[] {
  const r = cli(['status', ...args, '--json']);
  expect(r.status, r.stderr).toBe(0);
  const parsed: unknown = JSON.parse(r.stdout);
  expect(Array.isArray(parsed), r.stdout).toBe(true);
  return parsed as Entry[];
}

/** Every number in `value`, with its path. */
function numbers(value: unknown, path = ''): [string, number][] {
  if (typeof value === 'number') return [[path, value]];
  if (value === null || typeof value !== 'object') return [];
  return Object.entries(value).flatMap(([k, v]) => numbers(v, `${path}.${k}`));
}

function expectShape(entry: Entry): void {
  expect(Object.keys(entry).sort(), entry.name).toEqual(KEYS);
  // Integers, or at most three decimals (what JSON.stringify prints for a value rounded to the µs).
  for (const [path, n] of numbers(entry)) expect(String(n), `${entry.name}${path}`).toMatch(/^-?\d+(\.\d{1,3})?$/);
}

const mine = (entries: Entry[], names: string[]): Entry[] => entries.filter((e) => names.includes(e.name));

describe.skipIf(!IS_ROOT)(`status: live by default, --all, pruning, one JSON shape (${IS_ROOT ? 'real daemons' : ROOT_SKIP_REASON})`, () => {
  it('a stopped volume leaves the list, shows under --all without device or mount, and is removed once a minute old; a killed one is kept', async () => {
    const { user, home } = ownedScratch();
    const names = [`${TEST_PREFIX}status-a`, `${TEST_PREFIX}status-b`];
    const dirs = names.map((n) => join(home, n));
    for (const [i, dir] of dirs.entries()) expect(cliAs(user, ['init', dir, '--size', '4M', '--files', '2', '--name', names[i] ?? '']).status).toBe(0);
    const mount = join(home, 'mnt');
    const a = startDaemon(names[0] ?? '', [dirs[0] ?? '', '--interval', '1h', '--mkfs', 'ext4', '--mount', mount]);
    const b = startDaemon(names[1] ?? '', [dirs[1] ?? '', '--interval', '1h']);
    await waitLive(a);
    await waitLive(b);
    expect(cli(['flush', names[0] ?? '']).status).toBe(0); // a real lastFlush, with timings

    // Both live: in the default list, each entry of the one shape.
    const live = mine(statusJson([]), names);
    expect(live.map((e) => [e.name, e.state, e.presence])).toEqual([[names[0], 'live', 'running'], [names[1], 'live', 'running']]);
    live.forEach(expectShape);
    expect(live[0]?.mountpoint).toBe(mount);
    expect((live[0]?.lastFlush as { durationMs: number } | null)?.durationMs).toBeGreaterThan(0);
    // One volume by name: still an array, of the same shape.
    const one = statusJson([names[1] ?? '']);
    expect(one.map((e) => e.name)).toEqual([names[1]]);
    one.forEach(expectShape);
    // Its unit is the one systemd would name; that name works where the volume's name does.
    const unit = `vbd-shadow@${execFileSync('systemd-escape', ['--path', dirs[1] ?? ''], { encoding: 'utf8' }).trim()}.service`;
    expect(one[0]?.unit).toBe(unit);
    expect(statusJson([unit]).map((e) => e.name)).toEqual([names[1]]);
    expect(cli(['flush', unit]).status).toBe(0);

    // a stops: gone from the list; --all shows it stopped, with no device or mount line.
    expect(cliAs(user, ['stop', names[0] ?? '']).status).toBe(0);
    expect(mine(statusJson([]), names).map((e) => e.name)).toEqual([names[1]]);
    const ended = mine(statusJson(['--all']), names).find((e) => e.name === names[0]);
    expect(ended && [ended.state, ended.presence, ended.device, ended.mountpoint, ended.imageKept, ended.boundLoops]).toEqual(['stopped', 'ended', null, null, false, []]);
    if (ended !== undefined) expectShape(ended);
    const human = cli(['status', '--all']).stdout;
    expect(human).toContain(`${names[0]}: stopped\n`);
    expect(human).not.toContain(`mounted  ${mount}`);

    // b is killed: its daemon is gone, its RAM image (and loop device) stay — left behind, never pruned.
    const bDir = runtimeDirOf(names[1] ?? '');
    b.child.kill('SIGKILL');
    await b.exited;
    expect(mine(statusJson([]), names)).toEqual([]);
    const kept = mine(statusJson(['--all']), names).find((e) => e.name === names[1]);
    expect(kept && [kept.state, kept.presence, kept.imageKept]).toEqual(['live', 'left-behind', true]);

    // A minute later (the status files aged): root's status removes a's entry, keeps b's.
    const aDir = join('/run/vbd-shadow', String(ended?.identity ?? ''));
    const old = new Date(Date.now() - 120_000);
    utimesSync(join(aDir, 'status.json'), old, old);
    utimesSync(join(bDir, 'status.json'), old, old);
    expect(mine(statusJson(['--all']), names).map((e) => [e.name, e.presence])).toEqual([[names[1], 'left-behind']]);
    expect(existsSync(aDir)).toBe(false);
    expect(existsSync(join(bDir, 'status.json'))).toBe(true);
    expect(cli(['status']).stdout).not.toContain(names[1]);
  }, 240_000);
});
