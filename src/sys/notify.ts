// sd_notify(3) for a Type=notify unit: one datagram of NAME=VALUE lines to the AF_UNIX socket
// named by $NOTIFY_SOCKET (a path, or '@name' in the abstract namespace). Node has no datagram
// Unix sockets: src/sys/socket.ts sends it through koffi. Without $NOTIFY_SOCKET every call is a
// no-op. The variable is taken out of the environment when read, so that no child (mkfs, a
// layout module, setpriv, the spawned agent) can speak for the service.

import { sendDatagram } from './socket.js';

export { sendDatagram };

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
