// The systemd identity of a volume: its units are instantiated by the volume directory as
// `systemd-escape --path` escapes it (systemd.unit(5), "String Escaping for Inclusion in Unit
// Names"), so `vbd-shadow@INSTANCE.service` and the CLI's DIR name the same volume. Written
// here rather than run as `systemd-escape` so that status and lookups need no process; the
// tests compare it with the real tool.

const UNIT_TEMPLATE = 'vbd-shadow';
const PLAIN = /^[A-Za-z0-9:_.]$/;

/** `systemd-escape --path PATH`: slashes trimmed and collapsed, '/' → '-', the rest \xNN. */
export function escapePath(path: string): string {
  const trimmed = path.split('/').filter((part) => part !== '').join('/');
  if (trimmed === '') return '-';
  const bytes = Buffer.from(trimmed, 'utf8');
  let out = '';
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i] as number;
    const ch = String.fromCharCode(b);
    if (ch === '/') out += '-';
    else if (b < 0x80 && PLAIN.test(ch) && !(i === 0 && ch === '.')) out += ch;
    else out += `\\x${b.toString(16).padStart(2, '0')}`;
  }
  return out;
}

/** `systemd-escape --unescape --path INSTANCE`: the absolute path, or undefined if malformed. */
export function unescapePath(instance: string): string | undefined {
  if (instance === '-') return '/';
  const bytes: number[] = [];
  for (let i = 0; i < instance.length; i++) {
    const ch = instance[i] as string;
    if (ch === '-') bytes.push(0x2f);
    else if (ch === '\\') {
      const hex = /^x([0-9a-fA-F]{2})/.exec(instance.slice(i + 1));
      if (hex === null) return undefined;
      bytes.push(parseInt(hex[1] as string, 16));
      i += 3;
    } else if (PLAIN.test(ch)) bytes.push(ch.charCodeAt(0));
    else return undefined;
  }
  return `/${Buffer.from(bytes).toString('utf8')}`;
}

/** The system unit that serves the volume in `dir` (absolute). */
export function unitOfDirectory(dir: string): string {
  return `${UNIT_TEMPLATE}@${escapePath(dir)}.service`;
}

/**
 * The volume directory a unit name or instance names (`vbd-shadow@X.service`,
 * `vbd-shadow-agent@X.service`, or `X` with a `\x` escape or a `-`), or undefined if `text`
 * is not one.
 */
export function directoryOfUnit(text: string): string | undefined {
  const match = /^vbd-shadow(?:-agent)?@(.+)\.service$/.exec(text);
  if (match === null) return undefined;
  return unescapePath(match[1] as string);
}
