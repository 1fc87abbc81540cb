// A sealed manifest as it would be written and read back: each edit of a bound field, made in
// the JSON text as someone holding the files would make it, makes the unlock fail.

import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { UNWRAP_FAILED, encodeGeometryAD } from '../../src/store/keys.js';
import {
  changePassphrase, createSealedManifest, nextKeyGeneration, sealedGeometry, slotCountOf, unlockSealedManifest, wrappedKeyOf,
} from '../../src/store/sealed-manifest.js';
import { openChunk, sealChunk, slotSize } from '../../src/store/slot.js';
import { parseAnyManifest, parseManifest, serializeManifest, type SealedManifest } from '../../src/volume/manifest.js';

type Json = Record<string, unknown>;
const FAST = { N: 1024, r: 8, p: 1 };
const pass = Buffer.from('a passphrase');

function newVolume(layout: SealedManifest['layout'] = { kind: 'linear' }): { manifest: SealedManifest; text: string } {
  const { manifest, keys } = createSealedManifest(pass, {
    name: 'vault',
    deviceSize: 32 * 4096,
    chunkSize: 4096,
    files: [{ path: 'a', size: 20 * 4124 }, { path: 'b', size: 20 * 4124 }],
    layout,
    spareSlots: 8,
    kdf: FAST,
  });
  keys.wipe();
  return { manifest, text: serializeManifest(manifest) };
}

function edited(text: string, edit: (m: Json) => void): SealedManifest {
  const m = JSON.parse(text) as Json;
  edit(m);
  const parsed = parseAnyManifest(JSON.stringify(m));
  if (parsed.format !== 2) throw new Error('expected a sealed manifest');
  return parsed;
}

const sealed = (m: Json): Json => m['sealed'] as Json;
const files = (m: Json): Json[] => m['files'] as Json[];

