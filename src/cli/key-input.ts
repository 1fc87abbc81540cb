// Where a keyed volume's secret comes from on the command line: --key-file, else a prompt.

import { VbdError } from '../common/errors.js';
import { promptSecret, readKeyFile } from '../layouts/secret.js';
import type { Manifest } from '../volume/manifest.js';

/** The secret for a keyed manifest, or undefined for other layouts. The caller wipes it. */
export async function secretFor(manifest: Manifest, keyFile: string | undefined): Promise<Buffer | undefined> {
  if (manifest.layout.kind !== 'keyed') return undefined;
  return keyFile !== undefined ? readKeyFile(keyFile) : promptSecret(`Key for volume '${manifest.name}': `);
}

/** A new secret for `init`: from --key-file, or asked twice on the terminal. */
export async function newSecret(keyFile: string | undefined): Promise<Buffer> {
  if (keyFile !== undefined) return readKeyFile(keyFile);
  const first = await promptSecret('New key: ');
  const again = await promptSecret('Repeat the key: ');
  const same = first.equals(again);
  again.fill(0);
  if (!same) {
    first.fill(0);
    throw new VbdError('the two keys differ');
  }
  return first;
}
