// journald priorities: when stdout is the stream $JOURNAL_STREAM names (its DEV:INO, as systemd
// sets it), each log line starts with its sd-daemon prefix — notice for the session's milestones,
// info for routine flushes, warning for an external change, err for a refused start on stderr —
// and without it (a terminal, a pipe, a file that is not that stream) lines carry none.

import { spawn } from 'node:child_process';
import { closeSync, fstatSync, openSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readStatus } from '../../src/daemon/runtime.js';
import { EXIT } from '../../src/common/exit-codes.js';
import { createLog } from '../../src/daemon/log.js';
import { cliArgv, cliOk } from '../helpers/cli.js';
import { trackedChildren } from '../helpers/children.js';
import { startDaemon, stopDaemon, waitLive } from '../helpers/daemon.js';
import { IS_ROOT, ROOT_SKIP_REASON, TEST_PREFIX } from '../helpers/system.js';
import { keyFile, tempDir } from '../helpers/tmp.js';

const children = trackedChildren();

/** A file opened as a unit's journal stream would be: fd and the JOURNAL_STREAM value naming it. */
function journalFile(dir: string): { path: string; fd: number; stream: string } {
  const path = join(dir, 'journal-stream.log');
  const fd = openSync(path, 'w+');
  const st = fstatSync(fd, { bigint: true });
  return { path, fd, stream: `${st.dev}:${st.ino}` };
}

async function until(what: string, ok: () => boolean, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The line of the log that contains `text`. */
function lineWith(log: string, text: string): string {
  const line = log.split('\n').find((l) => l.includes(text));
  if (line === undefined) throw new Error(`no line with '${text}' in:\n${log}`);
  return line;
}

describe('the log under journald', () => {
  it('prefixes only when the fd is the stream JOURNAL_STREAM names', () => {
    const j = journalFile(tempDir());
    const saved = process.env['JOURNAL_STREAM'];
    try {
      process.env['JOURNAL_STREAM'] = j.stream;
      const log = createLog('vbdt-prio', { fd: j.fd });
      log('plain');
      log('flush failed', 'err');
      process.env['JOURNAL_STREAM'] = '1:2';
      createLog('vbdt-prio', { fd: j.fd })('elsewhere', 'warning');
    } finally {
      if (saved === undefined) delete process.env['JOURNAL_STREAM'];
      else process.env['JOURNAL_STREAM'] = saved;
      closeSync(j.fd);
    }
    const lines = readFileSync(j.path, 'utf8').split('\n');
    expect(lines[0]).toBe('<6>[vbdt-prio] plain');
    expect(lines[1]).toBe('<3>[vbdt-prio] flush failed');
    // Not the journal's stream (an inherited variable, output redirected): timestamped, no prefix.
    expect(lines[2]).toMatch(/^\d{4}-\d\d-\d\dT[\d:.]+Z \[vbdt-prio\] elsewhere$/);
  });
});

describe.skipIf(!IS_ROOT)(`priorities of the daemon's lines (${IS_ROOT ? 'as root' : ROOT_SKIP_REASON})`, () => {
  it('milestones are notice, flushes info, an external change warning; a refused start is err on stderr', async () => {
    const scratch = tempDir();
    const dir = join(scratch, 'vol');
    const name = `${TEST_PREFIX}priorities`;
    cliOk(['init', dir, '--size', '4M', '--files', '4', '--chunk', '4K', '--name', name]);
    const j = journalFile(scratch);
    const [cmd, argv] = cliArgv(['start', dir, '--foreground', '--canary', 'none', '--interval', '1h']);
    // As systemd starts a unit: stdout and stderr both the journal's stream.
    const child = spawn(cmd, argv, { stdio: ['ignore', j.fd, j.fd], env: { ...process.env, JOURNAL_STREAM: j.stream } });
    children.push(child);
    const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
    const log = (): string => readFileSync(j.path, 'utf8');
    await until('live', () => readStatus(name)?.state === 'live' && readStatus(name)?.pid === child.pid);
    const live = readStatus(name);
    const fd = openSync(live?.device ?? '', 'r+');
    writeSync(fd, Buffer.alloc(8192, 1), 0, 8192, 0);
    closeSync(fd);
    cliOk(['flush', name]);
    const file = openSync(join(dir, 'file002'), 'r+');
    writeSync(file, Buffer.from('SOMEONE ELSE'), 0, 12, 100);
    closeSync(file);
    await until('the external change', () => log().includes('EXTERNAL CHANGE'));
    child.kill('SIGTERM');
    expect(await exited).toBe(0);
    closeSync(j.fd);

    const text = log();
    expect(lineWith(text, 'starting: volume')).toMatch(/^<5>\[vbdt-priorities\] starting: /);
    expect(lineWith(text, 'live; flushing every')).toMatch(/^<5>\[vbdt-priorities\] live; /);
    expect(lineWith(text, 'flush (flush command)')).toMatch(/^<6>\[vbdt-priorities\] flush \(flush command\): 2 chunks/);
    expect(lineWith(text, 'EXTERNAL CHANGE')).toMatch(/^<4>\[vbdt-priorities\] EXTERNAL CHANGE: backing file 'file002' was modified/);
    expect(lineWith(text, 'tearing down')).toMatch(/^<5>\[vbdt-priorities\] tearing down: received SIGTERM/);
    expect(lineWith(text, 'stopped: everything written back')).toMatch(/^<5>/);
    // Every line has a priority, none a timestamp (the journal adds the time).
    for (const line of text.split('\n').filter((l) => l !== '')) expect(line).toMatch(/^<[3-6]>\[vbdt-priorities\] /);

    // A start refused by a check (a wrong key) ends with one err line on stderr.
    const keyed = join(scratch, 'keyed');
    const keys = tempDir();
    cliOk(['init', keyed, '--size', '1M', '--files', '2', '--layout', 'keyed', '--name', `${TEST_PREFIX}prio-keyed`, '--key-file', keyFile(keys, 'right key')]);
    const k = journalFile(keys);
    const [kcmd, kargv] = cliArgv(['start', keyed, '--foreground', '--canary', 'none', '--key-file', keyFile(keys, 'wrong key', 'wrong')]);
    const refused = spawn(kcmd, kargv, { stdio: ['ignore', k.fd, k.fd], env: { ...process.env, JOURNAL_STREAM: k.stream } });
    children.push(refused);
    expect(await new Promise((r) => refused.on('exit', r))).toBe(EXIT.wrongKey);
    closeSync(k.fd);
    expect(readFileSync(k.path, 'utf8')).toMatch(/^<3>vbd-shadow: .*(wrong|does not open)/m);
  });

  it('on a pipe (no JOURNAL_STREAM) the lines are as before: timestamp, no prefix', async () => {
    const dir = join(tempDir(), 'vol');
    const name = `${TEST_PREFIX}no-prio`;
    cliOk(['init', dir, '--size', '1M', '--files', '1', '--name', name]);
    const daemon = startDaemon(name, [dir, '--canary', 'none']);
    await waitLive(daemon);
    expect(await stopDaemon(daemon)).toBe(0);
    expect(lineWith(daemon.output(), 'starting: volume')).toMatch(/^\d{4}-\d\d-\d\dT[\d:.]+Z \[vbdt-no-prio\] starting: /);
    expect(daemon.output()).not.toMatch(/^<\d>/m);
  });
});
