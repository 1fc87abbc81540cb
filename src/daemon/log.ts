// The daemon's log: one event per line on stdout. Under journald (JOURNAL_STREAM set) the
// journal adds the time; otherwise each line starts with an ISO timestamp.

export type Log = (line: string) => void;

export function createLog(name: string): Log {
  const stamped = process.env['JOURNAL_STREAM'] === undefined;
  return (line) => {
    process.stdout.write(`${stamped ? `${new Date().toISOString()} ` : ''}[${name}] ${line}\n`);
  };
}
