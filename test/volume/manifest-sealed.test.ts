// The format-2 (sealed) manifest, parsed strictly; format-1 code refuses it.

import { describe, expect, it } from 'vitest';
import {
  MAX_CHUNKS, parseAnyManifest, parseManifest, serializeManifest, type SealedManifest,
} from '../../src/volume/manifest.js';

type Json = Record<string, unknown>;

/** A valid sealed manifest: 16 chunks of 4 KiB, 4 spare slots, two files of 10 slots (4124 B each). */
function valid(): Json {
  return {
    format: 2,
    name: 'sealed-vol',
    deviceSize: 16 * 4096,
    chunkSize: 4096,
    files: [{ path: 'file001', size: 10 * 4124 }, { path: 'file002', size: 10 * 4124 + 100 }],
    layout: { kind: 'keyed' },
    sealed: {
      uuid: '00112233445566778899aabbccddeeff',
      kdf: { N: 32768, r: 8, p: 1, salt: 'ffeeddccbbaa99887766554433221100' },
      wrappedKey: 'ab'.repeat(60),
      spareSlots: 4,
      keyGeneration: 0,
    },
  };
}

function text(edit: (m: Json) => void = () => {}): string {
  const m = valid();
  edit(m);
  return JSON.stringify(m);
}

const sealed = (m: Json): Json => m['sealed'] as Json;
const kdf = (m: Json): Json => sealed(m)['kdf'] as Json;

