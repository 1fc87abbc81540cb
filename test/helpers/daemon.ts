// A daemon started for a test: `vbd-shadow start DIR --foreground …` as a child process,
// awaited until live, and always stopped (then swept) after the test.

import { spawn, type ChildProcess } from 'node:child_process';
import type { DaemonEvent, EventKind, EventOf } from '../../src/daemon/events.js';
import { readStatus, type DaemonStatus, type FlushReport } from '../../src/daemon/runtime.js';
import { expect } from 'vitest';
import { cliArgv, cliOk } from './cli.js';
import { Stage, eachTestCleanup } from './cleanup.js';
import { sweep } from './system.js';

export interface TestDaemon {
  child: ChildProcess;
  name: string;
  output: () => string;
  /** Resolves with the exit code. */
  exited: Promise<number | null>;
}

const running: TestDaemon[] = [];

/** The events the daemon of volume `name` recorded in its status (src/daemon/events.ts), oldest first. */
export function eventsOf(name: string): DaemonEvent[] {
  const s = readStatus(name);
  if (s === undefined) throw new Error(`no status for ${name}`);
  if (s.events === undefined) throw new Error(`the status of ${name} has no events`);
  return s.events;
}

/** Waits until the daemon of `name` has recorded an event matching `match` (a status write may lag 100 ms). */
export async function waitEvent<K extends EventKind>(name: string, kind: K, match: (e: EventOf<K>) => boolean = () => true, timeoutMs = 10_000): Promise<EventOf<K>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const found = (readStatus(name)?.events ?? []).find((e): e is EventOf<K> => e.kind === kind && match(e as EventOf<K>));
    if (found !== undefined) return found;
    if (Date.now() > deadline) throw new Error(`no '${kind}' event from ${name} after ${timeoutMs} ms; it recorded: ${JSON.stringify(readStatus(name)?.events?.map((e) => e.kind))}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

eachTestCleanup(Stage.Processes, async () => {
  for (const d of running.splice(0)) {
    if (d.child.exitCode === null && d.child.signalCode === null) {
      d.child.kill('SIGTERM');
      const timer = setTimeout(() => d.child.kill('SIGKILL'), 30_000);
      await d.exited;
      clearTimeout(timer);
    }
  }
});
eachTestCleanup(Stage.Kernel, sweep);

export function startDaemon(name: string, args: string[], input?: string, env: Record<string, string> = {}): TestDaemon {
  return startDaemonArgv(name, ['start', ...args, '--foreground'], input, env);
}

/** The CLI with exactly `args` (e.g. a unit's ExecStart= words after the program), as a test daemon. */
export function startDaemonArgv(name: string, args: string[], input?: string, env: Record<string, string> = {}): TestDaemon {
  const [cmd, argv] = cliArgv(args);
  const child = spawn(cmd, argv, { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  let text = '';
  child.stdout?.on('data', (d: Buffer) => (text += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (text += d.toString()));
  child.stdin?.end(input ?? '');
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const daemon = { child, name, output: () => text, exited };
  running.push(daemon);
  return daemon;
}

/** Waits until the daemon says live; throws with its output if it exits first. */
export async function waitLive(d: TestDaemon, timeoutMs = 60_000): Promise<DaemonStatus> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const s = readStatus(d.name);
    if (s !== undefined && s.pid === d.child.pid && s.state === 'live') return s;
    if (d.child.exitCode !== null) throw new Error(`daemon exited ${d.child.exitCode}:\n${d.output()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`daemon not live after ${timeoutMs} ms:\n${d.output()}`);
}

/** Waits until the daemon's status is in `state` (e.g. 'waiting' for its agent). */
export async function waitState(d: TestDaemon, state: string, timeoutMs = 60_000): Promise<DaemonStatus> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const s = readStatus(d.name);
    if (s !== undefined && s.pid === d.child.pid && s.state === state) return s;
    if (d.child.exitCode !== null) throw new Error(`daemon exited ${d.child.exitCode} while waiting for ${state}:\n${d.output()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`daemon not ${state} after ${timeoutMs} ms:\n${d.output()}`);
}

/** SIGTERM and wait for the exit code. */
export async function stopDaemon(d: TestDaemon): Promise<number | null> {
  d.child.kill('SIGTERM');
  return d.exited;
}

/** `vbd-shadow flush NAME`, then the latest flush report (which must be a success). */
export function flushReport(name: string): FlushReport {
  cliOk(['flush', name]);
  const f = readStatus(name)?.lastFlush;
  if (f === undefined) throw new Error('no flush report');
  expect(f.ok, f.error).toBe(true);
  return f;
}
