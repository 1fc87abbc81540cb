// Where a volume's secret comes from on the command line: --key-file, else the default key file
// ~/.config/vbd-shadow/NAME.key (the agent's too), else a prompt on the terminal (three tries).
// A keyed plain volume has a layout secret; a sealed volume has a passphrase (any layout).

import { UsageError, VbdError, kindOf } from '../common/errors.js';
import { promptSecret, readDefaultKeyFile, readKeyFile } from '../layouts/secret.js';
import type { AnyManifest } from '../volume/manifest.js';

/** Tries a passphrase typed on the terminal gets, as sudo and cryptsetup give. */
export const PROMPT_TRIES = 3;

/** What a manifest's secret is called, or undefined if it has none. */
function secretKind(manifest: AnyManifest): 'passphrase' | 'key' | undefined {
  if (manifest.format === 2) return 'passphrase';
  return manifest.layout.kind === 'keyed' ? 'key' : undefined;
}

function question(manifest: AnyManifest, optional: boolean): string {
  const base = manifest.format === 2 ? `Passphrase of sealed volume '${manifest.name}'` : `Key for volume '${manifest.name}'`;
  return optional ? `${base} (Enter to skip): ` : `${base}: `;
}

interface Found {
  secret: Buffer | undefined;
  /** Typed on the terminal: a wrong one may be typed again. */
  typed: boolean;
}

async function findSecret(manifest: AnyManifest, keyFile: string | undefined, optional: boolean): Promise<Found> {
  const kind = secretKind(manifest);
  if (kind === undefined) {
    if (keyFile !== undefined) throw new UsageError(`--key-file: volume '${manifest.name}' has no key (${manifest.layout.kind} layout, not sealed)`);
    return { secret: undefined, typed: false };
  }
  if (keyFile !== undefined) return { secret: readKeyFile(keyFile), typed: false };
  const fromDefault = readDefaultKeyFile(manifest.name);
  if (fromDefault !== undefined) return { secret: fromDefault, typed: false };
  // Never a prompt without a terminal: an optional secret is then simply not there.
  if (optional && process.stdin.isTTY !== true) return { secret: undefined, typed: false };
  const typed = await promptSecret(question(manifest, optional), { allowEmpty: optional });
  if (typed.length === 0) return { secret: undefined, typed: false };
  return { secret: typed, typed: true };
}

/** The secret a manifest needs (keyed layout or sealed volume), or undefined. The caller wipes it. */
export async function secretFor(manifest: AnyManifest, keyFile: string | undefined): Promise<Buffer | undefined> {
  return (await findSecret(manifest, keyFile, false)).secret;
}

export interface WithSecretOptions {
  /** No secret is fine (inspect): none is asked without a terminal, and Enter at the prompt skips. */
  optional?: boolean;
}

/**
 * Runs `use` with the volume's secret (undefined if it has none, or if optional and not given)
 * and wipes it afterwards. A secret typed on the terminal that `use` finds wrong (a wrong-key
 * error) is asked again, up to PROMPT_TRIES times; one from a file is not.
 */
export async function withSecret<T>(manifest: AnyManifest, keyFile: string | undefined, use: (secret: Buffer | undefined) => Promise<T>, options: WithSecretOptions = {}): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    const found = await findSecret(manifest, keyFile, options.optional === true);
    try {
      return await use(found.secret);
    } catch (err) {
      if (!found.typed || attempt >= PROMPT_TRIES || kindOf(err) !== 'wrong-key') throw err;
      process.stderr.write(`vbd-shadow: wrong ${secretKind(manifest) ?? 'key'}; try again (${PROMPT_TRIES - attempt} ${PROMPT_TRIES - attempt === 1 ? 'try' : 'tries'} left)\n`);
    } finally {
      found.secret?.fill(0);
    }
  }
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
