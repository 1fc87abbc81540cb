// An agent run as a real user, for tests: spawned, its output kept, always killed after the test.

import { spawn, type ChildProcess } from 'node:child_process';
import { BIN } from './cli.js';
import { Stage, eachTestCleanup } from './cleanup.js';
import type { User } from './system.js';

export interface TestAgent {
  child: ChildProcess;
  output: () => string;
  exited: Promise<number | null>;
}

const agents: TestAgent[] = [];
eachTestCleanup(Stage.Processes, async () => {
  for (const a of agents.splice(0)) {
    if (a.child.exitCode === null && a.child.signalCode === null) {
      a.child.kill('SIGKILL');
      await a.exited;
    }
  }
});

export function startAgent(user: User, args: string[], env: Record<string, string> = {}): TestAgent {
  const child = spawn('setpriv', [`--reuid=${user.uid}`, `--regid=${user.gid}`, '--clear-groups', process.execPath, BIN, 'agent', ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { PATH: process.env['PATH'] ?? '/usr/bin:/bin', ...env },
  });
  let text = '';
  child.stdout?.on('data', (d: Buffer) => (text += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (text += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const agent = { child, output: () => text, exited };
  agents.push(agent);
  return agent;
}
