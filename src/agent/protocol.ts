// Messages on the pipes into the daemon: one JSON object per line, each a kind of its own.
//   agent.fifo   (the canary):  hello, key, flush, teardown — its closing ends the session
//   control.fifo (flush/stop):  flush, stop — opened and closed per command
// Handlers are a Record over the kinds, so a new kind without a handler does not compile.

export type PipeMessage =
  | { kind: 'hello'; version: 1; pid: number }
  | { kind: 'key'; secret: string }
  | { kind: 'flush' }
  | { kind: 'teardown' }
  | { kind: 'stop' };

export type MessageKind = PipeMessage['kind'];
export type Handlers = { [K in MessageKind]: (message: Extract<PipeMessage, { kind: K }>) => void };

export const MAX_LINE = 64 * 1024;

/** Parses one line; anything malformed is reported, never thrown (the pipe is user input). */
export function parseMessage(line: string): PipeMessage | { error: string } {
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch {
    return { error: 'not JSON' };
  }
  if (typeof value !== 'object' || value === null) return { error: 'not an object' };
  const m = value as Record<string, unknown>;
  switch (m['kind']) {
    case 'hello':
      return m['version'] === 1 && Number.isSafeInteger(m['pid']) ? { kind: 'hello', version: 1, pid: m['pid'] as number } : { error: 'bad hello' };
    case 'key':
      return typeof m['secret'] === 'string' && m['secret'].length > 0 ? { kind: 'key', secret: m['secret'] } : { error: 'bad key message' };
    case 'flush':
    case 'teardown':
    case 'stop':
      return { kind: m['kind'] };
    default:
      return { error: `unknown kind ${JSON.stringify(m['kind'])}` };
  }
}

export function encodeMessage(message: PipeMessage): string {
  return `${JSON.stringify(message)}\n`;
}

/** Dispatches a message to its handler. */
export function dispatch(message: PipeMessage, handlers: Handlers): void {
  (handlers[message.kind] as (m: PipeMessage) => void)(message);
}
