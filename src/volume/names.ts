// Names a volume directory holds and the names a volume may have: apart from the manifest's
// parser (which needs node:crypto for sealed slots), so reading runtime state loads none of it.

export const MANIFEST_NAME = 'vbd-shadow.json';

/** Volume and backing-file names: no slash, no leading dot, so never `..` nor a path. */
export const NAME_RE = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$/;

export function isValidName(name: string): boolean {
  return NAME_RE.test(name);
}
