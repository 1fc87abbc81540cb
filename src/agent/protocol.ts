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

/** How much a pipe accepts from the owner (root reads what the owner writes). */
export interface PipeLimits {
  /** The longest line accepted, in bytes without the newline; longer ones are skipped unread. */
  maxLine: number;
  /** Input read per second; beyond it reading pauses until the next second (the writer waits). */
  bytesPerSecond: number;
  /** Problems reported one by one per `reportWindowMs`; the rest are counted in one summary line. */
  reportsPerWindow: number;
  reportWindowMs: number;
  /** Whether an excerpt (escaped, truncated) of a bad line may be logged. Never for a pipe that carries a key. */
  showContent: boolean;
}

/** The agent pipe: hello, a key (base64 of a secret of up to 64 KiB), flush and teardown. */
export const AGENT_PIPE: PipeLimits = {
  maxLine: 96 * 1024, bytesPerSecond: 256 * 1024, reportsPerWindow: 6, reportWindowMs: 10_000, showContent: false,
};

/** The control pipe: flush and stop, a few bytes each. */
export const CONTROL_PIPE: PipeLimits = {
  maxLine: 256, bytesPerSecond: 64 * 1024, reportsPerWindow: 6, reportWindowMs: 10_000, showContent: true,
};

/** What is wrong with a line: `problem` never holds input; `detail` is input (shown only escaped, where allowed). */
export interface BadMessage {
  problem: string;
  detail?: string;
}

/** Parses one line; anything malformed is reported, never thrown (the pipe is user input). */
export function parseMessage(line: string): PipeMessage | BadMessage {
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch {
    return { problem: 'not JSON' };
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return { problem: 'not an object' };
  const m = value as Record<string, unknown>;
  const kind = m['kind'];
  switch (kind) {
    case 'hello':
      return m['version'] === 1 && Number.isSafeInteger(m['pid']) ? { kind: 'hello', version: 1, pid: m['pid'] as number } : { problem: 'bad hello' };
    case 'key':
      return typeof m['secret'] === 'string' && m['secret'].length > 0 ? { kind: 'key', secret: m['secret'] } : { problem: 'bad key message' };
    case 'flush':
    case 'teardown':
    case 'stop':
      return { kind };
    default:
      return typeof kind === 'string' ? { problem: 'unknown kind', detail: kind } : { problem: 'no kind' };
  }
}

export function isBad(parsed: PipeMessage | BadMessage): parsed is BadMessage {
  return 'problem' in parsed;
}

export function encodeMessage(message: PipeMessage): string {
  return `${JSON.stringify(message)}\n`;
}

/** Dispatches a message to its handler. */
export function dispatch(message: PipeMessage, handlers: Handlers): void {
  (handlers[message.kind] as (m: PipeMessage) => void)(message);
}
