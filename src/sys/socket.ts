// Listening stream sockets made by root and handed to a child (nbdkit) as an inherited fd, the
// way systemd's socket activation does: the child never binds anything itself, so it can run as
// an unprivileged user while the socket sits in root's directory with the mode and owner root
// gave it. Node's net.Server does not hand out its fd, so socket/bind/listen come through koffi.

import { closeSync } from 'node:fs';
import { isIPv4, isIPv6 } from 'node:net';
import { VbdError } from '../common/errors.js';
import { libc, syscallError } from './ffi.js';

const AF_UNIX = 1;
const AF_INET = 2;
const AF_INET6 = 10;
const SOCK_STREAM = 1;
const SOCK_DGRAM = 2;
const MSG_NOSIGNAL = 0x4000;
const SOCK_CLOEXEC = 0o2000000;
const SOL_SOCKET = 1;
const SO_REUSEADDR = 2;
const IPPROTO_IPV6 = 41;
const IPV6_V6ONLY = 26;
const BACKLOG = 64;
/** struct sockaddr_un: sa_family_t (2 bytes) + char sun_path[108]. */
const SUN_PATH_OFFSET = 2;
const SUN_PATH_MAX = 108;

const c = {
  socket: libc.func('int socket(int domain, int type, int protocol)'),
  bind: libc.func('int bind(int fd, const void *addr, uint32_t addrlen)'),
  listen: libc.func('int listen(int fd, int backlog)'),
  setsockopt: libc.func('int setsockopt(int fd, int level, int name, const void *value, uint32_t len)'),
  inetPton: libc.func('int inet_pton(int af, const char *src, void *dst)'),
  sendto: libc.func('int64_t sendto(int fd, const void *buf, size_t len, int flags, const void *addr, uint32_t addrlen)'),
};

function open(domain: number, what: string, type = SOCK_STREAM): number {
  const fd = c.socket(domain, type | SOCK_CLOEXEC, 0) as number;
  if (fd < 0) throw syscallError('socket', what);
  return fd;
}

/** The sockaddr_un of `name` and its length: a path (NUL-terminated) or '@abstract'. */
export function unixAddress(name: string, what: string): { addr: Buffer; length: number } {
  const abstract = name.startsWith('@');
  if (!abstract && !name.startsWith('/')) throw new VbdError(`${what} '${name}' is neither an absolute path nor '@' and an abstract name`, { kind: 'usage' });
  const path = Buffer.from(abstract ? name.slice(1) : name, 'utf8');
  // An abstract name starts with a NUL and is exactly as long as given; a path ends with one.
  const length = SUN_PATH_OFFSET + 1 + path.length;
  if (length > SUN_PATH_OFFSET + SUN_PATH_MAX) throw new VbdError(`${what} '${name}' is longer than a Unix socket address may be (${SUN_PATH_MAX - 1} bytes)`, { kind: 'usage' });
  const addr = Buffer.alloc(SUN_PATH_OFFSET + SUN_PATH_MAX);
  addr.writeUInt16LE(AF_UNIX, 0);
  path.copy(addr, SUN_PATH_OFFSET + (abstract ? 1 : 0));
  return { addr, length };
}

/** Sends one datagram `text` to the Unix socket `name` (sd_notify's NOTIFY_SOCKET); throws an error naming it. */
export function sendDatagram(name: string, text: string): void {
  const { addr, length } = unixAddress(name, 'NOTIFY_SOCKET');
  const fd = open(AF_UNIX, `(AF_UNIX datagram, for NOTIFY_SOCKET ${name})`, SOCK_DGRAM);
  try {
    const bytes = Buffer.from(text, 'utf8');
    const sent = Number(c.sendto(fd, bytes, bytes.length, MSG_NOSIGNAL, addr, length));
    if (sent < 0) throw syscallError('sendto', `NOTIFY_SOCKET ${name}`);
    if (sent !== bytes.length) throw new VbdError(`sendto NOTIFY_SOCKET ${name}: sent ${sent} of ${bytes.length} bytes`);
  } finally {
    closeSync(fd);
  }
}

function bindAndListen(fd: number, addr: Buffer, what: string): number {
  try {
    if ((c.bind(fd, addr, addr.length) as number) !== 0) throw syscallError('bind', what);
    if ((c.listen(fd, BACKLOG) as number) !== 0) throw syscallError('listen', what);
    return fd;
  } catch (err) {
    closeSync(fd);
    throw err;
  }
}

/**
 * A listening Unix stream socket bound at `path` (created with the process umask: bind it in a
 * directory nobody else can enter, set its mode and owner, then move it into place). Close-on-exec.
 */
export function listenUnix(path: string): number {
  if (!path.startsWith('/')) throw new VbdError(`internal: the socket path ${path} is not absolute`);
  const { addr } = unixAddress(path, 'socket path');
  return bindAndListen(open(AF_UNIX, `(Unix stream, for ${path})`), addr, path);
}

/** A listening TCP socket on `host` (an IPv4 or IPv6 literal) and `port`. Close-on-exec. */
export function listenTcp(host: string, port: number): number {
  const what = `${isIPv6(host) ? `[${host}]` : host}:${port}`;
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new VbdError(`TCP port must be 1-65535, got ${port}`, { kind: 'usage' });
  let addr: Buffer;
  let fd: number;
  if (isIPv4(host)) {
    addr = Buffer.alloc(16); // struct sockaddr_in
    addr.writeUInt16LE(AF_INET, 0);
    addr.writeUInt16BE(port, 2);
    if ((c.inetPton(AF_INET, host, addr.subarray(4, 8)) as number) !== 1) throw new VbdError(`'${host}' is not an IPv4 address`, { kind: 'usage' });
    fd = open(AF_INET, `(TCP, for ${what})`);
  } else if (isIPv6(host)) {
    addr = Buffer.alloc(28); // struct sockaddr_in6
    addr.writeUInt16LE(AF_INET6, 0);
    addr.writeUInt16BE(port, 2);
    if ((c.inetPton(AF_INET6, host, addr.subarray(8, 24)) as number) !== 1) throw new VbdError(`'${host}' is not an IPv6 address`, { kind: 'usage' });
    fd = open(AF_INET6, `(TCP, for ${what})`);
    setOption(fd, IPPROTO_IPV6, IPV6_V6ONLY, what);
  } else {
    throw new VbdError(`'${host}' is not an IP address (give a literal IPv4 or IPv6 address)`, { kind: 'usage' });
  }
  setOption(fd, SOL_SOCKET, SO_REUSEADDR, what);
  return bindAndListen(fd, addr, what);
}

function setOption(fd: number, level: number, name: number, what: string): void {
  const one = Buffer.alloc(4);
  one.writeInt32LE(1, 0);
  if ((c.setsockopt(fd, level, name, one, 4) as number) !== 0) {
    const err = syscallError('setsockopt', what);
    closeSync(fd);
    throw err;
  }
}