describe('sealed manifest (format 2)', () => {
  it('a valid one parses to exactly its fields and round-trips', () => {
    const m = parseAnyManifest(text()) as SealedManifest;
    expect(m).toEqual(valid());
    expect(parseAnyManifest(serializeManifest(m))).toEqual(m);
  });

  it('accepts every sealed layout kind; a sealed keyed layout has no salt of its own', () => {
    for (const layout of [{ kind: 'linear' }, { kind: 'striped' }, { kind: 'keyed' }, { kind: 'module', path: '/opt/l.mjs', params: { a: [1] }, fingerprint: 'c'.repeat(64) }]) {
      expect(parseAnyManifest(text((m) => { m['layout'] = layout; })).layout).toEqual(layout);
    }
  });

  it('format-1 code refuses a sealed manifest, saying what it is', () => {
    expect(() => parseManifest(text())).toThrow('invalid manifest: format must be 1, got 2 (format 2 is a sealed volume, which this command does not open yet)');
  });

  it('plain manifests parse the same through either entry', () => {
    const plain = JSON.stringify({ format: 1, name: 'p', deviceSize: 65536, chunkSize: 4096, files: [{ path: 'f', size: 65536 }], layout: { kind: 'linear' } });
    expect(parseAnyManifest(plain)).toEqual(parseManifest(plain));
    expect(() => parseAnyManifest(plain.replace('"format":1', '"format":1,"sealed":{}'))).toThrow(/format 1 with a sealed object: wrong key or manifest edited/);
  });

  const refusals: [string, (m: Json) => void, RegExp][] = [
    ['unknown format', (m) => { m['format'] = 3; }, /format must be 1 \(plain\) or 2 \(sealed\), got 3/],
    ['format as a string', (m) => { m['format'] = '2'; }, /format must be 1 \(plain\) or 2 \(sealed\), got "2"/],
    ['sealed object missing', (m) => { delete m['sealed']; }, /a format 2 manifest needs its sealed object/],
    ['sealed not an object', (m) => { m['sealed'] = 'yes'; }, /sealed must be an object/],
    ['sealed as an array', (m) => { m['sealed'] = []; }, /sealed must be an object/],
    ['unknown field in sealed', (m) => { sealed(m)['plaintext'] = true; }, /sealed has an unknown field 'plaintext'/],
    ['unknown top-level field', (m) => { m['journal'] = 'x'; }, /manifest has an unknown field 'journal'/],
    ['uuid missing', (m) => { delete sealed(m)['uuid']; }, /sealed.uuid must be a string, got undefined/],
    ['uuid upper case', (m) => { sealed(m)['uuid'] = '00112233445566778899AABBCCDDEEFF'; }, /sealed.uuid must be 32 lowercase hex digits/],
    ['uuid in RFC 4122 form', (m) => { sealed(m)['uuid'] = '00112233-4455-6677-8899-aabbccddeeff'; }, /sealed.uuid must be 32 lowercase hex digits/],
    ['uuid short', (m) => { sealed(m)['uuid'] = '0011'; }, /sealed.uuid must be 32 lowercase hex digits, got "0011"/],
    ['kdf missing', (m) => { delete sealed(m)['kdf']; }, /sealed.kdf must be an object/],
    ['kdf unknown field', (m) => { kdf(m)['dkLen'] = 64; }, /sealed.kdf has an unknown field 'dkLen'/],
    ['kdf N not a power of two', (m) => { kdf(m)['N'] = 3000; }, /sealed.kdf.N must be a power of two, got 3000/],
    ['kdf N too small', (m) => { kdf(m)['N'] = 512; }, /sealed.kdf.N must be between 1024 and 1048576, got 512/],
    ['kdf memory above the cap', (m) => { kdf(m)['N'] = 2 ** 20; kdf(m)['r'] = 8; }, /sealed.kdf needs 1024 MiB \(128·N·r with N=1048576, r=8\), more than the 256 MiB allowed/],
    ['kdf p above the cap', (m) => { kdf(m)['p'] = 5; }, /sealed.kdf p=5 is more than the 4 allowed/],
    ['kdf r as a string', (m) => { kdf(m)['r'] = '8'; }, /sealed.kdf.r must be an integer, got "8"/],
    ['kdf salt missing', (m) => { delete kdf(m)['salt']; }, /sealed.kdf.salt must be a string, got undefined/],
    ['kdf salt short', (m) => { kdf(m)['salt'] = 'ff'; }, /sealed.kdf.salt must be 32 lowercase hex digits/],
    ['wrapped key short', (m) => { sealed(m)['wrappedKey'] = 'ab'.repeat(59); }, /sealed.wrappedKey must be 120 lowercase hex digits/],
    ['wrapped key not hex', (m) => { sealed(m)['wrappedKey'] = 'zz'.repeat(60); }, /sealed.wrappedKey must be 120 lowercase hex digits/],
    ['wrapped key as an object', (m) => { sealed(m)['wrappedKey'] = { hex: 'ab' }; }, /sealed.wrappedKey must be a string/],
    ['no spare slots', (m) => { sealed(m)['spareSlots'] = 0; }, /sealed.spareSlots must be between 1 and 16777216, got 0/],
    ['negative spare slots', (m) => { sealed(m)['spareSlots'] = -4; }, /sealed.spareSlots must be between 1/],
    ['fractional spare slots', (m) => { sealed(m)['spareSlots'] = 2.5; }, /sealed.spareSlots must be an integer, got 2.5/],
    ['spare slots above the cap', (m) => { sealed(m)['spareSlots'] = MAX_CHUNKS + 1; }, /sealed.spareSlots must be between 1 and 16777216, got 16777217/],
    ['spare slots missing', (m) => { delete sealed(m)['spareSlots']; }, /sealed.spareSlots must be an integer, got undefined/],
    ['negative key generation', (m) => { sealed(m)['keyGeneration'] = -1; }, /sealed.keyGeneration must be between 0 and 4294967295, got -1/],
    ['key generation past u32', (m) => { sealed(m)['keyGeneration'] = 2 ** 32; }, /sealed.keyGeneration must be between 0 and 4294967295/],
    ['key generation null', (m) => { sealed(m)['keyGeneration'] = null; }, /sealed.keyGeneration must be an integer, got null/],
    ['files hold fewer slots than chunks + spares', (m) => { sealed(m)['spareSlots'] = 5; }, /the files hold 20 slots of 4124 bytes \(chunk and 28 bytes of nonce and tag\), fewer than the 16 chunks plus 5 spare slots/],
    ['files of whole chunks but not whole slots', (m) => { m['files'] = [{ path: 'file001', size: 20 * 4096 }]; }, /the files hold 19 slots of 4124 bytes/],
    ['a keyed layout with a salt of its own', (m) => { m['layout'] = { kind: 'keyed', salt: '00'.repeat(16) }; }, /layout.salt does not belong to a sealed volume: its keyed placement takes its key from the volume key/],
    ['a keyed layout with a key-check value', (m) => { m['layout'] = { kind: 'keyed', keyCheck: '00'.repeat(32) }; }, /layout.keyCheck does not belong to a sealed volume/],
    ['a layout with an unknown field', (m) => { m['layout'] = { kind: 'linear', stride: 2 }; }, /layout has an unknown field 'stride'/],
    ['an unknown layout', (m) => { m['layout'] = { kind: 'zigzag' }; }, /layout.kind must be one of linear, striped, keyed, module, got "zigzag"/],
    ['module params nested too deep', (m) => { m['layout'] = { kind: 'module', path: '/l.mjs', fingerprint: 'c'.repeat(64), params: { a: JSON.parse('['.repeat(40) + ']'.repeat(40)) as unknown } }; }, /invalid manifest: layout.params.a.*nested deeper than 32 levels/],
    ['the common rules still hold: reserved file name', (m) => { (m['files'] as Json[])[0] = { path: 'vbd-shadow.map', size: 41240 }; }, /files\[0\].path 'vbd-shadow.map' is reserved/],
    ['the common rules still hold: chunk not a power of two', (m) => { m['chunkSize'] = 4124; }, /chunkSize must be a power of two, got 4124/],
  ];
  for (const [what, edit, error] of refusals) {
    it(`refuses: ${what}`, () => {
      expect(() => parseAnyManifest(text(edit))).toThrow(error);
    });
  }

  it('every refusal is one line starting with "invalid manifest:"', () => {
    for (const [, edit] of refusals) {
      try {
        parseAnyManifest(text(edit));
      } catch (err) {
        expect((err as Error).message).toMatch(/^invalid manifest: [^\n]+$/);
      }
    }
  });
});
