// sd_notify(3) for a Type=notify unit: one datagram of NAME=VALUE lines to the AF_UNIX socket
// named by $NOTIFY_SOCKET (a path, or '@name' in the abstract namespace). Node has no datagram
// Unix sockets, so socket/sendto come through koffi. Without $NOTIFY_SOCKET every call is a
// no-op. The variable is taken out of the environment when read, so that no child (mkfs, a
// layout module, setpriv, the spawned agent) can speak for the service.

import { closeSync } from 'node:fs';
import { VbdError } from '../common/errors.js';
import { libc, syscallError } from './ffi.js';

const AF_UNIX = 1;
const SOCK_DGRAM = 2;
const SOCK_CLOEXEC = 0o2000000;
const MSG_NOSIGNAL = 0x4000;
/** struct sockaddr_un: sa_family_t (2 bytes) + char sun_path[108]. */
const SUN_PATH_OFFSET = 2;
const SUN_PATH_MAX = 108;

const c = {
  socket: libc.func('int socket(int domain, int type, int protocol)'),
  sendto: libc.func('int64_t sendto(int fd, const void *buf, size_t len, int flags, const void *addr, uint32_t addrlen)'),
};

/** The sockaddr_un of `name` and its length: a path (NUL-terminated) or '@abstract'. */
export function socketAddress(name: string): { addr: Buffer; length: number } {
  const abstract = name.startsWith('@');
  if (!abstract && !name.startsWith('/')) throw new VbdError(`NOTIFY_SOCKET '${name}' is neither an absolute path nor '@' and an abstract name`, { kind: 'usage' });
  const path = Buffer.from(abstract ? name.slice(1) : name, 'utf8');
  // An abstract name starts with a NUL and is exactly as long as given; a path ends with one.
  const length = SUN_PATH_OFFSET + 1 + path.length;
  if (length > SUN_PATH_OFFSET + SUN_PATH_MAX) throw new VbdError(`NOTIFY_SOCKET '${name}' is longer than a Unix socket address may be (${SUN_PATH_MAX - 1} bytes)`, { kind: 'usage' });
  const addr = Buffer.alloc(SUN_PATH_OFFSET + SUN_PATH_MAX);
  addr.writeUInt16LE(AF_UNIX, 0);
  path.copy(addr, SUN_PATH_OFFSET + (abstract ? 1 : 0));
  return { addr, length };
}

/** Sends one datagram `text` to the socket `name`; throws an error naming the socket. */
export function sendDatagram(name: string, text: string): void {
  const { addr, length } = socketAddress(name);
  const fd = c.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0) as number;
  if (fd < 0) throw syscallError('socket', `(AF_UNIX datagram, for NOTIFY_SOCKET ${name})`);
  try {
    const bytes = Buffer.from(text, 'utf8');
    const sent = Number(c.sendto(fd, bytes, bytes.length, MSG_NOSIGNAL, addr, length));
    if (sent < 0) throw syscallError('sendto', `NOTIFY_SOCKET ${name}`);
    if (sent !== bytes.length) throw new VbdError(`sendto NOTIFY_SOCKET ${name}: sent ${sent} of ${bytes.length} bytes`);
  } finally {
    closeSync(fd);
  }
}

export interface Notifier {
  /** Whether a service manager listens (NOTIFY_SOCKET was set). */
  readonly active: boolean;
  /** Sends the fields as one message (values must not hold a newline; they are cut there). */
  send(fields: Readonly<Record<string, string | number>>): void;
}

/**
 * A notifier for this process. A failed send is reported once through `onError` (a service
 * manager that went away must not take the daemon down) and retried with the next message.
 */
export function createNotifier(onError: (message: string) => void, env: NodeJS.ProcessEnv = process.env): Notifier {
  const socket = env['NOTIFY_SOCKET'];
  delete env['NOTIFY_SOCKET'];
  if (socket === undefined || socket === '') return { active: false, send: () => undefined };
  let failing = false;
  return {
    active: true,
    send(fields) {
      const text = Object.entries(fields).map(([k, v]) => `${k}=${String(v).split('\n')[0] ?? ''}`).join('\n');
      try {
        sendDatagram(socket, text);
        failing = false;
      } catch (err) {
        if (!failing) onError(`cannot notify the service manager: ${err instanceof Error ? err.message : String(err)}`);
        failing = true;
      }
    },
  };
}