describe('sealed manifest and its wrap', () => {
  const { manifest, text } = newVolume();

  it('a new manifest is valid, unlocks with its passphrase after a round trip through text', () => {
    expect(manifest.format).toBe(2);
    expect(manifest.sealed.keyGeneration).toBe(0);
    expect(manifest.sealed.uuid).toMatch(/^[0-9a-f]{32}$/);
    expect(slotCountOf(manifest)).toBe(40);
    const back = parseAnyManifest(text) as SealedManifest;
    const keys = unlockSealedManifest(pass, back);
    expect(keys.uuid.toString('hex')).toBe(manifest.sealed.uuid);
    keys.wipe();
    expect(() => parseManifest(text)).toThrow(/format must be 1, got 2 \(format 2 is a sealed volume/);
  });

  it('two new volumes get different UUIDs and keys', () => {
    const other = newVolume();
    expect(other.manifest.sealed.uuid).not.toBe(manifest.sealed.uuid);
    expect(other.manifest.sealed.wrappedKey).not.toBe(manifest.sealed.wrappedKey);
  });

  it('a wrong passphrase is refused', () => {
    expect(() => unlockSealedManifest(Buffer.from('a passphrasf'), manifest)).toThrow(UNWRAP_FAILED);
  });

  const edits: [string, (m: Json) => void][] = [
    ['device size (one chunk less)', (m) => { m['deviceSize'] = 31 * 4096; }],
    ['chunk size (halved, files still large enough)', (m) => { m['chunkSize'] = 2048; m['deviceSize'] = 32 * 4096; }],
    ['a file size (one byte more)', (m) => { (files(m)[1] as Json)['size'] = 20 * 4124 + 1; }],
    ['a file name', (m) => { (files(m)[0] as Json)['path'] = 'c'; }],
    ['the file order', (m) => { m['files'] = [files(m)[1], files(m)[0]]; }],
    ['spare slots', (m) => { sealed(m)['spareSlots'] = 7; }],
    ['layout kind', (m) => { m['layout'] = { kind: 'striped' }; }],
    ['layout kind to keyed', (m) => { m['layout'] = { kind: 'keyed' }; }],
    ['volume UUID', (m) => { sealed(m)['uuid'] = randomBytes(16).toString('hex'); }],
    ['key generation', (m) => { sealed(m)['keyGeneration'] = 1; }],
    ['volume name', (m) => { m['name'] = 'vault2'; }],
  ];
  for (const [what, edit] of edits) {
    it(`an edited ${what} is refused: wrong key or manifest edited`, () => {
      const changed = edited(text, edit);
      expect(encodeGeometryAD(sealedGeometry(changed)).equals(encodeGeometryAD(sealedGeometry(manifest)))).toBe(false);
      expect(() => unlockSealedManifest(pass, changed)).toThrow(UNWRAP_FAILED);
    });
  }

  it('an edited scrypt cost or salt (not in the AD) derives another KEK and is refused the same way', () => {
    for (const edit of [
      (m: Json): void => { (sealed(m)['kdf'] as Json)['N'] = 2048; },
      (m: Json): void => { (sealed(m)['kdf'] as Json)['salt'] = randomBytes(16).toString('hex'); },
    ]) {
      const changed = edited(text, edit);
      expect(encodeGeometryAD(sealedGeometry(changed)).equals(encodeGeometryAD(sealedGeometry(manifest)))).toBe(true);
      expect(() => unlockSealedManifest(pass, changed)).toThrow(UNWRAP_FAILED);
    }
  });

  it('clearing the sealed flag cannot pass for a sealed volume: the parser refuses each way of doing it', () => {
    const noSealed = JSON.parse(text) as Json;
    delete noSealed['sealed'];
    expect(() => parseAnyManifest(JSON.stringify(noSealed))).toThrow(/a format 2 manifest needs its sealed object/);
    const asPlain = JSON.parse(text) as Json;
    asPlain['format'] = 1;
    expect(() => parseAnyManifest(JSON.stringify(asPlain))).toThrow(/format 1 with a sealed object: wrong key or manifest edited/);
    // And with the flag cleared in the bound data, the wrap no longer opens.
    expect(() => unlockSealedManifest(pass, manifest)).not.toThrow();
    const g = { ...sealedGeometry(manifest), sealed: false };
    expect(encodeGeometryAD(g).equals(encodeGeometryAD(sealedGeometry(manifest)))).toBe(false);
  });

  it('the layout is bound by content, not by how its JSON was written', () => {
    const mod = newVolume({ kind: 'module', path: '/opt/layout.mjs', params: { seed: 7, order: ['b', 'a'] }, fingerprint: 'd'.repeat(64) });
    const reordered = mod.text.replace('"seed": 7,\n      "order": [\n        "b",\n        "a"\n      ]', '"order": ["b", "a"], "seed": 7');
    expect(reordered).not.toBe(mod.text);
    const same = parseAnyManifest(reordered) as SealedManifest;
    unlockSealedManifest(pass, same).wipe();
    for (const edit of [
      (m: Json): void => { ((m['layout'] as Json)['params'] as Json)['seed'] = 8; },
      (m: Json): void => { (m['layout'] as Json)['path'] = '/opt/other.mjs'; },
      (m: Json): void => { (m['layout'] as Json)['fingerprint'] = 'e'.repeat(64); },
    ]) {
      expect(() => unlockSealedManifest(pass, edited(mod.text, edit))).toThrow(UNWRAP_FAILED);
    }
  });

  it('a passphrase change re-wraps one key: slots sealed before open after', () => {
    const keys = unlockSealedManifest(pass, manifest);
    const chunk = randomBytes(4096);
    const slot = Buffer.alloc(slotSize(4096));
    sealChunk(keys.slotKey(0), { chunk: 3, epoch: 1 }, chunk, slot);
    keys.wipe();
    const changed = changePassphrase(pass, Buffer.from('new one'), manifest);
    expect({ ...changed, sealed: { ...changed.sealed, kdf: undefined, wrappedKey: undefined } })
      .toEqual({ ...manifest, sealed: { ...manifest.sealed, kdf: undefined, wrappedKey: undefined } });
    expect(() => unlockSealedManifest(pass, changed)).toThrow(UNWRAP_FAILED);
    const after = unlockSealedManifest(Buffer.from('new one'), parseAnyManifest(serializeManifest(changed)) as SealedManifest);
    const out = Buffer.alloc(4096);
    openChunk(after.slotKey(0), { chunk: 3, epoch: 1 }, slot, out);
    expect(out.equals(chunk)).toBe(true);
    after.wipe();
  });

  it('the next key generation is bound too, keeps the same volume key and passphrase, and needs only the opened keys', () => {
    const opened = unlockSealedManifest(pass, manifest);
    const next = nextKeyGeneration(opened, manifest);
    opened.wipe();
    expect(next.sealed.keyGeneration).toBe(1);
    expect(wrappedKeyOf(next).wrappedKey).not.toBe(manifest.sealed.wrappedKey);
    expect(wrappedKeyOf(next).kdf).toEqual(wrappedKeyOf(manifest).kdf);
    expect(() => unlockSealedManifest(Buffer.from('another passphrase'), next)).toThrow(UNWRAP_FAILED);
    const a = unlockSealedManifest(pass, manifest);
    const b = unlockSealedManifest(pass, next);
    expect(a.mapKey.equals(b.mapKey)).toBe(true);
    expect(b.slotKey(1).key.equals(a.slotKey(1).key)).toBe(true);
    a.wipe();
    b.wipe();
    // Putting the old generation back into the new manifest is an edit like any other.
    expect(() => unlockSealedManifest(pass, { ...next, sealed: { ...next.sealed, keyGeneration: 0 } })).toThrow(UNWRAP_FAILED);
  });

  it('creating a volume whose files are too small is refused with the parser\'s message', () => {
    expect(() => createSealedManifest(pass, {
      name: 'small', deviceSize: 32 * 4096, chunkSize: 4096, files: [{ path: 'a', size: 32 * 4096 }], layout: { kind: 'linear' }, spareSlots: 1, kdf: FAST,
    })).toThrow(/invalid manifest: the files hold 31 slots of 4124 bytes .* fewer than the 32 chunks plus 1 spare slots/);
  });
});
