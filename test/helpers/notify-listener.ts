// A service manager's notification socket, for tests: a small python3 process bound to an
// AF_UNIX datagram socket (a path, or '@name' in the abstract namespace) that prints each
// message it receives as one JSON line; what it got is parsed into NAME=VALUE fields.

import { spawn } from 'node:child_process';
import { trackedChildren } from './children.js';

const LISTENER = `
import json, socket, sys
name = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind('\\0' + name[1:] if name.startswith('@') else name)
print(json.dumps('bound'), flush=True)
while True:
    print(json.dumps(s.recv(65536).decode('utf8', 'replace')), flush=True)
`;

export interface NotifyListener {
  /** The NOTIFY_SOCKET value. */
  socket: string;
  /** Every message so far, each as its fields, in order. */
  messages: () => Record<string, string>[];
  /** Waits for a message for which `match` holds; returns it with its index. */
  waitFor: (what: string, match: (m: Record<string, string>) => boolean, timeoutMs?: number) => Promise<{ message: Record<string, string>; index: number }>;
}

const children = trackedChildren();

export async function listenForNotifications(socket: string): Promise<NotifyListener> {
  const child = spawn('/usr/bin/python3', ['-c', LISTENER, socket], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  const received: Record<string, string>[] = [];
  let pending = '';
  let stderr = '';
  let bound = false;
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  child.stdout.on('data', (d: Buffer) => {
    pending += d.toString();
    for (let nl = pending.indexOf('\n'); nl >= 0; nl = pending.indexOf('\n')) {
      const text = JSON.parse(pending.slice(0, nl)) as string;
      pending = pending.slice(nl + 1);
      if (!bound && text === 'bound') {
        bound = true;
        continue;
      }
      const fields: Record<string, string> = {};
      for (const line of text.split('\n')) {
        const eq = line.indexOf('=');
        if (eq > 0) fields[line.slice(0, eq)] = line.slice(eq + 1);
      }
      received.push(fields);
    }
  });
  const deadline = Date.now() + 10_000;
  while (!bound) {
    if (child.exitCode !== null || Date.now() > deadline) throw new Error(`the notification listener on ${socket} did not start: ${stderr}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    socket,
    messages: () => [...received],
    waitFor: async (what, match, timeoutMs = 60_000) => {
      const end = Date.now() + timeoutMs;
      for (;;) {
        const index = received.findIndex(match);
        const message = received[index];
        if (message !== undefined) return { message, index };
        if (Date.now() > end) throw new Error(`no ${what} on ${socket} after ${timeoutMs} ms; got ${JSON.stringify(received)}`);
        await new Promise((r) => setTimeout(r, 20));
      }
    },
  };
}
