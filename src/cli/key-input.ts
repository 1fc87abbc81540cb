// Where a volume's secret comes from on the command line: --key-file, else a prompt.
// A keyed plain volume has a layout secret; a sealed volume has a passphrase (any layout).

import { UsageError, VbdError } from '../common/errors.js';
import { promptSecret, readKeyFile } from '../layouts/secret.js';
import type { AnyManifest } from '../volume/manifest.js';

/** The secret a manifest needs (keyed layout or sealed volume), or undefined. The caller wipes it. */
export async function secretFor(manifest: AnyManifest, keyFile: string | undefined): Promise<Buffer | undefined> {
  if (manifest.format === 2) {
    return keyFile !== undefined ? readKeyFile(keyFile) : promptSecret(`Passphrase of sealed volume '${manifest.name}': `);
  }
  if (manifest.layout.kind !== 'keyed') {
    if (keyFile !== undefined) throw new UsageError(`--key-file: volume '${manifest.name}' has no key (${manifest.layout.kind} layout, not sealed)`);
    return undefined;
  }
  return keyFile !== undefined ? readKeyFile(keyFile) : promptSecret(`Key for volume '${manifest.name}': `);
}

/** A new secret for `init` or `passwd`: from a key file, or asked twice on the terminal. */
export async function newSecret(keyFile: string | undefined, what = 'key'): Promise<Buffer> {
  if (keyFile !== undefined) return readKeyFile(keyFile);
  const first = await promptSecret(`New ${what}: `);
  const again = await promptSecret(`Repeat the ${what}: `);
  const same = first.equals(again);
  again.fill(0);
  if (!same) {
    first.fill(0);
    throw new VbdError(`the two ${what}s differ`);
  }
  return first;
}
